//! [`IpsecBackend`] on the kernel's XFRM: an [`IpsecPeerSpec`] becomes SAs and policies.
//!
//! Per peer (ids and marks after DESIGN §2; `P` = peer id, `e` = epoch modulo 16):
//!
//! | object | selector / addresses | mark | other |
//! |---|---|---|---|
//! | outbound SA | local -> remote, `outbound.spi` | `P e E 00` / `ffffff00` | ESN, no replay window |
//! | inbound SA (each of `inbound`) | remote -> local, its SPI | none | ESN, window [`REPLAY_WINDOW`], output mark `P 0 D 00` / `ffff0f00` |
//! | `out` policy (each local x remote CIDR) | local CIDR -> remote CIDR | `P e E 00` / `ffffff00` | tmpl local -> remote |
//! | `in` and `fwd` policies (each remote x local CIDR) | remote CIDR -> local CIDR | `P 0 D 00` / `ffff0f00` | tmpl remote -> local |
//!
//! All of one peer share the reqid [`peer_reqid`]. Per node, [`KernelIpsec::new`] installs a
//! catch-all `out` **block** policy per address family (any -> any, mark `E00` / `f00`,
//! priority [`PRIORITY_BLOCK`], numerically above every peer policy): traffic marked for
//! encryption that no peer policy takes — a peer without keys, an epoch whose states are
//! being replaced — is dropped instead of leaving in plaintext.
//!
//! The inbound output mark carries the peer id as well as the `D` magic, so that the `in` and
//! `fwd` policies (which the kernel requires for decapsulated tunnel-mode traffic, and looks
//! up with the mark set by the SA) can be told apart per peer; the pod-side eBPF program
//! recognises decrypted packets by `mark & 0xf00 == 0xd00`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use super::{
    IN_MARK_MASK, MAGIC_DECRYPTED, MAGIC_ENCRYPT, MAGIC_MASK, MAGIC_SHIFT, OUT_MARK_MASK,
    PRIORITY_BLOCK, PRIORITY_PEER, PolicyAction, PolicyDir, PolicySpec, SaSnapshot, SaSpec, Tmpl,
    XfrmBackend, decrypted_mark, encrypt_mark, peer_of_mark, peer_reqid,
};
use crate::{
    EspDrop, InboundSaSnapshot, IpsecBackend, IpsecKind, IpsecPeerSnapshot, IpsecPeerSpec, Result,
};

/// Anti-replay window of inbound SAs, in packets.
pub const REPLAY_WINDOW: u32 = 2048;

/// The kernel objects of one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerObjects {
    /// Outbound SA first, then the inbound SAs in the spec's order.
    pub sas: Vec<SaSpec>,
    /// `out` policies, then `in` and `fwd` pairs.
    pub policies: Vec<PolicySpec>,
}

fn invalid(field: &'static str, value: String, reason: &str) -> crate::Error {
    crate::Error::Invalid {
        field,
        value,
        reason: reason.to_owned(),
    }
}

/// Translates a peer spec into its SAs and policies (see the module docs).
pub fn peer_objects(spec: &IpsecPeerSpec) -> Result<PeerObjects> {
    if spec.local.is_ipv4() != spec.remote.is_ipv4() {
        return Err(invalid(
            "peer.local/remote",
            format!("{} -> {}", spec.local, spec.remote),
            "underlay addresses must be of one address family",
        ));
    }
    let reqid = peer_reqid(spec.peer_id);
    let out_mark = (encrypt_mark(spec.peer_id, spec.epoch), OUT_MARK_MASK);
    let in_mark = (decrypted_mark(spec.peer_id), IN_MARK_MASK);

    let mut sas = vec![SaSpec {
        src: spec.local,
        dst: spec.remote,
        spi: spec.outbound.spi,
        reqid,
        keys: spec.outbound.clone(),
        mark: Some(out_mark),
        output_mark: None,
        replay_window: 0,
        esn: true,
    }];
    for (i, keys) in spec.inbound.iter().enumerate() {
        if spec.inbound[..i].iter().any(|k| k.spi == keys.spi) {
            return Err(invalid(
                "peer.inbound.spi",
                format!("{:#010x}", keys.spi),
                "listed twice",
            ));
        }
        sas.push(SaSpec {
            src: spec.remote,
            dst: spec.local,
            spi: keys.spi,
            reqid,
            keys: keys.clone(),
            mark: None,
            output_mark: Some(in_mark),
            replay_window: REPLAY_WINDOW,
            esn: true,
        });
    }
    for sa in &sas {
        sa.validate()?;
    }

    let pairs = |from: &[IpNet], to: &[IpNet]| {
        let mut pairs = Vec::new();
        for a in from {
            for b in to {
                let pair = (a.trunc(), b.trunc());
                if a.addr().is_ipv4() == b.addr().is_ipv4() && !pairs.contains(&pair) {
                    pairs.push(pair);
                }
            }
        }
        pairs
    };
    let mut policies = Vec::new();
    for (src, dst) in pairs(&spec.local_cidrs, &spec.remote_cidrs) {
        policies.push(PolicySpec {
            dir: PolicyDir::Out,
            src,
            dst,
            mark: out_mark,
            priority: PRIORITY_PEER,
            action: PolicyAction::Allow,
            tmpl: Some(Tmpl {
                src: spec.local,
                dst: spec.remote,
                reqid,
            }),
        });
    }
    for (src, dst) in pairs(&spec.remote_cidrs, &spec.local_cidrs) {
        for dir in [PolicyDir::In, PolicyDir::Fwd] {
            policies.push(PolicySpec {
                dir,
                src,
                dst,
                mark: in_mark,
                priority: PRIORITY_PEER,
                action: PolicyAction::Allow,
                tmpl: Some(Tmpl {
                    src: spec.remote,
                    dst: spec.local,
                    reqid,
                }),
            });
        }
    }
    for p in &policies {
        p.validate()?;
    }
    Ok(PeerObjects { sas, policies })
}

/// The catch-all `out` block policies, IPv4 and IPv6.
pub fn block_policies() -> Vec<PolicySpec> {
    [
        IpNet::from(IpAddr::from([0u8; 4])),
        IpNet::from(IpAddr::from([0u8; 16])),
    ]
    .into_iter()
    .map(|host| {
        let any = IpNet::new(host.addr(), 0).unwrap_or(host);
        PolicySpec {
            dir: PolicyDir::Out,
            src: any,
            dst: any,
            mark: (MAGIC_ENCRYPT << MAGIC_SHIFT, MAGIC_MASK),
            priority: PRIORITY_BLOCK,
            action: PolicyAction::Block,
            tmpl: None,
        }
    })
    .collect()
}

/// Whether the kernel's SA is the desired one, as far as a dump shows (keys are not compared:
/// a new key always comes with a new SPI).
fn sa_matches(current: &SaSnapshot, desired: &SaSpec) -> bool {
    current.id.src == desired.src
        && current.reqid == desired.reqid
        && current.mark.unwrap_or((0, 0)) == desired.mark.unwrap_or((0, 0))
        && current.output_mark == desired.output_mark
        && current.esn == desired.esn
        && current.replay_window == desired.replay_window
}

/// [`IpsecBackend`] on the kernel's XFRM, through any [`XfrmBackend`].
pub struct KernelIpsec {
    backend: Arc<dyn XfrmBackend>,
}

impl std::fmt::Debug for KernelIpsec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelIpsec").finish_non_exhaustive()
    }
}

impl KernelIpsec {
    /// Installs the catch-all block policies (idempotently: a restart adopts them).
    pub fn new(backend: Arc<dyn XfrmBackend>) -> Result<Self> {
        for p in block_policies() {
            backend.upsert_policy(&p)?;
        }
        Ok(Self { backend })
    }

    /// Wraps a backend without installing anything (for [`KernelIpsec::remove_all`] at
    /// uninstall time).
    pub fn adopt(backend: Arc<dyn XfrmBackend>) -> Self {
        Self { backend }
    }

    /// The XFRM backend.
    pub fn backend(&self) -> &Arc<dyn XfrmBackend> {
        &self.backend
    }

    /// Removes every enc SA and policy, the block policies included (agent teardown). Foreign
    /// objects stay.
    pub fn remove_all(&self) -> Result<()> {
        for p in self.backend.dump_policies()? {
            self.backend.delete_policy(&p)?;
        }
        for sa in self.backend.dump_sas()? {
            self.backend.delete_sa(&sa.id)?;
        }
        Ok(())
    }

    fn peer_sas(&self, peer_id: u16) -> Result<Vec<SaSnapshot>> {
        Ok(self
            .backend
            .dump_sas()?
            .into_iter()
            .filter(|sa| sa.peer() == Some(peer_id))
            .collect())
    }

    fn peer_policies(&self, peer_id: u16) -> Result<Vec<PolicySpec>> {
        Ok(self
            .backend
            .dump_policies()?
            .into_iter()
            .filter(|p| peer_of_mark(p.mark) == Some(peer_id))
            .collect())
    }
}

impl IpsecBackend for KernelIpsec {
    fn kind(&self) -> IpsecKind {
        IpsecKind::Kernel
    }

    fn ifname(&self) -> Option<&str> {
        None
    }

    /// New SAs first, then policies, then what is stale: policies before SAs, so a policy
    /// never points at a missing SA longer than necessary. Unchanged objects are not touched,
    /// so sequence numbers and replay windows survive.
    fn upsert_peer(&self, spec: &IpsecPeerSpec) -> Result<()> {
        let desired = peer_objects(spec)?;
        let current_sas = self.peer_sas(spec.peer_id)?;
        let current_policies = self.peer_policies(spec.peer_id)?;
        for sa in &desired.sas {
            match current_sas
                .iter()
                .find(|c| c.id.dst == sa.dst && c.id.spi == sa.spi)
            {
                Some(current) if sa_matches(current, sa) => {}
                Some(current) => {
                    tracing::info!(peer = spec.peer_id, sa = %current.id, "replacing SA whose attributes changed");
                    self.backend.delete_sa(&current.id)?;
                    self.backend.upsert_sa(sa)?;
                }
                None => self.backend.upsert_sa(sa)?,
            }
        }
        for p in &desired.policies {
            if !current_policies.contains(p) {
                self.backend.upsert_policy(p)?;
            }
        }
        for p in &current_policies {
            if !desired.policies.iter().any(|d| d.same_key(p)) {
                self.backend.delete_policy(p)?;
            }
        }
        for current in &current_sas {
            if !desired
                .sas
                .iter()
                .any(|d| d.dst == current.id.dst && d.spi == current.id.spi)
            {
                self.backend.delete_sa(&current.id)?;
            }
        }
        Ok(())
    }

    fn delete_peer(&self, peer_id: u16) -> Result<()> {
        for p in self.peer_policies(peer_id)? {
            self.backend.delete_policy(&p)?;
        }
        for sa in self.peer_sas(peer_id)? {
            self.backend.delete_sa(&sa.id)?;
        }
        Ok(())
    }

    fn peers(&self) -> Result<Vec<IpsecPeerSnapshot>> {
        let mut peers: BTreeMap<u16, IpsecPeerSnapshot> = BTreeMap::new();
        for sa in self.backend.dump_sas()? {
            let Some(peer_id) = sa.peer() else { continue };
            let peer = peers.entry(peer_id).or_insert_with(|| IpsecPeerSnapshot {
                peer_id,
                out_spi: 0,
                out_seq: 0,
                tx_packets: 0,
                tx_bytes: 0,
                inbound: Vec::new(),
                drops: vec![(EspDrop::Replay, 0), (EspDrop::IcvFailure, 0)],
            });
            let magic =
                |mark: Option<(u32, u32)>| mark.map(|(v, _)| (v & MAGIC_MASK) >> MAGIC_SHIFT);
            if magic(sa.mark) == Some(MAGIC_ENCRYPT) {
                // During a switch two outbound SAs may exist; report the busier one.
                if peer.out_spi == 0 || sa.oseq >= peer.out_seq {
                    peer.out_spi = sa.id.spi;
                    peer.out_seq = sa.oseq;
                    peer.tx_packets = sa.packets;
                    peer.tx_bytes = sa.bytes;
                }
            } else if magic(sa.output_mark) == Some(MAGIC_DECRYPTED) {
                peer.inbound.push(InboundSaSnapshot {
                    spi: sa.id.spi,
                    highest_seq: sa.seq,
                    packets: sa.packets,
                    bytes: sa.bytes,
                });
                for (reason, count) in &mut peer.drops {
                    *count += u64::from(match reason {
                        EspDrop::Replay => sa.replay_drops,
                        _ => sa.integrity_failed,
                    });
                }
            }
        }
        Ok(peers.into_values().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SaKeys;
    use crate::xfrm::FakeXfrm;

    fn keys(spi: u32) -> SaKeys {
        SaKeys {
            spi,
            key: [spi as u8; 32],
            salt: [1, 2, 3, 4],
        }
    }

    fn spec(peer_id: u16, epoch: u8) -> IpsecPeerSpec {
        IpsecPeerSpec {
            peer_id,
            name: format!("node-{peer_id}"),
            local: "192.168.0.1".parse().unwrap(),
            remote: format!("192.168.0.{}", 10 + peer_id).parse().unwrap(),
            local_cidrs: vec![
                "10.1.0.0/24".parse().unwrap(),
                "fd00:1::/64".parse().unwrap(),
            ],
            remote_cidrs: vec![
                format!("10.{}.0.0/24", 100 + peer_id).parse().unwrap(),
                format!("fd00:{peer_id:x}::/64").parse().unwrap(),
            ],
            epoch,
            outbound: keys(0x1000 + u32::from(peer_id)),
            inbound: vec![keys(0x2000 + u32::from(peer_id))],
        }
    }

    fn kernel() -> (Arc<FakeXfrm>, KernelIpsec) {
        let fake = Arc::new(FakeXfrm::new());
        let kernel = KernelIpsec::new(fake.clone()).unwrap();
        (fake, kernel)
    }

    #[test]
    fn translation_is_exact() {
        let objects = peer_objects(&spec(5, 0x13)).unwrap();
        let local: IpAddr = "192.168.0.1".parse().unwrap();
        let remote: IpAddr = "192.168.0.15".parse().unwrap();
        assert_eq!(objects.sas.len(), 2);
        let out = &objects.sas[0];
        assert_eq!((out.src, out.dst, out.spi), (local, remote, 0x1005));
        assert_eq!(out.mark, Some((0x0005_3E00, 0xFFFF_FF00)));
        assert_eq!(
            (out.output_mark, out.replay_window, out.esn),
            (None, 0, true)
        );
        let inb = &objects.sas[1];
        assert_eq!((inb.src, inb.dst, inb.spi), (remote, local, 0x2005));
        assert_eq!(inb.mark, None);
        assert_eq!(inb.output_mark, Some((0x0005_0D00, 0xFFFF_0F00)));
        assert_eq!((inb.replay_window, inb.esn), (2048, true));
        assert_eq!(out.reqid, inb.reqid);

        let tmpl_out = Some(Tmpl {
            src: local,
            dst: remote,
            reqid: out.reqid,
        });
        let tmpl_in = Some(Tmpl {
            src: remote,
            dst: local,
            reqid: out.reqid,
        });
        let p = |dir, src: &str, dst: &str, mark, tmpl| PolicySpec {
            dir,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            mark,
            priority: PRIORITY_PEER,
            action: PolicyAction::Allow,
            tmpl,
        };
        let om = (0x0005_3E00, 0xFFFF_FF00);
        let im = (0x0005_0D00, 0xFFFF_0F00);
        assert_eq!(
            objects.policies,
            vec![
                p(PolicyDir::Out, "10.1.0.0/24", "10.105.0.0/24", om, tmpl_out),
                p(PolicyDir::Out, "fd00:1::/64", "fd00:5::/64", om, tmpl_out),
                p(PolicyDir::In, "10.105.0.0/24", "10.1.0.0/24", im, tmpl_in),
                p(PolicyDir::Fwd, "10.105.0.0/24", "10.1.0.0/24", im, tmpl_in),
                p(PolicyDir::In, "fd00:5::/64", "fd00:1::/64", im, tmpl_in),
                p(PolicyDir::Fwd, "fd00:5::/64", "fd00:1::/64", im, tmpl_in),
            ]
        );
    }

    #[test]
    fn bad_specs_are_refused() {
        let mut s = spec(1, 0);
        s.remote = "fd00::2".parse().unwrap();
        assert!(matches!(
            peer_objects(&s),
            Err(crate::Error::Invalid { .. })
        ));
        let mut s = spec(1, 0);
        s.inbound.push(keys(0x2001));
        assert!(matches!(
            peer_objects(&s),
            Err(crate::Error::Invalid {
                field: "peer.inbound.spi",
                ..
            })
        ));
        let mut s = spec(1, 0);
        s.outbound.spi = 0;
        assert!(peer_objects(&s).is_err());
    }

    #[test]
    fn new_installs_the_block_policies_lowest_precedence() {
        let (fake, _kernel) = kernel();
        let policies = fake.dump_policies().unwrap();
        assert_eq!(policies, block_policies());
        for p in &policies {
            assert_eq!(
                (p.mark, p.action, p.dir),
                ((0xE00, 0xF00), PolicyAction::Block, PolicyDir::Out)
            );
            assert!(p.priority > PRIORITY_PEER);
            assert_eq!(p.src.prefix_len(), 0);
        }
        // A restart adopts them.
        let again = KernelIpsec::new(fake.clone()).unwrap();
        drop(again);
        assert_eq!(fake.dump_policies().unwrap().len(), 2);
    }

    #[test]
    fn upsert_is_idempotent_and_exact() {
        let (fake, kernel) = kernel();
        kernel.upsert_peer(&spec(1, 0)).unwrap();
        let objects = peer_objects(&spec(1, 0)).unwrap();
        let mut sas = fake.all_sas();
        sas.sort_by_key(|s| s.spi);
        assert_eq!(sas, objects.sas);
        let mut expected = block_policies();
        expected.extend(objects.policies.clone());
        assert_eq!(fake.all_policies(), expected);

        let changes = fake.changes();
        kernel.upsert_peer(&spec(1, 0)).unwrap();
        assert_eq!(fake.changes(), changes, "second upsert changes nothing");
    }

    #[test]
    fn rotation_replaces_outbound_and_drops_stale_objects() {
        let (fake, kernel) = kernel();
        kernel.upsert_peer(&spec(1, 0)).unwrap();
        // Prepare: inbound for epoch 1 next to epoch 0.
        let mut prepare = spec(1, 0);
        prepare.inbound.push(keys(0x3001));
        kernel.upsert_peer(&prepare).unwrap();
        assert_eq!(fake.all_sas().len(), 3);
        // Switch: outbound epoch 1, old inbound retired.
        let mut switched = spec(1, 1);
        switched.outbound = keys(0x4001);
        switched.inbound = vec![keys(0x3001)];
        kernel.upsert_peer(&switched).unwrap();
        let mut spis: Vec<u32> = fake.all_sas().iter().map(|s| s.spi).collect();
        spis.sort_unstable();
        assert_eq!(spis, vec![0x3001, 0x4001]);
        let objects = peer_objects(&switched).unwrap();
        let peer_policies: Vec<_> = fake
            .dump_policies()
            .unwrap()
            .into_iter()
            .filter(|p| peer_of_mark(p.mark) == Some(1))
            .collect();
        assert_eq!(peer_policies.len(), objects.policies.len());
        assert!(objects.policies.iter().all(|p| peer_policies.contains(p)));
    }

    #[test]
    fn delete_peer_leaves_other_peers_and_foreign_objects() {
        let (fake, kernel) = kernel();
        kernel.upsert_peer(&spec(1, 0)).unwrap();
        kernel.upsert_peer(&spec(2, 3)).unwrap();
        let foreign_policy = PolicySpec {
            dir: PolicyDir::Out,
            src: "10.1.0.0/24".parse().unwrap(),
            dst: "10.101.0.0/24".parse().unwrap(),
            mark: (0, 0),
            priority: 100,
            action: PolicyAction::Allow,
            tmpl: None,
        };
        fake.insert_foreign_policy(foreign_policy.clone());
        let mut foreign_sa = peer_objects(&spec(1, 0)).unwrap().sas[1].clone();
        foreign_sa.output_mark = None;
        foreign_sa.spi = 0x9999;
        foreign_sa.keys.spi = 0x9999;
        fake.insert_foreign_sa(foreign_sa.clone());

        kernel.delete_peer(1).unwrap();
        let two = peer_objects(&spec(2, 3)).unwrap();
        let mut expected_sas = two.sas.clone();
        expected_sas.push(foreign_sa);
        assert_eq!(fake.all_sas(), expected_sas);
        let mut expected_policies = block_policies();
        expected_policies.extend(two.policies);
        expected_policies.push(foreign_policy.clone());
        assert_eq!(fake.all_policies(), expected_policies);
        assert!(!fake.dump_policies().unwrap().contains(&foreign_policy));
        kernel.delete_peer(1).unwrap();

        kernel.remove_all().unwrap();
        assert_eq!(fake.all_policies(), vec![foreign_policy]);
        assert_eq!(fake.all_sas().len(), 1);
    }

    #[test]
    fn peers_reports_per_peer_state() {
        let (_fake, kernel) = kernel();
        let mut two = spec(2, 0);
        two.inbound.push(keys(0x3002));
        kernel.upsert_peer(&spec(1, 0)).unwrap();
        kernel.upsert_peer(&two).unwrap();
        let peers = kernel.peers().unwrap();
        assert_eq!(
            peers.iter().map(|p| p.peer_id).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(peers[1].out_spi, 0x1002);
        assert_eq!(
            peers[1].inbound.iter().map(|i| i.spi).collect::<Vec<_>>(),
            vec![0x2002, 0x3002]
        );
        assert_eq!(kernel.kind(), IpsecKind::Kernel);
        assert_eq!(kernel.ifname(), None);
    }

    #[test]
    fn changed_attributes_replace_the_sa() {
        let (fake, kernel) = kernel();
        kernel.upsert_peer(&spec(1, 0)).unwrap();
        let mut moved = spec(1, 0);
        moved.local = "192.168.0.2".parse().unwrap();
        kernel.upsert_peer(&moved).unwrap();
        let sas = fake.all_sas();
        assert_eq!(sas.len(), 2);
        assert!(
            sas.iter()
                .all(|s| s.src == moved.local || s.dst == moved.local)
        );
    }
}
