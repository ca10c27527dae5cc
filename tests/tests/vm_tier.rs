//! VM tier: Debian's cloud kernel booted under qemu, with the kernel backends this host lacks
//! (WireGuard, XFRM ESP, Geneve) and no tcx. Each test boots one VM and runs one
//! `enc-vm-scenario` command in it (see docs/vm-tier.md). Needs `scripts/vm-setup.sh`; without
//! it the tests fail under `CI=true` and are skipped elsewhere.

use enc_tests::vm::{VmRun, require_vm};

/// Boots a VM for `args`, prints its summary and output, and fails with the console's tail
/// unless the scenario passed.
fn boot(test: &str, args: &[&str]) -> Option<VmRun> {
    let vm = require_vm(test)?;
    let run = vm.run(args).unwrap_or_else(|e| panic!("{test}: {e:#}"));
    eprintln!("{}", run.summary());
    eprintln!("----- scenario output -----\n{}", run.output.trim_end());
    if let Err(e) = run.check() {
        panic!("{test}: {e:#}");
    }
    Some(run)
}

fn one(run: &VmRun, key: &str) -> String {
    let v = run.values(key);
    assert!(
        v.len() == 1,
        "expected one `{key}:` line in the scenario output, got {v:?}"
    );
    v[0].clone()
}

#[test]
fn vm_probe_kernel_features() {
    let Some(run) = boot("vm_probe_kernel_features", &["probe"]) else {
        return;
    };
    assert!(
        run.failed_modules.is_empty(),
        "modules not loaded: {:?}",
        run.failed_modules
    );
    assert!(
        run.kernel.starts_with("6.1."),
        "guest kernel {} is not the 6.1 cloud kernel",
        run.kernel
    );
    for check in ["wireguard", "xfrm-esp", "geneve", "vxlan", "clsact", "tcx"] {
        let v = one(&run, &format!("probe.{check}"));
        assert!(v.starts_with("ok"), "probe {check}: {v}");
    }
    assert_eq!(one(&run, "tcx"), "absent");
    assert_eq!(one(&run, "attach-mode"), "clsact");
}

/// The implementation the agent must pick on the 6.1 kernel, which has the module.
fn kernel_backend(name: &str) -> &'static str {
    match name {
        "wireguard" => "kernel-wireguard",
        _ => "kernel-xfrm",
    }
}

fn userspace_backend(name: &str) -> &'static str {
    match name {
        "wireguard" => "boringtun",
        _ => "userspace-esp",
    }
}

/// Checks the scenario's rotation-under-load step and prints it; also that node-1's
/// `ip xfrm state` showed the ESP SAs with every peer (IPsec) or `wg show` every peer with its
/// endpoint, allowed IPs and a preshared key (WireGuard).
fn rotation_step(run: &VmRun) {
    if one(run, "encryption") == "ipsec" {
        assert_eq!(one(run, "xfrm-states"), "ok");
    } else {
        assert_eq!(one(run, "wg-show"), "ok");
    }
    assert_eq!(one(run, "rotation.udp-lost"), "0");
    eprintln!(
        "vm: {} rotations under load: {} UDP packets sent, {} lost; TCP max stall {} ms",
        one(run, "rotation.rotations"),
        one(run, "rotation.udp-sent"),
        one(run, "rotation.udp-lost"),
        one(run, "rotation.tcp-max-stall-ms"),
    );
}

fn host_tier(test: &str, name: &str) {
    let Some(run) = boot(test, &["host-tier", name]) else {
        return;
    };
    assert_eq!(one(&run, "encryption"), name);
    assert_eq!(one(&run, "attach-mode"), "clsact");
    eprintln!(
        "vm: {name}: node-1 uses backend {} ({})",
        one(&run, "backend"),
        one(&run, "backend-reason")
    );
    for i in 1..=3 {
        assert_eq!(
            one(&run, &format!("backend.node-{i}")),
            kernel_backend(name),
            "node-{i}"
        );
    }
    rotation_step(&run);
}

#[test]
fn vm_host_tier_wireguard() {
    host_tier("vm_host_tier_wireguard", "wireguard");
}

#[test]
fn vm_host_tier_ipsec() {
    host_tier("vm_host_tier_ipsec", "ipsec");
}

/// Mixed pairs on the wire: node-2 runs the userspace implementation, node-1 and node-3 the
/// kernel's; every pod pair carries traffic both ways and the rotation under load runs
/// across node-1 (kernel) ↔ node-2 (userspace).
fn mixed(test: &str, name: &str) {
    let Some(run) = boot(test, &["mixed", name]) else {
        return;
    };
    assert_eq!(one(&run, "encryption"), name);
    for (i, want) in [
        (1, kernel_backend(name)),
        (2, userspace_backend(name)),
        (3, kernel_backend(name)),
    ] {
        assert_eq!(one(&run, &format!("backend.node-{i}")), want, "node-{i}");
    }
    eprintln!("vm: mixed {name}: node-1 and node-3 kernel, node-2 userspace");
    rotation_step(&run);
}

#[test]
fn vm_mixed_wireguard() {
    mixed("vm_mixed_wireguard", "wireguard");
}

#[test]
fn vm_mixed_ipsec() {
    mixed("vm_mixed_ipsec", "ipsec");
}

/// ESP in UDP 4500 (`encryption.ipsec.encapsulation: udp`) with kernel XFRM: node-1 ↔ node-2
/// a kernel pair, node-3 the userspace engine (mixed pairs with both). Every SA of the kernel
/// nodes is encapsulated, their MTU is the encapsulated one, and the underlay carries ESP in
/// UDP on every pair both ways, no IP protocol 50 and no plaintext; one rotation of the
/// kernel pair keeps the encapsulation.
#[test]
fn vm_ipsec_esp_in_udp() {
    let Some(run) = boot("vm_ipsec_esp_in_udp", &["esp-in-udp"]) else {
        return;
    };
    assert_eq!(one(&run, "encryption"), "ipsec");
    for (i, want, mtu) in [
        (1, "kernel-xfrm", "1438"),
        (2, "kernel-xfrm", "1438"),
        (3, "userspace-esp", "1438"),
    ] {
        assert_eq!(one(&run, &format!("backend.node-{i}")), want, "node-{i}");
        assert_eq!(one(&run, &format!("mtu.node-{i}")), mtu, "node-{i}");
    }
    assert_eq!(one(&run, "xfrm-encap"), "ok");
    assert_eq!(one(&run, "capture.raw-esp"), "0");
    assert_eq!(one(&run, "capture.marker-frames"), "0");
    assert_eq!(one(&run, "rotation"), "ok");
    eprintln!(
        "vm: ESP in UDP: {} datagrams on UDP 4500, 0 raw ESP, 0 with the marker ({})",
        one(&run, "capture.esp-in-udp"),
        one(&run, "backend-reason")
    );
}

/// Geneve (which the host kernel lacks) with each encryption on the 6.1 kernel: the overlay
/// scenario of the host tier, with kernel WireGuard and kernel XFRM ESP.
fn geneve(test: &str, encryption: &str) {
    let Some(run) = boot(test, &["overlay", encryption, "geneve"]) else {
        return;
    };
    assert_eq!(one(&run, "tunnel"), "geneve");
    let want_mtu = enc_tests::scenarios::expected_pod_mtu(encryption, "geneve");
    assert_eq!(one(&run, "overlay.pod-mtu"), want_mtu.to_string());
    assert_eq!(
        one(&run, "overlay.plaintext-overlay") == "0",
        encryption != "none"
    );
    if encryption == "none" {
        assert_eq!(one(&run, "attach-mode"), "off");
    } else {
        assert_eq!(one(&run, "backend"), kernel_backend(encryption));
        assert_eq!(one(&run, "attach-mode"), "clsact");
        assert_eq!(one(&run, "overlay.marker-frames"), "0");
    }
    eprintln!(
        "vm: geneve over {encryption}: pod MTU {want_mtu}, {} encrypted packets, {} plaintext Geneve packets",
        one(&run, "overlay.encrypted"),
        one(&run, "overlay.plaintext-overlay")
    );
}

#[test]
fn vm_geneve_none() {
    geneve("vm_geneve_none", "none");
}

#[test]
fn vm_geneve_wireguard() {
    geneve("vm_geneve_wireguard", "wireguard");
}

#[test]
fn vm_geneve_ipsec() {
    geneve("vm_geneve_ipsec", "ipsec");
}

/// Debugging aid, not part of the suite: boots a VM and runs the shell script in
/// `ENC_VM_SCRIPT`, printing the console. `ENC_VM_SCRIPT='ip xfrm state' cargo test -p
/// enc-tests --test vm_tier vm_script -- --ignored --nocapture`.
#[test]
#[ignore = "debugging aid: runs the script in ENC_VM_SCRIPT"]
fn vm_script() {
    let script = std::env::var("ENC_VM_SCRIPT").expect("set ENC_VM_SCRIPT to a shell script");
    let Some(vm) = require_vm("vm_script") else {
        return;
    };
    let run = vm
        .run_script(&script)
        .unwrap_or_else(|e| panic!("vm_script: {e:#}"));
    eprintln!("{}\n{}", run.console.trim_end(), run.summary());
    run.check().unwrap_or_else(|e| panic!("vm_script: {e:#}"));
}
