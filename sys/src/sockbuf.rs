//! Socket buffer sizing for the userspace datapaths' sockets.
//!
//! The kernel's default receive buffer (`net.core.rmem_default`, 208 KiB) holds only about a
//! hundred full-size packets with their overhead; a datapath thread that is descheduled for a
//! fraction of a second at a few thousand packets per second loses the rest. As root the
//! buffers are forced past `net.core.rmem_max`; otherwise the kernel caps them there.

use crate::{Error, Result};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Buffer size the userspace datapaths ask for, each direction: 4 MiB.
pub const DATAPATH_SOCKET_BUFFER: usize = 4 << 20;

/// Sets the receive and send buffers of `fd` to `bytes` each; returns the receive buffer the
/// kernel granted (it reports twice what it grants, for bookkeeping; this is that value).
pub fn set_buffers(fd: BorrowedFd<'_>, bytes: usize) -> Result<usize> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for (force, plain, call) in [
        (
            libc::SO_RCVBUFFORCE,
            libc::SO_RCVBUF,
            "setsockopt(SO_RCVBUF)",
        ),
        (
            libc::SO_SNDBUFFORCE,
            libc::SO_SNDBUF,
            "setsockopt(SO_SNDBUF)",
        ),
    ] {
        // Without CAP_NET_ADMIN the forced variant fails with EPERM; the plain one is capped.
        if setsockopt_int(fd, force, value).is_err() {
            setsockopt_int(fd, plain, value).map_err(|source| Error::Syscall { call, source })?;
        }
    }
    let mut granted: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `granted` and `len` are valid for writes of their sizes for the whole call.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw mut granted).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(Error::Syscall {
            call: "getsockopt(SO_RCVBUF)",
            source: io::Error::last_os_error(),
        });
    }
    Ok(usize::try_from(granted).unwrap_or(0))
}

fn setsockopt_int(fd: BorrowedFd<'_>, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: `value` is a valid c_int borrowed for the whole call; the length matches.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn buffers_grow_past_the_default() {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let granted = set_buffers(sock.as_fd(), DATAPATH_SOCKET_BUFFER).unwrap();
        // Unprivileged, the kernel caps at rmem_max (208 KiB by default, reported doubled);
        // as root it grants what was asked (reported doubled).
        assert!(granted >= 200 * 1024, "granted {granted}");
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(granted, 2 * DATAPATH_SOCKET_BUFFER);
        }
    }
}
