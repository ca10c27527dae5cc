//! Overlay links, routes and MTU arithmetic for enc, over rtnetlink.
//!
//! The agent talks to the kernel through the [`LinkBackend`] seam: [`RtnetlinkLinks`] is the real
//! implementation (a synchronous NETLINK_ROUTE socket), [`FakeLinks`] an in-memory one for tests.
//! Reconciliation is split into a pure [`diff_routes`] and [`apply_routes`]. Routes that enc
//! installs carry the protocol number [`RTPROT_ENC`], so that a restarted agent finds exactly the
//! routes it owns with [`LinkBackend::dump_routes`].
//!
//! [`mtu`] holds the MTU arithmetic for the encapsulation layers.

mod error;
mod fake;
pub mod mtu;
mod overlay;
mod route;
mod rtnl;
mod rule;

use serde::Serialize;

pub use error::{Error, Result};
pub use fake::FakeLinks;
pub use overlay::{
    NeighChanges, NeighSpec, OverlayKind, OverlaySnapshot, OverlaySpec, diff_neighs, format_mac,
    overlay_mac,
};
pub use route::{
    RT_TABLE_MAIN, RTPROT_ENC, RouteChanges, RouteSpec, TunnelEncap, apply_routes, diff_routes,
};
pub use rtnl::RtnetlinkLinks;
pub use rule::{RuleChanges, RuleFamily, RuleSpec, apply_rules, diff_rules};

/// What the kernel reports for one link.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkSnapshot {
    /// Interface name.
    pub ifname: String,
    /// Interface index.
    pub index: u32,
    /// Current MTU.
    pub mtu: u32,
    /// Administrative state (`IFF_UP`).
    pub up: bool,
}

/// The seam over rtnetlink used by the agent; all operations are idempotent.
///
/// Route operations act on routes with protocol [`RTPROT_ENC`] only; a route of another protocol
/// with the same destination is replaced by an upsert (the kernel identifies routes by table and
/// destination) but never deleted nor dumped.
pub trait LinkBackend: Send + Sync {
    /// The link named `ifname`, or `None` if there is none.
    fn link(&self, ifname: &str) -> Result<Option<LinkSnapshot>>;
    /// Sets MTU and admin-up state of an existing link ([`Error::Link`] with `ENODEV` if absent).
    fn set_link(&self, ifname: &str, mtu: u32, up: bool) -> Result<()>;
    /// Adds or replaces (`NLM_F_CREATE | NLM_F_REPLACE`) the route.
    fn upsert_route(&self, spec: &RouteSpec) -> Result<()>;
    /// Deletes the route; an absent route (or device) is `Ok`.
    fn delete_route(&self, spec: &RouteSpec) -> Result<()>;
    /// Routes with enc's protocol number in `table` (IPv4 and IPv6).
    fn dump_routes(&self, table: u32) -> Result<Vec<RouteSpec>>;
    /// Every link in the namespace.
    fn links(&self) -> Result<Vec<LinkSnapshot>>;
    /// Adds the rule (with enc's protocol number); an identical existing rule is `Ok`.
    fn add_rule(&self, spec: &RuleSpec) -> Result<()>;
    /// Deletes the rule; an absent rule is `Ok`.
    fn delete_rule(&self, spec: &RuleSpec) -> Result<()>;
    /// Rules with enc's protocol number (IPv4 and IPv6).
    fn dump_rules(&self) -> Result<Vec<RuleSpec>>;
    /// The overlay device named `ifname` as the kernel reports it, or `None` if there is no
    /// link of that name.
    fn overlay(&self, ifname: &str) -> Result<Option<OverlaySnapshot>>;
    /// Creates the overlay device, or brings an existing compatible one to `spec` (MTU, MAC,
    /// up). An existing link of that name of another kind, port or mode is replaced.
    /// A kernel without the device type answers [`Error::is_unsupported`].
    fn upsert_overlay(&self, spec: &OverlaySpec) -> Result<()>;
    /// Deletes the link; an absent link is `Ok`.
    fn delete_link(&self, ifname: &str) -> Result<()>;
    /// Adds or replaces a permanent neighbour entry.
    fn upsert_neigh(&self, spec: &NeighSpec) -> Result<()>;
    /// Deletes a neighbour entry; an absent one (or device) is `Ok`.
    fn delete_neigh(&self, spec: &NeighSpec) -> Result<()>;
    /// The permanent neighbour entries on `ifname` (none if the link does not exist).
    fn dump_neighs(&self, ifname: &str) -> Result<Vec<NeighSpec>>;
}
