//! Scenarios shared by the host tier (`tests/tests/*.rs`) and the VM tier
//! ([`crate::vm::scenario`]): one harness, two kernels. Each takes a [`Lab`] whose agents run
//! and asserts what the issue it belongs to promises.

use crate::lab::Lab;
use crate::traffic::{PLAINTEXT_MARKER, TcpFlow, TcpReport, UdpReport, UdpStream};
use crate::{pcap, sys};
use anyhow::{Context, ensure};
use std::time::{Duration, Instant};

/// Waits until each of the first `nodes` nodes lists every other as authenticated with an
/// outbound epoch and no rotation under way.
pub fn wait_all_authenticated(lab: &Lab, nodes: usize, timeout: Duration) -> anyhow::Result<()> {
    for i in 1..=nodes {
        sys::wait_for(&format!("node-{i} to authenticate"), timeout, || {
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

/// Packets the kernel dropped because a CPU's input backlog (`net.core.netdev_max_backlog`)
/// was full, summed over CPUs: the second column of `/proc/net/softnet_stat` (global, not per
/// namespace). 0 where the file cannot be read.
pub fn backlog_drops() -> u64 {
    std::fs::read_to_string("/proc/net/softnet_stat")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|hex| u64::from_str_radix(hex, 16).ok())
        .sum()
}

/// Outbound epoch, key id and inbound epochs that node `i` has with `peer`.
pub fn epoch_with(lab: &Lab, i: usize, peer: &str) -> anyhow::Result<(u32, String, Vec<u32>)> {
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

/// Load and rotations of [`rotation_under_load`].
#[derive(Clone, Debug)]
pub struct RotationLoad {
    /// Rotations, back to back.
    pub rotations: u32,
    /// Packets per second of the sequence-numbered UDP stream.
    pub udp_pps: u32,
    /// Bytes per second of the TCP stream.
    pub tcp_rate: u64,
    /// Limit of one `encctl rotate --wait`.
    pub rotation_timeout: &'static str,
    /// Longest pause of the TCP stream that still counts as not stalled.
    pub max_tcp_stall: Duration,
    /// Rotate with plain `encctl rotate`, which also rolls a boringtun node's static key;
    /// `false` rotates with `--peer`, which moves the pair's epoch (and preshared key) only.
    pub static_rolls: bool,
}

impl Default for RotationLoad {
    fn default() -> Self {
        Self {
            rotations: 20,
            udp_pps: 3000,
            tcp_rate: 4_000_000,
            rotation_timeout: "20s",
            max_tcp_stall: Duration::from_secs(1),
            static_rolls: true,
        }
    }
}

/// What [`rotation_under_load`] saw.
#[derive(Debug)]
pub struct RotationOutcome {
    /// How long the rotations took, all together.
    pub took: Duration,
    /// The UDP stream node-1 pod → node-2 pod.
    pub udp: UdpReport,
    /// The TCP stream node-2 pod → node-1 pod.
    pub tcp: TcpReport,
    /// Frames captured on the underlay.
    pub frames: usize,
}

impl std::fmt::Display for RotationOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rotations in {:.1?}; {}; {}; {} underlay frames",
            self.took, self.udp, self.tcp, self.frames
        )
    }
}

/// Issue 5's load test between node-1 and node-2 of a running lab (pod 1 of each): a
/// sequence-numbered UDP stream one way and a TCP stream the other while `load.rotations`
/// rotations run back to back, asked alternately by each node. Fails on any lost UDP
/// packet, a damaged or stalled TCP stream, a plaintext marker on the underlay, ends that
/// disagree on the epoch or key afterwards, or old epochs that are not retired. Where the
/// encryption is WireGuard, the static keys must have rolled too.
pub fn rotation_under_load(lab: &Lab, load: &RotationLoad) -> anyhow::Result<RotationOutcome> {
    let (start_epoch, _, _) = epoch_with(lab, 1, "node-2")?;
    // Static keys roll only on boringtun (kernel WireGuard keeps its one key; see
    // `enc_agent::app::Shared::roll_wg_key`).
    let boringtun = [lab.status(1)?, lab.status(2)?]
        .map(|s| s.encryption.kind == "wireguard" && s.encryption.backend == "boringtun");
    let keys_before = [
        lab.status(1)?.encryption.public_key,
        lab.status(2)?.encryption.public_key,
    ];

    let capture = lab.capture("rotation")?;
    let (n1, n2) = (lab.node(1), lab.node(2));
    let udp = UdpStream::start(
        &n1.pods[0].ns,
        &n2.pods[0].ns,
        n2.pods[0].addr,
        load.udp_pps,
        200,
    )?;
    let tcp = TcpFlow::start(
        &n2.pods[0].ns,
        &n1.pods[0].ns,
        n1.pods[0].addr,
        load.tcp_rate,
    )?;
    let backlog_before = backlog_drops();
    let udp_began = Instant::now();
    let udp_began_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    std::thread::sleep(Duration::from_secs(1));

    let began = Instant::now();
    // When each rotation ran, in seconds after the UDP stream began: printed beside the lost
    // ranges (sequence number / rate is the send time) when packets are lost.
    let mut windows = Vec::new();
    for k in 0..load.rotations {
        let asked = udp_began.elapsed().as_secs_f64();
        // Alternate the node that asks: node-1 leads the pair, node-2 asks it to rotate.
        let (node, other) = if k % 2 == 0 { (1, 2) } else { (2, 1) };
        let other = format!("node-{other}");
        let mut args = vec!["rotate", "--wait", "--timeout", load.rotation_timeout];
        if !load.static_rolls {
            args.extend(["--peer", other.as_str()]);
        }
        let out = lab.encctl_output(node, &args)?;
        ensure!(
            out.status.success(),
            "rotation {} from node-{node} failed: {}{}",
            k + 1,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        windows.push(format!(
            "{}: {asked:.2}-{:.2}",
            k + 1,
            udp_began.elapsed().as_secs_f64()
        ));
    }
    let took = began.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let tcp = tcp.stop();
    let udp = udp.stop(Duration::from_secs(1))?;
    let frames = capture.stop()?;
    let lost_at = |udp: &crate::traffic::UdpReport| -> String {
        udp.lost_ranges
            .iter()
            .map(|r| format!("{:.2}", *r.start() as f64 / f64::from(load.udp_pps)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // A failed TCP stream still says what the UDP stream saw and when the rotations ran.
    let tcp = tcp.with_context(|| {
        format!(
            "UDP meanwhile: {udp}; lost ranges began at [{}] s after the stream began (unix \
             time {:.3}); rotations (asked-answered, s) [{}]",
            lost_at(&udp),
            udp_began_unix.as_secs_f64(),
            windows.join(", ")
        )
    })?;
    let outcome = RotationOutcome {
        took,
        frames: frames.len(),
        udp,
        tcp,
    };
    let (udp, tcp) = (&outcome.udp, &outcome.tcp);

    ensure!(
        udp.sent > u64::from(load.udp_pps),
        "UDP stream too short: {udp}"
    );
    if udp.lost > 0 {
        anyhow::bail!(
            "UDP packets lost during rotation: {udp}; {tcp}; the lost ranges began at [{}] s after \
             the stream began (unix time {:.3}); rotations (asked-answered, s) [{}]; \
             {} packets dropped meanwhile by full per-CPU backlog queues \
             (/proc/net/softnet_stat, all namespaces)",
            lost_at(udp),
            udp_began_unix.as_secs_f64(),
            windows.join(", "),
            backlog_drops().saturating_sub(backlog_before)
        );
    }
    ensure!(tcp.is_intact(), "TCP stream damaged: {tcp}");
    ensure!(
        tcp.max_stall < load.max_tcp_stall,
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

    // Both ends ended on one epoch, `rotations` above the start, with the same key and only
    // that epoch installed once the grace period is over.
    sys::wait_for("old epochs to retire", Duration::from_secs(20), || {
        let a = epoch_with(lab, 1, "node-2")?;
        let b = epoch_with(lab, 2, "node-1")?;
        Ok((a.2.len() == 1 && b.2.len() == 1).then_some((a, b)))
    })
    .and_then(|(a, b)| {
        ensure!(
            a.0 == start_epoch + load.rotations && b.0 == a.0,
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
    for (i, other) in [(1, 2), (2, 1)] {
        let now = lab.status(i)?.encryption.public_key;
        if boringtun[i - 1] && load.static_rolls {
            // `encctl rotate` (all peers) rolls a boringtun node's static key too: it now
            // uses a new key pair, and its peer configured exactly that key.
            ensure!(
                now.is_some() && now != keys_before[i - 1],
                "node-{i} still uses its first static key {now:?}"
            );
        } else {
            ensure!(
                now == keys_before[i - 1],
                "node-{i} (not boringtun) changed its static key {:?} -> {now:?}",
                keys_before[i - 1]
            );
        }
        if now.is_some() {
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
    Ok(outcome)
}

/// The pod-route MTU each stack must get on a 1500-byte IPv4 underlay: the underlay MTU
/// minus the overlay (50: outer IPv4 20, UDP 8, VXLAN/Geneve 8, inner Ethernet 14) and the
/// encryption (WireGuard 60: IPv4 20, UDP 8, header 16, tag 16; ESP 54 with padding to 4).
/// Written out here rather than taken from the agent, so that the test checks its arithmetic.
pub fn expected_pod_mtu(encryption: &str, tunnel: &str) -> u32 {
    let encrypted = match encryption {
        "wireguard" => 1440,
        "ipsec" => 1446,
        _ => 1500,
    };
    match tunnel {
        "vxlan" | "geneve" => encrypted - 50,
        _ => encrypted,
    }
}

/// What [`overlay_matrix`] saw on the underlay.
#[derive(Clone, Debug, Default)]
pub struct OverlayReport {
    /// Frames captured on the underlay bridge.
    pub frames: usize,
    /// Node-to-node packets of the encryption (WireGuard UDP or ESP).
    pub encrypted: usize,
    /// Overlay (VXLAN/Geneve UDP) packets seen in plaintext on the wire.
    pub overlay_plain: usize,
    /// Frames carrying the plaintext marker.
    pub marker_frames: usize,
    /// The pod-route MTU the agents computed.
    pub pod_mtu: u32,
}

/// UDP port of the overlay of `tunnel`, if any.
fn overlay_port(tunnel: &str) -> Option<u16> {
    match tunnel {
        "vxlan" => Some(8472),
        "geneve" => Some(6081),
        _ => None,
    }
}

/// Whether an Ethernet frame is an IPv4 fragment (more-fragments set or a non-zero offset).
fn is_fragment(data: &[u8]) -> bool {
    data.len() >= 22
        && data[12..14] == [0x08, 0x00]
        && (u16::from_be_bytes([data[20], data[21]]) & 0x3fff) != 0
}

/// The overlay-mode scenario of issue 7, for one combination of `encryption` (`none`,
/// `wireguard`, `ipsec`) and `tunnel` (`disabled`, `vxlan`, `geneve`), on a lab of `nodes`
/// nodes with one pod each whose agents run:
///
/// - every node reports the tunnel, its device and the pod MTU of [`expected_pod_mtu`];
/// - every pod reaches every other (ping with the marker, and TCP of the marker);
/// - with DF set, a ping of exactly the pod MTU crosses, and one byte more is refused with
///   an ICMP "fragmentation needed" (or the local equivalent) that names the MTU: no black hole;
/// - on the underlay capture: no IPv4 fragment at all; with encryption, no marker, no
///   plaintext overlay packet, nothing between nodes but the control channel and the
///   encryption's packets; without encryption, the marker travels inside the overlay's UDP
///   (or as plain pod packets with direct routing), proving which path carried it.
pub fn overlay_matrix(
    lab: &Lab,
    encryption: &str,
    tunnel: &str,
    nodes: usize,
) -> anyhow::Result<OverlayReport> {
    use crate::lab::{CONTROL_PORT, WG_PORT};
    use std::net::IpAddr;
    const MARKER_HEX: &str = "656e632d706c61696e746578742d6d61";
    let marker: &[u8] = b"enc-plaintext-ma";
    let pod_mtu = expected_pod_mtu(encryption, tunnel);
    lab.wait_mesh(nodes, Duration::from_secs(40))?;
    for i in 1..=nodes {
        let status = lab.status(i)?;
        let n = &status.network;
        ensure!(
            n.tunnel == tunnel && n.pod_mtu == pod_mtu,
            "node-{i} reports tunnel {} pod MTU {} (want {tunnel}, {pod_mtu}): {n:?}",
            n.tunnel,
            n.pod_mtu
        );
        if let Some(port) = overlay_port(tunnel) {
            let dev = n
                .overlay_device
                .clone()
                .context("overlay device in status")?;
            ensure!(
                n.overlay_port == Some(port),
                "overlay port {:?}",
                n.overlay_port
            );
            let shown = lab.node(i).ns.run(&["ip", "-d", "link", "show", &dev])?;
            let shown = String::from_utf8_lossy(&shown.stdout).into_owned();
            ensure!(
                shown.contains(&format!("{tunnel} external"))
                    && shown.contains(&format!("mtu {pod_mtu}")),
                "node-{i} {dev}: {shown}"
            );
        }
    }
    let text = lab.encctl(1, &["status"])?;
    ensure!(
        text.contains(&format!("tunnel:      {tunnel}"))
            && text.contains(&format!("pod routes {pod_mtu}")),
        "encctl status lacks the tunnel or MTU lines:\n{text}"
    );
    eprintln!(
        "{}",
        text.lines()
            .filter(|l| l.starts_with("tunnel:")
                || l.starts_with("mtu:")
                || l.starts_with("encryption:"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    let capture = lab.capture(&format!("overlay-{encryption}-{tunnel}"))?;
    let mut failures = Vec::new();
    for i in 1..=nodes {
        for k in (1..=nodes).filter(|k| *k != i) {
            let dst = lab.node(k).pods[0].addr;
            if !lab.ping(i, 1, dst, 2, MARKER_HEX)? {
                failures.push(format!("node-{i} pod -> {dst}"));
            }
        }
    }
    ensure!(failures.is_empty(), "pings failed: {failures:?}");
    let payload: Vec<u8> = PLAINTEXT_MARKER
        .iter()
        .copied()
        .cycle()
        .take(40_000)
        .collect();
    for (a, b) in [(1, 2), (2, nodes), (nodes, 1)] {
        if a != b {
            lab.tcp_transfer((a, 1), (b, 1), &payload)
                .with_context(|| format!("TCP node-{a} -> node-{b}"))?;
        }
    }

    // The DF probe: node-1's pod to node-2's pod, ICMP payload = MTU - 20 (IPv4) - 8 (ICMP).
    let pod = &lab.node(1).pods[0];
    let dst = lab.node(2).pods[0].addr.to_string();
    let probe = |size: u32| {
        sys::output_in(
            pod.ns.name(),
            &[
                "ping",
                "-n",
                "-M",
                "do",
                "-c",
                "1",
                "-W",
                "3",
                "-s",
                &size.to_string(),
                &dst,
            ],
        )
    };
    let fits = probe(pod_mtu - 28)?;
    ensure!(
        fits.status.success(),
        "a DF ping of exactly the pod MTU {pod_mtu} did not cross: {}",
        String::from_utf8_lossy(&fits.stdout)
    );
    let mut refused = String::new();
    for _ in 0..2 {
        let over = probe(pod_mtu - 27)?;
        ensure!(
            !over.status.success(),
            "a DF ping one byte above the pod MTU {pod_mtu} crossed: the MTU is not enforced"
        );
        refused = format!(
            "{}{}",
            String::from_utf8_lossy(&over.stdout),
            String::from_utf8_lossy(&over.stderr)
        );
        if refused.contains(&format!("mtu = {pod_mtu}"))
            || refused.contains(&format!("mtu={pod_mtu}"))
        {
            break;
        }
    }
    ensure!(
        refused.contains(&format!("mtu = {pod_mtu}"))
            || refused.contains(&format!("mtu={pod_mtu}")),
        "one byte over the pod MTU was not refused with an ICMP naming mtu {pod_mtu}: {refused}"
    );
    eprintln!(
        "DF probe: {} bytes crossed, {} refused ({})",
        pod_mtu,
        pod_mtu + 1,
        refused
            .lines()
            .find(|l| l.contains("mtu"))
            .unwrap_or("")
            .trim()
    );
    let frames = capture.stop()?;

    let node_addrs: Vec<IpAddr> = lab.nodes.iter().map(|n| IpAddr::V4(n.addr)).collect();
    let port = overlay_port(tunnel);
    let mut report = OverlayReport {
        frames: frames.len(),
        pod_mtu,
        ..OverlayReport::default()
    };
    let (mut fragments, mut other, mut pod_plain) = (0, Vec::new(), 0);
    for f in &frames {
        let has_marker =
            pcap::contains(&f.data, marker) || pcap::contains(&f.data, PLAINTEXT_MARKER);
        if has_marker {
            report.marker_frames += 1;
        }
        if is_fragment(&f.data) {
            fragments += 1;
        }
        let Some(ip) = &f.ip else { continue };
        if ip.dst.is_multicast() || matches!(ip.src, IpAddr::V6(a) if a.is_unicast_link_local()) {
            continue;
        }
        let between_nodes = node_addrs.contains(&ip.src) && node_addrs.contains(&ip.dst);
        if !between_nodes {
            pod_plain += 1;
            if encryption != "none" || port.is_some() {
                other.push(format!("{ip:?}"));
            }
            continue;
        }
        match ip.proto {
            pcap::TCP if ip.has_port(CONTROL_PORT) => {}
            pcap::UDP if port.is_some() && ip.dport == port => {
                report.overlay_plain += 1;
                if encryption != "none" {
                    other.push(format!("plaintext overlay {ip:?}"));
                }
            }
            pcap::UDP if encryption == "wireguard" && ip.sport == Some(WG_PORT) => {
                report.encrypted += 1
            }
            50 if encryption == "ipsec" => report.encrypted += 1,
            _ => other.push(format!("{ip:?}")),
        }
    }
    ensure!(
        fragments == 0,
        "{fragments} IPv4 fragments on the underlay: some layer's MTU is too large"
    );
    ensure!(
        other.is_empty(),
        "unexpected packets on the underlay ({} of them): {:?}",
        other.len(),
        &other[..other.len().min(5)]
    );
    if encryption == "none" {
        ensure!(
            report.marker_frames > 0,
            "without encryption the marker must be visible on the wire; the capture missed the traffic"
        );
        match port {
            Some(_) => ensure!(
                report.overlay_plain >= 20 && pod_plain == 0,
                "{} overlay packets and {pod_plain} bare pod packets: pod traffic did not take the overlay",
                report.overlay_plain
            ),
            None => ensure!(
                pod_plain >= 20,
                "only {pod_plain} pod packets routed directly on the underlay"
            ),
        }
    } else {
        ensure!(
            report.marker_frames == 0,
            "{} frames on the underlay carry the plaintext marker",
            report.marker_frames
        );
        ensure!(
            report.encrypted >= 40,
            "only {} encrypted packets captured; the capture missed the traffic",
            report.encrypted
        );
    }
    eprintln!(
        "capture ({encryption} over {tunnel}): {} frames, {} encrypted, {} plaintext overlay, {} with the marker, 0 fragments",
        report.frames, report.encrypted, report.overlay_plain, report.marker_frames
    );
    Ok(report)
}
