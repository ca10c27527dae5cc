//! UDP segmentation offload for the userspace datapaths: one `sendmsg` with `UDP_SEGMENT`
//! sends a buffer of equal-sized datagrams (the last may be shorter), and with `UDP_GRO` one
//! `recvmsg` returns several datagrams of one sender back to back with their size.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd as _, BorrowedFd};

/// Most datagrams the kernel accepts in one `UDP_SEGMENT` send (`UDP_MAX_SEGMENTS`).
pub const MAX_SEGMENTS: usize = 64;

/// Control-message space for one `u16` (`CMSG_SPACE(2)`), generously aligned.
const CMSG_BUF: usize = 32;

#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_BUF]);

/// `UDP_ENCAP_ESPINUDP` of `linux/udp.h` (not in libc): ESP in UDP as RFC 3948 defines it,
/// with the non-ESP marker for IKE.
pub const UDP_ENCAP_ESPINUDP: libc::c_int = 2;

/// `setsockopt(SOL_UDP, option, value)` with an `int` value.
fn set_udp_int(fd: BorrowedFd<'_>, option: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: `value` is a valid c_int for the whole call and the length matches.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_UDP,
            option,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Asks the kernel to coalesce received datagrams (`UDP_GRO`); see [`recv_segments`].
pub fn enable_gro(fd: BorrowedFd<'_>) -> io::Result<()> {
    set_udp_int(fd, libc::UDP_GRO, 1)
}

/// Makes a bound UDP socket an ESP-in-UDP socket for the kernel's XFRM
/// (`setsockopt(SOL_UDP, UDP_ENCAP, UDP_ENCAP_ESPINUDP)`): from then on the kernel takes every
/// ESP datagram that arrives on it (a non-zero SPI where the non-ESP marker would be), strips
/// the UDP header and hands the ESP packet to its SAs; the socket itself receives only IKE
/// (the non-ESP marker). NAT-keepalives are dropped. Works for IPv4 and (Linux 5.8 and
/// later) IPv6 sockets.
pub fn enable_esp_in_udp(fd: BorrowedFd<'_>) -> io::Result<()> {
    set_udp_int(fd, libc::UDP_ENCAP, UDP_ENCAP_ESPINUDP)
}

/// `to` in the C layout, with its length.
pub(crate) fn to_sockaddr(to: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all zeroes is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match to {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { (&raw mut ss).cast::<libc::sockaddr_in>().write(sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { (&raw mut ss).cast::<libc::sockaddr_in6>().write(sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// The IPv4 or IPv6 address the kernel wrote into `ss`, if it is one.
pub(crate) fn from_sockaddr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a = unsafe { &*(&raw const *ss).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(a.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a = unsafe { &*(&raw const *ss).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Sends `buf` to `to` as datagrams of `segment` bytes each (the last one may be shorter) in one
/// `sendmsg` with a `UDP_SEGMENT` control message. `buf` must hold at most [`MAX_SEGMENTS`]
/// segments; a `segment` of at least `buf.len()` sends one plain datagram.
pub fn send_segments(
    fd: BorrowedFd<'_>,
    buf: &[u8],
    segment: u16,
    to: SocketAddr,
) -> io::Result<usize> {
    let (mut ss, ss_len) = to_sockaddr(to);
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr().cast_mut().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = CmsgBuf([0; CMSG_BUF]);
    // SAFETY: msghdr is plain data; all zeroes is a valid value.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = (&raw mut ss).cast();
    msg.msg_namelen = ss_len;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    if usize::from(segment) < buf.len() {
        // SAFETY: CMSG_SPACE is a pure computation.
        let space = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
        msg.msg_control = cbuf.0.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: msg_control points at `cbuf`, which is at least `space` bytes and 8-aligned,
        // so CMSG_FIRSTHDR is non-null and the header and its 2 data bytes lie inside it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&raw const msg);
            (*c).cmsg_level = libc::SOL_UDP;
            (*c).cmsg_type = libc::UDP_SEGMENT;
            (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
            libc::CMSG_DATA(c).cast::<u16>().write_unaligned(segment);
        }
    }
    // SAFETY: every pointer in `msg` (name, iovec over `buf`, control) stays valid for the call;
    // the kernel only reads through them.
    let n = unsafe { libc::sendmsg(fd.as_raw_fd(), &raw const msg, 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One `recvmsg` on a non-blocking socket with [`enable_gro`]: returns the bytes received, the
/// sender, and the size of each datagram in them (`UDP_GRO` control message; the bytes are
/// one datagram when there is none). The last datagram may be shorter.
pub fn recv_segments(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<(usize, Option<SocketAddr>, usize)> {
    // SAFETY: sockaddr_storage and msghdr are plain data; all zeroes is valid for both.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = CmsgBuf([0; CMSG_BUF]);
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = (&raw mut ss).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast();
    msg.msg_controllen = CMSG_BUF;
    // SAFETY: `msg` points at `ss`, `buf` (through `iov`) and `cbuf`, all valid for writes of
    // the lengths given, for the whole call.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &raw mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    let mut segment = n;
    // SAFETY: the kernel filled `msg_controllen` bytes of `cbuf`; CMSG_FIRSTHDR/NXTHDR stay
    // within them and CMSG_DATA of a UDP_GRO message holds an int.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                let s = libc::CMSG_DATA(c).cast::<libc::c_int>().read_unaligned();
                if s > 0 {
                    segment = s as usize;
                }
            }
            c = libc::CMSG_NXTHDR(&raw const msg, c);
        }
    }
    Ok((n, from_sockaddr(&ss), segment.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsFd as _;
    use std::time::Duration;

    #[test]
    fn segments_go_out_as_datagrams_and_come_back_coalesced() {
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let data: Vec<u8> = (0..1000u32 * 5 + 300).map(|i| i as u8).collect();
        let n = send_segments(tx.as_fd(), &data, 1000, to).unwrap();
        assert_eq!(n, data.len());
        // Without UDP_GRO the receiver sees six datagrams, the last one 300 bytes.
        let mut buf = vec![0u8; 65535];
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut sizes = Vec::new();
        for _ in 0..6 {
            sizes.push(rx.recv(&mut buf).unwrap());
        }
        assert_eq!(sizes, [1000, 1000, 1000, 1000, 1000, 300]);

        enable_gro(rx.as_fd()).unwrap();
        send_segments(tx.as_fd(), &data, 1000, to).unwrap();
        crate::poll::wait_readable(rx.as_fd(), Duration::from_secs(5)).unwrap();
        let mut got = Vec::new();
        while got.len() < data.len() {
            match recv_segments(rx.as_fd(), &mut buf) {
                Ok((n, from, seg)) => {
                    assert_eq!(from, Some(tx.local_addr().unwrap()));
                    assert!(seg == 1000 || n <= 1000, "segment {seg} of {n}");
                    got.extend_from_slice(&buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    crate::poll::wait_readable(rx.as_fd(), Duration::from_secs(5)).unwrap();
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, data);
    }

    #[test]
    fn esp_in_udp_socket_passes_ike_and_keeps_esp_for_xfrm() {
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        enable_esp_in_udp(rx.as_fd()).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let to = rx.local_addr().unwrap();
        // A NAT-keepalive (dropped), IKE (the non-ESP marker: passed to the socket), ESP (a
        // non-zero SPI: taken by XFRM, which has no SA for it), IKE again.
        tx.send_to(&[0xFF], to).unwrap();
        tx.send_to(b"\0\0\0\0ike-1", to).unwrap();
        tx.send_to(&[0x0E, 0x0C, 0, 1, 0, 0, 0, 1, 9, 9, 9, 9, 9, 9, 9, 9], to)
            .unwrap();
        tx.send_to(b"\0\0\0\0ike-2", to).unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"\0\0\0\0ike-1");
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(
            &buf[..n],
            b"\0\0\0\0ike-2",
            "the ESP datagram reached the socket"
        );
    }
}
