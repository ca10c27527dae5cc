//! Overlay devices (VXLAN, Geneve) and the static neighbours that route pod traffic into them.
//!
//! enc runs one overlay device per node in external (collect-metadata) mode. The encapsulation
//! of each packet comes from its route, as a lightweight-tunnel `encap ip` (VNI, outer source,
//! outer destination), so one device serves every peer and VXLAN and Geneve share one code
//! path (a Geneve device has no FDB). Each peer's pod CIDR is routed via the peer's underlay
//! address as an on-link gateway on the overlay device, and a permanent neighbour entry maps
//! that gateway to the peer's overlay MAC ([`overlay_mac`]), so no ARP ever crosses the tunnel.

use std::net::IpAddr;

use serde::Serialize;

use crate::{Error, Result};

/// The overlay encapsulation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OverlayKind {
    /// VXLAN (RFC 7348), Linux's default port 8472.
    Vxlan,
    /// Geneve (RFC 8926), IANA port 6081.
    Geneve,
}

impl OverlayKind {
    /// The kernel's link kind (`IFLA_INFO_KIND`), also the name in configs and status.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vxlan => "vxlan",
            Self::Geneve => "geneve",
        }
    }

    /// The default UDP port: 8472 for VXLAN (the Linux and Flannel/Cilium default), 6081 for
    /// Geneve (IANA).
    pub fn default_port(self) -> u16 {
        match self {
            Self::Vxlan => 8472,
            Self::Geneve => 6081,
        }
    }
}

impl std::fmt::Display for OverlayKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Desired state of the node's overlay device: an external-mode VXLAN or Geneve device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OverlaySpec {
    /// Interface name.
    pub ifname: String,
    /// VXLAN or Geneve.
    pub kind: OverlayKind,
    /// UDP destination port (and the port the device listens on).
    pub port: u16,
    /// Device MTU: the largest pod packet the overlay carries.
    pub mtu: u32,
    /// The device's MAC address ([`overlay_mac`] of this node's underlay address); peers
    /// address their frames to it.
    #[serde(serialize_with = "ser_mac")]
    pub mac: [u8; 6],
}

impl OverlaySpec {
    /// Checks what the kernel would refuse.
    pub fn validate(&self) -> Result<()> {
        let reason = if self.ifname.is_empty() || self.ifname.len() >= libc::IFNAMSIZ {
            Some("device name must have 1 to 15 bytes")
        } else if self.port == 0 {
            Some("UDP port 0")
        } else if self.mac[0] & 1 != 0 {
            Some("multicast MAC address")
        } else if self.mtu < 68 {
            Some("MTU below 68")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(Error::InvalidOverlay {
                ifname: self.ifname.clone(),
                reason,
            }),
            None => Ok(()),
        }
    }
}

/// What the kernel reports of an overlay device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OverlaySnapshot {
    /// Interface name.
    pub ifname: String,
    /// Interface index.
    pub index: u32,
    /// The link kind, if it is VXLAN or Geneve (`None`: a link of another kind has the name).
    pub kind: Option<OverlayKind>,
    /// UDP port.
    pub port: Option<u16>,
    /// Whether the device is in external (collect-metadata) mode.
    pub external: bool,
    /// MTU.
    pub mtu: u32,
    /// MAC address.
    #[serde(serialize_with = "ser_mac")]
    pub mac: [u8; 6],
    /// Administrative state.
    pub up: bool,
}

impl OverlaySnapshot {
    /// Whether the device can be kept for `spec` as it is (kind, port and mode); MTU, MAC and
    /// admin state are changed in place.
    pub fn compatible_with(&self, spec: &OverlaySpec) -> bool {
        self.kind == Some(spec.kind) && self.port == Some(spec.port) && self.external
    }

    /// Whether nothing needs changing for `spec`.
    pub fn matches(&self, spec: &OverlaySpec) -> bool {
        self.compatible_with(spec) && self.mtu == spec.mtu && self.mac == spec.mac && self.up
    }
}

/// A permanent neighbour entry on the overlay device: the gateway address of a peer's pod
/// routes (its underlay address) resolved to the peer's overlay MAC.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NeighSpec {
    /// The device.
    pub ifname: String,
    /// The neighbour's address.
    pub ip: IpAddr,
    /// Its link-layer address.
    #[serde(serialize_with = "ser_mac")]
    pub mac: [u8; 6],
}

/// The overlay MAC of the node with underlay address `addr`: locally administered unicast
/// `0e:e5:` followed by the IPv4 address, or by a 32-bit FNV-1a hash of the IPv6 address.
///
/// Every node derives every peer's MAC itself, so nothing needs to be exchanged. Two nodes of
/// one pair must not share a MAC (the kernel drops a frame whose source MAC is the receiving
/// device's own as a loop); with IPv4 underlays that cannot happen, with IPv6 it needs a 32-bit
/// hash collision between the two.
pub fn overlay_mac(addr: IpAddr) -> [u8; 6] {
    let tail: [u8; 4] = match addr {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(a) => {
            let mut h: u32 = 0x811c_9dc5;
            for b in a.octets() {
                h ^= u32::from(b);
                h = h.wrapping_mul(0x0100_0193);
            }
            h.to_be_bytes()
        }
    };
    [0x0e, 0xe5, tail[0], tail[1], tail[2], tail[3]]
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn ser_mac<S: serde::Serializer>(mac: &[u8; 6], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&format_mac(mac))
}

/// Changes that bring one neighbour set to another.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NeighChanges {
    /// Entries to add or replace.
    pub upsert: Vec<NeighSpec>,
    /// Entries to delete.
    pub delete: Vec<NeighSpec>,
}

/// The changes that bring `current` to `desired`; entries are identified by device and
/// address, so a changed MAC is one upsert.
pub fn diff_neighs(current: &[NeighSpec], desired: &[NeighSpec]) -> NeighChanges {
    let upsert = desired
        .iter()
        .filter(|d| !current.contains(d))
        .cloned()
        .collect();
    let delete = current
        .iter()
        .filter(|c| !desired.iter().any(|d| d.ifname == c.ifname && d.ip == c.ip))
        .cloned()
        .collect();
    NeighChanges { upsert, delete }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_unicast_local_and_distinct() {
        let a = overlay_mac("10.0.0.1".parse().unwrap());
        assert_eq!(a, [0x0e, 0xe5, 10, 0, 0, 1]);
        assert_eq!(format_mac(&a), "0e:e5:0a:00:00:01");
        let b = overlay_mac("fd00::1".parse().unwrap());
        let c = overlay_mac("fd00::2".parse().unwrap());
        assert_ne!(b, c);
        for m in [a, b, c] {
            assert_eq!(m[0] & 1, 0, "unicast");
            assert_eq!(m[0] & 2, 2, "locally administered");
        }
    }

    #[test]
    fn neighbour_diff() {
        let n = |ip: &str, last: u8| NeighSpec {
            ifname: "ov".into(),
            ip: ip.parse().unwrap(),
            mac: [0x0e, 0xe5, 0, 0, 0, last],
        };
        let current = vec![n("10.0.0.2", 2), n("10.0.0.3", 3), n("10.0.0.9", 9)];
        let desired = vec![n("10.0.0.2", 2), n("10.0.0.3", 4), n("10.0.0.4", 4)];
        let d = diff_neighs(&current, &desired);
        assert_eq!(d.upsert, vec![n("10.0.0.3", 4), n("10.0.0.4", 4)]);
        assert_eq!(d.delete, vec![n("10.0.0.9", 9)]);
        assert_eq!(diff_neighs(&desired, &desired), NeighChanges::default());
    }

    #[test]
    fn spec_validation_names_the_problem() {
        let mut s = OverlaySpec {
            ifname: "enc-vxlan0".into(),
            kind: OverlayKind::Vxlan,
            port: 8472,
            mtu: 1450,
            mac: overlay_mac("10.0.0.1".parse().unwrap()),
        };
        s.validate().unwrap();
        s.port = 0;
        assert!(s.validate().unwrap_err().to_string().contains("port 0"));
    }
}
