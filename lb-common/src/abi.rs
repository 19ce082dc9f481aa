//! The object's names and limits: schema, pins, maps, programs, capacities, and the
//! protocol numbers and XDP actions both sides name.

/// Bumped whenever a pinned map's layout or meaning changes; a daemon refuses to adopt pinned
/// maps of another schema.
pub const SCHEMA_VERSION: u32 = 4;

/// The pinned XDP link's file name in the pin directory (the daemon's attachment survives it).
pub const PIN_LINK: &str = "link";

/// Directory under the bpf filesystem where `sluice run` pins its maps by default.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/sluice";

/// Map names as they appear in the object, in `bpftool map list` and as pin file names.
/// Each map's kind, key → value, writer and reader are documented where it is defined
/// (`lb-ebpf/src/maps.rs`).
pub mod maps {
    pub const STATS: &str = "STATS";
    pub const SERVICES: &str = "SERVICES";
    pub const BACKENDS: &str = "BACKENDS";
    pub const CONNS: &str = "CONNS";
    pub const RINGS: &str = "RINGS";
    pub const FLOWS: &str = "FLOWS";
    pub const SVC_STATS: &str = "SVC_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const EVENTS: &str = "EVENTS";
    pub const EVENT_BUCKET: &str = "EVENT_BUCKET";
    pub const SCHEMA: &str = "SCHEMA";
    pub const SERVICE_FILTER: &str = "SERVICE_FILTER";
    pub const FLOW_TAGS: &str = "FLOW_TAGS";
    pub const FLOW_COUNT: &str = "FLOW_COUNT";
    /// Every map the balancer pins.
    pub const ALL: [&str; 14] = [STATS, SERVICES, BACKENDS, CONNS, RINGS, FLOWS, SVC_STATS, BACKEND_STATS, EVENTS, EVENT_BUCKET, SCHEMA, SERVICE_FILTER, FLOW_TAGS, FLOW_COUNT];
}

/// Name of the balancer XDP program in the object.
pub const PROG_BALANCER: &str = "sluice_balancer";
/// Name of the backend-side decapsulation XDP program in the object.
pub const PROG_DECAP: &str = "sluice_decap";
/// Name of the load-time configuration global (a [`Config`]).
pub const GLOBAL_CONFIG: &str = "CONFIG";

/// Services (VIP, port, proto) the datapath can hold; also the size of `SVC_STATS`.
pub const MAX_SERVICES: u32 = 1024;
/// Backends across all services. Id 0 means "none", so ids run 1..MAX_BACKENDS.
pub const MAX_BACKENDS: u32 = 16384;
/// 64-bit words of `SERVICE_FILTER`: a bitmap of 65,536 bits indexed by
/// [`service_filter_bit`].
pub const SERVICE_FILTER_WORDS: u32 = 1024;
/// Default Maglev ring size (prime).
pub const DEFAULT_RING_SIZE: u32 = 65537;
/// Default capacity of `RINGS` in slots (16 services at the default ring size, twice over so a
/// new ring can be written beside the live one); set at load time.
pub const DEFAULT_RING_SLOTS: u32 = 2 * 16 * DEFAULT_RING_SIZE;
/// Default flow table capacity (flows); set at load time.
pub const DEFAULT_FLOW_CAPACITY: u32 = 1 << 20;
/// Distinct extra backends a `spill` service may try after its first choice.
pub const MAX_SPILL: u32 = 3;
/// Ring positions probed while looking for distinct spill candidates (bounds the loop).
pub const MAX_PROBES: u32 = 12;
/// Refusal events sent to userspace per second per CPU, unless configured.
pub const DEFAULT_EVENTS_PER_SEC: u32 = 100;

named_u8! {
    /// IP protocol numbers the datapath parses.
    Proto {
        Icmp = 1, "icmp", PROTO_ICMP;
        Ipip = 4, "ipip", PROTO_IPIP;
        Tcp = 6, "tcp", PROTO_TCP;
        Udp = 17, "udp", PROTO_UDP;
        Ipv6 = 41, "ipv6", PROTO_IPV6;
        Icmpv6 = 58, "icmpv6", PROTO_ICMPV6;
    }
}

/// The kernel's XDP actions (`enum xdp_action`), as a program returns them and
/// `BPF_PROG_TEST_RUN` reports them.
pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// IPv6 extension headers (hop-by-hop, routing, destination options) walked before giving up;
/// bounded so the verifier can prove the loop ends.
pub const MAX_IPV6_EXT_HEADERS: u32 = 4;
