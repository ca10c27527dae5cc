//! `enc-lab`: a local enc cluster in network namespaces, for trying enc out.
//!
//! `enc-lab demo` builds N nodes with two pods each, starts real agents, waits until every
//! node has authenticated every other, sends pod-to-pod traffic, prints `encctl status` and
//! `encctl peers`, and tears everything down (or waits for Ctrl-C with `--keep`).

use anyhow::{Context, ensure};
use clap::{Parser, Subcommand};
use enc_tests::lab::{Lab, LabOptions};
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(name = "enc-lab", about = "A local enc cluster in network namespaces")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start a cluster, show its authenticated peers, send traffic, tear it down.
    Demo {
        /// Number of nodes (2 to 9).
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Keep the cluster running until Enter (prints how to reach it).
        #[arg(long)]
        keep: bool,
        /// Encryption: wireguard or ipsec.
        #[arg(long, default_value = "wireguard", value_parser = ["wireguard", "ipsec"])]
        encryption: String,
        /// Overlay between the nodes: disabled (direct routing into the encryption device),
        /// vxlan, or geneve (needs a kernel with the geneve module).
        #[arg(long, default_value = "disabled", value_parser = ["disabled", "vxlan", "geneve"])]
        tunnel: String,
    },
}

fn main() -> anyhow::Result<()> {
    let Cli {
        command:
            Cmd::Demo {
                nodes,
                keep,
                encryption,
                tunnel,
            },
    } = Cli::parse();
    ensure!(
        (2..=9).contains(&nodes),
        "--nodes must be 2 to 9 (got {nodes})"
    );
    ensure!(
        enc_tests::require_root("enc-lab demo"),
        "enc-lab needs root (network namespaces)"
    );
    let mut opts = LabOptions::new("demo", nodes);
    // A short grace period so that the demo's `encctl rotate --wait` finishes in seconds.
    opts.rotation = vec!["gracePeriod: 2s".into()];
    opts.encryption = if encryption == "ipsec" {
        "ipsec"
    } else {
        "wireguard"
    };
    opts.tunnel = match tunnel.as_str() {
        "vxlan" => "vxlan",
        "geneve" => "geneve",
        _ => "disabled",
    };
    let mut lab = Lab::build(&opts).context("build the lab")?;
    println!(
        "==> {nodes} nodes in network namespaces {}-n1..n{nodes}; starting agents",
        lab.prefix()
    );
    lab.start_all()?;
    if let Err(e) = lab.wait_mesh(nodes, Duration::from_secs(30)) {
        lab.finish(Err(e));
    }
    println!("==> every node authenticated every other; pinging pod to pod across nodes");
    for i in 1..=nodes {
        let k = i % nodes + 1;
        let to = lab.node(k).pods[0].addr;
        let ok = lab.ping(i, 1, to, 3, "656e63")?;
        println!(
            "    node-{i} pod 1 -> node-{k} pod 1 ({to}): {}",
            if ok { "ok" } else { "FAILED" }
        );
    }
    println!(
        "\n$ encctl rotate --wait   (node-1: moves every pair of node-1 to the next key epoch)\n{}",
        lab.encctl(1, &["rotate", "--wait", "--timeout", "60s"])?
    );
    println!(
        "$ encctl status   (node-1)\n{}",
        lab.encctl(1, &["status"])?
    );
    println!("$ encctl peers    (node-1)\n{}", lab.encctl(1, &["peers"])?);
    if keep {
        println!(
            "cluster left running. Try:\n  ip netns exec {p}-n1p1 ping 10.78.2.11\n  ENC_SOCKET={s} {b}/encctl peers\nPress Ctrl-C to tear it down.",
            p = lab.prefix(),
            s = lab.node(1).socket.display(),
            b = enc_tests::lab::bin_dir()?.display()
        );
        let (tx, rx) = std::sync::mpsc::channel();
        // SAFETY: installing a handler that only writes to a pipe-like channel is not possible
        // without unsafe signal code; instead block on stdin EOF or a line.
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::stdin().read_line(&mut s);
            let _ = tx.send(());
        });
        let _ = rx.recv();
    }
    println!("==> tearing down");
    drop(lab);
    Ok(())
}
