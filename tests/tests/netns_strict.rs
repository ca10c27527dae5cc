//! Host-tier tests of the eBPF datapath with real agents: strict mode, the underlay guard and
//! the leak sentinel, on this kernel's tcx. Root only; under `CI=true` they fail rather than
//! skip without it.

use anyhow::{Context, ensure};
use enc_api::AuthState;
use enc_tests::lab::{Lab, LabOptions};
use enc_tests::netns::Netns;
use enc_tests::{pcap, require_root, sys};
use std::time::Duration;

const MARKER: &[u8] = b"enc-strict-marker";
/// "enc-strict-marke" for `ping -p`.
const MARKER_HEX: &str = "656e632d7374726963742d6d61726b65";
const AUTH_TIMEOUT: Duration = Duration::from_secs(30);

fn drops(lab: &Lab, i: usize, peer: &str, reason: &str) -> anyhow::Result<u64> {
    Ok(lab
        .counters(i, peer)?
        .drops
        .get(reason)
        .copied()
        .unwrap_or(0))
}

fn no_marker(frames: &[pcap::Frame]) -> anyhow::Result<()> {
    let n = frames
        .iter()
        .filter(|f| pcap::contains(&f.data, &MARKER[..16]))
        .count();
    ensure!(
        n == 0,
        "{n} frames on the underlay carry the plaintext marker"
    );
    Ok(())
}

#[test]
fn privileged_strict_mode_follows_authentication() {
    if !require_root("privileged_strict_mode_follows_authentication") {
        return;
    }
    let mut opts = LabOptions::new("s", 2);
    opts.pods = 1;
    let mut lab = Lab::build(&opts).expect("build lab");
    let r = (|| -> anyhow::Result<()> {
        let to2 = lab.node(2).pods[0].addr;
        lab.start_agent(1)?;
        let st = lab.status(1)?;
        ensure!(
            st.datapath.attach_mode == "tcx",
            "attach mode {:?}",
            st.datapath.attach_mode
        );
        ensure!(
            st.datapath.strict_mode && st.datapath.pod_interfaces == ["p1"],
            "{:?}",
            st.datapath
        );

        // Before node-2 authenticates: dropped and counted, nothing on the wire.
        let capture = lab.capture("before")?;
        ensure!(
            !lab.ping(1, 1, to2, 3, MARKER_HEX)?,
            "pod traffic reached an unauthenticated peer"
        );
        no_marker(&capture.stop()?)?;
        let before = drops(&lab, 1, "node-2", "peer-not-authenticated")?;
        ensure!(
            before >= 3,
            "only {before} drops counted for the unauthenticated peer"
        );

        // After authentication: encrypted traffic flows, steered by the mark.
        lab.start_agent(2)?;
        lab.wait_authenticated(1, &["node-2"], AUTH_TIMEOUT)?;
        lab.wait_authenticated(2, &["node-1"], AUTH_TIMEOUT)?;
        let capture = lab.capture("after")?;
        sys::wait_for(
            "traffic after authentication",
            Duration::from_secs(15),
            || Ok(lab.ping(1, 1, to2, 1, MARKER_HEX)?.then_some(())),
        )?;
        ensure!(
            lab.ping(1, 1, to2, 3, MARKER_HEX)?,
            "pings lost after authentication"
        );
        no_marker(&capture.stop()?)?;
        let c = lab.counters(1, "node-2")?;
        ensure!(
            c.steered_packets >= 4,
            "steered {} packets",
            c.steered_packets
        );
        let c2 = lab.counters(2, "node-1")?;
        ensure!(
            c2.steered_packets >= 4,
            "node-2 steered {} replies",
            c2.steered_packets
        );

        // node-2 comes back with a certificate from another CA: refused, dropped again.
        lab.stop_agent(2)?;
        lab.switch_to_foreign_ca(2)?;
        lab.start_agent(2)?;
        sys::wait_for("node-1 to refuse node-2", AUTH_TIMEOUT, || {
            let p = lab
                .peers(1)?
                .into_iter()
                .find(|p| p.name == "node-2")
                .context("node-2")?;
            Ok(matches!(p.auth, AuthState::Failed { .. }).then_some(()))
        })?;
        let before = drops(&lab, 1, "node-2", "peer-not-authenticated")?;
        let capture = lab.capture("refused")?;
        ensure!(
            !lab.ping(1, 1, to2, 3, MARKER_HEX)?,
            "pod traffic reached a refused peer"
        );
        no_marker(&capture.stop()?)?;
        let after = drops(&lab, 1, "node-2", "peer-not-authenticated")?;
        ensure!(
            after >= before + 3,
            "drops went from {before} to {after} only"
        );
        let text = lab.encctl(1, &["peers"])?;
        eprintln!("encctl peers on node-1:\n{text}");
        ensure!(
            text.contains("peer-not-authenticated"),
            "drop reasons missing from encctl peers:\n{text}"
        );
        Ok(())
    })();
    lab.finish(r);
}

/// An attacker on the underlay, holding an address inside node-2's pod CIDR.
fn attacker(lab: &Lab) -> anyhow::Result<Netns> {
    let ns = lab.underlay_host("10.77.0.99/24")?;
    ns.run(&["ip", "addr", "add", "10.78.2.99/32", "dev", "eth0"])?;
    ns.run(&["ip", "route", "add", "10.78.1.0/24", "via", "10.77.0.1"])?;
    Ok(ns)
}

fn underlay_guards(strict: bool, tag: &str) {
    let mut opts = LabOptions::new(tag, 2);
    opts.pods = 1;
    opts.strict = strict;
    let mut lab = Lab::build(&opts).expect("build lab");
    let r = (|| -> anyhow::Result<()> {
        lab.start_agent(1)?;
        let to1 = lab.node(1).pods[0].addr;
        let to2 = lab.node(2).pods[0].addr;

        // Plaintext from a remote pod CIDR arriving on the underlay.
        let x = attacker(&lab)?;
        // The crafted pings get no answer either way: in strict mode they are dropped on
        // arrival; without it the pod's reply has no authenticated route back.
        sys::output_in(
            x.name(),
            &[
                "ping",
                "-n",
                "-q",
                "-c",
                "3",
                "-i",
                "0.2",
                "-W",
                "1",
                "-I",
                "10.78.2.99",
                &to1.to_string(),
            ],
        )?;
        let dropped = drops(&lab, 1, "node-2", "plaintext-from-underlay")?;
        ensure!(
            dropped >= 3,
            "{dropped} plaintext underlay packets counted: {}",
            lab.encctl(1, &["peers", "-o", "json"])?
        );
        if !strict {
            // It reached the pod side and was counted there as not decrypted.
            ensure!(
                drops(&lab, 1, "node-2", "not-decrypted")? >= 3,
                "pod egress did not count the plaintext"
            );
        }

        // Plaintext forced out of the underlay towards a remote pod CIDR (no mark, main table).
        lab.node(1).ns.run(&[
            "ip",
            "route",
            "add",
            &format!("{}/32", to2),
            "via",
            "10.77.0.2",
            "dev",
            "eth0",
        ])?;
        let capture = lab.capture("leak")?;
        let _ = sys::output_in(
            lab.node(1).ns.name(),
            &[
                "ping",
                "-n",
                "-q",
                "-c",
                "3",
                "-i",
                "0.2",
                "-W",
                "1",
                "-p",
                MARKER_HEX,
                &to2.to_string(),
            ],
        )?;
        let frames = capture.stop()?;
        let c = lab.counters(1, "node-2")?;
        ensure!(
            c.leak_packets >= 3,
            "leak sentinel counted {}",
            c.leak_packets
        );
        let seen = frames
            .iter()
            .filter(|f| pcap::contains(&f.data, &MARKER[..16]))
            .count();
        if strict {
            ensure!(
                seen == 0,
                "strict mode let {seen} leaked packets onto the wire"
            );
            ensure!(
                drops(&lab, 1, "node-2", "unencrypted-egress")? >= 3,
                "leaks not dropped"
            );
        } else {
            ensure!(
                seen >= 3,
                "non-strict mode counts but must not drop ({seen} seen)"
            );
            ensure!(
                drops(&lab, 1, "node-2", "unencrypted-egress")? >= 3,
                "would-be drops not counted"
            );
        }
        let status = lab.status(1)?;
        ensure!(
            status.datapath.totals.leak_packets >= 3,
            "status totals {:?}",
            status.datapath.totals
        );
        sys::wait_for(
            "the rate-limited leak log event",
            Duration::from_secs(15),
            || Ok(lab.log_tail(1, 200).contains("leak sentinel").then_some(())),
        )?;
        Ok(())
    })();
    lab.finish(r);
}

#[test]
fn privileged_underlay_guard_and_leak_sentinel_strict() {
    if !require_root("privileged_underlay_guard_and_leak_sentinel_strict") {
        return;
    }
    underlay_guards(true, "g");
}

#[test]
fn privileged_underlay_guard_and_leak_sentinel_counting_only() {
    if !require_root("privileged_underlay_guard_and_leak_sentinel_counting_only") {
        return;
    }
    underlay_guards(false, "h");
}
