//! What is counted: outcomes per packet ([`Stat`]), refusal reasons ([`Reason`],
//! [`Refusals`]) and traffic per service and backend ([`TrafficStats`]).

/// A packet and byte count. Value of [`maps::STATS`] (one per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(size_of::<Counter>() == 16);

macro_rules! stats {
    ($($(#[$doc:meta])* $variant:ident = $idx:literal, $name:literal, $malformed:literal;)+) => {
        /// What happened to a packet. Every packet a program sees is counted under exactly one
        /// of these, so their sum is the number of packets seen. The index into [`maps::STATS`].
        ///
        /// Malformed/truncated frames get their own outcome per header so an operator can tell
        /// a broken sender from a broken parser; they are passed to the kernel (which drops
        /// them with its own accounting), never `XDP_ABORTED`.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Stat { $($(#[$doc])* $variant = $idx,)+ }

        impl Stat {
            pub const ALL: &[Self] = &[$(Self::$variant,)+];
            /// Number of variants: the capacity of [`maps::STATS`].
            pub const COUNT: u32 = Self::ALL.len() as u32;

            /// Stable snake_case name, used in `sluice status`, metrics labels and docs.
            pub const fn name(self) -> &'static str {
                match self { $(Self::$variant => $name,)+ }
            }

            /// The outcome with this index, if there is one.
            pub const fn from_u32(v: u32) -> Option<Self> {
                match v { $($idx => Some(Self::$variant),)+ _ => None }
            }

            /// Whether this outcome means the frame was malformed or truncated.
            pub const fn is_malformed(self) -> bool {
                match self { $(Self::$variant => $malformed,)+ }
            }
        }
    };
}

stats! {
    /// Not IPv4/IPv6 (ARP, LLDP, …): passed.
    NonIp = 0, "non_ip", false;
    /// IPv4/IPv6 carrying neither TCP nor UDP, not for a VIP (ICMP, …): passed.
    OtherL4 = 1, "other_l4", false;
    /// TCP over IPv4, not for a service: passed.
    Tcp4 = 2, "tcp4", false;
    /// UDP over IPv4, not for a service: passed.
    Udp4 = 3, "udp4", false;
    /// TCP over IPv6, not for a service: passed.
    Tcp6 = 4, "tcp6", false;
    /// UDP over IPv6, not for a service: passed.
    Udp6 = 5, "udp6", false;
    /// A fragment not for a VIP (IPv4 MF/offset, IPv6 fragment header): passed.
    Fragment = 6, "fragment", false;
    /// Shorter than an Ethernet header.
    TruncatedEth = 7, "truncated_eth", true;
    /// 802.1Q tag cut short.
    TruncatedVlan = 8, "truncated_vlan", true;
    /// Shorter than the IPv4 header its IHL announces, or than its total length.
    TruncatedIpv4 = 9, "truncated_ipv4", true;
    /// IPv4 header with IHL < 5, version ≠ 4 or a total length shorter than its header.
    BadIpv4 = 10, "bad_ipv4", true;
    /// Shorter than an IPv6 header, its payload length, or one of its extension headers.
    TruncatedIpv6 = 11, "truncated_ipv6", true;
    /// IPv6 with more extension headers than the datapath walks ([`MAX_IPV6_EXT_HEADERS`]).
    Ipv6ExtLimit = 12, "ipv6_ext_limit", false;
    /// TCP header cut short (20 bytes or its data offset).
    TruncatedTcp = 13, "truncated_tcp", true;
    /// TCP data offset < 5.
    BadTcp = 14, "bad_tcp", true;
    /// UDP header cut short.
    TruncatedUdp = 15, "truncated_udp", true;
    /// Sent to a backend (existing, new or adopted flow): `XDP_TX`.
    Forwarded = 16, "forwarded", false;
    /// A new flow refused and answered with a TCP RST: `XDP_TX`.
    RefusedRst = 17, "refused_rst", false;
    /// A new flow refused and dropped (policy `reject = "drop"`, or UDP).
    RefusedDrop = 18, "refused_drop", false;
    /// A fragment for a VIP, dropped by the fragment policy.
    FragmentDropped = 19, "fragment_dropped", false;
    /// An ICMP/ICMPv6 echo request to a VIP, answered: `XDP_TX`.
    IcmpEchoReplied = 20, "icmp_echo_replied", false;
    /// Other ICMP to a VIP (or echo with answering off): passed.
    IcmpPassed = 21, "icmp_passed", false;
    /// ICMP "fragmentation needed" / "packet too big" about a VIP flow, sent to its backend.
    IcmpErrorForwarded = 22, "icmp_error_forwarded", false;
    /// No next hop for an encapsulated packet (no gateway MAC, FIB lookup failed): dropped.
    NoRoute = 23, "no_route", false;
    /// Decap program: an IPIP/IP6IP6/4in6/6in4 packet, outer header stripped: passed.
    Decapsulated = 24, "decapsulated", false;
    /// Decap program: not encapsulated: passed untouched.
    DecapPassthrough = 25, "decap_passthrough", false;
    /// A TCP RST for a service without a flow: forwarded by ring, no flow created.
    ForwardedNoFlow = 26, "forwarded_no_flow", false;
    /// A new flow's first packet dropped, its slot given back, because it could not be
    /// entered in the flow table at that moment: another CPU held its bucket through every
    /// attempt, or a CLOSING twin was removed under it. Rare; the client retransmits.
    FlowBusy = 27, "flow_busy", false;
}

// STATS is indexed by discriminant: ALL must list the variants in index order (tested).

macro_rules! reasons {
    ($($(#[$doc:meta])* $variant:ident = $idx:literal, $field:ident, $name:literal;)+) => {
        /// Why a new flow was refused. Counted per service and per backend
        /// ([`Refusals`]), and carried in refusal events.
        #[repr(u8)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Reason { $($(#[$doc])* $variant = $idx,)+ }

        /// Refusal counters by reason, one named field each so `bpftool` shows the reason.
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct Refusals { $(pub $field: u64,)+ }

        impl Reason {
            pub const ALL: &[Self] = &[$(Self::$variant,)+];
            pub const fn name(self) -> &'static str {
                match self { $(Self::$variant => $name,)+ }
            }
            pub const fn from_u8(v: u8) -> Option<Self> {
                match v { $($idx => Some(Self::$variant),)+ _ => None }
            }
        }

        impl Refusals {
            #[inline(always)]
            pub fn slot(&mut self, r: Reason) -> &mut u64 {
                match r { $(Reason::$variant => &mut self.$field,)+ }
            }
            pub const fn get(&self, r: Reason) -> u64 {
                match r { $(Reason::$variant => self.$field,)+ }
            }
            pub fn total(&self) -> u64 {
                0 $(+ self.$field)+
            }
            /// Adds `o` field by field (summing per-CPU values).
            pub fn add(&mut self, o: &Self) {
                $(self.$field += o.$field;)+
            }
        }
    };
}

reasons! {
    /// The chosen backend is at its `max_conns`.
    BackendLimit = 0, backend_limit, "backend_limit";
    /// `spill` is on and every candidate tried was refused at its own limit, draining or down
    /// (one refused only for lack of this node's share makes it `share_exhausted`).
    ServiceSaturated = 1, service_saturated, "service_saturated";
    /// The chosen backend is down (failed health checks).
    BackendDown = 2, backend_down, "backend_down";
    /// The chosen backend is draining: no new flows.
    BackendDraining = 3, backend_draining, "backend_draining";
    /// The service has no backend in its ring.
    NoBackend = 4, no_backend, "no_backend";
    /// The flow table is full (it never evicts a live flow).
    FlowTableFull = 5, flow_table_full, "flow_table_full";
    /// A fragment for the VIP, dropped by policy.
    Fragment = 6, fragment, "fragment";
    /// A malformed TCP/UDP header for the VIP.
    Malformed = 7, malformed, "malformed";
    /// The chosen backend's `max_conns` is cluster-wide, this node's share of it is used up,
    /// and the cluster had room when this node last heard from the others (the allocator moves
    /// shares to where the demand is; `backend_limit` once the cluster is full).
    ShareExhausted = 8, share_exhausted, "share_exhausted";
}
const _: () = assert!(size_of::<Refusals>() == 9 * 8);

/// Value of `SVC_STATS` and `BACKEND_STATS` (per-CPU arrays indexed by service / backend id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficStats {
    /// Packets and bytes forwarded.
    pub packets: u64,
    pub bytes: u64,
    /// New flows admitted.
    pub new_flows: u64,
    /// Flows adopted mid-stream.
    pub adopted: u64,
    pub refused: Refusals,
}
const _: () = assert!(size_of::<TrafficStats>() == 32 + 72);

impl TrafficStats {
    /// Adds `o` field by field (summing per-CPU values).
    pub fn add(&mut self, o: &Self) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.new_flows += o.new_flows;
        self.adopted += o.adopted;
        self.refused.add(&o.refused);
    }
}
