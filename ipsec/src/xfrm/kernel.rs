//! [`IpsecBackend`] on the kernel's XFRM: an [`IpsecPeerSpec`] becomes SAs and policies.
//!
//! Per peer (ids and marks after DESIGN §2; `P` = peer id, `e` = an outbound epoch modulo 16):
//!
//! | object | selector / addresses | mark | other |
//! |---|---|---|---|
//! | outbound SA (`outbound` at `epoch`, and each of `older_outbound` at its epoch) | local -> remote, its SPI | `P e E 00` / `ffffff00` | ESN, no replay window |
//! | inbound SA (each of `inbound`) | remote -> local, its SPI | none | ESN, window [`REPLAY_WINDOW`], output mark `P 0 D 00` / `ffff0f00` |
//! | `out` policy (each local x remote CIDR, per outbound epoch) | local CIDR -> remote CIDR | `P e E 00` / `ffffff00` | tmpl local -> remote |
//! | `in` and `fwd` policies (each remote x local CIDR) | remote CIDR -> local CIDR | `P 0 D 00` / `ffff0f00` | tmpl remote -> local |
//!
//! All of one peer share the reqid [`peer_reqid`]; the kernel picks the outbound SA for an
//! `out` policy by reqid *and* the policy's mark, so each outbound epoch needs its own SA and
//! its own `out` policies. Per node, [`KernelIpsec::new`] installs a
//! catch-all `out` **block** policy per address family (any -> any, mark `E00` / `f00`,
//! priority [`PRIORITY_BLOCK`], numerically above every peer policy): traffic marked for
//! encryption that no peer policy takes — a peer without keys, an epoch whose states are
//! being replaced — is dropped instead of leaving in plaintext.
//!
//! The inbound output mark carries the peer id as well as the `D` magic, so that the `in` and
//! `fwd` policies (which the kernel requires for decapsulated tunnel-mode traffic, and looks
//! up with the mark set by the SA) can be told apart per peer; the pod-side eBPF program
//! recognises decrypted packets by `mark & 0xf00 == 0xd00`.
//!
//! # Key rotation
//!
//! The agent rotates from epoch `e` to `e+1` in steps, each a new spec; [`KernelIpsec`] turns
//! each into additions only, or removals only, and never touches an SA that stays (its
//! sequence number and replay window survive):
//!
//! | step | spec | kernel changes |
//! |---|---|---|
//! | prepare | `inbound` gains `in(e+1)` | inbound SA `in(e+1)` added |
//! | commit | `epoch` `e+1`, `outbound` `out(e+1)`, `older_outbound` `[(e, out(e))]` | outbound SA `out(e+1)`, then its `out` policies, added |
//! | retire | `inbound` `[in(e+1)]`, `older_outbound` `[]` | `out` policies of `e`, then SAs `out(e)` and `in(e)`, removed |
//!
//! The datapath switches the epoch bits of its mark only after the commit: until then, and
//! for packets it marked before, the objects of `e` carry the traffic.
//!
//! # ESP in UDP
//!
//! [`KernelIpsec::with_encapsulation`] with [`Encapsulation::Udp`] gives every SA, inbound and
//! outbound, `XFRMA_ENCAP` ([`UdpEncap::esp_in_udp`]), and opens the `UDP_ENCAP_ESPINUDP`
//! socket on the underlay address and the port *before* it installs anything; it holds the
//! socket as long as it lives. Without that socket the kernel would send ESP in UDP but drop
//! what arrives (port unreachable). A taken port fails start-up with [`crate::Error::PortInUse`],
//! and a failure after the socket was opened removes what was installed, so nothing is left
//! half-configured.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ipnet::IpNet;

use super::{
    EncapSocket, IN_MARK_MASK, MAGIC_DECRYPTED, MAGIC_ENCRYPT, MAGIC_MASK, MAGIC_SHIFT,
    OUT_MARK_MASK, PRIORITY_BLOCK, PRIORITY_PEER, PolicyAction, PolicyDir, PolicySpec, SaSnapshot,
    SaSpec, Tmpl, UdpEncap, XfrmBackend, decrypted_mark, encrypt_mark, peer_of_mark, peer_reqid,
};
use crate::{
    Encapsulation, EspDrop, InboundSaSnapshot, IpsecBackend, IpsecKind, IpsecPeerSnapshot,
    IpsecPeerSpec, Result,
};

/// Anti-replay window of inbound SAs, in packets.
pub const REPLAY_WINDOW: u32 = 2048;

/// The kernel objects of one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerObjects {
    /// Outbound SAs first (`outbound`, then `older_outbound` in the spec's order), then the
    /// inbound SAs in the spec's order.
    pub sas: Vec<SaSpec>,
    /// `out` policies (the current epoch's, then each older epoch's), then `in` and `fwd`
    /// pairs.
    pub policies: Vec<PolicySpec>,
}

fn invalid(field: &'static str, value: String, reason: &str) -> crate::Error {
    crate::Error::Invalid {
        field,
        value,
        reason: reason.to_owned(),
    }
}

/// Translates a peer spec into its SAs and policies (see the module docs); with
/// [`Encapsulation::Udp`] every SA carries [`UdpEncap::esp_in_udp`] of the port.
pub fn peer_objects(spec: &IpsecPeerSpec, encapsulation: Encapsulation) -> Result<PeerObjects> {
    if spec.local.is_ipv4() != spec.remote.is_ipv4() {
        return Err(invalid(
            "peer.local/remote",
            format!("{} -> {}", spec.local, spec.remote),
            "underlay addresses must be of one address family",
        ));
    }
    spec.check_older_outbound()?;
    let reqid = peer_reqid(spec.peer_id);
    let encap = match encapsulation {
        Encapsulation::None => None,
        Encapsulation::Udp { port } => Some(UdpEncap::esp_in_udp(port)),
    };
    let out_mark = |epoch| (encrypt_mark(spec.peer_id, epoch), OUT_MARK_MASK);
    let in_mark = (decrypted_mark(spec.peer_id), IN_MARK_MASK);
    let outbound = std::iter::once((spec.epoch, &spec.outbound))
        .chain(spec.older_outbound.iter().map(|(e, k)| (*e, k)));

    let mut sas: Vec<SaSpec> = outbound
        .clone()
        .map(|(epoch, keys)| SaSpec {
            src: spec.local,
            dst: spec.remote,
            spi: keys.spi,
            reqid,
            keys: keys.clone(),
            mark: Some(out_mark(epoch)),
            output_mark: None,
            replay_window: super::OUTBOUND_REPLAY_WINDOW,
            esn: true,
            encap,
        })
        .collect();
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
            encap,
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
    for (epoch, _) in outbound.clone() {
        for (src, dst) in pairs(&spec.local_cidrs, &spec.remote_cidrs) {
            policies.push(PolicySpec {
                dir: PolicyDir::Out,
                src,
                dst,
                mark: out_mark(epoch),
                priority: PRIORITY_PEER,
                action: PolicyAction::Allow,
                tmpl: Some(Tmpl {
                    src: spec.local,
                    dst: spec.remote,
                    reqid,
                }),
            });
        }
    }
    for (epoch, _) in outbound.clone() {
        for (src, dst) in &spec.bypass {
            if src.addr().is_ipv4() != dst.addr().is_ipv4() {
                continue;
            }
            policies.push(PolicySpec {
                dir: PolicyDir::Out,
                src: src.trunc(),
                dst: dst.trunc(),
                mark: out_mark(epoch),
                priority: PRIORITY_PEER,
                action: PolicyAction::Allow,
                tmpl: None,
            });
        }
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
        && current.encap == desired.encap
}

/// Whether a dumped SA is an outbound one (its match mark carries the encrypt magic).
fn is_outbound(sa: &SaSnapshot) -> bool {
    sa.mark
        .is_some_and(|(v, _)| (v & MAGIC_MASK) >> MAGIC_SHIFT == MAGIC_ENCRYPT)
}

/// Whether a dumped SA is an inbound one (its output mark carries the decrypted magic).
fn is_inbound(sa: &SaSnapshot) -> bool {
    sa.output_mark
        .is_some_and(|(v, _)| (v & MAGIC_MASK) >> MAGIC_SHIFT == MAGIC_DECRYPTED)
}

/// Counters of SAs that [`KernelIpsec`] removed from one peer. The kernel's counters go with
/// their SA; the per-peer totals of [`IpsecBackend::peers`] carry them on, so they do not go
/// backwards when a rotation retires an epoch.
#[derive(Clone, Copy, Debug, Default)]
struct Retired {
    tx_packets: u64,
    tx_bytes: u64,
    rx_packets: u64,
    rx_bytes: u64,
    replay_drops: u64,
    integrity_failed: u64,
}

impl Retired {
    /// Adds the counters of `sa` as last dumped (a retired SA carries no traffic any more, so
    /// nothing is lost between that dump and the deletion).
    fn add(&mut self, sa: &SaSnapshot) {
        if is_outbound(sa) {
            self.tx_packets += sa.packets;
            self.tx_bytes += sa.bytes;
        } else if is_inbound(sa) {
            self.rx_packets += sa.packets;
            self.rx_bytes += sa.bytes;
            self.replay_drops += u64::from(sa.replay_drops);
            self.integrity_failed += u64::from(sa.integrity_failed);
        }
    }
}

/// What [`KernelIpsec`] remembers of one peer between calls. It is lost on restart: totals
/// then start from the installed SAs, and the busiest outbound SA counts as the current one.
#[derive(Clone, Copy, Debug, Default)]
struct PeerMemory {
    /// SPI of the spec's `outbound` at the last successful upsert (0: none yet).
    out_spi: u32,
    /// Counters of removed SAs.
    retired: Retired,
}

/// [`IpsecBackend`] on the kernel's XFRM, through any [`XfrmBackend`].
pub struct KernelIpsec {
    backend: Arc<dyn XfrmBackend>,
    encapsulation: Encapsulation,
    /// The ESP-in-UDP socket with [`Encapsulation::Udp`]; the kernel decapsulates while it is
    /// open.
    socket: Option<EncapSocket>,
    /// Per peer; held for the whole of an upsert, delete or dump, which serialises them.
    memory: Mutex<BTreeMap<u16, PeerMemory>>,
}

impl std::fmt::Debug for KernelIpsec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelIpsec").finish_non_exhaustive()
    }
}

impl KernelIpsec {
    /// Raw ESP: installs the catch-all block policies (idempotently: a restart adopts them).
    pub fn new(backend: Arc<dyn XfrmBackend>) -> Result<Self> {
        Self::with_encapsulation(backend, Encapsulation::None, IpAddr::from([0u8; 4]))
    }

    /// As [`KernelIpsec::new`], with `encapsulation` for every SA. With
    /// [`Encapsulation::Udp`] it first opens the ESP-in-UDP socket on `local` (the node's
    /// underlay address; unspecified binds every address of its family) and the port, and
    /// fails with [`crate::Error::PortInUse`] if another socket holds them. If a block policy
    /// cannot be installed, the ones installed are removed and the socket is closed.
    pub fn with_encapsulation(
        backend: Arc<dyn XfrmBackend>,
        encapsulation: Encapsulation,
        local: IpAddr,
    ) -> Result<Self> {
        let socket = match encapsulation {
            Encapsulation::None => None,
            Encapsulation::Udp { port: 0 } => {
                return Err(invalid(
                    "encapsulation",
                    encapsulation.to_string(),
                    "ESP in UDP needs a fixed port at both ends (4500)",
                ));
            }
            Encapsulation::Udp { port } => {
                Some(backend.open_esp_in_udp(SocketAddr::new(local, port))?)
            }
        };
        let mut installed = Vec::new();
        for p in block_policies() {
            if let Err(e) = backend.upsert_policy(&p) {
                for done in &installed {
                    if let Err(d) = backend.delete_policy(done) {
                        tracing::warn!(policy = %done, error = %d, "cannot remove a block policy after a failed start");
                    }
                }
                return Err(e);
            }
            installed.push(p);
        }
        let mut kernel = Self::adopt(backend);
        kernel.encapsulation = encapsulation;
        kernel.socket = socket;
        Ok(kernel)
    }

    /// Wraps a backend without installing anything (for [`KernelIpsec::remove_all`] at
    /// uninstall time).
    pub fn adopt(backend: Arc<dyn XfrmBackend>) -> Self {
        Self {
            backend,
            encapsulation: Encapsulation::None,
            socket: None,
            memory: Mutex::default(),
        }
    }

    /// How the SAs carry ESP.
    pub fn encapsulation(&self) -> Encapsulation {
        self.encapsulation
    }

    /// The address and port of the ESP-in-UDP socket, if one is open.
    pub fn encap_socket(&self) -> Option<SocketAddr> {
        self.socket.as_ref().map(EncapSocket::local_addr)
    }

    /// The XFRM backend.
    pub fn backend(&self) -> &Arc<dyn XfrmBackend> {
        &self.backend
    }

    fn memory(&self) -> MutexGuard<'_, BTreeMap<u16, PeerMemory>> {
        self.memory.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Removes every enc SA and policy, the block policies included (agent teardown). Foreign
    /// objects stay.
    pub fn remove_all(&self) -> Result<()> {
        let mut memory = self.memory();
        memory.clear();
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

    /// New SAs first, then new policies, then what is stale: policies before SAs, so a policy
    /// never points at a missing SA. Unchanged objects are not touched, so sequence numbers
    /// and replay windows survive; each rotation step (module docs) is therefore hitless.
    fn upsert_peer(&self, spec: &IpsecPeerSpec) -> Result<()> {
        if let Some(at) = self.encap_socket()
            && !at.ip().is_unspecified()
            && at.ip() != spec.local
        {
            return Err(invalid(
                "peer.local",
                spec.local.to_string(),
                &format!(
                    "the ESP-in-UDP socket is bound to {at}: inbound ESP in UDP to another address would be dropped"
                ),
            ));
        }
        let desired = peer_objects(spec, self.encapsulation)?;
        let mut memory = self.memory();
        let current_sas = self.peer_sas(spec.peer_id)?;
        let current_policies = self.peer_policies(spec.peer_id)?;
        let mem = memory.entry(spec.peer_id).or_default();
        for sa in &desired.sas {
            match current_sas
                .iter()
                .find(|c| c.id.dst == sa.dst && c.id.spi == sa.spi)
            {
                Some(current) if sa_matches(current, sa) => {}
                Some(current) => {
                    // Not hitless, but attributes change only when the spec's addresses or
                    // marks do, never in a rotation.
                    tracing::info!(peer = spec.peer_id, sa = %current.id, "replacing SA whose attributes changed");
                    self.backend.delete_sa(&current.id)?;
                    mem.retired.add(current);
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
                mem.retired.add(current);
            }
        }
        mem.out_spi = spec.outbound.spi;
        Ok(())
    }

    fn delete_peer(&self, peer_id: u16) -> Result<()> {
        let mut memory = self.memory();
        for p in self.peer_policies(peer_id)? {
            self.backend.delete_policy(&p)?;
        }
        for sa in self.peer_sas(peer_id)? {
            self.backend.delete_sa(&sa.id)?;
        }
        memory.remove(&peer_id);
        Ok(())
    }

    /// Per peer: the current outbound SA's SPI and sequence number, totals over installed and
    /// removed SAs, and the installed inbound SAs.
    fn peers(&self) -> Result<Vec<IpsecPeerSnapshot>> {
        let memory = self.memory();
        let mut peers: BTreeMap<u16, IpsecPeerSnapshot> = BTreeMap::new();
        for sa in self.backend.dump_sas()? {
            let Some(peer_id) = sa.peer() else { continue };
            let mem = memory.get(&peer_id).copied().unwrap_or_default();
            let peer = peers.entry(peer_id).or_insert_with(|| IpsecPeerSnapshot {
                peer_id,
                out_spi: 0,
                out_seq: 0,
                tx_packets: mem.retired.tx_packets,
                tx_bytes: mem.retired.tx_bytes,
                rx_packets: mem.retired.rx_packets,
                rx_bytes: mem.retired.rx_bytes,
                inbound: Vec::new(),
                drops: vec![
                    (EspDrop::Replay, mem.retired.replay_drops),
                    (EspDrop::IcvFailure, mem.retired.integrity_failed),
                ],
            });
            if is_outbound(&sa) {
                peer.tx_packets += sa.packets;
                peer.tx_bytes += sa.bytes;
                // From commit to retirement two outbound SAs exist: report the spec's current
                // one, or (with nothing remembered) the busier one.
                let current = if mem.out_spi != 0 {
                    sa.id.spi == mem.out_spi
                } else {
                    peer.out_spi == 0 || sa.oseq >= peer.out_seq
                };
                if current {
                    peer.out_spi = sa.id.spi;
                    peer.out_seq = sa.oseq;
                }
            } else if is_inbound(&sa) {
                peer.rx_packets += sa.packets;
                peer.rx_bytes += sa.bytes;
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
    use std::collections::BTreeSet;

    use super::*;
    use crate::SaKeys;
    use crate::xfrm::{FakeOp, FakeXfrm, SaId, UdpEncap};

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
            older_outbound: vec![],
            bypass: vec![],
        }
    }

    #[test]
    fn overlay_pod_cidrs_get_template_free_allow_policies_per_outbound_epoch() {
        let mut s = spec(1, 3);
        s.local_cidrs = vec!["192.168.0.1/32".parse().unwrap()];
        s.remote_cidrs = vec!["192.168.0.11/32".parse().unwrap()];
        s.older_outbound = vec![(2, keys(0x2000_1001))];
        s.bypass = vec![(
            "10.1.0.0/24".parse().unwrap(),
            "10.101.0.0/24".parse().unwrap(),
        )];
        let objects = peer_objects(&s, Encapsulation::None).unwrap();
        let bypass: Vec<&PolicySpec> = objects
            .policies
            .iter()
            .filter(|p| p.tmpl.is_none())
            .collect();
        assert_eq!(bypass.len(), 2, "one per outbound epoch: {bypass:?}");
        for (p, epoch) in bypass.iter().zip([3u8, 2]) {
            assert_eq!(p.dir, PolicyDir::Out);
            assert_eq!(p.action, PolicyAction::Allow);
            assert_eq!(p.src.to_string(), "10.1.0.0/24");
            assert_eq!(p.dst.to_string(), "10.101.0.0/24");
            assert_eq!(p.mark, (encrypt_mark(1, epoch), OUT_MARK_MASK));
        }
        // The overlay's packets between the two nodes are the ones the SAs protect.
        let sealed: Vec<&PolicySpec> = objects
            .policies
            .iter()
            .filter(|p| p.dir == PolicyDir::Out && p.tmpl.is_some())
            .collect();
        assert!(
            sealed
                .iter()
                .all(|p| p.src.to_string() == "192.168.0.1/32"
                    && p.dst.to_string() == "192.168.0.11/32"),
            "{sealed:?}"
        );
    }

    /// Peer 1's outbound keys at `epoch` (SPI bits 31..28 carry the epoch).
    fn out_keys(epoch: u8) -> SaKeys {
        keys((u32::from(epoch & 0xF) << 28) | 0x1001)
    }

    /// Peer 1's inbound keys at `epoch`.
    fn in_keys(epoch: u8) -> SaKeys {
        keys((u32::from(epoch & 0xF) << 28) | 0x2001)
    }

    /// A step of the rotation from epoch `e` to `e + 1`.
    #[derive(Clone, Copy, Debug)]
    enum Step {
        /// At `e`, before the rotation.
        Steady,
        /// Inbound of `e + 1` installed beside `e`'s.
        Prepare,
        /// Outbound switched to `e + 1`; `e`'s kept as older.
        Commit,
        /// `e` gone: the steady state of `e + 1`.
        Retire,
    }

    /// Peer 1's spec at `step` of the rotation from `e`.
    fn rotation_spec(e: u8, step: Step) -> IpsecPeerSpec {
        let next = e.wrapping_add(1);
        let mut s = spec(1, e);
        (s.outbound, s.inbound) = (out_keys(e), vec![in_keys(e)]);
        match step {
            Step::Steady => {}
            Step::Prepare => s.inbound.push(in_keys(next)),
            Step::Commit => {
                (s.epoch, s.outbound) = (next, out_keys(next));
                s.inbound.push(in_keys(next));
                s.older_outbound = vec![(e, out_keys(e))];
            }
            Step::Retire => return rotation_spec(next, Step::Steady),
        }
        s
    }

    fn sorted_sas(mut sas: Vec<SaSpec>) -> Vec<SaSpec> {
        sas.sort_by_key(|s| (s.spi, s.dst));
        sas
    }

    fn sorted_policies(mut policies: Vec<PolicySpec>) -> Vec<PolicySpec> {
        policies.sort_by_key(|p| format!("{p} {:?}", p.tmpl));
        policies
    }

    /// The order an upsert must call in: new SAs, new policies, stale policies, stale SAs.
    fn phase(op: &FakeOp) -> u8 {
        match op {
            FakeOp::OpenEspInUdp(_) => 0,
            FakeOp::UpsertSa(_) => 1,
            FakeOp::UpsertPolicy(_) => 2,
            FakeOp::DeletePolicy(_) => 3,
            FakeOp::DeleteSa(_) => 4,
        }
    }

    /// `got` holds exactly the calls of `want`, phase by phase (any order within a phase).
    fn assert_ops(got: Vec<FakeOp>, mut want: Vec<FakeOp>, what: &str) {
        assert!(
            got.windows(2).all(|w| phase(&w[0]) <= phase(&w[1])),
            "{what}: calls out of order: {got:#?}"
        );
        let mut sorted = got.clone();
        sorted.sort_by_key(|op| (phase(op), format!("{op:?}")));
        want.sort_by_key(|op| (phase(op), format!("{op:?}")));
        assert_eq!(sorted, want, "{what}: calls {got:#?}");
    }

    fn kernel() -> (Arc<FakeXfrm>, KernelIpsec) {
        let fake = Arc::new(FakeXfrm::new());
        let kernel = KernelIpsec::new(fake.clone()).unwrap();
        (fake, kernel)
    }

    #[test]
    fn translation_is_exact() {
        let objects = peer_objects(&spec(5, 0x13), Encapsulation::None).unwrap();
        let local: IpAddr = "192.168.0.1".parse().unwrap();
        let remote: IpAddr = "192.168.0.15".parse().unwrap();
        assert_eq!(objects.sas.len(), 2);
        let out = &objects.sas[0];
        assert_eq!((out.src, out.dst, out.spi), (local, remote, 0x1005));
        assert_eq!(out.mark, Some((0x0005_3E00, 0xFFFF_FF00)));
        assert_eq!(
            (out.output_mark, out.replay_window, out.esn),
            (None, 32, true)
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

    fn udp() -> Encapsulation {
        Encapsulation::Udp { port: 4500 }
    }

    fn local() -> IpAddr {
        "192.168.0.1".parse().unwrap()
    }

    #[test]
    fn esp_in_udp_opens_the_socket_before_anything_and_encapsulates_every_sa() {
        let fake = Arc::new(FakeXfrm::new());
        let kernel = KernelIpsec::with_encapsulation(fake.clone(), udp(), local()).unwrap();
        let at = SocketAddr::new(local(), 4500);
        assert_eq!(kernel.encap_socket(), Some(at));
        assert_eq!(kernel.encapsulation(), udp());
        kernel.upsert_peer(&rotation_spec(0, Step::Commit)).unwrap();
        let ops = fake.take_ops();
        assert_eq!(ops.first(), Some(&FakeOp::OpenEspInUdp(at)), "{ops:#?}");
        assert_eq!(
            ops.iter()
                .filter(|o| matches!(o, FakeOp::OpenEspInUdp(_)))
                .count(),
            1
        );
        let sas = fake.all_sas();
        assert_eq!(sas.len(), 4, "two outbound, two inbound");
        assert!(
            sas.iter()
                .all(|sa| sa.encap == Some(UdpEncap::esp_in_udp(4500))),
            "{sas:#?}"
        );
        assert_eq!(fake.udp_bound(), vec![at]);
        // Unchanged: a second upsert touches nothing.
        kernel.upsert_peer(&rotation_spec(0, Step::Commit)).unwrap();
        assert_eq!(fake.take_ops(), vec![]);
        // The socket lives as long as the backend.
        drop(kernel);
        assert!(fake.udp_bound().is_empty());
        // Raw ESP SAs have no encapsulation and no socket.
        let (fake, raw) = super::tests::kernel();
        raw.upsert_peer(&spec(1, 0)).unwrap();
        assert!(fake.all_sas().iter().all(|sa| sa.encap.is_none()));
        assert_eq!(raw.encap_socket(), None);
        assert!(fake.udp_bound().is_empty());
    }

    #[test]
    fn switching_encapsulation_replaces_the_sas() {
        let fake = Arc::new(FakeXfrm::new());
        let raw = KernelIpsec::new(fake.clone()).unwrap();
        raw.upsert_peer(&spec(1, 0)).unwrap();
        drop(raw);
        let kernel = KernelIpsec::with_encapsulation(fake.clone(), udp(), local()).unwrap();
        kernel.upsert_peer(&spec(1, 0)).unwrap();
        let sas = fake.all_sas();
        assert_eq!(sas.len(), 2);
        assert!(sas.iter().all(|sa| sa.encap.is_some()), "{sas:#?}");
    }

    #[test]
    fn a_taken_port_fails_start_up_before_anything_is_installed() {
        let fake = Arc::new(FakeXfrm::new());
        let at = SocketAddr::new(IpAddr::from([0u8; 4]), 4500);
        fake.occupy_udp(at);
        let err = KernelIpsec::with_encapsulation(fake.clone(), udp(), local()).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, crate::Error::PortInUse { at, .. } if at == SocketAddr::new(local(), 4500)),
            "{err:?}"
        );
        assert!(text.contains("192.168.0.1:4500"), "{text}");
        assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE));
        assert_eq!(
            fake.take_ops(),
            vec![FakeOp::OpenEspInUdp(SocketAddr::new(local(), 4500))]
        );
        assert!(fake.all_policies().is_empty() && fake.all_sas().is_empty());
    }

    #[test]
    fn a_failed_start_removes_what_it_installed_and_closes_the_socket() {
        let fake = Arc::new(FakeXfrm::new());
        // The IPv4 block policy goes in, the IPv6 one is refused.
        fake.refuse_policies_after(1, libc::ENOBUFS);
        let err = KernelIpsec::with_encapsulation(fake.clone(), udp(), local()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOBUFS), "{err:?}");
        assert!(fake.all_policies().is_empty(), "{:?}", fake.all_policies());
        assert!(fake.udp_bound().is_empty(), "socket left open");
        let ops = fake.take_ops();
        assert!(
            matches!(ops.last(), Some(FakeOp::DeletePolicy(_))),
            "{ops:#?}"
        );
    }

    #[test]
    fn esp_in_udp_refuses_a_peer_on_another_local_address() {
        let fake = Arc::new(FakeXfrm::new());
        let kernel = KernelIpsec::with_encapsulation(fake.clone(), udp(), local()).unwrap();
        let mut s = spec(1, 0);
        s.local = "192.168.0.2".parse().unwrap();
        let err = kernel.upsert_peer(&s).unwrap_err();
        assert!(
            matches!(
                err,
                crate::Error::Invalid {
                    field: "peer.local",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(fake.all_sas().is_empty());
        // Bound to every address, any local address is fine.
        drop(kernel);
        let any =
            KernelIpsec::with_encapsulation(fake.clone(), udp(), IpAddr::from([0u8; 4])).unwrap();
        any.upsert_peer(&s).unwrap();
        assert!(matches!(
            KernelIpsec::with_encapsulation(fake.clone(), Encapsulation::Udp { port: 0 }, local()),
            Err(crate::Error::Invalid { .. })
        ));
    }

    #[test]
    fn bad_specs_are_refused() {
        let mut s = spec(1, 0);
        s.remote = "fd00::2".parse().unwrap();
        assert!(matches!(
            peer_objects(&s, Encapsulation::None),
            Err(crate::Error::Invalid { .. })
        ));
        let mut s = spec(1, 0);
        s.inbound.push(keys(0x2001));
        assert!(matches!(
            peer_objects(&s, Encapsulation::None),
            Err(crate::Error::Invalid {
                field: "peer.inbound.spi",
                ..
            })
        ));
        let mut s = spec(1, 0);
        s.outbound.spi = 0;
        assert!(peer_objects(&s, Encapsulation::None).is_err());
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
        let objects = peer_objects(&spec(1, 0), Encapsulation::None).unwrap();
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
    fn rotation_steps_are_exact_and_keep_unchanged_sas() {
        let (fake, kernel) = kernel();
        let local: IpAddr = "192.168.0.1".parse().unwrap();
        let remote: IpAddr = "192.168.0.11".parse().unwrap();
        let out_id = |e| SaId {
            src: local,
            dst: remote,
            spi: out_keys(e).spi,
        };
        let in_id = |e| SaId {
            src: remote,
            dst: local,
            spi: in_keys(e).spi,
        };
        let out_policies = |e| -> Vec<PolicySpec> {
            peer_objects(&rotation_spec(e, Step::Steady), Encapsulation::None)
                .unwrap()
                .policies
                .into_iter()
                .filter(|p| p.dir == PolicyDir::Out)
                .collect()
        };
        let out_mark = |e| Some((encrypt_mark(1, e), OUT_MARK_MASK));

        kernel.upsert_peer(&rotation_spec(0, Step::Steady)).unwrap();
        fake.take_ops();
        // Packets (and bytes) pushed through each installed SA, by SPI; totals per direction.
        let mut pushed: BTreeMap<u32, u64> = BTreeMap::new();
        let (mut tx, mut rx) = (0, 0);
        for e in 0..20u8 {
            let next = e.wrapping_add(1);
            let steps = [
                (Step::Prepare, vec![FakeOp::UpsertSa(in_id(next))]),
                (
                    Step::Commit,
                    std::iter::once(FakeOp::UpsertSa(out_id(next)))
                        .chain(out_policies(next).into_iter().map(FakeOp::UpsertPolicy))
                        .collect(),
                ),
                (
                    Step::Retire,
                    out_policies(e)
                        .into_iter()
                        .map(FakeOp::DeletePolicy)
                        .chain([FakeOp::DeleteSa(out_id(e)), FakeOp::DeleteSa(in_id(e))])
                        .collect(),
                ),
            ];
            for (step, want_ops) in steps {
                let what = format!("epoch {e} {step:?}");
                // Traffic on every SA up to the step.
                for sa in fake.dump_sas().unwrap() {
                    assert!(fake.traffic(sa.id.dst, sa.id.spi, 10, 1000));
                    *pushed.entry(sa.id.spi).or_default() += 10;
                    if is_outbound(&sa) {
                        tx += 10;
                    } else {
                        rx += 10;
                    }
                }
                let spec = rotation_spec(e, step);
                kernel.upsert_peer(&spec).unwrap();
                assert_ops(fake.take_ops(), want_ops, &what);
                kernel.upsert_peer(&spec).unwrap();
                assert_eq!(
                    fake.take_ops(),
                    vec![],
                    "{what}: second upsert calls nothing"
                );

                // Exactly the objects of the step, by SPI and mark, and as translated.
                let (outs, ins): (Vec<u8>, Vec<u8>) = match step {
                    Step::Steady => unreachable!(),
                    Step::Prepare => (vec![e], vec![e, next]),
                    Step::Commit => (vec![e, next], vec![e, next]),
                    Step::Retire => (vec![next], vec![next]),
                };
                let mut want_sas: Vec<_> = outs
                    .iter()
                    .map(|&o| (out_keys(o).spi, out_mark(o)))
                    .chain(ins.iter().map(|&i| (in_keys(i).spi, None)))
                    .collect();
                want_sas.sort_unstable();
                let mut got_sas: Vec<_> = fake.all_sas().iter().map(|s| (s.spi, s.mark)).collect();
                got_sas.sort_unstable();
                assert_eq!(got_sas, want_sas, "{what}");
                let objects = peer_objects(&spec, Encapsulation::None).unwrap();
                assert_eq!(
                    sorted_sas(fake.all_sas()),
                    sorted_sas(objects.sas),
                    "{what}"
                );
                let mut want_policies = block_policies();
                want_policies.extend(objects.policies);
                assert_eq!(
                    sorted_policies(fake.all_policies()),
                    sorted_policies(want_policies),
                    "{what}"
                );
                let out_marks: BTreeSet<_> = fake
                    .all_policies()
                    .iter()
                    .filter(|p| p.dir == PolicyDir::Out && p.action == PolicyAction::Allow)
                    .map(|p| Some(p.mark))
                    .collect();
                let want_marks: BTreeSet<_> = outs.iter().map(|&o| out_mark(o)).collect();
                assert_eq!(out_marks, want_marks, "{what}");

                // SAs that stayed kept their sequence numbers and counters.
                let dumped = fake.dump_sas().unwrap();
                pushed.retain(|spi, _| dumped.iter().any(|sa| sa.id.spi == *spi));
                for sa in &dumped {
                    let n = pushed.get(&sa.id.spi).copied().unwrap_or(0);
                    let seq = if is_outbound(sa) { sa.oseq } else { sa.seq };
                    assert_eq!(
                        (seq, sa.packets, sa.bytes),
                        (n, n, n * 100),
                        "{what} {}",
                        sa.id
                    );
                }

                // The current outbound SA, and totals that never go backwards.
                let peers = kernel.peers().unwrap();
                assert_eq!(peers.len(), 1);
                let p = &peers[0];
                assert_eq!(p.out_spi, spec.outbound.spi, "{what}");
                assert_eq!(
                    p.out_seq,
                    pushed.get(&spec.outbound.spi).copied().unwrap_or(0),
                    "{what}"
                );
                assert_eq!(
                    (p.tx_packets, p.tx_bytes, p.rx_packets, p.rx_bytes),
                    (tx, tx * 100, rx, rx * 100),
                    "{what}"
                );
                assert_eq!(
                    p.inbound.iter().map(|i| i.spi).collect::<BTreeSet<_>>(),
                    spec.inbound.iter().map(|k| k.spi).collect(),
                    "{what}"
                );
            }
        }
    }

    #[test]
    fn invalid_older_outbound_is_refused() {
        let (fake, kernel) = kernel();
        let mut same_epoch = rotation_spec(3, Step::Commit);
        same_epoch.older_outbound[0].0 = 4 + 16;
        let mut same_spi = rotation_spec(3, Step::Commit);
        same_spi.older_outbound.push((9, out_keys(4)));
        let mut twice = rotation_spec(3, Step::Commit);
        twice.older_outbound.push((3 + 16, out_keys(2)));
        for (s, field) in [
            (same_epoch, "older_outbound.epoch"),
            (same_spi, "older_outbound.spi"),
            (twice, "older_outbound.epoch"),
        ] {
            match kernel.upsert_peer(&s) {
                Err(crate::Error::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        assert!(fake.all_sas().is_empty());
    }

    #[test]
    fn peers_after_a_restart_reports_the_busier_outbound_sa() {
        let fake = Arc::new(FakeXfrm::new());
        let kernel = KernelIpsec::new(fake.clone()).unwrap();
        let commit = rotation_spec(0, Step::Commit);
        kernel.upsert_peer(&commit).unwrap();
        let remote = commit.remote;
        assert!(fake.traffic(remote, out_keys(0).spi, 5, 500));
        assert!(fake.traffic(remote, out_keys(1).spi, 3, 300));
        assert_eq!(kernel.peers().unwrap()[0].out_spi, out_keys(1).spi);
        let restarted = KernelIpsec::adopt(fake.clone());
        let p = &restarted.peers().unwrap()[0];
        assert_eq!((p.out_spi, p.out_seq), (out_keys(0).spi, 5));
        assert_eq!((p.tx_packets, p.tx_bytes), (8, 800));
        restarted.upsert_peer(&commit).unwrap();
        assert_eq!(restarted.peers().unwrap()[0].out_spi, out_keys(1).spi);
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
        let mut foreign_sa = peer_objects(&spec(1, 0), Encapsulation::None).unwrap().sas[1].clone();
        foreign_sa.output_mark = None;
        foreign_sa.spi = 0x9999;
        foreign_sa.keys.spi = 0x9999;
        fake.insert_foreign_sa(foreign_sa.clone());

        kernel.delete_peer(1).unwrap();
        let two = peer_objects(&spec(2, 3), Encapsulation::None).unwrap();
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
        let before = spec(1, 0);
        kernel.upsert_peer(&before).unwrap();
        assert!(fake.traffic(before.remote, 0x1001, 4, 400));
        assert!(fake.traffic(before.local, 0x2001, 3, 300));
        let mut moved = spec(1, 0);
        moved.local = "192.168.0.2".parse().unwrap();
        kernel.upsert_peer(&moved).unwrap();
        let sas = fake.all_sas();
        assert_eq!(sas.len(), 2);
        assert!(
            sas.iter()
                .all(|s| s.src == moved.local || s.dst == moved.local)
        );
        // The replaced SAs' counters stay in the peer's totals.
        let p = &kernel.peers().unwrap()[0];
        assert_eq!(
            (
                p.out_seq,
                p.tx_packets,
                p.tx_bytes,
                p.rx_packets,
                p.rx_bytes
            ),
            (0, 4, 400, 3, 300)
        );
        assert_eq!(p.inbound[0].packets, 0);
    }
}
