//! In-memory [`XfrmBackend`] with the kernel's identities and enc's validation.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::{EncapSocket, PolicySpec, SaId, SaSnapshot, SaSpec, XfrmBackend};
use crate::{Error, Result};

/// In-memory [`XfrmBackend`]: SAs keyed like the kernel's (destination, SPI, mark), policies
/// keyed by selector, direction and mark; the same validation as [`super::NetlinkXfrm`], and
/// dumps filtered to enc's objects. Foreign objects can be planted to check that enc leaves
/// them alone; traffic can be simulated ([`FakeXfrm::traffic`]) to see that counters and
/// sequence numbers survive an update, and every modifying call is logged
/// ([`FakeXfrm::take_ops`]). ESP-in-UDP sockets are kept as a set of bound addresses, with
/// the kernel's rule for conflicts ([`FakeXfrm::occupy_udp`] plants another program's).
#[derive(Debug, Default)]
pub struct FakeXfrm {
    state: Arc<Mutex<State>>,
}

/// A modifying call made to a [`FakeXfrm`], whether or not it changed anything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FakeOp {
    /// [`XfrmBackend::upsert_sa`].
    UpsertSa(SaId),
    /// [`XfrmBackend::delete_sa`].
    DeleteSa(SaId),
    /// [`XfrmBackend::upsert_policy`].
    UpsertPolicy(PolicySpec),
    /// [`XfrmBackend::delete_policy`].
    DeletePolicy(PolicySpec),
    /// [`XfrmBackend::open_esp_in_udp`].
    OpenEspInUdp(SocketAddr),
}

/// An SA with the counters the kernel would keep for it.
#[derive(Debug)]
struct FakeSa {
    spec: SaSpec,
    oseq: u64,
    seq: u64,
    packets: u64,
    bytes: u64,
}

#[derive(Debug, Default)]
struct State {
    sas: Vec<FakeSa>,
    policies: Vec<PolicySpec>,
    refuse_sas: Option<i32>,
    /// Policy upserts still served before every further one is refused with the errno.
    refuse_policies: Option<(usize, i32)>,
    /// Bound UDP addresses: enc's ESP-in-UDP sockets and planted ones.
    udp_bound: Vec<SocketAddr>,
    requests: usize,
    ops: Vec<FakeOp>,
}

impl FakeXfrm {
    /// An empty SAD and SPD.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// After `after` more policy upserts, refuses every further one with `errno`.
    pub fn refuse_policies_after(&self, after: usize, errno: i32) {
        self.state().refuse_policies = Some((after, errno));
    }

    /// Binds `at` for another program, so that an ESP-in-UDP socket there is refused.
    pub fn occupy_udp(&self, at: SocketAddr) {
        self.state().udp_bound.push(at);
    }

    /// The addresses of the UDP sockets bound now (enc's open ESP-in-UDP sockets and the
    /// planted ones).
    pub fn udp_bound(&self) -> Vec<SocketAddr> {
        self.state().udp_bound.clone()
    }

    /// From now on, refuses every new SA with `errno`, as a kernel without ESP or GCM does.
    pub fn refuse_sas(&self, errno: i32) {
        self.state().refuse_sas = Some(errno);
    }

    /// Plants an SA without validation (another program's, for instance).
    pub fn insert_foreign_sa(&self, sa: SaSpec) {
        self.state().sas.push(FakeSa::new(sa));
    }

    /// Plants a policy without validation (another program's, for instance).
    pub fn insert_foreign_policy(&self, p: PolicySpec) {
        self.state().policies.push(p);
    }

    /// Every SA, enc's or not, with its spec.
    pub fn all_sas(&self) -> Vec<SaSpec> {
        self.state().sas.iter().map(|sa| sa.spec.clone()).collect()
    }

    /// Every policy, enc's or not.
    pub fn all_policies(&self) -> Vec<PolicySpec> {
        self.state().policies.clone()
    }

    /// How many modifying requests (upserts and deletes that changed something) were served.
    pub fn changes(&self) -> usize {
        self.state().requests
    }

    /// Returns and clears the log of modifying calls.
    pub fn take_ops(&self) -> Vec<FakeOp> {
        std::mem::take(&mut self.state().ops)
    }

    /// Simulates `packets` packets of `bytes` bytes in all through the SA with this destination
    /// and SPI, as the kernel counts them: sent (the output sequence number advances) when the
    /// SA has a match mark, else received in order (the highest sequence number advances).
    /// Returns whether the SA exists.
    pub fn traffic(&self, dst: IpAddr, spi: u32, packets: u64, bytes: u64) -> bool {
        let mut state = self.state();
        let Some(sa) = state
            .sas
            .iter_mut()
            .find(|s| s.spec.dst == dst && s.spec.spi == spi)
        else {
            return false;
        };
        if sa.spec.mark.is_some() {
            sa.oseq += packets;
        } else {
            sa.seq += packets;
        }
        sa.packets += packets;
        sa.bytes += bytes;
        true
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Keeps a fake socket bound until dropped.
#[derive(Debug)]
struct FakeUdpBinding {
    state: Arc<Mutex<State>>,
    at: SocketAddr,
}

impl Drop for FakeUdpBinding {
    fn drop(&mut self) {
        let mut state = lock(&self.state);
        if let Some(i) = state.udp_bound.iter().position(|a| *a == self.at) {
            state.udp_bound.remove(i);
        }
    }
}

/// Whether binding `b` conflicts with the bound `a` (no `SO_REUSEADDR`): same port, and the
/// same address or a wildcard on either side.
fn udp_conflict(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

impl FakeSa {
    fn new(spec: SaSpec) -> Self {
        Self {
            spec,
            oseq: 0,
            seq: 0,
            packets: 0,
            bytes: 0,
        }
    }
}

fn same_sa(a: &SaSpec, dst: IpAddr, spi: u32, mark: Option<(u32, u32)>) -> bool {
    a.dst == dst && a.spi == spi && a.mark.unwrap_or((0, 0)) == mark.unwrap_or((0, 0))
}

fn snapshot(sa: &FakeSa) -> SaSnapshot {
    let spec = &sa.spec;
    SaSnapshot {
        id: spec.id(),
        reqid: spec.reqid,
        mark: spec.mark,
        output_mark: spec.output_mark,
        esn: spec.esn,
        replay_window: spec.replay_window,
        oseq: sa.oseq,
        seq: sa.seq,
        bytes: sa.bytes,
        packets: sa.packets,
        replay_drops: 0,
        integrity_failed: 0,
        encap: spec.encap,
    }
}

impl XfrmBackend for FakeXfrm {
    fn open_esp_in_udp(&self, at: SocketAddr) -> Result<EncapSocket> {
        let mut state = self.state();
        state.ops.push(FakeOp::OpenEspInUdp(at));
        if state.udp_bound.iter().any(|b| udp_conflict(*b, at)) {
            return Err(Error::PortInUse {
                at,
                source: io::Error::from_raw_os_error(libc::EADDRINUSE),
            });
        }
        state.udp_bound.push(at);
        Ok(EncapSocket::new(
            at,
            FakeUdpBinding {
                state: self.state.clone(),
                at,
            },
        ))
    }

    fn upsert_sa(&self, sa: &SaSpec) -> Result<()> {
        sa.validate()?;
        let mut guard = self.state();
        let state = &mut *guard;
        state.ops.push(FakeOp::UpsertSa(sa.id()));
        if let Some(errno) = state.refuse_sas {
            return Err(Error::Xfrm {
                op: "XFRM_MSG_NEWSA",
                what: sa.id().to_string(),
                source: io::Error::from_raw_os_error(errno),
            });
        }
        match state
            .sas
            .iter_mut()
            .find(|s| same_sa(&s.spec, sa.dst, sa.spi, sa.mark))
        {
            // Like XFRM_MSG_UPDSA: the key and the counters stay.
            Some(existing) => {
                let updated = SaSpec {
                    keys: existing.spec.keys.clone(),
                    ..sa.clone()
                };
                if existing.spec != updated {
                    existing.spec = updated;
                    state.requests += 1;
                }
            }
            None => {
                state.sas.push(FakeSa::new(sa.clone()));
                state.requests += 1;
            }
        }
        Ok(())
    }

    fn delete_sa(&self, id: &SaId) -> Result<()> {
        let mut state = self.state();
        state.ops.push(FakeOp::DeleteSa(*id));
        if let Some(index) = state
            .sas
            .iter()
            .position(|s| s.spec.is_enc() && s.spec.dst == id.dst && s.spec.spi == id.spi)
        {
            state.sas.remove(index);
            state.requests += 1;
        }
        Ok(())
    }

    fn dump_sas(&self) -> Result<Vec<SaSnapshot>> {
        Ok(self
            .state()
            .sas
            .iter()
            .filter(|s| s.spec.is_enc())
            .map(snapshot)
            .collect())
    }

    fn upsert_policy(&self, p: &PolicySpec) -> Result<()> {
        p.validate()?;
        let mut guard = self.state();
        let state = &mut *guard;
        state.ops.push(FakeOp::UpsertPolicy(p.clone()));
        if let Some((after, errno)) = &mut state.refuse_policies {
            if *after == 0 {
                return Err(Error::Xfrm {
                    op: "XFRM_MSG_UPDPOLICY",
                    what: p.to_string(),
                    source: io::Error::from_raw_os_error(*errno),
                });
            }
            *after -= 1;
        }
        match state.policies.iter_mut().find(|q| q.same_key(p)) {
            Some(existing) if existing == p => {}
            Some(existing) => {
                *existing = p.clone();
                state.requests += 1;
            }
            None => {
                state.policies.push(p.clone());
                state.requests += 1;
            }
        }
        Ok(())
    }

    fn delete_policy(&self, p: &PolicySpec) -> Result<()> {
        p.validate()?;
        let mut state = self.state();
        state.ops.push(FakeOp::DeletePolicy(p.clone()));
        if let Some(index) = state.policies.iter().position(|q| q.same_key(p)) {
            state.policies.remove(index);
            state.requests += 1;
        }
        Ok(())
    }

    fn dump_policies(&self) -> Result<Vec<PolicySpec>> {
        Ok(self
            .state()
            .policies
            .iter()
            .filter(|p| p.is_enc())
            .cloned()
            .collect())
    }
}
