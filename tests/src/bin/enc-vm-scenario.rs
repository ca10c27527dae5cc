//! `enc-vm-scenario`: the program the VM tier runs inside its guest (see `docs/vm-tier.md`).
//!
//! `probe` checks what the kernel can do (kernel WireGuard, XFRM ESP, Geneve, clsact, tcx);
//! `host-tier <wireguard|ipsec>` runs a three-node lab with real agents. Both print
//! `enc-vm.<key>: <value>` lines that the host reads back from the console. Root only; it runs on a
//! host just as well.

use clap::{Parser, Subcommand};
use enc_tests::vm::scenario;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Debug, Parser)]
#[command(
    name = "enc-vm-scenario",
    about = "Scenarios of the enc VM test tier (run inside the guest)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Check the kernel: WireGuard, XFRM ESP rfc4106(gcm(aes)), Geneve, clsact, tcx.
    Probe,
    /// Run a host-tier lab scenario with real agents.
    HostTier {
        /// Which one.
        #[arg(value_parser = ["wireguard", "ipsec"])]
        name: String,
    },
    /// Run a host-tier lab scenario with node-2 on the userspace implementation (mixed pairs).
    Mixed {
        /// Which one.
        #[arg(value_parser = ["wireguard", "ipsec"])]
        name: String,
    },
    /// Run the ESP-in-UDP scenario: `encapsulation: udp` on two kernel-XFRM nodes and one
    /// userspace-ESP node.
    EspInUdp,
    /// Run the overlay scenario: reachability, capture and the DF/MTU probe for one
    /// combination of encryption and tunnel.
    Overlay {
        /// Encryption type.
        #[arg(value_parser = ["none", "wireguard", "ipsec"])]
        encryption: String,
        /// Tunnel protocol.
        #[arg(value_parser = ["vxlan", "geneve", "disabled"])]
        tunnel: String,
    },
    /// Run a shell script given in base64 (a debugging aid: `Vm::run_script` sends one).
    Shell {
        /// The script, base64-encoded.
        script: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !enc_tests::require_root("enc-vm-scenario") {
        return ExitCode::from(2);
    }
    let start = Instant::now();
    let r = match &cli.command {
        Cmd::Probe => scenario::probe(),
        Cmd::HostTier { name } => scenario::host_tier(name),
        Cmd::Mixed { name } => scenario::mixed(name),
        Cmd::EspInUdp => scenario::esp_in_udp(),
        Cmd::Overlay { encryption, tunnel } => scenario::overlay(encryption, tunnel),
        Cmd::Shell { script } => scenario::shell(script),
    };
    scenario::value(
        "time.total",
        format!("{:.1}", start.elapsed().as_secs_f64()),
    );
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("enc-vm-scenario: {e:#}");
            ExitCode::FAILURE
        }
    }
}
