//! A backend's identity: its service's name and its address, one type for the daemon's maps
//! and one text form, `service/address`, for what is written down (etcd's reports and grants,
//! the history's series, `sluice status`).

use std::{fmt, net::IpAddr};

/// A backend: its service's name and its address.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendKey {
    pub service: String,
    pub address: IpAddr,
}

impl BackendKey {
    pub fn new(service: impl Into<String>, address: IpAddr) -> Self {
        Self { service: service.into(), address }
    }
}

/// `service/address`.
impl fmt::Display for BackendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.service, self.address)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_as_service_slash_address() {
        assert_eq!(BackendKey::new("web", "10.0.0.1".parse().expect("ip")).to_string(), "web/10.0.0.1");
        assert_eq!(BackendKey::new("web6", "2001:db8::1".parse().expect("ip")).to_string(), "web6/2001:db8::1");
    }
}
