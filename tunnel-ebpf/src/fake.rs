//! In-memory [`Datapath`] for tests of the agent.

use crate::{
    AttachMode, Datapath, DatapathConfig, Hook, PeerCounters, PeerId, PeerState, PrefixLenSet,
    Result, validate_cidr, validate_ifname, validate_peer,
};
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// An in-memory [`Datapath`] with the same validation as [`crate::AyaDatapath`] (including
/// the limit of [`crate::common::MAX_PREFIX_LENS`] distinct prefix lengths per family). Tests can
/// set counters with [`FakeDatapath::set_counters`] and read the config back.
#[derive(Debug)]
pub struct FakeDatapath {
    mode: AttachMode,
    state: Mutex<FakeState>,
}

#[derive(Debug, Default)]
struct FakeState {
    config: Option<DatapathConfig>,
    cidrs: BTreeMap<IpNet, PeerId>,
    lens: PrefixLenSet,
    peers: BTreeMap<PeerId, PeerState>,
    counters: BTreeMap<PeerId, PeerCounters>,
    attached: BTreeSet<(String, Hook)>,
}

impl Default for FakeDatapath {
    fn default() -> Self {
        Self::new(AttachMode::Tcx)
    }
}

impl FakeDatapath {
    /// An empty fake that reports `mode`.
    pub fn new(mode: AttachMode) -> Self {
        Self {
            mode,
            state: Mutex::new(FakeState::default()),
        }
    }

    fn state(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the counters of `peer`, as if the programs had counted them.
    pub fn set_counters(&self, peer: PeerId, counters: PeerCounters) {
        self.state().counters.insert(peer, counters);
    }

    /// The last configuration set (overlay included), if any.
    pub fn config(&self) -> Option<DatapathConfig> {
        self.state().config
    }
}

impl Datapath for FakeDatapath {
    fn attach_mode(&self) -> AttachMode {
        self.mode
    }

    fn set_config(&self, cfg: DatapathConfig) -> Result<()> {
        self.state().config = Some(cfg);
        Ok(())
    }

    fn upsert_cidr(&self, cidr: IpNet, peer: PeerId) -> Result<()> {
        validate_cidr(cidr)?;
        validate_peer(peer)?;
        let mut s = self.state();
        s.lens.check_new(cidr)?;
        if s.cidrs.insert(cidr, peer).is_none() {
            s.lens.add(cidr);
        }
        Ok(())
    }

    fn delete_cidr(&self, cidr: IpNet) -> Result<()> {
        validate_cidr(cidr)?;
        let mut s = self.state();
        if s.cidrs.remove(&cidr).is_some() {
            s.lens.remove(cidr);
        }
        Ok(())
    }

    fn dump_cidrs(&self) -> Result<Vec<(IpNet, PeerId)>> {
        Ok(self.state().cidrs.iter().map(|(c, p)| (*c, *p)).collect())
    }

    fn upsert_peer(&self, peer: PeerId, state: PeerState) -> Result<()> {
        validate_peer(peer)?;
        self.state().peers.insert(peer, state);
        Ok(())
    }

    fn delete_peer(&self, peer: PeerId) -> Result<()> {
        validate_peer(peer)?;
        let mut s = self.state();
        s.peers.remove(&peer);
        s.counters.remove(&peer);
        Ok(())
    }

    fn dump_peers(&self) -> Result<Vec<(PeerId, PeerState)>> {
        Ok(self.state().peers.iter().map(|(p, s)| (*p, *s)).collect())
    }

    fn counters(&self) -> Result<BTreeMap<PeerId, PeerCounters>> {
        Ok(self.state().counters.clone())
    }

    fn attach_pod(&self, ifname: &str) -> Result<()> {
        validate_ifname(ifname)?;
        let mut s = self.state();
        for hook in [Hook::PodIngress, Hook::PodEgress] {
            s.attached.insert((ifname.to_owned(), hook));
        }
        Ok(())
    }

    fn detach_pod(&self, ifname: &str) -> Result<()> {
        validate_ifname(ifname)?;
        let mut s = self.state();
        for hook in [Hook::PodIngress, Hook::PodEgress] {
            s.attached.remove(&(ifname.to_owned(), hook));
        }
        Ok(())
    }

    fn attach_underlay(&self, ifname: &str) -> Result<()> {
        validate_ifname(ifname)?;
        let mut s = self.state();
        for hook in [Hook::UnderlayIngress, Hook::UnderlayEgress] {
            s.attached.insert((ifname.to_owned(), hook));
        }
        Ok(())
    }

    fn attached(&self) -> Result<Vec<(String, Hook)>> {
        Ok(self.state().attached.iter().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Backend, DropReason, Error, Overlay, OverlayKind};

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    const AUTH: PeerState = PeerState {
        authenticated: true,
        has_key: true,
        epoch: 1,
        backend: Backend::Wireguard,
    };

    #[test]
    fn cidrs_upsert_delete_dump_idempotent() {
        let dp = FakeDatapath::default();
        dp.upsert_cidr(net("10.244.2.0/24"), 2).unwrap();
        dp.upsert_cidr(net("10.244.2.0/24"), 2).unwrap();
        dp.upsert_cidr(net("fd00:2::/64"), 2).unwrap();
        dp.upsert_cidr(net("10.244.2.0/24"), 3).unwrap();
        assert_eq!(
            dp.dump_cidrs().unwrap(),
            vec![(net("10.244.2.0/24"), 3), (net("fd00:2::/64"), 2)]
        );
        dp.delete_cidr(net("10.244.2.0/24")).unwrap();
        dp.delete_cidr(net("10.244.2.0/24")).unwrap();
        assert_eq!(dp.dump_cidrs().unwrap(), vec![(net("fd00:2::/64"), 2)]);
    }

    #[test]
    fn prefix_length_limit_per_family() {
        let dp = FakeDatapath::default();
        let max = crate::common::MAX_PREFIX_LENS;
        // /8 .. /8+max-1: exactly the limit.
        for len in 8..8 + max as u8 {
            dp.upsert_cidr(IpNet::new("10.0.0.0".parse().unwrap(), len).unwrap(), 2)
                .unwrap();
        }
        // More CIDRs of a length in use are fine, and so are other families' lengths.
        dp.upsert_cidr(net("11.0.0.0/8"), 3).unwrap();
        dp.upsert_cidr(net("fd00::/100"), 3).unwrap();
        let err = dp.upsert_cidr(net("10.1.2.0/30"), 4).unwrap_err();
        assert!(matches!(err, Error::TooManyPrefixLengths { limit, .. } if limit == max));
        assert!(err.is_invalid_input());
        let msg = err.to_string();
        assert!(msg.contains("10.1.2.0/30"), "{msg}");
        assert!(msg.contains(&format!("at most {max}")), "{msg}");
        assert!(msg.contains("IPv4"), "{msg}");
        assert!(!dp.dump_cidrs().unwrap().contains(&(net("10.1.2.0/30"), 4)));
        // Dropping the last CIDR of a length frees a slot; one of two does not.
        dp.delete_cidr(net("10.0.0.0/8")).unwrap();
        assert!(dp.upsert_cidr(net("10.1.2.0/30"), 4).is_err());
        dp.delete_cidr(net("11.0.0.0/8")).unwrap();
        dp.delete_cidr(net("11.0.0.0/8")).unwrap();
        dp.upsert_cidr(net("10.1.2.0/30"), 4).unwrap();
    }

    #[test]
    fn validation_names_the_value() {
        let dp = FakeDatapath::default();
        let err = dp.upsert_cidr(net("10.244.2.1/24"), 2).unwrap_err();
        assert!(matches!(err, Error::InvalidCidr { .. }));
        assert!(err.to_string().contains("10.244.2.1/24"), "{err}");
        let err = dp.upsert_cidr(net("10.244.2.0/24"), 0).unwrap_err();
        assert!(matches!(err, Error::InvalidPeerId { peer: 0 }));
        assert!(err.is_invalid_input());
        let err = dp.upsert_peer(0, AUTH).unwrap_err();
        assert!(err.to_string().contains("peer id 0"), "{err}");
        let err = dp.attach_pod("bad/name").unwrap_err();
        assert!(err.to_string().contains("bad/name"), "{err}");
        assert!(dp.dump_cidrs().unwrap().is_empty());
        assert!(dp.dump_peers().unwrap().is_empty());
    }

    #[test]
    fn delete_peer_clears_counters() {
        let dp = FakeDatapath::default();
        dp.upsert_peer(2, AUTH).unwrap();
        dp.upsert_peer(3, AUTH).unwrap();
        let mut c = PeerCounters {
            steered_packets: 5,
            ..Default::default()
        };
        c.drops.insert(DropReason::PeerNoKey, 1);
        dp.set_counters(2, c.clone());
        dp.set_counters(3, c.clone());
        dp.delete_peer(2).unwrap();
        dp.delete_peer(2).unwrap();
        assert_eq!(dp.dump_peers().unwrap(), vec![(3, AUTH)]);
        assert_eq!(dp.counters().unwrap(), BTreeMap::from([(3, c)]));
    }

    #[test]
    fn attach_detach_idempotent() {
        let dp = FakeDatapath::new(AttachMode::Clsact);
        assert_eq!(dp.attach_mode(), AttachMode::Clsact);
        dp.attach_pod("veth1").unwrap();
        dp.attach_pod("veth1").unwrap();
        dp.attach_underlay("eth0").unwrap();
        assert_eq!(
            dp.attached().unwrap(),
            vec![
                ("eth0".to_owned(), Hook::UnderlayIngress),
                ("eth0".to_owned(), Hook::UnderlayEgress),
                ("veth1".to_owned(), Hook::PodIngress),
                ("veth1".to_owned(), Hook::PodEgress),
            ]
        );
        dp.detach_pod("veth1").unwrap();
        dp.detach_pod("veth1").unwrap();
        assert_eq!(dp.attached().unwrap().len(), 2);
    }

    #[test]
    fn config_is_recorded() {
        let dp = FakeDatapath::default();
        assert_eq!(dp.config(), None);
        let cfg = DatapathConfig {
            strict: false,
            decrypt_ifindex: 7,
            overlay: None,
        };
        dp.set_config(cfg).unwrap();
        assert_eq!(dp.config(), Some(cfg));
        let vxlan = DatapathConfig {
            overlay: Some(Overlay {
                kind: OverlayKind::Vxlan,
                port: 8472,
            }),
            ..cfg
        };
        dp.set_config(vxlan).unwrap();
        assert_eq!(dp.config(), Some(vxlan));
        assert_eq!(
            dp.config().and_then(|c| c.overlay).map(|o| o.kind),
            Some(OverlayKind::Vxlan)
        );
    }
}
