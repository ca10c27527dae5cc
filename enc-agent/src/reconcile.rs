//! Brings the kernel and the datapath to the state the peer table implies.
//!
//! Desired state is data ([`crate::peers::Desired`]); the current state is read back from the
//! backends (`dump`), diffed, and only the differences are applied, so reconciling twice does
//! nothing the second time and an agent restart adopts what it finds.

use crate::Error;
use crate::backend::Crypto;
use crate::peers::{Desired, ENC_TABLE};
use enc_geneve_vxlan::{
    LinkBackend, RT_TABLE_MAIN, RouteSpec, apply_routes, apply_rules, diff_neighs, diff_routes,
    diff_rules,
};
use enc_ipsec::IpsecBackend;
use enc_tunnel_ebpf::Datapath;
use enc_wireguard::WgBackend;
use std::collections::{BTreeMap, BTreeSet};

/// What one reconcile pass changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Encryption peers (WireGuard or IPsec) added or updated.
    pub wg_upserted: usize,
    /// Encryption peers removed.
    pub wg_deleted: usize,
    /// Overlay device created or changed, and neighbour entries added, replaced or removed.
    pub overlay_changed: usize,
    /// Routes added or replaced.
    pub routes_upserted: usize,
    /// Routes removed.
    pub routes_deleted: usize,
    /// Rules added or removed.
    pub rules_changed: usize,
    /// eBPF map entries (CIDRs and peer states) written or removed.
    pub datapath_changed: usize,
}

/// Applies `desired` through the backends, in an order that never opens a gap:
/// new WireGuard peers first, then routes and rules, then the eBPF maps (which let marked
/// traffic through only for peers that now have keys, and stop it for peers that lost them),
/// and stale WireGuard peers last, once nothing steers to them any more.
pub fn reconcile(
    desired: &Desired,
    crypto: &Crypto,
    links: &dyn LinkBackend,
    dp: &dyn Datapath,
) -> Result<Outcome, Error> {
    let mut out = Outcome::default();
    let stale = match crypto {
        Crypto::Wireguard(wg) => Stale::Wireguard(upsert_wg(desired, wg.as_ref(), &mut out)?),
        Crypto::Ipsec(ipsec) => Stale::Ipsec(upsert_ipsec(desired, ipsec.as_ref(), &mut out)?),
        Crypto::None => Stale::None,
    };

    // The overlay device and its neighbours before the routes through it.
    if let Some(overlay) = &desired.overlay {
        let before = links.overlay(&overlay.ifname).map_err(Error::Links)?;
        if !before.is_some_and(|b| b.matches(overlay)) {
            links.upsert_overlay(overlay).map_err(Error::Links)?;
            out.overlay_changed += 1;
        }
        let current = links.dump_neighs(&overlay.ifname).map_err(Error::Links)?;
        let changes = diff_neighs(&current, &desired.neighs);
        for n in &changes.upsert {
            links.upsert_neigh(n).map_err(Error::Links)?;
        }
        for n in &changes.delete {
            links.delete_neigh(n).map_err(Error::Links)?;
        }
        out.overlay_changed += changes.upsert.len() + changes.delete.len();
    }

    // enc's routes in both tables it uses (protocol 229 only), so that a change of mode
    // (encryption on or off) moves them instead of leaving the old ones behind.
    let mut current_routes: Vec<RouteSpec> = links.dump_routes(ENC_TABLE).map_err(Error::Links)?;
    current_routes.extend(links.dump_routes(RT_TABLE_MAIN).map_err(Error::Links)?);
    let changes = diff_routes(&current_routes, &desired.routes);
    out.routes_upserted = changes.upsert.len();
    out.routes_deleted = changes.delete.len();
    apply_routes(links, &changes).map_err(Error::Links)?;

    let rule_changes = diff_rules(&links.dump_rules().map_err(Error::Links)?, &desired.rules);
    out.rules_changed = rule_changes.add.len() + rule_changes.delete.len();
    apply_rules(links, &rule_changes).map_err(Error::Links)?;

    // Without encryption no eBPF program is attached and the maps stay as they are.
    if !matches!(crypto, Crypto::None) {
        out.datapath_changed = reconcile_datapath(desired, dp)?;
    }

    match (crypto, stale) {
        (Crypto::Wireguard(wg), Stale::Wireguard(keys)) => {
            for key in keys {
                wg.delete_peer(&key).map_err(Error::Wireguard)?;
                out.wg_deleted += 1;
            }
            // Static keys of this node that no installed epoch uses any more.
            let mut keep = desired.wg_local_keys.clone();
            keep.push(wg.public_key());
            if wg.private_keys().iter().any(|k| !keep.contains(k)) {
                wg.retain_private_keys(&keep).map_err(Error::Wireguard)?;
            }
        }
        (Crypto::Ipsec(ipsec), Stale::Ipsec(ids)) => {
            for id in ids {
                ipsec.delete_peer(id).map_err(Error::Ipsec)?;
                out.wg_deleted += 1;
            }
        }
        _ => {}
    }
    Ok(out)
}

/// Peers to remove once nothing steers to them any more.
enum Stale {
    Wireguard(Vec<enc_wireguard::PublicKey>),
    Ipsec(Vec<u16>),
    None,
}

fn upsert_wg(
    desired: &Desired,
    wg: &dyn WgBackend,
    out: &mut Outcome,
) -> Result<Vec<enc_wireguard::PublicKey>, Error> {
    let current = wg.dump().map_err(Error::Wireguard)?;
    for spec in &desired.wg_peers {
        let unchanged = current.peers.iter().any(|p| {
            p.public_key == spec.public_key
                && p.endpoint == spec.endpoint
                && p.allowed_ips == spec.allowed_ips
                && p.has_preshared_key == spec.preshared_key.is_some()
        });
        // Upsert is idempotent; calling it for an unchanged peer also applies a changed
        // preshared key, which the dump cannot show.
        wg.upsert_peer(spec).map_err(Error::Wireguard)?;
        if !unchanged {
            out.wg_upserted += 1;
        }
    }
    let wanted: BTreeSet<_> = desired.wg_peers.iter().map(|p| p.public_key).collect();
    Ok(current
        .peers
        .iter()
        .map(|p| p.public_key)
        .filter(|k| !wanted.contains(k))
        .collect())
}

fn upsert_ipsec(
    desired: &Desired,
    ipsec: &dyn IpsecBackend,
    out: &mut Outcome,
) -> Result<Vec<u16>, Error> {
    let current = ipsec.peers().map_err(Error::Ipsec)?;
    for spec in &desired.ipsec_peers {
        let unchanged = current.iter().any(|p| {
            p.peer_id == spec.peer_id
                && p.out_spi == spec.outbound.spi
                && p.inbound
                    .iter()
                    .map(|i| i.spi)
                    .eq(spec.inbound.iter().map(|k| k.spi))
        });
        // Idempotent: an unchanged spec keeps sequence numbers and replay windows.
        ipsec.upsert_peer(spec).map_err(Error::Ipsec)?;
        if !unchanged {
            out.wg_upserted += 1;
        }
    }
    let wanted: BTreeSet<u16> = desired.ipsec_peers.iter().map(|p| p.peer_id).collect();
    Ok(current
        .iter()
        .map(|p| p.peer_id)
        .filter(|id| !wanted.contains(id))
        .collect())
}

/// Brings the eBPF maps to `desired`: peer states before CIDRs when adding (a CIDR never
/// points at a peer without a state), CIDRs before states when removing.
fn reconcile_datapath(desired: &Desired, dp: &dyn Datapath) -> Result<usize, Error> {
    let mut changed = 0;
    let current_peers: BTreeMap<_, _> = dp
        .dump_peers()
        .map_err(Error::Datapath)?
        .into_iter()
        .collect();
    let wanted_peers: BTreeMap<_, _> = desired.peer_states.iter().copied().collect();
    for (id, state) in &wanted_peers {
        if current_peers.get(id) != Some(state) {
            dp.upsert_peer(*id, *state).map_err(Error::Datapath)?;
            changed += 1;
        }
    }
    let current_cidrs: BTreeMap<_, _> = dp
        .dump_cidrs()
        .map_err(Error::Datapath)?
        .into_iter()
        .collect();
    let wanted_cidrs: BTreeMap<_, _> = desired.cidrs.iter().copied().collect();
    for (cidr, id) in &wanted_cidrs {
        if current_cidrs.get(cidr) != Some(id) {
            dp.upsert_cidr(*cidr, *id).map_err(Error::Datapath)?;
            changed += 1;
        }
    }
    for cidr in current_cidrs.keys() {
        if !wanted_cidrs.contains_key(cidr) {
            dp.delete_cidr(*cidr).map_err(Error::Datapath)?;
            changed += 1;
        }
    }
    for id in current_peers.keys() {
        if !wanted_peers.contains_key(id) {
            dp.delete_peer(*id).map_err(Error::Datapath)?;
            changed += 1;
        }
    }
    Ok(changed)
}

/// Attaches the pod programs to every link whose name starts with one of `prefixes`, and
/// forgets links that are gone. Returns the pod interfaces now attached.
pub fn attach_pods(
    links: &dyn LinkBackend,
    dp: &dyn Datapath,
    prefixes: &[String],
) -> Result<Vec<String>, Error> {
    let present: BTreeSet<String> = links
        .links()
        .map_err(Error::Links)?
        .into_iter()
        .map(|l| l.ifname)
        .filter(|n| prefixes.iter().any(|p| n.starts_with(p.as_str())))
        .collect();
    for ifname in &present {
        dp.attach_pod(ifname).map_err(Error::Datapath)?;
    }
    let attached: BTreeSet<String> = dp
        .attached()
        .map_err(Error::Datapath)?
        .into_iter()
        .filter(|(_, hook)| matches!(hook, enc_tunnel_ebpf::Hook::PodIngress))
        .map(|(n, _)| n)
        .collect();
    for gone in attached.difference(&present) {
        dp.detach_pod(gone).map_err(Error::Datapath)?;
    }
    Ok(present.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peers::ENC_TABLE;
    use crate::peers::{Layout, PeerTable, SessionKeys};
    use enc_geneve_vxlan::FakeLinks;
    use enc_key_manager::{Epoch, Pair, PairKeys, SessionSecret};
    use enc_tunnel_ebpf::FakeDatapath;
    use enc_wireguard::{FakeWg, PublicKey};
    use std::time::Instant;

    /// Session `id` authenticates node-1 and switches to its first epoch, `id`.
    fn establish(table: &mut PeerTable, now: Instant, id: u8) {
        table.authenticated(
            "node-1",
            now,
            None,
            SessionKeys {
                session_id: id as u64,
                wg: Some((PublicKey::from([id; 32]), 51820)),
            },
        );
        let keys = PairKeys::derive(
            &SessionSecret::from_bytes([id; 32]),
            Epoch(id as u32),
            &Pair::new("node-1", "node-2").unwrap(),
            "node-2",
        )
        .unwrap();
        assert!(table.install_inbound("node-1", id as u64, keys));
        assert!(table.switch_outbound(
            "node-1",
            id as u64,
            Epoch(id as u32),
            now,
            std::time::Duration::from_secs(1)
        ));
    }

    #[test]
    fn reconcile_is_idempotent_and_follows_the_table() {
        let now = Instant::now();
        let cfg = crate::peers::tests::config();
        let mut table = PeerTable::new(&cfg, now);
        let wg = std::sync::Arc::new(FakeWg::new("wg0", PublicKey::from([9; 32]), 51820));
        let links = FakeLinks::new();
        links.add_link("wg0", 1440);
        let dp = FakeDatapath::new(enc_tunnel_ebpf::AttachMode::Tcx);

        let out = reconcile(
            &table.desired(&Layout::direct("wg0", 1440)),
            &Crypto::Wireguard(wg.clone()),
            &links,
            &dp,
        )
        .unwrap();
        assert_eq!(
            (out.wg_upserted, out.routes_upserted, out.rules_changed),
            (0, 2, 2)
        );
        assert_eq!(out.datapath_changed, 4);
        let again = reconcile(
            &table.desired(&Layout::direct("wg0", 1440)),
            &Crypto::Wireguard(wg.clone()),
            &links,
            &dp,
        )
        .unwrap();
        assert_eq!(again, Outcome::default());
        assert!(
            dp.dump_peers()
                .unwrap()
                .iter()
                .all(|(_, s)| !s.authenticated)
        );

        establish(&mut table, now, 1);
        let out = reconcile(
            &table.desired(&Layout::direct("wg0", 1440)),
            &Crypto::Wireguard(wg.clone()),
            &links,
            &dp,
        )
        .unwrap();
        assert_eq!(
            (out.wg_upserted, out.wg_deleted, out.routes_upserted),
            (1, 0, 0)
        );
        assert_eq!(wg.dump().unwrap().peers.len(), 1);

        // The peer restarts with a new WireGuard key: the old peer goes, the new one comes.
        establish(&mut table, now, 2);
        let out = reconcile(
            &table.desired(&Layout::direct("wg0", 1440)),
            &Crypto::Wireguard(wg.clone()),
            &links,
            &dp,
        )
        .unwrap();
        assert_eq!((out.wg_upserted, out.wg_deleted), (1, 1));
        assert_eq!(
            wg.dump().unwrap().peers[0].public_key,
            PublicKey::from([2; 32])
        );

        table.auth_failed("node-1", now, "revoked".into());
        let out = reconcile(
            &table.desired(&Layout::direct("wg0", 1440)),
            &Crypto::Wireguard(wg.clone()),
            &links,
            &dp,
        )
        .unwrap();
        assert_eq!(out.wg_deleted, 1);
        assert!(wg.dump().unwrap().peers.is_empty());
        let states: std::collections::BTreeMap<_, _> =
            dp.dump_peers().unwrap().into_iter().collect();
        assert!(
            !states[&1].authenticated,
            "a refused peer must be dropped by the datapath"
        );
        // Routes stay, so the peer's traffic is dropped in the device rather than leaked.
        assert_eq!(links.dump_routes(ENC_TABLE).unwrap().len(), 2);
    }

    #[test]
    fn datapath_entries_of_removed_peers_are_deleted() {
        use enc_tunnel_ebpf::{Backend, PeerState};
        let links = FakeLinks::new();
        links.add_link("wg0", 1440);
        let wg = std::sync::Arc::new(FakeWg::new("wg0", PublicKey::from([9; 32]), 51820));
        let dp = FakeDatapath::new(enc_tunnel_ebpf::AttachMode::Tcx);
        let stale = PeerState {
            authenticated: true,
            has_key: true,
            epoch: 1,
            backend: Backend::Wireguard,
        };
        dp.upsert_peer(9, stale).unwrap();
        dp.upsert_cidr("10.244.9.0/24".parse().unwrap(), 9).unwrap();
        let table = PeerTable::new(&crate::peers::tests::config(), Instant::now());
        reconcile(
            &table.desired(&Layout::direct("wg0", 1440)),
            &Crypto::Wireguard(wg.clone()),
            &links,
            &dp,
        )
        .unwrap();
        let ids: Vec<u16> = dp
            .dump_peers()
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids, vec![1, 2]);
        let cidrs = dp.dump_cidrs().unwrap();
        assert!(
            !cidrs.iter().any(|(c, _)| c.to_string() == "10.244.9.0/24"),
            "{cidrs:?}"
        );
        assert_eq!(cidrs.len(), 2);
    }

    #[test]
    fn pod_programs_follow_the_links() {
        let links = FakeLinks::new();
        let dp = FakeDatapath::new(enc_tunnel_ebpf::AttachMode::Tcx);
        for l in ["eth0", "p1", "p2", "enc-wg0"] {
            links.add_link(l, 1500);
        }
        let prefixes = vec!["p".to_owned()];
        assert_eq!(
            attach_pods(&links, &dp, &prefixes).unwrap(),
            vec!["p1", "p2"]
        );
        links.remove_link("p2");
        assert_eq!(attach_pods(&links, &dp, &prefixes).unwrap(), vec!["p1"]);
        let attached: BTreeSet<_> = dp.attached().unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(attached.into_iter().collect::<Vec<_>>(), vec!["p1"]);
    }

    #[test]
    fn routes_of_removed_peers_are_deleted() {
        let links = FakeLinks::new();
        links.add_link("wg0", 1440);
        let stale = RouteSpec {
            dst: "10.244.9.0/24".parse().unwrap(),
            dev: "wg0".into(),
            mtu: Some(1440),
            table: ENC_TABLE,
            via: None,
            encap: None,
        };
        links.upsert_route(&stale).unwrap();
        let wg = std::sync::Arc::new(FakeWg::new("wg0", PublicKey::from([9; 32]), 51820));
        let dp = FakeDatapath::new(enc_tunnel_ebpf::AttachMode::Tcx);
        let table = PeerTable::new(&crate::peers::tests::config(), Instant::now());
        let out = reconcile(
            &table.desired(&Layout::direct("wg0", 1440)),
            &Crypto::Wireguard(wg.clone()),
            &links,
            &dp,
        )
        .unwrap();
        assert_eq!((out.routes_upserted, out.routes_deleted), (2, 1));
        assert!(!links.dump_routes(ENC_TABLE).unwrap().contains(&stale));
    }

    #[test]
    fn overlay_device_neighbours_and_routes_converge_and_move_between_tables() {
        use enc_geneve_vxlan::{OverlayKind, OverlaySpec, RT_TABLE_MAIN, overlay_mac};
        let links = FakeLinks::new();
        let dp = FakeDatapath::new(enc_tunnel_ebpf::AttachMode::Tcx);
        let table = PeerTable::new(&crate::peers::tests::config(), Instant::now());
        let overlay = OverlaySpec {
            ifname: "enc-vxlan0".into(),
            kind: OverlayKind::Vxlan,
            port: 8472,
            mtu: 1450,
            mac: overlay_mac("10.0.0.2".parse().unwrap()),
        };
        let mut layout = Layout {
            crypto: None,
            overlay: Some(overlay.clone()),
            vni: 1,
            underlay_interface: "eth0".into(),
            pod_mtu: 1450,
        };
        let out = reconcile(&table.desired(&layout), &Crypto::None, &links, &dp).unwrap();
        assert_eq!((out.overlay_changed, out.routes_upserted), (3, 2));
        assert_eq!(links.neighs().len(), 2);
        assert_eq!(links.dump_routes(RT_TABLE_MAIN).unwrap().len(), 2);
        assert!(
            dp.dump_peers().unwrap().is_empty(),
            "no datapath without encryption"
        );
        let again = reconcile(&table.desired(&layout), &Crypto::None, &links, &dp).unwrap();
        assert_eq!(again, Outcome::default());

        // Encryption switched on: the routes move to table 229, host routes into the device.
        links.add_link("wg0", 1440);
        layout.crypto = Some(crate::peers::CryptoLayout {
            device: "wg0".into(),
            mtu: 1440,
        });
        let wg = std::sync::Arc::new(FakeWg::new("wg0", PublicKey::from([9; 32]), 51820));
        let out = reconcile(
            &table.desired(&layout),
            &Crypto::Wireguard(wg.clone()),
            &links,
            &dp,
        )
        .unwrap();
        assert_eq!((out.routes_upserted, out.routes_deleted), (4, 2));
        assert!(links.dump_routes(RT_TABLE_MAIN).unwrap().is_empty());
        assert_eq!(links.dump_routes(ENC_TABLE).unwrap().len(), 4);

        // A Geneve device on a kernel without Geneve: the backend's refusal surfaces.
        links.refuse_kind(OverlayKind::Geneve);
        layout.overlay = Some(OverlaySpec {
            kind: OverlayKind::Geneve,
            ..overlay
        });
        let err = reconcile(&table.desired(&layout), &Crypto::None, &links, &dp).unwrap_err();
        assert!(
            format!("{err:?}").contains("95") || err.to_string().contains("enc-vxlan0"),
            "{err:?}"
        );
    }
}
