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
        // The list spreads by gossip: node-1 offers it to node-2 and node-3, and node-3 (which
        // adopts it too: it is signed by the CA, whoever carries it) offers it on to node-2.
        // Either offer may reach node-2 first; both are the control channel, not the operator.
        let e2 = events(&lab, 2)?;
        ensure!(
            e2.iter().any(|e| e.kind == EventKind::Revocation
                && (e.detail.contains("from peer node-1")
                    || e.detail.contains("from peer node-3"))),
            "node-2 events do not show the list arriving from a peer: {e2:?}"
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

/// `encctl token create` for node `i` of the lab's CA: (token id, secret).
fn create_token(lab: &Lab, encctl: &str, i: usize) -> anyhow::Result<(String, String)> {
    let ca = lab.dir.path().join("ca");
    let out = sys::run(&[
        encctl,
        "token",
        "create",
        "--ca",
        ca.to_str().context("path")?,
        "--node",
        &format!("node-{i}"),
        "--ip",
        &lab.node(i).addr.to_string(),
        "--ttl",
        "10m",
        "-o",
        "json",
    ])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok((
        v["id"].as_str().context("token id")?.to_owned(),
        v["token"].as_str().context("token")?.to_owned(),
    ))
}

/// Runs `encctl cert enrol` in node `i`'s namespace against the issuer, writing to `out`.
fn enrol(
    lab: &Lab,
    encctl: &str,
    i: usize,
    issuer: &str,
    token_file: &std::path::Path,
    out: &std::path::Path,
) -> anyhow::Result<std::process::Output> {
    let ca = lab.dir.path().join("ca/ca.crt");
    sys::output_in(
        lab.node(i).ns.name(),
        &[
            encctl,
            "cert",
            "enrol",
            "--issuer",
            issuer,
            "--token",
            &format!("@{}", token_file.to_str().context("path")?),
            "--node",
            &format!("node-{i}"),
            "--ip",
            &lab.node(i).addr.to_string(),
            "--ca-cert",
            ca.to_str().context("path")?,
            "--out",
            out.to_str().context("path")?,
        ],
    )
}

/// The renewal status of node `i`.
fn renewal(lab: &Lab, i: usize) -> anyhow::Result<enc_api::RenewalInfo> {
    lab.status(i)?
        .renewal
        .with_context(|| format!("node-{i} status has no renewal section"))
}

/// The serial node `i` shows for `peer`, if authenticated.
fn peer_serial(lab: &Lab, i: usize, peer: &str) -> anyhow::Result<Option<String>> {
    Ok(lab
        .peers(i)?
        .into_iter()
        .find(|p| p.name == peer && p.auth == AuthState::Authenticated)
        .and_then(|p| p.certificate)
        .map(|c| c.serial))
}

/// Online enrolment and automatic renewal with an agent in the issuer role (node-3).
/// node-1 and node-2 enrol over the network with join tokens (`encctl cert enrol`); a reused
/// and an expired token are refused. Their certificates live 20 s and are renewed at half
/// their lifetime by the agents themselves, at least twice each, under a sequence-numbered
/// UDP stream and a TCP stream between their pods: no UDP packet is lost and the peer sees
/// each new serial. Then the issuer stops: renewal fails, is retried with backoff and the
/// old certificate stays in use; when the issuer is back the next retry succeeds.
#[test]
fn privileged_online_enrolment_and_automatic_renewal_under_traffic() {
    use enc_tests::traffic::{TcpFlow, UdpStream};
    if !require_root("privileged_online_enrolment_and_automatic_renewal_under_traffic") {
        return;
    }
    const ISSUER: &str = "10.77.0.3:7946";
    let mut opts = LabOptions::new("rn", 3);
    opts.pods = 1;
    opts.extra = vec![(
        3,
        format!("issuer:\n  listen: {ISSUER}\n  caDir: ca\n  certLifetime: 20s\n"),
    )];
    opts.tls_extra = (1..=3)
        .map(|i| (i, format!("  renewal:\n    issuer: {ISSUER}\n")))
        .collect();
    let mut lab = Lab::build(&opts).expect("build lab");
    let r = (|| -> anyhow::Result<()> {
        let started = Instant::now();
        let encctl = bin_dir()?.join("encctl");
        let encctl = encctl.to_str().context("path")?.to_owned();
        let dir = lab.dir.path().to_owned();
        lab.start_agent(3)?;

        // Online enrolment of node-1 and node-2.
        let mut first_token = None;
        for i in [1, 2] {
            let (_, secret) = create_token(&lab, &encctl, i)?;
            let file = dir.join(format!("token-{i}"));
            std::fs::write(&file, &secret)?;
            let out = dir.join(format!("enrol-{i}"));
            let o = enrol(&lab, &encctl, i, ISSUER, &file, &out)?;
            ensure!(
                o.status.success(),
                "enrol node-{i}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            ensure!(!text.contains("PRIVATE"), "enrol printed key material");
            let key = out.join(format!("node-{i}.key"));
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(&key)?.permissions().mode() & 0o777;
                ensure!(mode == 0o600, "key mode {mode:o}");
            }
            replace(&key, &dir.join(format!("certs/node-{i}.key")))?;
            replace(
                &out.join(format!("node-{i}.crt")),
                &dir.join(format!("certs/node-{i}.crt")),
            )?;
            if i == 1 {
                first_token = Some(file);
            }
        }
        // A reused token is refused.
        let o = enrol(
            &lab,
            &encctl,
            1,
            ISSUER,
            &first_token.context("token")?,
            &dir.join("enrol-reused"),
        )?;
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        ensure!(
            !o.status.success() && err.contains("already used"),
            "reused token: {err}"
        );
        eprintln!("reused token: {}", err.trim());
        // An expired token is refused (its expiry moved into the past in tokens.jsonl).
        let (id, secret) = create_token(&lab, &encctl, 1)?;
        let tokens = dir.join("ca/tokens.jsonl");
        let text = std::fs::read_to_string(&tokens)?;
        let mut lines = Vec::new();
        for l in text.lines() {
            let mut v: serde_json::Value = serde_json::from_str(l)?;
            if v["id"] == id.as_str() {
                v["expiresAt"] = "2020-01-01T00:00:00Z".into();
            }
            lines.push(v.to_string());
        }
        std::fs::write(&tokens, lines.join("\n") + "\n")?;
        let file = dir.join("token-expired");
        std::fs::write(&file, &secret)?;
        let o = enrol(&lab, &encctl, 1, ISSUER, &file, &dir.join("enrol-expired"))?;
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        ensure!(
            !o.status.success() && err.contains("expired"),
            "expired token: {err}"
        );
        ensure!(!err.contains(&secret), "the error repeats the token");
        eprintln!("expired token: {}", err.trim());

        lab.start_agent(1)?;
        lab.start_agent(2)?;
        wait_mesh(&lab, 3)?;
        let enrolled = lab.status(1)?.certificate.serial;
        ensure!(
            lab.status(1)?.certificate.not_after < lab.status(3)?.certificate.not_after,
            "node-1 does not run the short-lived enrolled certificate"
        );

        let (n1, n2) = (lab.node(1), lab.node(2));
        let udp = UdpStream::start(&n1.pods[0].ns, &n2.pods[0].ns, n2.pods[0].addr, 500, 200)?;
        let tcp = TcpFlow::start(&n2.pods[0].ns, &n1.pods[0].ns, n1.pods[0].addr, 100_000)?;

        // Two automatic renewals on each node; node-2 sees node-1's new serials.
        let mut seen = vec![enrolled.clone()];
        sys::wait_for(
            "two renewals on node-1 and node-2",
            Duration::from_secs(40),
            || {
                if let Some(s) = peer_serial(&lab, 2, "node-1")?
                    && !seen.contains(&s)
                {
                    seen.push(s);
                }
                let (r1, r2) = (renewal(&lab, 1)?, renewal(&lab, 2)?);
                Ok((r1.renewals >= 2 && r2.renewals >= 2).then_some(()))
            },
        )?;
        let current = lab.status(1)?.certificate.serial;
        sys::wait_for(
            "node-2 to authenticate node-1's newest certificate",
            Duration::from_secs(10),
            || Ok((peer_serial(&lab, 2, "node-1")? == Some(current.clone())).then_some(())),
        )?;
        if !seen.contains(&current) {
            seen.push(current.clone());
        }
        ensure!(
            seen.len() >= 3,
            "node-2 saw node-1 with serials {seen:?} only"
        );
        eprintln!("node-2 saw node-1 under {} serials: {seen:?}", seen.len());

        // The issuer goes away: renewal fails and is retried, the old certificate stays.
        lab.stop_agent(3)?;
        let before = lab.status(1)?.certificate.serial;
        let failing = sys::wait_for(
            "node-1 to fail renewing twice",
            Duration::from_secs(20),
            || {
                let r = renewal(&lab, 1)?;
                Ok((r.failures >= 2).then_some(r))
            },
        )?;
        let err = failing.last_error.clone().unwrap_or_default();
        ensure!(err.contains(ISSUER), "last error: {err}");
        ensure!(
            lab.status(1)?.certificate.serial == before,
            "node-1 changed certificate without the issuer"
        );
        ensure!(
            peer_serial(&lab, 2, "node-1")? == Some(before.clone()),
            "node-2 lost node-1 while the issuer was down"
        );
        let status_text = lab.encctl(1, &["status"])?;
        ensure!(
            status_text.contains("renewal:") && status_text.contains("failing"),
            "status: {status_text}"
        );
        eprintln!(
            "{}",
            status_text
                .lines()
                .filter(|l| l.contains("renewal") || l.contains("failing"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        let failed_events = events(&lab, 1)?
            .into_iter()
            .filter(|e| e.kind == EventKind::RenewalFailed)
            .count();
        ensure!(failed_events >= 2, "{failed_events} renewal-failed events");

        // The issuer is back: the next retry succeeds.
        lab.start_agent(3)?;
        let back = Instant::now();
        sys::wait_for(
            "node-1 to renew once the issuer is back",
            Duration::from_secs(15),
            || {
                let r = renewal(&lab, 1)?;
                Ok((r.failures == 0 && r.renewals > failing.renewals).then_some(()))
            },
        )?;
        let after = lab.status(1)?.certificate.serial;
        ensure!(after != before, "serial unchanged after recovery");
        eprintln!(
            "renewal recovered {} ms after the issuer restarted; {failed_events} failed attempts logged",
            back.elapsed().as_millis()
        );
        sys::wait_for(
            "node-2 to authenticate node-1's recovered certificate",
            Duration::from_secs(10),
            || Ok((peer_serial(&lab, 2, "node-1")? == Some(after.clone())).then_some(())),
        )?;

        let tcp = tcp.stop()?;
        let udp = udp.stop(Duration::from_secs(1))?;
        let r1 = renewal(&lab, 1)?;
        let r2 = renewal(&lab, 2)?;
        eprintln!(
            "renewals: node-1 {}, node-2 {}; UDP {udp}; TCP {tcp}; wall time {} s",
            r1.renewals,
            r2.renewals,
            started.elapsed().as_secs()
        );
        ensure!(udp.sent > 1000, "UDP stream too short: {udp}");
        ensure!(udp.lost == 0, "UDP packets lost during renewals: {udp}");
        ensure!(tcp.is_intact(), "TCP stream damaged: {tcp}");

        let e1 = events(&lab, 1)?;
        ensure!(
            e1.iter()
                .filter(|e| e.kind == EventKind::Renewal && e.detail.contains("online from issuer"))
                .count()
                >= 3,
            "node-1 renewal events: {e1:?}"
        );
        let e3 = events(&lab, 3)?;
        ensure!(
            e3.iter().any(|e| e.kind == EventKind::Issued),
            "issuer events: {e3:?}"
        );
        let ledger = std::fs::read_to_string(dir.join("ca/issued.jsonl"))?;
        ensure!(ledger.contains(&after), "ledger lacks {after}");
        Ok(())
    })();
    lab.finish(r);
}
