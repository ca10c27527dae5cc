//! Userspace WireGuard: boringtun's noise core on a TUN device and a UDP socket, run by our own
//! threads.
//!
//! Three threads share one `RwLock<Peers>`; each peer's `Tunn` sits in its own `Mutex`. Lock order
//! is always the peers lock first, then one peer lock. Every thread owns its packet buffers, so the
//! hot path does not allocate, and drops are counted (see [`DropCounters`]) instead of logged.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsFd as _;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;
use ipnet::IpNet;
use ring::rand::{SecureRandom as _, SystemRandom};
use serde::Serialize;

use crate::AllowedIps;
use crate::backend::{BackendKind, DeviceSnapshot, PeerSnapshot, PeerSpec, WgBackend};
use crate::error::{Error, Result};
use crate::keys::{PrivateKey, PublicKey};

/// How often timers run, and the longest a thread takes to notice shutdown.
const TICK: Duration = Duration::from_millis(250);
/// Largest IP packet read from the TUN device, and largest UDP datagram.
const MAX_PACKET: usize = 65535;
/// Buffers that hold an encapsulated packet: payload + WireGuard data overhead (32 bytes).
const BUF_LEN: usize = MAX_PACKET + 32;
/// Handshakes per second before cookies are demanded. Every handshake message passes the shared
/// limiter twice (our routing check, then `Tunn::decapsulate`), so this is twice boringtun's 100.
const HANDSHAKE_RATE_LIMIT: u64 = 200;
/// Session indices are 24 bits; boringtun puts them in the top bits of the 32-bit index.
const INDEX_MASK: u32 = 0x00ff_ffff;
/// How often a summary of dropped packets may be logged.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Configuration of a [`BoringtunWg`] device.
#[derive(Debug)]
pub struct BoringtunConfig {
    /// Name of the TUN interface to create (at most 15 bytes).
    pub ifname: String,
    /// The device's static private key.
    pub private_key: PrivateKey,
    /// Underlay address to listen on (`ip:port`; port 0 picks an ephemeral port).
    pub listen: SocketAddr,
}

/// Packets the device dropped or failed to handle, by reason (monotonic counters).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DropCounters {
    /// Outbound packets whose destination matched no peer's allowed IPs (or were not IP).
    pub no_route: u64,
    /// Outbound packets for a peer without a known endpoint.
    pub no_endpoint: u64,
    /// Inbound packets whose inner source is not in the sending peer's allowed IPs.
    pub bad_source: u64,
    /// Inbound datagrams that matched no peer (unknown key or session index).
    pub unknown_peer: u64,
    /// Inbound datagrams rejected by the noise layer (bad MAC/tag, replay, malformed, ...).
    pub invalid: u64,
    /// Errors from the noise layer while encapsulating or running timers.
    pub noise_errors: u64,
    /// Failed UDP sends.
    pub send_errors: u64,
    /// Failed TUN reads or writes.
    pub tun_errors: u64,
}

#[derive(Default)]
struct Counters {
    no_route: AtomicU64,
    no_endpoint: AtomicU64,
    bad_source: AtomicU64,
    unknown_peer: AtomicU64,
    invalid: AtomicU64,
    noise_errors: AtomicU64,
    send_errors: AtomicU64,
    tun_errors: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> DropCounters {
        DropCounters {
            no_route: self.no_route.load(Relaxed),
            no_endpoint: self.no_endpoint.load(Relaxed),
            bad_source: self.bad_source.load(Relaxed),
            unknown_peer: self.unknown_peer.load(Relaxed),
            invalid: self.invalid.load(Relaxed),
            noise_errors: self.noise_errors.load(Relaxed),
            send_errors: self.send_errors.load(Relaxed),
            tun_errors: self.tun_errors.load(Relaxed),
        }
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

struct PeerState {
    tunn: Tunn,
    /// 24-bit local session index of `tunn`.
    index: u32,
    endpoint: Option<SocketAddr>,
}

struct Peer {
    public_key: PublicKey,
    state: Mutex<PeerState>,
    /// UDP payload bytes received from this peer that authenticated.
    rx_bytes: AtomicU64,
    /// UDP payload bytes sent to this peer.
    tx_bytes: AtomicU64,
}

impl Peer {
    fn lock(&self) -> MutexGuard<'_, PeerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct PeerEntry {
    peer: Arc<Peer>,
    spec: PeerSpec,
}

#[derive(Default)]
struct Peers {
    by_key: HashMap<PublicKey, PeerEntry>,
    by_index: HashMap<u32, Arc<Peer>>,
    routes: AllowedIps<Arc<Peer>>,
}

impl Peers {
    /// Makes the routing table send exactly `nets` to `peer`, taking prefixes from other peers
    /// (allowed IPs are unique across peers, as in kernel WireGuard).
    fn claim_routes(&mut self, peer: &Arc<Peer>, nets: &[IpNet]) {
        self.routes
            .retain(|n, v| !Arc::ptr_eq(v, peer) || nets.iter().any(|m| m.trunc() == n));
        for n in nets {
            self.routes.insert(*n, Arc::clone(peer));
        }
    }

    fn is_source_allowed(&self, peer: &Arc<Peer>, src: IpAddr) -> bool {
        self.routes
            .lookup(src)
            .is_some_and(|owner| Arc::ptr_eq(owner, peer))
    }
}

struct Shared {
    ifname: String,
    secret: x25519::StaticSecret,
    static_public: x25519::PublicKey,
    public_key: PublicKey,
    local_addr: SocketAddr,
    tun: File,
    udp: UdpSocket,
    peers: RwLock<Peers>,
    rate_limiter: Arc<RateLimiter>,
    next_index: AtomicU32,
    stop: AtomicBool,
    counters: Counters,
}

impl Shared {
    fn read(&self) -> RwLockReadGuard<'_, Peers> {
        self.peers.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Peers> {
        self.peers.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn stopped(&self) -> bool {
        self.stop.load(Relaxed)
    }

    fn send(&self, peer: &Peer, packet: &[u8], to: SocketAddr) {
        match self.udp.send_to(packet, to) {
            Ok(n) => {
                peer.tx_bytes.fetch_add(n as u64, Relaxed);
            }
            Err(_) => bump(&self.counters.send_errors),
        }
    }

    fn new_tunn(&self, spec: &PeerSpec, index: u32) -> Tunn {
        Tunn::new(
            self.secret.clone(),
            x25519::PublicKey::from(spec.public_key.0),
            spec.preshared_key.as_ref().map(|k| *k.expose_secret()),
            spec.persistent_keepalive.filter(|k| *k > 0),
            index,
            Some(Arc::clone(&self.rate_limiter)),
        )
    }

    /// A 24-bit session index not used by any peer.
    fn alloc_index(&self, peers: &Peers, key: &PublicKey) -> Result<u32> {
        // Among len + 1 consecutive candidates at least one is free.
        let tries = (peers.by_index.len() + 1).min(INDEX_MASK as usize + 1);
        for _ in 0..tries {
            let idx = self.next_index.fetch_add(1, Relaxed) & INDEX_MASK;
            if !peers.by_index.contains_key(&idx) {
                return Ok(idx);
            }
        }
        Err(Error::IndexExhausted {
            ifname: self.ifname.clone(),
            peer: *key,
        })
    }
}

/// Userspace WireGuard: boringtun's noise core on a TUN device and a UDP socket, run by our own
/// threads.
///
/// `start` only creates the TUN interface; addresses, MTU, link state and routes are configured by
/// the caller (over rtnetlink). Dropping the device (or calling [`BoringtunWg::shutdown`]) stops
/// the threads within about 250 ms and closes the TUN fd, which removes the interface.
pub struct BoringtunWg {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl fmt::Debug for BoringtunWg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoringtunWg")
            .field("ifname", &self.shared.ifname)
            .field("public_key", &self.shared.public_key)
            .field("local_addr", &self.shared.local_addr)
            .finish_non_exhaustive()
    }
}

impl BoringtunWg {
    /// Creates the TUN interface and the UDP socket in the calling thread's network namespace and
    /// starts the datapath threads.
    pub fn start(cfg: BoringtunConfig) -> Result<Self> {
        let BoringtunConfig {
            ifname,
            private_key,
            listen,
        } = cfg;
        enc_sys::tun::validate_ifname(&ifname).map_err(|e| Error::from_sys(&ifname, e))?;
        let syscall = |call: &'static str, io_error: io::Error| Error::Syscall {
            ifname: ifname.clone(),
            call,
            io_error,
        };
        let udp = UdpSocket::bind(listen).map_err(|io_error| Error::Bind {
            ifname: ifname.clone(),
            addr: listen,
            io_error,
        })?;
        udp.set_read_timeout(Some(TICK))
            .map_err(|e| syscall("setsockopt(SO_RCVTIMEO)", e))?;
        let local_addr = udp.local_addr().map_err(|e| syscall("getsockname", e))?;
        let tun = enc_sys::tun::open(&ifname).map_err(|e| Error::from_sys(&ifname, e))?;

        let secret = private_key.to_static_secret();
        let static_public = x25519::PublicKey::from(&secret);
        let mut seed = [0u8; 4];
        SystemRandom::new()
            .fill(&mut seed)
            .map_err(|_| Error::Random)?;
        let shared = Arc::new(Shared {
            rate_limiter: Arc::new(RateLimiter::new(&static_public, HANDSHAKE_RATE_LIMIT)),
            public_key: PublicKey(static_public.to_bytes()),
            secret,
            static_public,
            local_addr,
            tun,
            udp,
            peers: RwLock::new(Peers::default()),
            next_index: AtomicU32::new(u32::from_le_bytes(seed)),
            stop: AtomicBool::new(false),
            counters: Counters::default(),
            ifname,
        });

        let mut wg = Self {
            shared,
            threads: Vec::with_capacity(3),
        };
        // On a spawn failure `wg` is dropped, which stops the threads already running.
        wg.spawn("tun", tun_loop)?;
        wg.spawn("udp", udp_loop)?;
        wg.spawn("timers", timer_loop)?;
        tracing::info!(
            ifname = %wg.shared.ifname,
            public_key = %wg.shared.public_key,
            listen = %wg.shared.local_addr,
            "boringtun WireGuard device started"
        );
        Ok(wg)
    }

    fn spawn(&mut self, role: &str, f: fn(&Shared)) -> Result<()> {
        let name = format!("wg-{role}-{}", self.shared.ifname);
        let shared = Arc::clone(&self.shared);
        let handle = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || f(&shared))
            .map_err(|io_error| Error::Thread {
                ifname: self.shared.ifname.clone(),
                thread: name,
                io_error,
            })?;
        self.threads.push(handle);
        Ok(())
    }

    /// Stops the threads and removes the interface (same as dropping the device).
    pub fn shutdown(self) {
        drop(self);
    }

    /// The bound underlay address (useful when the configured port was 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// Packets dropped so far, by reason.
    pub fn drop_counters(&self) -> DropCounters {
        self.shared.counters.snapshot()
    }
}

impl Drop for BoringtunWg {
    fn drop(&mut self) {
        self.shared.stop.store(true, Relaxed);
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::warn!(ifname = %self.shared.ifname, "a WireGuard device thread panicked");
            }
        }
        tracing::info!(ifname = %self.shared.ifname, "boringtun WireGuard device stopped");
        // The last Arc<Shared> goes with `self`, closing the TUN fd and the socket.
    }
}

impl WgBackend for BoringtunWg {
    fn kind(&self) -> BackendKind {
        BackendKind::Boringtun
    }

    fn ifname(&self) -> &str {
        &self.shared.ifname
    }

    fn public_key(&self) -> PublicKey {
        self.shared.public_key
    }

    fn listen_port(&self) -> u16 {
        self.shared.local_addr.port()
    }

    fn upsert_peer(&self, spec: &PeerSpec) -> Result<()> {
        let sh = &*self.shared;
        let mut peers = sh.write();
        let Some(entry) = peers.by_key.get(&spec.public_key) else {
            let index = sh.alloc_index(&peers, &spec.public_key)?;
            let peer = Arc::new(Peer {
                public_key: spec.public_key,
                state: Mutex::new(PeerState {
                    tunn: sh.new_tunn(spec, index),
                    index,
                    endpoint: spec.endpoint,
                }),
                rx_bytes: AtomicU64::new(0),
                tx_bytes: AtomicU64::new(0),
            });
            peers.by_index.insert(index, Arc::clone(&peer));
            peers.claim_routes(&peer, &spec.allowed_ips);
            peers.by_key.insert(
                spec.public_key,
                PeerEntry {
                    peer,
                    spec: spec.clone(),
                },
            );
            tracing::debug!(ifname = %sh.ifname, peer = %spec.public_key, "peer added");
            return Ok(());
        };
        let peer = Arc::clone(&entry.peer);
        if entry.spec == *spec {
            // No-op for the session; re-asserting the routes converges if another peer took one.
            peers.claim_routes(&peer, &spec.allowed_ips);
            return Ok(());
        }
        let rebuild = entry.spec.preshared_key != spec.preshared_key
            || entry.spec.persistent_keepalive != spec.persistent_keepalive;
        let endpoint_changed = spec.endpoint.is_some() && entry.spec.endpoint != spec.endpoint;
        let new_index = if rebuild {
            Some(sh.alloc_index(&peers, &spec.public_key)?)
        } else {
            None
        };
        {
            let mut st = peer.lock();
            if let Some(index) = new_index {
                peers.by_index.remove(&st.index);
                peers.by_index.insert(index, Arc::clone(&peer));
                st.tunn = sh.new_tunn(spec, index);
                st.index = index;
            }
            if endpoint_changed {
                st.endpoint = spec.endpoint;
            }
        }
        peers.claim_routes(&peer, &spec.allowed_ips);
        if let Some(entry) = peers.by_key.get_mut(&spec.public_key) {
            entry.spec = spec.clone();
        }
        tracing::debug!(
            ifname = %sh.ifname,
            peer = %spec.public_key,
            session_reset = rebuild,
            "peer updated"
        );
        Ok(())
    }

    fn delete_peer(&self, key: &PublicKey) -> Result<()> {
        let mut peers = self.shared.write();
        if let Some(entry) = peers.by_key.remove(key) {
            let index = entry.peer.lock().index;
            peers.by_index.remove(&index);
            peers.routes.retain(|_, v| !Arc::ptr_eq(v, &entry.peer));
            tracing::debug!(ifname = %self.shared.ifname, peer = %key, "peer removed");
        }
        Ok(())
    }

    fn dump(&self) -> Result<DeviceSnapshot> {
        let peers = self.shared.read();
        let mut routes: HashMap<PublicKey, Vec<IpNet>> = HashMap::new();
        for (net, peer) in peers.routes.iter() {
            routes.entry(peer.public_key).or_default().push(net);
        }
        let mut out: Vec<PeerSnapshot> = peers
            .by_key
            .iter()
            .map(|(key, entry)| {
                let (last_handshake, endpoint) = {
                    let st = entry.peer.lock();
                    (st.tunn.stats().0, st.endpoint)
                };
                let mut allowed_ips = routes.remove(key).unwrap_or_default();
                allowed_ips.sort();
                PeerSnapshot {
                    public_key: *key,
                    endpoint,
                    allowed_ips,
                    last_handshake,
                    rx_bytes: entry.peer.rx_bytes.load(Relaxed),
                    tx_bytes: entry.peer.tx_bytes.load(Relaxed),
                    has_preshared_key: entry.spec.preshared_key.is_some(),
                }
            })
            .collect();
        out.sort_by_key(|p| p.public_key);
        Ok(DeviceSnapshot {
            ifname: self.shared.ifname.clone(),
            public_key: self.shared.public_key,
            listen_port: self.shared.local_addr.port(),
            peers: out,
        })
    }
}

/// TUN -> UDP: encrypt outbound packets for the peer that owns their destination.
fn tun_loop(sh: &Shared) {
    let mut src = vec![0u8; MAX_PACKET];
    let mut dst = vec![0u8; BUF_LEN];
    let mut tun = &sh.tun;
    while !sh.stopped() {
        match enc_sys::poll::wait_readable(sh.tun.as_fd(), TICK) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(_) => {
                bump(&sh.counters.tun_errors);
                std::thread::sleep(TICK);
                continue;
            }
        }
        // Drain what is queued, but come back to check `stop` now and then.
        for _ in 0..1024 {
            let n = match tun.read(&mut src) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    bump(&sh.counters.tun_errors);
                    break;
                }
            };
            encapsulate_one(sh, &src[..n], &mut dst);
        }
    }
}

fn encapsulate_one(sh: &Shared, packet: &[u8], dst: &mut [u8]) {
    let Some(dst_ip) = Tunn::dst_address(packet) else {
        bump(&sh.counters.no_route);
        return;
    };
    let peers = sh.read();
    let Some(peer) = peers.routes.lookup(dst_ip) else {
        bump(&sh.counters.no_route);
        return;
    };
    let mut st = peer.lock();
    let Some(endpoint) = st.endpoint else {
        bump(&sh.counters.no_endpoint);
        return;
    };
    match st.tunn.encapsulate(packet, dst) {
        TunnResult::WriteToNetwork(out) => sh.send(peer, out, endpoint),
        TunnResult::Err(_) => bump(&sh.counters.noise_errors),
        TunnResult::Done | TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
    }
}

/// UDP -> TUN: handshakes, cookies and data from peers.
fn udp_loop(sh: &Shared) {
    let mut src = vec![0u8; MAX_PACKET];
    let mut dst = vec![0u8; BUF_LEN];
    while !sh.stopped() {
        let (n, from) = match sh.udp.recv_from(&mut src) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(_) => {
                // Errors queued on the socket (e.g. ICMP unreachable); don't spin on them.
                bump(&sh.counters.send_errors);
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        decapsulate_one(sh, &src[..n], from, &mut dst);
    }
}

fn decapsulate_one(sh: &Shared, datagram: &[u8], from: SocketAddr, dst: &mut [u8]) {
    // MAC and load check first, so that an unauthenticated flood costs no Diffie-Hellman.
    let parsed = match sh
        .rate_limiter
        .verify_packet(Some(from.ip()), datagram, dst)
    {
        Ok(p) => p,
        Err(TunnResult::WriteToNetwork(cookie)) => {
            if sh.udp.send_to(cookie, from).is_err() {
                bump(&sh.counters.send_errors);
            }
            return;
        }
        Err(_) => {
            bump(&sh.counters.invalid);
            return;
        }
    };
    let peers = sh.read();
    let peer = match &parsed {
        Packet::HandshakeInit(p) => parse_handshake_anon(&sh.secret, &sh.static_public, p)
            .ok()
            .and_then(|hh| peers.by_key.get(&PublicKey(hh.peer_static_public)))
            .map(|e| &e.peer),
        Packet::HandshakeResponse(p) => peers.by_index.get(&(p.receiver_idx >> 8)),
        Packet::PacketCookieReply(p) => peers.by_index.get(&(p.receiver_idx >> 8)),
        Packet::PacketData(p) => peers.by_index.get(&(p.receiver_idx >> 8)),
    };
    let Some(peer) = peer else {
        bump(&sh.counters.unknown_peer);
        return;
    };
    let mut st = peer.lock();
    match st.tunn.decapsulate(Some(from.ip()), datagram, dst) {
        TunnResult::Done => {}
        TunnResult::Err(_) => {
            bump(&sh.counters.invalid);
            return;
        }
        TunnResult::WriteToNetwork(out) => {
            sh.send(peer, out, from);
            // boringtun contract: repeat with an empty datagram until Done to flush queued packets.
            while let TunnResult::WriteToNetwork(out) = st.tunn.decapsulate(None, &[], dst) {
                sh.send(peer, out, from);
            }
        }
        TunnResult::WriteToTunnelV4(packet, src) => {
            write_tun(sh, &peers, peer, packet, IpAddr::V4(src));
        }
        TunnResult::WriteToTunnelV6(packet, src) => {
            write_tun(sh, &peers, peer, packet, IpAddr::V6(src));
        }
    }
    // The datagram authenticated: count it and roam to where it came from.
    peer.rx_bytes.fetch_add(datagram.len() as u64, Relaxed);
    if st.endpoint != Some(from) {
        st.endpoint = Some(from);
    }
}

fn write_tun(sh: &Shared, peers: &Peers, peer: &Arc<Peer>, packet: &[u8], src: IpAddr) {
    if packet.is_empty() {
        return;
    }
    // Cryptokey routing: the inner source must be one the sending peer owns.
    if !peers.is_source_allowed(peer, src) {
        bump(&sh.counters.bad_source);
        return;
    }
    if (&sh.tun).write(packet).is_err() {
        bump(&sh.counters.tun_errors);
    }
}

/// Runs every peer's timers (handshake retries, rekeys, keepalives) every tick.
fn timer_loop(sh: &Shared) {
    let mut dst = vec![0u8; BUF_LEN];
    let mut last_log = Instant::now();
    let mut logged = DropCounters::default();
    while !sh.stopped() {
        std::thread::sleep(TICK);
        sh.rate_limiter.reset_count();
        {
            let peers = sh.read();
            for entry in peers.by_key.values() {
                let peer = &entry.peer;
                let mut st = peer.lock();
                match st.tunn.update_timers(&mut dst) {
                    TunnResult::WriteToNetwork(out) => match st.endpoint {
                        Some(ep) => sh.send(peer, out, ep),
                        None => bump(&sh.counters.no_endpoint),
                    },
                    TunnResult::Err(WireGuardError::ConnectionExpired) | TunnResult::Done => {}
                    TunnResult::Err(_) => bump(&sh.counters.noise_errors),
                    TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
                }
            }
        }
        if last_log.elapsed() >= DROP_LOG_INTERVAL {
            last_log = Instant::now();
            let now = sh.counters.snapshot();
            if now != logged {
                tracing::debug!(ifname = %sh.ifname, drops = ?now, "WireGuard drop counters");
                logged = now;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_rejects_long_ifname_before_touching_the_kernel() {
        let err = BoringtunWg::start(BoringtunConfig {
            ifname: "a-name-that-is-too-long".into(),
            private_key: PrivateKey::from_bytes([7; 32]),
            listen: "127.0.0.1:0".parse().unwrap(),
        })
        .unwrap_err();
        assert!(matches!(err, Error::InvalidIfname { .. }), "{err}");
    }

    #[test]
    fn config_debug_redacts_private_key() {
        let cfg = BoringtunConfig {
            ifname: "wg0".into(),
            private_key: PrivateKey::from_bytes([7; 32]),
            listen: "127.0.0.1:0".parse().unwrap(),
        };
        let s = format!("{cfg:?}");
        assert!(s.contains("PrivateKey(<redacted>)"), "{s}");
    }
}
