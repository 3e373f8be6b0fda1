//! Runners and virtual IPs.

use std::collections::BTreeSet;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::{id::validate_name, ModelError, NodeId};

/// Most addresses one VIP service may hold.
pub const MAX_VIPS_PER_SERVICE: usize = 64;

/// What a runner registers about itself (ephemeral, gone with its session).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnerInfo {
    /// The node the runner belongs to.
    pub node: NodeId,
    /// Where its transport listens (`host:port` for TCP, the node id in process).
    pub address: String,
    /// How many tasks it runs at once.
    pub capacity: u32,
    /// When it started, Unix milliseconds.
    pub started_at_ms: i64,
    /// The crate version it runs.
    pub version: String,
}

/// The virtual IPs of one service (`iscsi`, `console`, ...), held by the leader's node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipConfig {
    /// The service's name (`[A-Za-z0-9._-]`).
    pub service: String,
    /// The addresses, IPv4 or IPv6, at least one.
    pub addresses: Vec<IpAddr>,
}

impl VipConfig {
    /// A validated configuration; the error names the bad field and value.
    pub fn new(service: impl Into<String>, addresses: Vec<IpAddr>) -> Result<Self, ModelError> {
        let config = VipConfig { service: service.into(), addresses };
        config.validate()?;
        Ok(config)
    }

    /// Checks the service name and every address.
    pub fn validate(&self) -> Result<(), ModelError> {
        check_service_name(&self.service)?;
        if self.addresses.is_empty() {
            return Err(ModelError::invalid("vip addresses", "", "need at least one address"));
        }
        if self.addresses.len() > MAX_VIPS_PER_SERVICE {
            return Err(ModelError::invalid(
                "vip addresses",
                self.addresses.len().to_string(),
                "more than 64 addresses",
            ));
        }
        let mut seen = BTreeSet::new();
        for address in &self.addresses {
            if !seen.insert(address) {
                return Err(ModelError::invalid("vip address", address.to_string(), "listed twice"));
            }
            check_vip_address(address)?;
        }
        Ok(())
    }
}

/// Refuses a VIP service name that is not `[A-Za-z0-9._-]`, 1 to 128 bytes.
pub fn check_service_name(service: &str) -> Result<(), ModelError> {
    validate_name("vip service", service)
}

/// Refuses addresses that cannot serve as a virtual IP.
pub fn check_vip_address(address: &IpAddr) -> Result<(), ModelError> {
    let reason = match address {
        a if a.is_unspecified() => Some("is the unspecified address"),
        a if a.is_loopback() => Some("is a loopback address"),
        a if a.is_multicast() => Some("is a multicast address"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("is the broadcast address"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("is a link-local address"),
        IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => Some("is a link-local address"),
        _ => None,
    };
    match reason {
        Some(reason) => Err(ModelError::invalid("vip address", address.to_string(), reason)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_documentation_addresses() {
        let v =
            VipConfig::new("iscsi", vec!["198.51.100.10".parse().unwrap(), "2001:db8::10".parse().unwrap()]).unwrap();
        assert_eq!(v.addresses.len(), 2);
    }

    #[test]
    fn refuses_addresses_that_cannot_be_vips() {
        for bad in ["0.0.0.0", "127.0.0.1", "224.0.0.1", "255.255.255.255", "169.254.1.1", "::1", "fe80::1", "ff02::1"]
        {
            let err = VipConfig::new("iscsi", vec![bad.parse().unwrap()]).unwrap_err();
            assert!(err.to_string().contains(bad), "{bad}: {err}");
        }
        assert!(VipConfig::new("iscsi", vec![]).is_err());
        assert!(VipConfig::new("a/b", vec!["198.51.100.1".parse().unwrap()]).is_err());
        let dup: IpAddr = "198.51.100.1".parse().unwrap();
        assert!(VipConfig::new("iscsi", vec![dup, dup]).is_err());
    }
}
