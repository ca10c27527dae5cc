//! `enc-bench`: benchmarks of the enc datapath.
//!
//! `enc-bench marking` measures the per-packet cost of the pod-ingress marking program with
//! 10, 100, 1,000 and 10,000 peers in its maps, two ways:
//!
//! 1. `BPF_PROG_TEST_RUN`: the program runs `repeat` times on one 60-byte Ethernet + IPv4 +
//!    UDP frame, and the kernel reports the mean time of one run (whole nanoseconds). The wall
//!    time of the syscall divided by `repeat` is reported beside it, with sub-nanosecond
//!    resolution. Four destinations: in the CIDR inserted last (a /26: found by the first
//!    hash lookup), in the one inserted first (a /24: the second), in the first /16 (the
//!    third), and a local (non-remote) address (three lookups that miss). The program tries
//!    one hash lookup per distinct prefix length in use, longest first; every peer count uses
//!    the same three lengths, so each destination costs the same number of lookups at every N.
//! 2. A packet generator in two network namespaces (`pod` -> veth -> `node`, where a blackhole
//!    route drops the traffic after the routing decision). A thread in `pod` sends UDP with
//!    `sendmmsg` for a fixed time; the node-side veth's `rx_packets` gives the packet count.
//!    Variants: no marking (baseline), enc's tc program on the node-side veth ingress, and an
//!    nftables prerouting chain with one `ip daddr CIDR meta mark set MARK accept` rule per
//!    peer CIDR, the destination matching the last rule.
//!
//! Prints a markdown report (or JSON with `--json`). Needs root. Everything it creates (a bpffs
//! mount on a temporary directory, pin directories, two namespaces, nft files) is removed on
//! exit, also on error and on Ctrl-C.
//!
//! `enc-bench overlay` measures iperf3 TCP throughput (1 stream and `-P 4`) pod to pod across
//! two nodes, one setup after the other in one run: a plain veth pair, a plain kernel VXLAN
//! device over a veth/bridge underlay, and real `enc-agent` labs (2 nodes, 1 pod each) for
//! every tunnel (direct routing, VXLAN, Geneve where the kernel has it) and encryption
//! (none, WireGuard, IPsec). Beside the throughput it reports the CPU time the whole machine
//! spent per GB received (`/proc/stat` deltas over each iperf3 run) and the part of it spent
//! by the agents (their `/proc/<pid>/stat`). Each setup's namespaces are deleted before the
//! next one is built, also on error and on Ctrl-C.
//!
//! `enc-bench datapaths` compares enc's userspace WireGuard and ESP datapaths with plain veth,
//! kernel VXLAN, boringtun-cli, wireguard-go and strongSwan's kernel-libipsec on one veth pair
//! between two namespaces (see `enc-bench/datapaths.rs`).

use anyhow::{Context, bail, ensure};
use clap::{Args, Parser, Subcommand};
use enc_tests::netns::Netns;
use enc_tunnel_ebpf::common::encrypt_mark;
use enc_tunnel_ebpf::{
    AyaDatapath, Backend, Datapath, DatapathConfig, Hook, PeerId, PeerState, TC_ACT_UNSPEC, TestRun,
};
use ipnet::{IpNet, Ipv4Net};
use serde_json::{Value, json};
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[path = "enc-bench/datapaths.rs"]
mod datapaths;

#[derive(Debug, Parser)]
#[command(
    name = "enc-bench",
    about = "Benchmarks of the enc datapath (needs root)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Per-packet cost of the pod-ingress marking program against the number of peers, with
    /// BPF_PROG_TEST_RUN and with a packet generator in namespaces beside an nftables baseline.
    Marking(MarkingArgs),
    /// iperf3 TCP throughput pod to pod across two nodes: plain veth, plain kernel VXLAN and
    /// every enc tunnel x encryption combination, side by side in one run.
    Overlay(overlay::OverlayArgs),
    /// The userspace encrypted datapaths (enc WireGuard, enc ESP) beside plain veth, kernel
    /// VXLAN, boringtun-cli, wireguard-go and strongSwan libipsec on one veth pair: iperf3 1
    /// and N streams, TCP_RR p50/p99 and CPU s/GB, with ratios to boringtun-cli and veth.
    Datapaths(datapaths::DatapathArgs),
}

#[derive(Debug, Args)]
struct MarkingArgs {
    /// Peer counts to measure (comma-separated, 1 to 10000 each).
    #[arg(long, value_delimiter = ',', default_values_t = [10usize, 100, 1_000, 10_000])]
    peers: Vec<usize>,
    /// BPF_PROG_TEST_RUN rounds per (peer count, destination); the median is reported.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Target wall time of one BPF_PROG_TEST_RUN call, in ms (sets the repeat count).
    #[arg(long, default_value_t = 300)]
    run_ms: u64,
    /// Packet-generator rounds per (peer count, variant); the median is reported.
    #[arg(long, default_value_t = 3)]
    gen_rounds: usize,
    /// Length of one packet-generator round, in ms.
    #[arg(long, default_value_t = 1_000)]
    gen_ms: u64,
    /// Skip the packet-generator comparison (BPF_PROG_TEST_RUN only).
    #[arg(long)]
    no_generator: bool,
    /// Print JSON instead of the markdown report.
    #[arg(long)]
    json: bool,
}

/// Largest peer count the CIDR layout supports.
const MAX_PEERS: usize = 10_000;
/// The epoch every benchmark peer has.
const EPOCH: u8 = 1;
/// Source of every packet: a local pod.
const POD_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 2);
/// The node's address on the pod link (the pod's gateway).
const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);
/// A local, non-remote destination (another pod on the node).
const LOCAL_DST: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 9);
/// UDP payload size: 14 + 20 + 8 + 18 = 60-byte frames (64 on a wire with the FCS).
const PAYLOAD: usize = 18;
/// The node-side veth, where enc's pod programs are attached (as the agent does).
const NODE_IF: &str = "encpod0";
/// The pod-side veth.
const POD_IF: &str = "eth0";

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Ctrl-C / SIGTERM only set a flag: the loops notice it and return an error, so every guard
/// still runs its cleanup. Commands run meanwhile get the signal too and fail.
fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: sigaction is plain data (zeroed is valid); the handler only stores to an
        // atomic, which is async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

fn check_stop() -> anyhow::Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn main() {
    let result = match Cli::parse().command {
        Cmd::Marking(args) => run(&args),
        Cmd::Overlay(args) => overlay::run(&args),
        Cmd::Datapaths(args) => datapaths::run(&args),
    };
    if let Err(e) = result {
        eprintln!("enc-bench: error: {e:#}");
        std::process::exit(1);
    }
}

/// Fails unless the process runs as root.
fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    ensure!(
        euid == 0,
        "enc-bench needs root (BPF programs, bpffs, network namespaces); running as euid {euid}"
    );
    Ok(())
}

/// The kernel release (`uname -r`).
fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// `enc-bench marking`: checks the arguments, runs, prints the report.
fn run(args: &MarkingArgs) -> anyhow::Result<()> {
    require_root()?;
    ensure!(!args.peers.is_empty(), "--peers is empty");
    for &n in &args.peers {
        ensure!(
            (1..=MAX_PEERS).contains(&n),
            "--peers: {n} is out of range (1 to {MAX_PEERS})"
        );
    }
    ensure!(
        args.rounds >= 1 && args.gen_rounds >= 1,
        "--rounds and --gen-rounds must be at least 1"
    );
    install_signal_handlers();
    let report = run_marking(args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.to_json(args))?);
    } else {
        print!("{}", report.to_markdown(args));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Peers, CIDRs and packets

/// The remote pod CIDR of the `i`-th peer (0-based), the same sequence for every peer count,
/// so the first N of it are the N peers. Disjoint CIDRs spread over 10.0.0.0/8 with mixed
/// prefix lengths: every 50th is a /16 (10.56.0.0 to 10.255.0.0; the first is index 5), every
/// other odd index a /26, the rest /24 (in 10.0.0.0 to 10.55.255.0, in a scattered order).
/// So from 6 peers on all three lengths are in use, and the last CIDR of 10, 100, 1,000 and
/// 10,000 peers is a /26 (odd index): every default peer count asks the program for the same
/// number of hash lookups per destination.
fn peer_cidr(i: usize) -> Ipv4Net {
    assert!(i < MAX_PEERS, "peer index {i} out of range");
    if i % 50 == 5 {
        let k = (i / 50) as u8; // < 200
        return Ipv4Net::new(Ipv4Addr::new(10, 56 + k, 0, 0), 16).expect("prefix 16 is valid");
    }
    // 14336 /24 slots in 10.0.0.0 to 10.55.255.0; 8191 is prime to 14336, so the slots of
    // distinct indexes differ.
    let slot = (i * 8191 + 1234) % 14_336;
    let (b, c) = ((slot / 256) as u8, (slot % 256) as u8);
    if i % 2 == 1 {
        let d = ((i / 2) % 4) as u8 * 64;
        Ipv4Net::new(Ipv4Addr::new(10, b, c, d), 26).expect("prefix 26 is valid")
    } else {
        Ipv4Net::new(Ipv4Addr::new(10, b, c, 0), 24).expect("prefix 24 is valid")
    }
}

/// Peer id of the `i`-th peer.
fn peer_id(i: usize) -> PeerId {
    PeerId::try_from(i + 1).expect("at most 10000 peers")
}

/// An address inside a CIDR (network + 5).
fn addr_in(net: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) + 5)
}

/// A 60-byte Ethernet + IPv4 + UDP frame (valid IP header checksum).
fn udp_frame(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut p = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
    let total = u16::try_from(20 + 8 + PAYLOAD).expect("small");
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let mut sum: u32 = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p.extend_from_slice(&ip);
    let udp_len = u16::try_from(8 + PAYLOAD).expect("small");
    p.extend_from_slice(&40_000u16.to_be_bytes());
    p.extend_from_slice(&9u16.to_be_bytes());
    p.extend_from_slice(&udp_len.to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(&[0xA5; PAYLOAD]);
    p
}

fn peer_state() -> PeerState {
    PeerState {
        authenticated: true,
        has_key: true,
        epoch: EPOCH,
        backend: Backend::Wireguard,
    }
}

// ---------------------------------------------------------------------------------------------
// Guards

/// A bpffs mounted on a fresh temporary directory; unmounted (and the directory removed) on drop.
struct BpffsMount {
    dir: Option<tempfile::TempDir>,
}

impl BpffsMount {
    fn new() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("enc-bench-bpffs-")
            .tempdir()
            .context("create a temporary directory for bpffs")?;
        enc_tunnel_ebpf::mount_bpffs(dir.path())
            .with_context(|| format!("mount bpffs on {}", dir.path().display()))?;
        Ok(Self { dir: Some(dir) })
    }

    fn path(&self) -> &Path {
        self.dir
            .as_ref()
            .map_or(Path::new("/nonexistent"), |d| d.path())
    }
}

impl Drop for BpffsMount {
    fn drop(&mut self) {
        let Some(dir) = self.dir.take() else { return };
        let Ok(c) = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes()) else {
            return;
        };
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            eprintln!(
                "warning: cannot unmount bpffs at {}: {}",
                dir.path().display(),
                std::io::Error::last_os_error()
            );
            // Leave the directory: removing it would walk the still-mounted bpffs.
            std::mem::forget(dir);
            return;
        }
        if let Err(e) = dir.close() {
            eprintln!("warning: cannot remove the bpffs mount point: {e}");
        }
    }
}

/// A pin directory on the benchmark's bpffs; everything pinned there is removed on drop.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = AyaDatapath::remove_all(&self.0) {
            eprintln!("warning: cannot remove pin dir {}: {e}", self.0.display());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// BPF_PROG_TEST_RUN

/// Index of the first /16 in the CIDR sequence.
const FIRST_WIDE: usize = 5;

/// Which destination a series sends to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dest {
    /// In the CIDR inserted last (a /26 for the default peer counts: the first lookup hits).
    Last,
    /// In the CIDR inserted first (a /24: the second lookup hits).
    First,
    /// In the first /16 (index 5; the third lookup hits). Needs at least 6 peers.
    Wide,
    /// A local address, in no remote CIDR (every lookup misses).
    Local,
}

impl Dest {
    const ALL: [Self; 4] = [Self::Last, Self::First, Self::Wide, Self::Local];

    fn name(self) -> &'static str {
        match self {
            Self::Last => "last",
            Self::First => "first",
            Self::Wide => "wide",
            Self::Local => "local",
        }
    }

    /// Destination address and the mark the program must set, for `n` peers; `None` if the
    /// destination does not exist with `n` peers.
    fn target(self, n: usize) -> Option<(Ipv4Addr, u32)> {
        let remote = |i: usize| (addr_in(peer_cidr(i)), encrypt_mark(peer_id(i), EPOCH));
        match self {
            Self::Last => Some(remote(n - 1)),
            Self::First => Some(remote(0)),
            Self::Wide => (n > FIRST_WIDE).then(|| remote(FIRST_WIDE)),
            Self::Local => Some((LOCAL_DST, 0)),
        }
    }
}

#[derive(Clone, Debug)]
struct Series {
    dest: Dest,
    dst: Ipv4Addr,
    /// The mark the program must set.
    want: u32,
    repeat: u32,
    /// Kernel-reported mean ns of one run, per round.
    kernel_ns: Vec<f64>,
    /// Wall time of the syscall / repeat, per round.
    wall_ns: Vec<f64>,
}

impl Series {
    fn kernel(&self) -> f64 {
        median(&self.kernel_ns)
    }
    fn wall(&self) -> f64 {
        median(&self.wall_ns)
    }
}

fn check_run(r: &TestRun, dest: Dest, dst: Ipv4Addr, want_mark: u32) -> anyhow::Result<()> {
    ensure!(
        r.action == TC_ACT_UNSPEC && r.mark == want_mark,
        "the marking program did not do its job for destination {dst} ({}): action {} mark \
         {:#010x}, expected action {TC_ACT_UNSPEC} (TC_ACT_UNSPEC) and mark {want_mark:#010x}",
        dest.name(),
        r.action,
        r.mark
    );
    Ok(())
}

/// One BPF_PROG_TEST_RUN call of `repeat` runs towards `dst`, checked; (result, wall time).
fn test_run_once(
    dp: &AyaDatapath,
    dest: Dest,
    dst: Ipv4Addr,
    want: u32,
    repeat: u32,
) -> anyhow::Result<(TestRun, Duration)> {
    check_stop()?;
    let pkt = udp_frame(POD_ADDR, dst);
    let t = Instant::now();
    let r = dp
        .test_run(Hook::PodIngress, &pkt, 0, repeat)
        .context("BPF_PROG_TEST_RUN")?;
    let wall = t.elapsed();
    check_run(&r, dest, dst, want)?;
    Ok((r, wall))
}

/// A series with its repeat count calibrated for about `run_ms` per call (also a warm-up), and
/// no rounds yet; `None` if the destination does not exist with `n` peers.
fn calibrate_series(
    dp: &AyaDatapath,
    n: usize,
    dest: Dest,
    args: &MarkingArgs,
) -> anyhow::Result<Option<Series>> {
    let Some((dst, want)) = dest.target(n) else {
        return Ok(None);
    };
    let probe = 100_000u32;
    let (_, wall) = test_run_once(dp, dest, dst, want, probe)?;
    let per_ns = (wall.as_nanos() as f64 / f64::from(probe)).max(1.0);
    let repeat = (args.run_ms as f64 * 1e6 / per_ns).clamp(100_000.0, 200_000_000.0) as u32;
    Ok(Some(Series {
        dest,
        dst,
        want,
        repeat,
        kernel_ns: Vec::new(),
        wall_ns: Vec::new(),
    }))
}

/// Adds one round (one call of `repeat` runs) to `s`.
fn series_round(dp: &AyaDatapath, s: &mut Series) -> anyhow::Result<()> {
    let (r, wall) = test_run_once(dp, s.dest, s.dst, s.want, s.repeat)?;
    s.kernel_ns.push(r.duration.as_nanos() as f64);
    s.wall_ns.push(wall.as_nanos() as f64 / f64::from(s.repeat));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Packet generator in namespaces

/// `pod` and `node` namespaces joined by a veth; in `node` a blackhole route for 10.0.0.0/8
/// drops the traffic after the routing decision. Deleted on drop.
struct GenLab {
    pod: Netns,
    node: Netns,
    nft_dir: tempfile::TempDir,
}

impl GenLab {
    fn new() -> anyhow::Result<Self> {
        let prefix = format!("encb{}", std::process::id());
        let pod = Netns::new(&format!("{prefix}-pod"))?;
        let node = Netns::new(&format!("{prefix}-node"))?;
        let nft_dir = tempfile::Builder::new()
            .prefix("enc-bench-nft-")
            .tempdir()
            .context("create a temporary directory for nft rules")?;
        let lab = Self { pod, node, nft_dir };
        let (pod, node) = (lab.pod.name(), lab.node.name());
        for ns in [&lab.pod, &lab.node] {
            ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
            ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        }
        lab.node.run(&[
            "ip", "link", "add", NODE_IF, "type", "veth", "peer", "name", POD_IF, "netns", pod,
        ])?;
        let node_cidr = format!("{NODE_ADDR}/24");
        let pod_cidr = format!("{POD_ADDR}/24");
        let gw = NODE_ADDR.to_string();
        lab.node
            .run(&["ip", "addr", "add", &node_cidr, "dev", NODE_IF])?;
        lab.node.run(&["ip", "link", "set", NODE_IF, "up"])?;
        lab.node.sysctl("net.ipv4.ip_forward", "1")?;
        lab.node
            .run(&["ip", "route", "add", "blackhole", "10.0.0.0/8"])?;
        lab.pod
            .run(&["ip", "addr", "add", &pod_cidr, "dev", POD_IF])?;
        lab.pod.run(&["ip", "link", "set", POD_IF, "up"])?;
        lab.pod
            .run(&["ip", "route", "add", "default", "via", &gw])?;
        eprintln!("    namespaces {pod} -> {node} ready (veth {POD_IF} -> {NODE_IF})");
        Ok(lab)
    }

    fn rx_packets(&self) -> anyhow::Result<u64> {
        let path = format!("/sys/class/net/{NODE_IF}/statistics/rx_packets");
        let out = self.node.run(&["cat", &path])?;
        let s = String::from_utf8_lossy(&out.stdout);
        s.trim()
            .parse()
            .with_context(|| format!("parse {path}: {s:?}"))
    }

    fn nft(&self, script: &str) -> anyhow::Result<()> {
        self.node.run(&["nft", script]).map(|_| ())
    }

    /// Loads table `ip encbench` with a regular chain `marks` holding one rule per peer CIDR
    /// (the last one also bumps the named counter `last`). Not hooked yet.
    fn load_nft_rules(&self, n: usize) -> anyhow::Result<()> {
        let mut f = String::from("table ip encbench\ndelete table ip encbench\n");
        f.push_str("table ip encbench {\n  counter last { }\n  chain marks {\n");
        for i in 0..n {
            let counter = if i == n - 1 {
                " counter name \"last\""
            } else {
                ""
            };
            f.push_str(&format!(
                "    ip daddr {} meta mark set {:#010x}{counter} accept\n",
                peer_cidr(i),
                encrypt_mark(peer_id(i), EPOCH)
            ));
        }
        f.push_str("  }\n}\n");
        let path = self.nft_dir.path().join(format!("marks-{n}.nft"));
        std::fs::write(&path, f).with_context(|| format!("write {}", path.display()))?;
        let p = path.to_string_lossy();
        self.node.run(&["nft", "-f", &p]).map(|_| ())
    }

    fn nft_last_counter(&self) -> anyhow::Result<u64> {
        let out = self
            .node
            .run(&["nft", "list", "counter", "ip", "encbench", "last"])?;
        let s = String::from_utf8_lossy(&out.stdout);
        let mut words = s.split_whitespace();
        while let Some(w) = words.next() {
            if w == "packets"
                && let Some(v) = words.next()
            {
                return v.parse().with_context(|| format!("parse nft counter: {s}"));
            }
        }
        bail!("no packet count in `nft list counter`: {s}")
    }

    /// Sends UDP from `pod` to `dst` for `dur`; returns (datagrams sent, elapsed).
    fn send(&self, dst: Ipv4Addr, dur: Duration) -> anyhow::Result<(u64, Duration)> {
        self.pod.enter(move || send_udp(dst, dur))?
    }

    /// One measured round: (received, sent, elapsed).
    fn measure(&self, dst: Ipv4Addr, dur: Duration) -> anyhow::Result<GenSample> {
        check_stop()?;
        // Warm-up: caches, ARP, the program's per-CPU counters.
        self.send(dst, Duration::from_millis(50))?;
        std::thread::sleep(Duration::from_millis(10));
        let before = self.rx_packets()?;
        let (sent, elapsed) = self.send(dst, dur)?;
        // Let the backlog (at most netdev_max_backlog packets) drain.
        std::thread::sleep(Duration::from_millis(20));
        let rx = self.rx_packets()?.saturating_sub(before);
        ensure!(rx > 0, "no packet reached {NODE_IF} ({sent} sent)");
        if (rx as f64) < 0.99 * sent as f64 {
            eprintln!("    warning: {NODE_IF} received {rx} of {sent} datagrams sent");
        }
        Ok(GenSample { rx, sent, elapsed })
    }
}

/// Runs in the pod namespace: a connected UDP socket, `sendmmsg` in batches of 32.
fn send_udp(dst: Ipv4Addr, dur: Duration) -> anyhow::Result<(u64, Duration)> {
    const BATCH: usize = 32;
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).context("bind UDP socket")?;
    sock.connect((dst, 9))
        .with_context(|| format!("connect UDP socket to {dst}"))?;
    let fd = sock.as_raw_fd();
    let payload = [0xA5u8; PAYLOAD];
    let mut iov = [libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: PAYLOAD,
    }; BATCH];
    // SAFETY: mmsghdr is plain data; zeroed is a valid (empty) value.
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
        m.msg_hdr.msg_iov = v;
        m.msg_hdr.msg_iovlen = 1;
    }
    let mut sent = 0u64;
    let mut errors = 0u64;
    let start = Instant::now();
    loop {
        // SAFETY: `msgs` holds BATCH valid headers pointing at `iov`/`payload`, which outlive
        // the call; the socket is connected, so no address is needed.
        let rc = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), BATCH as libc::c_uint, 0) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENOBUFS | libc::EAGAIN | libc::ECONNREFUSED | libc::EINTR) => {
                    errors += 1;
                    if errors > 1_000_000 {
                        bail!("sendmmsg keeps failing: {e}");
                    }
                }
                _ => bail!("sendmmsg to {dst}: {e}"),
            }
        } else {
            sent += rc as u64;
        }
        let elapsed = start.elapsed();
        if elapsed >= dur || STOP.load(Ordering::Relaxed) {
            return Ok((sent, elapsed));
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct GenSample {
    rx: u64,
    sent: u64,
    elapsed: Duration,
}

impl GenSample {
    fn ns_per_packet(&self) -> f64 {
        self.elapsed.as_nanos() as f64 / self.rx as f64
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Baseline,
    Enc,
    Nft,
}

impl Variant {
    const ALL: [Self; 3] = [Self::Baseline, Self::Enc, Self::Nft];

    fn name(self) -> &'static str {
        match self {
            Self::Baseline => "baseline",
            Self::Enc => "enc",
            Self::Nft => "nft",
        }
    }
}

#[derive(Clone, Debug, Default)]
struct GenSeries {
    samples: Vec<GenSample>,
}

impl GenSeries {
    fn ns(&self) -> f64 {
        median(
            &self
                .samples
                .iter()
                .map(GenSample::ns_per_packet)
                .collect::<Vec<_>>(),
        )
    }
    fn mpps(&self) -> f64 {
        1e3 / self.ns()
    }
}

/// One round of one variant, with its marking switched on only for the round. Checks that the
/// packets were marked (enc's steered counter, nft's counter on the last rule).
fn gen_round(
    lab: &GenLab,
    dp: &Arc<AyaDatapath>,
    n: usize,
    variant: Variant,
    dur: Duration,
) -> anyhow::Result<GenSample> {
    let (dst, _) = Dest::Last.target(n).context("no last CIDR")?;
    let last_peer = peer_id(n - 1);
    match variant {
        Variant::Baseline => lab.measure(dst, dur),
        Variant::Enc => {
            let d = Arc::clone(dp);
            lab.node
                .enter(move || d.attach_pod(NODE_IF))?
                .context("attach enc's pod programs")?;
            let steered = |dp: &AyaDatapath| -> anyhow::Result<u64> {
                Ok(dp
                    .counters()?
                    .get(&last_peer)
                    .map_or(0, |c| c.steered_packets))
            };
            let res = (|| {
                let before = steered(dp)?;
                let s = lab.measure(dst, dur)?;
                let marked = steered(dp)?.saturating_sub(before);
                // measure() sends a warm-up too: at least the measured packets were marked.
                ensure!(
                    marked >= s.rx,
                    "enc's program marked {marked} packets for peer {last_peer}, but {} \
                     reached {NODE_IF}: it is not marking",
                    s.rx
                );
                Ok(s)
            })();
            let detached = dp.detach_pod(NODE_IF).context("detach enc's pod programs");
            let s = res?;
            detached?;
            Ok(s)
        }
        Variant::Nft => {
            lab.nft(
                "add chain ip encbench prerouting { type filter hook prerouting priority mangle; }; \
                 add rule ip encbench prerouting jump marks",
            )?;
            let res = (|| {
                let before = lab.nft_last_counter()?;
                let s = lab.measure(dst, dur)?;
                let marked = lab.nft_last_counter()?.saturating_sub(before);
                ensure!(
                    marked >= s.rx,
                    "the last nft rule matched {marked} packets but {} reached {NODE_IF}",
                    s.rx
                );
                Ok(s)
            })();
            let unhooked =
                lab.nft("flush chain ip encbench prerouting; delete chain ip encbench prerouting");
            let s = res?;
            unhooked?;
            Ok(s)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The run

struct PeerResult {
    peers: usize,
    fill: Duration,
    test_run: Vec<Series>,
    /// Indexed like `Variant::ALL`; empty without the generator.
    generator: Vec<GenSeries>,
}

impl PeerResult {
    fn series(&self, dest: Dest) -> Option<&Series> {
        self.test_run.iter().find(|s| s.dest == dest)
    }
    fn gen_of(&self, v: Variant) -> Option<&GenSeries> {
        let i = Variant::ALL.iter().position(|x| *x == v)?;
        self.generator.get(i)
    }
}

struct Report {
    kernel: String,
    cpus: usize,
    total: Duration,
    results: Vec<PeerResult>,
}

fn run_marking(args: &MarkingArgs) -> anyhow::Result<Report> {
    let started = Instant::now();
    let bpffs = BpffsMount::new()?;
    eprintln!("==> bpffs mounted on {}", bpffs.path().display());
    let lab = if args.no_generator {
        None
    } else {
        eprintln!("==> creating the generator namespaces");
        Some(GenLab::new()?)
    };
    // Every peer count's datapath is loaded and filled first, so that the BPF_PROG_TEST_RUN
    // rounds can alternate between peer counts: a busy spell of the (shared) machine then
    // slows every peer count alike instead of the one that happens to be running.
    let mut loaded = Vec::new();
    for &n in &args.peers {
        check_stop()?;
        let pin = PinDir(bpffs.path().join(format!("peers-{n}")));
        let dp = Arc::new(
            AyaDatapath::load(&pin.0)
                .with_context(|| format!("load the datapath in {}", pin.0.display()))?,
        );
        let t = Instant::now();
        dp.set_config(DatapathConfig {
            strict: true,
            decrypt_ifindex: 0,
            overlay: None,
        })?;
        for i in 0..n {
            dp.upsert_peer(peer_id(i), peer_state())?;
            dp.upsert_cidr(IpNet::V4(peer_cidr(i)), peer_id(i))?;
        }
        let fill = t.elapsed();
        let got = dp.dump_cidrs()?.len();
        ensure!(got == n, "{got} CIDRs in the map, expected {n}");
        eprintln!("==> {n} peers: maps filled in {fill:.2?}");
        let mut test_run = Vec::new();
        for dest in Dest::ALL {
            if let Some(s) = calibrate_series(&dp, n, dest, args)? {
                test_run.push(s);
            }
        }
        loaded.push((n, pin, dp, fill, test_run));
    }
    eprintln!(
        "==> BPF_PROG_TEST_RUN: {} rounds, alternating between peer counts",
        args.rounds
    );
    for _ in 0..args.rounds {
        for (_, _, dp, _, test_run) in &mut loaded {
            for s in test_run.iter_mut() {
                series_round(dp, s)?;
            }
        }
    }
    for (n, _, _, _, test_run) in &loaded {
        for s in test_run {
            eprintln!(
                "    {n:>5} peers {:<5} {:<15} repeat {:>9}: kernel {:.0} ns, wall {:.2} ns",
                s.dest.name(),
                s.dst,
                s.repeat,
                s.kernel(),
                s.wall()
            );
        }
    }
    let mut results = Vec::new();
    for (n, pin, dp, fill, test_run) in loaded {
        check_stop()?;
        let mut generator = Vec::new();
        if let Some(lab) = &lab {
            eprintln!("    packet generator: loading {n} nft rules");
            lab.load_nft_rules(n)?;
            generator = vec![GenSeries::default(); Variant::ALL.len()];
            let dur = Duration::from_millis(args.gen_ms);
            for round in 0..args.gen_rounds {
                // Rotate the order so that no variant always runs first.
                for k in 0..Variant::ALL.len() {
                    let vi = (k + round) % Variant::ALL.len();
                    let v = Variant::ALL[vi];
                    let s = gen_round(lab, &dp, n, v, dur)
                        .with_context(|| format!("generator, {n} peers, {}", v.name()))?;
                    eprintln!(
                        "    round {round} {:<8} {:>9} pkts in {:.2?}: {:.0} ns/pkt",
                        v.name(),
                        s.rx,
                        s.elapsed,
                        s.ns_per_packet()
                    );
                    generator[vi].samples.push(s);
                }
            }
        }
        drop(dp);
        drop(pin);
        results.push(PeerResult {
            peers: n,
            fill,
            test_run,
            generator,
        });
    }
    drop(lab);
    drop(bpffs);
    Ok(Report {
        kernel: kernel_release(),
        cpus: std::thread::available_parallelism().map_or(0, usize::from),
        total: started.elapsed(),
        results,
    })
}

// ---------------------------------------------------------------------------------------------
// Output

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

/// Relative change in percent from `a` to `b`.
fn change(a: f64, b: f64) -> f64 {
    (b - a) / a * 100.0
}

fn spread(v: &[f64]) -> f64 {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (hi - lo) / median(v) * 100.0
}

/// The summary numbers: (what, from, to, change %), first vs last peer count.
fn summary(r: &Report) -> Vec<(String, f64, f64, f64)> {
    let (Some(a), Some(b)) = (r.results.first(), r.results.last()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for dest in Dest::ALL {
        if let (Some(x), Some(y)) = (a.series(dest), b.series(dest)) {
            out.push((
                format!("enc BPF_PROG_TEST_RUN, {} dst, kernel ns", dest.name()),
                x.kernel(),
                y.kernel(),
                change(x.kernel(), y.kernel()),
            ));
            out.push((
                format!("enc BPF_PROG_TEST_RUN, {} dst, wall ns", dest.name()),
                x.wall(),
                y.wall(),
                change(x.wall(), y.wall()),
            ));
        }
    }
    for v in Variant::ALL {
        if let (Some(x), Some(y)) = (a.gen_of(v), b.gen_of(v)) {
            out.push((
                format!("generator {} ns/pkt", v.name()),
                x.ns(),
                y.ns(),
                change(x.ns(), y.ns()),
            ));
        }
    }
    out
}

impl Report {
    fn to_markdown(&self, args: &MarkingArgs) -> String {
        use std::fmt::Write as _;
        let mut m = String::new();
        let _ = writeln!(
            m,
            "## enc-bench marking\n\nkernel {}, {} CPUs, {:.0?} in all\n",
            self.kernel, self.cpus, self.total
        );
        let _ = writeln!(
            m,
            "### BPF_PROG_TEST_RUN, tunnel_pod_ingress, 60-byte IPv4/UDP frame\n\n\
             Median of {} rounds; kernel = kernel-reported mean ns per run (whole ns), wall = \
             syscall wall time / repeat.\n",
            args.rounds
        );
        let _ = writeln!(
            m,
            "| peers | repeat | last CIDR (1st lookup hits): kernel ns | wall ns | first CIDR (2nd): kernel ns | wall ns | first /16 (3rd): kernel ns | wall ns | local dst (3 misses): kernel ns | wall ns |\n\
             |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for r in &self.results {
            let mut row = format!(
                "| {} | {} |",
                r.peers,
                r.series(Dest::Last).map_or(0, |s| s.repeat)
            );
            for dest in Dest::ALL {
                match r.series(dest) {
                    Some(s) => {
                        let _ = write!(row, " {:.0} | {:.2} |", s.kernel(), s.wall());
                    }
                    None => row.push_str(" - | - |"),
                }
            }
            let _ = writeln!(m, "{row}");
        }
        if self.results.iter().any(|r| !r.generator.is_empty()) {
            let _ = writeln!(
                m,
                "\n### Packet generator, pod -> veth -> node (blackhole), 60-byte UDP, dst in the last CIDR\n\n\
                 Median of {} rounds of {} ms; ns/pkt = sender wall time / packets received on {NODE_IF} \
                 (the whole send + veth + receive path runs on the sender's CPU).\n",
                args.gen_rounds, args.gen_ms
            );
            let _ = writeln!(
                m,
                "| peers | baseline ns/pkt (Mpps) | enc ns/pkt (Mpps) | nft ns/pkt (Mpps) | enc - baseline ns | nft - baseline ns |\n\
                 |---:|---:|---:|---:|---:|---:|"
            );
            for r in &self.results {
                let (Some(b), Some(e), Some(f)) = (
                    r.gen_of(Variant::Baseline),
                    r.gen_of(Variant::Enc),
                    r.gen_of(Variant::Nft),
                ) else {
                    continue;
                };
                let _ = writeln!(
                    m,
                    "| {} | {:.0} ({:.3}) | {:.0} ({:.3}) | {:.0} ({:.4}) | {:+.0} | {:+.0} |",
                    r.peers,
                    b.ns(),
                    b.mpps(),
                    e.ns(),
                    e.mpps(),
                    f.ns(),
                    f.mpps(),
                    e.ns() - b.ns(),
                    f.ns() - b.ns()
                );
            }
        }
        let s = summary(self);
        if let (Some(a), Some(b)) = (self.results.first(), self.results.last()) {
            let _ = writeln!(
                m,
                "\n### Change from {} to {} peers (goal: enc within 5%)\n\n| measure | {} peers | {} peers | change |\n|---|---:|---:|---:|",
                a.peers, b.peers, a.peers, b.peers
            );
            for (what, x, y, c) in &s {
                let _ = writeln!(m, "| {what} | {x:.2} | {y:.2} | {c:+.1}% |");
            }
            if let (Some(x), Some(y)) = (a.series(Dest::Last), b.series(Dest::Last)) {
                // The kernel's figure leaves out the time the calling thread was rescheduled
                // (BPF_PROG_TEST_RUN stops its timer around cond_resched), so on a shared
                // machine it is the steadier one; the wall figure is shown beside it.
                let c = change(x.kernel(), y.kernel());
                let _ = writeln!(
                    m,
                    "\nenc per-packet cost (BPF_PROG_TEST_RUN, last CIDR, kernel): {:.0} -> {:.0} ns, \
                     {c:+.1}% (wall: {:.2} -> {:.2} ns, {:+.1}%): goal (within 5%) {}.",
                    x.kernel(),
                    y.kernel(),
                    x.wall(),
                    y.wall(),
                    change(x.wall(), y.wall()),
                    if c.abs() <= 5.0 { "MET" } else { "NOT MET" }
                );
            }
            let spreads: Vec<String> = self
                .results
                .iter()
                .filter_map(|r| {
                    r.series(Dest::Last)
                        .map(|s| format!("{}: {:.1}%", r.peers, spread(&s.wall_ns)))
                })
                .collect();
            let _ = writeln!(
                m,
                "Round-to-round spread (max-min)/median of the last-CIDR wall ns: {}.",
                spreads.join(", ")
            );
        }
        let _ = writeln!(
            m,
            "\nMap fill times: {}.",
            self.results
                .iter()
                .map(|r| format!("{} peers {:.0?}", r.peers, r.fill))
                .collect::<Vec<_>>()
                .join(", ")
        );
        m
    }

    fn to_json(&self, args: &MarkingArgs) -> Value {
        let results: Vec<Value> = self
            .results
            .iter()
            .map(|r| {
                let tr: Vec<Value> = r
                    .test_run
                    .iter()
                    .map(|s| {
                        json!({
                            "destination": s.dest.name(),
                            "dst": s.dst.to_string(),
                            "repeat": s.repeat,
                            "kernel_ns_median": s.kernel(),
                            "wall_ns_median": s.wall(),
                            "kernel_ns": s.kernel_ns,
                            "wall_ns": s.wall_ns,
                        })
                    })
                    .collect();
                let generator: serde_json::Map<String, Value> = Variant::ALL
                    .iter()
                    .filter_map(|v| r.gen_of(*v).map(|g| (v, g)))
                    .map(|(v, g)| {
                        let rounds: Vec<Value> = g
                            .samples
                            .iter()
                            .map(|s| {
                                json!({
                                    "received": s.rx,
                                    "sent": s.sent,
                                    "elapsed_ns": s.elapsed.as_nanos() as u64,
                                    "ns_per_packet": s.ns_per_packet(),
                                })
                            })
                            .collect();
                        (
                            v.name().to_owned(),
                            json!({
                                "ns_per_packet_median": g.ns(),
                                "mpps": g.mpps(),
                                "rounds": rounds,
                            }),
                        )
                    })
                    .collect();
                json!({
                    "peers": r.peers,
                    "map_fill_ns": r.fill.as_nanos() as u64,
                    "test_run": tr,
                    "generator": generator,
                })
            })
            .collect();
        let summary: Vec<Value> = summary(self)
            .into_iter()
            .map(|(what, from, to, c)| {
                json!({"measure": what, "from": from, "to": to, "change_pct": c})
            })
            .collect();
        json!({
            "benchmark": "marking",
            "kernel": self.kernel,
            "cpus": self.cpus,
            "total_s": self.total.as_secs_f64(),
            "config": {
                "peers": args.peers,
                "rounds": args.rounds,
                "run_ms": args.run_ms,
                "gen_rounds": args.gen_rounds,
                "gen_ms": args.gen_ms,
                "generator": !args.no_generator,
                "frame_bytes": 14 + 20 + 8 + PAYLOAD,
            },
            "results": results,
            "summary": summary,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Overlay throughput

/// `enc-bench overlay`: iperf3 TCP throughput pod to pod across two nodes, for plain veth,
/// plain kernel VXLAN and every enc tunnel x encryption combination, one setup at a time.
mod overlay {
    use super::{STOP, check_stop, install_signal_handlers, kernel_release, median, require_root};
    use anyhow::{Context, bail, ensure};
    use clap::Args;
    use enc_tests::lab::{Lab, LabOptions};
    use enc_tests::netns::Netns;
    use enc_tests::scenarios::expected_pod_mtu;
    use enc_tests::sys;
    use serde_json::{Value, json};
    use std::fmt::Write as _;
    use std::io::Read;
    use std::net::Ipv4Addr;
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::Ordering;
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    /// Arguments of `enc-bench overlay`.
    #[derive(Debug, Args)]
    pub struct OverlayArgs {
        /// Length of one iperf3 run (`-t`), in seconds.
        #[arg(long, default_value_t = 5)]
        pub time: u32,
        /// Parallel streams of the multi-stream run (`-P`).
        #[arg(long, default_value_t = 4)]
        pub streams: u32,
        /// iperf3 runs per setup and stream count; the median is reported.
        #[arg(long, default_value_t = 1)]
        pub rounds: usize,
        /// Only the setups whose name contains one of these (comma-separated), e.g.
        /// `veth,kernel-vxlan,enc-vxlan-wireguard`. The % columns need the baselines.
        #[arg(long, value_delimiter = ',')]
        pub only: Vec<String>,
        /// How long to wait for the two agents to authenticate each other, in seconds.
        #[arg(long, default_value_t = 60)]
        pub auth_timeout: u64,
        /// Print JSON instead of the markdown report.
        #[arg(long)]
        pub json: bool,
    }

    /// TCP port of the iperf3 server.
    const IPERF_PORT: &str = "5201";
    /// The tunnels the agent supports, in table order.
    const TUNNELS: [&str; 3] = ["disabled", "vxlan", "geneve"];
    /// The encryption types the agent supports, in table order.
    const ENCRYPTIONS: [&str; 3] = ["none", "wireguard", "ipsec"];
    /// What the table says about Geneve on a kernel without it.
    const NO_GENEVE: &str =
        "not available on this kernel (no geneve module); measured only in the VM tier";

    /// One thing to measure.
    #[derive(Clone, Copy, Debug)]
    enum Setup {
        /// Two namespaces joined by a veth pair.
        Veth,
        /// Two namespaces on a veth/bridge underlay, each with a plain kernel VXLAN device.
        KernelVxlan,
        /// A lab of two real agents with one pod each.
        Enc {
            tunnel: &'static str,
            encryption: &'static str,
        },
    }

    impl Setup {
        fn name(self) -> String {
            match self {
                Self::Veth => "veth".into(),
                Self::KernelVxlan => "kernel-vxlan".into(),
                Self::Enc { tunnel, encryption } => format!("enc-{tunnel}-{encryption}"),
            }
        }

        /// The packet layers on the underlay, outermost first (as `encctl status` prints them).
        fn stack(self) -> String {
            match self {
                Self::Veth => "ip (one veth pair)".into(),
                Self::KernelVxlan => "vxlan(ip)".into(),
                Self::Enc { tunnel, encryption } => {
                    let inner = match tunnel {
                        "disabled" => "pod".to_owned(),
                        t => format!("{t}(pod)"),
                    };
                    match encryption {
                        "none" => inner,
                        e => format!("{e}({inner})"),
                    }
                }
            }
        }
    }

    /// One iperf3 client run.
    #[derive(Clone, Debug)]
    pub(super) struct Run {
        /// `end.sum_received.bits_per_second`.
        pub(super) bits_per_second: f64,
        /// `end.sum_received.bytes`.
        pub(super) bytes: u64,
        /// `end.sum_sent.retransmits`.
        pub(super) retransmits: Option<u64>,
        /// Wall time of the client process.
        pub(super) wall: Duration,
        /// Busy CPU time of the whole machine during the run (`/proc/stat`).
        pub(super) cpu_s: f64,
        /// CPU time of the agents' processes during the run (enc setups only).
        pub(super) agent_cpu_s: Option<f64>,
    }

    impl Run {
        pub(super) fn gbps(&self) -> f64 {
            self.bits_per_second / 1e9
        }
        pub(super) fn gb(&self) -> f64 {
            self.bytes as f64 / 1e9
        }
        pub(super) fn cpu_per_gb(&self) -> f64 {
            self.cpu_s / self.gb()
        }
        pub(super) fn agent_cpu_per_gb(&self) -> Option<f64> {
            self.agent_cpu_s.map(|c| c / self.gb())
        }
        pub(super) fn to_json(&self) -> Value {
            json!({
                "bits_per_second": self.bits_per_second,
                "bytes": self.bytes,
                "retransmits": self.retransmits,
                "wall_s": self.wall.as_secs_f64(),
                "cpu_s": self.cpu_s,
                "cpu_s_per_gb": self.cpu_per_gb(),
                "agent_cpu_s": self.agent_cpu_s,
                "agent_cpu_s_per_gb": self.agent_cpu_per_gb(),
            })
        }
    }

    /// Medians over the runs of one stream count.
    #[derive(Clone, Copy, Debug)]
    struct Summary {
        gbps: f64,
        cpu_per_gb: f64,
        agent_cpu_per_gb: Option<f64>,
    }

    fn summarize(runs: &[Run]) -> Summary {
        let of = |f: fn(&Run) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
        let agent: Vec<f64> = runs.iter().filter_map(Run::agent_cpu_per_gb).collect();
        Summary {
            gbps: of(Run::gbps),
            cpu_per_gb: of(Run::cpu_per_gb),
            agent_cpu_per_gb: (!agent.is_empty()).then(|| median(&agent)),
        }
    }

    /// What became of one setup.
    #[derive(Debug)]
    enum Outcome {
        Measured { single: Vec<Run>, multi: Vec<Run> },
        Unavailable(String),
        Failed(String),
    }

    /// One row of the report.
    #[derive(Debug)]
    struct Row {
        name: String,
        stack: String,
        pod_mtu: Option<u32>,
        /// The encryption implementation the agent reports (`boringtun`, `userspace-esp`, ...).
        backend: Option<String>,
        /// Anything odd seen while setting up (printed under the table).
        notes: Vec<String>,
        outcome: Outcome,
    }

    impl Row {
        fn single(&self) -> Option<Summary> {
            match &self.outcome {
                Outcome::Measured { single, .. } => Some(summarize(single)),
                _ => None,
            }
        }
        fn multi(&self) -> Option<Summary> {
            match &self.outcome {
                Outcome::Measured { multi, .. } => Some(summarize(multi)),
                _ => None,
            }
        }
    }

    /// The whole run.
    struct Report {
        run: RunInfo,
        rows: Vec<Row>,
    }

    /// Runs the benchmark and prints the report; fails (after printing) if a setup failed.
    pub fn run(args: &OverlayArgs) -> anyhow::Result<()> {
        require_root()?;
        ensure!(args.time >= 1, "--time must be at least 1 second");
        ensure!(args.rounds >= 1, "--rounds must be at least 1");
        ensure!(args.streams >= 2, "--streams must be at least 2");
        let run = RunInfo::begin()?;
        install_signal_handlers();
        let prefix = format!("encb{}", std::process::id() % 100_000);

        let geneve = geneve_available(&prefix)?;
        let mut setups = vec![Setup::Veth, Setup::KernelVxlan];
        for tunnel in TUNNELS {
            for encryption in ENCRYPTIONS {
                setups.push(Setup::Enc { tunnel, encryption });
            }
        }
        let wanted = |s: &Setup| {
            args.only.is_empty() || args.only.iter().any(|w| s.name().contains(w.as_str()))
        };
        let mut rows = Vec::new();
        let mut geneve_listed = false;
        for setup in setups.into_iter().filter(wanted) {
            check_stop()?;
            if let (
                Setup::Enc {
                    tunnel: "geneve", ..
                },
                Err(why),
            ) = (setup, &geneve)
            {
                if !geneve_listed {
                    eprintln!("==> enc-geneve-*: skipped, the kernel has no Geneve ({why})");
                    rows.push(Row {
                        name: "enc-geneve-{none,wireguard,ipsec}".into(),
                        stack: "geneve(pod), wireguard(geneve(pod)), ipsec(geneve(pod))".into(),
                        pod_mtu: None,
                        backend: None,
                        notes: vec![],
                        outcome: Outcome::Unavailable(NO_GENEVE.into()),
                    });
                    geneve_listed = true;
                }
                continue;
            }
            eprintln!("==> {} (load average {})", setup.name(), load_average());
            let row = measure_setup(args, &prefix, setup);
            if let Outcome::Failed(e) = &row.outcome {
                eprintln!("    {} FAILED: {e}", row.name);
            }
            // A Ctrl-C makes the running step fail; do not go on with the next setup.
            check_stop()?;
            rows.push(row);
        }
        let report = Report {
            run: run.end(),
            rows,
        };
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report.to_json(args))?);
        } else {
            print!("{}", report.to_markdown(args));
        }
        let failed: Vec<&str> = report
            .rows
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Failed(_)))
            .map(|r| r.name.as_str())
            .collect();
        ensure!(failed.is_empty(), "setups failed: {}", failed.join(", "));
        Ok(())
    }

    /// Builds one setup, measures it and tears it down (before returning, on every path).
    fn measure_setup(args: &OverlayArgs, prefix: &str, setup: Setup) -> Row {
        let mut row = Row {
            name: setup.name(),
            stack: setup.stack(),
            pod_mtu: None,
            backend: None,
            notes: vec![],
            outcome: Outcome::Failed(String::new()),
        };
        let result = match setup {
            Setup::Veth => measure_veth(args, prefix, &mut row),
            Setup::KernelVxlan => measure_kernel_vxlan(args, prefix, &mut row),
            Setup::Enc { tunnel, encryption } => measure_enc(args, tunnel, encryption, &mut row),
        };
        row.outcome = match result {
            Ok((single, multi)) => Outcome::Measured { single, multi },
            Err(e) => Outcome::Failed(format!("{e:#}")),
        };
        if let Some(left) = leftover_namespaces(prefix) {
            row.notes.push(format!("namespaces left behind: {left}"));
        }
        row
    }

    /// Namespaces of this run that still exist (none should, between setups).
    fn leftover_namespaces(prefix: &str) -> Option<String> {
        let out = sys::output(&["ip", "netns", "list"]).ok()?;
        let ours: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(prefix))
            .map(str::to_owned)
            .collect();
        (!ours.is_empty()).then(|| ours.join(", "))
    }

    /// Whether the kernel can make a Geneve device (tried in a scratch namespace).
    fn geneve_available(prefix: &str) -> anyhow::Result<Result<(), String>> {
        let ns =
            Netns::new(&format!("{prefix}-gp")).context("create the Geneve probe namespace")?;
        let out = sys::output_in(
            ns.name(),
            &[
                "ip",
                "link",
                "add",
                "gnv0",
                "type",
                "geneve",
                "id",
                "1",
                "remote",
                "127.0.0.2",
            ],
        )?;
        Ok(if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        })
    }

    /// Two namespaces joined by one veth pair: 10.79.0.1 (client) to 10.79.0.2 (server).
    fn measure_veth(
        args: &OverlayArgs,
        prefix: &str,
        row: &mut Row,
    ) -> anyhow::Result<(Vec<Run>, Vec<Run>)> {
        let a = Netns::new(&format!("{prefix}-va"))?;
        let b = Netns::new(&format!("{prefix}-vb"))?;
        a.run(&[
            "ip",
            "link",
            "add",
            "veth-a",
            "type",
            "veth",
            "peer",
            "name",
            "veth-b",
            "netns",
            b.name(),
        ])?;
        for (ns, dev, addr) in [
            (&a, "veth-a", "10.79.0.1/24"),
            (&b, "veth-b", "10.79.0.2/24"),
        ] {
            ns.run(&["ip", "addr", "add", addr, "dev", dev])?;
            ns.run(&["ip", "link", "set", dev, "up"])?;
        }
        row.pod_mtu = Some(link_mtu(&a, "veth-a")?);
        measure(args, a.name(), b.name(), Ipv4Addr::new(10, 79, 0, 2), &[])
    }

    /// A plain kernel VXLAN between two "nodes" on a bridge, as the baseline for an overlay.
    struct VxlanLab {
        /// The two node namespaces (dropped first).
        nodes: Vec<Netns>,
        /// The underlay namespace with bridge br0.
        _underlay: Netns,
    }

    impl VxlanLab {
        fn new(prefix: &str) -> anyhow::Result<Self> {
            let underlay = Netns::new(&format!("{prefix}-xul"))?;
            underlay.run(&["ip", "link", "add", "br0", "type", "bridge"])?;
            underlay.run(&["ip", "link", "set", "br0", "up"])?;
            let mut nodes = Vec::new();
            for i in 1..=2u8 {
                let ns = Netns::new(&format!("{prefix}-x{i}"))?;
                let uplink = format!("x{i}");
                underlay.run(&[
                    "ip",
                    "link",
                    "add",
                    &uplink,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    ns.name(),
                ])?;
                underlay.run(&["ip", "link", "set", &uplink, "master", "br0", "up"])?;
                let local = format!("10.77.0.{i}");
                let remote = format!("10.77.0.{}", 3 - i);
                ns.run(&["ip", "addr", "add", &format!("{local}/24"), "dev", "eth0"])?;
                ns.run(&["ip", "link", "set", "eth0", "up"])?;
                ns.run(&[
                    "ip", "link", "add", "vx0", "type", "vxlan", "id", "42", "dstport", "4789",
                    "remote", &remote, "local", &local, "dev", "eth0",
                ])?;
                ns.run(&[
                    "ip",
                    "addr",
                    "add",
                    &format!("10.79.1.{i}/24"),
                    "dev",
                    "vx0",
                ])?;
                ns.run(&["ip", "link", "set", "vx0", "up"])?;
                nodes.push(ns);
            }
            Ok(Self {
                nodes,
                _underlay: underlay,
            })
        }
    }

    /// iperf3 over vx0 from node 1 (10.79.1.1) to node 2 (10.79.1.2).
    fn measure_kernel_vxlan(
        args: &OverlayArgs,
        prefix: &str,
        row: &mut Row,
    ) -> anyhow::Result<(Vec<Run>, Vec<Run>)> {
        let lab = VxlanLab::new(prefix)?;
        row.pod_mtu = Some(link_mtu(&lab.nodes[0], "vx0")?);
        measure(
            args,
            lab.nodes[0].name(),
            lab.nodes[1].name(),
            Ipv4Addr::new(10, 79, 1, 2),
            &[],
        )
    }

    /// A lab of two real agents (one pod each): pod n1p1 to pod n2p1. On failure the agents'
    /// log tails go to stderr. The lab is dropped (agents stopped, namespaces deleted) here.
    fn measure_enc(
        args: &OverlayArgs,
        tunnel: &'static str,
        encryption: &'static str,
        row: &mut Row,
    ) -> anyhow::Result<(Vec<Run>, Vec<Run>)> {
        let tag = format!("b{}{}", &tunnel[..1], &encryption[..1]);
        let opts = LabOptions {
            pods: 1,
            encryption,
            tunnel,
            strict: encryption != "none",
            ..LabOptions::new(&tag, 2)
        };
        let mut lab = Lab::build(&opts).with_context(|| format!("build the lab {}", row.name))?;
        let result = run_enc(args, &mut lab, tunnel, encryption, row);
        if result.is_err() {
            for n in &lab.nodes {
                eprintln!(
                    "----- {} agent log (last 30 lines) -----\n{}",
                    n.name,
                    lab.log_tail(n.index, 30)
                );
            }
        }
        drop(lab);
        result
    }

    fn run_enc(
        args: &OverlayArgs,
        lab: &mut Lab,
        tunnel: &str,
        encryption: &str,
        row: &mut Row,
    ) -> anyhow::Result<(Vec<Run>, Vec<Run>)> {
        lab.start_all().context("start the agents")?;
        let timeout = Duration::from_secs(args.auth_timeout);
        lab.wait_authenticated(1, &["node-2"], timeout)?;
        lab.wait_authenticated(2, &["node-1"], timeout)?;
        let status = lab.status(1)?;
        row.stack = status.network.stack.clone();
        row.pod_mtu = Some(status.network.pod_mtu);
        if encryption != "none" {
            row.backend = Some(status.encryption.backend.clone());
        }
        let want_mtu = expected_pod_mtu(encryption, tunnel);
        if status.network.pod_mtu != want_mtu {
            row.notes.push(format!(
                "the agent reports pod MTU {}, expected_pod_mtu says {want_mtu}",
                status.network.pod_mtu
            ));
        }
        let dst = lab.node(2).pods[0].addr;
        sys::wait_for(
            &format!("pod n1p1 to ping {dst}"),
            Duration::from_secs(20),
            || Ok(lab.ping(1, 1, dst, 1, "00")?.then_some(())),
        )?;
        let agents = [lab.node(1).ns.name(), lab.node(2).ns.name()];
        measure(
            args,
            lab.node(1).pods[0].ns.name(),
            lab.node(2).pods[0].ns.name(),
            dst,
            &agents,
        )
    }

    /// The MTU of `dev` in `ns`.
    fn link_mtu(ns: &Netns, dev: &str) -> anyhow::Result<u32> {
        let path = format!("/sys/class/net/{dev}/mtu");
        let out = ns.run(&["cat", &path])?;
        let s = String::from_utf8_lossy(&out.stdout);
        s.trim()
            .parse()
            .with_context(|| format!("parse {path} in {}: {s:?}", ns.name()))
    }

    /// Runs `rounds` x (1 stream, `streams` streams) iperf3 from `client` to an iperf3 server
    /// in `server` at `dst`. `agents` are namespaces whose processes' CPU time is counted.
    fn measure(
        args: &OverlayArgs,
        client: &str,
        server: &str,
        dst: Ipv4Addr,
        agents: &[&str],
    ) -> anyhow::Result<(Vec<Run>, Vec<Run>)> {
        let _server = IperfServer::start(server)?;
        let (mut single, mut multi) = (Vec::new(), Vec::new());
        for _ in 0..args.rounds {
            for streams in [1, args.streams] {
                check_stop()?;
                let r = iperf_run(client, dst, args.time, streams, agents)?;
                eprintln!(
                    "    -P {streams}: {:.3} Gbit/s, {:.2} GB, {:.1} CPU s ({:.1} s/GB){}",
                    r.gbps(),
                    r.gb(),
                    r.cpu_s,
                    r.cpu_per_gb(),
                    r.agent_cpu_s
                        .map(|a| format!(", agents {a:.1} CPU s"))
                        .unwrap_or_default()
                );
                if streams == 1 {
                    single.push(r);
                } else {
                    multi.push(r);
                }
            }
        }
        Ok((single, multi))
    }

    /// A child process that is killed (and reaped) on drop.
    pub(super) struct ChildGuard(pub(super) Option<Child>);

    impl Drop for ChildGuard {
        fn drop(&mut self) {
            if let Some(mut c) = self.0.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// `iperf3 -s` in a namespace; killed on drop.
    pub(super) struct IperfServer {
        /// The `ip netns exec ... iperf3 -s` process (exec'd, so iperf3 itself).
        _child: ChildGuard,
    }

    impl IperfServer {
        /// Starts the server in `ns` and returns once it listens.
        pub(super) fn start(ns: &str) -> anyhow::Result<Self> {
            let child = Command::new("ip")
                .args(["netns", "exec", ns, "iperf3", "-s", "-p", IPERF_PORT])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("start `iperf3 -s` in {ns}"))?;
            let mut guard = ChildGuard(Some(child));
            let filter = format!("sport = :{IPERF_PORT}");
            sys::wait_for(
                &format!("iperf3 -s to listen in {ns}"),
                Duration::from_secs(10),
                || {
                    if let Some(c) = guard.0.as_mut()
                        && let Some(st) = c.try_wait()?
                    {
                        bail!("iperf3 -s in {ns} exited ({st})");
                    }
                    let out = sys::run_in(ns, &["ss", "-Hltn", &filter])?;
                    Ok((!out.stdout.is_empty()).then_some(()))
                },
            )?;
            Ok(Self { _child: guard })
        }
    }

    /// Reads a pipe to its end on a thread.
    fn drain(r: Option<impl Read + Send + 'static>) -> JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    }

    /// One iperf3 client run (`-J`) from `ns` to `dst` with `streams` streams for `secs`,
    /// with the CPU time spent meanwhile.
    fn iperf_run(
        ns: &str,
        dst: Ipv4Addr,
        secs: u32,
        streams: u32,
        agents: &[&str],
    ) -> anyhow::Result<Run> {
        let agent_pids: Vec<u32> = agents
            .iter()
            .map(|a| namespace_pids(a))
            .collect::<anyhow::Result<Vec<_>>>()?
            .concat();
        iperf_run_pids(
            ns,
            dst,
            secs,
            streams,
            (!agents.is_empty()).then_some(&agent_pids),
        )
    }

    /// [`iperf_run`] counting the CPU time of the processes `pids` (if given) as the agents'.
    pub(super) fn iperf_run_pids(
        ns: &str,
        dst: Ipv4Addr,
        secs: u32,
        streams: u32,
        pids: Option<&[u32]>,
    ) -> anyhow::Result<Run> {
        let what = format!("`iperf3 -c {dst} -t {secs} -P {streams} -J` in {ns}");
        let agent_pids = pids.unwrap_or_default();
        let agent_before = process_ticks(agent_pids);
        let cpu_before = cpu_busy_ticks()?;
        let start = Instant::now();
        let (d, t, p) = (dst.to_string(), secs.to_string(), streams.to_string());
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "iperf3", "-c", &d, "-p", IPERF_PORT])
            .args(["-t", &t, "-P", &p, "-J", "--connect-timeout", "5000"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("start {what}"))?;
        let stdout = drain(child.stdout.take());
        let stderr = drain(child.stderr.take());
        let mut guard = ChildGuard(Some(child));
        let deadline = start + Duration::from_secs(u64::from(secs) + 30);
        let status = loop {
            let c = guard.0.as_mut().context("iperf3 child")?;
            if let Some(st) = c.try_wait().with_context(|| format!("wait for {what}"))? {
                break st;
            }
            if STOP.load(Ordering::SeqCst) {
                bail!("{what}: interrupted");
            }
            if Instant::now() > deadline {
                bail!("{what} did not finish within {}s", u64::from(secs) + 30);
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let wall = start.elapsed();
        let cpu_s = (cpu_busy_ticks()?.saturating_sub(cpu_before)) as f64 / clk_tck();
        let agent_cpu_s = pids
            .is_some()
            .then(|| process_ticks(agent_pids).saturating_sub(agent_before) as f64 / clk_tck());
        drop(guard);
        let out = stdout.join().unwrap_or_default();
        let err = stderr.join().unwrap_or_default();
        let err = String::from_utf8_lossy(&err);
        let v: Value = serde_json::from_slice(&out).with_context(|| {
            format!(
                "{what} ({status}): its output is not JSON: {}{}",
                err.trim(),
                String::from_utf8_lossy(&out).trim()
            )
        })?;
        if let Some(e) = v.get("error").and_then(Value::as_str) {
            bail!("{what} ({status}): {e}");
        }
        ensure!(status.success(), "{what} failed ({status}): {}", err.trim());
        let received = &v["end"]["sum_received"];
        let bits_per_second = received["bits_per_second"]
            .as_f64()
            .with_context(|| format!("{what}: no end.sum_received.bits_per_second"))?;
        let bytes = received["bytes"]
            .as_u64()
            .with_context(|| format!("{what}: no end.sum_received.bytes"))?;
        ensure!(bytes > 0, "{what}: nothing received");
        Ok(Run {
            bits_per_second,
            bytes,
            retransmits: v["end"]["sum_sent"]["retransmits"].as_u64(),
            wall,
            cpu_s,
            agent_cpu_s,
        })
    }

    /// Clock ticks per second of `/proc/stat` and `/proc/<pid>/stat`.
    pub(super) fn clk_tck() -> f64 {
        // SAFETY: sysconf has no preconditions.
        let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if t > 0 { t as f64 } else { 100.0 }
    }

    /// Busy ticks of all CPUs (user + nice + system + irq + softirq + steal) from `/proc/stat`.
    pub(super) fn cpu_busy_ticks() -> anyhow::Result<u64> {
        let text = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
        let line = text
            .lines()
            .find(|l| l.starts_with("cpu "))
            .context("no `cpu` line in /proc/stat")?;
        let f: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        ensure!(f.len() >= 8, "short `cpu` line in /proc/stat: {line}");
        // user nice system idle iowait irq softirq steal (guest is inside user already).
        Ok(f[0] + f[1] + f[2] + f[5] + f[6] + f[7])
    }

    /// The processes in a network namespace (`ip netns pids`).
    pub(super) fn namespace_pids(ns: &str) -> anyhow::Result<Vec<u32>> {
        let out = sys::run(&["ip", "netns", "pids", ns])?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect())
    }

    /// utime + stime (all threads) of the processes that still exist, in ticks.
    pub(super) fn process_ticks(pids: &[u32]) -> u64 {
        pids.iter()
            .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
            .filter_map(|s| {
                // Fields after the command name: state is field 3, utime 14, stime 15.
                let rest = &s[s.rfind(')')? + 1..];
                let f: Vec<&str> = rest.split_whitespace().collect();
                Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
            })
            .sum()
    }

    /// `/proc/loadavg`'s three load averages.
    pub(super) fn load_average() -> String {
        std::fs::read_to_string("/proc/loadavg")
            .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|_| "unknown".into())
    }

    /// Where and when an iperf3 benchmark ran: the first line of the overlay and datapaths
    /// reports and their JSON. [`RunInfo::begin`] reads the start, [`RunInfo::end`] the end.
    pub(super) struct RunInfo {
        date: String,
        kernel: String,
        cpus: usize,
        pub(super) iperf: String,
        command: String,
        load_start: String,
        load_end: String,
        started: Instant,
        total: Duration,
    }

    impl RunInfo {
        /// Checks that iperf3 is there and notes the date and the load average.
        pub(super) fn begin() -> anyhow::Result<Self> {
            let iperf = sys::run(&["iperf3", "--version"])
                .context("iperf3 is needed (apt-get install iperf3)")?;
            let iperf = String::from_utf8_lossy(&iperf.stdout)
                .lines()
                .next()
                .unwrap_or("iperf3")
                .trim()
                .to_owned();
            let date = sys::run(&["date", "-u", "+%Y-%m-%d %H:%M UTC"])
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_else(|_| "unknown date".into());
            Ok(Self {
                date,
                kernel: kernel_release(),
                cpus: std::thread::available_parallelism().map_or(0, usize::from),
                iperf,
                command: std::env::args().collect::<Vec<_>>().join(" "),
                load_start: load_average(),
                load_end: String::new(),
                started: Instant::now(),
                total: Duration::ZERO,
            })
        }

        /// Notes the load average at the end and the time the run took.
        pub(super) fn end(mut self) -> Self {
            self.load_end = load_average();
            self.total = self.started.elapsed();
            self
        }

        /// `## enc-bench <bench>` and the line that says when, where and how it ran.
        pub(super) fn headline(&self, bench: &str) -> String {
            format!(
                "## enc-bench {bench}\n\n{}, kernel {}, {} CPUs, load average {} at the start and \
                 {} at the end, {:.0?} in all. Command: `{}`\n",
                self.date,
                self.kernel,
                self.cpus,
                self.load_start,
                self.load_end,
                self.total,
                self.command
            )
        }

        /// The JSON report of `bench`: these fields, `config` and `results`.
        pub(super) fn json(&self, bench: &str, config: Value, results: Vec<Value>) -> Value {
            json!({
                "benchmark": bench,
                "date": self.date,
                "kernel": self.kernel,
                "cpus": self.cpus,
                "iperf3": self.iperf,
                "command": self.command,
                "load_average_start": self.load_start,
                "load_average_end": self.load_end,
                "total_s": self.total.as_secs_f64(),
                "config": config,
                "results": results,
            })
        }
    }

    /// `part` as a percentage of `whole`, for the table.
    fn pct(part: Option<Summary>, whole: Option<Summary>) -> Option<f64> {
        Some(part?.gbps / whole?.gbps * 100.0)
    }

    impl Report {
        fn baseline(&self, name: &str) -> Option<Summary> {
            self.rows.iter().find(|r| r.name == name)?.single()
        }

        fn to_markdown(&self, args: &OverlayArgs) -> String {
            let mut m = String::new();
            let _ = writeln!(m, "{}", self.run.headline("overlay"));
            let _ = writeln!(
                m,
                "{} TCP, `-t {}` per run, 1 stream and `-P {}`, {} run(s) each (median); \
                 Gbit/s = `end.sum_received.bits_per_second`. CPU s/GB = busy CPU time of the \
                 whole machine during the run (`/proc/stat`) per 10^9 bytes received, 1 stream / \
                 {} streams; agents = the part of it spent by the two enc-agent processes.\n",
                self.run.iperf, args.time, args.streams, args.rounds, args.streams
            );
            let _ = writeln!(
                m,
                "| setup | stack on the wire | pod MTU | 1 stream Gbit/s | {s} streams Gbit/s | \
                 % of veth (1 stream) | % of kernel VXLAN (1 stream) | CPU s/GB (1 / {s}) | \
                 agents CPU s/GB (1 / {s}) |\n|---|---|---:|---:|---:|---:|---:|---:|---:|",
                s = args.streams
            );
            let (veth, vxlan) = (self.baseline("veth"), self.baseline("kernel-vxlan"));
            let num = |v: Option<f64>, d: usize| v.map_or("-".to_owned(), |v| format!("{v:.d$}"));
            for r in &self.rows {
                let setup = match &r.backend {
                    Some(b) => format!("{} ({b})", r.name),
                    None => r.name.clone(),
                };
                let mtu = r.pod_mtu.map_or("-".to_owned(), |v| v.to_string());
                let cells = match &r.outcome {
                    Outcome::Measured { .. } => {
                        let (s, p) = (r.single(), r.multi());
                        let agents = match (
                            s.and_then(|s| s.agent_cpu_per_gb),
                            p.and_then(|p| p.agent_cpu_per_gb),
                        ) {
                            (None, None) => "-".to_owned(),
                            (a, b) => format!("{} / {}", num(a, 1), num(b, 1)),
                        };
                        format!(
                            "{} | {} | {} | {} | {} / {} | {agents}",
                            num(s.map(|s| s.gbps), 3),
                            num(p.map(|p| p.gbps), 3),
                            num(pct(s, veth), 0),
                            num(pct(s, vxlan), 0),
                            num(s.map(|s| s.cpu_per_gb), 1),
                            num(p.map(|p| p.cpu_per_gb), 1),
                        )
                    }
                    Outcome::Unavailable(why) => format!("{why} | - | - | - | - | -"),
                    Outcome::Failed(e) => {
                        format!("failed: {} | - | - | - | - | -", e.replace('|', "\\|"))
                    }
                };
                let _ = writeln!(m, "| {setup} | {} | {mtu} | {cells} |", r.stack);
            }
            let notes: Vec<String> = self
                .rows
                .iter()
                .flat_map(|r| r.notes.iter().map(move |n| format!("- {}: {n}", r.name)))
                .collect();
            if !notes.is_empty() {
                let _ = writeln!(m, "\nNotes:\n{}", notes.join("\n"));
            }
            m
        }

        fn to_json(&self, args: &OverlayArgs) -> Value {
            let (veth, vxlan) = (self.baseline("veth"), self.baseline("kernel-vxlan"));
            let series = |runs: &[Run]| {
                let s = summarize(runs);
                json!({
                    "gbps_median": s.gbps,
                    "cpu_s_per_gb_median": s.cpu_per_gb,
                    "agent_cpu_s_per_gb_median": s.agent_cpu_per_gb,
                    "runs": runs.iter().map(Run::to_json).collect::<Vec<_>>(),
                })
            };
            let results: Vec<Value> = self
                .rows
                .iter()
                .map(|r| {
                    let mut v = json!({
                        "setup": r.name,
                        "stack": r.stack,
                        "pod_mtu": r.pod_mtu,
                        "backend": r.backend,
                        "notes": r.notes,
                    });
                    let extra = match &r.outcome {
                        Outcome::Measured { single, multi } => json!({
                            "status": "measured",
                            "single_stream": series(single),
                            "multi_stream": series(multi),
                            "pct_of_veth_single": pct(r.single(), veth),
                            "pct_of_kernel_vxlan_single": pct(r.single(), vxlan),
                        }),
                        Outcome::Unavailable(why) => {
                            json!({"status": "unavailable", "reason": why})
                        }
                        Outcome::Failed(e) => json!({"status": "failed", "reason": e}),
                    };
                    if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
                        o.extend(e);
                    }
                    v
                })
                .collect();
            self.run.json(
                "overlay",
                json!({
                    "time_s": args.time,
                    "streams": args.streams,
                    "rounds": args.rounds,
                    "only": args.only,
                }),
                results,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_cidrs_are_distinct_disjoint_and_mixed() {
        let nets: Vec<Ipv4Net> = (0..MAX_PEERS).map(peer_cidr).collect();
        let mut sorted = nets.clone();
        sorted.sort();
        for w in sorted.windows(2) {
            assert!(
                !w[0].contains(&w[1].network()),
                "{} overlaps {}",
                w[0],
                w[1]
            );
        }
        for len in [16, 24, 26] {
            assert!(nets.iter().any(|n| n.prefix_len() == len), "no /{len}");
        }
        let ten: Ipv4Net = "10.0.0.0/8".parse().expect("valid");
        assert!(nets.iter().all(|n| ten.contains(n)));
        for n in &nets {
            assert!(n.contains(&addr_in(*n)));
        }
    }

    #[test]
    fn every_default_peer_count_uses_the_same_lengths_and_ends_in_a_26() {
        for n in [10, 100, 1_000, 10_000] {
            let mut lens: Vec<u8> = (0..n).map(|i| peer_cidr(i).prefix_len()).collect();
            assert_eq!(peer_cidr(n - 1).prefix_len(), 26, "{n}");
            lens.sort_unstable();
            lens.dedup();
            assert_eq!(lens, vec![16, 24, 26], "{n}");
        }
        assert_eq!(peer_cidr(0).prefix_len(), 24);
        assert_eq!(peer_cidr(FIRST_WIDE).prefix_len(), 16);
        assert!(Dest::Wide.target(FIRST_WIDE).is_none());
        assert!(Dest::Wide.target(FIRST_WIDE + 1).is_some());
    }

    #[test]
    fn frame_is_60_bytes_with_a_valid_ip_checksum() {
        let f = udp_frame(POD_ADDR, Ipv4Addr::new(10, 1, 2, 5));
        assert_eq!(f.len(), 60);
        let sum: u32 = f[14..34]
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum();
        let folded = (sum & 0xFFFF) + (sum >> 16);
        assert_eq!(folded, 0xFFFF);
    }
}
