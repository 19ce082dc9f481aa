//! The load-time configuration global (`CONFIG`).

use crate::{flow_table_buckets, DEFAULT_EVENTS_PER_SEC, DEFAULT_FLOW_CAPACITY};

named_u8! {
    /// What the datapath does with an ICMP echo request to a VIP ([`Config::icmp_echo`]).
    IcmpEcho {
        Pass = 0, "pass", ICMP_ECHO_PASS;
        Reply = 1, "reply", ICMP_ECHO_REPLY;
    }
}

named_u8! {
    /// What the datapath does with a fragment for a VIP ([`Config::fragments`]).
    Fragments {
        Drop = 0, "drop", FRAGMENTS_DROP;
        Pass = 1, "pass", FRAGMENTS_PASS;
    }
}

/// Load-time configuration, a read-only global in the object (`CONFIG`), set with
/// `EbpfLoader::override_global` so the verifier prunes paths a deployment does not use.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// [`ICMP_ECHO_REPLY`] or [`ICMP_ECHO_PASS`] for echo requests to a VIP.
    pub icmp_echo: u8,
    /// [`FRAGMENTS_DROP`] or [`FRAGMENTS_PASS`] for fragments to a VIP.
    pub fragments: u8,
    /// 1 if `gateway_mac` is the next hop for encapsulated packets; else `bpf_fib_lookup`.
    pub has_gateway: u8,
    pub _pad0: u8,
    /// Refusal events per second per CPU (token bucket; burst = one second's worth).
    pub events_per_sec: u32,
    pub gateway_mac: [u8; 6],
    pub _pad1: [u8; 2],
    /// Outer source of IPIP packets; the low 16 bits are XORed with the flow hash so each
    /// flow has a stable source (and backends' RSS spreads flows), per Katran.
    pub encap_src4: [u8; 4],
    pub encap_src6: [u8; 16],
    /// Flows the table may hold (`FLOW_COUNT.capacity`), and its buckets
    /// ([`flow_table_buckets`], the length of `FLOWS`); set by the loader.
    pub flow_capacity: u32,
    pub flow_buckets: u32,
}
const _: () = assert!(size_of::<Config>() == 44);

impl Config {
    pub const DEFAULT: Self = Self {
        icmp_echo: ICMP_ECHO_REPLY,
        fragments: FRAGMENTS_DROP,
        has_gateway: 0,
        _pad0: 0,
        events_per_sec: DEFAULT_EVENTS_PER_SEC,
        gateway_mac: [0; 6],
        _pad1: [0; 2],
        encap_src4: [172, 16, 0, 0],
        encap_src6: [0xfd, 0, 0x51, 0x1c, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        flow_capacity: DEFAULT_FLOW_CAPACITY,
        flow_buckets: flow_table_buckets(DEFAULT_FLOW_CAPACITY),
    };
}

impl Default for Config {
    fn default() -> Self {
        Self::DEFAULT
    }
}
