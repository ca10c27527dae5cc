//! Desired route state, the diff between two route sets and applying it through a backend.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use crate::{Error, LinkBackend, Result};

/// Route protocol number (`rtm_protocol`) that marks the routes enc owns.
///
/// 229 (`0xe5`) is not assigned in `/etc/iproute2/rt_protos` nor in the kernel's `RTPROT_*`
/// list; `ip route` shows it as `proto 229`. On restart the agent dumps the routes carrying this
/// number and reconciles them, and it never touches routes with another protocol.
pub const RTPROT_ENC: u8 = 0xe5;

/// The main routing table (`RT_TABLE_MAIN`).
pub const RT_TABLE_MAIN: u32 = 254;

/// Desired state of one route: `dst` via device `dev` (scope link, or through an on-link
/// gateway `via`), an optional MTU metric and lightweight-tunnel encapsulation, in `table`
/// ([`RT_TABLE_MAIN`] by default), with protocol [`RTPROT_ENC`] so that enc recognises the
/// routes it owns on restart.
///
/// A route is identified in the kernel by `(table, dst)`; the rest are its attributes.
/// `dst` must have no host bits set (`10.0.1.0/24`, not `10.0.1.7/24`), as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteSpec {
    /// Destination prefix.
    pub dst: IpNet,
    /// Output device name.
    pub dev: String,
    /// MTU metric (`RTAX_MTU`), if any.
    pub mtu: Option<u32>,
    /// Routing table id.
    pub table: u32,
    /// On-link gateway (`via ADDR onlink`), of the family of `dst`; `None` for a scope-link
    /// route straight out of `dev`.
    pub via: Option<IpAddr>,
    /// Tunnel metadata for an external-mode overlay device (`encap ip id .. src .. dst ..`).
    pub encap: Option<TunnelEncap>,
}

/// Lightweight-tunnel encapsulation of a route (`LWTUNNEL_ENCAP_IP` / `_IP6`): the metadata an
/// external-mode VXLAN or Geneve device builds the outer headers from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TunnelEncap {
    /// VNI (24 bits).
    pub id: u32,
    /// Outer source address (this node's underlay address).
    pub src: IpAddr,
    /// Outer destination address (the peer's underlay address), of the family of `src`.
    pub dst: IpAddr,
}

impl RouteSpec {
    /// A route to `dst` via `dev` in the main table, without an MTU metric.
    pub fn new(dst: IpNet, dev: impl Into<String>) -> Self {
        Self {
            dst,
            dev: dev.into(),
            mtu: None,
            table: RT_TABLE_MAIN,
            via: None,
            encap: None,
        }
    }

    /// Routes through the on-link gateway `via`.
    #[must_use]
    pub fn with_via(mut self, via: IpAddr) -> Self {
        self.via = Some(via);
        self
    }

    /// Sets the tunnel encapsulation.
    #[must_use]
    pub fn with_encap(mut self, encap: TunnelEncap) -> Self {
        self.encap = Some(encap);
        self
    }

    /// Sets the MTU metric.
    #[must_use]
    pub fn with_mtu(mut self, mtu: u32) -> Self {
        self.mtu = Some(mtu);
        self
    }

    /// Sets the routing table.
    #[must_use]
    pub fn with_table(mut self, table: u32) -> Self {
        self.table = table;
        self
    }

    /// The kernel's identity of the route: `(table, dst)`.
    pub fn key(&self) -> (u32, IpNet) {
        (self.table, self.dst)
    }

    /// Checks what the kernel would reject or silently change, so that a dump reads back
    /// exactly what was written.
    pub fn validate(&self) -> Result<()> {
        let reason = if self.dst != self.dst.trunc() {
            Some("destination has host bits set")
        } else if self.dev.is_empty() || self.dev.len() >= libc::IFNAMSIZ {
            Some("device name must have 1 to 15 bytes")
        } else if self.table == 0 {
            Some("table 0 (RT_TABLE_UNSPEC) is not a table")
        } else if self.mtu == Some(0) {
            Some("an MTU metric of 0 means none; use None")
        } else if self
            .via
            .is_some_and(|v| v.is_ipv4() != self.dst.addr().is_ipv4())
        {
            Some("gateway of another address family than the destination")
        } else if self
            .encap
            .is_some_and(|e| e.src.is_ipv4() != e.dst.is_ipv4() || e.id > 0x00ff_ffff)
        {
            Some("tunnel source and destination of different families, or a VNI above 2^24-1")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(Error::InvalidRoute {
                dst: self.dst,
                dev: self.dev.clone(),
                reason,
            }),
            None => Ok(()),
        }
    }
}

/// Changes that bring one route set to another; see [`diff_routes`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RouteChanges {
    /// Routes to add or replace (`NLM_F_CREATE | NLM_F_REPLACE`).
    pub upsert: Vec<RouteSpec>,
    /// Routes to delete.
    pub delete: Vec<RouteSpec>,
}

impl RouteChanges {
    /// True when there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.upsert.is_empty() && self.delete.is_empty()
    }

    /// Number of changes.
    pub fn len(&self) -> usize {
        self.upsert.len() + self.delete.len()
    }
}

/// Computes the changes that bring `current` to `desired` (a pure function).
///
/// Routes are identified by `(table, dst)`. Rules:
/// - `desired` is read as a map from `(table, dst)` to route; when it names the same
///   `(table, dst)` twice, the later entry wins.
/// - a desired route that is not in `current` exactly (same dev, MTU) is upserted; the replace
///   changes it in place in the kernel, atomically, so a changed device or MTU needs no delete;
/// - a current route whose `(table, dst)` is not desired is deleted;
/// - should `current` hold several routes for one desired `(table, dst)` (enc never creates that,
///   as it always replaces), those on another device than the desired one are deleted.
///
/// Both lists are free of duplicates and in a deterministic order (that of the inputs).
/// [`apply_routes`] applies upserts before deletes (make before break).
pub fn diff_routes(current: &[RouteSpec], desired: &[RouteSpec]) -> RouteChanges {
    let mut wanted: HashMap<(u32, IpNet), &RouteSpec> = HashMap::new();
    let mut order: Vec<(u32, IpNet)> = Vec::new();
    for spec in desired {
        if wanted.insert(spec.key(), spec).is_none() {
            order.push(spec.key());
        }
    }
    let mut per_key: HashMap<(u32, IpNet), usize> = HashMap::new();
    for spec in current {
        *per_key.entry(spec.key()).or_default() += 1;
    }
    let current_set: HashSet<&RouteSpec> = current.iter().collect();

    let upsert = order
        .iter()
        .filter_map(|key| wanted.get(key).copied())
        .filter(|spec| !current_set.contains(spec))
        .cloned()
        .collect();

    let mut seen: HashSet<&RouteSpec> = HashSet::new();
    let delete = current
        .iter()
        .filter(|spec| match wanted.get(&spec.key()) {
            None => true,
            Some(want) => {
                per_key.get(&spec.key()).copied().unwrap_or(0) > 1 && want.dev != spec.dev
            }
        })
        .filter(|spec| seen.insert(spec))
        .cloned()
        .collect();

    RouteChanges { upsert, delete }
}

/// Applies `changes` through `backend`: all upserts first, then all deletes.
///
/// A failing change does not stop the others: every change is attempted, each failure is logged,
/// and if any failed the result is [`Error::Apply`] holding the first failure (its
/// [`Error::Route`] names the route) and the rest. The caller sees everything that was not
/// applied and can re-run the reconcile; nothing is dropped silently. Deleting an absent route is
/// not a failure.
pub fn apply_routes(backend: &dyn LinkBackend, changes: &RouteChanges) -> Result<()> {
    let mut failures = Vec::new();
    for spec in &changes.upsert {
        match backend.upsert_route(spec) {
            Ok(()) => {
                tracing::debug!(dst = %spec.dst, dev = %spec.dev, table = spec.table, mtu = ?spec.mtu, "route upserted")
            }
            Err(error) => {
                tracing::warn!(dst = %spec.dst, dev = %spec.dev, table = spec.table, error = %error, "route upsert failed");
                failures.push(error);
            }
        }
    }
    for spec in &changes.delete {
        match backend.delete_route(spec) {
            Ok(()) => {
                tracing::debug!(dst = %spec.dst, dev = %spec.dev, table = spec.table, "route deleted")
            }
            Err(error) => {
                tracing::warn!(dst = %spec.dst, dev = %spec.dev, table = spec.table, error = %error, "route delete failed");
                failures.push(error);
            }
        }
    }
    let mut failures = failures.into_iter();
    match failures.next() {
        None => Ok(()),
        Some(first) => {
            let rest: Vec<Error> = failures.collect();
            Err(Error::Apply {
                attempted: changes.len(),
                failed: 1 + rest.len(),
                first: Box::new(first),
                rest,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;
    use crate::FakeLinks;

    fn r(dst: &str, dev: &str, mtu: Option<u32>) -> RouteSpec {
        RouteSpec {
            dst: dst.parse().unwrap(),
            dev: dev.into(),
            mtu,
            table: RT_TABLE_MAIN,
            via: None,
            encap: None,
        }
    }

    #[test]
    fn diff_of_equal_sets_is_empty() {
        let routes = vec![
            r("10.0.1.0/24", "enc0", Some(1400)),
            r("fd00::/64", "enc0", None),
        ];
        assert!(diff_routes(&routes, &routes).is_empty());
        let reversed: Vec<_> = routes.iter().rev().cloned().collect();
        assert!(diff_routes(&routes, &reversed).is_empty());
        assert!(diff_routes(&[], &[]).is_empty());
    }

    #[test]
    fn diff_adds_missing_and_deletes_stale() {
        let current = vec![
            r("10.0.1.0/24", "enc0", None),
            r("10.0.2.0/24", "enc0", None),
        ];
        let desired = vec![
            r("10.0.2.0/24", "enc0", None),
            r("10.0.3.0/24", "enc0", None),
        ];
        let changes = diff_routes(&current, &desired);
        assert_eq!(changes.upsert, vec![r("10.0.3.0/24", "enc0", None)]);
        assert_eq!(changes.delete, vec![r("10.0.1.0/24", "enc0", None)]);
    }

    #[test]
    fn changed_mtu_or_device_is_replaced_not_deleted() {
        let current = vec![
            r("10.0.1.0/24", "enc0", Some(1400)),
            r("10.0.2.0/24", "enc0", None),
        ];
        let desired = vec![
            r("10.0.1.0/24", "enc0", Some(1380)),
            r("10.0.2.0/24", "wg0", None),
        ];
        let changes = diff_routes(&current, &desired);
        assert_eq!(changes.upsert, desired);
        assert!(changes.delete.is_empty(), "{changes:?}");
    }

    #[test]
    fn same_destination_in_another_table_is_another_route() {
        let current = vec![r("10.0.1.0/24", "enc0", None).with_table(100)];
        let desired = vec![r("10.0.1.0/24", "enc0", None)];
        let changes = diff_routes(&current, &desired);
        assert_eq!(changes.upsert, desired);
        assert_eq!(changes.delete, current);
    }

    #[test]
    fn duplicate_desired_keys_last_wins() {
        let desired = vec![
            r("10.0.1.0/24", "enc0", None),
            r("10.0.1.0/24", "wg0", Some(1420)),
        ];
        let changes = diff_routes(&[], &desired);
        assert_eq!(changes.upsert, vec![r("10.0.1.0/24", "wg0", Some(1420))]);
        let exact_duplicates = vec![
            r("10.0.1.0/24", "enc0", None),
            r("10.0.1.0/24", "enc0", None),
        ];
        assert_eq!(diff_routes(&[], &exact_duplicates).upsert.len(), 1);
    }

    #[test]
    fn extra_current_routes_on_other_devices_are_deleted() {
        let current = vec![
            r("10.0.1.0/24", "enc0", None),
            r("10.0.1.0/24", "wg0", None),
        ];
        let desired = vec![r("10.0.1.0/24", "wg0", None)];
        let changes = diff_routes(&current, &desired);
        assert!(changes.upsert.is_empty());
        assert_eq!(changes.delete, vec![r("10.0.1.0/24", "enc0", None)]);
    }

    /// What the kernel (and `FakeLinks`) do with a diff, in `apply_routes`' order.
    fn model_apply(current: &[RouteSpec], changes: &RouteChanges) -> Vec<RouteSpec> {
        let mut state = current.to_vec();
        for spec in &changes.upsert {
            match state.iter_mut().find(|s| s.key() == spec.key()) {
                Some(existing) => *existing = spec.clone(),
                None => state.push(spec.clone()),
            }
        }
        for spec in &changes.delete {
            state.retain(|s| !(s.key() == spec.key() && s.dev == spec.dev));
        }
        state
    }

    fn arb_route() -> impl Strategy<Value = RouteSpec> {
        (
            prop_oneof![
                (0u8..6).prop_map(|i| format!("10.0.{i}.0/24")),
                (0u8..4).prop_map(|i| format!("fd00:{i}::/64")),
                Just("0.0.0.0/0".to_owned()),
            ],
            prop_oneof![Just("enc0"), Just("wg0"), Just("vx0")],
            prop_oneof![Just(None), Just(Some(1400u32)), Just(Some(1420))],
            prop_oneof![Just(RT_TABLE_MAIN), Just(1000u32)],
        )
            .prop_map(|(dst, dev, mtu, table)| RouteSpec {
                dst: dst.parse().unwrap(),
                dev: dev.to_owned(),
                mtu,
                table,
                via: None,
                encap: None,
            })
    }

    /// A route set as the kernel holds enc's routes: one per `(table, dst)`.
    fn arb_kernel_routes() -> impl Strategy<Value = Vec<RouteSpec>> {
        prop::collection::vec(arb_route(), 0..12).prop_map(|routes| {
            let mut seen = HashSet::new();
            routes
                .into_iter()
                .filter(|s| seen.insert(s.key()))
                .collect()
        })
    }

    proptest! {
        #[test]
        fn applying_the_diff_yields_desired(
            current in arb_kernel_routes(),
            desired in prop::collection::vec(arb_route(), 0..12),
        ) {
            let changes = diff_routes(&current, &desired);
            // Later entries win in `desired`.
            let mut expected: HashMap<(u32, IpNet), RouteSpec> = HashMap::new();
            for spec in &desired {
                expected.insert(spec.key(), spec.clone());
            }
            let expected: HashSet<RouteSpec> = expected.into_values().collect();

            let after = model_apply(&current, &changes);
            let after_set: HashSet<RouteSpec> = after.iter().cloned().collect();
            prop_assert_eq!(after.len(), after_set.len(), "duplicates in {:?}", after);
            prop_assert_eq!(&after_set, &expected);

            // No duplicates, nothing both upserted and deleted, nothing needless.
            let upserts: HashSet<_> = changes.upsert.iter().collect();
            let deletes: HashSet<_> = changes.delete.iter().collect();
            prop_assert_eq!(upserts.len(), changes.upsert.len());
            prop_assert_eq!(deletes.len(), changes.delete.len());
            prop_assert!(upserts.is_disjoint(&deletes));
            prop_assert!(changes.upsert.iter().all(|s| !current.contains(s)));
            prop_assert!(changes.delete.iter().all(|s| current.contains(s)));
            prop_assert!(diff_routes(&after, &desired).is_empty());

            // The same through the fake backend.
            let fake = FakeLinks::new();
            for dev in ["enc0", "wg0", "vx0"] {
                fake.add_link(dev, 1500);
            }
            for spec in &current {
                fake.upsert_route(spec).unwrap();
            }
            apply_routes(&fake, &changes).unwrap();
            let in_fake: HashSet<RouteSpec> = fake.routes().into_iter().collect();
            prop_assert_eq!(in_fake, expected);
        }
    }

    #[test]
    fn apply_tries_everything_and_reports_the_failing_route() {
        let fake = FakeLinks::new();
        fake.add_link("enc0", 1500);
        let stale = r("10.0.9.0/24", "enc0", None);
        let stale_failing = r("10.0.8.0/24", "enc0", None);
        fake.upsert_route(&stale).unwrap();
        fake.upsert_route(&stale_failing).unwrap();
        let desired = vec![
            r("10.0.1.0/24", "enc0", None),
            r("10.0.2.0/24", "enc0", Some(1400)),
            r("10.0.3.0/24", "enc0", None),
        ];
        let changes = diff_routes(&fake.dump_routes(RT_TABLE_MAIN).unwrap(), &desired);
        assert_eq!((changes.upsert.len(), changes.delete.len()), (3, 2));

        fake.fail_route(desired[1].dst, libc::EIO);
        fake.fail_route(stale_failing.dst, libc::EBUSY);
        let calls = fake.calls();
        let err = apply_routes(&fake, &changes).unwrap_err();
        assert_eq!(fake.calls() - calls, 5, "every change is attempted");

        match &err {
            Error::Apply {
                attempted,
                failed,
                first,
                rest,
            } => {
                assert_eq!((*attempted, *failed, rest.len()), (5, 2, 1));
                assert!(
                    matches!(first.as_ref(), Error::Route { dst, op: "RTM_NEWROUTE", .. } if *dst == desired[1].dst),
                    "{first:?}"
                );
                assert!(
                    matches!(&rest[0], Error::Route { dst, op: "RTM_DELROUTE", .. } if *dst == stale_failing.dst)
                );
                assert_eq!(first.raw_os_error(), Some(libc::EIO));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("10.0.2.0/24"), "{err}");
        assert_eq!(err.failures().len(), 2);

        // The others went through.
        let now: HashSet<RouteSpec> = fake.routes().into_iter().collect();
        let expected: HashSet<RouteSpec> = [
            desired[0].clone(),
            desired[2].clone(),
            stale_failing.clone(),
        ]
        .into();
        assert_eq!(now, expected);

        // Once the failure clears, re-running the reconcile converges.
        fake.clear_failures();
        let again = diff_routes(&fake.dump_routes(RT_TABLE_MAIN).unwrap(), &desired);
        apply_routes(&fake, &again).unwrap();
        let now: HashSet<RouteSpec> = fake.routes().into_iter().collect();
        assert_eq!(now, desired.iter().cloned().collect());
    }

    #[test]
    fn apply_of_nothing_is_ok() {
        let fake = FakeLinks::new();
        apply_routes(&fake, &RouteChanges::default()).unwrap();
        assert_eq!(fake.calls(), 0);
    }

    #[test]
    fn validate_rejects_what_the_kernel_would_change() {
        assert!(r("10.0.1.0/24", "enc0", None).validate().is_ok());
        for bad in [
            r("10.0.1.7/24", "enc0", None),
            r("10.0.1.0/24", "", None),
            r("10.0.1.0/24", "sixteen-chars-xx", None),
            r("10.0.1.0/24", "enc0", Some(0)),
            r("10.0.1.0/24", "enc0", None).with_table(0),
        ] {
            assert!(
                matches!(bad.validate(), Err(Error::InvalidRoute { .. })),
                "{bad:?}"
            );
        }
    }
}
