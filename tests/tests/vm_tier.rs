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
}

#[test]
fn vm_host_tier_wireguard() {
    host_tier("vm_host_tier_wireguard", "wireguard");
}

#[test]
fn vm_host_tier_ipsec() {
    host_tier("vm_host_tier_ipsec", "ipsec");
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
