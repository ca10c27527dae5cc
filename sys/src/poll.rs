//! Waiting for a descriptor to become readable.

use std::io;
use std::os::fd::{AsRawFd as _, BorrowedFd};
use std::time::Duration;

/// Waits until `fd` is readable (or in error, or hung up) or `timeout` passes.
///
/// Returns true if the fd is ready. A signal interrupting the wait counts as a timeout
/// (`Ok(false)`), so callers simply loop. Timeouts beyond `c_int::MAX` milliseconds are clamped.
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    wait(fd, libc::POLLIN, timeout)
}

/// Waits until `fd` is writable (or in error, or hung up) or `timeout` passes: for a socket,
/// until its send buffer has room. Same conventions as [`wait_readable`].
pub fn wait_writable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    wait(fd, libc::POLLOUT, timeout)
}

/// One `poll` of `fd` for `events`; true if one of them, an error or a hang-up is reported.
fn wait(fd: BorrowedFd<'_>, events: libc::c_short, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pfd` is one valid pollfd on our stack and we pass nfds = 1; the fd is borrowed,
    // so it stays open for the whole call.
    let rc = unsafe { libc::poll(&raw mut pfd, 1, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(rc > 0 && pfd.revents & (events | libc::POLLERR | libc::POLLHUP) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::os::fd::AsFd as _;
    use std::os::unix::net::UnixStream;

    #[test]
    fn readable_only_once_written() {
        let (mut a, b) = UnixStream::pair().unwrap();
        assert!(!wait_readable(b.as_fd(), Duration::from_millis(10)).unwrap());
        a.write_all(b"x").unwrap();
        assert!(wait_readable(b.as_fd(), Duration::from_secs(5)).unwrap());
    }

    #[test]
    fn a_fresh_socket_is_writable() {
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(wait_writable(a.as_fd(), Duration::from_secs(5)).unwrap());
    }

    #[test]
    fn hangup_counts_as_ready() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        assert!(wait_readable(b.as_fd(), Duration::from_secs(5)).unwrap());
    }
}
