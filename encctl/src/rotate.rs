//! `encctl rotate`: start a key rotation and, with `--wait`, follow it to the end.
//!
//! Progress is read from the peers API: each peer's [`RotationInfo`] says which epoch this
//! node sends with, which it accepts, and the phase of the rotation in flight. [`advance`]
//! turns one reading into the steps a peer newly reached, so that a peer that moved several
//! steps between two polls still shows every step, in order.

use crate::client::Client;
use enc_api::{PeerInfo, RotateResponse, RotationInfo, RotationStarted};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How often `--wait` polls the peers API.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// The steps of one rotation as `encctl rotate --wait` shows them, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Step {
    /// The new epoch's inbound keys are installed here.
    Prepared,
    /// Both ends hold the new epoch (a follower never reports it; it passes it on commit).
    Acked,
    /// This node sends with the new epoch.
    Committed,
    /// The old epoch's keys are removed: the rotation is complete.
    Retired,
}

impl Step {
    /// Every step, in order.
    pub const ALL: [Step; 4] = [Step::Prepared, Step::Acked, Step::Committed, Step::Retired];

    /// Lower-case name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Step::Prepared => "prepared",
            Step::Acked => "acked",
            Step::Committed => "committed",
            Step::Retired => "retired",
        }
    }
}

/// The furthest step a rotation to `target` has reached, according to `info`.
pub fn reached(info: &RotationInfo, target: u32) -> Option<Step> {
    if info.last_completed_epoch.is_some_and(|e| e >= target) {
        return Some(Step::Retired);
    }
    let mut step = None;
    if info.inbound_epochs.iter().any(|e| *e >= target) {
        step = Some(Step::Prepared);
    }
    if info.outbound_epoch.is_some_and(|o| o >= target) {
        // The leader switches on the ack, the follower on the commit.
        let s = if info.side == "follower" {
            Step::Committed
        } else {
            Step::Acked
        };
        step = step.max(Some(s));
    }
    if let Some(t) = info.target_epoch {
        let by_phase = match info.phase.as_str() {
            "prepared" => Some(Step::Prepared),
            "acked" => Some(Step::Acked),
            "committed" => Some(Step::Committed),
            _ => None,
        };
        if t == target {
            step = step.max(by_phase);
        } else if t > target && by_phase.is_some() {
            // Only one rotation runs at a time: a later one has started, so ours switched.
            step = step.max(Some(Step::Committed));
        }
    }
    step
}

/// The steps to print for a peer whose last printed step was `prev`, given a new reading:
/// every step after `prev` up to the one reached, in order (empty if nothing new).
pub fn advance(prev: Option<Step>, info: &RotationInfo, target: u32) -> Vec<Step> {
    let Some(now) = reached(info, target) else {
        return Vec::new();
    };
    Step::ALL
        .into_iter()
        .filter(|s| Some(*s) > prev && *s <= now)
        .collect()
}

/// What `--wait` knows about one peer's rotation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tracked {
    /// The rotation the agent started.
    pub started: RotationStarted,
    /// The last step printed.
    pub step: Option<Step>,
    /// The peer's session is gone (no rotation state reported).
    pub session_down: bool,
    /// The stuck text of the last reading.
    pub stuck: Option<String>,
}

impl Tracked {
    fn new(started: RotationStarted) -> Self {
        Self {
            started,
            step: None,
            session_down: false,
            stuck: None,
        }
    }

    /// Whether the rotation is complete.
    pub fn done(&self) -> bool {
        self.step == Some(Step::Retired)
    }

    fn why_unfinished(&self) -> String {
        let mut s = format!(
            "{} (last step: {}",
            self.started.peer,
            self.step.map_or("none", Step::as_str)
        );
        if self.session_down {
            s.push_str("; session down");
        }
        if let Some(stuck) = &self.stuck {
            s.push_str("; ");
            s.push_str(stuck);
        }
        s.push(')');
        s
    }
}

/// An event worth a progress line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The peer reached a step.
    Step(Step),
    /// The peer's session went away.
    SessionDown,
    /// The peer's session is back.
    SessionUp,
}

impl Event {
    fn text(&self) -> &'static str {
        match self {
            Event::Step(s) => s.as_str(),
            Event::SessionDown => "session down (waiting for it to come back)",
            Event::SessionUp => "session back",
        }
    }
}

/// Applies one reading of the peers API to the tracked rotations; returns the events per
/// peer, in the order of `tracked`.
pub fn observe(tracked: &mut [Tracked], peers: &[PeerInfo]) -> Vec<(usize, Event)> {
    let by_name: BTreeMap<&str, &PeerInfo> = peers.iter().map(|p| (p.name.as_str(), p)).collect();
    let mut events = Vec::new();
    for (i, t) in tracked.iter_mut().enumerate() {
        if t.done() {
            continue;
        }
        let info = by_name
            .get(t.started.peer.as_str())
            .and_then(|p| p.rotation.as_ref());
        match info {
            None => {
                if !t.session_down {
                    t.session_down = true;
                    t.stuck = None;
                    events.push((i, Event::SessionDown));
                }
            }
            Some(info) => {
                if std::mem::take(&mut t.session_down) {
                    events.push((i, Event::SessionUp));
                }
                for s in advance(t.step, info, t.started.target_epoch) {
                    t.step = Some(s);
                    events.push((i, Event::Step(s)));
                }
                t.stuck = if t.done() { None } else { info.stuck.clone() };
            }
        }
    }
    events
}

/// One line of the final JSON of `--wait -o json`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    /// Peer node name.
    pub peer: String,
    /// Epoch in use when the rotation was requested.
    pub from_epoch: Option<u32>,
    /// Epoch the rotation reaches.
    pub target_epoch: u32,
    /// Whether the old keys are retired.
    pub done: bool,
    /// The last step reached.
    pub last_step: Option<Step>,
    /// Why the rotation waits, if the agent says it is stuck.
    pub stuck: Option<String>,
}

/// The final JSON of `--wait -o json`.
#[derive(Clone, Debug, Serialize)]
pub struct Outcomes {
    /// One entry per peer, in the order the agent listed them.
    pub rotations: Vec<Outcome>,
}

fn outcomes(tracked: &[Tracked]) -> Outcomes {
    Outcomes {
        rotations: tracked
            .iter()
            .map(|t| Outcome {
                peer: t.started.peer.clone(),
                from_epoch: t.started.from_epoch,
                target_epoch: t.started.target_epoch,
                done: t.done(),
                last_step: t.step,
                stuck: t.stuck.clone(),
            })
            .collect(),
    }
}

/// `peer  epoch 3 -> 4`, with the peer name padded to `width`.
fn head(r: &RotationStarted, width: usize) -> String {
    format!(
        "{:<width$}  epoch {} -> {}",
        r.peer,
        r.from_epoch
            .map_or_else(|| "-".to_owned(), |e| e.to_string()),
        r.target_epoch
    )
}

/// The lines printed when the agent accepted the request.
pub fn started_text(resp: &RotateResponse) -> String {
    let width = resp
        .rotations
        .iter()
        .map(|r| r.peer.len())
        .max()
        .unwrap_or(0);
    resp.rotations
        .iter()
        .map(|r| format!("{}  started\n", head(r, width)))
        .collect()
}

/// The error of a wait that timed out, naming every unfinished peer.
pub fn timeout_error(tracked: &[Tracked], timeout: Duration) -> String {
    let unfinished: Vec<String> = tracked
        .iter()
        .filter(|t| !t.done())
        .map(Tracked::why_unfinished)
        .collect();
    format!(
        "rotation did not finish for {} within {} (--timeout)",
        unfinished.join(", "),
        humantime::format_duration(timeout)
    )
}

/// Polls the peers API until every rotation in `resp` is retired or `timeout` passes.
/// Text output prints a line per step; JSON output prints the outcome at the end.
pub fn wait(
    client: &Client,
    resp: &RotateResponse,
    timeout: Duration,
    json: bool,
    started: Instant,
) -> anyhow::Result<()> {
    let width = resp
        .rotations
        .iter()
        .map(|r| r.peer.len())
        .max()
        .unwrap_or(0);
    let mut tracked: Vec<Tracked> = resp.rotations.iter().cloned().map(Tracked::new).collect();
    let deadline = started + timeout;
    loop {
        let peers: enc_api::Peers = client.get(enc_api::PEERS_PATH)?;
        let elapsed = started.elapsed();
        for (i, ev) in observe(&mut tracked, &peers.peers) {
            if !json {
                println!(
                    "{}  {}  ({:.1}s)",
                    head(&tracked[i].started, width),
                    ev.text(),
                    elapsed.as_secs_f64()
                );
            }
        }
        if tracked.iter().all(Tracked::done) {
            if json {
                println!("{}", serde_json::to_string_pretty(&outcomes(&tracked))?);
            } else {
                println!(
                    "rotation complete with {} peer(s) ({:.1}s)",
                    tracked.len(),
                    elapsed.as_secs_f64()
                );
            }
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            if json {
                println!("{}", serde_json::to_string_pretty(&outcomes(&tracked))?);
            }
            anyhow::bail!("{}", timeout_error(&tracked, timeout));
        }
        std::thread::sleep(POLL_INTERVAL.min(deadline - now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(side: &str, phase: &str, out: Option<u32>, inbound: &[u32]) -> RotationInfo {
        RotationInfo {
            side: side.into(),
            outbound_epoch: out,
            inbound_epochs: inbound.to_vec(),
            phase: phase.into(),
            target_epoch: (phase != "idle").then_some(4),
            phase_age_seconds: Some(1),
            stuck: None,
            completed: 0,
            last_completed_epoch: None,
            last_completed_seconds_ago: None,
        }
    }

    fn done(side: &str, epoch: u32) -> RotationInfo {
        RotationInfo {
            last_completed_epoch: Some(epoch),
            completed: 1,
            ..info(side, "idle", Some(epoch), &[epoch])
        }
    }

    use Step::*;

    #[test]
    fn leader_steps_one_at_a_time() {
        let mut prev = None;
        let mut seen = Vec::new();
        for i in [
            info("leader", "idle", Some(3), &[3]),
            info("leader", "prepared", Some(3), &[3, 4]),
            info("leader", "prepared", Some(3), &[3, 4]),
            info("leader", "acked", Some(4), &[3, 4]),
            info("leader", "committed", Some(4), &[3, 4]),
            done("leader", 4),
        ] {
            let s = advance(prev, &i, 4);
            if let Some(l) = s.last() {
                prev = Some(*l);
            }
            seen.extend(s);
        }
        assert_eq!(seen, Step::ALL);
    }

    #[test]
    fn follower_passes_acked_on_commit() {
        assert_eq!(
            advance(
                Some(Prepared),
                &info("follower", "committed", Some(4), &[3, 4]),
                4
            ),
            [Acked, Committed]
        );
        assert_eq!(
            advance(None, &info("follower", "prepared", Some(3), &[3, 4]), 4),
            [Prepared]
        );
    }

    #[test]
    fn skipped_steps_are_all_reported_in_order() {
        assert_eq!(advance(None, &done("leader", 4), 4), Step::ALL);
        assert_eq!(
            advance(Some(Acked), &done("follower", 5), 4),
            [Committed, Retired]
        );
        assert_eq!(
            advance(None, &info("leader", "acked", Some(4), &[3, 4]), 4),
            [Prepared, Acked]
        );
    }

    #[test]
    fn nothing_new_and_never_backwards() {
        assert!(advance(None, &info("leader", "idle", Some(3), &[3]), 4).is_empty());
        assert!(
            advance(
                Some(Prepared),
                &info("leader", "prepared", Some(3), &[3, 4]),
                4
            )
            .is_empty()
        );
        // A new session that has not caught up does not undo what was printed.
        assert!(advance(Some(Committed), &info("leader", "idle", None, &[]), 4).is_empty());
        // The follower's request alone is no step.
        assert!(advance(None, &info("follower", "requested", Some(3), &[3]), 4).is_empty());
    }

    #[test]
    fn a_later_rotation_implies_ours_switched() {
        let mut i = info("leader", "prepared", Some(4), &[3, 4, 5]);
        i.target_epoch = Some(5);
        assert_eq!(advance(None, &i, 4), [Prepared, Acked, Committed]);
        // Only a request for a later epoch says nothing about ours.
        let mut i = info("follower", "requested", Some(3), &[3]);
        i.target_epoch = Some(5);
        assert!(advance(None, &i, 4).is_empty());
    }

    fn peer(name: &str, rotation: Option<RotationInfo>) -> PeerInfo {
        PeerInfo {
            name: name.into(),
            address: "10.0.0.2".parse().unwrap(),
            pod_cidr: "10.244.2.0/24".into(),
            role: "dial".into(),
            auth: enc_api::AuthState::Authenticated,
            state_age_seconds: 0,
            failures: 0,
            last_success_seconds: None,
            last_failure: None,
            certificate: None,
            key: None,
            wireguard: None,
            ipsec: None,
            rotation,
            datapath_id: 1,
            counters: Default::default(),
        }
    }

    fn tracked(name: &str) -> Tracked {
        Tracked::new(RotationStarted {
            peer: name.into(),
            from_epoch: Some(3),
            target_epoch: 4,
        })
    }

    #[test]
    fn observe_reports_steps_session_loss_and_stuck() {
        let mut t = vec![tracked("node-2"), tracked("node-3")];
        let mut stuck = info("follower", "prepared", Some(3), &[3, 4]);
        stuck.stuck = Some("rotation stuck: no commit since 2026-11-22T08:40:01Z (12s)".into());
        let ev = observe(
            &mut t,
            &[
                peer("node-2", Some(info("leader", "acked", Some(4), &[3, 4]))),
                peer("node-3", Some(stuck)),
            ],
        );
        assert_eq!(
            ev,
            [
                (0, Event::Step(Prepared)),
                (0, Event::Step(Acked)),
                (1, Event::Step(Prepared))
            ]
        );
        let ev = observe(
            &mut t,
            &[
                peer("node-2", Some(done("leader", 4))),
                peer("node-3", None),
            ],
        );
        assert_eq!(
            ev,
            [
                (0, Event::Step(Committed)),
                (0, Event::Step(Retired)),
                (1, Event::SessionDown)
            ]
        );
        // Down is reported once; a vanished peer counts as down too.
        assert!(observe(&mut t, &[peer("node-2", Some(done("leader", 4)))]).is_empty());
        assert!(t[0].done() && !t[1].done());
        let e = timeout_error(&t, Duration::from_secs(60));
        assert_eq!(
            e,
            "rotation did not finish for node-3 (last step: prepared; session down) within 1m (--timeout)"
        );
        let mut stuck = info("follower", "prepared", Some(3), &[3, 4]);
        stuck.stuck = Some("rotation stuck: no commit since 2026-11-22T08:40:01Z (12s)".into());
        let ev = observe(&mut t, &[peer("node-3", Some(stuck))]);
        assert_eq!(ev, [(1, Event::SessionUp)]);
        assert_eq!(
            timeout_error(&t, Duration::from_secs(5)),
            "rotation did not finish for node-3 (last step: prepared; rotation stuck: no commit since 2026-11-22T08:40:01Z (12s)) within 5s (--timeout)"
        );
        let json = serde_json::to_value(outcomes(&t)).unwrap();
        assert_eq!(json["rotations"][0]["done"], true);
        assert_eq!(json["rotations"][0]["lastStep"], "retired");
        assert_eq!(json["rotations"][1]["fromEpoch"], 3);
        assert_eq!(json["rotations"][1]["targetEpoch"], 4);
        assert_eq!(json["rotations"][1]["lastStep"], "prepared");
        assert!(
            json["rotations"][1]["stuck"]
                .as_str()
                .unwrap()
                .contains("no commit")
        );
    }

    #[test]
    fn started_lines_align_names() {
        let r = RotateResponse {
            rotations: vec![
                RotationStarted {
                    peer: "n2".into(),
                    from_epoch: Some(3),
                    target_epoch: 4,
                },
                RotationStarted {
                    peer: "node-3".into(),
                    from_epoch: None,
                    target_epoch: 1,
                },
            ],
        };
        assert_eq!(
            started_text(&r),
            "n2      epoch 3 -> 4  started\nnode-3  epoch - -> 1  started\n"
        );
    }
}
