//! NetlinkXfrm against the running kernel, inside a fresh network namespace.
//!
//! Needs root (fails under `CI=true` without it). The host kernel does XFRM policies but may
//! refuse ESP-GCM SAs; the SA part asserts whichever the kernel does, with the errno quoted.

// Helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::sync::Arc;

use enc_ipsec::IpsecBackend;
use enc_ipsec::xfrm::{
    KernelIpsec, NetlinkXfrm, PolicySpec, SaSpec, XfrmBackend, block_policies, peer_objects,
    probe_esp_gcm,
};
use enc_ipsec::{Encapsulation, Error, IpsecPeerSpec, SaKeys};
use enc_tests::netns::Netns;

fn keys(spi: u32) -> SaKeys {
    SaKeys {
        spi,
        key: [0x42; 32],
        salt: [1, 2, 3, 4],
    }
}

fn spec() -> IpsecPeerSpec {
    IpsecPeerSpec {
        peer_id: 5,
        name: "node-5".into(),
        local: "192.168.0.1".parse().unwrap(),
        remote: "192.168.0.15".parse().unwrap(),
        local_cidrs: vec![
            "10.1.0.0/24".parse().unwrap(),
            "fd00:1::/64".parse().unwrap(),
        ],
        remote_cidrs: vec![
            "10.105.0.0/24".parse().unwrap(),
            "fd00:5::/64".parse().unwrap(),
        ],
        epoch: 3,
        outbound: keys(0x1005),
        inbound: vec![keys(0x2005)],
        older_outbound: vec![],
        bypass: vec![],
    }
}

/// enc's policies for the test: one peer's out/in/fwd plus the two catch-all blocks.
fn desired() -> Vec<PolicySpec> {
    let mut policies = block_policies();
    policies.extend(peer_objects(&spec(), Encapsulation::None).unwrap().policies);
    policies
}

fn sorted(mut policies: Vec<PolicySpec>) -> Vec<PolicySpec> {
    policies.sort_by_key(|p| format!("{p} {:?}", p.tmpl));
    policies
}

fn ip_xfrm_policy(ns: &Netns) -> String {
    let out = ns.run(&["ip", "xfrm", "policy", "show"]).unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn privileged_xfrm_policies_and_sa_refusal() {
    if !enc_tests::require_root("privileged_xfrm_policies_and_sa_refusal") {
        return;
    }
    let ns = Netns::new(&format!("enc-xfrm-{}", std::process::id())).unwrap();

    // Install through netlink; read back equal.
    let dumped = ns
        .enter(|| -> enc_ipsec::Result<Vec<PolicySpec>> {
            let xfrm = NetlinkXfrm::new()?;
            for p in desired() {
                xfrm.upsert_policy(&p)?;
            }
            xfrm.dump_policies()
        })
        .unwrap()
        .unwrap();
    assert_eq!(sorted(dumped), sorted(desired()));

    // What iproute2 sees.
    let shown = ip_xfrm_policy(&ns);
    for needle in [
        "src 10.1.0.0/24 dst 10.105.0.0/24",
        "dir out priority 235667712",
        "mark 0x53e00/0xffffff00",
        "tmpl src 192.168.0.1 dst 192.168.0.15",
        "src 10.105.0.0/24 dst 10.1.0.0/24",
        "dir in priority 235667712",
        "dir fwd priority 235667712",
        "mark 0x50d00/0xffff0f00",
        "tmpl src 192.168.0.15 dst 192.168.0.1",
        "proto esp reqid 235667461 mode tunnel",
        "src fd00:1::/64 dst fd00:5::/64",
        "src 0.0.0.0/0 dst 0.0.0.0/0",
        "src ::/0 dst ::/0",
        "dir out action block priority 235732736",
        "mark 0xe00/0xf00",
    ] {
        assert!(shown.contains(needle), "missing {needle:?} in:\n{shown}");
    }
    assert_eq!(shown.matches("action block").count(), 2, "{shown}");

    // Foreign policies: one elsewhere, one on enc's very selector but without a mark.
    ns.run(&[
        "ip",
        "xfrm",
        "policy",
        "add",
        "src",
        "10.9.0.0/24",
        "dst",
        "10.8.0.0/24",
        "dir",
        "out",
        "priority",
        "50",
    ])
    .unwrap();
    ns.run(&[
        "ip",
        "xfrm",
        "policy",
        "add",
        "src",
        "10.1.0.0/24",
        "dst",
        "10.105.0.0/24",
        "dir",
        "out",
        "priority",
        "60",
    ])
    .unwrap();

    // Idempotent upserts, foreign ones invisible, then delete exactly enc's.
    let (after_twice, after_delete) = ns
        .enter(
            || -> enc_ipsec::Result<(Vec<PolicySpec>, Vec<PolicySpec>)> {
                let xfrm = NetlinkXfrm::new()?;
                for _ in 0..2 {
                    for p in desired() {
                        xfrm.upsert_policy(&p)?;
                    }
                }
                let after_twice = xfrm.dump_policies()?;
                for p in desired() {
                    xfrm.delete_policy(&p)?;
                    // Absent is Ok.
                    xfrm.delete_policy(&p)?;
                }
                Ok((after_twice, xfrm.dump_policies()?))
            },
        )
        .unwrap()
        .unwrap();
    assert_eq!(sorted(after_twice), sorted(desired()));
    assert_eq!(after_delete, vec![]);
    let shown = ip_xfrm_policy(&ns);
    assert!(shown.contains("src 10.9.0.0/24 dst 10.8.0.0/24"), "{shown}");
    assert!(
        shown.contains("src 10.1.0.0/24 dst 10.105.0.0/24") && shown.contains("priority 60"),
        "{shown}"
    );
    assert!(
        !shown.contains("mark"),
        "enc policies left behind:\n{shown}"
    );
    assert_eq!(shown.matches("dir out").count(), 2, "{shown}");

    // SAs: this kernel refuses ESP-GCM; a kernel that has it must take and return the SA.
    let outcome = ns
        .enter(|| {
            let xfrm = NetlinkXfrm::new().unwrap();
            let sa: SaSpec = peer_objects(&spec(), Encapsulation::None)
                .unwrap()
                .sas
                .remove(0);
            let upsert = xfrm.upsert_sa(&sa);
            let dumped = xfrm.dump_sas();
            let delete = xfrm.delete_sa(&sa.id());
            let probe = probe_esp_gcm(&xfrm);
            (sa.id(), upsert, dumped, delete, probe)
        })
        .unwrap();
    let (id, upsert, dumped, delete, probe) = outcome;
    match upsert {
        Err(Error::Xfrm { op, what, source }) => {
            let errno = source.raw_os_error().expect("kernel errno");
            assert!(errno > 0, "{op} {what}: {source}");
            assert_eq!(op, "XFRM_MSG_NEWSA");
            assert!(what.contains("0x00001005"), "{what}");
            eprintln!("kernel refused the SA as expected: {source}");
            let reason = probe.expect_err("probe must fail where the SA failed");
            assert!(
                reason.starts_with("kernel refused an ESP rfc4106(gcm(aes)) SA: ")
                    && reason.contains(&source.to_string()),
                "{reason} vs {source}"
            );
            assert_eq!(dumped.unwrap(), vec![]);
            delete.unwrap();
        }
        Err(other) => panic!("unexpected error {other:?}"),
        Ok(()) => {
            let dumped = dumped.unwrap();
            assert_eq!(dumped.len(), 1, "{dumped:?}");
            assert_eq!(dumped[0].id, id);
            assert_eq!(dumped[0].id.dst, "192.168.0.15".parse::<IpAddr>().unwrap());
            delete.unwrap();
            probe.unwrap();
        }
    }
    // KernelIpsec over netlink: the block policies come with `new`, go with `remove_all`;
    // a peer upsert reports the kernel's SA error as it is.
    let (blocks, upsert, left) = ns
        .enter(|| {
            let xfrm: Arc<dyn XfrmBackend> = Arc::new(NetlinkXfrm::new().unwrap());
            let kernel = KernelIpsec::new(xfrm.clone()).unwrap();
            let blocks = xfrm.dump_policies().unwrap();
            let upsert = kernel.upsert_peer(&spec());
            if upsert.is_ok() {
                kernel.delete_peer(spec().peer_id).unwrap();
            }
            kernel.remove_all().unwrap();
            let left = (xfrm.dump_policies().unwrap(), xfrm.dump_sas().unwrap());
            (blocks, upsert.map_err(|e| e.raw_os_error()), left)
        })
        .unwrap();
    assert_eq!(sorted(blocks), sorted(block_policies()));
    if let Err(errno) = upsert {
        assert!(errno.is_some_and(|e| e > 0), "{errno:?}");
    }
    assert_eq!(left, (vec![], vec![]));
    let states = ns.run(&["ip", "xfrm", "state", "show"]).unwrap();
    assert!(states.stdout.is_empty(), "{states:?}");
    drop(ns);
}

#[test]
fn privileged_kernel_ipsec_esp_in_udp_socket() {
    if !enc_tests::require_root("privileged_kernel_ipsec_esp_in_udp_socket") {
        return;
    }
    let ns = Netns::new(&format!("enc-xfrmu-{}", std::process::id())).unwrap();
    let udp = Encapsulation::Udp { port: 4500 };
    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    let outcome = ns
        .enter(move || {
            let xfrm: Arc<dyn XfrmBackend> = Arc::new(NetlinkXfrm::new().unwrap());
            let kernel = KernelIpsec::with_encapsulation(xfrm.clone(), udp, lo).unwrap();
            let bound = kernel.encap_socket();
            let blocks = xfrm.dump_policies().unwrap();
            let ss = String::from_utf8_lossy(
                &std::process::Command::new("ss")
                    .args(["-uanp"])
                    .output()
                    .unwrap()
                    .stdout,
            )
            .into_owned();
            // A second backend on the same address and port is refused, installing nothing new.
            let second = KernelIpsec::with_encapsulation(xfrm.clone(), udp, lo).map(|_| ());
            drop(kernel);
            // Closed with the backend: the port is free again.
            let rebind = std::net::UdpSocket::bind("127.0.0.1:4500").map(|_| ());
            // Another program on 0.0.0.0:4500 makes start-up fail before anything is installed.
            KernelIpsec::adopt(xfrm.clone()).remove_all().unwrap();
            let foreign = std::net::UdpSocket::bind("0.0.0.0:4500").unwrap();
            let taken = KernelIpsec::with_encapsulation(xfrm.clone(), udp, lo).map(|_| ());
            let left = xfrm.dump_policies().unwrap();
            drop(foreign);
            (bound, blocks, ss, second, rebind, taken, left)
        })
        .unwrap();
    let (bound, blocks, ss, second, rebind, taken, left) = outcome;
    assert_eq!(bound, Some("127.0.0.1:4500".parse().unwrap()));
    assert_eq!(sorted(blocks), sorted(block_policies()));
    assert!(ss.contains("127.0.0.1:4500"), "{ss}");
    for (what, r) in [("second backend", second), ("foreign socket", taken)] {
        match r {
            Err(e @ Error::PortInUse { .. }) => {
                assert!(e.to_string().contains("127.0.0.1:4500"), "{what}: {e}");
                assert_eq!(e.raw_os_error(), Some(libc::EADDRINUSE), "{what}");
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    rebind.unwrap();
    assert_eq!(left, vec![], "a refused start installed policies");
    drop(ns);
}
