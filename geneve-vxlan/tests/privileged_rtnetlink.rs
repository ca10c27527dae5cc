//! Privileged test of `RtnetlinkLinks` against the real kernel, inside a throwaway network
//! namespace. Needs root; under `CI` it fails rather than skips when it cannot run.

use std::collections::HashSet;

use enc_geneve_vxlan::{Error, LinkBackend, RT_TABLE_MAIN, RouteSpec, RtnetlinkLinks};
use enc_tests::netns::Netns;
use enc_tests::sys;

/// Runs `ip ARGS`, fails on a non-zero exit, and returns its stdout.
fn ip(args: &[&str]) -> String {
    let full = [&["ip"], args].concat();
    String::from_utf8_lossy(&sys::run(&full).expect("run ip").stdout).into_owned()
}

/// Adds a dummy link `name` in `ns`. Kernels built without `CONFIG_DUMMY` (like the 6.18 test
/// host) lack the dummy type; there a veth pair stands in, its peer `<name>p` up so that `name`
/// gets carrier once it is up itself.
fn add_test_link(ns: &str, name: &str) {
    let out = sys::output(&["ip", "-n", ns, "link", "add", name, "type", "dummy"]).expect("run ip");
    if out.status.success() {
        return;
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Unknown device type"),
        "ip link add {name} type dummy: {stderr}"
    );
    let peer = format!("{name}p");
    eprintln!("no dummy link type in this kernel; using veth {name}/{peer}");
    ip(&[
        "-n", ns, "link", "add", name, "type", "veth", "peer", "name", &peer,
    ]);
    ip(&["-n", ns, "link", "set", &peer, "up"]);
}

fn route(dst: &str, dev: &str, mtu: Option<u32>) -> RouteSpec {
    RouteSpec {
        dst: dst.parse().expect("test route destination"),
        dev: dev.into(),
        mtu,
        table: RT_TABLE_MAIN,
        via: None,
        encap: None,
    }
}

fn line_for<'a>(table: &'a str, prefix: &str) -> Option<&'a str> {
    table.lines().find(|l| l.starts_with(&format!("{prefix} ")))
}

#[test]
fn privileged_rtnetlink_routes_in_netns() {
    if !enc_tests::require_root("privileged_rtnetlink_routes_in_netns") {
        return;
    }
    let name = format!("encln-{}", std::process::id());
    // A leftover from an earlier crashed run of the same pid.
    let _ = sys::output(&["ip", "netns", "del", &name]);
    let netns = Netns::new(&name).expect("create netns");
    let ns = netns.name();
    add_test_link(ns, "d0");
    // A second link with a route of another protocol, which enc must not report.
    add_test_link(ns, "d1");
    ip(&["-n", ns, "link", "set", "d1", "up"]);
    ip(&[
        "-n",
        ns,
        "route",
        "add",
        "10.99.0.0/16",
        "dev",
        "d1",
        "proto",
        "static",
    ]);

    let v4 = route("10.42.1.0/24", "d0", Some(1400));
    let v6 = route("fd00:42:1::/64", "d0", Some(1400));

    let (v4c, v6c) = (v4.clone(), v6.clone());
    let ns_in = ns.to_owned();
    let outcome = netns.enter(move || {
        let links = RtnetlinkLinks::new().expect("open rtnetlink");

        // Links.
        assert_eq!(links.link("nope0").unwrap(), None);
        let before = links.link("d0").unwrap().expect("d0 exists");
        assert!(!before.up);
        links.set_link("d0", 1400, true).unwrap();
        links.set_link("d0", 1400, true).unwrap();
        let after = links.link("d0").unwrap().expect("d0 exists");
        assert_eq!((after.ifname.as_str(), after.index), ("d0", before.index));
        assert_eq!((after.mtu, after.up), (1400, true));
        let err = links.set_link("nope0", 1400, true).unwrap_err();
        assert!(err.is_not_found(), "{err:?}");
        assert!(err.to_string().contains("nope0"), "{err}");

        // Routes: upsert twice, as the kernel sees them.
        for _ in 0..2 {
            links.upsert_route(&v4c).unwrap();
            links.upsert_route(&v6c).unwrap();
        }
        let shown4 = ip(&["-n", &ns_in, "route", "show"]);
        let line = line_for(&shown4, "10.42.1.0/24").unwrap_or_else(|| panic!("{shown4}"));
        assert!(
            line.contains("dev d0") && line.contains("proto 229"),
            "{line}"
        );
        assert!(
            line.contains("scope link") && line.contains("mtu 1400"),
            "{line}"
        );
        let shown6 = ip(&["-n", &ns_in, "-6", "route", "show"]);
        let line = line_for(&shown6, "fd00:42:1::/64").unwrap_or_else(|| panic!("{shown6}"));
        assert!(
            line.contains("dev d0") && line.contains("proto 229"),
            "{line}"
        );
        assert!(line.contains("mtu 1400"), "{line}");
        assert_eq!(shown4.matches("10.42.1.0/24").count(), 1, "{shown4}");
        assert_eq!(shown6.matches("fd00:42:1::/64").count(), 1, "{shown6}");

        let dumped: HashSet<RouteSpec> = links
            .dump_routes(RT_TABLE_MAIN)
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(dumped, HashSet::from([v4c.clone(), v6c.clone()]));
        assert!(links.dump_routes(100).unwrap().is_empty());

        // Replace in place: new MTU, no second route.
        let v4_1380 = v4c.clone().with_mtu(1380);
        links.upsert_route(&v4_1380).unwrap();
        let shown4 = ip(&["-n", &ns_in, "route", "show"]);
        assert_eq!(shown4.matches("10.42.1.0/24").count(), 1, "{shown4}");
        assert!(
            line_for(&shown4, "10.42.1.0/24")
                .unwrap()
                .contains("mtu 1380"),
            "{shown4}"
        );
        links.upsert_route(&v4c).unwrap();

        // A table above 255 goes through RTA_TABLE.
        let in_1000 = v4c.clone().with_table(1000);
        links.upsert_route(&in_1000).unwrap();
        assert_eq!(links.dump_routes(1000).unwrap(), vec![in_1000.clone()]);
        let shown = ip(&["-n", &ns_in, "route", "show", "table", "1000"]);
        assert!(shown.contains("10.42.1.0/24 dev d0 proto 229"), "{shown}");
        links.delete_route(&in_1000).unwrap();
        assert!(links.dump_routes(1000).unwrap().is_empty());

        // Delete, twice.
        for _ in 0..2 {
            links.delete_route(&v4c).unwrap();
            links.delete_route(&v6c).unwrap();
        }
        assert!(links.dump_routes(RT_TABLE_MAIN).unwrap().is_empty());
        let shown4 = ip(&["-n", &ns_in, "route", "show"]);
        assert!(!shown4.contains("10.42.1.0/24"), "{shown4}");
        assert!(
            shown4.contains("10.99.0.0/16"),
            "foreign route untouched: {shown4}"
        );
        assert!(!ip(&["-n", &ns_in, "-6", "route", "show"]).contains("fd00:42:1::/64"));

        // Deleting must not take a foreign route with the same destination.
        links
            .delete_route(&route("10.99.0.0/16", "d1", None))
            .unwrap();
        assert!(ip(&["-n", &ns_in, "route", "show"]).contains("10.99.0.0/16"));

        // A nonexistent device is named in the error.
        let err = links
            .upsert_route(&route("10.43.0.0/24", "nope0", Some(1400)))
            .unwrap_err();
        assert!(err.is_not_found(), "{err:?}");
        assert!(
            matches!(&err, Error::Route { dev, .. } if dev == "nope0"),
            "{err:?}"
        );
        assert!(err.to_string().contains("nope0"), "{err}");
        links
            .delete_route(&route("10.43.0.0/24", "nope0", None))
            .unwrap();

        // Rejected before it reaches the kernel.
        let err = links
            .upsert_route(&route("10.44.0.0/24", "d0", None).with_table(0))
            .unwrap_err();
        assert!(matches!(err, Error::InvalidRoute { .. }), "{err:?}");

        // A kernel refusal comes back with its errno and the link's name.
        let err = links.set_link("d0", 10, true).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err:?}");
        assert!(
            matches!(&err, Error::Link { ifname, .. } if ifname == "d0"),
            "{err:?}"
        );
        assert_eq!(links.link("d0").unwrap().map(|l| l.mtu), Some(1400));
    });
    outcome.expect("run in netns");
}

#[test]
fn privileged_rtnetlink_rules_and_links_in_netns() {
    use enc_geneve_vxlan::{RuleFamily, RuleSpec};
    if !enc_tests::require_root("privileged_rtnetlink_rules_and_links_in_netns") {
        return;
    }
    let netns = Netns::new(&format!("encrl-{}", std::process::id())).expect("create netns");
    let ns = netns.name().to_owned();
    add_test_link(&ns, "d0");
    // A rule of someone else's, which enc must neither report nor delete.
    ip(&[
        "-n", &ns, "rule", "add", "fwmark", "0x1", "lookup", "100", "priority", "900",
    ]);
    let v4 = RuleSpec {
        family: RuleFamily::V4,
        priority: 1000,
        fwmark: 0xe00,
        fwmask: 0xf00,
        table: 229,
    };
    let v6 = RuleSpec {
        family: RuleFamily::V6,
        ..v4.clone()
    };
    let (a, b) = (v4.clone(), v6.clone());
    let dumped = netns
        .enter(move || -> enc_geneve_vxlan::Result<_> {
            let links = RtnetlinkLinks::new()?;
            let names: Vec<String> = links.links()?.into_iter().map(|l| l.ifname).collect();
            links.add_rule(&a)?;
            links.add_rule(&b)?;
            links.add_rule(&a)?; // idempotent
            let dumped = links.dump_rules()?;
            Ok((names, dumped))
        })
        .expect("enter netns")
        .expect("rule operations");
    assert!(
        dumped.0.contains(&"lo".to_owned()) && dumped.0.contains(&"d0".to_owned()),
        "{:?}",
        dumped.0
    );
    let mut rules = dumped.1;
    rules.sort();
    assert_eq!(rules, vec![v4.clone(), v6.clone()]);
    let shown = ip(&["-n", &ns, "rule", "show"]);
    let line = shown
        .lines()
        .find(|l| l.starts_with("1000:"))
        .expect("rule 1000 listed");
    assert!(
        line.contains("fwmark 0xe00/0xf00")
            && line.contains("lookup 229")
            && line.contains("proto 229"),
        "{line}"
    );
    assert!(ip(&["-n", &ns, "-6", "rule", "show"]).contains("fwmark 0xe00/0xf00 lookup 229"));

    let (a, b) = (v4.clone(), v6.clone());
    let left = netns
        .enter(move || -> enc_geneve_vxlan::Result<_> {
            let links = RtnetlinkLinks::new()?;
            links.delete_rule(&a)?;
            links.delete_rule(&b)?;
            links.delete_rule(&a)?; // absent is fine
            links.dump_rules()
        })
        .expect("enter netns")
        .expect("rule deletion");
    assert!(left.is_empty(), "{left:?}");
    let shown = ip(&["-n", &ns, "rule", "show"]);
    assert!(!shown.contains("lookup 229"), "{shown}");
    assert!(
        shown.contains("lookup 100"),
        "foreign rule removed: {shown}"
    );
}

/// The overlay device, its encap routes and neighbours, through the real kernel: created in
/// external mode, read back equal (so a reconcile pass is a no-op), shown by `ip` as an
/// operator expects, adopted when it exists, replaced when it has another port, and removed.
/// Geneve is tried too: on a kernel without it the error must say unsupported.
#[test]
fn privileged_rtnetlink_overlay_device_routes_and_neighbours() {
    use enc_geneve_vxlan::{NeighSpec, OverlayKind, OverlaySpec, TunnelEncap, overlay_mac};
    if !enc_tests::require_root("privileged_rtnetlink_overlay_device_routes_and_neighbours") {
        return;
    }
    let name = format!("enclo-{}", std::process::id());
    let _ = sys::output(&["ip", "netns", "del", &name]);
    let netns = Netns::new(&name).expect("create netns");
    let ns = netns.name().to_owned();
    let local: std::net::IpAddr = "10.77.0.1".parse().unwrap();
    let peer: std::net::IpAddr = "10.77.0.2".parse().unwrap();
    let spec = OverlaySpec {
        ifname: "enc-vx0".into(),
        kind: OverlayKind::Vxlan,
        port: 8472,
        mtu: 1450,
        mac: overlay_mac(local),
    };
    let route = RouteSpec::new("10.78.2.0/24".parse().unwrap(), "enc-vx0")
        .with_mtu(1450)
        .with_table(229)
        .with_via(peer)
        .with_encap(TunnelEncap {
            id: 1,
            src: local,
            dst: peer,
        });
    let neigh = NeighSpec {
        ifname: "enc-vx0".into(),
        ip: peer,
        mac: overlay_mac(peer),
    };
    let (s, r, n) = (spec.clone(), route.clone(), neigh.clone());
    let (snapshot, routes, neighs, geneve) = netns
        .enter(move || -> enc_geneve_vxlan::Result<_> {
            let links = RtnetlinkLinks::new()?;
            links.upsert_overlay(&s)?;
            links.upsert_overlay(&s)?; // adopted as it is
            links.upsert_neigh(&n)?;
            links.upsert_neigh(&n)?;
            links.upsert_route(&r)?;
            let snapshot = links.overlay("enc-vx0")?;
            let routes = links.dump_routes(229)?;
            let neighs = links.dump_neighs("enc-vx0")?;
            let geneve = links.upsert_overlay(&OverlaySpec {
                ifname: "enc-gnv0".into(),
                kind: OverlayKind::Geneve,
                port: 6081,
                ..s.clone()
            });
            Ok((snapshot, routes, neighs, geneve))
        })
        .expect("enter netns")
        .expect("overlay operations");
    let snapshot = snapshot.expect("device exists");
    assert!(snapshot.matches(&spec), "{snapshot:?}");
    assert_eq!(
        routes,
        vec![route.clone()],
        "the route reads back as written"
    );
    assert_eq!(neighs, vec![neigh.clone()]);
    let shown = ip(&["-n", &ns, "-d", "link", "show", "enc-vx0"]);
    assert!(
        shown.contains("vxlan external") && shown.contains("dstport 8472"),
        "{shown}"
    );
    let shown = ip(&["-n", &ns, "route", "show", "table", "229"]);
    assert!(
        shown.contains("10.78.2.0/24")
            && shown.contains("encap ip id 1 src 10.77.0.1 dst 10.77.0.2")
            && shown.contains("via 10.77.0.2 dev enc-vx0")
            && shown.contains("onlink")
            && shown.contains("mtu 1450"),
        "{shown}"
    );
    let shown = ip(&["-n", &ns, "neigh", "show", "dev", "enc-vx0"]);
    assert!(
        shown.contains("10.77.0.2 lladdr 0e:e5:0a:4d:00:02 PERMANENT"),
        "{shown}"
    );
    match geneve {
        Ok(()) => assert!(ip(&["-n", &ns, "-d", "link", "show", "enc-gnv0"]).contains("geneve")),
        Err(e) => assert!(e.is_unsupported(), "geneve refused with {e:?}"),
    }

    // Another port: the device is replaced, which takes its routes and neighbours with it.
    let moved = OverlaySpec {
        port: 4789,
        ..spec.clone()
    };
    let after = netns
        .enter(move || -> enc_geneve_vxlan::Result<_> {
            let links = RtnetlinkLinks::new()?;
            links.upsert_overlay(&moved)?;
            let snapshot = links.overlay("enc-vx0")?;
            let routes = links.dump_routes(229)?;
            let neighs = links.dump_neighs("enc-vx0")?;
            links.delete_link("enc-vx0")?;
            links.delete_link("enc-vx0")?; // absent is fine
            Ok((snapshot, routes, neighs, links.overlay("enc-vx0")?))
        })
        .expect("enter netns")
        .expect("overlay replacement");
    assert_eq!(after.0.as_ref().and_then(|s| s.port), Some(4789));
    assert!(after.1.is_empty() && after.2.is_empty(), "{after:?}");
    assert!(after.3.is_none());
}
