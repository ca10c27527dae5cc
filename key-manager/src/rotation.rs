//! Two-phase, per-peer key rotation as a sans-IO state machine.
//!
//! One [`Rotation`] runs per control session with one peer. The caller feeds it messages from
//! the peer, ticks and triggers, each with `now`, and carries out the returned [`Effect`]s **in
//! order**: an effect that installs keys comes before the message that tells the peer about
//! it, so a peer is only ever told "installed" after the datapath really holds the key. If an
//! install fails, the caller must not carry out the rest of the list and should end the session.
//!
//! The protocol, for the epoch `e` after the current one (leader = the node that dials):
//!
//! ```text
//! leader                                   follower
//! InstallInbound(e), Prepare(e)  ───────▶  InstallInbound(e), Ack(e)
//!                                ◀───────
//! SwitchOutbound(e), Commit(e)   ───────▶  SwitchOutbound(e), Committed(e)
//!                                ◀───────
//! after the grace period: Retire(< e)      after the grace period: Retire(< e)
//! ```
//!
//! Invariant: a side switches its outbound to `e` only after both sides installed inbound `e`
//! (the leader learns it from the ack, the follower from the commit), and retires an epoch only
//! a grace period after the other side stopped sending with it. So no packet is ever sent
//! under a key the receiver lacks.
//!
//! A packet sealed just before the other side's switch can still wait in this side's socket or
//! datapath queues when the grace period ends: a userspace datapath on a starved CPU has been
//! seen seconds behind its socket. So an epoch is retired only once it has also gone quiet: the
//! caller reports [`Rotation::note_inbound`] whenever the datapath's count of packets
//! authenticated under a [retiring](Rotation::retiring) epoch grew, and the epoch goes when
//! none arrived for [`RetireHold::quiet`], at the latest [`RetireHold::max_hold`] after
//! its grace period (a peer that keeps sending with a superseded key cannot hold it forever).
//! A caller whose datapath has no per-epoch counts reports nothing, and retirement is at the
//! end of the grace period. Only the leader starts rotations; a follower asks with
//! [`RotationMsg::Request`], so the two never race. Messages are idempotent and re-sent while
//! a phase waits, so duplicates and losses are harmless; a peer that does not answer leaves the
//! rotation waiting (it is reported stuck), never half-switched.
//!
//! The first epoch of a session is installed the same way (the leader prepares it at once),
//! so a reconnecting pair keeps using its previous session's keys until both ends hold the new
//! ones.

use crate::Epoch;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// Which end of the pair drives rotations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// Starts rotations (the node that dials the control connection).
    Leader,
    /// Follows the leader, and asks it to rotate when a trigger fires locally.
    Follower,
}

/// Rotation messages carried over the control channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase", deny_unknown_fields)]
pub enum RotationMsg {
    /// Follower to leader: please rotate up to `epoch`.
    Request {
        /// The epoch the follower wants to reach.
        epoch: Epoch,
    },
    /// Leader to follower: install inbound keys of `epoch`.
    Prepare {
        /// The next epoch.
        epoch: Epoch,
    },
    /// Follower to leader: inbound keys of `epoch` are installed.
    Ack {
        /// The prepared epoch.
        epoch: Epoch,
    },
    /// Leader to follower: both ends hold `epoch`; the leader now sends with it.
    Commit {
        /// The committed epoch.
        epoch: Epoch,
    },
    /// Follower to leader: the follower now sends with `epoch` too.
    Committed {
        /// The committed epoch.
        epoch: Epoch,
    },
}

/// What the caller must do, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Send this message to the peer.
    Send(RotationMsg),
    /// Derive the keys of this epoch and install them for receiving (keep everything else).
    InstallInbound(Epoch),
    /// Send with this epoch's keys from now on (its inbound keys are already installed).
    SwitchOutbound(Epoch),
    /// Remove the keys of this epoch (no longer used by either side).
    Retire(Epoch),
}

/// Where a rotation stands, for status displays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// No rotation in progress.
    Idle,
    /// The follower asked the leader to rotate.
    Requested,
    /// Inbound keys of the next epoch installed here; waiting for the other side
    /// (leader: for the ack; follower: for the commit).
    Prepared,
    /// Leader only: the follower acknowledged; outbound switched and commit sent, waiting for
    /// the follower's confirmation.
    Acked,
    /// Both sides send with the new epoch; the old one is retired after the grace period.
    Committed,
}

impl Phase {
    /// Lower-case name, as shown in status.
    pub const fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Requested => "requested",
            Phase::Prepared => "prepared",
            Phase::Acked => "acked",
            Phase::Committed => "committed",
        }
    }
}

/// Timers of the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RotationTiming {
    /// How long an old epoch stays installed for receiving after the other side switched.
    pub grace: Duration,
    /// How long an old epoch past its grace period is kept while packets still arrive under
    /// it (see [`Rotation::note_inbound`]).
    pub hold: RetireHold,
    /// A phase that waits on the peer longer than this is reported stuck.
    pub stuck_after: Duration,
    /// Interval at which a waiting phase re-sends its message.
    pub resend: Duration,
}

impl Default for RotationTiming {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(10),
            hold: RetireHold::DEFAULT,
            stuck_after: Duration::from_secs(10),
            resend: Duration::from_secs(2),
        }
    }
}

/// How long old keys outlive their grace period while packets still arrive under them: a
/// packet sealed just before the sender switched can wait seconds in a lagging receiver's
/// queues. Shared by a rotation's retiring epochs and the agent's keys of an earlier session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetireHold {
    /// Retire only after no packet arrived for this long.
    pub quiet: Duration,
    /// Retire at the latest this long after the grace period ended.
    pub max_hold: Duration,
}

impl RetireHold {
    /// Quiet for 2 s, held at most 60 s past the grace period.
    pub const DEFAULT: RetireHold = RetireHold {
        quiet: Duration::from_secs(2),
        max_hold: Duration::from_secs(60),
    };

    /// Whether old keys whose grace period ends at `due`, and under which a packet last
    /// arrived at `last_seen` (`None`: none reported), are retired at `now`.
    pub fn retire_now(&self, due: Instant, last_seen: Option<Instant>, now: Instant) -> bool {
        let quiet = last_seen.is_none_or(|s| now.saturating_duration_since(s) >= self.quiet);
        now >= due && (quiet || now.saturating_duration_since(due) >= self.max_hold)
    }
}

/// An old epoch waiting to be retired.
#[derive(Clone, Copy, Debug)]
struct Retiring {
    epoch: Epoch,
    /// End of its grace period.
    at: Instant,
    /// When a packet under it was last reported (initially when it was scheduled).
    last_seen: Instant,
}

/// A message that cannot belong to this session's rotation: the peer is out of step.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "rotation message {msg:?} does not fit this side's state (outbound epoch {outbound:?}, pending {pending:?})"
)]
pub struct RotationError {
    /// The offending message.
    pub msg: RotationMsg,
    /// This side's outbound epoch.
    pub outbound: Option<Epoch>,
    /// The epoch in flight here, if any.
    pub pending: Option<Epoch>,
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    epoch: Epoch,
    phase: Phase,
    /// When `phase` was entered.
    since: Instant,
    last_sent: Instant,
}

/// A snapshot of one pair's rotation state, for status and `encctl rotate --wait`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Epoch this side sends with (`None` before the session's first epoch is committed).
    pub outbound: Option<Epoch>,
    /// Epochs this side accepts.
    pub inbound: Vec<Epoch>,
    /// The epoch being rotated to, if a rotation is in progress.
    pub target: Option<Epoch>,
    /// Phase of that rotation.
    pub phase: Phase,
    /// When the phase was entered.
    pub phase_since: Option<Instant>,
    /// Set when the phase has waited on the peer longer than the stuck threshold: since when.
    pub stuck_since: Option<Instant>,
    /// Rotations completed (old epoch retired) in this session.
    pub completed: u64,
    /// The last epoch whose rotation completed, and when.
    pub last_completed: Option<(Epoch, Instant)>,
}

/// The rotation state machine of one pair, for one control session.
#[derive(Clone, Debug)]
pub struct Rotation {
    side: Side,
    timing: RotationTiming,
    first: Epoch,
    outbound: Option<Epoch>,
    inbound: BTreeSet<Epoch>,
    pending: Option<Pending>,
    /// Epochs to retire, with their grace periods and last reported packets.
    retire: Vec<Retiring>,
    /// Leader: another rotation was asked for while one was running.
    queued: bool,
    /// Follower: the epoch asked for, and when the request was last sent.
    requested: Option<(Epoch, Instant)>,
    completed: u64,
    last_completed: Option<(Epoch, Instant)>,
}

impl Rotation {
    /// Starts the rotation state of a fresh session whose first epoch is `first` (both sides
    /// must pass the same value). The leader prepares `first` at once.
    pub fn new(
        side: Side,
        first: Epoch,
        timing: RotationTiming,
        now: Instant,
    ) -> (Self, Vec<Effect>) {
        let mut r = Self {
            side,
            timing,
            first,
            outbound: None,
            inbound: BTreeSet::new(),
            pending: None,
            retire: Vec::new(),
            queued: false,
            requested: None,
            completed: 0,
            last_completed: None,
        };
        let effects = match side {
            Side::Leader => r.prepare(first, now),
            Side::Follower => Vec::new(),
        };
        (r, effects)
    }

    /// Which side this is.
    pub fn side(&self) -> Side {
        self.side
    }

    /// The epoch this side sends with.
    pub fn outbound(&self) -> Option<Epoch> {
        self.outbound
    }

    /// The epochs this side accepts.
    pub fn inbound(&self) -> impl Iterator<Item = Epoch> + '_ {
        self.inbound.iter().copied()
    }

    /// Whether a rotation is in progress (or requested).
    pub fn in_progress(&self) -> bool {
        self.pending.is_some() || self.requested.is_some()
    }

    /// The epoch the next started rotation reaches.
    fn next_epoch(&self) -> Epoch {
        match self.outbound {
            Some(o) => Epoch(o.0.wrapping_add(1)),
            None => self.first,
        }
    }

    /// Asks for a rotation (a trigger fired or an operator asked). Returns the epoch that
    /// completes the request: a rotation already in flight that has not switched yet counts.
    pub fn start(&mut self, now: Instant) -> (Epoch, Vec<Effect>) {
        if let Some(p) = self.pending
            && p.phase <= Phase::Prepared
        {
            return (p.epoch, Vec::new());
        }
        match self.side {
            Side::Leader => {
                if let Some(p) = self.pending {
                    // Switched already; another rotation follows once this one retires.
                    self.queued = true;
                    return (Epoch(p.epoch.0.wrapping_add(1)), Vec::new());
                }
                let next = self.next_epoch();
                (next, self.prepare(next, now))
            }
            Side::Follower => {
                let want = match self.pending {
                    Some(p) => Epoch(p.epoch.0.wrapping_add(1)),
                    None => self.next_epoch(),
                };
                if let Some((e, _)) = self.requested
                    && e >= want
                {
                    return (e, Vec::new());
                }
                self.requested = Some((want, now));
                (
                    want,
                    vec![Effect::Send(RotationMsg::Request { epoch: want })],
                )
            }
        }
    }

    fn prepare(&mut self, epoch: Epoch, now: Instant) -> Vec<Effect> {
        self.pending = Some(Pending {
            epoch,
            phase: Phase::Prepared,
            since: now,
            last_sent: now,
        });
        self.inbound.insert(epoch);
        vec![
            Effect::InstallInbound(epoch),
            Effect::Send(RotationMsg::Prepare { epoch }),
        ]
    }

    fn out_of_step(&self, msg: RotationMsg) -> RotationError {
        RotationError {
            msg,
            outbound: self.outbound,
            pending: self.pending.map(|p| p.epoch),
        }
    }

    /// Handles one rotation message from the peer.
    pub fn on_message(
        &mut self,
        msg: RotationMsg,
        now: Instant,
    ) -> Result<Vec<Effect>, RotationError> {
        match (self.side, msg) {
            (Side::Leader, RotationMsg::Request { epoch }) => {
                let covered = self.outbound.is_some_and(|o| o >= epoch)
                    || self.pending.is_some_and(|p| p.epoch >= epoch);
                if covered {
                    return Ok(Vec::new());
                }
                if self.pending.is_some() {
                    self.queued = true;
                    return Ok(Vec::new());
                }
                let next = self.next_epoch();
                Ok(self.prepare(next, now))
            }
            (Side::Leader, RotationMsg::Ack { epoch }) => match self.pending {
                Some(p) if p.epoch == epoch && p.phase == Phase::Prepared => {
                    self.outbound = Some(epoch);
                    self.pending = Some(Pending {
                        phase: Phase::Acked,
                        since: now,
                        last_sent: now,
                        ..p
                    });
                    Ok(vec![
                        Effect::SwitchOutbound(epoch),
                        Effect::Send(RotationMsg::Commit { epoch }),
                    ])
                }
                // A duplicate of an ack already acted on.
                _ if self.outbound.is_some_and(|o| o >= epoch) => Ok(Vec::new()),
                _ => Err(self.out_of_step(msg)),
            },
            (Side::Leader, RotationMsg::Committed { epoch }) => match self.pending {
                Some(p) if p.epoch == epoch && p.phase == Phase::Acked => {
                    self.pending = Some(Pending {
                        phase: Phase::Committed,
                        since: now,
                        ..p
                    });
                    self.schedule_retire(epoch, now);
                    Ok(Vec::new())
                }
                _ if self.outbound.is_some_and(|o| o >= epoch) => Ok(Vec::new()),
                _ => Err(self.out_of_step(msg)),
            },
            (Side::Follower, RotationMsg::Prepare { epoch }) => {
                if self
                    .pending
                    .is_some_and(|p| p.epoch == epoch && p.phase == Phase::Prepared)
                    || self.outbound.is_some_and(|o| o >= epoch)
                {
                    // Duplicate: the keys are installed; say so again.
                    return Ok(vec![Effect::Send(RotationMsg::Ack { epoch })]);
                }
                if epoch != self.next_epoch() {
                    return Err(self.out_of_step(msg));
                }
                if self.requested.is_some_and(|(e, _)| e <= epoch) {
                    self.requested = None;
                }
                if let Some(done) = self.pending.filter(|p| p.phase == Phase::Committed) {
                    // The previous rotation switched; only its retirement is left, which
                    // runs on its own timer.
                    self.completed += 1;
                    self.last_completed = Some((done.epoch, now));
                }
                self.pending = Some(Pending {
                    epoch,
                    phase: Phase::Prepared,
                    since: now,
                    last_sent: now,
                });
                self.inbound.insert(epoch);
                Ok(vec![
                    Effect::InstallInbound(epoch),
                    Effect::Send(RotationMsg::Ack { epoch }),
                ])
            }
            (Side::Follower, RotationMsg::Commit { epoch }) => match self.pending {
                Some(p) if p.epoch == epoch && p.phase == Phase::Prepared => {
                    self.outbound = Some(epoch);
                    self.pending = Some(Pending {
                        phase: Phase::Committed,
                        since: now,
                        ..p
                    });
                    self.schedule_retire(epoch, now);
                    Ok(vec![
                        Effect::SwitchOutbound(epoch),
                        Effect::Send(RotationMsg::Committed { epoch }),
                    ])
                }
                _ if self.outbound.is_some_and(|o| o >= epoch) => {
                    Ok(vec![Effect::Send(RotationMsg::Committed { epoch })])
                }
                _ => Err(self.out_of_step(msg)),
            },
            _ => Err(self.out_of_step(msg)),
        }
    }

    /// Every inbound epoch older than `epoch` goes `grace` from now.
    fn schedule_retire(&mut self, epoch: Epoch, now: Instant) {
        let at = now + self.timing.grace;
        for e in self.inbound.iter().copied().filter(|e| *e < epoch) {
            if !self.retire.iter().any(|r| r.epoch == e) {
                self.retire.push(Retiring {
                    epoch: e,
                    at,
                    last_seen: now,
                });
            }
        }
    }

    /// The old epochs waiting to be retired: those whose inbound packets the caller should
    /// watch and report with [`Rotation::note_inbound`].
    pub fn retiring(&self) -> impl Iterator<Item = Epoch> + '_ {
        self.retire.iter().map(|r| r.epoch)
    }

    /// Packets authenticated under `epoch` arrived (the datapath's count for it grew since the
    /// last report): a retiring epoch then stays until it has been quiet for
    /// [`RetireHold::quiet`]. Ignored for an epoch that is not retiring.
    pub fn note_inbound(&mut self, epoch: Epoch, now: Instant) {
        if let Some(r) = self.retire.iter_mut().find(|r| r.epoch == epoch) {
            r.last_seen = r.last_seen.max(now);
        }
    }

    /// Advances timers: retirement after the grace period once quiet, re-sends while waiting.
    pub fn on_tick(&mut self, now: Instant) -> Vec<Effect> {
        let mut effects = Vec::new();
        let t = self.timing;
        let due: Vec<Epoch> = self
            .retire
            .iter()
            .filter(|r| t.hold.retire_now(r.at, Some(r.last_seen), now))
            .map(|r| r.epoch)
            .collect();
        for e in due {
            self.retire.retain(|r| r.epoch != e);
            self.inbound.remove(&e);
            effects.push(Effect::Retire(e));
        }
        if let Some(p) = self.pending
            && p.phase == Phase::Committed
            && self.retire.is_empty()
        {
            self.pending = None;
            self.completed += 1;
            self.last_completed = Some((p.epoch, now));
            if self.side == Side::Leader && std::mem::take(&mut self.queued) {
                let next = self.next_epoch();
                effects.extend(self.prepare(next, now));
            }
        }
        if let Some(p) = self.pending.as_mut()
            && now.saturating_duration_since(p.last_sent) >= self.timing.resend
        {
            let msg = match (self.side, p.phase) {
                (Side::Leader, Phase::Prepared) => Some(RotationMsg::Prepare { epoch: p.epoch }),
                (Side::Leader, Phase::Acked) => Some(RotationMsg::Commit { epoch: p.epoch }),
                _ => None,
            };
            if let Some(m) = msg {
                p.last_sent = now;
                effects.push(Effect::Send(m));
            }
        }
        if let Some((e, sent)) = self.requested
            && now.saturating_duration_since(sent) >= self.timing.resend
        {
            self.requested = Some((e, now));
            effects.push(Effect::Send(RotationMsg::Request { epoch: e }));
        }
        effects
    }

    /// Where the rotation stands.
    pub fn progress(&self, now: Instant) -> Progress {
        let (target, phase, since) = match (self.pending, self.requested) {
            (Some(p), _) => (Some(p.epoch), p.phase, Some(p.since)),
            (None, Some((e, at))) => (Some(e), Phase::Requested, Some(at)),
            (None, None) => (None, Phase::Idle, None),
        };
        // Waiting on the peer: the leader for an ack or a confirmation, the follower for a
        // commit or for the leader to act on its request.
        let waiting = matches!(
            (self.side, phase),
            (Side::Leader, Phase::Prepared | Phase::Acked)
                | (Side::Follower, Phase::Prepared | Phase::Requested)
        );
        let stuck_since = since
            .filter(|s| waiting && now.saturating_duration_since(*s) >= self.timing.stuck_after);
        Progress {
            outbound: self.outbound,
            inbound: self.inbound.iter().copied().collect(),
            target,
            phase,
            phase_since: since,
            stuck_since,
            completed: self.completed,
            last_completed: self.last_completed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    const T: RotationTiming = RotationTiming {
        grace: Duration::from_secs(3),
        hold: RetireHold {
            quiet: Duration::from_secs(1),
            max_hold: Duration::from_secs(20),
        },
        stuck_after: Duration::from_secs(10),
        resend: Duration::from_secs(2),
    };

    /// Two ends and the messages in flight between them, with each side's installed keys
    /// tracked as the datapath would hold them.
    struct Pair {
        t: Instant,
        a: Rotation,
        b: Rotation,
        a_to_b: VecDeque<RotationMsg>,
        b_to_a: VecDeque<RotationMsg>,
        /// Installed inbound epochs and outbound epoch, per side, as the datapath holds them.
        a_keys: (BTreeSet<Epoch>, Option<Epoch>),
        b_keys: (BTreeSet<Epoch>, Option<Epoch>),
    }

    fn apply(
        effects: Vec<Effect>,
        keys: &mut (BTreeSet<Epoch>, Option<Epoch>),
        out: &mut VecDeque<RotationMsg>,
    ) {
        for e in effects {
            match e {
                Effect::Send(m) => out.push_back(m),
                Effect::InstallInbound(ep) => {
                    keys.0.insert(ep);
                }
                Effect::SwitchOutbound(ep) => {
                    assert!(keys.0.contains(&ep), "switch to {ep} before installing it");
                    keys.1 = Some(ep);
                }
                Effect::Retire(ep) => {
                    assert_ne!(keys.1, Some(ep), "retired the outbound epoch {ep}");
                    keys.0.remove(&ep);
                }
            }
        }
    }

    impl Pair {
        fn new(first: Epoch) -> Self {
            let t = Instant::now();
            let (a, ea) = Rotation::new(Side::Leader, first, T, t);
            let (b, eb) = Rotation::new(Side::Follower, first, T, t);
            let mut p = Self {
                t,
                a,
                b,
                a_to_b: VecDeque::new(),
                b_to_a: VecDeque::new(),
                a_keys: Default::default(),
                b_keys: Default::default(),
            };
            apply(ea, &mut p.a_keys, &mut p.a_to_b);
            apply(eb, &mut p.b_keys, &mut p.b_to_a);
            p
        }

        fn deliver_to_b(&mut self) -> bool {
            let Some(m) = self.a_to_b.pop_front() else {
                return false;
            };
            let e = self.b.on_message(m, self.t).expect("follower refused");
            apply(e, &mut self.b_keys, &mut self.b_to_a);
            true
        }

        fn deliver_to_a(&mut self) -> bool {
            let Some(m) = self.b_to_a.pop_front() else {
                return false;
            };
            let e = self.a.on_message(m, self.t).expect("leader refused");
            apply(e, &mut self.a_keys, &mut self.a_to_b);
            true
        }

        fn tick(&mut self, dt: Duration) {
            self.t += dt;
            let e = self.a.on_tick(self.t);
            apply(e, &mut self.a_keys, &mut self.a_to_b);
            let e = self.b.on_tick(self.t);
            apply(e, &mut self.b_keys, &mut self.b_to_a);
        }

        /// Nothing either side sends is undecryptable by the other.
        fn check(&self) {
            if let Some(o) = self.a_keys.1 {
                assert!(
                    self.b_keys.0.contains(&o),
                    "A sends {o}, B holds {:?}",
                    self.b_keys.0
                );
            }
            if let Some(o) = self.b_keys.1 {
                assert!(
                    self.a_keys.0.contains(&o),
                    "B sends {o}, A holds {:?}",
                    self.a_keys.0
                );
            }
            // The machines' view matches what was installed.
            assert_eq!(self.a.outbound(), self.a_keys.1);
            assert_eq!(self.b.outbound(), self.b_keys.1);
            assert_eq!(self.a.inbound().collect::<BTreeSet<_>>(), self.a_keys.0);
            assert_eq!(self.b.inbound().collect::<BTreeSet<_>>(), self.b_keys.0);
        }

        /// Delivers everything and runs the clock until both sides are idle.
        fn settle(&mut self) {
            for _ in 0..100 {
                while self.deliver_to_b() || self.deliver_to_a() {
                    self.check();
                }
                if !self.a.in_progress() && !self.b.in_progress() {
                    return;
                }
                self.tick(Duration::from_secs(1));
                self.check();
            }
            panic!(
                "did not settle: {:?} / {:?}",
                self.a.progress(self.t),
                self.b.progress(self.t)
            );
        }
    }

    #[test]
    fn first_epoch_then_one_rotation() {
        let mut p = Pair::new(Epoch(5));
        p.settle();
        assert_eq!((p.a_keys.1, p.b_keys.1), (Some(Epoch(5)), Some(Epoch(5))));
        let (target, _) = {
            let t = p.t;
            let (e, fx) = p.a.start(t);
            apply(fx, &mut p.a_keys, &mut p.a_to_b);
            (e, ())
        };
        assert_eq!(target, Epoch(6));
        assert_eq!(p.a.progress(p.t).phase, Phase::Prepared);
        p.deliver_to_b();
        assert_eq!(p.b.progress(p.t).phase, Phase::Prepared);
        p.deliver_to_a();
        assert_eq!(p.a.progress(p.t).phase, Phase::Acked);
        assert_eq!(p.a_keys.1, Some(Epoch(6)));
        p.check();
        p.deliver_to_b();
        p.deliver_to_a();
        assert_eq!(p.a.progress(p.t).phase, Phase::Committed);
        // Both still accept 5 during the grace period.
        assert!(p.a_keys.0.contains(&Epoch(5)) && p.b_keys.0.contains(&Epoch(5)));
        p.tick(T.grace);
        p.check();
        assert_eq!(p.a_keys.0, BTreeSet::from([Epoch(6)]));
        assert_eq!(p.b_keys.0, BTreeSet::from([Epoch(6)]));
        let pr = p.a.progress(p.t);
        assert_eq!((pr.phase, pr.completed), (Phase::Idle, 2));
        assert_eq!(pr.last_completed.map(|(e, _)| e), Some(Epoch(6)));
    }

    /// Commits one rotation from 1 to 2 and returns the pair with epoch 1 retiring on both sides.
    fn committed_pair() -> Pair {
        let mut p = Pair::new(Epoch(1));
        p.settle();
        let t = p.t;
        let (_, fx) = p.a.start(t);
        apply(fx, &mut p.a_keys, &mut p.a_to_b);
        while p.deliver_to_b() || p.deliver_to_a() {}
        assert_eq!(p.a.retiring().collect::<Vec<_>>(), vec![Epoch(1)]);
        assert_eq!(p.b.retiring().collect::<Vec<_>>(), vec![Epoch(1)]);
        p
    }

    #[test]
    fn an_old_epoch_still_receiving_is_kept_until_quiet() {
        let mut p = committed_pair();
        let t0 = p.t;
        // B's datapath still opens packets under epoch 1 until 2.5 s past the grace period.
        let step = Duration::from_millis(250);
        while p.t < t0 + T.grace + Duration::from_millis(2500) {
            let t = p.t;
            p.b.note_inbound(Epoch(1), t);
            p.tick(step);
            p.check();
            assert!(p.b_keys.0.contains(&Epoch(1)), "retired at {:?}", p.t - t0);
        }
        let last = p.t - step;
        // A heard nothing more and retired at the end of the grace period.
        assert_eq!(p.a_keys.0, BTreeSet::from([Epoch(2)]));
        // B retires once epoch 1 has been quiet for `quiet`, and only then completes.
        assert_eq!(p.b.progress(p.t).phase, Phase::Committed);
        while p.t < last + T.hold.quiet - step {
            p.tick(step);
            assert!(p.b_keys.0.contains(&Epoch(1)));
        }
        p.tick(step);
        assert_eq!(p.b_keys.0, BTreeSet::from([Epoch(2)]));
        assert_eq!(p.b.retiring().count(), 0);
        // Reports for an epoch that is not retiring change nothing.
        let t = p.t;
        p.b.note_inbound(Epoch(2), t);
        p.b.note_inbound(Epoch(1), t);
        assert_eq!(p.b.retiring().count(), 0);
        p.settle();
        assert_eq!(
            p.b.progress(p.t).last_completed.map(|(e, _)| e),
            Some(Epoch(2))
        );
    }

    #[test]
    fn an_old_epoch_that_never_goes_quiet_is_retired_after_max_hold() {
        let mut p = committed_pair();
        let t0 = p.t;
        let step = Duration::from_millis(500);
        while p.b_keys.0.contains(&Epoch(1)) {
            let t = p.t;
            p.b.note_inbound(Epoch(1), t);
            p.tick(step);
            p.check();
            assert!(
                p.t - t0 <= T.grace + T.hold.max_hold,
                "still held at {:?}",
                p.t - t0
            );
        }
        assert_eq!(p.t - t0, T.grace + T.hold.max_hold);
    }

    #[test]
    fn follower_requests_and_leader_rotates() {
        let mut p = Pair::new(Epoch(1));
        p.settle();
        let t = p.t;
        let (want, fx) = p.b.start(t);
        assert_eq!(want, Epoch(2));
        apply(fx, &mut p.b_keys, &mut p.b_to_a);
        assert_eq!(p.b.progress(t).phase, Phase::Requested);
        // A second request while the first is pending asks for nothing new.
        assert_eq!(p.b.start(t).1, vec![]);
        p.settle();
        assert_eq!(p.a_keys.1, Some(Epoch(2)));
        assert_eq!(
            p.b.progress(p.t).last_completed.map(|(e, _)| e),
            Some(Epoch(2))
        );
    }

    #[test]
    fn silent_follower_is_stuck_and_nothing_switches() {
        let mut p = Pair::new(Epoch(1));
        p.settle();
        let t = p.t;
        let (_, fx) = p.a.start(t);
        apply(fx, &mut p.a_keys, &mut p.a_to_b);
        // The follower is paused: nothing is delivered for 30 s.
        for _ in 0..30 {
            p.tick(Duration::from_secs(1));
            p.check();
        }
        let pr = p.a.progress(p.t);
        assert_eq!(pr.phase, Phase::Prepared);
        assert_eq!(pr.stuck_since, Some(t));
        assert_eq!(p.a_keys.1, Some(Epoch(1)));
        // Resumed: the queued prepares are answered and the rotation completes.
        p.settle();
        assert_eq!((p.a_keys.1, p.b_keys.1), (Some(Epoch(2)), Some(Epoch(2))));
        assert_eq!(p.a.progress(p.t).stuck_since, None);
    }

    #[test]
    fn starting_during_a_rotation_queues_one_more() {
        let mut p = Pair::new(Epoch(1));
        p.settle();
        let t = p.t;
        let (e1, fx) = p.a.start(t);
        apply(fx, &mut p.a_keys, &mut p.a_to_b);
        // Not yet switched: the same rotation satisfies a second request.
        assert_eq!(p.a.start(t), (e1, vec![]));
        p.deliver_to_b();
        p.deliver_to_a();
        // Switched: another one is queued.
        assert_eq!(p.a.start(t).0, Epoch(3));
        p.settle();
        assert_eq!((p.a_keys.1, p.b_keys.1), (Some(Epoch(3)), Some(Epoch(3))));
    }

    #[test]
    fn out_of_step_messages_are_refused() {
        let t = Instant::now();
        let (mut b, _) = Rotation::new(Side::Follower, Epoch(1), T, t);
        let err = b
            .on_message(RotationMsg::Prepare { epoch: Epoch(7) }, t)
            .unwrap_err();
        assert!(err.to_string().contains("Prepare"), "{err}");
        assert!(
            b.on_message(RotationMsg::Commit { epoch: Epoch(1) }, t)
                .is_err()
        );
        assert!(
            b.on_message(RotationMsg::Ack { epoch: Epoch(1) }, t)
                .is_err()
        );
        let (mut a, _) = Rotation::new(Side::Leader, Epoch(1), T, t);
        assert!(
            a.on_message(RotationMsg::Ack { epoch: Epoch(2) }, t)
                .is_err()
        );
        assert!(
            a.on_message(RotationMsg::Prepare { epoch: Epoch(1) }, t)
                .is_err()
        );
    }

    #[test]
    fn messages_serialise_with_a_kind_tag() {
        let m = RotationMsg::Prepare { epoch: Epoch(3) };
        let s = serde_json::to_string(&m).unwrap();
        assert_eq!(s, r#"{"kind":"prepare","epoch":3}"#);
        assert_eq!(serde_json::from_str::<RotationMsg>(&s).unwrap(), m);
    }

    #[derive(Clone, Debug)]
    enum Op {
        DeliverToB,
        DeliverToA,
        DropToB,
        DropToA,
        DupToB,
        DupToA,
        Tick(u64),
        StartA,
        StartB,
        Restart,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::DeliverToB),
            4 => Just(Op::DeliverToA),
            1 => Just(Op::DropToB),
            1 => Just(Op::DropToA),
            1 => Just(Op::DupToB),
            1 => Just(Op::DupToA),
            3 => (0u64..4000).prop_map(Op::Tick),
            2 => Just(Op::StartA),
            2 => Just(Op::StartB),
            1 => Just(Op::Restart),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Datapaths that open packets up to 10 s after they were sent (longer than the grace
        /// period, shorter than the hold cap) lose none across rotations when they report what
        /// they open, and every rotation still completes.
        #[test]
        fn lagging_datapaths_lose_nothing(
            lag_a in 0u64..10_000,
            lag_b in 0u64..10_000,
            rotations in 1u32..4,
            by_follower in any::<bool>(),
        ) {
            let mut p = Pair::new(Epoch(1));
            p.settle();
            let step = Duration::from_millis(250);
            let (lag_a, lag_b) = (Duration::from_millis(lag_a), Duration::from_millis(lag_b));
            // Data in flight to each side: when its datapath opens it, and under which epoch.
            let mut to_a: VecDeque<(Instant, Epoch)> = VecDeque::new();
            let mut to_b: VecDeque<(Instant, Epoch)> = VecDeque::new();
            let mut started = 0;
            for i in 0..(rotations * 120 + 200) {
                if i % 120 == 0 && started < rotations {
                    started += 1;
                    let t = p.t;
                    if by_follower {
                        let (_, fx) = p.b.start(t);
                        apply(fx, &mut p.b_keys, &mut p.b_to_a);
                    } else {
                        let (_, fx) = p.a.start(t);
                        apply(fx, &mut p.a_keys, &mut p.a_to_b);
                    }
                }
                while p.deliver_to_b() || p.deliver_to_a() {}
                let t = p.t;
                if let Some(o) = p.a_keys.1 { to_b.push_back((t + lag_b, o)); }
                if let Some(o) = p.b_keys.1 { to_a.push_back((t + lag_a, o)); }
                while let Some(&(at, e)) = to_b.front().filter(|(at, _)| *at <= t) {
                    to_b.pop_front();
                    prop_assert!(p.b_keys.0.contains(&e), "B lost a packet of {} sent at {:?}", e, at - lag_b);
                    p.b.note_inbound(e, t);
                }
                while let Some(&(at, e)) = to_a.front().filter(|(at, _)| *at <= t) {
                    to_a.pop_front();
                    prop_assert!(p.a_keys.0.contains(&e), "A lost a packet of {} sent at {:?}", e, at - lag_a);
                    p.a.note_inbound(e, t);
                }
                p.tick(step);
                p.check();
            }
            prop_assert!(!p.a.in_progress() && !p.b.in_progress());
            let top = Epoch(1 + rotations);
            prop_assert_eq!(&p.a_keys.0, &BTreeSet::from([top]));
            prop_assert_eq!(&p.b_keys.0, &BTreeSet::from([top]));
        }

        /// Any interleaving of deliveries, losses, duplicates, triggers, clock steps and
        /// session restarts never lets a side send under an epoch the other does not hold,
        /// and once the link delivers again both sides end on one epoch with nothing else
        /// installed.
        #[test]
        fn any_interleaving_converges(ops in proptest::collection::vec(op(), 0..120)) {
            let mut p = Pair::new(Epoch(1));
            for op in ops {
                match op {
                    Op::DeliverToB => { p.deliver_to_b(); }
                    Op::DeliverToA => { p.deliver_to_a(); }
                    Op::DropToB => { p.a_to_b.pop_front(); }
                    Op::DropToA => { p.b_to_a.pop_front(); }
                    Op::DupToB => if let Some(m) = p.a_to_b.front().copied() { p.a_to_b.push_front(m) },
                    Op::DupToA => if let Some(m) = p.b_to_a.front().copied() { p.b_to_a.push_front(m) },
                    Op::Tick(ms) => p.tick(Duration::from_millis(ms)),
                    Op::StartA => {
                        let t = p.t;
                        let (_, fx) = p.a.start(t);
                        apply(fx, &mut p.a_keys, &mut p.a_to_b);
                    }
                    Op::StartB => {
                        let t = p.t;
                        let (_, fx) = p.b.start(t);
                        apply(fx, &mut p.b_keys, &mut p.b_to_a);
                    }
                    Op::Restart => {
                        // The session ends; a new one starts above both sides' epochs, as the
                        // agents agree in their hellos. (Keys of the old session belong to
                        // the old session; the agent retires them separately.)
                        let top = [p.a.outbound(), p.b.outbound()].into_iter().flatten().max().unwrap_or(Epoch(0));
                        let t = p.t;
                        let mut fresh = Pair::new(Epoch(top.0 + 1));
                        fresh.t = t;
                        p = fresh;
                    }
                }
                p.check();
            }
            p.settle();
            prop_assert_eq!(p.a_keys.1, p.b_keys.1);
            let o = p.a_keys.1.unwrap();
            prop_assert_eq!(&p.a_keys.0, &BTreeSet::from([o]));
            prop_assert_eq!(&p.b_keys.0, &BTreeSet::from([o]));
        }
    }
}
