//! The raw IP-protocol-50 socket of the userspace ESP device. The TUN interface, waiting on a
//! descriptor and the batched sends and receives ([`enc_sys::mmsg`]) come from [`enc_sys`].

use std::io;
use std::mem;
use std::net::IpAddr;
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
}

fn socklen_of<T>() -> libc::socklen_t {
    // Socket address structs are at most 128 bytes.
    mem::size_of::<T>() as libc::socklen_t
}

/// A raw `IPPROTO_ESP` socket bound to one underlay address.
///
/// The device sends and receives on it with [`enc_sys::mmsg`]. Sending hands the kernel the ESP
/// bytes (SPI onwards) and it adds the outer IP header with protocol 50. Receiving yields, for IPv4, the whole packet including the outer IP header, and
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
}

impl AsFd for RawEsp {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
