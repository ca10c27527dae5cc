//! `enc-bench-node`: one end of `enc-bench datapaths`. It starts one of enc's userspace
//! datapaths (the boringtun WireGuard device or the userspace ESP engine) in the calling
//! network namespace, exactly as the agent's backends run them, configures the interface with
//! `ip`, prints `ready` and runs until it is killed (which closes the TUN fd and so removes the
//! interface).
//!
//! The keys are fixed benchmark keys derived from the side (`a` or `b`), so that the two ends
//! agree without a control channel. They protect nothing; never use this binary outside the
//! benchmark. No key is printed.

use anyhow::{Context, bail, ensure};
use clap::{Parser, ValueEnum};
use enc_ipsec::userspace::{ESP_IN_UDP_PORT, Encapsulation, UserspaceConfig, UserspaceEsp};
use enc_ipsec::{IpsecBackend, IpsecPeerSpec, SaKeys};
use enc_wireguard::{BoringtunConfig, BoringtunWg, PeerSpec, PresharedKey, PrivateKey, WgBackend};
use ipnet::IpNet;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The datapath to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Kind {
    /// boringtun's noise core on enc's device layer (UDP port 51820).
    Wireguard,
    /// enc's userspace ESP engine (AES-256-GCM, raw IP protocol 50).
    Esp,
}

/// How the ESP datapath carries ESP on the veth.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Encap {
    /// Raw ESP, IP protocol 50.
    None,
    /// ESP in UDP port 4500 (RFC 3948), with UDP GSO and GRO.
    Udp,
}

/// Which end of the pair this is; picks the keys and SPIs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Side {
    /// The first end.
    A,
    /// The second end.
    B,
}

#[derive(Debug, Parser)]
#[command(
    name = "enc-bench-node",
    about = "One end of enc-bench's datapath benchmark"
)]
struct Cli {
    /// The datapath.
    kind: Kind,
    /// This end.
    #[arg(long)]
    side: Side,
    /// Name of the TUN interface to create.
    #[arg(long)]
    ifname: String,
    /// This end's underlay address.
    #[arg(long)]
    local: IpAddr,
    /// The other end's underlay address.
    #[arg(long)]
    remote: IpAddr,
    /// This end's tunnel address with its prefix (e.g. 10.81.0.1/24).
    #[arg(long)]
    inner: IpNet,
    /// The other end's tunnel addresses (routed into the tunnel, accepted from it).
    #[arg(long)]
    peer_inner: IpNet,
    /// MTU of the TUN interface.
    #[arg(long, default_value_t = 1420)]
    mtu: u32,
    /// ESP only: raw ESP or ESP in UDP.
    #[arg(long, value_enum, default_value_t = Encap::None)]
    encap: Encap,
}

/// UDP port of the WireGuard device.
const WG_PORT: u16 = 51820;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn main() {
    if let Err(e) = run(&Cli::parse()) {
        eprintln!("enc-bench-node: error: {e:#}");
        std::process::exit(1);
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("run ip {}", args.join(" ")))?;
    ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// A fixed 32-byte benchmark key for `side` and `purpose`.
fn bench_key(side: Side, purpose: u8) -> [u8; 32] {
    let s = match side {
        Side::A => 0xa0,
        Side::B => 0xb0,
    };
    std::array::from_fn(|i| s ^ purpose ^ (i as u8).wrapping_mul(37))
}

fn other(side: Side) -> Side {
    match side {
        Side::A => Side::B,
        Side::B => Side::A,
    }
}

/// The SA `from` sends with (and the other end accepts).
fn sa(from: Side) -> SaKeys {
    let k = bench_key(from, 2);
    SaKeys {
        spi: match from {
            Side::A => 0x1000,
            Side::B => 0x2000,
        },
        key: k,
        salt: [k[0], k[1], k[2], k[3]],
    }
}

enum Device {
    Wg(BoringtunWg),
    Esp(UserspaceEsp),
}

fn start(cli: &Cli) -> anyhow::Result<Device> {
    Ok(match cli.kind {
        Kind::Wireguard => {
            let wg = BoringtunWg::start(BoringtunConfig {
                ifname: cli.ifname.clone(),
                private_key: PrivateKey::from_bytes(bench_key(cli.side, 1)),
                listen: SocketAddr::new(cli.local, WG_PORT),
            })?;
            wg.upsert_peer(&PeerSpec {
                public_key: PrivateKey::from_bytes(bench_key(other(cli.side), 1)).public_key(),
                preshared_key: Some(PresharedKey::from_bytes([0x5a; 32])),
                endpoint: Some(SocketAddr::new(cli.remote, WG_PORT)),
                allowed_ips: vec![cli.peer_inner],
                persistent_keepalive: None,
                local_key: None,
                previous_public_key: None,
            })?;
            Device::Wg(wg)
        }
        Kind::Esp => {
            let esp = UserspaceEsp::start(UserspaceConfig {
                ifname: cli.ifname.clone(),
                local: cli.local,
                replay_window: 1024,
                sa_log: None,
                encapsulation: match cli.encap {
                    Encap::None => Encapsulation::None,
                    Encap::Udp => Encapsulation::Udp {
                        port: ESP_IN_UDP_PORT,
                    },
                },
            })?;
            esp.upsert_peer(&IpsecPeerSpec {
                peer_id: 1,
                name: "bench-peer".into(),
                local: cli.local,
                remote: cli.remote,
                local_cidrs: vec![cli.inner.trunc()],
                remote_cidrs: vec![cli.peer_inner],
                epoch: 1,
                outbound: sa(cli.side),
                inbound: vec![sa(other(cli.side))],
                older_outbound: vec![],
                bypass: vec![],
            })?;
            Device::Esp(esp)
        }
    })
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    if cli.kind == Kind::Wireguard && cli.encap != Encap::None {
        bail!("--encap is for the esp datapath only");
    }
    if cli.inner.addr().is_ipv4() != cli.peer_inner.addr().is_ipv4() {
        bail!("--inner and --peer-inner must be of one address family");
    }
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
    let device = start(cli)?;
    let mtu = cli.mtu.to_string();
    ip(&["link", "set", &cli.ifname, "mtu", &mtu, "up"])?;
    ip(&["addr", "add", &cli.inner.to_string(), "dev", &cli.ifname])?;
    if !cli.inner.contains(&cli.peer_inner.addr()) {
        ip(&[
            "route",
            "add",
            &cli.peer_inner.to_string(),
            "dev",
            &cli.ifname,
        ])?;
    }
    println!("ready");
    std::io::stdout().flush()?;
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
    match device {
        Device::Wg(wg) => wg.shutdown(),
        Device::Esp(esp) => esp.shutdown(),
    }
    Ok(())
}
