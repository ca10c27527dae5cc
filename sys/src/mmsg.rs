//! Batched datagram I/O for the userspace datapaths: `sendmmsg(2)` and `recvmmsg(2)` over
//! buffers that the batch owns and reuses for every call, so that a datapath thread makes one
//! system call per batch of packets and allocates nothing per packet.
//!
//! Both work on raw IP sockets and on UDP sockets:
//!
//! - On a raw socket every message is one IP payload. The destination's port is ignored by raw
//!   IPv4 sockets and read as the protocol by raw IPv6 sockets, where 0 means the socket's own;
//!   pass port 0.
//! - On a UDP socket a [`SendBatch`] made with `gso` set joins consecutive datagrams of equal
//!   size to one destination into one message with a `UDP_SEGMENT` control message (UDP GSO:
//!   the kernel cuts it into datagrams; the last may be shorter), and a [`RecvBatch`] reports the
//!   `UDP_GRO` size of each message it receives (see [`crate::udp::enable_gro`]).

use std::io;
use std::mem::{size_of, zeroed};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd as _, BorrowedFd};
use std::time::{Duration, Instant};

use crate::udp::{MAX_SEGMENTS, from_sockaddr, to_sockaddr};

/// Most UDP payload bytes one GSO message carries: 64 KiB minus room for the IP and UDP headers.
pub const MAX_GSO_BYTES: usize = 65000;

/// Longest a [`SendBatch::flush`] waits, in all, for room in a full socket send buffer before it
/// drops the rest of the batch.
const SEND_WAIT: Duration = Duration::from_millis(100);

/// Control-message space for one `int` or `u16` (`CMSG_SPACE(4)` is 24 on 64-bit Linux).
const CMSG_BUF: usize = 32;

/// A control-message buffer aligned for `cmsghdr`.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_BUF]);

/// One queued message: bytes `start..end` of the batch's data, to `to`; with GSO, datagrams
/// of `segment` bytes (the last may be shorter), `count` of them.
#[derive(Clone, Copy, Debug)]
struct Pending {
    start: usize,
    end: usize,
    to: SocketAddr,
    segment: usize,
    count: usize,
}

/// What one [`SendBatch::flush`] did, in datagrams.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flushed {
    /// Datagrams the kernel accepted.
    pub sent: usize,
    /// Datagrams dropped because their message failed (full send buffer after waiting, no
    /// route, message too long, ...).
    pub failed: usize,
    /// The kernel refused UDP GSO (`EIO`: the egress device cannot checksum for us, or an
    /// IPsec policy covers the flow), so the batch stopped joining datagrams: from now on it
    /// sends one datagram per message. Set by the flush that found out.
    pub gso_disabled: bool,
}

/// Datagrams waiting to go out with one `sendmmsg`.
///
/// The caller appends each datagram's bytes straight into the batch ([`SendBatch::push`]), so a
/// datagram is built once, in place, and never copied again before the kernel reads it. The data
/// buffer is allocated once with its full capacity; [`SendBatch::has_room`] tells the caller when
/// to [`flush`](SendBatch::flush) so that it never grows.
pub struct SendBatch {
    data: Vec<u8>,
    msgs: Vec<Pending>,
    max_msgs: usize,
    gso: bool,
    // Scratch space for the system call, rebuilt from `msgs` on every flush (it points into
    // `data`, which may have moved since the last one).
    names: Vec<(libc::sockaddr_storage, libc::socklen_t)>,
    iovs: Vec<libc::iovec>,
    cmsgs: Vec<CmsgBuf>,
    hdrs: Vec<libc::mmsghdr>,
}

impl std::fmt::Debug for SendBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendBatch")
            .field("bytes", &self.data.len())
            .field("messages", &self.msgs.len())
            .field("max_msgs", &self.max_msgs)
            .field("gso", &self.gso)
            .finish_non_exhaustive()
    }
}

impl SendBatch {
    /// A batch of at most `max_msgs` messages (at least 1; at most 1024, the kernel's
    /// `UIO_MAXIOV`) and `bytes` bytes of data. With `gso`, equal-sized datagrams to one
    /// destination share a message (UDP sockets only).
    pub fn new(max_msgs: usize, bytes: usize, gso: bool) -> Self {
        let max_msgs = max_msgs.clamp(1, 1024);
        Self {
            data: Vec::with_capacity(bytes),
            msgs: Vec::with_capacity(max_msgs),
            max_msgs,
            gso,
            names: Vec::with_capacity(max_msgs),
            iovs: Vec::with_capacity(max_msgs),
            cmsgs: Vec::with_capacity(if gso { max_msgs } else { 0 }),
            hdrs: Vec::with_capacity(max_msgs),
        }
    }

    /// Whether a datagram of up to `len` bytes fits without growing the data buffer or
    /// exceeding the message count. When it does not, flush first.
    pub fn has_room(&self, len: usize) -> bool {
        self.msgs.len() < self.max_msgs && self.data.capacity() - self.data.len() >= len
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    /// Whether equal-sized datagrams still join one UDP GSO message (see
    /// [`Flushed::gso_disabled`]).
    pub fn gso(&self) -> bool {
        self.gso
    }

    /// Messages queued (with GSO one message may hold many datagrams).
    pub fn messages(&self) -> usize {
        self.msgs.len()
    }

    /// Datagrams queued.
    pub fn datagrams(&self) -> usize {
        self.msgs.iter().map(|m| m.count).sum()
    }

    /// Queues one datagram: `fill` appends its bytes to the buffer it is given (and must leave
    /// what is already there alone) and returns the destination, or `None` to queue nothing
    /// (whatever it appended is then discarded). Returns whether a datagram was queued.
    ///
    /// With GSO the datagram joins the previous message when it goes to the same destination,
    /// is no longer than that message's segment size, the message has not yet ended with a
    /// shorter datagram, and the message stays within [`MAX_SEGMENTS`] datagrams and
    /// [`MAX_GSO_BYTES`]. An empty datagram is never queued.
    pub fn push(&mut self, fill: impl FnOnce(&mut Vec<u8>) -> Option<SocketAddr>) -> bool {
        let start = self.data.len();
        let to = fill(&mut self.data);
        // `fill` may only append: anything before `start` stays as it was.
        let end = self.data.len();
        let Some(to) = to.filter(|_| end > start) else {
            self.data.truncate(start);
            return false;
        };
        let len = end - start;
        if self.gso
            && let Some(last) = self.msgs.last_mut()
            && last.end == start
            && last.to == to
            && len <= last.segment
            && (last.end - last.start) == last.segment * last.count
            && last.count < MAX_SEGMENTS
            && end - last.start <= MAX_GSO_BYTES
        {
            last.end = end;
            last.count += 1;
            return true;
        }
        if self.msgs.len() == self.max_msgs {
            // The caller ignored `has_room`: drop rather than exceed what one call carries.
            self.data.truncate(start);
            return false;
        }
        self.msgs.push(Pending {
            start,
            end,
            to,
            segment: len,
            count: 1,
        });
        true
    }

    /// Sends everything queued with as few `sendmmsg` calls as the kernel allows, then empties
    /// the batch. A message the kernel refuses is dropped (counted in [`Flushed::failed`]) and
    /// the rest still go; when the send buffer is full the call waits for room, at most 100 ms
    /// in all, then drops what is left.
    pub fn flush(&mut self, fd: BorrowedFd<'_>) -> Flushed {
        let mut out = Flushed::default();
        let n = self.msgs.len();
        if n == 0 {
            self.data.clear();
            return out;
        }
        self.build();
        let mut i = 0;
        let mut deadline: Option<Instant> = None;
        while i < n {
            // SAFETY: `hdrs[i..n]` are valid mmsghdrs built by `build`: each points at one
            // sockaddr in `names`, one iovec in `iovs` over bytes of `data`, and (with GSO) a
            // control buffer in `cmsgs`, none of which is touched until the call returns. `n - i`
            // is at most 1024, so it fits the c_uint.
            let rc = unsafe {
                libc::sendmmsg(
                    fd.as_raw_fd(),
                    self.hdrs.as_mut_ptr().add(i),
                    (n - i) as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if rc > 0 {
                let done = rc as usize;
                out.sent += self.msgs[i..i + done]
                    .iter()
                    .map(|m| m.count)
                    .sum::<usize>();
                i += done;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    let until = *deadline.get_or_insert_with(|| Instant::now() + SEND_WAIT);
                    let left = until.saturating_duration_since(Instant::now());
                    if !left.is_zero() && crate::poll::wait_writable(fd, left).unwrap_or(false) {
                        continue;
                    }
                    out.failed += self.msgs[i..].iter().map(|m| m.count).sum::<usize>();
                    break;
                }
                _ => {
                    if self.gso && self.msgs[i].count > 1 && e.raw_os_error() == Some(libc::EIO) {
                        self.gso = false;
                        out.gso_disabled = true;
                    }
                    out.failed += self.msgs[i].count;
                    i += 1;
                }
            }
        }
        self.msgs.clear();
        self.data.clear();
        out
    }

    /// Builds the `mmsghdr`s for the queued messages.
    fn build(&mut self) {
        let n = self.msgs.len();
        self.names.clear();
        self.iovs.clear();
        self.cmsgs.clear();
        self.hdrs.clear();
        let base = self.data.as_mut_ptr();
        for m in &self.msgs {
            self.names.push(to_sockaddr(m.to));
            self.iovs.push(libc::iovec {
                // SAFETY: `m.start..m.end` lies inside `data` (push only records ranges it
                // appended), so the pointer stays in bounds.
                iov_base: unsafe { base.add(m.start) }.cast(),
                iov_len: m.end - m.start,
            });
            if self.gso {
                self.cmsgs.push(CmsgBuf([0; CMSG_BUF]));
            }
        }
        for (k, m) in self.msgs.iter().enumerate() {
            // SAFETY: mmsghdr is plain data; all zeroes is a valid value.
            let mut h: libc::mmsghdr = unsafe { zeroed() };
            let (name, name_len) = &mut self.names[k];
            h.msg_hdr.msg_name = (&raw mut *name).cast();
            h.msg_hdr.msg_namelen = *name_len;
            h.msg_hdr.msg_iov = &raw mut self.iovs[k];
            h.msg_hdr.msg_iovlen = 1;
            if self.gso && m.count > 1 {
                // SAFETY: CMSG_SPACE is a pure computation.
                let space = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
                h.msg_hdr.msg_control = self.cmsgs[k].0.as_mut_ptr().cast();
                h.msg_hdr.msg_controllen = space;
                // The segment is at most MAX_GSO_BYTES, so it fits the u16.
                let segment = m.segment as u16;
                // SAFETY: msg_control points at `cmsgs[k]`, 32 bytes and 8-aligned, at least
                // `space`, so CMSG_FIRSTHDR is non-null and the header and its 2 data bytes lie
                // inside it.
                unsafe {
                    let c = libc::CMSG_FIRSTHDR(&raw const h.msg_hdr);
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = libc::UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
                    libc::CMSG_DATA(c).cast::<u16>().write_unaligned(segment);
                }
            }
            self.hdrs.push(h);
        }
        debug_assert_eq!(self.hdrs.len(), n);
    }
}

/// One message a [`RecvBatch`] received.
#[derive(Debug)]
pub struct Received<'a> {
    /// The bytes received (for a UDP GRO message, several datagrams back to back).
    pub data: &'a mut [u8],
    /// The sender, if the kernel reported an IPv4 or IPv6 address.
    pub from: Option<SocketAddr>,
    /// Size of each datagram in `data` (the `UDP_GRO` size; `data.len()` without one). The
    /// last may be shorter. Never 0.
    pub segment: usize,
    /// The message did not fit its slot and was cut short (`MSG_TRUNC`).
    pub truncated: bool,
}

/// Buffers for receiving up to `count` messages with one `recvmmsg`, each into its own slot.
pub struct RecvBatch {
    data: Vec<u8>,
    slot: usize,
    count: usize,
    /// Messages the last [`RecvBatch::recv`] returned.
    filled: usize,
    /// Per message: length, segment size, truncated.
    info: Vec<(usize, usize, bool)>,
    names: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    cmsgs: Vec<CmsgBuf>,
    hdrs: Vec<libc::mmsghdr>,
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("count", &self.count)
            .field("slot", &self.slot)
            .field("filled", &self.filled)
            .finish_non_exhaustive()
    }
}

impl RecvBatch {
    /// Buffers for `count` messages (1..=1024) of up to `slot` bytes each (at least 1).
    pub fn new(count: usize, slot: usize) -> Self {
        let count = count.clamp(1, 1024);
        let slot = slot.max(1);
        // SAFETY: sockaddr_storage and mmsghdr are plain data; all zeroes is valid for both.
        let (ss, hdr): (libc::sockaddr_storage, libc::mmsghdr) = unsafe { (zeroed(), zeroed()) };
        Self {
            data: vec![0; count * slot],
            slot,
            count,
            filled: 0,
            info: vec![(0, 1, false); count],
            names: vec![ss; count],
            iovs: Vec::with_capacity(count),
            cmsgs: vec![CmsgBuf([0; CMSG_BUF]); count],
            hdrs: vec![hdr; count],
        }
    }

    /// Receives what is queued on the non-blocking socket, up to the batch's count, with one
    /// `recvmmsg`; returns how many messages arrived (then read them with
    /// [`RecvBatch::message`]). [`io::ErrorKind::WouldBlock`] when nothing is queued.
    pub fn recv(&mut self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        self.filled = 0;
        self.iovs.clear();
        let base = self.data.as_mut_ptr();
        for k in 0..self.count {
            self.iovs.push(libc::iovec {
                // SAFETY: `k * slot .. (k + 1) * slot` lies inside `data`, which holds
                // `count * slot` bytes.
                iov_base: unsafe { base.add(k * self.slot) }.cast(),
                iov_len: self.slot,
            });
        }
        for k in 0..self.count {
            // SAFETY: as in `new`.
            let mut h: libc::mmsghdr = unsafe { zeroed() };
            h.msg_hdr.msg_name = (&raw mut self.names[k]).cast();
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_iov = &raw mut self.iovs[k];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = self.cmsgs[k].0.as_mut_ptr().cast();
            h.msg_hdr.msg_controllen = CMSG_BUF;
            self.hdrs[k] = h;
        }
        // SAFETY: `hdrs` holds `count` (at most 1024) mmsghdrs, each pointing at its own
        // sockaddr_storage, one iovec over its own slot of `data` and its own control buffer,
        // all writable for the lengths given and untouched until the call returns; the timeout
        // is null (the socket call does not block with MSG_DONTWAIT).
        let rc = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                self.count as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = (rc as usize).min(self.count);
        for k in 0..n {
            let h = &self.hdrs[k];
            let len = (h.msg_len as usize).min(self.slot);
            let truncated = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            let mut segment = len;
            // SAFETY: the kernel filled `msg_controllen` bytes of `cmsgs[k]`;
            // CMSG_FIRSTHDR/NXTHDR stay within them and CMSG_DATA of a UDP_GRO message holds
            // an int.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&raw const h.msg_hdr);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                        let s = libc::CMSG_DATA(c).cast::<libc::c_int>().read_unaligned();
                        if s > 0 {
                            segment = s as usize;
                        }
                    }
                    c = libc::CMSG_NXTHDR(&raw const h.msg_hdr, c);
                }
            }
            self.info[k] = (len, segment.max(1), truncated);
        }
        self.filled = n;
        Ok(n)
    }

    /// Message `i` of the last [`RecvBatch::recv`], or `None` past its count.
    pub fn message(&mut self, i: usize) -> Option<Received<'_>> {
        if i >= self.filled {
            return None;
        }
        let (len, segment, truncated) = self.info[i];
        let from = from_sockaddr(&self.names[i]);
        let start = i * self.slot;
        Some(Received {
            data: &mut self.data[start..start + len],
            from,
            segment,
            truncated,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsFd as _;

    fn pair() -> (UdpSocket, UdpSocket) {
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.set_nonblocking(true).unwrap();
        rx.set_nonblocking(true).unwrap();
        (tx, rx)
    }

    /// Receives until `want` datagrams arrived; returns (datagram bytes, sender) in order.
    fn drain(rx: &UdpSocket, batch: &mut RecvBatch, want: usize) -> Vec<(Vec<u8>, SocketAddr)> {
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.len() < want {
            assert!(Instant::now() < deadline, "got {} of {want}", got.len());
            match batch.recv(rx.as_fd()) {
                Ok(n) => {
                    for i in 0..n {
                        let m = batch.message(i).unwrap();
                        assert!(!m.truncated);
                        let from = m.from.unwrap();
                        for d in m.data.chunks(m.segment) {
                            got.push((d.to_vec(), from));
                        }
                    }
                    assert!(batch.message(n).is_none());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    crate::poll::wait_readable(rx.as_fd(), Duration::from_millis(100)).unwrap();
                }
                Err(e) => panic!("{e}"),
            }
        }
        got
    }

    fn datagram(i: usize, len: usize) -> Vec<u8> {
        (0..len).map(|k| (i * 31 + k) as u8).collect()
    }

    #[test]
    fn plain_batch_sends_every_datagram_in_order() {
        let (tx, rx) = pair();
        let to = rx.local_addr().unwrap();
        let mut batch = SendBatch::new(8, 64 << 10, false);
        let sizes = [1, 700, 1400, 3, 1400, 1400, 90];
        for (i, &len) in sizes.iter().enumerate() {
            assert!(batch.has_room(len));
            assert!(batch.push(|b| {
                b.extend_from_slice(&datagram(i, len));
                Some(to)
            }));
        }
        // A fill that declines queues nothing and leaves no bytes behind.
        assert!(!batch.push(|b| {
            b.extend_from_slice(b"junk");
            None
        }));
        assert_eq!(batch.datagrams(), sizes.len());
        assert_eq!(
            batch.flush(tx.as_fd()),
            Flushed {
                sent: sizes.len(),
                ..Flushed::default()
            }
        );
        assert!(batch.is_empty());
        let mut rb = RecvBatch::new(4, 2048);
        let got = drain(&rx, &mut rb, sizes.len());
        for (i, (d, from)) in got.iter().enumerate() {
            assert_eq!(*d, datagram(i, sizes[i]), "datagram {i}");
            assert_eq!(*from, tx.local_addr().unwrap());
        }
    }

    #[test]
    fn gso_batch_joins_equal_sizes_and_splits_at_a_short_one() {
        let (tx, rx) = pair();
        let (tx2, rx2) = pair();
        let to = rx.local_addr().unwrap();
        let to2 = rx2.local_addr().unwrap();
        let mut batch = SendBatch::new(16, 256 << 10, true);
        // 5 x 1000 + 300 to `to` (one message), then 1000 (new message: the last one ended
        // short), then 2 to `to2` (another destination), then 1200 to `to` (longer: new).
        let plan: Vec<(usize, SocketAddr)> = [1000, 1000, 1000, 1000, 1000, 300, 1000]
            .into_iter()
            .map(|l| (l, to))
            .chain([(500, to2), (500, to2), (1200, to)])
            .collect();
        for (i, &(len, dst)) in plan.iter().enumerate() {
            assert!(batch.push(|b| {
                b.extend_from_slice(&datagram(i, len));
                Some(dst)
            }));
        }
        assert_eq!(batch.msgs.len(), 4, "{:?}", batch.msgs);
        assert_eq!(batch.datagrams(), plan.len());
        let sent = batch.flush(tx.as_fd());
        assert_eq!(
            sent,
            Flushed {
                sent: 10,
                ..Flushed::default()
            }
        );
        assert!(batch.gso());
        let mut rb = RecvBatch::new(4, 65536);
        let got = drain(&rx, &mut rb, 8);
        let want: Vec<Vec<u8>> = plan
            .iter()
            .enumerate()
            .filter(|(_, (_, d))| *d == to)
            .map(|(i, &(l, _))| datagram(i, l))
            .collect();
        assert_eq!(got.into_iter().map(|(d, _)| d).collect::<Vec<_>>(), want);
        let got2 = drain(&rx2, &mut rb, 2);
        assert_eq!(got2[0].0, datagram(7, 500));
        assert_eq!(got2[1].0, datagram(8, 500));
        drop(tx2);
    }

    #[test]
    fn gso_messages_stop_at_the_segment_limit_and_come_back_coalesced() {
        let (tx, rx) = pair();
        crate::udp::enable_gro(rx.as_fd()).unwrap();
        let to = rx.local_addr().unwrap();
        let mut batch = SendBatch::new(16, 1 << 20, true);
        let total = MAX_SEGMENTS + 10;
        for i in 0..total {
            assert!(batch.push(|b| {
                b.extend_from_slice(&datagram(i, 100));
                Some(to)
            }));
        }
        assert_eq!(batch.msgs.len(), 2);
        assert_eq!(batch.msgs[0].count, MAX_SEGMENTS);
        assert_eq!(batch.flush(tx.as_fd()).sent, total);
        let mut rb = RecvBatch::new(8, 65536);
        let got = drain(&rx, &mut rb, total);
        for (i, (d, _)) in got.iter().enumerate() {
            assert_eq!(*d, datagram(i, 100), "datagram {i}");
        }
    }

    #[test]
    fn full_batch_refuses_and_failed_messages_are_counted() {
        let (tx, rx) = pair();
        let to = rx.local_addr().unwrap();
        let mut batch = SendBatch::new(2, 4096, false);
        for i in 0..2 {
            assert!(batch.push(|b| {
                b.extend_from_slice(&datagram(i, 10));
                Some(to)
            }));
        }
        assert!(!batch.has_room(10));
        assert!(!batch.push(|b| {
            b.push(1);
            Some(to)
        }));
        assert_eq!(batch.datagrams(), 2);
        assert_eq!(batch.flush(tx.as_fd()).sent, 2);
        // A datagram the kernel refuses (IPv6 destination on an IPv4 socket) is counted and the
        // ones after it still go.
        let v6: SocketAddr = "[::1]:9".parse().unwrap();
        for (i, dst) in [v6, to].into_iter().enumerate() {
            batch.push(|b| {
                b.extend_from_slice(&datagram(i, 10));
                Some(dst)
            });
        }
        assert_eq!(
            batch.flush(tx.as_fd()),
            Flushed {
                sent: 1,
                failed: 1,
                gso_disabled: false
            }
        );
        let mut rb = RecvBatch::new(4, 64);
        assert_eq!(drain(&rx, &mut rb, 3).len(), 3);
    }

    #[test]
    fn recv_reports_truncation_and_would_block() {
        let (tx, rx) = pair();
        let mut rb = RecvBatch::new(4, 16);
        let e = rb.recv(rx.as_fd()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        tx.send_to(&[7u8; 40], rx.local_addr().unwrap()).unwrap();
        crate::poll::wait_readable(rx.as_fd(), Duration::from_secs(5)).unwrap();
        assert_eq!(rb.recv(rx.as_fd()).unwrap(), 1);
        let m = rb.message(0).unwrap();
        assert!(m.truncated);
        assert_eq!(m.data.len(), 16);
    }
}
