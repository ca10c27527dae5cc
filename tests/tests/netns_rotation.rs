//! Host-tier tests of two-phase key rotation with real agents, under load: a
//! sequence-numbered UDP stream and a TCP stream run between pods on two nodes while 20
//! rotations run back to back, for userspace WireGuard (boringtun) and the userspace ESP
//! engine. Also a peer whose agent is paused during PREPARE. Root only; under `CI=true` they
//! fail rather than skip without it.

use anyhow::{Context, bail, ensure};
use enc_tests::lab::{Lab, LabOptions, metric};
use enc_tests::scenarios::{self, RotationLoad, epoch_with};
use enc_tests::traffic::UdpStream;
use enc_tests::{require_root, sys};
use std::time::{Duration, Instant};

const AUTH_TIMEOUT: Duration = Duration::from_secs(30);
const ROTATIONS: u32 = 20;

fn wait_all_authenticated(lab: &Lab, nodes: usize) -> anyhow::Result<()> {
    scenarios::wait_all_authenticated(lab, nodes, AUTH_TIMEOUT)
}

fn rotation_under_load(encryption: &'static str, tag: &str) {
    let mut opts = LabOptions::new(tag, 2);
    opts.pods = 1;
    opts.encryption = encryption;
    opts.rotation = vec!["gracePeriod: 1s".into(), "stuckAfter: 5s".into()];
    let mut lab = Lab::build(&opts).expect("build lab");
    let r = (|| -> anyhow::Result<()> {
        lab.start_all()?;
        wait_all_authenticated(&lab, 2)?;
        let load = RotationLoad {
            rotations: ROTATIONS,
            ..RotationLoad::default()
        };
        let outcome = scenarios::rotation_under_load(&lab, &load)?;
        eprintln!("{encryption}: {ROTATIONS} {outcome}");
        Ok(())
    })();
    lab.finish(r);
}

#[test]
fn privileged_rotation_under_load_wireguard() {
    if !require_root("privileged_rotation_under_load_wireguard") {
        return;
    }
    rotation_under_load("wireguard", "rw");
}

#[test]
fn privileged_rotation_under_load_ipsec() {
    if !require_root("privileged_rotation_under_load_ipsec") {
        return;
    }
    rotation_under_load("ipsec", "ri");
}

/// A peer whose agent is paused during PREPARE: the rotation does not commit for it, the
/// other peer finishes, `encctl rotate --wait` names it and fails; after SIGCONT it completes.
#[test]
fn privileged_rotation_paused_peer() {
    if !require_root("privileged_rotation_paused_peer") {
        return;
    }
    let mut opts = LabOptions::new("rp", 3);
    opts.pods = 1;
    opts.rotation = vec!["gracePeriod: 1s".into(), "stuckAfter: 2s".into()];
    let mut lab = Lab::build(&opts).expect("build lab");
    let r = (|| -> anyhow::Result<()> {
        lab.start_all()?;
        wait_all_authenticated(&lab, 3)?;
        let (e2, _, _) = epoch_with(&lab, 1, "node-2")?;
        let (e3, _, _) = epoch_with(&lab, 1, "node-3")?;

        lab.pause_agent(3)?;
        let out = lab.encctl_output(1, &["rotate", "--wait", "--timeout", "5s", "-o", "json"]);
        // Still paused, and stuck for 3 s by now (stuckAfter 2s): what node-1's metrics say.
        let stuck_metrics = lab.metrics(1);
        // Resume before judging, so that a failed check does not leave a stopped process.
        let resumed_at = Instant::now();
        lab.resume_agent(3)?;
        let out = out?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        ensure!(
            !out.status.success(),
            "rotate --wait succeeded although node-3 was paused: {text}{err}"
        );
        ensure!(
            err.contains("node-3") && !err.contains("node-2"),
            "the error must name node-3 only: {err}"
        );
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("rotate -o json: {text}"))?;
        let rots = v["rotations"].as_array().context("rotations array")?;
        let find = |peer: &str| {
            rots.iter()
                .find(|r| r["peer"] == peer)
                .with_context(|| format!("{peer} in {text}"))
        };
        ensure!(
            find("node-2")?["done"] == true,
            "node-2 must finish: {text}"
        );
        let n3 = find("node-3")?;
        ensure!(n3["done"] == false, "node-3 must not finish: {text}");
        ensure!(
            n3["stuck"]
                .as_str()
                .is_some_and(|s| s.contains("rotation stuck: no ack since")),
            "node-3 must be reported stuck: {text}"
        );
        let target3 = n3["targetEpoch"].as_u64().context("targetEpoch")? as u32;
        ensure!(target3 == e3 + 1, "node-3 target {target3}, was at {e3}");
        // node-3 never switched: node-1 still sends to it with the old epoch.
        let (now2, _, _) = epoch_with(&lab, 1, "node-2")?;
        ensure!(now2 == e2 + 1, "node-2 at {now2}, was at {e2}");
        // The metrics showed the stuck rotation too, and only node-3's.
        let m = stuck_metrics?;
        let series = |s: &str| metric(&m, s).with_context(|| format!("no {s} in\n{m}"));
        ensure!(
            series(r#"enc_rotation_stuck{peer="node-3"}"#)? == 1.0
                && series(r#"enc_rotation_stuck{peer="node-2"}"#)? == 0.0
                && series("enc_rotation_stuck_peers")? == 1.0
                && series(r#"enc_rotation_in_progress{peer="node-3"}"#)? == 1.0,
            "node-1's metrics do not show node-3 (only) stuck:\n{m}"
        );
        let since = series(r#"enc_rotation_stuck_since_seconds{peer="node-3"}"#)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs_f64();
        ensure!(
            since <= now && since > now - 60.0,
            "stuck since {since}, now {now}"
        );
        ensure!(
            series(r#"enc_peer_key_epoch{peer="node-3"}"#)? == f64::from(e3),
            "node-3's epoch in the metrics is not {e3}:\n{m}"
        );

        // Resumed: the queued PREPARE is answered and the rotation completes.
        sys::wait_for("node-3 to complete", Duration::from_secs(20), || {
            let peers = lab.peers(1)?;
            let p = peers
                .iter()
                .find(|p| p.name == "node-3")
                .context("node-3")?;
            Ok(p.rotation
                .as_ref()
                .and_then(|r| r.last_completed_epoch)
                .filter(|e| *e >= target3)
                .map(|_| ()))
        })?;
        eprintln!(
            "node-3 completed {:.1?} after SIGCONT",
            resumed_at.elapsed()
        );
        let (a, ka, _) = epoch_with(&lab, 1, "node-3")?;
        let (b, kb, _) = epoch_with(&lab, 3, "node-1")?;
        if a != b || ka != kb {
            bail!("node-1 and node-3 disagree: epochs {a}/{b}, key ids {ka}/{kb}");
        }
        // Completed: the metrics no longer show it stuck, and carry the new epoch.
        let m = lab.metrics(1)?;
        ensure!(
            metric(&m, r#"enc_rotation_stuck{peer="node-3"}"#) == Some(0.0)
                && metric(&m, "enc_rotation_stuck_peers") == Some(0.0)
                && metric(&m, r#"enc_rotation_stuck_since_seconds{peer="node-3"}"#).is_none()
                && metric(&m, r#"enc_peer_key_epoch{peer="node-3"}"#) == Some(f64::from(a)),
            "node-1's metrics after node-3 completed (epoch {a}):\n{m}"
        );
        ensure!(
            lab.ping(1, 1, lab.node(3).pods[0].addr, 2, "00")?,
            "node-1 pod cannot reach node-3 pod after the rotation"
        );
        Ok(())
    })();
    lab.finish(r);
}

/// Completed rotations node `i` reports with `peer` in the current session.
fn completed(lab: &Lab, i: usize, peer: &str) -> anyhow::Result<u64> {
    let peers = lab.peers(i)?;
    let p = peers
        .iter()
        .find(|p| p.name == peer)
        .with_context(|| format!("node-{i} lists {peer}"))?;
    Ok(p.rotation.as_ref().map_or(0, |r| r.completed))
}

/// Automatic triggers under traffic: the ESP sequence-number threshold (IPsec) and the bytes
/// threshold (WireGuard) start rotations by themselves, and nothing is lost.
#[test]
fn privileged_rotation_thresholds() {
    if !require_root("privileged_rotation_thresholds") {
        return;
    }
    for (encryption, tag, trigger) in [
        ("ipsec", "ts", "espSeqThreshold: 3000"),
        ("wireguard", "tb", "bytesThreshold: 2097152"),
    ] {
        let mut opts = LabOptions::new(tag, 2);
        opts.pods = 1;
        opts.encryption = encryption;
        opts.rotation = vec!["gracePeriod: 1s".into(), trigger.into()];
        let mut lab = Lab::build(&opts).expect("build lab");
        let r = (|| -> anyhow::Result<()> {
            lab.start_all()?;
            wait_all_authenticated(&lab, 2)?;
            let before = completed(&lab, 1, "node-2")?;
            let (n1, n2) = (lab.node(1), lab.node(2));
            let udp = UdpStream::start(&n1.pods[0].ns, &n2.pods[0].ns, n2.pods[0].addr, 2000, 500)?;
            std::thread::sleep(Duration::from_secs(8));
            let udp = udp.stop(Duration::from_secs(1))?;
            let after = completed(&lab, 1, "node-2")?;
            eprintln!(
                "{encryption} ({trigger}): {} rotations; {udp}",
                after - before
            );
            ensure!(udp.lost == 0, "UDP packets lost: {udp}");
            // 16,000 packets of 500 bytes: about 5 thresholds' worth either way.
            ensure!(
                after >= before + 2,
                "{trigger} started {} rotations in 8 s",
                after - before
            );
            let log = std::fs::read_to_string(&lab.node(1).log)?;
            ensure!(
                log.contains("reached the threshold"),
                "node-1's log does not say which trigger fired"
            );
            Ok(())
        })();
        lab.finish(r);
    }
}

/// An agent restarted in the middle of a rotation: the pair ends on one epoch above
/// everything it had, with the same key on both ends, only that epoch installed, and traffic
/// flowing. (The restarted node's userspace datapath restarts too, so packets are lost while
/// it is down; what is checked is that neither side is left without the other's key.)
#[test]
fn privileged_rotation_agent_restart_mid_rotation() {
    if !require_root("privileged_rotation_agent_restart_mid_rotation") {
        return;
    }
    for (encryption, tag) in [("ipsec", "xi"), ("wireguard", "xw")] {
        let mut opts = LabOptions::new(tag, 2);
        opts.pods = 1;
        opts.encryption = encryption;
        opts.rotation = vec!["gracePeriod: 2s".into()];
        let mut lab = Lab::build(&opts).expect("build lab");
        let r = (|| -> anyhow::Result<()> {
            lab.start_all()?;
            wait_all_authenticated(&lab, 2)?;
            let (before, _, _) = epoch_with(&lab, 1, "node-2")?;
            // Start a rotation and kill the follower while it is in flight.
            let out = lab.encctl_output(1, &["rotate"])?;
            ensure!(out.status.success(), "{out:?}");
            lab.stop_agent(2)?;
            lab.start_agent(2)?;
            wait_all_authenticated(&lab, 2)?;
            sys::wait_for("old keys to retire", Duration::from_secs(20), || {
                let a = epoch_with(&lab, 1, "node-2")?;
                let b = epoch_with(&lab, 2, "node-1")?;
                Ok((a.2.len() == 1 && b.2.len() == 1).then_some((a, b)))
            })
            .and_then(|(a, b)| {
                ensure!(
                    a.0 > before + 1 && a.0 == b.0,
                    "epochs {a:?} / {b:?}, before {before}"
                );
                ensure!(a.1 == b.1, "key ids differ: {a:?} / {b:?}");
                Ok(())
            })?;
            let reach =
                |from: usize, to: usize| lab.ping(from, 1, lab.node(to).pods[0].addr, 1, "00");
            let t = Instant::now();
            let ok = sys::wait_for("traffic after the restart", Duration::from_secs(20), || {
                Ok((reach(1, 2)? && reach(2, 1)?).then_some(()))
            });
            eprintln!("{encryption}: traffic after {:.1?}", t.elapsed());
            if ok.is_err() {
                bail!(
                    "pods cannot reach each other after the restart\nnode-1:\n{}\nnode-2:\n{}",
                    lab.encctl(1, &["peers"])?,
                    lab.encctl(2, &["peers"])?
                );
            }
            // And the pair still rotates.
            let out = lab.encctl_output(2, &["rotate", "--wait", "--timeout", "20s"])?;
            ensure!(
                out.status.success(),
                "rotation after restart: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(())
        })();
        lab.finish(r);
    }
}
