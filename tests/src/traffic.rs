//! Load streams between two namespaces, run while the overlay changes keys.
//!
//! [`UdpStream`] sends datagrams numbered from 0 at a fixed rate and reports which numbers never
//! arrived; [`TcpFlow`] sends a deterministic byte stream, verifies every byte in order and
//! reports the longest pause between reads. Both pad their payload with [`PLAINTEXT_MARKER`], so
//! a test can search an underlay capture for it to prove that nothing crossed in the clear.
//!
//! Threads run in the namespaces; every wait has a deadline, so a broken tunnel ends in an error
//! rather than a hang.

use crate::netns::Netns;
use anyhow::{Context, anyhow, bail};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, UdpSocket};
use std::ops::RangeInclusive;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// ASCII pattern that pads every UDP datagram and the TCP stream; an underlay capture that
/// contains it carried test traffic in the clear.
pub const PLAINTEXT_MARKER: &[u8] = b"ENC-PLAINTEXT-MARKER";

/// Bytes of a UDP datagram before the padding: magic, run id, sequence number and send time
/// (microseconds since the Unix epoch; both ends share the clock), big endian.
pub const UDP_HEADER_LEN: usize = 32;
/// Where the sequence number and the send time sit in a datagram.
const UDP_SEQ: std::ops::Range<usize> = 16..24;
const UDP_SENT_AT: std::ops::Range<usize> = 24..32;

/// Largest UDP payload over IPv4.
const UDP_MAX_PAYLOAD: usize = 65_507;
/// First bytes of every datagram of a stream.
const UDP_MAGIC: [u8; 8] = *b"ENCSEQ01";
/// Socket buffer asked for on both UDP ends.
const UDP_SOCKET_BUFFER: usize = 4 << 20;
/// Sequence numbers at or above this are treated as corrupt (bounds the bitmap).
const UDP_MAX_SEQ: u64 = 1 << 28;
/// Lost ranges listed in a [`UdpReport`].
const MAX_LOST_RANGES: usize = 20;
/// Most datagrams sent between two checks of the stop flag.
const MAX_BURST: u64 = 1024;
/// Read and write timeout of the sockets, and the wait for a thread to get ready.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an idle UDP receiver checks its stop flag.
const POLL: Duration = Duration::from_millis(20);
/// Extra time, beyond the I/O timeout, that `stop` waits for a thread to end.
const JOIN_GRACE: Duration = Duration::from_secs(5);
/// TCP stream layout: each block is an 8-byte big-endian block counter then marker bytes.
const TCP_BLOCK: u64 = 64;
/// Largest TCP write and read.
const TCP_CHUNK: usize = 64 << 10;

/// A thread handle whose outer result reports spawning in the namespace, inner the work.
type Spawned<T> = JoinHandle<anyhow::Result<anyhow::Result<T>>>;

/// Where a stream's thread runs: a namespace, or (in unit tests) the current one.
trait Place {
    fn spawn_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<Spawned<T>>;
}

impl Place for Netns {
    fn spawn_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<Spawned<T>> {
        self.spawn(f)
    }
}

// ---------------------------------------------------------------------------------------------
// UDP

/// Outcome of a [`UdpStream`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpReport {
    /// Sequence numbers the sender used (0..sent), including sends that failed.
    pub sent: u64,
    /// Distinct sequence numbers received intact.
    pub received: u64,
    /// `sent - received`.
    pub lost: u64,
    /// Datagrams whose sequence number had already arrived.
    pub duplicates: u64,
    /// Datagrams that arrived after one with a higher sequence number.
    pub reordered: u64,
    /// Longest run of consecutive missing sequence numbers.
    pub max_gap: u64,
    /// The first (at most 20) runs of missing sequence numbers, in order.
    pub lost_ranges: Vec<RangeInclusive<u64>>,
    /// Sends that the kernel refused (their numbers count as sent, hence lost).
    pub send_errors: u64,
    /// The first refused send's error.
    pub first_send_error: Option<String>,
    /// Datagrams of this run with a wrong length or padding.
    pub corrupt: u64,
    /// Datagrams ignored because they did not belong to this run.
    pub stray: u64,
    /// Longest time from a send to its receipt, and that datagram's sequence number: a
    /// receiver that falls seconds behind shows here before it loses anything.
    pub max_delay: Option<(Duration, u64)>,
}

impl fmt::Display for UdpReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "udp: sent {} received {} lost {} duplicates {} reordered {} max_gap {} \
             send_errors {} corrupt {} stray {} lost_ranges [",
            self.sent,
            self.received,
            self.lost,
            self.duplicates,
            self.reordered,
            self.max_gap,
            self.send_errors,
            self.corrupt,
            self.stray,
        )?;
        for (i, r) in self.lost_ranges.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            if r.start() == r.end() {
                write!(f, "{sep}{}", r.start())?;
            } else {
                write!(f, "{sep}{}-{}", r.start(), r.end())?;
            }
        }
        write!(f, "]")?;
        if let Some((d, seq)) = self.max_delay {
            write!(f, " max_delay {:.3}s (seq {seq})", d.as_secs_f64())?;
        }
        if let Some(e) = &self.first_send_error {
            write!(f, " first_send_error {e:?}")?;
        }
        Ok(())
    }
}

/// A running stream of sequence-numbered UDP datagrams; end it with [`UdpStream::stop`].
/// Dropping it stops the threads without a report.
#[derive(Debug)]
pub struct UdpStream {
    dst: SocketAddrV4,
    stop_sender: Arc<AtomicBool>,
    stop_receiver: Arc<AtomicBool>,
    sender: Option<Spawned<UdpSent>>,
    receiver: Option<Spawned<UdpReceived>>,
}

/// Settings of a UDP stream; the skip list is a test hook.
#[derive(Clone, Debug)]
struct UdpOptions {
    pps: u32,
    payload_len: usize,
    /// Sequence numbers counted as sent but never sent, sorted.
    skip: Vec<u64>,
}

/// What the sender thread reports.
#[derive(Debug)]
struct UdpSent {
    sent: u64,
    errors: u64,
    first_error: Option<String>,
}

impl UdpStream {
    /// Starts a receiver in `dst`, bound to an ephemeral port on `dst_addr` (or on all
    /// addresses if `dst_addr` is not local there), and a sender in `src` that sends `pps`
    /// datagrams per second of `payload_len` bytes (at least [`UDP_HEADER_LEN`]) to it.
    pub fn start(
        src: &Netns,
        dst: &Netns,
        dst_addr: Ipv4Addr,
        pps: u32,
        payload_len: usize,
    ) -> anyhow::Result<UdpStream> {
        let opts = UdpOptions {
            pps,
            payload_len,
            skip: Vec::new(),
        };
        Self::launch(src, dst, dst_addr, opts)
    }

    /// Where the datagrams go (the receiver's address and port).
    pub fn dst(&self) -> SocketAddrV4 {
        self.dst
    }

    fn launch(
        src: &impl Place,
        dst: &impl Place,
        dst_addr: Ipv4Addr,
        mut opts: UdpOptions,
    ) -> anyhow::Result<UdpStream> {
        if opts.pps == 0 {
            bail!("udp stream: pps must be positive");
        }
        if !(UDP_HEADER_LEN..=UDP_MAX_PAYLOAD).contains(&opts.payload_len) {
            bail!(
                "udp stream: payload_len {} not in {UDP_HEADER_LEN}..={UDP_MAX_PAYLOAD}",
                opts.payload_len
            );
        }
        opts.skip.sort_unstable();
        let run_id = new_run_id();
        let stop_sender = Arc::new(AtomicBool::new(false));
        let stop_receiver = Arc::new(AtomicBool::new(false));

        let (ready_tx, ready_rx) = mpsc::channel();
        let receiver = dst.spawn_in({
            let stop = stop_receiver.clone();
            let len = opts.payload_len;
            move || {
                let sock = udp_socket(dst_addr, true)?;
                let port = sock.local_addr().context("udp receiver address")?.port();
                let _ = ready_tx.send(port);
                udp_receive(&sock, run_id, len, &stop)
            }
        })?;
        let (port, receiver) = wait_ready(&ready_rx, receiver, &stop_receiver, "udp receiver")?;
        let to = SocketAddrV4::new(dst_addr, port);

        let (ready_tx, ready_rx) = mpsc::channel();
        let sender = src.spawn_in({
            let stop = stop_sender.clone();
            move || {
                let sock = udp_socket(Ipv4Addr::UNSPECIFIED, false)?;
                let _ = ready_tx.send(());
                udp_send(&sock, to, run_id, &opts, &stop)
            }
        });
        let sender = match sender {
            Ok(s) => wait_ready(&ready_rx, s, &stop_sender, "udp sender"),
            Err(e) => Err(e),
        };
        let sender = match sender {
            Ok(((), s)) => s,
            Err(e) => {
                stop_receiver.store(true, Ordering::Relaxed);
                return Err(e);
            }
        };
        Ok(UdpStream {
            dst: to,
            stop_sender,
            stop_receiver,
            sender: Some(sender),
            receiver: Some(receiver),
        })
    }

    /// Stops the sender, waits `drain` for datagrams still in flight, stops the receiver and
    /// reports. Fails if either thread failed or does not end in time.
    pub fn stop(mut self, drain: Duration) -> anyhow::Result<UdpReport> {
        self.stop_sender.store(true, Ordering::Relaxed);
        let sent = match self.sender.take() {
            Some(h) => join_within(h, IO_TIMEOUT + JOIN_GRACE, "udp sender"),
            None => Err(anyhow!("udp sender already gone")),
        };
        if sent.is_ok() {
            std::thread::sleep(drain);
        }
        self.stop_receiver.store(true, Ordering::Relaxed);
        let received = match self.receiver.take() {
            Some(h) => join_within(h, JOIN_GRACE, "udp receiver"),
            None => Err(anyhow!("udp receiver already gone")),
        };
        Ok(udp_report(&sent?, &received?))
    }
}

impl Drop for UdpStream {
    fn drop(&mut self) {
        self.stop_sender.store(true, Ordering::Relaxed);
        self.stop_receiver.store(true, Ordering::Relaxed);
    }
}

/// A datagram of the run with sequence number 0; the padding is the marker repeated.
fn udp_template(run_id: u64, payload_len: usize) -> Vec<u8> {
    let mut buf = Vec::with_capacity(payload_len);
    buf.extend_from_slice(&UDP_MAGIC);
    buf.extend_from_slice(&run_id.to_be_bytes());
    buf.extend_from_slice(&0u64.to_be_bytes());
    buf.extend_from_slice(&0u64.to_be_bytes());
    let pad = payload_len - UDP_HEADER_LEN;
    buf.extend(PLAINTEXT_MARKER.iter().cycle().take(pad));
    buf
}

/// A UDP socket bound to an ephemeral port on `addr` (all addresses if `addr` is not local)
/// with big buffers.
fn udp_socket(addr: Ipv4Addr, receiver: bool) -> anyhow::Result<UdpSocket> {
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).context("udp socket")?;
    if receiver {
        set_recv_buffer(&sock, UDP_SOCKET_BUFFER);
    } else {
        // Best effort: the kernel caps it at wmem_max.
        let _ = sock.set_send_buffer_size(UDP_SOCKET_BUFFER);
        sock.set_write_timeout(Some(IO_TIMEOUT))
            .context("udp write timeout")?;
    }
    let bound = sock.bind(&SockAddr::from(SocketAddrV4::new(addr, 0)));
    match bound {
        Err(e) if e.kind() == ErrorKind::AddrNotAvailable => sock
            .bind(&SockAddr::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)))
            .context("bind udp 0.0.0.0:0")?,
        other => other.with_context(|| format!("bind udp {addr}:0"))?,
    }
    Ok(sock.into())
}

/// Asks for a receive buffer of `bytes`: beyond rmem_max when allowed (CAP_NET_ADMIN), capped
/// at rmem_max otherwise.
fn set_recv_buffer(sock: &Socket, bytes: usize) {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: the fd is a valid socket for the call's duration; optval points to a c_int and
    // optlen is its size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let _ = sock.set_recv_buffer_size(bytes);
    }
}

/// Sends the owed datagrams once per millisecond slot until `stop` is set.
fn udp_send(
    sock: &UdpSocket,
    to: SocketAddrV4,
    run_id: u64,
    opts: &UdpOptions,
    stop: &AtomicBool,
) -> anyhow::Result<UdpSent> {
    let mut buf = udp_template(run_id, opts.payload_len);
    let pacer = Pacer::new(u64::from(opts.pps));
    let mut out = UdpSent {
        sent: 0,
        errors: 0,
        first_error: None,
    };
    while !stop.load(Ordering::Relaxed) {
        let due = pacer.due();
        let end = due.min(out.sent + MAX_BURST);
        while out.sent < end {
            let seq = out.sent;
            if opts.skip.binary_search(&seq).is_err() {
                buf[UDP_SEQ].copy_from_slice(&seq.to_be_bytes());
                buf[UDP_SENT_AT].copy_from_slice(&unix_micros().to_be_bytes());
                if let Err(e) = sock.send_to(&buf, to) {
                    out.errors += 1;
                    out.first_error
                        .get_or_insert_with(|| format!("seq {seq}: {e}"));
                }
            }
            out.sent += 1;
        }
        if out.sent >= due {
            pacer.sleep_to_next_slot();
        }
    }
    Ok(out)
}

/// Set of received sequence numbers, one bit each.
#[derive(Debug, Default)]
struct Bitmap {
    words: Vec<u64>,
}

impl Bitmap {
    /// Sets bit `i`; returns whether it was set already.
    fn insert(&mut self, i: u64) -> bool {
        let (w, b) = ((i / 64) as usize, i % 64);
        if w >= self.words.len() {
            // Grow geometrically so that a steady stream costs amortized O(1).
            let len = (w + 1).max(self.words.len() * 2);
            self.words.resize(len, 0);
        }
        let was = self.words[w] & (1 << b) != 0;
        self.words[w] |= 1 << b;
        was
    }

    fn contains(&self, i: u64) -> bool {
        let (w, b) = ((i / 64) as usize, i % 64);
        self.words.get(w).is_some_and(|word| word & (1 << b) != 0)
    }
}

/// What the receiver thread reports.
#[derive(Debug, Default)]
struct UdpReceived {
    seen: Bitmap,
    highest: Option<u64>,
    duplicates: u64,
    reordered: u64,
    corrupt: u64,
    stray: u64,
    max_delay: Option<(Duration, u64)>,
}

impl UdpReceived {
    /// Accounts one datagram against the run's `template`.
    fn accept(&mut self, data: &[u8], template: &[u8]) {
        if data.len() < UDP_HEADER_LEN || data[..16] != template[..16] {
            self.stray += 1;
            return;
        }
        let seq = be_u64(&data[UDP_SEQ]);
        if data.len() != template.len()
            || data[UDP_HEADER_LEN..] != template[UDP_HEADER_LEN..]
            || seq >= UDP_MAX_SEQ
        {
            self.corrupt += 1;
            return;
        }
        if self.seen.insert(seq) {
            self.duplicates += 1;
            return;
        }
        let delay = Duration::from_micros(unix_micros().saturating_sub(be_u64(&data[UDP_SENT_AT])));
        if self.max_delay.is_none_or(|(d, _)| delay > d) {
            self.max_delay = Some((delay, seq));
        }
        match self.highest {
            Some(h) if h > seq => self.reordered += 1,
            _ => self.highest = Some(seq),
        }
    }
}

/// Receives until `stop` is set, then takes what is already queued and returns.
fn udp_receive(
    sock: &UdpSocket,
    run_id: u64,
    payload_len: usize,
    stop: &AtomicBool,
) -> anyhow::Result<UdpReceived> {
    let template = udp_template(run_id, payload_len);
    let mut buf = vec![0u8; UDP_MAX_PAYLOAD + 1];
    let mut rx = UdpReceived::default();
    sock.set_read_timeout(Some(POLL))
        .context("udp read timeout")?;
    let mut draining = false;
    loop {
        if !draining && stop.load(Ordering::Relaxed) {
            draining = true;
            sock.set_nonblocking(true).context("udp nonblocking")?;
        }
        match sock.recv(&mut buf) {
            Ok(n) => rx.accept(&buf[..n], &template),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if draining {
                    return Ok(rx);
                }
            }
            Err(e) => return Err(e).context("udp recv"),
        }
    }
}

/// Builds the report of a run from what both ends saw.
fn udp_report(tx: &UdpSent, rx: &UdpReceived) -> UdpReport {
    let mut received = 0;
    let mut max_gap = 0;
    let mut lost_ranges = Vec::new();
    let mut gap_start = None;
    for seq in 0..=tx.sent {
        let have = seq == tx.sent || rx.seen.contains(seq);
        match (have, gap_start) {
            (true, Some(start)) => {
                max_gap = max_gap.max(seq - start);
                if lost_ranges.len() < MAX_LOST_RANGES {
                    lost_ranges.push(start..=seq - 1);
                }
                gap_start = None;
            }
            (false, None) => gap_start = Some(seq),
            _ => {}
        }
        if have && seq < tx.sent {
            received += 1;
        }
    }
    UdpReport {
        sent: tx.sent,
        received,
        lost: tx.sent - received,
        duplicates: rx.duplicates,
        reordered: rx.reordered,
        max_gap,
        lost_ranges,
        send_errors: tx.errors,
        first_send_error: tx.first_error.clone(),
        corrupt: rx.corrupt,
        stray: rx.stray,
        max_delay: rx.max_delay,
    }
}

/// Now, in microseconds since the Unix epoch.
fn unix_micros() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_micros()).unwrap_or(u64::MAX)
}

/// A big-endian u64 from 8 bytes.
fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_be_bytes(a)
}

// ---------------------------------------------------------------------------------------------
// TCP

/// Outcome of a [`TcpFlow`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpReport {
    /// Bytes the sender wrote.
    pub sent: u64,
    /// Bytes the receiver read before end of stream.
    pub bytes: u64,
    /// Longest interval between two reads that returned data.
    pub max_stall: Duration,
    /// When that interval ended (wall clock), to line it up with the agents' logs.
    pub max_stall_ended: Option<SystemTime>,
    /// Stream offset of the first byte that differed from the pattern, if any.
    pub corrupt: Option<u64>,
}

impl TcpReport {
    /// Whether every byte sent arrived, in order and intact.
    pub fn is_intact(&self) -> bool {
        self.corrupt.is_none() && self.bytes == self.sent
    }
}

impl fmt::Display for TcpReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tcp: sent {} received {} max_stall {:?}",
            self.sent, self.bytes, self.max_stall
        )?;
        if let Some(t) = self.max_stall_ended {
            write!(f, " (ended {} UTC)", utc_time_of_day(t))?;
        }
        write!(f, " corrupt ")?;
        match self.corrupt {
            Some(off) => write!(f, "at offset {off}"),
            None => write!(f, "none"),
        }
    }
}

/// A running, paced TCP byte stream; end it with [`TcpFlow::stop`]. Dropping it stops the
/// threads without a report.
#[derive(Debug)]
pub struct TcpFlow {
    dst: SocketAddrV4,
    io_timeout: Duration,
    stop: Arc<AtomicBool>,
    sender: Option<Spawned<u64>>,
    receiver: Option<Spawned<TcpReceived>>,
}

/// Settings of a TCP stream; `corrupt_at` and `pause` are test hooks.
#[derive(Clone, Debug)]
struct TcpOptions {
    rate: u64,
    io_timeout: Duration,
    /// Stream offset whose byte the sender flips.
    corrupt_at: Option<u64>,
    /// Once this many bytes are written, the sender sleeps for the duration.
    pause: Option<(u64, Duration)>,
}

/// What the receiver thread reports.
#[derive(Debug)]
struct TcpReceived {
    bytes: u64,
    max_stall: Duration,
    max_stall_ended: Option<SystemTime>,
    corrupt: Option<u64>,
}

impl TcpFlow {
    /// Starts a receiver in `dst` listening on an ephemeral port of `dst_addr` (or all
    /// addresses if `dst_addr` is not local there) and a sender in `src` that connects to it
    /// and writes about `rate_bytes_per_sec`. Fails if the connection is not up within 10 s.
    pub fn start(
        src: &Netns,
        dst: &Netns,
        dst_addr: Ipv4Addr,
        rate_bytes_per_sec: u64,
    ) -> anyhow::Result<TcpFlow> {
        let opts = TcpOptions {
            rate: rate_bytes_per_sec,
            io_timeout: IO_TIMEOUT,
            corrupt_at: None,
            pause: None,
        };
        TcpFlow::launch(src, dst, dst_addr, opts)
    }

    /// Where the stream goes (the receiver's address and port).
    pub fn dst(&self) -> SocketAddrV4 {
        self.dst
    }

    fn launch(
        src: &impl Place,
        dst: &impl Place,
        dst_addr: Ipv4Addr,
        opts: TcpOptions,
    ) -> anyhow::Result<TcpFlow> {
        if opts.rate == 0 {
            bail!("tcp stream: rate must be positive");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let io_timeout = opts.io_timeout;

        let (ready_tx, ready_rx) = mpsc::channel();
        let receiver = dst.spawn_in(move || {
            let listener = tcp_listener(dst_addr, io_timeout)?;
            let port = listener
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .map(|a| a.port())
                .context("tcp listener address")?;
            let _ = ready_tx.send(port);
            tcp_receive(&listener, io_timeout)
        })?;
        let (port, receiver) = wait_ready(&ready_rx, receiver, &stop, "tcp receiver")?;
        let to = SocketAddrV4::new(dst_addr, port);

        let (ready_tx, ready_rx) = mpsc::channel();
        let sender = src.spawn_in({
            let stop = stop.clone();
            move || {
                let mut stream = tcp_connect(to, opts.io_timeout)?;
                let _ = ready_tx.send(());
                tcp_send(&mut stream, &opts, &stop)
            }
        })?;
        let ((), sender) = wait_ready(&ready_rx, sender, &stop, "tcp sender")?;
        Ok(TcpFlow {
            dst: to,
            io_timeout,
            stop,
            sender: Some(sender),
            receiver: Some(receiver),
        })
    }

    /// Stops the sender (which shuts down its side), lets the receiver read to end of stream,
    /// and reports. Fails if either thread failed (a read or write stalled for 10 s) or does
    /// not end in time.
    pub fn stop(mut self) -> anyhow::Result<TcpReport> {
        self.stop.store(true, Ordering::Relaxed);
        let limit = self.io_timeout + JOIN_GRACE;
        let sent = match self.sender.take() {
            Some(h) => join_within(h, limit, "tcp sender"),
            None => Err(anyhow!("tcp sender already gone")),
        };
        let received = match self.receiver.take() {
            Some(h) => join_within(h, limit, "tcp receiver"),
            None => Err(anyhow!("tcp receiver already gone")),
        };
        let (sent, rx) = match (sent, received) {
            (Ok(s), Ok(r)) => (s, r),
            // The receiver's error usually says more (how long it saw nothing, after how much).
            (_, Err(e)) => return Err(e),
            (Err(e), Ok(_)) => return Err(e),
        };
        Ok(TcpReport {
            sent,
            bytes: rx.bytes,
            max_stall: rx.max_stall,
            max_stall_ended: rx.max_stall_ended,
            corrupt: rx.corrupt,
        })
    }
}

impl Drop for TcpFlow {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Byte `off` of the TCP stream.
fn stream_byte(off: u64) -> u8 {
    let (block, i) = (off / TCP_BLOCK, (off % TCP_BLOCK) as usize);
    if i < 8 {
        block.to_be_bytes()[i]
    } else {
        PLAINTEXT_MARKER[(i - 8) % PLAINTEXT_MARKER.len()]
    }
}

/// Fills `out` with the TCP stream from offset `off`.
fn fill_stream(off: u64, out: &mut [u8]) {
    for (i, b) in (off..).zip(out.iter_mut()) {
        *b = stream_byte(i);
    }
}

fn tcp_listener(addr: Ipv4Addr, io_timeout: Duration) -> anyhow::Result<Socket> {
    let sock =
        Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).context("tcp socket")?;
    sock.set_reuse_address(true).context("SO_REUSEADDR")?;
    let bound = sock.bind(&SockAddr::from(SocketAddrV4::new(addr, 0)));
    match bound {
        Err(e) if e.kind() == ErrorKind::AddrNotAvailable => sock
            .bind(&SockAddr::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)))
            .context("bind tcp 0.0.0.0:0")?,
        other => other.with_context(|| format!("bind tcp {addr}:0"))?,
    }
    sock.listen(1).context("listen")?;
    // Linux applies SO_RCVTIMEO to accept.
    sock.set_read_timeout(Some(io_timeout))
        .context("tcp accept timeout")?;
    Ok(sock)
}

fn tcp_connect(to: SocketAddrV4, io_timeout: Duration) -> anyhow::Result<std::net::TcpStream> {
    let sock =
        Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).context("tcp socket")?;
    sock.connect_timeout(&SockAddr::from(to), io_timeout)
        .with_context(|| format!("tcp connect to {to}"))?;
    sock.set_tcp_nodelay(true).context("TCP_NODELAY")?;
    sock.set_write_timeout(Some(io_timeout))
        .context("tcp write timeout")?;
    Ok(sock.into())
}

/// Accepts one connection and reads it to end of stream, checking every byte.
fn tcp_receive(listener: &Socket, io_timeout: Duration) -> anyhow::Result<TcpReceived> {
    let (sock, _) = listener
        .accept()
        .map_err(|e| timeout_error(e, io_timeout))
        .context("tcp accept")?;
    let mut stream: std::net::TcpStream = sock.into();
    stream
        .set_read_timeout(Some(io_timeout))
        .context("tcp read timeout")?;
    let mut buf = vec![0u8; TCP_CHUNK];
    let mut want = vec![0u8; TCP_CHUNK];
    let mut rx = TcpReceived {
        bytes: 0,
        max_stall: Duration::ZERO,
        max_stall_ended: None,
        corrupt: None,
    };
    let mut last_read: Option<Instant> = None;
    // Wall-clock time of the last data, to line a stall up with the agents' logs.
    let mut last_data = SystemTime::now();
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => return Ok(rx),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(timeout_error(e, io_timeout)).with_context(|| {
                    format!(
                        "tcp read after {} bytes (longest stall so far {:?}; last data at {} UTC)",
                        rx.bytes,
                        rx.max_stall,
                        utc_time_of_day(last_data)
                    )
                });
            }
        };
        last_data = SystemTime::now();
        let now = Instant::now();
        if let Some(last) = last_read
            && now - last > rx.max_stall
        {
            rx.max_stall = now - last;
            rx.max_stall_ended = Some(last_data);
        }
        last_read = Some(now);
        if rx.corrupt.is_none() {
            fill_stream(rx.bytes, &mut want[..n]);
            if let Some(i) = (0..n).find(|&i| buf[i] != want[i]) {
                rx.corrupt = Some(rx.bytes + i as u64);
            }
        }
        rx.bytes += n as u64;
    }
}

/// Writes the owed bytes once per millisecond slot until `stop` is set, then shuts down its
/// side. Returns the bytes written.
fn tcp_send(
    stream: &mut std::net::TcpStream,
    opts: &TcpOptions,
    stop: &AtomicBool,
) -> anyhow::Result<u64> {
    let pacer = Pacer::new(opts.rate);
    let mut buf = vec![0u8; TCP_CHUNK];
    let mut sent = 0u64;
    let mut pause = opts.pause;
    while !stop.load(Ordering::Relaxed) {
        let due = pacer.due();
        while sent < due && !stop.load(Ordering::Relaxed) {
            let n = usize::try_from(due - sent).map_or(TCP_CHUNK, |owed| owed.min(TCP_CHUNK));
            let chunk = &mut buf[..n];
            fill_stream(sent, chunk);
            if let Some(at) = opts
                .corrupt_at
                .filter(|at| (sent..sent + n as u64).contains(at))
            {
                chunk[(at - sent) as usize] ^= 0xff;
            }
            stream
                .write_all(chunk)
                .map_err(|e| timeout_error(e, opts.io_timeout))
                .with_context(|| format!("tcp write after {sent} bytes"))?;
            sent += n as u64;
            if pause.is_some_and(|(at, _)| sent >= at)
                && let Some((_, d)) = pause.take()
            {
                std::thread::sleep(d);
            }
        }
        pacer.sleep_to_next_slot();
    }
    stream.flush().context("tcp flush")?;
    stream
        .shutdown(Shutdown::Write)
        .context("tcp shutdown write")?;
    Ok(sent)
}

// ---------------------------------------------------------------------------------------------
// Common

/// A monotonic schedule of `per_sec` units per second, checked once per millisecond slot.
struct Pacer {
    start: Instant,
    per_sec: u64,
}

impl Pacer {
    fn new(per_sec: u64) -> Self {
        Self {
            start: Instant::now(),
            per_sec,
        }
    }

    /// Units owed since the start.
    fn due(&self) -> u64 {
        let owed = self.start.elapsed().as_nanos() * u128::from(self.per_sec) / 1_000_000_000;
        u64::try_from(owed).unwrap_or(u64::MAX)
    }

    /// Sleeps until the next millisecond boundary of the schedule.
    fn sleep_to_next_slot(&self) {
        let elapsed = self.start.elapsed();
        let next = Duration::from_millis(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
            + Duration::from_millis(1);
        std::thread::sleep(next.saturating_sub(elapsed));
    }
}

/// Waits for a thread's ready signal; if it exits or times out first, returns its error.
fn wait_ready<R, T>(
    ready: &mpsc::Receiver<R>,
    handle: Spawned<T>,
    stop: &AtomicBool,
    what: &str,
) -> anyhow::Result<(R, Spawned<T>)> {
    match ready.recv_timeout(IO_TIMEOUT + JOIN_GRACE) {
        Ok(r) => Ok((r, handle)),
        Err(mpsc::RecvTimeoutError::Timeout) => {
            stop.store(true, Ordering::Relaxed);
            bail!("{what} not ready within {:?}", IO_TIMEOUT + JOIN_GRACE)
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            stop.store(true, Ordering::Relaxed);
            match join_within(handle, JOIN_GRACE, what) {
                Err(e) => Err(e),
                Ok(_) => Err(anyhow!("{what} ended before it was ready")),
            }
        }
    }
}

/// Joins a thread, or fails if it has not ended within `timeout` (it is then left running).
fn join_within<T>(handle: Spawned<T>, timeout: Duration, what: &str) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    while !handle.is_finished() {
        if Instant::now() >= deadline {
            bail!("{what} did not end within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    handle
        .join()
        .map_err(|_| anyhow!("{what} panicked"))?
        .with_context(|| format!("{what} could not start"))?
        .with_context(|| format!("{what} failed"))
}

/// `t` as `HH:MM:SS.mmm` (UTC), the form the agents' log timestamps end in.
fn utc_time_of_day(t: SystemTime) -> String {
    let ms = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

/// Turns a socket timeout into an error that says how long it waited.
fn timeout_error(e: std::io::Error, timeout: Duration) -> anyhow::Error {
    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
        anyhow!("no progress for {timeout:?} ({e})")
    } else {
        e.into()
    }
}

/// A run id that differs between runs and streams, so stray datagrams are recognised.
fn new_run_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    nanos ^ (u64::from(std::process::id()) << 40) ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The current namespace: streams over loopback without root.
    struct Here;

    impl Place for Here {
        fn spawn_in<T: Send + 'static>(
            &self,
            f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
        ) -> anyhow::Result<Spawned<T>> {
            std::thread::Builder::new()
                .spawn(move || Ok(f()))
                .context("spawn")
        }
    }

    const LO: Ipv4Addr = Ipv4Addr::LOCALHOST;

    fn udp(pps: u32, skip: Vec<u64>) -> UdpStream {
        let opts = UdpOptions {
            pps,
            payload_len: 200,
            skip,
        };
        UdpStream::launch(&Here, &Here, LO, opts).expect("start udp stream")
    }

    fn tcp(rate: u64, io_timeout: Duration) -> TcpOptions {
        TcpOptions {
            rate,
            io_timeout,
            corrupt_at: None,
            pause: None,
        }
    }

    #[test]
    fn udp_loopback_loses_nothing_at_2000_pps() {
        let stream = udp(2000, Vec::new());
        std::thread::sleep(Duration::from_secs(1));
        let report = stream.stop(Duration::from_millis(200)).expect("stop");
        eprintln!("{report}");
        assert!(
            (1800..=2200).contains(&report.sent),
            "paced badly: {report}"
        );
        assert_eq!(report.lost, 0, "{report}");
        assert_eq!(report.received, report.sent, "{report}");
        assert_eq!(report.duplicates, 0, "{report}");
        assert_eq!(report.corrupt, 0, "{report}");
        assert_eq!(report.send_errors, 0, "{report}");
        assert!(report.lost_ranges.is_empty(), "{report}");
    }

    #[test]
    fn udp_reaches_5000_pps() {
        let stream = udp(5000, Vec::new());
        std::thread::sleep(Duration::from_millis(600));
        let report = stream.stop(Duration::from_millis(200)).expect("stop");
        eprintln!("{report}");
        assert!(
            (2700..=3300).contains(&report.sent),
            "paced badly: {report}"
        );
        assert_eq!(report.lost, 0, "{report}");
    }

    #[test]
    fn udp_skipped_sequence_numbers_are_reported_lost() {
        let stream = udp(2000, vec![500, 100, 101, 102]);
        std::thread::sleep(Duration::from_millis(500));
        let report = stream.stop(Duration::from_millis(200)).expect("stop");
        eprintln!("{report}");
        assert!(report.sent > 600, "{report}");
        assert_eq!(report.lost, 4, "{report}");
        assert_eq!(report.received, report.sent - 4, "{report}");
        assert_eq!(report.lost_ranges, vec![100..=102, 500..=500], "{report}");
        assert_eq!(report.max_gap, 3, "{report}");
        assert!(report.to_string().contains("lost_ranges [100-102, 500]"));
    }

    #[test]
    fn udp_datagrams_carry_the_marker() {
        let t = udp_template(7, 100);
        assert_eq!(t.len(), 100);
        assert_eq!(&t[..8], &UDP_MAGIC);
        assert_eq!(
            &t[UDP_HEADER_LEN..UDP_HEADER_LEN + PLAINTEXT_MARKER.len()],
            PLAINTEXT_MARKER
        );
    }

    #[test]
    fn udp_report_counts_gaps_duplicates_reordering_and_strays() {
        let template = udp_template(42, 64);
        let other_run = udp_template(43, 64);
        let packet = |seq: u64| {
            let mut p = template.clone();
            p[UDP_SEQ].copy_from_slice(&seq.to_be_bytes());
            p[UDP_SENT_AT].copy_from_slice(&unix_micros().to_be_bytes());
            p
        };
        let mut rx = UdpReceived::default();
        // Every third number is missing in 0..90, then 90..100 missing entirely (tail loss).
        for seq in (0..90).filter(|s| s % 3 != 1) {
            rx.accept(&packet(seq), &template);
        }
        rx.accept(&packet(5), &template); // duplicate
        rx.accept(&packet(1), &template); // late: fills a gap, counted as reordered
        rx.accept(&other_run, &template); // another run
        let mut bad = packet(4);
        bad[40] ^= 1;
        rx.accept(&bad, &template); // corrupt padding
        rx.accept(&packet(4)[..50], &template); // truncated
        let tx = UdpSent {
            sent: 100,
            errors: 0,
            first_error: None,
        };
        let r = udp_report(&tx, &rx);
        assert_eq!(r.duplicates, 1);
        assert_eq!(r.reordered, 1);
        assert_eq!(r.stray, 1);
        assert_eq!(r.corrupt, 2);
        // Missing: 1, 4, ..., 88 (30 numbers, of which 1 arrived late) and 90..=99.
        assert_eq!(r.lost, 29 + 10);
        assert_eq!(r.received, 100 - 39);
        assert_eq!(r.max_gap, 10);
        assert_eq!(r.lost_ranges.len(), MAX_LOST_RANGES);
        assert_eq!(r.lost_ranges[0], 4..=4);
        assert_eq!(r.lost_ranges[19], 61..=61);
        // Each datagram carried its send time (just now): the longest delay is short.
        let (delay, _) = r.max_delay.expect("delays measured");
        assert!(delay < Duration::from_secs(10), "{delay:?}");
    }

    #[test]
    fn udp_report_of_a_clean_run_is_empty() {
        let mut rx = UdpReceived::default();
        let template = udp_template(1, UDP_HEADER_LEN);
        let mut p = template.clone();
        for seq in 0..10u64 {
            p[UDP_SEQ].copy_from_slice(&seq.to_be_bytes());
            rx.accept(&p, &template);
        }
        let tx = UdpSent {
            sent: 10,
            errors: 0,
            first_error: None,
        };
        let r = udp_report(&tx, &rx);
        assert_eq!((r.received, r.lost, r.max_gap), (10, 0, 0));
        assert!(r.lost_ranges.is_empty());
    }

    #[test]
    fn tcp_stream_pattern_is_continuous_and_carries_the_marker() {
        let mut whole = vec![0u8; 1000];
        fill_stream(0, &mut whole);
        let mut parts = vec![0u8; 1000];
        fill_stream(0, &mut parts[..37]);
        fill_stream(37, &mut parts[37..]);
        assert_eq!(whole, parts);
        assert!(
            whole
                .windows(PLAINTEXT_MARKER.len())
                .any(|w| w == PLAINTEXT_MARKER)
        );
        // Block counters make equal-looking blocks differ.
        assert_ne!(whole[..64], whole[64..128]);
    }

    #[test]
    fn tcp_loopback_stream_is_intact_and_paced() {
        let flow = TcpFlow::launch(&Here, &Here, LO, tcp(4_000_000, IO_TIMEOUT)).expect("start");
        std::thread::sleep(Duration::from_secs(1));
        let report = flow.stop().expect("stop");
        eprintln!("{report}");
        assert!(report.is_intact(), "{report}");
        assert!(
            (3_400_000..=4_600_000).contains(&report.bytes),
            "paced badly: {report}"
        );
        assert!(report.max_stall < Duration::from_millis(500), "{report}");
    }

    #[test]
    fn tcp_corruption_is_reported_with_its_offset() {
        let mut opts = tcp(2_000_000, IO_TIMEOUT);
        opts.corrupt_at = Some(123_457);
        let flow = TcpFlow::launch(&Here, &Here, LO, opts).expect("start");
        std::thread::sleep(Duration::from_millis(300));
        let report = flow.stop().expect("stop");
        eprintln!("{report}");
        assert_eq!(report.corrupt, Some(123_457), "{report}");
        assert!(!report.is_intact());
        assert_eq!(report.bytes, report.sent, "{report}");
    }

    #[test]
    fn tcp_stall_is_measured() {
        let mut opts = tcp(2_000_000, IO_TIMEOUT);
        opts.pause = Some((100_000, Duration::from_millis(400)));
        let flow = TcpFlow::launch(&Here, &Here, LO, opts).expect("start");
        std::thread::sleep(Duration::from_millis(800));
        let report = flow.stop().expect("stop");
        eprintln!("{report}");
        assert!(report.max_stall >= Duration::from_millis(350), "{report}");
        assert!(report.is_intact(), "{report}");
    }

    #[test]
    fn tcp_stall_beyond_the_timeout_is_an_error_not_a_hang() {
        let mut opts = tcp(1_000_000, Duration::from_millis(300));
        opts.pause = Some((10_000, Duration::from_millis(1500)));
        let flow = TcpFlow::launch(&Here, &Here, LO, opts).expect("start");
        std::thread::sleep(Duration::from_millis(200));
        let started = Instant::now();
        let err = flow.stop().expect_err("the receiver must give up");
        let msg = format!("{err:#}");
        assert!(msg.contains("no progress for 300ms"), "{msg}");
        assert!(started.elapsed() < Duration::from_secs(6), "{msg}");
    }
}
