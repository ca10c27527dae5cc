//! The kernel calls of the userspace ESP device: a TUN interface, a raw IP-protocol-50 socket, and
//! waiting on either. Nothing else in the device touches a file descriptor directly.

use std::fs::{File, OpenOptions};
use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};
use std::os::unix::fs::OpenOptionsExt as _;
use std::time::Duration;

use crate::error::{Error, Result};

/// `IFNAMSIZ - 1`: the longest interface name Linux accepts.
const MAX_IFNAME_LEN: usize = 15;

/// `struct ifreq` as `TUNSETIFF` reads it: the name, then the flags at the start of the 24-byte
/// union (40 bytes in all).
#[repr(C)]
struct IfReqFlags {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Checks that `ifname` is a name Linux accepts for an interface.
pub(crate) fn validate_ifname(ifname: &str) -> Result<()> {
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
        Some(reason) => Err(Error::Invalid {
            field: "ifname",
            value: ifname.to_owned(),
            reason: reason.to_owned(),
        }),
        None => Ok(()),
    }
}

/// Creates the TUN interface `ifname` (IFF_TUN | IFF_NO_PI, not persistent) in the calling
/// thread's network namespace and returns its non-blocking fd. Closing the fd removes the
/// interface.
pub(crate) fn open_tun(ifname: &str) -> Result<File> {
    validate_ifname(ifname)?;
    let syscall = |call: &'static str, source: io::Error| Error::Syscall {
        call,
        target: ifname.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| syscall("open /dev/net/tun", e))?;
    let mut req = IfReqFlags {
        name: [0; 16],
        // 0x0001 | 0x1000 fits in a c_short.
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..ifname.len()].copy_from_slice(ifname.as_bytes());
    // SAFETY: `file` is an open /dev/net/tun fd. TUNSETIFF reads a `struct ifreq` and writes the
    // name back into it; IfReqFlags has the full 40-byte layout, the name is NUL-terminated
    // (validate_ifname bounds it to 15 bytes), and `req` outlives the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &raw mut req) };
    if rc < 0 {
        return Err(syscall("ioctl(TUNSETIFF)", io::Error::last_os_error()));
    }
    Ok(file)
}

/// A socket address in the C layout, for either family.
#[repr(C)]
union SockAddr {
    v4: libc::sockaddr_in,
    v6: libc::sockaddr_in6,
}

impl SockAddr {
    fn new(ip: IpAddr) -> (Self, libc::socklen_t) {
        match ip {
            IpAddr::V4(a) => {
                // SAFETY: sockaddr_in is plain old data; all-zero is a valid value.
                let mut sin: libc::sockaddr_in = unsafe { mem::zeroed() };
                sin.sin_family = libc::AF_INET as libc::sa_family_t;
                sin.sin_addr.s_addr = u32::from_ne_bytes(a.octets());
                (Self { v4: sin }, socklen_of::<libc::sockaddr_in>())
            }
            IpAddr::V6(a) => {
                // SAFETY: sockaddr_in6 is plain old data; all-zero is a valid value.
                let mut sin6: libc::sockaddr_in6 = unsafe { mem::zeroed() };
                sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sin6.sin6_addr.s6_addr = a.octets();
                (Self { v6: sin6 }, socklen_of::<libc::sockaddr_in6>())
            }
        }
    }

    fn zeroed() -> Self {
        // SAFETY: both members are plain old data; all-zero is a valid value of either.
        unsafe { mem::zeroed() }
    }

    /// The address the kernel filled in, if it is one of ours.
    fn ip(&self) -> Option<IpAddr> {
        // SAFETY: every member starts with the family field, so reading it through `v4` is valid
        // whatever the kernel wrote; the member read afterwards is the one the family names.
        let family = i32::from(unsafe { self.v4.sin_family });
        match family {
            libc::AF_INET => {
                // SAFETY: the family says the kernel wrote a sockaddr_in.
                let s_addr = unsafe { self.v4.sin_addr.s_addr };
                Some(IpAddr::V4(Ipv4Addr::from(s_addr.to_ne_bytes())))
            }
            libc::AF_INET6 => {
                // SAFETY: the family says the kernel wrote a sockaddr_in6.
                let octets = unsafe { self.v6.sin6_addr.s6_addr };
                Some(IpAddr::V6(Ipv6Addr::from(octets)))
            }
            _ => None,
        }
    }
}

fn socklen_of<T>() -> libc::socklen_t {
    // Socket address structs are at most 128 bytes.
    mem::size_of::<T>() as libc::socklen_t
}

/// A raw `IPPROTO_ESP` socket bound to one underlay address.
///
/// Sending hands the kernel the ESP bytes (SPI onwards) and it adds the outer IP header with
/// protocol 50. Receiving yields, for IPv4, the whole packet including the outer IP header, and
/// for IPv6 the ESP bytes only (the outer source comes back as the peer address). Binding makes
/// the kernel deliver only packets addressed to the bound address.
#[derive(Debug)]
pub(crate) struct RawEsp {
    fd: OwnedFd,
}

impl RawEsp {
    /// Opens a non-blocking raw ESP socket of `local`'s family bound to `local`.
    pub(crate) fn bind(local: IpAddr) -> Result<Self> {
        let (family, call) = match local {
            IpAddr::V4(_) => (libc::AF_INET, "socket(AF_INET, SOCK_RAW, IPPROTO_ESP)"),
            IpAddr::V6(_) => (libc::AF_INET6, "socket(AF_INET6, SOCK_RAW, IPPROTO_ESP)"),
        };
        let syscall = |call: &'static str, source: io::Error| Error::Syscall {
            call,
            target: local.to_string(),
            source,
        };
        // SAFETY: plain socket(2) call with constant arguments; the result is checked.
        let raw = unsafe {
            libc::socket(
                family,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::IPPROTO_ESP,
            )
        };
        if raw < 0 {
            return Err(syscall(call, io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a freshly created fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let (addr, len) = SockAddr::new(local);
        // SAFETY: `addr` is a valid sockaddr of `len` bytes on our stack for the whole call.
        let rc = unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) };
        if rc < 0 {
            return Err(syscall("bind", io::Error::last_os_error()));
        }
        Ok(Self { fd })
    }

    /// Sends `esp` to `to` without blocking.
    pub(crate) fn send_to(&self, esp: &[u8], to: IpAddr) -> io::Result<usize> {
        let (addr, len) = SockAddr::new(to);
        // SAFETY: `esp` is a valid buffer of `esp.len()` bytes and `addr` a valid sockaddr of
        // `len` bytes, both borrowed for the whole call.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                esp.as_ptr().cast(),
                esp.len(),
                libc::MSG_DONTWAIT,
                (&raw const addr).cast(),
                len,
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// Receives one packet without blocking; returns its length and the sender's address.
    pub(crate) fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, Option<IpAddr>)> {
        let mut addr = SockAddr::zeroed();
        let mut len = socklen_of::<SockAddr>();
        // SAFETY: `buf` is writable for `buf.len()` bytes and `addr` for `len` bytes; both are
        // borrowed for the whole call, and the kernel writes at most those lengths.
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
                (&raw mut addr).cast(),
                &raw mut len,
            )
        };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        Ok((n, addr.ip()))
    }
}

impl AsFd for RawEsp {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Waits until `fd` is readable (or in error) or `timeout` passes. Returns true if it is.
pub(crate) fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd on our stack, nfds = 1; the fd is borrowed, so open, for the call.
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
        assert!(validate_ifname("esp0").is_ok());
        assert!(validate_ifname("enc-esp-1234567").is_ok()); // 15 bytes
        for bad in ["", "enc-esp-12345678", "a/b", "esp%d", "a b", ".", "esp:0"] {
            assert!(
                matches!(
                    validate_ifname(bad),
                    Err(Error::Invalid {
                        field: "ifname",
                        ..
                    })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn sockaddr_round_trip() {
        for ip in ["192.0.2.7", "2001:db8::7"] {
            let ip: IpAddr = ip.parse().unwrap();
            let (addr, _) = SockAddr::new(ip);
            assert_eq!(addr.ip(), Some(ip));
        }
        assert_eq!(SockAddr::zeroed().ip(), None);
    }
}
