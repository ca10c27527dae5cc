//! A synchronous netlink connection, generic over the message family.
//!
//! [`Conn`] sends one request at a time and collects the kernel's answer: for a dump every
//! message up to `NLMSG_DONE`, otherwise up to the ack. Dumps interrupted by a concurrent change
//! (`NLM_F_DUMP_INTR`) are restarted a few times. Failures come back as an [`Error`]: the kernel's
//! errno as [`Error::Kernel`], transport failures as [`Error::Syscall`], undecodable replies as
//! [`Error::Protocol`]; the caller maps them into its own error with the object it was working on.

use std::fmt;
use std::io;
use std::marker::PhantomData;
use std::sync::{Mutex, PoisonError};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NetlinkBuffer, NetlinkDeserializable,
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
};
use netlink_sys::{Socket, SocketAddr};
use zeroize::Zeroize as _;

use crate::{Error, Result};

/// Receive buffer: larger than any datagram the kernel sends for our requests (dump skbs are
/// capped at 32 KiB); a bigger datagram is reported as an error, never silently truncated.
const RECV_BUF_LEN: usize = 64 * 1024;

/// How many times a dump interrupted by a concurrent change (`NLM_F_DUMP_INTR`) is tried.
pub const DUMP_ATTEMPTS: usize = 5;

/// The socket, the sequence counter and the receive buffer, used under the lock.
struct Inner {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

/// A synchronous netlink socket of one protocol, carrying messages of type `M`.
///
/// The socket is opened by [`Conn::open`] in the network namespace of the calling thread and
/// stays bound to it, whichever thread uses it later. Requests are serialised by a mutex, so one
/// value can be shared between threads.
pub struct Conn<M> {
    inner: Mutex<Inner>,
    scrub: Option<fn(&mut M)>,
    _message: PhantomData<fn(M) -> M>,
}

impl<M> fmt::Debug for Conn<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("Conn");
        if let Ok(inner) = self.inner.try_lock() {
            s.field("socket", &inner.socket).field("seq", &inner.seq);
        }
        s.field("scrub", &self.scrub.is_some())
            .finish_non_exhaustive()
    }
}

impl<M> Conn<M>
where
    M: NetlinkSerializable + NetlinkDeserializable,
{
    /// Opens, binds and connects a netlink socket of `protocol` (`NETLINK_ROUTE`,
    /// `NETLINK_XFRM`, ...) in the calling thread's network namespace, with `NETLINK_CAP_ACK` set
    /// so that acks carry only the header of the request, not the request itself.
    pub fn open(protocol: isize) -> Result<Self> {
        let syscall = |call| move |source| Error::Syscall { call, source };
        let mut socket = Socket::new(protocol).map_err(syscall("socket"))?;
        socket.bind_auto().map_err(syscall("bind"))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(syscall("connect"))?;
        socket
            .set_cap_ack(true)
            .map_err(syscall("setsockopt NETLINK_CAP_ACK"))?;
        Ok(Self {
            inner: Mutex::new(Inner {
                socket,
                seq: 0,
                buf: Vec::with_capacity(RECV_BUF_LEN),
            }),
            scrub: None,
            _message: PhantomData,
        })
    }

    /// Treats requests and replies as secret: `scrub` is applied to each request message once it
    /// is serialised, and the serialised request and the receive buffer are zeroed after every
    /// request. Replies handed back to the caller are the caller's to scrub.
    pub fn scrubbing(mut self, scrub: fn(&mut M)) -> Self {
        self.scrub = Some(scrub);
        self
    }

    /// Sends `message` with `flags` and collects the replies: for a dump (`NLM_F_DUMP`) until
    /// `NLMSG_DONE`, otherwise until the ack (ask for one with `NLM_F_ACK`). `op` names the
    /// operation in errors.
    ///
    /// A dump that the kernel marks as interrupted fails with [`Error::DumpInterrupted`]; use
    /// [`Conn::dump`] to have it restarted.
    pub fn request(&self, message: M, flags: u16, op: &'static str) -> Result<Vec<M>> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let result = inner.request(message, flags, op, self.scrub);
        if self.scrub.is_some() {
            // Dumps may carry secrets; so may an error message echoing a request.
            inner.buf.zeroize();
        }
        result
    }

    /// A dump request (`NLM_F_REQUEST | NLM_F_DUMP`) of the message `message()` builds,
    /// restarted up to [`DUMP_ATTEMPTS`] times in all while concurrent changes interrupt it.
    pub fn dump(&self, message: impl Fn() -> M, op: &'static str) -> Result<Vec<M>> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.request(message(), NLM_F_REQUEST | NLM_F_DUMP, op) {
                Err(Error::DumpInterrupted { .. }) if attempt < DUMP_ATTEMPTS => {
                    tracing::debug!(op, attempt, "netlink dump interrupted, restarting");
                }
                Err(Error::DumpInterrupted { op, .. }) => {
                    return Err(Error::DumpInterrupted {
                        op,
                        attempts: attempt,
                    });
                }
                other => return other,
            }
        }
    }
}

fn protocol(op: &'static str, reason: String) -> Error {
    Error::Protocol { op, reason }
}

fn kernel(op: &'static str, errno: i32) -> Error {
    Error::Kernel {
        op,
        source: io::Error::from_raw_os_error(errno),
    }
}

impl Inner {
    fn request<M>(
        &mut self,
        message: M,
        flags: u16,
        op: &'static str,
        scrub: Option<fn(&mut M)>,
    ) -> Result<Vec<M>>
    where
        M: NetlinkSerializable + NetlinkDeserializable,
    {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        packet.finalize();
        let mut out = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut out);
        if let (Some(scrub), NetlinkPayload::InnerMessage(inner)) = (scrub, &mut packet.payload) {
            scrub(inner);
        }
        let sent = self.socket.send(&out, 0);
        let len = out.len();
        if scrub.is_some() {
            out.zeroize();
        }
        let sent = sent.map_err(|source| Error::Syscall {
            call: "send",
            source,
        })?;
        if sent != len {
            return Err(protocol(op, format!("sent {sent} of {len} bytes")));
        }
        self.receive(seq, flags & NLM_F_DUMP == NLM_F_DUMP, op)
    }

    fn receive<M>(&mut self, seq: u32, dump: bool, op: &'static str) -> Result<Vec<M>>
    where
        M: NetlinkDeserializable,
    {
        let mut replies = Vec::new();
        let mut interrupted = false;
        loop {
            self.buf.clear();
            let len = self
                .socket
                .recv(&mut self.buf, libc::MSG_TRUNC)
                .map_err(|source| Error::Syscall {
                    call: "recv",
                    source,
                })?;
            if len > self.buf.len() {
                return Err(protocol(
                    op,
                    format!(
                        "datagram of {len} bytes exceeds the {RECV_BUF_LEN}-byte receive buffer"
                    ),
                ));
            }
            let mut offset = 0;
            while offset < len {
                let bytes = &self.buf[offset..len];
                let msg_len = NetlinkBuffer::new_checked(bytes)
                    .map(|b| b.length() as usize)
                    .map_err(|e| protocol(op, format!("bad netlink header: {e}")))?;
                if msg_len > bytes.len() || msg_len == 0 {
                    return Err(protocol(op, format!("bad netlink length {msg_len}")));
                }
                let msg = NetlinkMessage::<M>::deserialize(&bytes[..msg_len])
                    .map_err(|e| protocol(op, e.to_string()))?;
                // NLMSG_ALIGN
                offset += (msg_len + 3) & !3;
                if msg.header.sequence_number != seq {
                    tracing::debug!(
                        got = msg.header.sequence_number,
                        want = seq,
                        "skipping stale netlink message"
                    );
                    continue;
                }
                if msg.header.flags & NLM_F_DUMP_INTR != 0 {
                    interrupted = true;
                }
                match msg.payload {
                    NetlinkPayload::InnerMessage(inner) => replies.push(inner),
                    NetlinkPayload::Error(error) => {
                        return match error.code {
                            None if !dump => Ok(replies),
                            None => Err(protocol(op, "ack in the middle of a dump".into())),
                            Some(code) => Err(kernel(op, -code.get())),
                        };
                    }
                    NetlinkPayload::Done(done) => {
                        return if done.code < 0 {
                            Err(kernel(op, -done.code))
                        } else if interrupted {
                            Err(Error::DumpInterrupted { op, attempts: 1 })
                        } else {
                            Ok(replies)
                        };
                    }
                    NetlinkPayload::Noop => {}
                    NetlinkPayload::Overrun(_) => {
                        return Err(protocol(op, "NLMSG_OVERRUN".into()));
                    }
                    _ => return Err(protocol(op, "unknown netlink payload".into())),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::NLM_F_ACK;
    use netlink_sys::protocols::NETLINK_ROUTE;

    const RTM_NEWLINK: u16 = 16;
    const RTM_GETLINK: u16 = 18;

    /// The smallest rtnetlink message: a type and an `ifinfomsg` (16 bytes, the index at 4..8),
    /// attributes kept as raw bytes.
    #[derive(Debug)]
    struct RawLink {
        message_type: u16,
        index: i32,
        body: Vec<u8>,
    }

    impl NetlinkSerializable for RawLink {
        fn message_type(&self) -> u16 {
            self.message_type
        }

        fn buffer_len(&self) -> usize {
            16
        }

        fn serialize(&self, buffer: &mut [u8]) {
            buffer.fill(0);
            buffer[4..8].copy_from_slice(&self.index.to_ne_bytes());
        }
    }

    impl NetlinkDeserializable for RawLink {
        type Error = io::Error;

        fn deserialize(header: &NetlinkHeader, payload: &[u8]) -> io::Result<Self> {
            let index = payload
                .get(4..8)
                .and_then(|b| b.try_into().ok())
                .map(i32::from_ne_bytes)
                .ok_or_else(|| io::Error::other("short ifinfomsg"))?;
            Ok(Self {
                message_type: header.message_type,
                index,
                body: payload.to_vec(),
            })
        }
    }

    fn get_link(index: i32) -> RawLink {
        RawLink {
            message_type: RTM_GETLINK,
            index,
            body: Vec::new(),
        }
    }

    #[test]
    fn dump_lists_links_including_loopback() {
        let conn = Conn::<RawLink>::open(NETLINK_ROUTE).unwrap();
        let links = conn.dump(|| get_link(0), "RTM_GETLINK").unwrap();
        assert!(!links.is_empty());
        assert!(links.iter().all(|l| l.message_type == RTM_NEWLINK));
        assert!(
            links.iter().any(|l| l.index == 1),
            "no loopback in {links:?}"
        );
        assert!(links.iter().all(|l| l.body.len() >= 16));
        // The sequence moves on and the socket stays usable.
        assert!(!conn.dump(|| get_link(0), "RTM_GETLINK").unwrap().is_empty());
    }

    #[test]
    fn kernel_errno_is_reported_with_the_operation() {
        let conn = Conn::<RawLink>::open(NETLINK_ROUTE)
            .unwrap()
            .scrubbing(|m| m.index = 0);
        let err = conn
            .request(get_link(i32::MAX), NLM_F_REQUEST | NLM_F_ACK, "RTM_GETLINK")
            .unwrap_err();
        assert_eq!(err.kernel_errno(), Some(libc::ENODEV), "{err:?}");
        assert!(err.to_string().contains("RTM_GETLINK"), "{err}");
        // A request that succeeds returns the reply before the ack.
        let lo = conn
            .request(get_link(1), NLM_F_REQUEST | NLM_F_ACK, "RTM_GETLINK")
            .unwrap();
        assert_eq!(lo.len(), 1);
        assert_eq!(lo[0].index, 1);
    }

    #[test]
    fn errors_map_to_errno() {
        let interrupted = Error::DumpInterrupted {
            op: "RTM_GETROUTE",
            attempts: DUMP_ATTEMPTS,
        };
        assert_eq!(interrupted.raw_os_error(), Some(libc::EINTR));
        assert_eq!(interrupted.kernel_errno(), None);
        let refused = kernel("XFRM_MSG_DELSA", libc::ESRCH);
        assert_eq!(refused.kernel_errno(), Some(libc::ESRCH));
        assert_eq!(refused.raw_os_error(), Some(libc::ESRCH));
    }
}
