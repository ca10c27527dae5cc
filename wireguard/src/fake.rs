//! In-memory WireGuard backend for unit tests of the agent.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use ipnet::IpNet;

use crate::DropCounters;
use crate::backend::{BackendKind, DeviceSnapshot, PeerSnapshot, PeerSpec, WgBackend};
use crate::error::{Error, Result};
use crate::keys::{PrivateKey, PublicKey};

#[derive(Debug)]
struct FakePeer {
    spec: PeerSpec,
    /// The device key it uses (`spec.local_key` resolved when applied).
    local: PublicKey,
    endpoint: Option<SocketAddr>,
    /// Prefixes this peer actually owns (another peer's upsert can take one away, as in the kernel).
    allowed_ips: Vec<IpNet>,
    last_handshake: Option<Duration>,
    rx: u64,
    tx: u64,
}

#[derive(Debug)]
struct State {
    /// The device's static keys (public halves), the primary first.
    keys: Vec<PublicKey>,
    peers: BTreeMap<PublicKey, FakePeer>,
    upserts: usize,
    deletes: usize,
    changes: usize,
    drops: DropCounters,
}

/// In-memory fake of [`WgBackend`]: records peers and static keys with the same semantics and
/// errors as the real backends (idempotent upserts, allowed IPs unique across peers, endpoint
/// kept when the spec has none, re-keying by `previous_public_key`, the key ring), and lets tests
/// set handshake and byte counters. Key changes take effect at once (one generation).
#[derive(Debug)]
pub struct FakeWg {
    ifname: String,
    listen_port: u16,
    state: Mutex<State>,
}

impl FakeWg {
    /// A fake device with no peers and `public_key` as its only (primary) static key.
    pub fn new(ifname: &str, public_key: PublicKey, listen_port: u16) -> Self {
        Self {
            ifname: ifname.to_owned(),
            listen_port,
            state: Mutex::new(State {
                keys: vec![public_key],
                peers: BTreeMap::new(),
                upserts: 0,
                deletes: 0,
                changes: 0,
                drops: DropCounters::default(),
            }),
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

    /// Sets the device drop counters that `device_drop_counts` reports (all 0 until then, as
    /// for a fresh boringtun device).
    pub fn set_drop_counters(&self, drops: DropCounters) {
        self.state().drops = drops;
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
        self.state().keys[0]
    }

    fn add_private_key(&self, key: PrivateKey) -> Result<PublicKey> {
        let public = key.public_key();
        let mut st = self.state();
        if !st.keys.contains(&public) {
            st.keys.insert(0, public);
        }
        Ok(public)
    }

    fn retain_private_keys(&self, keep: &[PublicKey]) -> Result<()> {
        let mut st = self.state();
        let primary = st.keys[0];
        if !keep.contains(&primary) {
            return Err(Error::PrimaryKeyDropped {
                ifname: self.ifname.clone(),
                key: primary,
            });
        }
        if let Some((peer, p)) = st.peers.iter().find(|(_, p)| !keep.contains(&p.local)) {
            return Err(Error::KeyInUse {
                ifname: self.ifname.clone(),
                key: p.local,
                peer: *peer,
            });
        }
        st.keys.retain(|k| *k == primary || keep.contains(k));
        Ok(())
    }

    fn private_keys(&self) -> Vec<PublicKey> {
        self.state().keys.clone()
    }

    fn listen_port(&self) -> u16 {
        self.listen_port
    }

    fn upsert_peer(&self, spec: &PeerSpec) -> Result<()> {
        let mut st = self.state();
        st.upserts += 1;
        let local = match spec.local_key {
            None => st.keys[0],
            Some(key) if st.keys.contains(&key) => key,
            Some(key) => {
                return Err(Error::UnknownLocalKey {
                    ifname: self.ifname.clone(),
                    peer: spec.public_key,
                    key,
                });
            }
        };
        if st
            .peers
            .get(&spec.public_key)
            .is_some_and(|p| p.spec == *spec && p.local == local)
        {
            return Ok(());
        }
        st.changes += 1;
        // A peer known by its previous key is re-keyed in place.
        if !st.peers.contains_key(&spec.public_key)
            && let Some(mut p) = spec
                .previous_public_key
                .and_then(|old| st.peers.remove(&old))
        {
            // Like boringtun, `last_handshake` is the new keys', which have no handshake yet.
            p.last_handshake = None;
            st.peers.insert(spec.public_key, p);
        }
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
                    || local != p.local
                {
                    // Like boringtun, `last_handshake` is the new key's, which has no handshake yet.
                    p.last_handshake = None;
                }
                if spec.endpoint.is_some() {
                    p.endpoint = spec.endpoint;
                }
                p.allowed_ips = allowed;
                p.spec = spec.clone();
                p.local = local;
            }
            None => {
                st.peers.insert(
                    spec.public_key,
                    FakePeer {
                        spec: spec.clone(),
                        local,
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
            public_key: st.keys[0],
            listen_port: self.listen_port,
            peers: st
                .peers
                .iter()
                .map(|(k, p)| PeerSnapshot {
                    public_key: *k,
                    local_key: p.local,
                    endpoint: p.endpoint,
                    allowed_ips: p.allowed_ips.clone(),
                    last_handshake: p.last_handshake,
                    rx_bytes: p.rx,
                    tx_bytes: p.tx,
                    has_preshared_key: p.spec.preshared_key.is_some(),
                    // The fake switches keys at once: one generation, always usable.
                    generations: 1,
                    current_has_session: true,
                })
                .collect(),
        })
    }

    /// Like boringtun's: [`DropCounters::by_reason`] of what [`FakeWg::set_drop_counters`] set.
    fn device_drop_counts(&self) -> Vec<(&'static str, u64)> {
        self.state().drops.by_reason()
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
            local_key: None,
            previous_public_key: None,
        }
    }

    #[test]
    fn device_drop_counts_report_what_was_set() {
        let wg = FakeWg::new("wg0", PublicKey([9; 32]), 51820);
        let zero = wg.device_drop_counts();
        assert_eq!(zero.len(), 8);
        assert!(zero.iter().all(|(_, n)| *n == 0));
        wg.set_drop_counters(DropCounters {
            no_route: 3,
            ..DropCounters::default()
        });
        assert_eq!(wg.device_drop_counts()[0], ("no-route", 3));
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
        assert_eq!(d.peers[0].generations, 1);
        assert!(d.peers[0].current_has_session);

        // A new preshared key: no handshake under it yet; the counters stay.
        let mut a2 = a.clone();
        a2.preshared_key = Some(PresharedKey::from_bytes([9; 32]));
        wg.upsert_peer(&a2).unwrap();
        let d = wg.dump().unwrap();
        assert_eq!(d.peers[0].last_handshake, None);
        assert_eq!(wg.change_count(), 2);
        assert_eq!(wg.peer_spec(&a.public_key), Some(a2));
    }

    #[test]
    fn key_ring_and_local_keys() {
        let k0 = PublicKey([0; 32]);
        let wg = FakeWg::new("wg0", k0, 51820);
        let new = PrivateKey::from_bytes([5; 32]);
        let k5 = wg.add_private_key(new.clone()).unwrap();
        assert_eq!(k5, new.public_key());
        assert_eq!(wg.add_private_key(new).unwrap(), k5);
        assert_eq!(wg.private_keys(), vec![k5, k0]);
        assert_eq!(wg.public_key(), k5);

        // None is the primary; an unknown local key is refused, naming it.
        let mut a = spec(1, &["10.0.1.0/24"]);
        wg.upsert_peer(&a).unwrap();
        assert_eq!(wg.dump().unwrap().peers[0].local_key, k5);
        a.local_key = Some(PublicKey([7; 32]));
        let e = wg.upsert_peer(&a).unwrap_err();
        assert!(
            matches!(e, Error::UnknownLocalKey { key, .. } if key == PublicKey([7; 32])),
            "{e}"
        );
        a.local_key = Some(k0);
        wg.upsert_peer(&a).unwrap();
        let d = wg.dump().unwrap();
        assert_eq!((d.public_key, d.peers[0].local_key), (k5, k0));

        // The primary and keys in use stay.
        let e = wg.retain_private_keys(&[k0]).unwrap_err();
        assert!(
            matches!(e, Error::PrimaryKeyDropped { key, .. } if key == k5),
            "{e}"
        );
        let e = wg.retain_private_keys(&[k5]).unwrap_err();
        assert!(
            matches!(e, Error::KeyInUse { key, peer, .. } if key == k0 && peer == a.public_key),
            "{e}"
        );
        a.local_key = Some(k5);
        wg.upsert_peer(&a).unwrap();
        wg.retain_private_keys(&[k5]).unwrap();
        assert_eq!(wg.private_keys(), vec![k5]);
    }

    #[test]
    fn previous_public_key_re_keys_in_place() {
        let wg = FakeWg::new("wg0", PublicKey([0; 32]), 51820);
        let a = spec(1, &["10.0.1.0/24"]);
        wg.upsert_peer(&a).unwrap();
        wg.set_stats(&a.public_key, Some(Duration::from_secs(3)), 10, 20);
        let mut rekeyed = spec(2, &["10.0.1.0/24"]);
        rekeyed.endpoint = None;
        rekeyed.previous_public_key = Some(a.public_key);
        wg.upsert_peer(&rekeyed).unwrap();
        wg.upsert_peer(&rekeyed).unwrap();
        let d = wg.dump().unwrap();
        assert_eq!(d.peers.len(), 1, "{d:?}");
        let p = &d.peers[0];
        assert_eq!(p.public_key, rekeyed.public_key);
        // Counters and endpoint carry over; the new keys have no handshake yet.
        assert_eq!((p.rx_bytes, p.tx_bytes, p.last_handshake), (10, 20, None));
        assert_eq!(p.endpoint, a.endpoint);
        assert_eq!(wg.change_count(), 2);

        // An unknown previous key: a plain add.
        let mut c = spec(3, &["10.0.3.0/24"]);
        c.previous_public_key = Some(PublicKey([9; 32]));
        wg.upsert_peer(&c).unwrap();
        assert_eq!(wg.dump().unwrap().peers.len(), 2);
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
