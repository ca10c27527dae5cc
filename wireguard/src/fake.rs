//! In-memory WireGuard backend for unit tests of the agent.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use ipnet::IpNet;

use crate::backend::{BackendKind, DeviceSnapshot, PeerSnapshot, PeerSpec, WgBackend};
use crate::error::Result;
use crate::keys::PublicKey;

#[derive(Debug)]
struct FakePeer {
    spec: PeerSpec,
    endpoint: Option<SocketAddr>,
    /// Prefixes this peer actually owns (another peer's upsert can take one away, as in the kernel).
    allowed_ips: Vec<IpNet>,
    last_handshake: Option<Duration>,
    rx: u64,
    tx: u64,
}

#[derive(Debug, Default)]
struct State {
    peers: BTreeMap<PublicKey, FakePeer>,
    upserts: usize,
    deletes: usize,
    changes: usize,
}

/// In-memory fake of [`WgBackend`]: records peers with the same semantics as the real backends
/// (idempotent upserts, allowed IPs unique across peers, endpoint kept when the spec has none),
/// and lets tests set handshake and byte counters.
#[derive(Debug)]
pub struct FakeWg {
    ifname: String,
    public_key: PublicKey,
    listen_port: u16,
    state: Mutex<State>,
}

impl FakeWg {
    /// A fake device with no peers.
    pub fn new(ifname: &str, public_key: PublicKey, listen_port: u16) -> Self {
        Self {
            ifname: ifname.to_owned(),
            public_key,
            listen_port,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets what `dump` reports for a peer's handshake age and byte counters (ignored for unknown peers).
    pub fn set_stats(&self, key: &PublicKey, last_handshake: Option<Duration>, rx: u64, tx: u64) {
        if let Some(p) = self.state().peers.get_mut(key) {
            p.last_handshake = last_handshake;
            p.rx = rx;
            p.tx = tx;
        }
    }

    /// Number of `upsert_peer` calls so far (changing or not).
    pub fn upsert_count(&self) -> usize {
        self.state().upserts
    }

    /// Number of `delete_peer` calls so far (present peer or not).
    pub fn delete_count(&self) -> usize {
        self.state().deletes
    }

    /// Number of upserts and deletes that actually changed the device.
    pub fn change_count(&self) -> usize {
        self.state().changes
    }

    /// The spec last applied for a peer.
    pub fn peer_spec(&self, key: &PublicKey) -> Option<PeerSpec> {
        self.state().peers.get(key).map(|p| p.spec.clone())
    }
}

impl WgBackend for FakeWg {
    fn kind(&self) -> BackendKind {
        BackendKind::Boringtun
    }

    fn ifname(&self) -> &str {
        &self.ifname
    }

    fn public_key(&self) -> PublicKey {
        self.public_key
    }

    fn listen_port(&self) -> u16 {
        self.listen_port
    }

    fn upsert_peer(&self, spec: &PeerSpec) -> Result<()> {
        let mut st = self.state();
        st.upserts += 1;
        if st
            .peers
            .get(&spec.public_key)
            .is_some_and(|p| p.spec == *spec)
        {
            return Ok(());
        }
        st.changes += 1;
        // Allowed IPs are unique across peers: this peer takes its prefixes from the others.
        let mine: Vec<IpNet> = spec.allowed_ips.iter().map(IpNet::trunc).collect();
        for (k, p) in st.peers.iter_mut() {
            if *k != spec.public_key {
                p.allowed_ips.retain(|n| !mine.contains(n));
            }
        }
        let mut allowed = mine;
        allowed.sort();
        allowed.dedup();
        match st.peers.get_mut(&spec.public_key) {
            Some(p) => {
                if spec.preshared_key != p.spec.preshared_key
                    || spec.persistent_keepalive != p.spec.persistent_keepalive
                {
                    // Like boringtun: a new preshared key means a new session.
                    p.last_handshake = None;
                }
                if spec.endpoint.is_some() {
                    p.endpoint = spec.endpoint;
                }
                p.allowed_ips = allowed;
                p.spec = spec.clone();
            }
            None => {
                st.peers.insert(
                    spec.public_key,
                    FakePeer {
                        spec: spec.clone(),
                        endpoint: spec.endpoint,
                        allowed_ips: allowed,
                        last_handshake: None,
                        rx: 0,
                        tx: 0,
                    },
                );
            }
        }
        Ok(())
    }

    fn delete_peer(&self, key: &PublicKey) -> Result<()> {
        let mut st = self.state();
        st.deletes += 1;
        if st.peers.remove(key).is_some() {
            st.changes += 1;
        }
        Ok(())
    }

    fn dump(&self) -> Result<DeviceSnapshot> {
        let st = self.state();
        Ok(DeviceSnapshot {
            ifname: self.ifname.clone(),
            public_key: self.public_key,
            listen_port: self.listen_port,
            peers: st
                .peers
                .iter()
                .map(|(k, p)| PeerSnapshot {
                    public_key: *k,
                    endpoint: p.endpoint,
                    allowed_ips: p.allowed_ips.clone(),
                    last_handshake: p.last_handshake,
                    rx_bytes: p.rx,
                    tx_bytes: p.tx,
                    has_preshared_key: p.spec.preshared_key.is_some(),
                })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PresharedKey;

    fn spec(k: u8, ips: &[&str]) -> PeerSpec {
        PeerSpec {
            public_key: PublicKey([k; 32]),
            preshared_key: Some(PresharedKey::from_bytes([k; 32])),
            endpoint: Some(format!("192.0.2.{k}:51820").parse().unwrap()),
            allowed_ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            persistent_keepalive: None,
        }
    }

    #[test]
    fn upsert_is_idempotent_and_keeps_stats() {
        let wg = FakeWg::new("wg0", PublicKey([0; 32]), 51820);
        let a = spec(1, &["10.0.1.0/24"]);
        wg.upsert_peer(&a).unwrap();
        wg.set_stats(&a.public_key, Some(Duration::from_secs(3)), 10, 20);
        wg.upsert_peer(&a).unwrap();
        wg.upsert_peer(&a).unwrap();
        assert_eq!(wg.upsert_count(), 3);
        assert_eq!(wg.change_count(), 1);
        let d = wg.dump().unwrap();
        assert_eq!(d.peers.len(), 1);
        assert_eq!(d.peers[0].last_handshake, Some(Duration::from_secs(3)));
        assert_eq!((d.peers[0].rx_bytes, d.peers[0].tx_bytes), (10, 20));
        assert!(d.peers[0].has_preshared_key);

        // A new preshared key resets the session but not the counters.
        let mut a2 = a.clone();
        a2.preshared_key = Some(PresharedKey::from_bytes([9; 32]));
        wg.upsert_peer(&a2).unwrap();
        let d = wg.dump().unwrap();
        assert_eq!(d.peers[0].last_handshake, None);
        assert_eq!(wg.change_count(), 2);
        assert_eq!(wg.peer_spec(&a.public_key), Some(a2));
    }

    #[test]
    fn delete_is_idempotent() {
        let wg = FakeWg::new("wg0", PublicKey([0; 32]), 51820);
        let a = spec(1, &["10.0.1.0/24"]);
        wg.upsert_peer(&a).unwrap();
        wg.delete_peer(&a.public_key).unwrap();
        wg.delete_peer(&a.public_key).unwrap();
        assert_eq!(wg.delete_count(), 2);
        assert_eq!(wg.change_count(), 2);
        assert!(wg.dump().unwrap().peers.is_empty());
    }

    #[test]
    fn allowed_ips_move_between_peers_and_endpoint_sticks() {
        let wg = FakeWg::new("wg0", PublicKey([0; 32]), 51820);
        wg.upsert_peer(&spec(1, &["10.0.1.0/24", "10.0.9.0/24"]))
            .unwrap();
        let mut b = spec(2, &["10.0.9.0/24"]);
        b.endpoint = None;
        wg.upsert_peer(&b).unwrap();
        let d = wg.dump().unwrap();
        assert_eq!(
            d.peers[0].allowed_ips,
            vec!["10.0.1.0/24".parse::<IpNet>().unwrap()]
        );
        assert_eq!(
            d.peers[1].allowed_ips,
            vec!["10.0.9.0/24".parse::<IpNet>().unwrap()]
        );
        assert_eq!(d.peers[1].endpoint, None);
        assert_eq!(
            d.peers[0].endpoint,
            Some("192.0.2.1:51820".parse().unwrap())
        );
    }
}
