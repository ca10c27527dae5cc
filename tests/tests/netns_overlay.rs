//! Host-tier overlay tests (issue 7): VXLAN and direct routing, each with encryption none,
//! WireGuard (boringtun) and IPsec (the userspace ESP engine), three real agents in network
//! namespaces. Geneve runs in the VM tier: this kernel has no Geneve module, and the test
//! here checks the start-up error that says so. Every test needs root; under `CI=true` it
//! fails rather than skips without it.

use anyhow::{Context, ensure};
use enc_tests::lab::{Lab, LabOptions};
use enc_tests::require_root;
use enc_tests::scenarios::overlay_matrix;
use std::time::Duration;

fn run(tag: &str, encryption: &'static str, tunnel: &'static str) {
    let name = format!("privileged_overlay_{tunnel}_{encryption}");
    if !require_root(&name) {
        return;
    }
    let mut opts = LabOptions::new(tag, 3);
    opts.pods = 1;
    opts.encryption = encryption;
    opts.tunnel = tunnel;
    opts.strict = encryption != "none";
    let mut lab = Lab::build(&opts).expect("build lab");
    let r = (|| -> anyhow::Result<()> {
        lab.start_all()?;
        overlay_matrix(&lab, encryption, tunnel, 3)?;
        Ok(())
    })();
    lab.finish(r);
}

#[test]
fn privileged_overlay_vxlan_none() {
    run("vn", "none", "vxlan");
}

#[test]
fn privileged_overlay_vxlan_wireguard() {
    run("vw", "wireguard", "vxlan");
}

#[test]
fn privileged_overlay_vxlan_ipsec() {
    run("vi", "ipsec", "vxlan");
}

#[test]
fn privileged_overlay_disabled_none() {
    run("dn", "none", "disabled");
}

#[test]
fn privileged_overlay_disabled_wireguard() {
    run("dw", "wireguard", "disabled");
}

#[test]
fn privileged_overlay_disabled_ipsec() {
    run("di", "ipsec", "disabled");
}

/// Clean shutdown removes the overlay device and enc's routes; a restarted agent creates them
/// again and traffic flows; a kernel without Geneve refuses `tunnel: geneve` at start-up with
/// an error that says so and suggests vxlan, leaving nothing behind.
#[test]
fn privileged_overlay_restart_and_geneve_refusal() {
    if !require_root("privileged_overlay_restart_and_geneve_refusal") {
        return;
    }
    let mut opts = LabOptions::new("vr", 2);
    opts.pods = 1;
    opts.tunnel = "vxlan";
    let mut lab = Lab::build(&opts).expect("build lab");
    let r = (|| -> anyhow::Result<()> {
        lab.start_all()?;
        lab.wait_authenticated(1, &["node-2"], Duration::from_secs(30))?;
        let node2 = lab.node(2).ns.name().to_owned();
        let show = |what: &[&str]| -> anyhow::Result<String> {
            let out = enc_tests::sys::output_in(&node2, what)?;
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        ensure!(show(&["ip", "link", "show", "enc-vxlan0"])?.contains("enc-vxlan0"));
        lab.stop_agent(2)?;
        ensure!(
            !show(&["ip", "link", "show"])?.contains("enc-vxlan0"),
            "the overlay device outlived a clean stop"
        );
        ensure!(
            !show(&["ip", "route", "show", "table", "all"])?.contains("proto 229"),
            "enc's routes outlived a clean stop"
        );
        lab.start_agent(2)?;
        lab.wait_authenticated(1, &["node-2"], Duration::from_secs(30))?;
        let dst = lab.node(2).pods[0].addr;
        enc_tests::sys::wait_for("traffic after the restart", Duration::from_secs(20), || {
            Ok(lab.ping(1, 1, dst, 1, "00")?.then_some(()))
        })?;

        // Geneve on this kernel.
        lab.stop_agent(2)?;
        let config = lab.node(2).config.clone();
        let text = std::fs::read_to_string(&config)?;
        std::fs::write(&config, text.replace("protocol: vxlan", "protocol: geneve"))?;
        let agent = enc_tests::lab::bin_dir()?.join("enc-agent");
        let out = enc_tests::sys::output_in(
            &node2,
            &[
                agent.to_str().context("path")?,
                "--config",
                config.to_str().context("path")?,
            ],
        )?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let text = format!("{stdout}{stderr}");
        // The host kernel of this tier has no Geneve (the VM tier runs it for real).
        ensure!(
            !out.status.success(),
            "the agent started with geneve on a kernel expected to lack it: {text}"
        );
        ensure!(
            text.contains("tunnel.protocol")
                && text.contains("no geneve device support")
                && text.contains("use tunnel.protocol: vxlan"),
            "the refusal does not say what is wrong and what to do: {text}"
        );
        ensure!(
            !show(&["ip", "link", "show"])?.contains("enc-"),
            "a refused start left a device behind: {}",
            show(&["ip", "link", "show"])?
        );
        eprintln!(
            "geneve refused: {}",
            text.lines()
                .rev()
                .find(|l| l.contains("geneve"))
                .unwrap_or("")
        );
        Ok(())
    })();
    lab.finish(r);
}
