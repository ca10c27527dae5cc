//! The crate's error type.

use std::io;
use std::net::SocketAddr;

use crate::PublicKey;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a WireGuard backend.
///
/// Variants carry the identifying context (interface name, peer key, syscall) and the OS error.
/// No variant ever carries key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The interface name is not usable as a Linux interface name.
    #[error("invalid interface name {ifname:?}: {reason}")]
    InvalidIfname {
        /// The rejected name.
        ifname: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A system call on the device failed.
    #[error("{call} failed for interface {ifname}")]
    Syscall {
        /// Interface the call was made for.
        ifname: String,
        /// The system call (or libc function) that failed.
        call: &'static str,
        /// The OS error.
        #[source]
        io_error: io::Error,
    },
    /// Binding the UDP listen socket failed.
    #[error("binding UDP socket {addr} for interface {ifname}")]
    Bind {
        /// Interface the socket is for.
        ifname: String,
        /// The address that could not be bound.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        io_error: io::Error,
    },
    /// Spawning a device thread failed.
    #[error("spawning thread {thread} for interface {ifname}")]
    Thread {
        /// Interface the thread serves.
        ifname: String,
        /// Thread name.
        thread: String,
        /// The OS error.
        #[source]
        io_error: io::Error,
    },
    /// A key could not be decoded. The input is never included (it may be a secret).
    #[error("invalid {kind} key: {reason}")]
    InvalidKey {
        /// Which kind of key ("public", "private", "preshared").
        kind: &'static str,
        /// What was wrong with it.
        reason: &'static str,
    },
    /// The system random number generator failed.
    #[error("system random number generator failed")]
    Random,
    /// A peer spec names a local static key that the device does not hold.
    #[error("peer {peer} on interface {ifname}: local key {key} is not one of the device's keys")]
    UnknownLocalKey {
        /// Interface the peer belongs to.
        ifname: String,
        /// The peer being upserted.
        peer: PublicKey,
        /// The local key it names.
        key: PublicKey,
    },
    /// `retain_private_keys` would have dropped the primary key.
    #[error("interface {ifname}: the primary key {key} cannot be dropped")]
    PrimaryKeyDropped {
        /// The interface.
        ifname: String,
        /// The primary key, missing from the keys to keep.
        key: PublicKey,
    },
    /// `retain_private_keys` would have dropped a key that a peer still uses.
    #[error("interface {ifname}: key {key} is still the local key of peer {peer}")]
    KeyInUse {
        /// The interface.
        ifname: String,
        /// The device key, missing from the keys to keep.
        key: PublicKey,
        /// A peer whose newest generation uses it.
        peer: PublicKey,
    },
    /// No free 24-bit session index was left for a new peer.
    #[error("no free session index for peer {peer} on interface {ifname}")]
    IndexExhausted {
        /// Interface the peer belongs to.
        ifname: String,
        /// The peer being added.
        peer: PublicKey,
    },
    /// A netlink request to the kernel's WireGuard (generic netlink family `wireguard`, or the
    /// `wireguard` link kind) failed.
    #[error("{op} for interface {ifname}: {detail}")]
    Netlink {
        /// The operation (`"RTM_NEWLINK type wireguard"`, `"WG_CMD_SET_DEVICE"`, ...).
        op: &'static str,
        /// Interface it was about.
        ifname: String,
        /// What the kernel said, or why the reply made no sense.
        detail: String,
        /// The kernel's errno, when it refused.
        #[source]
        io_error: Option<io::Error>,
    },
}

impl Error {
    /// Maps an error of the shared low-level layer, adding the interface it was about.
    pub(crate) fn from_sys(ifname: &str, error: enc_sys::Error) -> Self {
        match error {
            enc_sys::Error::InvalidIfname { ifname, reason } => {
                Self::InvalidIfname { ifname, reason }
            }
            enc_sys::Error::Syscall { call, source } => Self::Syscall {
                ifname: ifname.to_owned(),
                call,
                io_error: source,
            },
            other => Self::Syscall {
                ifname: ifname.to_owned(),
                call: "tun",
                io_error: io::Error::other(other),
            },
        }
    }

    /// The OS error behind this error, if there is one.
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            Self::Syscall { io_error, .. }
            | Self::Bind { io_error, .. }
            | Self::Thread { io_error, .. } => Some(io_error),
            Self::Netlink { io_error, .. } => io_error.as_ref(),
            _ => None,
        }
    }

    /// True when the failure was a missing privilege (EPERM / EACCES): the caller is not root
    /// or lacks CAP_NET_ADMIN.
    pub fn is_permission_denied(&self) -> bool {
        self.io_error()
            .is_some_and(|e| e.kind() == io::ErrorKind::PermissionDenied)
    }

    /// True when the interface (or address) is already in use by someone else (EBUSY / EADDRINUSE).
    pub fn is_busy(&self) -> bool {
        self.io_error().is_some_and(|e| {
            e.kind() == io::ErrorKind::AddrInUse || e.raw_os_error() == Some(libc::EBUSY)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_level_errors_keep_the_interface() {
        let err = Error::from_sys("wg0", enc_sys::tun::validate_ifname("a/b").unwrap_err());
        assert!(matches!(err, Error::InvalidIfname { ref ifname, .. } if ifname == "a/b"));
        let err = Error::from_sys(
            "wg0",
            enc_sys::Error::Syscall {
                call: "ioctl(TUNSETIFF)",
                source: io::Error::from_raw_os_error(libc::EPERM),
            },
        );
        assert_eq!(err.to_string(), "ioctl(TUNSETIFF) failed for interface wg0");
        assert!(err.is_permission_denied());
    }
}
