//! In-memory [`XfrmBackend`] with the kernel's identities and enc's validation.

use std::io;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::{PolicySpec, SaId, SaSnapshot, SaSpec, XfrmBackend};
use crate::{Error, Result};

/// In-memory [`XfrmBackend`]: SAs keyed like the kernel's (destination, SPI, mark), policies
/// keyed by selector, direction and mark; the same validation as [`super::NetlinkXfrm`], and
/// dumps filtered to enc's objects. Foreign objects can be planted to check that enc leaves
/// them alone.
#[derive(Debug, Default)]
pub struct FakeXfrm {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    sas: Vec<SaSpec>,
    policies: Vec<PolicySpec>,
    refuse_sas: Option<i32>,
    requests: usize,
}

impl FakeXfrm {
    /// An empty SAD and SPD.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// From now on, refuses every new SA with `errno`, as a kernel without ESP or GCM does.
    pub fn refuse_sas(&self, errno: i32) {
        self.state().refuse_sas = Some(errno);
    }

    /// Plants an SA without validation (another program's, for instance).
    pub fn insert_foreign_sa(&self, sa: SaSpec) {
        self.state().sas.push(sa);
    }

    /// Plants a policy without validation (another program's, for instance).
    pub fn insert_foreign_policy(&self, p: PolicySpec) {
        self.state().policies.push(p);
    }

    /// Every SA, enc's or not, with its spec.
    pub fn all_sas(&self) -> Vec<SaSpec> {
        self.state().sas.clone()
    }

    /// Every policy, enc's or not.
    pub fn all_policies(&self) -> Vec<PolicySpec> {
        self.state().policies.clone()
    }

    /// How many modifying requests (upserts and deletes that changed something) were served.
    pub fn changes(&self) -> usize {
        self.state().requests
    }
}

fn same_sa(a: &SaSpec, dst: IpAddr, spi: u32, mark: Option<(u32, u32)>) -> bool {
    a.dst == dst && a.spi == spi && a.mark.unwrap_or((0, 0)) == mark.unwrap_or((0, 0))
}

fn snapshot(sa: &SaSpec) -> SaSnapshot {
    SaSnapshot {
        id: sa.id(),
        reqid: sa.reqid,
        mark: sa.mark,
        output_mark: sa.output_mark,
        esn: sa.esn,
        replay_window: sa.replay_window,
        oseq: 0,
        seq: 0,
        bytes: 0,
        packets: 0,
        replay_drops: 0,
        integrity_failed: 0,
    }
}

impl XfrmBackend for FakeXfrm {
    fn upsert_sa(&self, sa: &SaSpec) -> Result<()> {
        sa.validate()?;
        let mut guard = self.state();
        let state = &mut *guard;
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
            .find(|s| same_sa(s, sa.dst, sa.spi, sa.mark))
        {
            // Like XFRM_MSG_UPDSA: the key stays.
            Some(existing) => {
                let updated = SaSpec {
                    keys: existing.keys.clone(),
                    ..sa.clone()
                };
                if *existing != updated {
                    *existing = updated;
                    state.requests += 1;
                }
            }
            None => {
                state.sas.push(sa.clone());
                state.requests += 1;
            }
        }
        Ok(())
    }

    fn delete_sa(&self, id: &SaId) -> Result<()> {
        let mut state = self.state();
        if let Some(index) = state
            .sas
            .iter()
            .position(|s| s.is_enc() && s.dst == id.dst && s.spi == id.spi)
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
            .filter(|s| s.is_enc())
            .map(snapshot)
            .collect())
    }

    fn upsert_policy(&self, p: &PolicySpec) -> Result<()> {
        p.validate()?;
        let mut guard = self.state();
        let state = &mut *guard;
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
