//! The seam between the agent and a WireGuard implementation, and the data it speaks.

use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;
use serde::Serialize;

use crate::error::Result;
use crate::keys::{PresharedKey, PublicKey};

/// Desired state of one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSpec {
    /// The peer's static public key (its identity on this device).
    pub public_key: PublicKey,
    /// Symmetric key mixed into the handshake; binds the tunnel to the authenticated control channel.
    pub preshared_key: Option<PresharedKey>,
    /// Where to send to; `None` keeps whatever endpoint is known (configured or roamed to).
    pub endpoint: Option<SocketAddr>,
    /// Inner addresses routed to this peer and accepted from it (cryptokey routing).
    pub allowed_ips: Vec<IpNet>,
    /// Keepalive interval in seconds; `None` or `Some(0)` disables it.
    pub persistent_keepalive: Option<u16>,
}

/// What the device reports about one peer.
#[derive(Clone, Debug, Serialize)]
pub struct PeerSnapshot {
    /// The peer's static public key.
    pub public_key: PublicKey,
    /// Current endpoint (configured, or learned from authenticated packets).
    pub endpoint: Option<SocketAddr>,
    /// Prefixes currently routed to this peer.
    pub allowed_ips: Vec<IpNet>,
    /// Time since the last completed handshake; `None` if there is no session.
    pub last_handshake: Option<Duration>,
    /// Bytes received from this peer.
    pub rx_bytes: u64,
    /// Bytes sent to this peer.
    pub tx_bytes: u64,
    /// Whether a preshared key is configured (the key itself is never reported).
    pub has_preshared_key: bool,
}

/// What the device reports about itself and all its peers.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceSnapshot {
    /// Interface name.
    pub ifname: String,
    /// The device's own public key.
    pub public_key: PublicKey,
    /// UDP port the device listens on.
    pub listen_port: u16,
    /// All configured peers, sorted by public key.
    pub peers: Vec<PeerSnapshot>,
}

/// Which WireGuard implementation runs a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// Userspace: boringtun's noise core on a TUN device, in this process.
    Boringtun,
    /// The kernel's WireGuard module, configured over generic netlink.
    Kernel,
}

/// The seam between the agent and a WireGuard implementation (kernel via netlink, boringtun, and a
/// fake). All operations are idempotent.
pub trait WgBackend: Send + Sync {
    /// Which implementation this is.
    fn kind(&self) -> BackendKind;
    /// Interface name.
    fn ifname(&self) -> &str;
    /// The device's own public key.
    fn public_key(&self) -> PublicKey;
    /// UDP port the device listens on.
    fn listen_port(&self) -> u16;
    /// Adds or updates a peer to match `spec`; an unchanged spec is a no-op (it must not reset an
    /// established session). A changed preshared key or allowed IPs takes effect (for boringtun a
    /// preshared-key or keepalive change rebuilds the peer's session state).
    fn upsert_peer(&self, spec: &PeerSpec) -> Result<()>;
    /// Removes a peer; an absent peer is not an error.
    fn delete_peer(&self, key: &PublicKey) -> Result<()>;
    /// Reports the device and all its peers.
    fn dump(&self) -> Result<DeviceSnapshot>;
}

/// Per-packet overhead of WireGuard on the wire: outer IP (20 or 40) + UDP 8 + WireGuard data
/// header 16 + Poly1305 tag 16.
pub const fn overhead(ipv6_underlay: bool) -> u32 {
    let ip = if ipv6_underlay { 40 } else { 20 };
    ip + 8 + 16 + 16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overhead_values() {
        assert_eq!(overhead(false), 60);
        assert_eq!(overhead(true), 80);
        // The classic WireGuard MTU: 1500 - 80 covers both underlay families.
        assert_eq!(1500 - overhead(true), 1420);
    }

    #[test]
    fn backend_kind_serializes_kebab() {
        assert_eq!(
            serde_json::to_string(&BackendKind::Boringtun).unwrap(),
            "\"boringtun\""
        );
        assert_eq!(
            serde_json::to_string(&BackendKind::Kernel).unwrap(),
            "\"kernel\""
        );
    }
}
