//! The seam between the agent and a WireGuard implementation, and the data it speaks.

use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;
use serde::Serialize;

use crate::error::Result;
use crate::keys::{PresharedKey, PrivateKey, PublicKey};

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
    /// Which of the device's static keys this peer's sessions use; `None` is the primary (the
    /// one at the time of the upsert: after a new key was added, upserting the same spec moves
    /// the peer to it). A key the device does not hold is an error.
    pub local_key: Option<PublicKey>,
    /// The key this peer was known by before it rolled its static key. If no peer has
    /// `public_key` but one has this key, that peer is re-keyed to `public_key` in place
    /// (make-before-break, keeping its counters, endpoint and old session); otherwise it is
    /// ignored and the spec is a plain upsert of `public_key`.
    pub previous_public_key: Option<PublicKey>,
}

/// What the device reports about one peer.
#[derive(Clone, Debug, Serialize)]
pub struct PeerSnapshot {
    /// The peer's static public key.
    pub public_key: PublicKey,
    /// The device's static key that the newest key generation uses towards this peer.
    pub local_key: PublicKey,
    /// Current endpoint (configured, or learned from authenticated packets).
    pub endpoint: Option<SocketAddr>,
    /// Prefixes currently routed to this peer.
    pub allowed_ips: Vec<IpNet>,
    /// Time since the newest key generation's last completed handshake; `None` while it has no
    /// session (e.g. right after a preshared-key change, before the peer switched too).
    pub last_handshake: Option<Duration>,
    /// Bytes received from this peer, over all key generations (never decreases).
    pub rx_bytes: u64,
    /// Bytes sent to this peer, over all key generations (never decreases).
    pub tx_bytes: u64,
    /// Whether a preshared key is configured (the key itself is never reported).
    pub has_preshared_key: bool,
    /// Key generations (noise states) the peer holds: 1 normally, 2 while a key change (static
    /// or preshared) is in progress and the previous keys' session is kept for traffic. Older
    /// states that only drain late packets (boringtun) are not counted.
    pub generations: u8,
    /// Whether the newest key generation has a session (traffic has moved to the newest key).
    pub current_has_session: bool,
}

/// What the device reports about itself and all its peers.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceSnapshot {
    /// Interface name.
    pub ifname: String,
    /// The device's primary public key (see [`WgBackend::public_key`]).
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
    /// The device's primary public key: the static key added last, used by peers whose spec
    /// names no `local_key`.
    fn public_key(&self) -> PublicKey;
    /// Adds a static key pair and makes it the primary; returns its public key. Adding a key
    /// the device already holds changes nothing (it does not become primary again).
    fn add_private_key(&self, key: PrivateKey) -> Result<PublicKey>;
    /// Drops the static keys not in `keep`; keys in `keep` that the device does not hold are
    /// ignored. Fails, dropping nothing, if `keep` lacks the primary ([`Error::PrimaryKeyDropped`])
    /// or a key that a peer's newest generation still uses ([`Error::KeyInUse`]). An older
    /// generation that used a dropped key keeps its session until it is retired but can no
    /// longer complete a handshake.
    ///
    /// [`Error::PrimaryKeyDropped`]: crate::Error::PrimaryKeyDropped
    /// [`Error::KeyInUse`]: crate::Error::KeyInUse
    fn retain_private_keys(&self, keep: &[PublicKey]) -> Result<()>;
    /// The public halves of the device's static keys, the primary first.
    fn private_keys(&self) -> Vec<PublicKey>;
    /// UDP port the device listens on.
    fn listen_port(&self) -> u16;
    /// Adds or updates a peer to match `spec`; an unchanged spec is a no-op (it must not reset an
    /// established session), and an endpoint or allowed-IPs change keeps the session.
    ///
    /// A change of the keys (preshared key, local key, or the peer's key through
    /// `previous_public_key`; for boringtun also a keepalive change) is make-before-break: a
    /// handshake under the new keys starts at once, and the old keys' session keeps carrying
    /// traffic both ways until it completes, so no packet is lost while the two ends switch a
    /// few seconds apart or less. The old session is dropped a while after the new one is up,
    /// at the latest 180 s after the change. A `local_key` the device does not hold is an error
    /// ([`Error::UnknownLocalKey`]).
    ///
    /// [`Error::UnknownLocalKey`]: crate::Error::UnknownLocalKey
    fn upsert_peer(&self, spec: &PeerSpec) -> Result<()>;
    /// Removes a peer; an absent peer is not an error.
    fn delete_peer(&self, key: &PublicKey) -> Result<()>;
    /// Reports the device and all its peers.
    fn dump(&self) -> Result<DeviceSnapshot>;
    /// Packets the device dropped, or failed to handle, that belong to no peer: pairs of a
    /// stable kebab-case reason and a monotonic count, every reason the implementation counts
    /// listed (zeros included), in a fixed order. Empty for an implementation without device
    /// counters (kernel WireGuard), which the default does.
    fn device_drop_counts(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
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
