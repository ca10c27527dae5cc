//! The crate's error type.

use std::io;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of the low-level helpers.
///
/// Variants carry what this layer knows (the call, the netlink operation, the OS error); the
/// backend that made the call maps them into its own error and adds its context.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An interface name is not one Linux accepts.
    #[error("invalid interface name {ifname:?}: {reason}")]
    InvalidIfname {
        /// The rejected name.
        ifname: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A system call failed (opening `/dev/net/tun`, `TUNSETIFF`, or a netlink socket call).
    #[error("{call} failed")]
    Syscall {
        /// The call (`"open(/dev/net/tun)"`, `"ioctl(TUNSETIFF)"`, `"socket"`, `"send"`, ...).
        call: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The kernel refused a netlink request with an errno.
    #[error("netlink {op} refused by the kernel")]
    Kernel {
        /// The netlink operation (`"RTM_NEWROUTE"`, `"XFRM_MSG_NEWSA"`, ...).
        op: &'static str,
        /// The kernel's errno.
        #[source]
        source: io::Error,
    },
    /// A netlink dump was interrupted by concurrent changes (`NLM_F_DUMP_INTR`) on every
    /// attempt.
    #[error("netlink {op} dump interrupted {attempts} times by concurrent changes")]
    DumpInterrupted {
        /// The netlink operation.
        op: &'static str,
        /// How many attempts were made.
        attempts: usize,
    },
    /// The kernel sent something that could not be decoded, or not what the request called for.
    #[error("netlink {op}: malformed reply: {reason}")]
    Protocol {
        /// The netlink operation.
        op: &'static str,
        /// What was wrong.
        reason: String,
    },
}

impl Error {
    /// The errno the kernel answered a netlink request with ([`Error::Kernel`] only).
    pub fn kernel_errno(&self) -> Option<i32> {
        match self {
            Self::Kernel { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// The OS error behind this error, if any. An interrupted dump counts as `EINTR`.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Self::Syscall { source, .. } | Self::Kernel { source, .. } => source.raw_os_error(),
            Self::DumpInterrupted { .. } => Some(libc::EINTR),
            _ => None,
        }
    }
}
