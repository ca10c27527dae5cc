//! The raw IP-protocol-50 socket of the userspace ESP device. The TUN interface and waiting on
//! either descriptor come from [`enc_sys`]; nothing else in the device touches a file descriptor
//! directly.

use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};

use crate::error::{Error, Result};

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
        enc_sys::sockbuf::set_buffers(fd.as_fd(), enc_sys::sockbuf::DATAPATH_SOCKET_BUFFER)
            .map_err(|e| crate::Error::from_sys(&local.to_string(), e))?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
