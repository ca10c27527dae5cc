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
    std::thread::sleep(Duration::from_secs(1));

    let began = Instant::now();
    for k in 0..load.rotations {
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
    }
    let took = began.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let tcp = tcp.stop()?;
    let udp = udp.stop(Duration::from_secs(1))?;
    let frames = capture.stop()?;
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
    ensure!(udp.lost == 0, "UDP packets lost during rotation: {udp}");
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
