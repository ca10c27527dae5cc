//! Host-tier tests of `encryption: ipsec` with real agents. This kernel refuses ESP SAs, so
//! the agents fall back to the userspace ESP engine and say so; the kernel XFRM path runs in
//! the VM tier. Root only; under `CI=true` they fail rather than skip without it.

use anyhow::{Context, ensure};
use enc_tests::lab::{CONTROL_PORT, Lab, LabOptions};
use enc_tests::netns::Netns;
use enc_tests::pcap::{self, TCP, UDP};
use enc_tests::{require_root, sys};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

const MARKER: &[u8] = b"enc-ipsec-marker";
/// "enc-ipsec-marker" for `ping -p`.
const MARKER_HEX: &str = "656e632d69707365632d6d61726b6572";
const AUTH_TIMEOUT: Duration = Duration::from_secs(30);
const ESP: u8 = 50;

fn esp_drops(lab: &Lab, i: usize, peer: &str, reason: &str) -> anyhow::Result<u64> {
    let peers = lab.peers(i)?;
    let p = peers
        .iter()
        .find(|p| p.name == peer)
        .context("peer listed")?;
    let ipsec = p
        .ipsec
        .as_ref()
        .with_context(|| format!("{peer} has no IPsec state"))?;
    Ok(ipsec.drops.get(reason).copied().unwrap_or(0))
}

/// Sends a whole IPv4 packet (header included) from inside `ns`.
fn inject(ns: &Netns, packet: Vec<u8>, to: Ipv4Addr) -> anyhow::Result<()> {
    ns.enter(move || -> anyhow::Result<()> {
        use socket2::{Domain, Protocol, Socket, Type};
        let s = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(libc_ipproto_raw())),
        )?;
        s.set_header_included_v4(true)?;
        s.send_to(&packet, &SocketAddr::from((to, 0)).into())?;
        Ok(())
    })?
}

const fn libc_ipproto_raw() -> i32 {
    255
}

#[test]
fn privileged_ipsec_userspace_three_nodes() {
    if !require_root("privileged_ipsec_userspace_three_nodes") {
        return;
    }
    let mut opts = LabOptions::new("i", 3);
    opts.pods = 1;
    opts.encryption = "ipsec";
    let mut lab = Lab::build(&opts).expect("build lab");
    let r = (|| -> anyhow::Result<()> {
        lab.start_all()?;
        for i in 1..=3 {
            let others: Vec<String> = (1..=3)
                .filter(|k| *k != i)
                .map(|k| format!("node-{k}"))
                .collect();
            let refs: Vec<&str> = others.iter().map(String::as_str).collect();
            sys::wait_for(&format!("node-{i} to authenticate"), AUTH_TIMEOUT, || {
                let peers = lab.peers(i)?;
                let ok = refs.iter().all(|n| {
                    peers.iter().any(|p| {
                        p.name == *n
                            && p.auth == enc_api::AuthState::Authenticated
                            && p.ipsec.is_some()
                    })
                });
                Ok(ok.then_some(()))
            })?;
        }
        let st = lab.status(1)?;
        ensure!(
            st.encryption.kind == "ipsec" && st.encryption.backend == "userspace-esp",
            "{:?}",
            st.encryption
        );
        ensure!(
            st.encryption.backend_reason.contains("kernel")
                && st.encryption.backend_reason.contains("userspace ESP"),
            "fallback reason: {}",
            st.encryption.backend_reason
        );
        ensure!(st.encryption.mtu == 1446, "ESP MTU {}", st.encryption.mtu);
        let ipsec = st.encryption.ipsec.as_ref().context("ipsec status")?;
        ensure!(
            ipsec.keys_in_use == ipsec.keys_expected && ipsec.keys_expected == 4,
            "{ipsec:?}"
        );

        let capture = lab.capture("esp")?;
        for i in 1..=3 {
            for k in (1..=3).filter(|k| *k != i) {
                let to = lab.node(k).pods[0].addr;
                ensure!(
                    lab.ping(i, 1, to, 2, MARKER_HEX)?,
                    "node-{i} pod -> node-{k} pod failed"
                );
            }
        }
        let payload: Vec<u8> = MARKER.iter().copied().cycle().take(40_000).collect();
        lab.tcp_transfer((1, 1), (3, 1), &payload)?;
        lab.tcp_transfer((3, 1), (2, 1), &payload)?;
        let frames = capture.stop()?;

        let leaks = frames
            .iter()
            .filter(|f| pcap::contains(&f.data, MARKER))
            .count();
        ensure!(leaks == 0, "{leaks} frames carry the plaintext marker");
        let nodes: Vec<IpAddr> = lab.nodes.iter().map(|n| IpAddr::V4(n.addr)).collect();
        let (mut esp, mut control, mut other) = (0, 0, vec![]);
        for f in &frames {
            let Some(ip) = &f.ip else { continue };
            if ip.dst.is_multicast() || matches!(ip.src, IpAddr::V6(a) if a.is_unicast_link_local())
            {
                continue;
            }
            if !(nodes.contains(&ip.src) && nodes.contains(&ip.dst)) {
                other.push(format!("{ip:?}"));
                continue;
            }
            match ip.proto {
                ESP => esp += 1,
                TCP if ip.has_port(CONTROL_PORT) => control += 1,
                _ => other.push(format!("{ip:?}")),
            }
        }
        ensure!(
            other.is_empty(),
            "unexpected packets: {:?}",
            &other[..other.len().min(5)]
        );
        ensure!(esp >= 24 + 50, "only {esp} ESP packets captured");
        eprintln!(
            "capture: {} frames, {esp} ESP, {control} control, 0 with the marker",
            frames.len()
        );

        // Replay and tamper: re-send an ESP packet node-2 sent to node-1, as is and altered,
        // from another host on the underlay (with node-2's source address).
        let n1 = lab.node(1).addr;
        let n2 = IpAddr::V4(lab.node(2).addr);
        let sample = frames
            .iter()
            .filter(|f| {
                f.ip.as_ref()
                    .is_some_and(|ip| ip.proto == ESP && ip.src == n2 && ip.dst == IpAddr::V4(n1))
            })
            .nth(3)
            .context("no ESP packet from node-2 to node-1 captured")?;
        let packet = sample.data[14..].to_vec();
        let x = lab.underlay_host("10.77.0.99/24")?;

        let replays = esp_drops(&lab, 1, "node-2", "replay")?;
        inject(&x, packet.clone(), n1)?;
        sys::wait_for("the replay to be counted", Duration::from_secs(5), || {
            Ok((esp_drops(&lab, 1, "node-2", "replay")? > replays).then_some(()))
        })?;
        let icv = esp_drops(&lab, 1, "node-2", "icv-failure")?;
        // A fresh sequence number gets past the replay check; since the sequence number is
        // authenticated (AAD), the ICV check must then fail.
        let mut tampered = packet;
        let ihl = usize::from(tampered[0] & 0x0f) * 4;
        let seq = u32::from_be_bytes(tampered[ihl + 4..ihl + 8].try_into()?);
        tampered[ihl + 4..ihl + 8].copy_from_slice(&(seq + 1000).to_be_bytes());
        inject(&x, tampered, n1)?;
        sys::wait_for(
            "the tampered packet to be counted",
            Duration::from_secs(5),
            || Ok((esp_drops(&lab, 1, "node-2", "icv-failure")? > icv).then_some(())),
        )?;
        let text = lab.encctl(1, &["peers"])?;
        eprintln!("encctl peers on node-1:\n{text}");
        ensure!(
            text.contains("esp replay") && text.contains("esp icv-failure"),
            "{text}"
        );
        Ok(())
    })();
    lab.finish(r);
}

/// `encryption.ipsec.encapsulation: udp` end to end through the agent: the userspace engine
/// runs ESP in UDP 4500 (MTU 8 bytes smaller), pods reach each other, and the underlay carries
/// only UDP 4500 <-> 4500 and the control channel, never protocol 50 and never the plaintext.
#[test]
fn privileged_ipsec_userspace_esp_in_udp_two_nodes() {
    if !require_root("privileged_ipsec_userspace_esp_in_udp_two_nodes") {
        return;
    }
    let mut opts = LabOptions::new("u", 2);
    opts.pods = 1;
    opts.encryption = "ipsec";
    opts.implementations = vec![(1, "userspace"), (2, "userspace")];
    opts.ipsec_encapsulation = Some("udp");
    let mut lab = Lab::build(&opts).expect("build lab");
    let r = (|| -> anyhow::Result<()> {
        lab.start_all()?;
        for (i, other) in [(1, "node-2"), (2, "node-1")] {
            sys::wait_for(&format!("node-{i} to authenticate"), AUTH_TIMEOUT, || {
                let peers = lab.peers(i)?;
                let ok = peers.iter().any(|p| {
                    p.name == other
                        && p.auth == enc_api::AuthState::Authenticated
                        && p.ipsec.is_some()
                });
                Ok(ok.then_some(()))
            })?;
        }
        let st = lab.status(1)?;
        ensure!(
            st.encryption.backend == "userspace-esp",
            "{:?}",
            st.encryption
        );
        ensure!(
            st.encryption.mtu == 1438,
            "ESP-in-UDP MTU {}",
            st.encryption.mtu
        );

        let capture = lab.capture("esp-in-udp")?;
        for (i, k) in [(1, 2), (2, 1)] {
            let to = lab.node(k).pods[0].addr;
            ensure!(
                lab.ping(i, 1, to, 2, MARKER_HEX)?,
                "node-{i} pod -> node-{k} pod failed"
            );
        }
        let payload: Vec<u8> = MARKER.iter().copied().cycle().take(200_000).collect();
        lab.tcp_transfer((1, 1), (2, 1), &payload)?;
        lab.tcp_transfer((2, 1), (1, 1), &payload)?;
        let frames = capture.stop()?;

        let leaks = frames
            .iter()
            .filter(|f| pcap::contains(&f.data, MARKER))
            .count();
        ensure!(leaks == 0, "{leaks} frames carry the plaintext marker");
        let nodes: Vec<IpAddr> = lab.nodes.iter().map(|n| IpAddr::V4(n.addr)).collect();
        let (mut esp_in_udp, mut other) = (0, vec![]);
        for f in &frames {
            let Some(ip) = &f.ip else { continue };
            if !(nodes.contains(&ip.src) && nodes.contains(&ip.dst)) {
                continue;
            }
            match ip.proto {
                UDP if ip.sport == Some(4500) && ip.dport == Some(4500) => esp_in_udp += 1,
                TCP if ip.has_port(CONTROL_PORT) => {}
                _ => other.push(format!("{ip:?}")),
            }
        }
        ensure!(
            other.is_empty(),
            "unexpected packets between the nodes: {:?}",
            &other[..other.len().min(5)]
        );
        // The bridge sees UDP GSO trains as one frame each, so count frames, not packets.
        ensure!(
            esp_in_udp >= 10,
            "only {esp_in_udp} ESP-in-UDP frames captured"
        );
        for i in 1..=2 {
            for reason in ["bad-spi", "replay", "icv-failure", "malformed"] {
                let peer = if i == 1 { "node-2" } else { "node-1" };
                ensure!(
                    esp_drops(&lab, i, peer, reason)? == 0,
                    "node-{i}: {reason} drops"
                );
            }
        }
        eprintln!(
            "capture: {} frames, {esp_in_udp} ESP in UDP 4500, 0 with the marker, no protocol 50",
            frames.len()
        );
        Ok(())
    })();
    lab.finish(r);
}
