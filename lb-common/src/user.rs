//! `aya::Pod` for every map key and value (userspace only).

// SAFETY: all of these are plain-old-data: repr(C), explicit padding (sizes asserted where
// they are defined), and any bit pattern is a valid value.
unsafe impl aya::Pod for super::Counter {}
unsafe impl aya::Pod for super::ServiceKey {}
unsafe impl aya::Pod for super::Service {}
unsafe impl aya::Pod for super::Backend {}
unsafe impl aya::Pod for super::Conns {}
unsafe impl aya::Pod for super::FlowKey {}
unsafe impl aya::Pod for super::Flow {}
unsafe impl aya::Pod for super::FlowEntry {}
unsafe impl aya::Pod for super::FlowBucket {}
unsafe impl aya::Pod for super::FlowTags {}
unsafe impl aya::Pod for super::FlowCount {}
unsafe impl aya::Pod for super::TrafficStats {}
unsafe impl aya::Pod for super::RefusalEvent {}
unsafe impl aya::Pod for super::EventBucket {}
unsafe impl aya::Pod for super::Config {}
