//! The only kernel calls this crate makes directly: creating a TUN interface and waiting on its fd.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::time::Duration;

use crate::error::{Error, Result};

/// `IFNAMSIZ - 1`: the longest interface name Linux accepts.
pub(crate) const MAX_IFNAME_LEN: usize = 15;

/// `struct ifreq` as `TUNSETIFF` reads it: the name, then the flags in the union (40 bytes total).
#[repr(C)]
struct IfReqFlags {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Checks that `ifname` is a plain Linux interface name.
pub(crate) fn validate_ifname(ifname: &str) -> Result<()> {
    let reason = if ifname.is_empty() {
        Some("empty")
    } else if ifname.len() > MAX_IFNAME_LEN {
        Some("longer than 15 bytes")
    } else if ifname == "." || ifname == ".." {
        Some("reserved name")
    } else if ifname
        .bytes()
        .any(|b| b == b'/' || b == b'%' || b == b':' || b <= b' ' || b == 0x7f)
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

/// Creates the TUN interface `ifname` (IFF_TUN | IFF_NO_PI, non-persistent) in the calling
/// thread's network namespace and returns its non-blocking fd. Closing the fd removes the interface.
pub(crate) fn open_tun(ifname: &str) -> Result<File> {
    validate_ifname(ifname)?;
    let syscall = |call: &'static str, io_error: io::Error| Error::Syscall {
        ifname: ifname.to_owned(),
        call,
        io_error,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| syscall("open(/dev/net/tun)", e))?;

    let mut req = IfReqFlags {
        name: [0; 16],
        // IFF_TUN | IFF_NO_PI both fit in a c_short (0x0001 | 0x1000).
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..ifname.len()].copy_from_slice(ifname.as_bytes());
    // SAFETY: `file` is an open /dev/net/tun fd; TUNSETIFF reads (and writes back the name into)
    // a `struct ifreq`, whose layout IfReqFlags reproduces in full (16-byte NUL-terminated name,
    // since validate_ifname bounds it to 15 bytes, then a short in a 24-byte union). `req` lives
    // on our stack for the whole call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &raw mut req) };
    if rc < 0 {
        return Err(syscall("ioctl(TUNSETIFF)", io::Error::last_os_error()));
    }
    Ok(file)
}

/// Waits until `file` is readable or `timeout` passes. Returns true if readable.
pub(crate) fn wait_readable(file: &File, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pfd` is one valid pollfd on our stack and we pass nfds = 1; the fd stays open for
    // the call because `file` is borrowed.
    let rc = unsafe { libc::poll(&raw mut pfd, 1, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(rc > 0 && pfd.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifname_validation() {
        assert!(validate_ifname("wg0").is_ok());
        assert!(validate_ifname("enc-wg-123456789").is_err()); // 16 bytes
        assert!(validate_ifname("enc-wg-12345678").is_ok()); // 15 bytes
        for bad in ["", "a/b", "wg%d", "a b", ".", "wg:0"] {
            assert!(
                matches!(validate_ifname(bad), Err(Error::InvalidIfname { .. })),
                "{bad:?}"
            );
        }
    }
}
