//! `enc-bench datapaths`: the userspace encrypted datapaths side by side with plain veth, kernel
//! VXLAN and the userspace implementations others ship (boringtun-cli, wireguard-go,
//! strongSwan's kernel-libipsec), all on one veth pair between two namespaces, one after the
//! other in one run.
//!
//! Every row builds namespaces `A` and `B` joined by a veth pair (underlay 10.80.0.1/24 and
//! .2/24, MTU 1500), sets its tunnel up between them with the tunnel addresses 10.81.0.1 and
//! .2 (tunnel MTU 1400 for every encrypted row, 1450 for VXLAN), and then measures from `A` to
//! `B`: iperf3 TCP with 1 stream and `-P streams`, and TCP_RR (1-byte request, 1-byte response
//! over one TCP connection, as netperf's TCP_RR; implemented here because Debian has no
//! netperf) with its p50 and p99. Processes of the row are killed and both namespaces deleted
//! before the next row starts.

use super::overlay::{
    ChildGuard, IperfServer, Run, RunInfo, iperf_run_pids, load_average, namespace_pids,
};
use super::{STOP, check_stop, install_signal_handlers, median, require_root};
use anyhow::{Context, bail, ensure};
use clap::Args;
use enc_tests::netns::Netns;
use enc_tests::sys;
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Arguments of `enc-bench datapaths`.
#[derive(Debug, Args)]
pub struct DatapathArgs {
    /// Length of one iperf3 run (`-t`), in seconds.
    #[arg(long, default_value_t = 5)]
    pub time: u32,
    /// Parallel streams of the multi-stream run (`-P`).
    #[arg(long, default_value_t = 4)]
    pub streams: u32,
    /// iperf3 runs per row and stream count; the median is reported.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Length of the TCP_RR run, in seconds.
    #[arg(long, default_value_t = 3)]
    pub rr_time: u32,
    /// Only the rows whose name contains one of these (comma-separated). The ratio columns
    /// need `veth` and `boringtun-cli`.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Path of boringtun-cli (default: `boringtun-cli` on PATH, then
    /// /opt/boringtun-cli/bin/boringtun-cli, where scripts/bench.sh installs it).
    #[arg(long)]
    pub boringtun_cli: Option<PathBuf>,
    /// Print JSON instead of the markdown report.
    #[arg(long)]
    pub json: bool,
}

/// The rows, in table order.
const ROWS: [Row; 8] = [
    Row::Veth,
    Row::KernelVxlan,
    Row::EncWireguard,
    Row::EncEsp,
    Row::EncEspUdp,
    Row::BoringtunCli,
    Row::WireguardGo,
    Row::Libipsec,
];
/// MTU of every encrypted tunnel. strongSwan's libipsec reads its TUN device into buffers of
/// its default MTU, 1400 (with 1420 TCP stalls), so every encrypted row uses 1400.
const TUNNEL_MTU: u32 = 1400;
/// TCP port of the TCP_RR server.
const RR_PORT: u16 = 5301;
/// Underlay addresses of A and B.
const UNDERLAY: [&str; 2] = ["10.80.0.1", "10.80.0.2"];
/// Tunnel addresses of A and B.
const INNER: [&str; 2] = ["10.81.0.1", "10.81.0.2"];

/// One thing to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Row {
    Veth,
    KernelVxlan,
    EncWireguard,
    EncEsp,
    EncEspUdp,
    BoringtunCli,
    WireguardGo,
    Libipsec,
}

impl Row {
    fn name(self) -> &'static str {
        match self {
            Self::Veth => "veth",
            Self::KernelVxlan => "kernel-vxlan",
            Self::EncWireguard => "enc-wireguard",
            Self::EncEsp => "enc-esp",
            Self::EncEspUdp => "enc-esp-udp",
            Self::BoringtunCli => "boringtun-cli",
            Self::WireguardGo => "wireguard-go",
            Self::Libipsec => "strongswan-libipsec",
        }
    }

    /// What travels on the veth.
    fn wire(self) -> &'static str {
        match self {
            Self::Veth => "TCP",
            Self::KernelVxlan => "VXLAN (UDP 4789)",
            Self::EncWireguard | Self::BoringtunCli | Self::WireguardGo => "WireGuard (UDP 51820)",
            Self::EncEsp => "ESP AES-256-GCM (IP proto 50)",
            Self::EncEspUdp => "ESP AES-256-GCM in UDP 4500",
            Self::Libipsec => "ESP AES-256-GCM in UDP 4500 (libipsec needs UDP encapsulation)",
        }
    }
}

/// A tunnel set up between A and B, torn down on drop (its processes die with their guards).
struct Tunnel {
    /// Where iperf3 and TCP_RR connect to (in B).
    dst: Ipv4Addr,
    /// MTU of the path.
    mtu: u32,
    /// Processes that carry the tunnel (their CPU time is reported).
    pids: Vec<u32>,
    /// What the row's implementation reports as its version.
    version: String,
    _children: Vec<ChildGuard>,
    _files: Option<tempfile::TempDir>,
}

/// Percentiles of one TCP_RR run.
#[derive(Clone, Copy, Debug)]
struct Rr {
    transactions: usize,
    p50_us: f64,
    p99_us: f64,
}

/// What became of one row.
#[derive(Debug)]
enum Outcome {
    Measured {
        single: Vec<Run>,
        multi: Vec<Run>,
        rr: Rr,
    },
    /// The peer could not be installed or started on this machine.
    NotInstalled(String),
    Failed(String),
}

#[derive(Debug)]
struct RowResult {
    row: Row,
    mtu: Option<u32>,
    version: String,
    outcome: Outcome,
}

#[derive(Clone, Copy, Debug)]
struct Summary {
    gbps: f64,
    cpu_per_gb: f64,
    tunnel_cpu_per_gb: Option<f64>,
}

fn summarize(runs: &[Run]) -> Summary {
    let of = |f: fn(&Run) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    let t: Vec<f64> = runs.iter().filter_map(Run::agent_cpu_per_gb).collect();
    Summary {
        gbps: of(Run::gbps),
        cpu_per_gb: of(Run::cpu_per_gb),
        tunnel_cpu_per_gb: (!t.is_empty()).then(|| median(&t)),
    }
}

impl RowResult {
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
    fn rr(&self) -> Option<Rr> {
        match &self.outcome {
            Outcome::Measured { rr, .. } => Some(*rr),
            _ => None,
        }
    }
}

/// Runs the benchmark and prints the report; fails (after printing) if a row failed.
pub fn run(args: &DatapathArgs) -> anyhow::Result<()> {
    require_root()?;
    ensure!(args.time >= 1, "--time must be at least 1 second");
    ensure!(args.rounds >= 1, "--rounds must be at least 1");
    ensure!(args.streams >= 2, "--streams must be at least 2");
    ensure!(args.rr_time >= 1, "--rr-time must be at least 1 second");
    let run = RunInfo::begin()?;
    install_signal_handlers();
    let prefix = format!("encd{}", std::process::id() % 100_000);
    let mut results = Vec::new();
    for row in ROWS {
        if !(args.only.is_empty() || args.only.iter().any(|w| row.name().contains(w.as_str()))) {
            continue;
        }
        check_stop()?;
        eprintln!("==> {} (load average {})", row.name(), load_average());
        let r = measure_row(args, &prefix, row);
        match &r.outcome {
            Outcome::Failed(e) => eprintln!("    {} FAILED: {e}", row.name()),
            Outcome::NotInstalled(e) => eprintln!("    {} not installed: {e}", row.name()),
            Outcome::Measured { .. } => {}
        }
        check_stop()?;
        results.push(r);
    }
    let report = Report {
        run: run.end(),
        results,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.to_json(args))?);
    } else {
        print!("{}", report.to_markdown(args));
    }
    let failed: Vec<&str> = report
        .results
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Failed(_)))
        .map(|r| r.row.name())
        .collect();
    ensure!(failed.is_empty(), "rows failed: {}", failed.join(", "));
    Ok(())
}

/// A peer that is missing or cannot start: reported as "not installed", not as a failure.
#[derive(Debug)]
struct NotInstalled(String);

impl std::fmt::Display for NotInstalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotInstalled {}

fn measure_row(args: &DatapathArgs, prefix: &str, row: Row) -> RowResult {
    let mut res = RowResult {
        row,
        mtu: None,
        version: String::new(),
        outcome: Outcome::Failed(String::new()),
    };
    let outcome = (|| -> anyhow::Result<Outcome> {
        let ends = Ends::new(prefix)?;
        let tunnel = ends.tunnel(args, row)?;
        res.mtu = Some(tunnel.mtu);
        res.version = tunnel.version.clone();
        let out = measure(args, &ends, &tunnel);
        drop(tunnel);
        ends.kill_all();
        out
    })();
    res.outcome = match outcome {
        Ok(o) => o,
        Err(e) => match e.downcast_ref::<NotInstalled>() {
            Some(n) => Outcome::NotInstalled(n.0.clone()),
            None => Outcome::Failed(format!("{e:#}")),
        },
    };
    res
}

fn measure(args: &DatapathArgs, ends: &Ends, t: &Tunnel) -> anyhow::Result<Outcome> {
    let _server = IperfServer::start(ends.b.name())?;
    let (mut single, mut multi) = (Vec::new(), Vec::new());
    let pids = (!t.pids.is_empty()).then_some(t.pids.as_slice());
    for _ in 0..args.rounds {
        for streams in [1, args.streams] {
            check_stop()?;
            let r = iperf_run_pids(ends.a.name(), t.dst, args.time, streams, pids)?;
            eprintln!(
                "    -P {streams}: {:.3} Gbit/s, {:.2} GB, {:.1} CPU s ({:.1} s/GB){}",
                r.gbps(),
                r.gb(),
                r.cpu_s,
                r.cpu_per_gb(),
                r.agent_cpu_s
                    .map(|a| format!(", tunnel processes {a:.1} CPU s"))
                    .unwrap_or_default()
            );
            if streams == 1 {
                single.push(r);
            } else {
                multi.push(r);
            }
        }
    }
    let rr = tcp_rr(ends, t.dst, Duration::from_secs(u64::from(args.rr_time)))?;
    eprintln!(
        "    TCP_RR: {} transactions, p50 {:.1} us, p99 {:.1} us",
        rr.transactions, rr.p50_us, rr.p99_us
    );
    Ok(Outcome::Measured { single, multi, rr })
}

/// TCP_RR: one connection from A to `dst`; the client sends 1 byte and waits for the 1-byte
/// answer, for `dur`; the latency of every transaction is recorded.
fn tcp_rr(ends: &Ends, dst: Ipv4Addr, dur: Duration) -> anyhow::Result<Rr> {
    let addr = SocketAddr::from((dst, RR_PORT));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = ends.b.spawn(move || -> anyhow::Result<()> {
        let l = TcpListener::bind(addr).context("bind the TCP_RR server")?;
        let _ = ready_tx.send(());
        let (mut s, _) = l.accept().context("accept")?;
        s.set_nodelay(true)?;
        let mut b = [0u8; 1];
        loop {
            match s.read(&mut b) {
                Ok(0) => return Ok(()),
                Ok(_) => s.write_all(&b)?,
                Err(e) => return Err(e.into()),
            }
        }
    })?;
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("TCP_RR server did not start")?;
    let client = ends.a.spawn(move || -> anyhow::Result<Vec<u32>> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connect to {addr}"))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut lat = Vec::with_capacity(200_000);
        let mut b = [0u8; 1];
        let end = Instant::now() + dur;
        while Instant::now() < end && !STOP.load(Ordering::SeqCst) {
            let t0 = Instant::now();
            s.write_all(&[7])?;
            s.read_exact(&mut b).context("TCP_RR response")?;
            lat.push(u32::try_from(t0.elapsed().as_nanos()).unwrap_or(u32::MAX));
        }
        Ok(lat)
    })?;
    let mut lat = client
        .join()
        .map_err(|_| anyhow::anyhow!("TCP_RR client panicked"))???;
    server
        .join()
        .map_err(|_| anyhow::anyhow!("TCP_RR server panicked"))???;
    ensure!(!lat.is_empty(), "TCP_RR: no transaction completed");
    lat.sort_unstable();
    let pct = |p: f64| {
        let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
        f64::from(lat[i]) / 1e3
    };
    Ok(Rr {
        transactions: lat.len(),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    })
}

/// Namespaces A and B joined by one veth pair.
struct Ends {
    a: Netns,
    b: Netns,
}

impl Ends {
    fn new(prefix: &str) -> anyhow::Result<Self> {
        let a = Netns::new(&format!("{prefix}-a"))?;
        let b = Netns::new(&format!("{prefix}-b"))?;
        enc_tests::offload_check::veth_pair(
            &a,
            &b,
            "ul0",
            [
                &format!("{}/24", UNDERLAY[0]),
                &format!("{}/24", UNDERLAY[1]),
            ],
        )?;
        Ok(Self { a, b })
    }

    fn both(&self) -> [(&Netns, usize); 2] {
        [(&self.a, 0), (&self.b, 1)]
    }

    /// Kills what still runs in the two namespaces (processes this run started there: the
    /// tunnel daemons and anything they forked).
    fn kill_all(&self) {
        for ns in [&self.a, &self.b] {
            for pid in namespace_pids(ns.name()).unwrap_or_default() {
                if let Ok(pid) = libc::pid_t::try_from(pid) {
                    // SAFETY: kill has no memory preconditions; the pid was read from our own
                    // namespace just now.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }

    fn tunnel(&self, args: &DatapathArgs, row: Row) -> anyhow::Result<Tunnel> {
        let t = match row {
            Row::Veth => Tunnel {
                dst: UNDERLAY[1].parse()?,
                mtu: 1500,
                pids: vec![],
                version: "kernel".into(),
                _children: vec![],
                _files: None,
            },
            Row::KernelVxlan => self.vxlan()?,
            Row::EncWireguard => self.enc("wireguard", &[])?,
            Row::EncEsp => self.enc("esp", &[])?,
            Row::EncEspUdp => self.enc("esp", &["--encap", "udp"])?,
            Row::BoringtunCli => self.boringtun_cli(args)?,
            Row::WireguardGo => self.wireguard_go()?,
            Row::Libipsec => self.libipsec()?,
        };
        let dst = t.dst.to_string();
        sys::wait_for(
            &format!("{} to carry a ping to {dst}", row.name()),
            Duration::from_secs(30),
            || {
                check_stop()?;
                let ok = sys::output_in(self.a.name(), &["ping", "-n", "-q", "-c1", "-W1", &dst])?
                    .status
                    .success();
                Ok(ok.then_some(()))
            },
        )?;
        Ok(t)
    }

    fn vxlan(&self) -> anyhow::Result<Tunnel> {
        for (ns, i) in self.both() {
            ns.run(&[
                "ip",
                "link",
                "add",
                "vx0",
                "type",
                "vxlan",
                "id",
                "42",
                "dstport",
                "4789",
                "remote",
                UNDERLAY[1 - i],
                "local",
                UNDERLAY[i],
                "dev",
                "ul0",
            ])?;
            ns.run(&[
                "ip",
                "addr",
                "add",
                &format!("{}/24", INNER[i]),
                "dev",
                "vx0",
            ])?;
            ns.run(&["ip", "link", "set", "vx0", "up"])?;
        }
        Ok(Tunnel {
            dst: INNER[1].parse()?,
            mtu: 1450,
            pids: vec![],
            version: "kernel".into(),
            _children: vec![],
            _files: None,
        })
    }

    fn enc(&self, kind: &str, extra: &[&str]) -> anyhow::Result<Tunnel> {
        let bin = bench_node()?;
        let mut children = Vec::new();
        let mut pids = Vec::new();
        for (ns, i) in self.both() {
            let mut child = Command::new("ip")
                .args(["netns", "exec", ns.name()])
                .arg(&bin)
                .args([kind, "--side", ["a", "b"][i], "--ifname", "enc0"])
                .args(["--local", UNDERLAY[i], "--remote", UNDERLAY[1 - i]])
                .args(["--inner", &format!("{}/24", INNER[i])])
                .args(["--peer-inner", &format!("{}/32", INNER[1 - i])])
                .args(["--mtu", &TUNNEL_MTU.to_string()])
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("start {}", bin.display()))?;
            pids.push(child.id());
            let stdout = child.stdout.take().context("bench node stdout")?;
            children.push(ChildGuard(Some(child)));
            let mut line = String::new();
            BufReader::new(stdout)
                .read_line(&mut line)
                .context("read the bench node's ready line")?;
            ensure!(
                line.trim() == "ready",
                "enc-bench-node {kind} in {} did not start",
                ns.name()
            );
        }
        Ok(Tunnel {
            dst: INNER[1].parse()?,
            mtu: TUNNEL_MTU,
            pids,
            version: format!("enc {}", env!("CARGO_PKG_VERSION")),
            _children: children,
            _files: None,
        })
    }

    /// Configures a WireGuard interface `ifname` in both namespaces with `wg` (keys from
    /// `wg genkey`, one preshared key, as enc's rows use one).
    fn wg_configure(&self, names: [&str; 2], dir: &Path) -> anyhow::Result<()> {
        let genkey = || -> anyhow::Result<String> {
            Ok(String::from_utf8(sys::run(&["wg", "genkey"])?.stdout)?
                .trim()
                .to_owned())
        };
        let keys = [genkey()?, genkey()?];
        let psk = genkey()?;
        let mut pubs = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            let path = dir.join(format!("key{i}"));
            std::fs::write(&path, k)?;
            let mut c = Command::new("wg")
                .arg("pubkey")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()?;
            c.stdin
                .take()
                .context("wg stdin")?
                .write_all(k.as_bytes())?;
            let out = c.wait_with_output()?;
            ensure!(out.status.success(), "wg pubkey failed");
            pubs.push(String::from_utf8(out.stdout)?.trim().to_owned());
        }
        let psk_path = dir.join("psk");
        std::fs::write(&psk_path, psk)?;
        for (ns, i) in self.both() {
            let key = dir.join(format!("key{i}"));
            let endpoint = format!("{}:51820", UNDERLAY[1 - i]);
            let allowed = format!("{}/32", INNER[1 - i]);
            ns.run(&[
                "wg",
                "set",
                names[i],
                "listen-port",
                "51820",
                "private-key",
                path_str(&key)?,
                "peer",
                &pubs[1 - i],
                "preshared-key",
                path_str(&psk_path)?,
                "endpoint",
                &endpoint,
                "allowed-ips",
                &allowed,
            ])?;
            ns.run(&[
                "ip",
                "link",
                "set",
                names[i],
                "mtu",
                &TUNNEL_MTU.to_string(),
                "up",
            ])?;
            ns.run(&[
                "ip",
                "addr",
                "add",
                &format!("{}/24", INNER[i]),
                "dev",
                names[i],
            ])?;
        }
        Ok(())
    }

    /// Starts a userspace WireGuard daemon in both namespaces (`cmd` gets the interface name
    /// appended) and waits for its interface.
    fn wg_daemon(
        &self,
        cmd: &[&str],
        env: &[(&str, &str)],
        names: [&str; 2],
    ) -> anyhow::Result<(Vec<ChildGuard>, Vec<u32>)> {
        let mut children = Vec::new();
        let mut pids = Vec::new();
        for (ns, i) in self.both() {
            let child = Command::new("ip")
                .args(["netns", "exec", ns.name()])
                .args(cmd)
                .arg(names[i])
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("start {}", cmd[0]))?;
            pids.push(child.id());
            children.push(ChildGuard(Some(child)));
            let path = format!("/sys/class/net/{}", names[i]);
            let sock = format!("/var/run/wireguard/{}.sock", names[i]);
            sys::wait_for(
                &format!("{} to create {} and its UAPI socket", cmd[0], names[i]),
                Duration::from_secs(10),
                || {
                    let there = ns.run(&["test", "-e", &path]).is_ok();
                    Ok((there && Path::new(&sock).exists()).then_some(()))
                },
            )?;
        }
        Ok((children, pids))
    }

    fn boringtun_cli(&self, args: &DatapathArgs) -> anyhow::Result<Tunnel> {
        let bin = match &args.boringtun_cli {
            Some(p) => p.clone(),
            None => which("boringtun-cli")
                .or_else(|| {
                    let p = PathBuf::from("/opt/boringtun-cli/bin/boringtun-cli");
                    p.is_file().then_some(p)
                })
                .ok_or_else(|| {
                    NotInstalled(
                        "boringtun-cli not found (scripts/bench.sh installs it with \
                         `cargo install boringtun-cli --locked`)"
                            .into(),
                    )
                })?,
        };
        let version = version_of(&bin, "--version");
        let names = ["btwa", "btwb"];
        let b = path_str(&bin)?;
        let (children, pids) = self.wg_daemon(
            &[b, "--foreground", "--disable-drop-privileges"],
            &[("WG_LOG_FILE", "/dev/null")],
            names,
        )?;
        let dir = tempfile::tempdir()?;
        self.wg_configure(names, dir.path())?;
        Ok(Tunnel {
            dst: INNER[1].parse()?,
            mtu: TUNNEL_MTU,
            pids,
            version,
            _children: children,
            _files: Some(dir),
        })
    }

    fn wireguard_go(&self) -> anyhow::Result<Tunnel> {
        let bin = which("wireguard-go").ok_or_else(|| {
            NotInstalled(
                "wireguard-go not found (scripts/bench.sh installs Debian's `wireguard-go`)".into(),
            )
        })?;
        let version = version_of(&bin, "--version");
        let names = ["wggoa", "wggob"];
        let (children, pids) = self.wg_daemon(
            &[path_str(&bin)?, "-f"],
            &[("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")],
            names,
        )?;
        let dir = tempfile::tempdir()?;
        self.wg_configure(names, dir.path())?;
        Ok(Tunnel {
            dst: INNER[1].parse()?,
            mtu: TUNNEL_MTU,
            pids,
            version,
            _children: children,
            _files: Some(dir),
        })
    }

    /// Two charon daemons (each in its own mount namespace with a private /run, for its pid
    /// file and vici socket) with only the kernel-libipsec plugin for IPsec: IKEv2 with a PSK,
    /// ESP AES-256-GCM in tunnel mode between 10.81.0.1/32 and 10.81.0.2/32.
    fn libipsec(&self) -> anyhow::Result<Tunnel> {
        let charon = Path::new("/usr/lib/ipsec/charon");
        let plugin = Path::new("/usr/lib/ipsec/plugins/libstrongswan-kernel-libipsec.so");
        if !charon.is_file() || !plugin.is_file() {
            return Err(NotInstalled(
                "strongSwan charon or its kernel-libipsec plugin not found (scripts/bench.sh \
                 installs Debian's strongswan-charon, libcharon-extra-plugins and \
                 strongswan-swanctl)"
                    .into(),
            )
            .into());
        }
        let version = sys::run(&["dpkg-query", "-W", "-f=${Version}", "strongswan-charon"])
            .map(|o| format!("strongSwan {}", String::from_utf8_lossy(&o.stdout)))
            .unwrap_or_else(|_| "strongSwan".into());
        let dir = tempfile::tempdir()?;
        let mut children = Vec::new();
        let mut pids = Vec::new();
        // B (the responder) first: A initiates as soon as its configuration is loaded, and
        // gives up if B answers before it has its own.
        for (ns, i) in [(&self.b, 1), (&self.a, 0)] {
            ns.run(&[
                "ip",
                "addr",
                "add",
                &format!("{}/32", INNER[i]),
                "dev",
                "lo",
            ])?;
            let side = dir.path().join(["a", "b"][i]);
            std::fs::create_dir(&side)?;
            let conf = side.join("strongswan.conf");
            std::fs::write(&conf, STRONGSWAN_CONF)?;
            let swanctl = side.join("swanctl.conf");
            std::fs::write(&swanctl, swanctl_conf(i))?;
            let loaded = side.join("loaded");
            let script = format!(
                "mount -t tmpfs tmpfs /run && \
                 {charon} & pid=$!; \
                 for _ in $(seq 100); do [ -S /run/charon.vici ] && break; sleep 0.1; done; \
                 swanctl --load-all --noprompt --file {swanctl} >/dev/null || exit 1; \
                 touch {loaded}; wait $pid",
                charon = charon.display(),
                swanctl = swanctl.display(),
                loaded = loaded.display(),
            );
            let child = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    ns.name(),
                    "unshare",
                    "-m",
                    "sh",
                    "-c",
                    &script,
                ])
                .env("STRONGSWAN_CONF", &conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("start charon")?;
            children.push(ChildGuard(Some(child)));
            // The shell and charon, its child: wait for the TUN device and the loaded
            // configuration.
            sys::wait_for(
                &format!(
                    "charon in {} to create ipsec0 and load its configuration",
                    ns.name()
                ),
                Duration::from_secs(15),
                || {
                    let dev = ns.run(&["test", "-e", "/sys/class/net/ipsec0"]).is_ok();
                    Ok((dev && loaded.exists()).then_some(()))
                },
            )?;
            pids.extend(namespace_pids(ns.name())?);
            ns.run(&[
                "ip",
                "link",
                "set",
                "ipsec0",
                "mtu",
                &TUNNEL_MTU.to_string(),
            ])?;
        }
        Ok(Tunnel {
            dst: INNER[1].parse()?,
            mtu: TUNNEL_MTU,
            pids,
            version,
            _children: children,
            _files: Some(dir),
        })
    }
}

/// charon with the plugins IKEv2 + PSK + AES-GCM need, and kernel-libipsec (loaded before
/// kernel-netlink, so it is the IPsec backend; kernel-netlink does addresses and routes).
const STRONGSWAN_CONF: &str = "charon {
    load_modular = no
    load = random nonce openssl aes gcm sha1 sha2 hmac kdf gmp pubkey pem pkcs1 x509 kernel-libipsec kernel-netlink socket-default vici
    install_routes = yes
    syslog { }
    filelog { }
}
";

fn swanctl_conf(i: usize) -> String {
    let ids = ["a.bench", "b.bench"];
    let start = if i == 0 { "start" } else { "none" };
    format!(
        "connections {{
  bench {{
    version = 2
    local_addrs = {local}
    remote_addrs = {remote}
    encap = yes
    proposals = aes256gcm16-prfsha256-ecp256
    local {{
      auth = psk
      id = {lid}
    }}
    remote {{
      auth = psk
      id = {rid}
    }}
    children {{
      bench {{
        local_ts = {linner}/32
        remote_ts = {rinner}/32
        esp_proposals = aes256gcm16
        mode = tunnel
        start_action = {start}
      }}
    }}
  }}
}}
secrets {{
  ike-bench {{
    id-a = {lid}
    id-b = {rid}
    secret = enc-bench-preshared-key-not-a-secret
  }}
}}
",
        local = UNDERLAY[i],
        remote = UNDERLAY[1 - i],
        lid = ids[i],
        rid = ids[1 - i],
        linner = INNER[i],
        rinner = INNER[1 - i],
    )
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("path {} is not UTF-8", p.display()))
}

/// `name` on PATH.
fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// The first line `bin flag` prints.
fn version_of(bin: &Path, flag: &str) -> String {
    Command::new(bin)
        .arg(flag)
        .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
        .output()
        .ok()
        .and_then(|o| {
            let s = String::from_utf8_lossy(&o.stdout).into_owned()
                + &String::from_utf8_lossy(&o.stderr);
            s.lines().next().map(|l| l.trim().to_owned())
        })
        .unwrap_or_default()
}

/// `enc-bench-node` next to the running `enc-bench` (or in `ENC_BIN_DIR`).
fn bench_node() -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("ENC_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe().context("locate the running executable")?;
            exe.parent().context("no directory")?.to_path_buf()
        }
    };
    let p = dir.join("enc-bench-node");
    if !p.is_file() {
        bail!(
            "{} not found: build it with `cargo build --release -p enc-bench-node` (scripts/bench.sh \
             datapaths does)",
            p.display()
        );
    }
    refuse_stale(&p)?;
    Ok(p)
}

/// Fails if `node` is older than a source file it is built from: `cargo build -p enc-tests`
/// does not rebuild `enc-bench-node`, and a stale one measures code that is no longer there.
/// Skipped when the sources are not where this binary was built.
fn refuse_stale(node: &Path) -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?;
    let built = std::fs::metadata(node)
        .and_then(|m| m.modified())
        .with_context(|| format!("read the modification time of {}", node.display()))?;
    let mut stack: Vec<PathBuf> = [
        "sys/src",
        "wireguard/src",
        "ipsec/src",
        "tests/bench-node/src",
    ]
    .iter()
    .map(|d| root.join(d))
    .filter(|d| d.is_dir())
    .collect();
    stack.push(root.join("Cargo.lock"));
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                stack.extend(entries.filter_map(|e| e.ok().map(|e| e.path())));
            }
        } else if meta.modified().is_ok_and(|m| m > built) {
            bail!(
                "{} is older than {}: rebuild it with `cargo build --release -p enc-bench-node` \
                 (scripts/bench.sh datapaths does)",
                node.display(),
                path.display()
            );
        }
    }
    Ok(())
}

struct Report {
    run: RunInfo,
    results: Vec<RowResult>,
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(a? / b?)
}

impl Report {
    fn find(&self, row: Row) -> Option<&RowResult> {
        self.results.iter().find(|r| r.row == row)
    }

    fn to_markdown(&self, args: &DatapathArgs) -> String {
        let mut m = String::new();
        let _ = writeln!(m, "{}", self.run.headline("datapaths"));
        let _ = writeln!(
            m,
            "Two namespaces on one veth pair (MTU 1500); {} TCP `-t {}`, 1 stream and `-P {}`, \
             {} run(s) each (median), Gbit/s = `end.sum_received.bits_per_second`. TCP_RR = \
             1-byte request and response on one TCP connection for {} s. CPU s/GB = busy CPU \
             time of the whole machine (`/proc/stat`: user, nice, system, irq, softirq, steal) \
             during the run per 10^9 bytes received; tunnel = the part spent by the tunnel's \
             processes (`/proc/<pid>/stat` utime + stime).\n",
            self.run.iperf, args.time, args.streams, args.rounds, args.rr_time
        );
        let s = args.streams;
        let _ = writeln!(
            m,
            "| row | on the wire | MTU | 1 stream Gbit/s | {s} streams Gbit/s | x boringtun-cli \
             (1 / {s}) | % of veth (1 / {s}) | TCP_RR p50 us | TCP_RR p99 us | p50 x veth | \
             CPU s/GB (1 / {s}) | tunnel s/GB (1 / {s}) | version |\n\
             |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        );
        let veth = self.find(Row::Veth);
        let bt = self.find(Row::BoringtunCli);
        let g1 = |r: Option<&RowResult>| r.and_then(RowResult::single).map(|s| s.gbps);
        let gp = |r: Option<&RowResult>| r.and_then(RowResult::multi).map(|s| s.gbps);
        let num = |v: Option<f64>, d: usize| v.map_or("-".to_owned(), |v| format!("{v:.d$}"));
        for r in &self.results {
            let mtu = r.mtu.map_or("-".to_owned(), |v| v.to_string());
            let cells = match &r.outcome {
                Outcome::Measured { .. } => {
                    let (one, many) = (r.single(), r.multi());
                    let rr = r.rr();
                    let vrr = veth.and_then(RowResult::rr);
                    format!(
                        "{} | {} | {} / {} | {} / {} | {} | {} | {} | {} / {} | {} / {}",
                        num(g1(Some(r)), 3),
                        num(gp(Some(r)), 3),
                        num(ratio(g1(Some(r)), g1(bt)), 2),
                        num(ratio(gp(Some(r)), gp(bt)), 2),
                        num(ratio(g1(Some(r)), g1(veth)).map(|x| x * 100.0), 1),
                        num(ratio(gp(Some(r)), gp(veth)).map(|x| x * 100.0), 1),
                        num(rr.map(|x| x.p50_us), 1),
                        num(rr.map(|x| x.p99_us), 1),
                        num(ratio(rr.map(|x| x.p50_us), vrr.map(|x| x.p50_us)), 2),
                        num(one.map(|x| x.cpu_per_gb), 2),
                        num(many.map(|x| x.cpu_per_gb), 2),
                        num(one.and_then(|x| x.tunnel_cpu_per_gb), 2),
                        num(many.and_then(|x| x.tunnel_cpu_per_gb), 2),
                    )
                }
                Outcome::NotInstalled(why) => format!(
                    "not installed: {} | - | - | - | - | - | - | - | -",
                    why.replace('|', "\\|")
                ),
                Outcome::Failed(e) => format!(
                    "failed: {} | - | - | - | - | - | - | - | -",
                    e.replace('|', "\\|")
                ),
            };
            let _ = writeln!(
                m,
                "| {} | {} | {mtu} | {cells} | {} |",
                r.row.name(),
                r.row.wire(),
                r.version
            );
        }
        m
    }

    fn to_json(&self, args: &DatapathArgs) -> Value {
        let series = |runs: &[Run]| {
            let s = summarize(runs);
            json!({
                "gbps_median": s.gbps,
                "cpu_s_per_gb_median": s.cpu_per_gb,
                "tunnel_cpu_s_per_gb_median": s.tunnel_cpu_per_gb,
                "runs": runs.iter().map(Run::to_json).collect::<Vec<_>>(),
            })
        };
        let results: Vec<Value> = self
            .results
            .iter()
            .map(|r| {
                let mut v = json!({
                    "row": r.row.name(),
                    "wire": r.row.wire(),
                    "mtu": r.mtu,
                    "version": r.version,
                });
                let extra = match &r.outcome {
                    Outcome::Measured { single, multi, rr } => json!({
                        "status": "measured",
                        "single_stream": series(single),
                        "multi_stream": series(multi),
                        "tcp_rr": {
                            "transactions": rr.transactions,
                            "p50_us": rr.p50_us,
                            "p99_us": rr.p99_us,
                        },
                    }),
                    Outcome::NotInstalled(why) => json!({"status": "not installed", "reason": why}),
                    Outcome::Failed(e) => json!({"status": "failed", "reason": e}),
                };
                if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
                    o.extend(e);
                }
                v
            })
            .collect();
        self.run.json(
            "datapaths",
            json!({
                "time_s": args.time,
                "streams": args.streams,
                "rounds": args.rounds,
                "rr_time_s": args.rr_time,
                "only": args.only,
            }),
            results,
        )
    }
}
