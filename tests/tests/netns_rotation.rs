//! Host-tier tests of two-phase key rotation with real agents, under load: a
//! sequence-numbered UDP stream and a TCP stream run between pods on two nodes while 20
//! rotations run back to back, for userspace WireGuard (boringtun) and the userspace ESP
//! engine. Also a peer whose agent is paused during PREPARE. Root only; under `CI=true` they
//! fail rather than skip without it.

use anyhow::{Context, bail, ensure};
use enc_tests::lab::{Lab, LabOptions};
use enc_tests::traffic::{PLAINTEXT_MARKER, TcpFlow, UdpStream};
use enc_tests::{pcap, require_root, sys};
use std::time::{Duration, Instant};

const AUTH_TIMEOUT: Duration = Duration::from_secs(30);
const ROTATIONS: u32 = 20;

fn wait_all_authenticated(lab: &Lab, nodes: usize) -> anyhow::Result<()> {
    for i in 1..=nodes {
        sys::wait_for(&format!("node-{i} to authenticate"), AUTH_TIMEOUT, || {
            let peers = lab.peers(i)?;
            let ok = peers.len() == nodes - 1
                && peers.iter().all(|p| {
                    p.auth == enc_api::AuthState::Authenticated
                        && p.rotation
                            .as_ref()
                            .is_some_and(|r| r.outbound_epoch.is_some() && r.phase == "idle")
                });
            Ok(ok.then_some(()))
        })?;
    }
    Ok(())
}

/// Outbound epoch and key id that node `i` uses with `peer`.
fn epoch_with(lab: &Lab, i: usize, peer: &str) -> anyhow::Result<(u32, String, Vec<u32>)> {
    let peers = lab.peers(i)?;
    let p = peers
        .iter()
        .find(|p| p.name == peer)
        .with_context(|| format!("node-{i} lists {peer}"))?;
    let r = p.rotation.as_ref().context("rotation state")?;
    let key = p.key.as_ref().context("key info")?;
    Ok((
        r.outbound_epoch.context("outbound epoch")?,
        key.key_id.clone(),
        r.inbound_epochs.clone(),
    ))
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
        let (start_epoch, _, _) = epoch_with(&lab, 1, "node-2")?;
        let keys_before = [
            lab.status(1)?.encryption.public_key,
            lab.status(2)?.encryption.public_key,
        ];

        let capture = lab.capture("rotation")?;
        let (n1, n2) = (lab.node(1), lab.node(2));
        let udp = UdpStream::start(&n1.pods[0].ns, &n2.pods[0].ns, n2.pods[0].addr, 3000, 200)?;
        let tcp = TcpFlow::start(&n2.pods[0].ns, &n1.pods[0].ns, n1.pods[0].addr, 4_000_000)?;
        std::thread::sleep(Duration::from_secs(1));

        let began = Instant::now();
        for k in 0..ROTATIONS {
            // Alternate the node that asks: node-1 leads the pair, node-2 asks it to rotate.
            let node = if k % 2 == 0 { 1 } else { 2 };
            let out = lab.encctl_output(node, &["rotate", "--wait", "--timeout", "20s"])?;
            ensure!(
                out.status.success(),
                "rotation {} from node-{node} failed: {}{}",
                k + 1,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let took = began.elapsed();
        std::thread::sleep(Duration::from_secs(1));
        let tcp = tcp.stop()?;
        let udp = udp.stop(Duration::from_secs(1))?;
        let frames = capture.stop()?;
        eprintln!("{encryption}: {ROTATIONS} rotations in {took:.1?}; {udp}; {tcp}");

        ensure!(udp.sent > 3000, "UDP stream too short: {udp}");
        ensure!(udp.lost == 0, "UDP packets lost during rotation: {udp}");
        ensure!(tcp.is_intact(), "TCP stream damaged: {tcp}");
        ensure!(
            tcp.max_stall < Duration::from_secs(1),
            "TCP stream stalled: {tcp}"
        );
        let leaks = frames
            .iter()
            .filter(|f| pcap::contains(&f.data, PLAINTEXT_MARKER))
            .count();
        ensure!(
            leaks == 0,
            "{leaks} of {} underlay frames carry the plaintext marker",
            frames.len()
        );

        // Both ends ended on one epoch, ROTATIONS above the start, with the same key and
        // only that epoch installed once the grace period is over.
        sys::wait_for("old epochs to retire", Duration::from_secs(10), || {
            let a = epoch_with(&lab, 1, "node-2")?;
            let b = epoch_with(&lab, 2, "node-1")?;
            Ok((a.2.len() == 1 && b.2.len() == 1).then_some((a, b)))
        })
        .and_then(|(a, b)| {
            ensure!(
                a.0 == start_epoch + ROTATIONS && b.0 == a.0,
                "epochs: node-1 {} node-2 {} (start {start_epoch})",
                a.0,
                b.0
            );
            ensure!(a.1 == b.1, "key ids differ: {} vs {}", a.1, b.1);
            Ok(())
        })?;
        let st = lab.status(1)?;
        ensure!(
            st.keys.in_use == st.keys.expected && st.keys.rotations_in_progress == 0,
            "{:?}",
            st.keys
        );
        if encryption == "wireguard" {
            // `encctl rotate` (all peers) rolls the node's static key too: each node now uses
            // a new key pair, and its peer configured exactly that key.
            for (i, other) in [(1, 2), (2, 1)] {
                let now = lab.status(i)?.encryption.public_key;
                ensure!(
                    now.is_some() && now != keys_before[i - 1],
                    "node-{i} still uses its first static key {now:?}"
                );
                let seen = lab
                    .peers(other)?
                    .into_iter()
                    .find(|p| p.name == format!("node-{i}"))
                    .and_then(|p| p.wireguard)
                    .map(|w| w.public_key);
                ensure!(
                    seen == now,
                    "node-{other} configured {seen:?} for node-{i}, which uses {now:?}"
                );
            }
        }
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
