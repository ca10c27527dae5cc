//! The crate's error type.

use std::io;

use ipnet::IpNet;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of link, route and MTU operations.
///
/// Kernel failures carry the operation, the object it was applied to and the kernel's errno as an
/// [`io::Error`]; use [`Error::is_not_found`] and [`Error::is_exists`] rather than matching on
/// messages.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Opening, sending on or receiving from the NETLINK_ROUTE socket failed.
    #[error("netlink socket: {op}")]
    Socket {
        /// What was being done (`"open"`, `"send"`, `"recv"`, ...).
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The kernel sent something we could not decode, or not what the request called for.
    #[error("netlink {op}: malformed reply: {reason}")]
    Protocol {
        /// The netlink operation (`"RTM_GETLINK"`, ...).
        op: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// A link operation failed.
    #[error("{op} link {ifname}")]
    Link {
        /// The netlink operation (`"RTM_GETLINK"`, `"RTM_NEWLINK"`).
        op: &'static str,
        /// The interface name.
        ifname: String,
        /// The kernel's errno (for example `ENODEV` when the link does not exist).
        #[source]
        source: io::Error,
    },
    /// A route operation failed.
    #[error("{op} route {dst} dev {dev} table {table}")]
    Route {
        /// The netlink operation (`"RTM_NEWROUTE"`, `"RTM_DELROUTE"`, `"RTM_GETROUTE"`).
        op: &'static str,
        /// The route's destination.
        dst: IpNet,
        /// The route's device (`ENODEV` in `source` when it does not exist).
        dev: String,
        /// The routing table.
        table: u32,
        /// The kernel's errno.
        #[source]
        source: io::Error,
    },
    /// A route dump of a table failed.
    #[error("{op} dump of table {table}")]
    Dump {
        /// The netlink operation (`"RTM_GETROUTE"`).
        op: &'static str,
        /// The routing table.
        table: u32,
        /// The kernel's errno.
        #[source]
        source: io::Error,
    },
    /// A [`RouteSpec`](crate::RouteSpec) is not acceptable (checked before talking to the kernel).
    #[error("invalid route {dst} dev {dev}: {reason}")]
    InvalidRoute {
        /// The route's destination.
        dst: IpNet,
        /// The route's device.
        dev: String,
        /// Why it is rejected.
        reason: &'static str,
    },
    /// An [`OverlaySpec`](crate::OverlaySpec) is not acceptable (checked before talking to the
    /// kernel).
    #[error("invalid overlay device {ifname}: {reason}")]
    InvalidOverlay {
        /// The device name.
        ifname: String,
        /// Why it is rejected.
        reason: &'static str,
    },
    /// A neighbour operation failed.
    #[error("{op} neighbour {ip} dev {ifname}")]
    Neigh {
        /// The netlink operation (`"RTM_NEWNEIGH"`, `"RTM_DELNEIGH"`, `"RTM_GETNEIGH"`).
        op: &'static str,
        /// The neighbour's address (unspecified for a dump).
        ip: std::net::IpAddr,
        /// The device.
        ifname: String,
        /// The kernel's errno.
        #[source]
        source: io::Error,
    },
    /// A [`RuleSpec`](crate::RuleSpec) is not acceptable (checked before talking to the kernel).
    #[error("invalid rule priority {priority} table {table}: {reason}")]
    InvalidRule {
        /// The rule's priority.
        priority: u32,
        /// The rule's table.
        table: u32,
        /// Why it is rejected.
        reason: &'static str,
    },
    /// A rule operation failed.
    #[error("{op} rule priority {priority} fwmark {fwmark:#x}/{fwmask:#x} table {table}")]
    Rule {
        /// The netlink operation (`"RTM_NEWRULE"`, `"RTM_DELRULE"`, `"RTM_GETRULE"`).
        op: &'static str,
        /// The rule's priority.
        priority: u32,
        /// The mark.
        fwmark: u32,
        /// The mark mask.
        fwmask: u32,
        /// The table.
        table: u32,
        /// The kernel's errno.
        #[source]
        source: io::Error,
    },
    /// An MTU computation produced a value below the minimum the inner traffic needs.
    #[error(
        "underlay MTU {underlay_mtu} leaves {mtu} bytes, below the {minimum_name} of {minimum}"
    )]
    MtuTooSmall {
        /// The underlay MTU given.
        underlay_mtu: u32,
        /// The resulting MTU (0 if the overhead exceeds the underlay MTU).
        mtu: u32,
        /// The minimum that was violated.
        minimum: u32,
        /// Name of that minimum, e.g. `"IPv6 minimum link MTU (RFC 8200)"`.
        minimum_name: &'static str,
    },
    /// [`apply_routes`](crate::apply_routes) could not apply every change. All changes were
    /// attempted; `first` is the first failure and `rest` the others, in order.
    #[error("{failed} of {attempted} route changes failed; first failure: {first}")]
    Apply {
        /// How many changes were attempted (all of them).
        attempted: usize,
        /// How many failed (`1 + rest.len()`).
        failed: usize,
        /// The first failure.
        #[source]
        first: Box<Error>,
        /// The further failures, in the order they happened.
        rest: Vec<Error>,
    },
}

impl Error {
    /// The kernel errno behind this error, if it is a kernel or socket failure.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Self::Socket { source, .. }
            | Self::Link { source, .. }
            | Self::Route { source, .. }
            | Self::Rule { source, .. }
            | Self::Neigh { source, .. }
            | Self::Dump { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// True when the object (link, device of a route, route, table) does not exist:
    /// `ENODEV`, `ENOENT` or `ESRCH`.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self.raw_os_error(),
            Some(libc::ENODEV | libc::ENOENT | libc::ESRCH)
        )
    }

    /// True when the kernel does not know the link kind asked for (`EOPNOTSUPP`): for
    /// example a Geneve device on a kernel without the geneve module.
    pub fn is_unsupported(&self) -> bool {
        self.raw_os_error() == Some(libc::EOPNOTSUPP)
    }

    /// True when the object already exists (`EEXIST`).
    pub fn is_exists(&self) -> bool {
        self.raw_os_error() == Some(libc::EEXIST)
    }

    /// All individual failures: the errors inside [`Error::Apply`], or `self` otherwise.
    pub fn failures(&self) -> Vec<&Error> {
        match self {
            Self::Apply { first, rest, .. } => {
                std::iter::once(first.as_ref()).chain(rest.iter()).collect()
            }
            other => vec![other],
        }
    }
}
