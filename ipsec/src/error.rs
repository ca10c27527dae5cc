//! The crate's error type.

use std::io;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of the IPsec backends.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A system call failed; `call` names it and `target` what it acted on.
    #[error("{call} {target}")]
    Syscall {
        /// The call (`"open /dev/net/tun"`, `"socket(AF_INET, SOCK_RAW, IPPROTO_ESP)"`, ...).
        call: &'static str,
        /// Interface, address or path.
        target: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A value handed to the backend is not acceptable; names the field and the value.
    #[error("invalid {field} {value:?}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// The value.
        value: String,
        /// Why.
        reason: String,
    },
    /// The kernel refused an XFRM request; `op` and `what` identify it.
    #[error("XFRM {op} {what}")]
    Xfrm {
        /// The netlink operation (`"XFRM_MSG_NEWSA"`, ...).
        op: &'static str,
        /// The state or policy (spi, addresses, direction, mark).
        what: String,
        /// The kernel's errno.
        #[source]
        source: io::Error,
    },
    /// The UDP address and port that ESP in UDP needs are taken by another socket (an IKE
    /// daemon, another ESP datapath, a second agent).
    #[error(
        "UDP {at} is already in use: ESP in UDP needs this address and port for itself \
         (is an IKE daemon or another ESP datapath bound to it?)"
    )]
    PortInUse {
        /// The address and port.
        at: std::net::SocketAddr,
        /// The OS error (`EADDRINUSE`).
        #[source]
        source: io::Error,
    },
    /// A netlink reply could not be decoded.
    #[error("netlink {op}: malformed reply: {reason}")]
    Protocol {
        /// The operation.
        op: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// ESP processing failed on the sending side (sequence number space exhausted, buffer).
    #[error("ESP on SA {spi:#010x}: {reason}")]
    Esp {
        /// The SA.
        spi: u32,
        /// What happened.
        reason: &'static str,
    },
}

impl Error {
    /// Maps an error of the shared low-level layer (TUN, netlink transport), adding the
    /// interface, address or socket (`target`) it was about. Kernel refusals of XFRM requests are
    /// mapped by the caller into [`Error::Xfrm`], which names the state or policy.
    pub(crate) fn from_sys(target: &str, error: enc_sys::Error) -> Self {
        match error {
            enc_sys::Error::InvalidIfname { ifname, reason } => Self::Invalid {
                field: "ifname",
                value: ifname,
                reason: reason.to_owned(),
            },
            enc_sys::Error::Syscall { call, source } => Self::Syscall {
                call,
                target: target.to_owned(),
                source,
            },
            enc_sys::Error::Protocol { op, reason } => Self::Protocol { op, reason },
            other => Self::Syscall {
                call: "netlink",
                target: target.to_owned(),
                source: io::Error::other(other),
            },
        }
    }

    /// The OS error behind this error, if any.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Syscall { source, .. }
            | Error::Xfrm { source, .. }
            | Error::PortInUse { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_level_errors_keep_the_target() {
        let err = Error::from_sys("esp0", enc_sys::tun::validate_ifname("esp%d").unwrap_err());
        assert!(
            matches!(err, Error::Invalid { field: "ifname", ref value, .. } if value == "esp%d")
        );
        let err = Error::from_sys(
            "esp0",
            enc_sys::Error::Syscall {
                call: "ioctl(TUNSETIFF)",
                source: io::Error::from_raw_os_error(libc::EBUSY),
            },
        );
        assert_eq!(err.to_string(), "ioctl(TUNSETIFF) esp0");
        assert_eq!(err.raw_os_error(), Some(libc::EBUSY));
    }
}
