//! Host-tier integration tests: real `enc-agent` processes in network namespaces on this
//! kernel (boringtun on TUN; no kernel WireGuard here). Every test here needs root; under
//! `CI=true` it fails rather than skips without it.

use anyhow::{Context, bail, ensure};
use enc_api::AuthState;
use enc_tests::lab::{CONTROL_PORT, Lab, LabOptions, WG_PORT, metric};
use enc_tests::pcap::{self, TCP, UDP};
use enc_tests::require_root;
use std::net::IpAddr;
use std::time::Duration;

/// Marker carried in every test payload; it must never be seen on the underlay.
const MARKER: &[u8] = b"enc-plaintext-marker";
/// The same marker for `ping -p` (16 bytes max, hex): "enc-plaintext-ma".
const MARKER_HEX: &str = "656e632d706c61696e746578742d6d61";
const AUTH_TIMEOUT: Duration = Duration::from_secs(30);

fn wait_mesh(lab: &Lab, nodes: &[usize]) -> anyhow::Result<()> {
    for &i in nodes {
        let others: Vec<String> = nodes
            .iter()
            .filter(|&&k| k != i)
            .map(|k| format!("node-{k}"))
            .collect();
        let refs: Vec<&str> = others.iter().map(String::as_str).collect();
        lab.wait_authenticated(i, &refs, AUTH_TIMEOUT)?;
    }
    Ok(())
}

/// Pings every remote pod from every pod; returns the failures.
fn ping_all(lab: &Lab, nodes: &[usize]) -> anyhow::Result<Vec<String>> {
    let mut failures = vec![];
    for &i in nodes {
        for j in 1..=lab.node(i).pods.len() {
            for &k in nodes.iter().filter(|&&k| k != i) {
                for dst in &lab.node(k).pods {
                    if !lab.ping(i, j, dst.addr, 2, MARKER_HEX)? {
                        failures.push(format!("node-{i} pod {j} -> {}", dst.addr));
                    }
                }
            }
        }
    }
    Ok(failures)
}

#[test]
fn privileged_three_nodes_encrypted_pod_to_pod() {
    if !require_root("privileged_three_nodes_encrypted_pod_to_pod") {
        return;
    }
    let mut lab = Lab::build(&LabOptions::new("a", 3)).expect("build lab");
    let r = (|| -> anyhow::Result<()> {
        lab.start_all()?;
        wait_mesh(&lab, &[1, 2, 3])?;

        let capture = lab.capture("mesh")?;
        let failures = ping_all(&lab, &[1, 2, 3])?;
        ensure!(failures.is_empty(), "pings failed: {failures:?}");
        let mut payload = Vec::new();
        for _ in 0..2000 {
            payload.extend_from_slice(MARKER);
        }
        for (from, to) in [((1, 1), (2, 2)), ((2, 1), (3, 1)), ((3, 2), (1, 2))] {
            lab.tcp_transfer(from, to, &payload)
                .with_context(|| format!("TCP {from:?} -> {to:?}"))?;
        }
        let frames = capture.stop()?;

        // No plaintext: the marker never appears on the underlay.
        let leaks = frames
            .iter()
            .filter(|f| pcap::contains(&f.data, MARKER) || pcap::contains(&f.data, &MARKER[..16]))
            .count();
        ensure!(
            leaks == 0,
            "{leaks} frames on the underlay carry the plaintext marker"
        );

        // Only the control channel and WireGuard travel between nodes.
        let node_addrs: Vec<IpAddr> = lab.nodes.iter().map(|n| IpAddr::V4(n.addr)).collect();
        let (mut control, mut wg, mut wg_bytes, mut other) = (0, 0, 0, vec![]);
        for f in &frames {
            let Some(ip) = &f.ip else { continue };
            // Neighbour discovery and MLD of the veths themselves: link-local housekeeping.
            if ip.dst.is_multicast() || matches!(ip.src, IpAddr::V6(a) if a.is_unicast_link_local())
            {
                continue;
            }
            if !(node_addrs.contains(&ip.src) && node_addrs.contains(&ip.dst)) {
                other.push(format!("{ip:?}"));
                continue;
            }
            match ip.proto {
                TCP if ip.has_port(CONTROL_PORT) => control += 1,
                UDP if ip.sport == Some(WG_PORT) && ip.dport == Some(WG_PORT) => {
                    wg += 1;
                    wg_bytes += f.data.len();
                }
                _ => other.push(format!("{ip:?}")),
            }
        }
        ensure!(
            other.is_empty(),
            "unexpected packets on the underlay: {:?}",
            &other[..other.len().min(5)]
        );
        // 24 pod pairs x 2 pings x 2 directions, each its own WireGuard packet, plus three
        // 40 kB TCP transfers. The transfers are counted in bytes: the sender's TSO
        // super-packets leave as UDP GSO trains, which the capture may see as one frame.
        let tcp_bytes = 3 * payload.len();
        ensure!(
            wg >= 96 && wg_bytes >= tcp_bytes,
            "only {wg} WireGuard packets, {wg_bytes} bytes captured (want 96 packets and the \
             {tcp_bytes} bytes of the TCP transfers; {} frames, {control} control); the capture \
             missed the traffic",
            frames.len()
        );
        eprintln!(
            "capture: {} frames, {wg} WireGuard ({wg_bytes} bytes), {control} control, 0 with the marker",
            frames.len()
        );

        // Status: both ends of each pair show the same key id, handshakes and counters.
        for i in 1..=3 {
            let peers = lab.peers(i)?;
            for p in &peers {
                let wgp = p
                    .wireguard
                    .as_ref()
                    .with_context(|| format!("node-{i}: {} has no WireGuard state", p.name))?;
                ensure!(
                    wgp.last_handshake_seconds.is_some(),
                    "node-{i}: no handshake with {}",
                    p.name
                );
                ensure!(
                    wgp.rx_bytes > 0 && wgp.tx_bytes > 0,
                    "node-{i}: no bytes with {}",
                    p.name
                );
                let cert = p.certificate.as_ref().context("no certificate shown")?;
                ensure!(
                    cert.subject.contains(&p.name),
                    "subject {} does not name {}",
                    cert.subject,
                    p.name
                );
                let k = lab
                    .node(p.name.trim_start_matches("node-").parse::<usize>()?)
                    .index;
                let back = lab.peers(k)?;
                let mirror = back
                    .iter()
                    .find(|q| q.name == format!("node-{i}"))
                    .context("mirror peer")?;
                ensure!(
                    mirror.key == p.key,
                    "key ids differ between node-{i} and {}: {:?} vs {:?}",
                    p.name,
                    p.key,
                    mirror.key
                );
            }
            let st = lab.status(i)?;
            ensure!(
                st.peers.authenticated == 2 && st.peers.failed == 0,
                "node-{i} counts {:?}",
                st.peers
            );
            ensure!(
                st.encryption.backend == "boringtun" && st.encryption.mtu == 1440,
                "{:?}",
                st.encryption
            );
            // The metrics agree: every peer authenticated, with traffic and a certificate.
            let m = lab.metrics(i)?;
            ensure!(
                metric(&m, r#"enc_peers{state="authenticated"}"#) == Some(2.0)
                    && metric(&m, r#"enc_peers{state="failed"}"#) == Some(0.0),
                "node-{i} metrics:\n{m}"
            );
            for k in (1..=3).filter(|&k| k != i) {
                let peer = format!("node-{k}");
                let series = |name: &str| metric(&m, &format!("{name}{{peer=\"{peer}\"}}"));
                ensure!(
                    series("enc_peer_authenticated") == Some(1.0)
                        && series("enc_peer_tx_bytes_total").is_some_and(|b| b > 0.0)
                        && series("enc_peer_rx_bytes_total").is_some_and(|b| b > 0.0)
                        && series("enc_peer_last_handshake_seconds").is_some(),
                    "node-{i} metrics for {peer}:\n{m}"
                );
                ensure!(
                    metric(
                        &m,
                        &format!("enc_certificate_expiry_timestamp_seconds{{node=\"{peer}\"}}")
                    )
                    .is_some(),
                    "node-{i} metrics lack {peer}'s certificate expiry:\n{m}"
                );
            }
            ensure!(
                metric(
                    &m,
                    &format!("enc_certificate_expiry_timestamp_seconds{{node=\"node-{i}\"}}")
                )
                .is_some(),
                "node-{i} metrics lack its own certificate expiry:\n{m}"
            );
        }
        // A packet routed into the WireGuard device for an address no peer owns is a device
        // drop of no peer: counted, exported and shown by status.
        let dev = lab.status(1)?.encryption.interface;
        let ns = &lab.node(1).ns;
        ns.run(&["ip", "route", "add", "10.255.255.0/24", "dev", &dev])?;
        let _ = ns.run(&["ping", "-c", "3", "-i", "0.2", "-W", "1", "10.255.255.1"]);
        let series = format!(
            r#"enc_device_drops_total{{device="{dev}",implementation="boringtun",reason="no-route"}}"#
        );
        let m = lab.metrics(1)?;
        ensure!(
            metric(&m, &series).is_some_and(|n| n >= 3.0),
            "node-1 metrics: {series} should count the 3 unroutable pings:\n{m}"
        );
        let st = lab.status(1)?;
        ensure!(
            st.encryption
                .device_drops
                .get("no-route")
                .is_some_and(|&n| n >= 3),
            "node-1 status device drops {:?}",
            st.encryption.device_drops
        );
        let text = lab.encctl(1, &["peers"])?;
        eprintln!("encctl peers on node-1:\n{text}");
        ensure!(
            text.contains("authenticated"),
            "text output lacks states:\n{text}"
        );
        for secretish in ["PrivateKey", "preshared", "psk"] {
            ensure!(
                !text.to_lowercase().contains(&secretish.to_lowercase()),
                "peers output mentions {secretish}"
            );
        }
        Ok(())
    })();
    lab.finish(r);
}

/// Waits until node `i` shows `peer` failed with a reason containing `why`, with no keys.
fn wait_refused(lab: &Lab, i: usize, peer: &str, why: &str) -> anyhow::Result<()> {
    let reason =
        enc_tests::sys::wait_for(&format!("node-{i} to refuse {peer}"), AUTH_TIMEOUT, || {
            let peers = lab.peers(i)?;
            let p = peers
                .iter()
                .find(|p| p.name == peer)
                .with_context(|| format!("{peer} not listed"))?;
            match &p.auth {
                AuthState::Failed { reason } => {
                    ensure!(
                        p.wireguard.is_none() && p.key.is_none(),
                        "{peer} has keys on node-{i}"
                    );
                    Ok(Some(reason.clone()))
                }
                other => bail!("{peer} is {other:?}"),
            }
        })?;
    ensure!(
        reason.contains(why),
        "node-{i} refuses {peer} for {reason:?}, expected {why:?}"
    );
    eprintln!("node-{i} refuses {peer}: {reason}");
    Ok(())
}

#[test]
fn privileged_foreign_ca_and_impostor_are_refused() {
    if !require_root("privileged_foreign_ca_and_impostor_are_refused") {
        return;
    }
    let mut opts = LabOptions::new("b", 5);
    opts.pods = 1;
    opts.foreign = vec![4];
    // node-5's address is held by a node with a genuine cluster certificate for node-9.
    opts.impostors = vec![(5, "node-9".into())];
    let mut lab = Lab::build(&opts).expect("build lab");
    let r = (|| -> anyhow::Result<()> {
        lab.start_all()?;
        wait_mesh(&lab, &[1, 2, 3])?;
        // Every cluster node shows node-4 and the impostor failed, with the reason, and
        // gives them no keys.
        for i in 1..=3 {
            wait_refused(&lab, i, "node-4", "not issued by the cluster CA")?;
            wait_refused(&lab, i, "node-5", "does not name node \"node-5\"")?;
        }
        // node-4 sees the others fail too: their certificates are not from its CA.
        enc_tests::sys::wait_for("node-4 to refuse everyone", AUTH_TIMEOUT, || {
            let peers = lab.peers(4)?;
            let failed = peers
                .iter()
                .filter(|p| matches!(p.auth, AuthState::Failed { .. }))
                .count();
            if failed != 4 {
                let states: Vec<_> = peers.iter().map(|p| (&p.name, &p.auth)).collect();
                bail!("node-4 sees {states:?}");
            }
            Ok(Some(()))
        })?;
        let text = lab.encctl(1, &["peers"])?;
        eprintln!("encctl peers on node-1:\n{text}");
        ensure!(
            text.lines()
                .any(|l| l.starts_with("node-4") && l.contains("failed")),
            "{text}"
        );
        // No traffic between node-4's pods and the cluster, in either direction.
        let n1 = lab.node(1).pods[0].addr;
        let n4 = lab.node(4).pods[0].addr;
        ensure!(
            !lab.ping(4, 1, n1, 2, MARKER_HEX)?,
            "node-4's pod reached node-1's pod"
        );
        ensure!(
            !lab.ping(1, 1, n4, 2, MARKER_HEX)?,
            "node-1's pod reached node-4's pod"
        );
        // The cluster itself still works.
        let failures = ping_all(&lab, &[1, 2, 3])?;
        ensure!(failures.is_empty(), "pings failed: {failures:?}");
        Ok(())
    })();
    lab.finish(r);
}

#[test]
fn privileged_agent_restart_restores_traffic() {
    if !require_root("privileged_agent_restart_restores_traffic") {
        return;
    }
    let mut opts = LabOptions::new("c", 2);
    opts.pods = 1;
    let mut lab = Lab::build(&opts).expect("build lab");
    let r = (|| -> anyhow::Result<()> {
        lab.start_all()?;
        wait_mesh(&lab, &[1, 2])?;
        let to2 = lab.node(2).pods[0].addr;
        ensure!(
            lab.ping(1, 1, to2, 2, MARKER_HEX)?,
            "no traffic before the restart"
        );
        let key_before = lab.peers(1)?[0]
            .wireguard
            .clone()
            .context("wg state")?
            .public_key;

        let drops_before = lab
            .counters(2, "node-1")?
            .drops
            .get("peer-not-authenticated")
            .copied()
            .unwrap_or(0);
        lab.stop_agent(2)?;
        // A clean stop removes what the agent configured: its routes, rules and device.
        for what in [
            &["route", "show", "table", "all", "proto", "229"][..],
            &["rule", "show"][..],
        ] {
            let mut args = vec!["ip"];
            args.extend_from_slice(what);
            let out = lab.node(2).ns.run(&args)?;
            let text = String::from_utf8_lossy(&out.stdout);
            ensure!(
                !text.contains("229") || what[0] == "route" && text.trim().is_empty(),
                "left behind after a clean stop: {text}"
            );
        }
        // ...but strict mode stays: node-2's pinned eBPF programs drop its pod's traffic
        // towards node-1 while the agent is away, and count it in the pinned maps.
        let to1 = lab.node(1).pods[0].addr;
        ensure!(
            !lab.ping(2, 1, to1, 3, MARKER_HEX)?,
            "node-2's pod reached node-1 while node-2's agent was down"
        );
        let link =
            enc_tests::sys::output_in(lab.node(2).ns.name(), &["ip", "link", "show", "enc-wg0"])?;
        ensure!(
            !link.status.success(),
            "enc-wg0 left behind after a clean stop"
        );
        // Fail closed while it is down: node-1 routes into WireGuard, nothing answers, nothing leaks.
        let capture = lab.capture("down")?;
        ensure!(
            !lab.ping(1, 1, to2, 2, MARKER_HEX)?,
            "traffic passed while node-2's agent was down"
        );
        let frames = capture.stop()?;
        ensure!(
            !frames
                .iter()
                .any(|f| pcap::contains(&f.data, &MARKER[..16])),
            "plaintext while the peer was down"
        );

        lab.start_agent(2)?;
        let drops_after = lab
            .counters(2, "node-1")?
            .drops
            .get("peer-not-authenticated")
            .copied()
            .unwrap_or(0);
        ensure!(
            drops_after >= drops_before + 3,
            "drops while the agent was down were not counted in the pinned maps ({drops_before} -> {drops_after})"
        );
        wait_mesh(&lab, &[1, 2])?;
        let ok =
            enc_tests::sys::wait_for("traffic after the restart", Duration::from_secs(20), || {
                Ok(lab.ping(1, 1, to2, 1, MARKER_HEX)?.then_some(()))
            });
        ok?;
        let key_after = lab.peers(1)?[0]
            .wireguard
            .clone()
            .context("wg state")?
            .public_key;
        ensure!(
            key_before != key_after,
            "node-2 kept its WireGuard key across a restart"
        );
        // `enc-agent --cleanup` removes everything, the pinned eBPF state included.
        lab.stop_agent(2)?;
        let pin_dir = lab.bpffs.path().join("node-2");
        ensure!(pin_dir.exists(), "no pinned state at {}", pin_dir.display());
        let agent = enc_tests::lab::bin_dir()?.join("enc-agent");
        lab.node(2).ns.run(&[
            &agent.to_string_lossy(),
            "--config",
            &lab.node(2).config.to_string_lossy(),
            "--cleanup",
        ])?;
        ensure!(!pin_dir.exists(), "--cleanup left {}", pin_dir.display());
        // With node-2's programs gone, plaintext from its pod leaves unchecked; node-1's
        // underlay guard (still running) is what drops it now.
        let guard = |lab: &Lab| -> anyhow::Result<u64> {
            Ok(lab
                .counters(1, "node-2")?
                .drops
                .get("plaintext-from-underlay")
                .copied()
                .unwrap_or(0))
        };
        let before = guard(&lab)?;
        lab.node(2)
            .ns
            .run(&["ip", "route", "add", "10.78.1.0/24", "via", "10.77.0.1"])?;
        ensure!(
            !lab.ping(2, 1, to1, 3, MARKER_HEX)?,
            "plaintext crossed into node-1"
        );
        let after = guard(&lab)?;
        ensure!(
            after >= before + 3,
            "node-1 saw {} plaintext packets; node-2's sentinel still active?",
            after - before
        );
        Ok(())
    })();
    lab.finish(r);
}
