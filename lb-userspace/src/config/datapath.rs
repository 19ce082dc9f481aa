//! `[flows]` and `[datapath]`: the flow table and the datapath's load-time policies.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use lb_common::{DEFAULT_EVENTS_PER_SEC, DEFAULT_FLOW_CAPACITY};

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Flows {
    /// Flow table entries (the table never evicts: when full, new flows are refused).
    #[serde(default = "default_capacity")]
    pub capacity: u32,
    #[serde(default)]
    pub timeouts: Timeouts,
}

fn default_capacity() -> u32 {
    DEFAULT_FLOW_CAPACITY
}

impl Default for Flows {
    fn default() -> Self {
        Self { capacity: DEFAULT_FLOW_CAPACITY, timeouts: Timeouts::default() }
    }
}

/// Idle timeouts by flow state, after which GC expires a flow and releases its slot.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    #[serde(default = "default_syn", with = "crate::config::humantime_str")]
    pub syn: Duration,
    #[serde(default = "default_established", with = "crate::config::humantime_str")]
    pub established: Duration,
    #[serde(default = "default_closing", with = "crate::config::humantime_str")]
    pub closing: Duration,
    #[serde(default = "default_udp", with = "crate::config::humantime_str")]
    pub udp: Duration,
}

fn default_syn() -> Duration {
    Duration::from_secs(10)
}
fn default_established() -> Duration {
    Duration::from_hours(2)
}
fn default_closing() -> Duration {
    Duration::from_secs(30)
}
fn default_udp() -> Duration {
    Duration::from_mins(1)
}

impl Default for Timeouts {
    fn default() -> Self {
        Self { syn: default_syn(), established: default_established(), closing: default_closing(), udp: default_udp() }
    }
}

/// Load-time datapath choices (the `CONFIG` global of the XDP object).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Datapath {
    #[serde(default)]
    pub icmp_echo: IcmpEcho,
    #[serde(default)]
    pub fragments: Fragments,
    #[serde(default = "default_events")]
    pub events_per_sec: u32,
    /// Next hop for `ipip` packets; without it, the kernel's FIB decides.
    #[serde(default)]
    pub gateway_mac: Option<String>,
    #[serde(default = "default_encap4")]
    pub encap_source_v4: Ipv4Addr,
    #[serde(default = "default_encap6")]
    pub encap_source_v6: Ipv6Addr,
}

fn default_events() -> u32 {
    DEFAULT_EVENTS_PER_SEC
}
fn default_encap4() -> Ipv4Addr {
    Ipv4Addr::new(172, 16, 0, 0)
}
fn default_encap6() -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x511c, 0, 0, 0, 0, 0, 0)
}

impl Default for Datapath {
    fn default() -> Self {
        Self {
            icmp_echo: IcmpEcho::default(),
            fragments: Fragments::default(),
            events_per_sec: DEFAULT_EVENTS_PER_SEC,
            gateway_mac: None,
            encap_source_v4: default_encap4(),
            encap_source_v6: default_encap6(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IcmpEcho {
    #[default]
    Reply,
    Pass,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Fragments {
    #[default]
    Drop,
    Pass,
}
