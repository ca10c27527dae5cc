//! Host-tier identity lifecycle tests (issue 8): revocation of a live peer with real agents in
//! network namespaces. Every test needs root; under `CI=true` it fails rather than skips
//! without it.

use anyhow::{Context, ensure};
use enc_api::{AuthState, Event, EventKind};
use enc_tests::lab::{Capture, Lab, LabOptions, bin_dir};
use enc_tests::{require_root, sys};
use std::net::IpAddr;
use std::time::{Duration, Instant};

fn wait_mesh(lab: &Lab, nodes: usize) -> anyhow::Result<()> {
    lab.wait_mesh(nodes, Duration::from_secs(30))
}

/// The failure reason node `i` shows for `peer`, if it shows it failed.
fn failed_reason(lab: &Lab, i: usize, peer: &str) -> anyhow::Result<Option<String>> {
    let peers = lab.peers(i)?;
    let p = peers
        .iter()
        .find(|p| p.name == peer)
        .with_context(|| format!("node-{i} lists {peer}"))?;
    Ok(match &p.auth {
        AuthState::Failed { reason } => Some(reason.clone()),
        _ => None,
    })
}

fn events(lab: &Lab, i: usize) -> anyhow::Result<Vec<Event>> {
    lab.encctl(i, &["events", "-o", "json"])?
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("event line {l}")))
        .collect()
}

/// node-3's certificate is revoked while it carries traffic. The list is pushed to node-1
/// only; within 5 s node-1 and node-2 (which gets it from node-1 over the control channel)
/// show node-3 failed with the reason and have removed its keys; from then on nothing of
/// node-3's pod reaches the other pods (a capture on their pod veths proves it), in either
/// direction. Both audit logs record it, `encctl peers -o wide` names the reason, and after
/// a restart node-2 still refuses node-3 (the list survives restarts) while node-1 and node-2
/// authenticate each other again.
#[test]
fn privileged_revocation_of_a_live_peer_spreads_and_stops_its_traffic() {
    if !require_root("privileged_revocation_of_a_live_peer_spreads_and_stops_its_traffic") {
        return;
    }
    let mut opts = LabOptions::new("rv", 3);
    opts.pods = 1;
    let mut lab = Lab::build(&opts).expect("build lab");
    let r = (|| -> anyhow::Result<()> {
        lab.start_all()?;
        wait_mesh(&lab, 3)?;
        let pod = |i: usize| lab.node(i).pods[0].addr;
        ensure!(
            lab.ping(3, 1, pod(1), 1, "00")?,
            "node-3 -> node-1 before revocation"
        );
        ensure!(
            lab.ping(3, 1, pod(2), 1, "00")?,
            "node-3 -> node-2 before revocation"
        );
        let serial = lab
            .peers(1)?
            .into_iter()
            .find(|p| p.name == "node-3")
            .and_then(|p| p.certificate)
            .context("node-1 shows node-3's certificate")?
            .serial;

        let encctl = bin_dir()?.join("encctl");
        let ca = lab.dir.path().join("ca");
        let out = sys::run(&[
            encctl.to_str().context("path")?,
            "revoke",
            "--ca",
            ca.to_str().context("path")?,
            "--node",
            "node-3",
        ])?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(text.contains(&serial), "encctl revoke output: {text}");
        let crl = ca.join("crl.pem");
        let started = Instant::now();
        let pushed = lab.encctl(1, &["crl", "push", crl.to_str().context("path")?])?;
        ensure!(
            pushed.contains("adopted") && pushed.contains("node-3"),
            "crl push: {pushed}"
        );
        for i in [1, 2] {
            let reason = sys::wait_for(
                &format!("node-{i} to refuse node-3"),
                Duration::from_secs(5),
                || failed_reason(&lab, i, "node-3"),
            )?;
            ensure!(
                reason == format!("certificate revoked (serial {serial})"),
                "node-{i} reason: {reason}"
            );
            let p = lab.peers(i)?.into_iter().find(|p| p.name == "node-3");
            ensure!(
                p.as_ref()
                    .is_some_and(|p| p.wireguard.is_none() && p.key.is_none()),
                "node-{i} still holds keys for node-3: {p:?}"
            );
        }
        eprintln!(
            "revocation took effect on node-1 and node-2 (via the control channel) in {} ms",
            started.elapsed().as_millis()
        );

        // Nothing of node-3's pod reaches node-1's or node-2's pods any more.
        let captures: Vec<Capture> = [1, 2]
            .iter()
            .map(|&i| {
                Capture::start(
                    lab.node(i).ns.name(),
                    "p1",
                    &lab.dir.path().join(format!("revoked-{i}.pcap")),
                )
            })
            .collect::<anyhow::Result<_>>()?;
        for i in [1, 2] {
            ensure!(
                !lab.ping(3, 1, pod(i), 3, "00")?,
                "node-3's pod still reaches node-{i}'s pod"
            );
            ensure!(
                !lab.ping(i, 1, pod(3), 2, "00")?,
                "node-{i}'s pod still reaches node-3's pod"
            );
        }
        ensure!(
            lab.ping(1, 1, pod(2), 1, "00")?,
            "node-1 and node-2 must keep talking"
        );
        let node3_pod = IpAddr::V4(pod(3));
        for (i, c) in [1, 2].into_iter().zip(captures) {
            let frames = c.stop()?;
            let seen = frames
                .iter()
                .filter(|f| f.ip.as_ref().is_some_and(|ip| ip.src == node3_pod))
                .count();
            ensure!(
                seen == 0,
                "{seen} packets from node-3's pod reached node-{i}'s pod after the revocation"
            );
        }

        // The audit trail.
        let e1 = events(&lab, 1)?;
        ensure!(
            e1.iter()
                .any(|e| e.kind == EventKind::AuthSuccess && e.peer.as_deref() == Some("node-2")),
            "node-1 events lack the authentication of node-2"
        );
        ensure!(
            e1.iter()
                .any(|e| e.kind == EventKind::Revocation && e.detail.contains("operator")),
            "node-1 events lack the revocation list"
        );
        ensure!(
            e1.iter().any(|e| e.kind == EventKind::AuthFailure
                && e.peer.as_deref() == Some("node-3")
                && e.detail.contains("certificate revoked")),
            "node-1 events lack node-3's failure: {e1:?}"
        );
        let e2 = events(&lab, 2)?;
        ensure!(
            e2.iter()
                .any(|e| e.kind == EventKind::Revocation && e.detail.contains("peer node-1")),
            "node-2 events do not show the list arriving from node-1: {e2:?}"
        );
        ensure!(
            e1.iter().chain(&e2).all(|e| !e.detail.contains("PRIVATE")),
            "key material in the event log"
        );
        let wide = lab.encctl(1, &["peers", "-o", "wide"])?;
        ensure!(
            wide.contains("LAST FAILURE") && wide.contains("certificate revoked"),
            "peers -o wide:\n{wide}"
        );
        eprintln!("{wide}");

        // The list survives a restart.
        lab.stop_agent(2)?;
        lab.start_agent(2)?;
        lab.wait_authenticated(2, &["node-1"], Duration::from_secs(30))?;
        let reason = sys::wait_for(
            "restarted node-2 to refuse node-3",
            Duration::from_secs(30),
            || failed_reason(&lab, 2, "node-3"),
        )?;
        ensure!(
            reason.contains("certificate revoked"),
            "after the restart node-2 says: {reason}"
        );
        Ok(())
    })();
    lab.finish(r);
}

/// Replaces `dst` with `src` by a rename (what an issuer writing new files does).
fn replace(src: &std::path::Path, dst: &std::path::Path) -> anyhow::Result<()> {
    std::fs::rename(src, dst)
        .with_context(|| format!("rename {} -> {}", src.display(), dst.display()))
}

/// Waits until node `i` shows `peer` authenticated with a certificate issued by `issuer`, in a
/// session newer than `after` (seconds since its last successful authentication below it).
fn wait_reauth(lab: &Lab, i: usize, peer: &str, issuer: &str) -> anyhow::Result<()> {
    sys::wait_for(
        &format!("node-{i} to re-authenticate {peer} under {issuer}"),
        Duration::from_secs(30),
        || {
            let p = lab
                .peers(i)?
                .into_iter()
                .find(|p| p.name == peer)
                .with_context(|| format!("{peer} listed"))?;
            let ok = p.auth == AuthState::Authenticated
                && p.certificate.as_ref().is_some_and(|c| c.issuer == issuer);
            Ok(ok.then_some(()))
        },
    )
}

/// CA rollover under traffic, with the files changed in place as an operator (or
/// cert-manager) would, and no agent restarted: the new CA joins the trusted bundle, every
/// node's certificate is re-issued under it (renewal: loaded without a restart), the old CA
/// leaves the bundle. A sequence-numbered UDP stream and a TCP stream run throughout: no UDP
/// packet is lost, the TCP stream stays intact and never stalls long. Each step is in the
/// audit log, and afterwards every peer presents a certificate of the new CA.
#[test]
fn privileged_ca_rollover_and_renewal_under_traffic() {
    use enc_tests::traffic::{TcpFlow, UdpStream};
    if !require_root("privileged_ca_rollover_and_renewal_under_traffic") {
        return;
    }
    let mut opts = LabOptions::new("ro", 2);
    opts.pods = 1;
    let mut lab = Lab::build(&opts).expect("build lab");
    let r = (|| -> anyhow::Result<()> {
        lab.start_all()?;
        wait_mesh(&lab, 2)?;
        let encctl = bin_dir()?.join("encctl");
        let encctl = encctl.to_str().context("path")?.to_owned();
        let dir = lab.dir.path().to_owned();
        let path = |p: &std::path::Path| p.to_str().map(str::to_owned).context("path");
        let ca1 = std::fs::read_to_string(dir.join("ca/ca.crt"))?;
        let ca2_dir = dir.join("ca2");
        sys::run(&[
            &encctl,
            "ca",
            "init",
            "--out",
            &path(&ca2_dir)?,
            "--name",
            "enc cluster CA 2",
        ])?;
        let ca2 = std::fs::read_to_string(ca2_dir.join("ca.crt"))?;
        let trust = dir.join("ca/ca.crt");

        let (n1, n2) = (lab.node(1), lab.node(2));
        let udp = UdpStream::start(&n1.pods[0].ns, &n2.pods[0].ns, n2.pods[0].addr, 500, 200)?;
        let tcp = TcpFlow::start(&n2.pods[0].ns, &n1.pods[0].ns, n1.pods[0].addr, 100_000)?;
        std::thread::sleep(Duration::from_secs(1));

        // 1. Trust both CAs.
        let tmp = dir.join("trust.tmp");
        std::fs::write(&tmp, format!("{ca1}{ca2}"))?;
        replace(&tmp, &trust)?;
        for (i, peer) in [(1, "node-2"), (2, "node-1")] {
            wait_reauth(&lab, i, peer, "CN=enc cluster CA")?;
        }
        std::thread::sleep(Duration::from_secs(2));

        // 2. Re-issue every node's certificate under the new CA.
        for i in 1..=2 {
            let out = dir.join(format!("reissue-{i}"));
            let node = format!("node-{i}");
            let addr = lab.node(i).addr.to_string();
            sys::run(&[
                &encctl,
                "cert",
                "issue",
                "--ca",
                &path(&ca2_dir)?,
                "--node",
                &node,
                "--ip",
                &addr,
                "--days",
                "2",
                "--out",
                &path(&out)?,
            ])?;
            replace(
                &out.join(format!("{node}.key")),
                &dir.join(format!("certs/{node}.key")),
            )?;
            replace(
                &out.join(format!("{node}.crt")),
                &dir.join(format!("certs/{node}.crt")),
            )?;
        }
        for (i, peer) in [(1, "node-2"), (2, "node-1")] {
            wait_reauth(&lab, i, peer, "CN=enc cluster CA 2")?;
        }
        std::thread::sleep(Duration::from_secs(2));

        // 3. Retire the old CA.
        std::fs::write(&tmp, &ca2)?;
        replace(&tmp, &trust)?;
        sys::wait_for(
            "both nodes to load the new bundle",
            Duration::from_secs(20),
            || {
                let done = (1..=2).all(|i| {
                    events(&lab, i).is_ok_and(|e| {
                        e.iter()
                            .filter(|e| e.kind == EventKind::TrustChanged)
                            .count()
                            >= 2
                    })
                });
                Ok(done.then_some(()))
            },
        )?;
        for (i, peer) in [(1, "node-2"), (2, "node-1")] {
            wait_reauth(&lab, i, peer, "CN=enc cluster CA 2")?;
        }
        std::thread::sleep(Duration::from_secs(2));
        let tcp = tcp.stop()?;
        let udp = udp.stop(Duration::from_secs(1))?;
        eprintln!("CA rollover under traffic: UDP {udp}; TCP {tcp}");
        ensure!(udp.sent > 1000, "UDP stream too short: {udp}");
        ensure!(udp.lost == 0, "UDP packets lost during the rollover: {udp}");
        ensure!(tcp.is_intact(), "TCP stream damaged: {tcp}");
        ensure!(
            tcp.max_stall < Duration::from_secs(2),
            "TCP stream stalled: {tcp}"
        );

        for i in 1..=2 {
            let e = events(&lab, i)?;
            ensure!(
                e.iter()
                    .any(|e| e.kind == EventKind::Renewal
                        && e.detail.contains("CN=enc cluster CA 2")),
                "node-{i} logged no renewal under the new CA: {e:?}"
            );
            let st = lab.status(i)?;
            ensure!(
                st.certificate.issuer == "CN=enc cluster CA 2",
                "node-{i} still uses a certificate of {}",
                st.certificate.issuer
            );
        }
        Ok(())
    })();
    lab.finish(r);
}
