//! Brings the kernel and the datapath to the state the peer table implies.
//!
//! Desired state is data ([`crate::peers::Desired`]); the current state is read back from the
//! backends (`dump`), diffed, and only the differences are applied, so reconciling twice does
//! nothing the second time and an agent restart adopts what it finds.

use crate::Error;
use crate::peers::Desired;
use enc_geneve_vxlan::{LinkBackend, RouteSpec, apply_routes, diff_routes};
use enc_wireguard::WgBackend;
use std::collections::BTreeSet;

/// What one reconcile pass changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// WireGuard peers added or updated.
    pub wg_upserted: usize,
    /// WireGuard peers removed.
    pub wg_deleted: usize,
    /// Routes added or replaced.
    pub routes_upserted: usize,
    /// Routes removed.
    pub routes_deleted: usize,
}

/// Applies `desired` through the backends. WireGuard peers are reconciled before routes are
/// added and after routes are removed never matters for safety: routes without a WireGuard
/// peer drop traffic rather than leak it.
pub fn reconcile(
    desired: &Desired,
    wg: &dyn WgBackend,
    links: &dyn LinkBackend,
    route_table: u32,
) -> Result<Outcome, Error> {
    let mut out = Outcome::default();

    let current = wg.dump().map_err(Error::Wireguard)?;
    let wanted: BTreeSet<_> = desired.wg_peers.iter().map(|p| p.public_key).collect();
    for p in &current.peers {
        if !wanted.contains(&p.public_key) {
            wg.delete_peer(&p.public_key).map_err(Error::Wireguard)?;
            out.wg_deleted += 1;
        }
    }
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

    let current_routes: Vec<RouteSpec> = links.dump_routes(route_table).map_err(Error::Links)?;
    let changes = diff_routes(&current_routes, &desired.routes);
    out.routes_upserted = changes.upsert.len();
    out.routes_deleted = changes.delete.len();
    apply_routes(links, &changes).map_err(Error::Links)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peers::{PeerTable, SessionKeys};
    use enc_geneve_vxlan::{FakeLinks, RT_TABLE_MAIN};
    use enc_key_manager::{Epoch, Pair, PairKeys, SessionSecret};
    use enc_wireguard::{FakeWg, PublicKey};
    use std::time::Instant;

    fn keys(id: u8) -> SessionKeys {
        SessionKeys {
            session_id: id as u64,
            wg_public_key: PublicKey::from([id; 32]),
            wg_port: 51820,
            keys: PairKeys::derive(
                &SessionSecret::from_bytes([id; 32]),
                Epoch::FIRST,
                &Pair::new("node-1", "node-2").unwrap(),
            )
            .unwrap(),
        }
    }

    #[test]
    fn reconcile_is_idempotent_and_follows_the_table() {
        let now = Instant::now();
        let cfg = crate::peers::tests::config();
        let mut table = PeerTable::new(&cfg, now);
        let wg = FakeWg::new("wg0", PublicKey::from([9; 32]), 51820);
        let links = FakeLinks::new();
        links.add_link("wg0", 1440);

        let out = reconcile(&table.desired("wg0", 1440), &wg, &links, RT_TABLE_MAIN).unwrap();
        assert_eq!((out.wg_upserted, out.routes_upserted), (0, 2));
        let again = reconcile(&table.desired("wg0", 1440), &wg, &links, RT_TABLE_MAIN).unwrap();
        assert_eq!(again, Outcome::default());

        table.authenticated("node-1", now, None, keys(1));
        let out = reconcile(&table.desired("wg0", 1440), &wg, &links, RT_TABLE_MAIN).unwrap();
        assert_eq!(
            (out.wg_upserted, out.wg_deleted, out.routes_upserted),
            (1, 0, 0)
        );
        assert_eq!(wg.dump().unwrap().peers.len(), 1);

        // The peer restarts with a new WireGuard key: the old peer goes, the new one comes.
        table.authenticated("node-1", now, None, keys(2));
        let out = reconcile(&table.desired("wg0", 1440), &wg, &links, RT_TABLE_MAIN).unwrap();
        assert_eq!((out.wg_upserted, out.wg_deleted), (1, 1));
        assert_eq!(
            wg.dump().unwrap().peers[0].public_key,
            PublicKey::from([2; 32])
        );

        table.auth_failed("node-1", now, "revoked".into());
        let out = reconcile(&table.desired("wg0", 1440), &wg, &links, RT_TABLE_MAIN).unwrap();
        assert_eq!(out.wg_deleted, 1);
        assert!(wg.dump().unwrap().peers.is_empty());
        // Routes stay, so the peer's traffic is dropped in the device rather than leaked.
        assert_eq!(links.dump_routes(RT_TABLE_MAIN).unwrap().len(), 2);
    }

    #[test]
    fn routes_of_removed_peers_are_deleted() {
        let links = FakeLinks::new();
        links.add_link("wg0", 1440);
        let stale = RouteSpec {
            dst: "10.244.9.0/24".parse().unwrap(),
            dev: "wg0".into(),
            mtu: Some(1440),
            table: RT_TABLE_MAIN,
        };
        links.upsert_route(&stale).unwrap();
        let wg = FakeWg::new("wg0", PublicKey::from([9; 32]), 51820);
        let table = PeerTable::new(&crate::peers::tests::config(), Instant::now());
        let out = reconcile(&table.desired("wg0", 1440), &wg, &links, RT_TABLE_MAIN).unwrap();
        assert_eq!((out.routes_upserted, out.routes_deleted), (2, 1));
        assert!(!links.dump_routes(RT_TABLE_MAIN).unwrap().contains(&stale));
    }
}
