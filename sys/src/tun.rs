//! TUN devices: interface-name validation and opening a layer-3 TUN interface, plain or with
//! the virtio-net header and TSO offloads.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::OpenOptionsExt as _;

use crate::{Error, Result};

/// `IFNAMSIZ - 1`: the longest interface name Linux accepts.
pub const MAX_IFNAME_LEN: usize = 15;

/// `struct ifreq` as `TUNSETIFF` reads it: the name, then the flags at the start of the 24-byte
/// union (40 bytes in all).
#[repr(C)]
struct IfReqFlags {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Checks that `ifname` is a plain Linux interface name: 1 to 15 bytes, not `.` or `..`, and
/// without `/`, `%` (a kernel name template), `:`, whitespace or control characters.
pub fn validate_ifname(ifname: &str) -> Result<()> {
    let reason = if ifname.is_empty() {
        Some("empty")
    } else if ifname.len() > MAX_IFNAME_LEN {
        Some("longer than 15 bytes")
    } else if ifname == "." || ifname == ".." {
        Some("reserved name")
    } else if ifname
        .bytes()
        .any(|b| matches!(b, b'/' | b'%' | b':') || b <= b' ' || b == 0x7f)
    {
        Some("contains '/', '%', ':', whitespace or a control character")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidIfname {
            ifname: ifname.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Creates the TUN interface `ifname` (`IFF_TUN | IFF_NO_PI`, not persistent) in the calling
/// thread's network namespace and returns its non-blocking, close-on-exec fd. Closing the fd
/// removes the interface.
///
/// The name is validated first ([`Error::InvalidIfname`]); a failed call is an
/// [`Error::Syscall`] naming it.
pub fn open(ifname: &str) -> Result<File> {
    open_flags(ifname, 0)
}

/// Like [`open`], with `IFF_VNET_HDR` and the offloads `TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6`:
/// every read and write then starts with a `virtio_net_hdr` ([`crate::offload`]), reads may be
/// TCP super-packets of up to 64 KiB with a partial checksum, and writes may be too.
pub fn open_with_offloads(ifname: &str) -> Result<File> {
    let file = open_flags(ifname, libc::IFF_VNET_HDR)?;
    let offloads = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
    // SAFETY: `file` is a TUN fd set up by TUNSETIFF; TUNSETOFFLOAD takes its argument by value
    // (an unsigned long of TUN_F_* bits) and touches no memory of ours.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(offloads),
        )
    };
    if rc < 0 {
        return Err(Error::Syscall {
            call: "ioctl(TUNSETOFFLOAD)",
            source: io::Error::last_os_error(),
        });
    }
    Ok(file)
}

fn open_flags(ifname: &str, extra: libc::c_int) -> Result<File> {
    validate_ifname(ifname)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|source| Error::Syscall {
            call: "open(/dev/net/tun)",
            source,
        })?;
    let mut req = IfReqFlags {
        name: [0; 16],
        // IFF_TUN | IFF_NO_PI | IFF_VNET_HDR (0x0001 | 0x1000 | 0x4000) fits in a c_short.
        flags: (libc::IFF_TUN | libc::IFF_NO_PI | extra) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..ifname.len()].copy_from_slice(ifname.as_bytes());
    // SAFETY: `file` is an open /dev/net/tun fd. TUNSETIFF reads a `struct ifreq` and writes the
    // name back into it; IfReqFlags has the full 40-byte layout, the name is NUL-terminated
    // (validate_ifname bounds it to 15 bytes), and `req` lives on our stack for the whole call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &raw mut req) };
    if rc < 0 {
        return Err(Error::Syscall {
            call: "ioctl(TUNSETIFF)",
            source: io::Error::last_os_error(),
        });
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<IfReqFlags>(), 40);
    }

    #[test]
    fn ifname_validation() {
        for ok in ["wg0", "esp0", "eth0.100", "veth1234abcd", "enc-wg-12345678"] {
            assert!(validate_ifname(ok).is_ok(), "{ok:?}");
        }
        for bad in [
            "",
            "enc-wg-123456789", // 16 bytes
            "a/b",
            "wg%d",
            "a b",
            "a\tb",
            "a\u{7f}",
            ".",
            "..",
            "wg:0",
        ] {
            assert!(
                matches!(validate_ifname(bad), Err(Error::InvalidIfname { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn open_validates_before_any_syscall() {
        let err = open("no/slash").unwrap_err();
        assert!(matches!(err, Error::InvalidIfname { .. }), "{err}");
        assert!(err.to_string().contains("no/slash"), "{err}");
    }
}
