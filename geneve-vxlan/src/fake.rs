//! In-memory [`LinkBackend`] for tests.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::{Mutex, MutexGuard, PoisonError};

use ipnet::IpNet;

use crate::{
    Error, LinkBackend, LinkSnapshot, NeighSpec, OverlaySnapshot, OverlaySpec, Result, RouteSpec,
    RuleSpec,
};

/// In-memory [`LinkBackend`] that behaves like the kernel for the operations enc uses: routes are
/// identified by `(table, dst)`, an upsert replaces, a route needs an existing device (`ENODEV`),
/// deleting an absent route is `Ok`. Failures can be injected per route destination.
#[derive(Debug, Default)]
pub struct FakeLinks {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    links: BTreeMap<String, LinkSnapshot>,
    next_index: u32,
    routes: Vec<RouteSpec>,
    rules: Vec<RuleSpec>,
    overlays: BTreeMap<String, OverlaySpec>,
    neighs: Vec<NeighSpec>,
    unsupported_kinds: Vec<crate::OverlayKind>,
    failures: HashMap<IpNet, i32>,
    calls: usize,
}

impl FakeLinks {
    /// An empty fake: no links, no routes.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic in another test thread must not hide this fake's state.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a link that is down, with the next free index; an existing link of that name is
    /// replaced.
    pub fn add_link(&self, ifname: &str, mtu: u32) {
        let mut state = self.state();
        state.next_index += 1;
        let index = state.next_index;
        state.links.insert(
            ifname.to_owned(),
            LinkSnapshot {
                ifname: ifname.to_owned(),
                index,
                mtu,
                up: false,
            },
        );
    }

    /// Makes creating an overlay device of `kind` fail with `EOPNOTSUPP`, as on a kernel
    /// without its module.
    pub fn refuse_kind(&self, kind: crate::OverlayKind) {
        self.state().unsupported_kinds.push(kind);
    }

    /// Every permanent neighbour entry.
    pub fn neighs(&self) -> Vec<NeighSpec> {
        self.state().neighs.clone()
    }

    /// Removes a link and its routes, as the kernel does.
    pub fn remove_link(&self, ifname: &str) {
        let mut state = self.state();
        state.links.remove(ifname);
        state.overlays.remove(ifname);
        state.neighs.retain(|n| n.ifname != ifname);
        state.routes.retain(|route| route.dev != ifname);
    }

    /// Makes every later upsert or delete of a route to `dst` fail with `errno` (e.g.
    /// `libc::EIO`).
    pub fn fail_route(&self, dst: IpNet, errno: i32) {
        self.state().failures.insert(dst, errno);
    }

    /// Removes all injected failures.
    pub fn clear_failures(&self) {
        self.state().failures.clear();
    }

    /// All routes, in all tables, in insertion order.
    pub fn routes(&self) -> Vec<RouteSpec> {
        self.state().routes.clone()
    }

    /// Number of backend calls so far (all methods of [`LinkBackend`]).
    pub fn calls(&self) -> usize {
        self.state().calls
    }
}

fn route_error(op: &'static str, spec: &RouteSpec, errno: i32) -> Error {
    Error::Route {
        op,
        dst: spec.dst,
        dev: spec.dev.clone(),
        table: spec.table,
        source: io::Error::from_raw_os_error(errno),
    }
}

impl LinkBackend for FakeLinks {
    fn link(&self, ifname: &str) -> Result<Option<LinkSnapshot>> {
        let mut state = self.state();
        state.calls += 1;
        Ok(state.links.get(ifname).cloned())
    }

    fn set_link(&self, ifname: &str, mtu: u32, up: bool) -> Result<()> {
        let mut state = self.state();
        state.calls += 1;
        let link = state.links.get_mut(ifname).ok_or_else(|| Error::Link {
            op: "RTM_NEWLINK",
            ifname: ifname.to_owned(),
            source: io::Error::from_raw_os_error(libc::ENODEV),
        })?;
        link.mtu = mtu;
        link.up = up;
        Ok(())
    }

    fn upsert_route(&self, spec: &RouteSpec) -> Result<()> {
        const OP: &str = "RTM_NEWROUTE";
        spec.validate()?;
        let mut state = self.state();
        state.calls += 1;
        if let Some(&errno) = state.failures.get(&spec.dst) {
            return Err(route_error(OP, spec, errno));
        }
        if !state.links.contains_key(&spec.dev) {
            return Err(route_error(OP, spec, libc::ENODEV));
        }
        match state.routes.iter_mut().find(|r| r.key() == spec.key()) {
            Some(existing) => existing.clone_from(spec),
            None => state.routes.push(spec.clone()),
        }
        Ok(())
    }

    fn delete_route(&self, spec: &RouteSpec) -> Result<()> {
        spec.validate()?;
        let mut state = self.state();
        state.calls += 1;
        if let Some(&errno) = state.failures.get(&spec.dst) {
            return Err(route_error("RTM_DELROUTE", spec, errno));
        }
        // Like the kernel: matched on table, destination and output device, not on the MTU.
        state
            .routes
            .retain(|r| !(r.key() == spec.key() && r.dev == spec.dev));
        Ok(())
    }

    fn dump_routes(&self, table: u32) -> Result<Vec<RouteSpec>> {
        let mut state = self.state();
        state.calls += 1;
        Ok(state
            .routes
            .iter()
            .filter(|r| r.table == table)
            .cloned()
            .collect())
    }

    fn links(&self) -> Result<Vec<LinkSnapshot>> {
        let mut state = self.state();
        state.calls += 1;
        Ok(state.links.values().cloned().collect())
    }

    fn add_rule(&self, spec: &RuleSpec) -> Result<()> {
        spec.validate()?;
        let mut state = self.state();
        state.calls += 1;
        if !state.rules.contains(spec) {
            state.rules.push(spec.clone());
        }
        Ok(())
    }

    fn delete_rule(&self, spec: &RuleSpec) -> Result<()> {
        spec.validate()?;
        let mut state = self.state();
        state.calls += 1;
        state.rules.retain(|r| r != spec);
        Ok(())
    }

    fn dump_rules(&self) -> Result<Vec<RuleSpec>> {
        let mut state = self.state();
        state.calls += 1;
        Ok(state.rules.clone())
    }

    fn overlay(&self, ifname: &str) -> Result<Option<OverlaySnapshot>> {
        let mut state = self.state();
        state.calls += 1;
        let Some(link) = state.links.get(ifname) else {
            return Ok(None);
        };
        let spec = state.overlays.get(ifname);
        Ok(Some(OverlaySnapshot {
            ifname: ifname.to_owned(),
            index: link.index,
            kind: spec.map(|s| s.kind),
            port: spec.map(|s| s.port),
            external: spec.is_some(),
            mtu: link.mtu,
            mac: spec.map_or([0; 6], |s| s.mac),
            up: link.up,
        }))
    }

    fn upsert_overlay(&self, spec: &OverlaySpec) -> Result<()> {
        spec.validate()?;
        let current = self.overlay(&spec.ifname)?;
        if current.as_ref().is_some_and(|c| c.matches(spec)) {
            return Ok(());
        }
        if self.state().unsupported_kinds.contains(&spec.kind) {
            return Err(Error::Link {
                op: "RTM_NEWLINK",
                ifname: spec.ifname.clone(),
                source: io::Error::from_raw_os_error(libc::EOPNOTSUPP),
            });
        }
        if current.is_some_and(|c| !c.compatible_with(spec)) {
            self.remove_link(&spec.ifname);
        }
        if !self.state().links.contains_key(&spec.ifname) {
            self.add_link(&spec.ifname, spec.mtu);
        }
        let mut state = self.state();
        if let Some(link) = state.links.get_mut(&spec.ifname) {
            link.mtu = spec.mtu;
            link.up = true;
        }
        state.overlays.insert(spec.ifname.clone(), spec.clone());
        Ok(())
    }

    fn delete_link(&self, ifname: &str) -> Result<()> {
        self.state().calls += 1;
        self.remove_link(ifname);
        Ok(())
    }

    fn upsert_neigh(&self, spec: &NeighSpec) -> Result<()> {
        let mut state = self.state();
        state.calls += 1;
        if !state.links.contains_key(&spec.ifname) {
            return Err(Error::Neigh {
                op: "RTM_NEWNEIGH",
                ip: spec.ip,
                ifname: spec.ifname.clone(),
                source: io::Error::from_raw_os_error(libc::ENODEV),
            });
        }
        state
            .neighs
            .retain(|n| !(n.ifname == spec.ifname && n.ip == spec.ip));
        state.neighs.push(spec.clone());
        Ok(())
    }

    fn delete_neigh(&self, spec: &NeighSpec) -> Result<()> {
        let mut state = self.state();
        state.calls += 1;
        state
            .neighs
            .retain(|n| !(n.ifname == spec.ifname && n.ip == spec.ip));
        Ok(())
    }

    fn dump_neighs(&self, ifname: &str) -> Result<Vec<NeighSpec>> {
        let mut state = self.state();
        state.calls += 1;
        Ok(state
            .neighs
            .iter()
            .filter(|n| n.ifname == ifname)
            .cloned()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RT_TABLE_MAIN;

    fn route(dst: &str, dev: &str, mtu: Option<u32>) -> RouteSpec {
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
    fn links_are_idempotent() {
        let fake = FakeLinks::new();
        assert_eq!(fake.link("enc0").unwrap(), None);
        fake.add_link("enc0", 1500);
        let before = fake.link("enc0").unwrap().unwrap();
        assert_eq!((before.mtu, before.up), (1500, false));
        for _ in 0..2 {
            fake.set_link("enc0", 1400, true).unwrap();
            let link = fake.link("enc0").unwrap().unwrap();
            assert_eq!((link.index, link.mtu, link.up), (before.index, 1400, true));
        }
        let err = fake.set_link("nope0", 1400, true).unwrap_err();
        assert!(err.is_not_found());
        assert!(err.to_string().contains("nope0"), "{err}");
    }

    #[test]
    fn routes_are_idempotent() {
        let fake = FakeLinks::new();
        fake.add_link("enc0", 1500);
        fake.add_link("wg0", 1420);
        let a = route("10.0.1.0/24", "enc0", Some(1400));
        let b = route("fd00:1::/64", "enc0", None);
        for _ in 0..2 {
            fake.upsert_route(&a).unwrap();
            fake.upsert_route(&b).unwrap();
        }
        assert_eq!(
            fake.dump_routes(RT_TABLE_MAIN).unwrap(),
            vec![a.clone(), b.clone()]
        );
        assert!(fake.dump_routes(100).unwrap().is_empty());

        // An upsert replaces the route with the same (table, dst).
        let a2 = route("10.0.1.0/24", "wg0", None);
        fake.upsert_route(&a2).unwrap();
        assert_eq!(
            fake.dump_routes(RT_TABLE_MAIN).unwrap(),
            vec![a2.clone(), b.clone()]
        );

        for _ in 0..2 {
            fake.delete_route(&a2).unwrap();
            fake.delete_route(&b).unwrap();
        }
        assert!(fake.routes().is_empty());

        let err = fake
            .upsert_route(&route("10.0.2.0/24", "nope0", None))
            .unwrap_err();
        assert!(err.is_not_found());
        assert!(err.to_string().contains("nope0"), "{err}");
        fake.delete_route(&route("10.0.2.0/24", "nope0", None))
            .unwrap();
    }

    #[test]
    fn removing_a_link_removes_its_routes() {
        let fake = FakeLinks::new();
        fake.add_link("enc0", 1500);
        fake.upsert_route(&route("10.0.1.0/24", "enc0", None))
            .unwrap();
        fake.remove_link("enc0");
        assert!(fake.routes().is_empty());
        assert_eq!(fake.link("enc0").unwrap(), None);
    }
}
