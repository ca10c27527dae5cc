//! Userspace WireGuard: boringtun's noise core on a TUN device and a UDP socket, run by our own
//! threads.
//!
//! The TUN device runs with `IFF_VNET_HDR` and TSO ([`enc_sys::offload`]): the TUN thread reads
//! TCP super-packets of up to 64 KiB, splits them into segments, seals each and sends the
//! sealed segments of one super-packet to their peer in one `sendmsg` with UDP GSO. The UDP
//! thread receives with UDP GRO (several datagrams per `recvmsg`), opens each, and coalesces
//! consecutive TCP segments of one flow into one super-packet per TUN write.
//!
//! Three threads share one `RwLock<Peers>`; each peer's noise state sits in its own `Mutex`. Lock
//! order is always the peers lock first, then one peer lock. No thread makes a data-path syscall
//! while it holds a peer lock: sealed segments go out after the split super-packet is sealed,
//! and the UDP thread's TUN writes (which run the kernel's TCP receive path) are staged under
//! the lock and written after it is released. Every thread owns its packet buffers,
//! so the hot path does not allocate, and drops are counted (see [`DropCounters`]) instead of
//! logged.
//!
//! A key change (preshared key, our static key, the peer's static key) or a keepalive change is
//! make-before-break: the peer gets a new `Tunn` generation while the old one keeps carrying
//! traffic until the new one has a session (see [`crate::generations`]). Every generation's
//! session index is registered, so packets in flight under the old session still find it, and so
//! is every generation's remote static key, so an initiation finds its peer even from the key the
//! peer had before it rolled it.
//!
//! The device holds several static keys while this node rolls its own ([`crate::keyring`]): a
//! handshake message's MAC1 tells which key it was sent to, and that key's rate limiter checks
//! the load and makes the cookies, as boringtun's device does with its one key.

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

use boringtun::noise::Tunn;
use enc_sys::offload::{self, Coalescer, VNET_HDR_LEN};
use enc_sys::throttle::Throttle;
use ipnet::IpNet;
use ring::rand::{SecureRandom as _, SystemRandom};
use serde::Serialize;

use crate::AllowedIps;
use crate::backend::{BackendKind, DeviceSnapshot, PeerSnapshot, PeerSpec, WgBackend};
use crate::error::{Error, Result};
use crate::generations::{Discard, Generations, Output, StaticKeys, Target};
use crate::keyring::{DeviceKey, KeyRing, Rejected};
use crate::keys::{PrivateKey, PublicKey};

/// How often timers run, and the longest a thread takes to notice shutdown.
const TICK: Duration = Duration::from_millis(250);
/// Least spacing of the log lines about datagrams that no generation accepted.
const DISCARD_LOG_INTERVAL: Duration = Duration::from_secs(1);
/// Largest IP packet read from the TUN device, and largest UDP datagram.
const MAX_PACKET: usize = 65535;
/// Largest sealed segment batch sent with one UDP GSO `sendmsg` (64 KiB of UDP payload).
const GSO_BYTES: usize = 65000;
/// Buffers that hold an encapsulated packet: payload + WireGuard data overhead (32 bytes).
const BUF_LEN: usize = MAX_PACKET + 32;
/// Handshakes per second and device key before cookies are demanded. Every handshake message
/// passes its key's limiter twice (our routing check, then `Tunn::decapsulate`), so this is twice
/// boringtun's 100.
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
    /// The device's first static private key (its primary until another one is added).
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
    /// Inbound datagrams that matched no peer (an initiation from an unknown key or for keys no
    /// generation of the peer has, or an unknown session index, e.g. of a retired generation).
    pub unknown_peer: u64,
    /// Inbound datagrams rejected by the noise layer (bad MAC/tag, replay, malformed, a
    /// handshake response to an initiation that a retry replaced, ...).
    pub invalid: u64,
    /// Errors from the noise layer while encapsulating or running timers.
    pub noise_errors: u64,
    /// Failed UDP sends.
    pub send_errors: u64,
    /// Failed TUN reads or writes.
    pub tun_errors: u64,
}

impl DropCounters {
    /// The counters as pairs of a stable kebab-case reason and a count, in declaration order:
    /// `no-route`, `no-endpoint`, `bad-inner-source` (`bad_source`), `unknown-peer`,
    /// `invalid`, `noise-error`, `send-error`, `tun-error`.
    pub fn by_reason(&self) -> Vec<(&'static str, u64)> {
        // Destructured, so that a new counter cannot be left out of the list.
        let Self {
            no_route,
            no_endpoint,
            bad_source,
            unknown_peer,
            invalid,
            noise_errors,
            send_errors,
            tun_errors,
        } = *self;
        vec![
            ("no-route", no_route),
            ("no-endpoint", no_endpoint),
            ("bad-inner-source", bad_source),
            ("unknown-peer", unknown_peer),
            ("invalid", invalid),
            ("noise-error", noise_errors),
            ("send-error", send_errors),
            ("tun-error", tun_errors),
        ]
    }
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
    noise: Generations,
    endpoint: Option<SocketAddr>,
}

/// A peer's shared state. Its key is not here: re-keying changes it (see [`PeerEntry`]).
struct Peer {
    state: Mutex<PeerState>,
    /// UDP payload bytes received from this peer that authenticated, over all generations.
    rx_bytes: AtomicU64,
    /// UDP payload bytes sent to this peer, over all generations.
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
    /// Our static key of the newest generation (`spec.local_key` resolved).
    local: PublicKey,
}

/// The device's keys and peers, under one lock.
struct Peers {
    keys: KeyRing,
    by_key: HashMap<PublicKey, PeerEntry>,
    /// Session index of every generation.
    by_index: HashMap<u32, Arc<Peer>>,
    /// Remote static key of every generation (routes initiations). Should two peers' generations
    /// share a key, the newest registration wins.
    by_remote: HashMap<PublicKey, Arc<Peer>>,
    routes: AllowedIps<Arc<Peer>>,
}

impl Peers {
    fn new(keys: KeyRing) -> Self {
        Self {
            keys,
            by_key: HashMap::new(),
            by_index: HashMap::new(),
            by_remote: HashMap::new(),
            routes: AllowedIps::default(),
        }
    }

    /// Registers the remote keys `peer`'s generations gained and unregisters those it lost.
    fn sync_remotes(&mut self, peer: &Arc<Peer>, before: &[PublicKey], after: &[PublicKey]) {
        for r in before.iter().filter(|r| !after.contains(r)) {
            self.unregister_remote(peer, r);
        }
        for r in after.iter().filter(|r| !before.contains(r)) {
            self.by_remote.insert(*r, Arc::clone(peer));
        }
    }

    fn unregister_remote(&mut self, peer: &Arc<Peer>, remote: &PublicKey) {
        if self
            .by_remote
            .get(remote)
            .is_some_and(|p| Arc::ptr_eq(p, peer))
        {
            self.by_remote.remove(remote);
        }
    }

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
    local_addr: SocketAddr,
    tun: File,
    udp: UdpSocket,
    peers: RwLock<Peers>,
    next_index: AtomicU32,
    stop: AtomicBool,
    counters: Counters,
    /// Gates the log line of a datagram that authenticated for no generation of any peer.
    discard_log: Throttle,
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

    /// The device key `spec` names (the primary if none).
    fn local_key<'p>(&self, peers: &'p Peers, spec: &PeerSpec) -> Result<&'p DeviceKey> {
        match spec.local_key {
            None => Ok(peers.keys.primary()),
            Some(key) => peers.keys.get(&key).ok_or_else(|| Error::UnknownLocalKey {
                ifname: self.ifname.clone(),
                peer: spec.public_key,
                key,
            }),
        }
    }

    /// A 24-bit session index not used by any peer or generation.
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
            .field("public_key", &self.public_key())
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
        udp.set_nonblocking(true)
            .map_err(|e| syscall("fcntl(O_NONBLOCK)", e))?;
        enc_sys::udp::enable_gro(udp.as_fd()).map_err(|e| syscall("setsockopt(UDP_GRO)", e))?;
        enc_sys::sockbuf::set_buffers(udp.as_fd(), enc_sys::sockbuf::DATAPATH_SOCKET_BUFFER)
            .map_err(|e| Error::from_sys(&ifname, e))?;
        let local_addr = udp.local_addr().map_err(|e| syscall("getsockname", e))?;
        let tun =
            enc_sys::tun::open_with_offloads(&ifname).map_err(|e| Error::from_sys(&ifname, e))?;

        let keys = KeyRing::new(&private_key, HANDSHAKE_RATE_LIMIT);
        drop(private_key);
        let mut seed = [0u8; 4];
        SystemRandom::new()
            .fill(&mut seed)
            .map_err(|_| Error::Random)?;
        let shared = Arc::new(Shared {
            local_addr,
            tun,
            udp,
            peers: RwLock::new(Peers::new(keys)),
            next_index: AtomicU32::new(u32::from_le_bytes(seed)),
            stop: AtomicBool::new(false),
            counters: Counters::default(),
            discard_log: Throttle::new(DISCARD_LOG_INTERVAL),
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
            public_key = %wg.public_key(),
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
        self.shared.read().keys.primary().public_key()
    }

    fn add_private_key(&self, key: PrivateKey) -> Result<PublicKey> {
        let mut peers = self.shared.write();
        let before = peers.keys.primary().public_key();
        let added = peers.keys.add(&key);
        if added != before && peers.keys.primary().public_key() == added {
            tracing::info!(
                ifname = %self.shared.ifname,
                public_key = %added,
                "static key added; it is the primary now"
            );
        }
        Ok(added)
    }

    fn retain_private_keys(&self, keep: &[PublicKey]) -> Result<()> {
        let sh = &*self.shared;
        let mut peers = sh.write();
        let primary = peers.keys.primary().public_key();
        if !keep.contains(&primary) {
            return Err(Error::PrimaryKeyDropped {
                ifname: sh.ifname.clone(),
                key: primary,
            });
        }
        if let Some((peer, entry)) = peers.by_key.iter().find(|(_, e)| !keep.contains(&e.local)) {
            return Err(Error::KeyInUse {
                ifname: sh.ifname.clone(),
                key: entry.local,
                peer: *peer,
            });
        }
        let before = peers.keys.public_keys();
        peers.keys.retain(keep);
        for key in before.iter().filter(|k| !keep.contains(k)) {
            tracing::info!(ifname = %sh.ifname, public_key = %key, "static key dropped");
        }
        Ok(())
    }

    fn private_keys(&self) -> Vec<PublicKey> {
        self.shared.read().keys.public_keys()
    }

    fn listen_port(&self) -> u16 {
        self.shared.local_addr.port()
    }

    fn upsert_peer(&self, spec: &PeerSpec) -> Result<()> {
        let sh = &*self.shared;
        let mut guard = sh.write();
        let peers = &mut *guard;
        let local = sh.local_key(peers, spec)?;
        let keys = StaticKeys {
            local: local.public_key(),
            remote: spec.public_key,
        };
        let new_tunn = |index| {
            local.tunn(
                &spec.public_key,
                spec.preshared_key.as_ref(),
                spec.persistent_keepalive,
                index,
            )
        };
        // The entry this spec updates: the peer's own, else the one it was known by before.
        let old_key = if peers.by_key.contains_key(&spec.public_key) {
            Some(spec.public_key)
        } else {
            spec.previous_public_key
                .filter(|k| peers.by_key.contains_key(k))
        };
        let Some(old_key) = old_key else {
            let index = sh.alloc_index(peers, &spec.public_key)?;
            let noise = Generations::new(new_tunn(index), index, keys, Instant::now());
            let peer = Arc::new(Peer {
                state: Mutex::new(PeerState {
                    noise,
                    endpoint: spec.endpoint,
                }),
                rx_bytes: AtomicU64::new(0),
                tx_bytes: AtomicU64::new(0),
            });
            peers.by_index.insert(index, Arc::clone(&peer));
            peers.by_remote.insert(spec.public_key, Arc::clone(&peer));
            peers.claim_routes(&peer, &spec.allowed_ips);
            peers.by_key.insert(
                spec.public_key,
                PeerEntry {
                    peer,
                    spec: spec.clone(),
                    local: keys.local,
                },
            );
            tracing::debug!(
                ifname = %sh.ifname,
                peer = %spec.public_key,
                local_key = %keys.local,
                "peer added"
            );
            return Ok(());
        };
        let Some(entry) = peers.by_key.get(&old_key) else {
            return Ok(());
        };
        let peer = Arc::clone(&entry.peer);
        let rekeyed = old_key != spec.public_key;
        if !rekeyed && entry.spec == *spec && entry.local == keys.local {
            // No-op for the session; re-asserting the routes converges if another peer took one.
            peers.claim_routes(&peer, &spec.allowed_ips);
            return Ok(());
        }
        // boringtun cannot change a running Tunn's keys or keepalive: add a generation.
        let new_generation = rekeyed
            || entry.local != keys.local
            || entry.spec.preshared_key != spec.preshared_key
            || entry.spec.persistent_keepalive != spec.persistent_keepalive;
        let endpoint_changed = spec.endpoint.is_some() && entry.spec.endpoint != spec.endpoint;
        let new = if new_generation {
            let index = sh.alloc_index(peers, &spec.public_key)?;
            Some((new_tunn(index), index))
        } else {
            None
        };
        if rekeyed && let Some(entry) = peers.by_key.remove(&old_key) {
            peers.by_key.insert(spec.public_key, entry);
        }
        let mut generations = None;
        {
            let mut st = peer.lock();
            if endpoint_changed {
                st.endpoint = spec.endpoint;
            }
            if let Some((tunn, index)) = new {
                let before: Vec<PublicKey> = st.noise.remotes().collect();
                let mut out = DeviceOutput {
                    sh,
                    peers,
                    peer: &peer,
                    to: st.endpoint,
                    gso: None,
                    gro: None,
                    discarded: None,
                };
                let dropped = st.noise.change(tunn, index, keys, Instant::now(), &mut out);
                let after: Vec<PublicKey> = st.noise.remotes().collect();
                for i in dropped {
                    peers.by_index.remove(&i);
                }
                peers.by_index.insert(index, Arc::clone(&peer));
                peers.sync_remotes(&peer, &before, &after);
                generations = Some(st.noise.count());
            }
        }
        peers.claim_routes(&peer, &spec.allowed_ips);
        if let Some(entry) = peers.by_key.get_mut(&spec.public_key) {
            entry.spec = spec.clone();
            entry.local = keys.local;
        }
        tracing::debug!(
            ifname = %sh.ifname,
            peer = %spec.public_key,
            rekeyed_from = rekeyed.then_some(tracing::field::display(old_key)),
            local_key = %keys.local,
            new_generation,
            generations,
            "peer updated"
        );
        Ok(())
    }

    fn delete_peer(&self, key: &PublicKey) -> Result<()> {
        let mut peers = self.shared.write();
        if let Some(entry) = peers.by_key.remove(key) {
            let (indices, remotes): (Vec<u32>, Vec<PublicKey>) = {
                let st = entry.peer.lock();
                (st.noise.indices().collect(), st.noise.remotes().collect())
            };
            for i in indices {
                peers.by_index.remove(&i);
            }
            for r in &remotes {
                peers.unregister_remote(&entry.peer, r);
            }
            peers.routes.retain(|_, v| !Arc::ptr_eq(v, &entry.peer));
            tracing::debug!(ifname = %self.shared.ifname, peer = %key, "peer removed");
        }
        Ok(())
    }

    /// [`DropCounters::by_reason`] of [`Self::drop_counters`]: 8 reasons, zeros included.
    fn device_drop_counts(&self) -> Vec<(&'static str, u64)> {
        self.drop_counters().by_reason()
    }

    fn dump(&self) -> Result<DeviceSnapshot> {
        let peers = self.shared.read();
        let mut routes: HashMap<*const Peer, Vec<IpNet>> = HashMap::new();
        for (net, peer) in peers.routes.iter() {
            routes.entry(Arc::as_ptr(peer)).or_default().push(net);
        }
        let mut out: Vec<PeerSnapshot> = peers
            .by_key
            .iter()
            .map(|(key, entry)| {
                let (last_handshake, endpoint, generations, current_has_session, local_key) = {
                    let st = entry.peer.lock();
                    (
                        st.noise.last_handshake(),
                        st.endpoint,
                        st.noise.count(),
                        st.noise.current_has_session(),
                        st.noise.local_key(),
                    )
                };
                let mut allowed_ips = routes.remove(&Arc::as_ptr(&entry.peer)).unwrap_or_default();
                allowed_ips.sort();
                PeerSnapshot {
                    public_key: *key,
                    local_key,
                    endpoint,
                    allowed_ips,
                    last_handshake,
                    rx_bytes: entry.peer.rx_bytes.load(Relaxed),
                    tx_bytes: entry.peer.tx_bytes.load(Relaxed),
                    has_preshared_key: entry.spec.preshared_key.is_some(),
                    generations,
                    current_has_session,
                }
            })
            .collect();
        out.sort_by_key(|p| p.public_key);
        Ok(DeviceSnapshot {
            ifname: self.shared.ifname.clone(),
            public_key: peers.keys.primary().public_key(),
            listen_port: self.shared.local_addr.port(),
            peers: out,
        })
    }
}

/// Sealed datagrams of one peer waiting to go out in one UDP GSO send: equal sizes, the last
/// one possibly shorter.
struct GsoBatch {
    buf: Vec<u8>,
    len: usize,
    segment: usize,
    count: usize,
    to: Option<(SocketAddr, Arc<Peer>)>,
}

impl GsoBatch {
    fn new() -> Self {
        Self {
            buf: vec![0; GSO_BYTES],
            len: 0,
            segment: 0,
            count: 0,
            to: None,
        }
    }

    /// Queues `datagram` for `to`, sending what is queued first when it cannot join it.
    fn push(&mut self, sh: &Shared, peer: &Arc<Peer>, datagram: &[u8], to: SocketAddr) {
        let joins = self
            .to
            .as_ref()
            .is_some_and(|(t, p)| *t == to && Arc::ptr_eq(p, peer))
            && datagram.len() <= self.segment
            && self.len.is_multiple_of(self.segment.max(1))
            && self.count < enc_sys::udp::MAX_SEGMENTS
            && self.len + datagram.len() <= self.buf.len();
        if !joins {
            self.flush(sh);
            if datagram.len() > self.buf.len() {
                sh.send(peer, datagram, to);
                return;
            }
            self.to = Some((to, Arc::clone(peer)));
            self.segment = datagram.len();
        }
        self.buf[self.len..self.len + datagram.len()].copy_from_slice(datagram);
        self.len += datagram.len();
        self.count += 1;
    }

    fn flush(&mut self, sh: &Shared) {
        let Some((to, peer)) = self.to.take() else {
            return;
        };
        let (len, segment) = (self.len, self.segment);
        self.len = 0;
        self.count = 0;
        let seg = u16::try_from(segment).unwrap_or(u16::MAX);
        match enc_sys::udp::send_segments(sh.udp.as_fd(), &self.buf[..len], seg, to) {
            Ok(n) => {
                peer.tx_bytes.fetch_add(n as u64, Relaxed);
            }
            Err(_) => bump(&sh.counters.send_errors),
        }
    }
}

/// TUN -> UDP: split TSO super-packets, encrypt each segment for the peer that owns its
/// destination, send each super-packet's datagrams with one UDP GSO send.
fn tun_loop(sh: &Shared) {
    let mut src = vec![0u8; VNET_HDR_LEN + MAX_PACKET];
    let mut seg = vec![0u8; MAX_PACKET];
    let mut dst = vec![0u8; BUF_LEN];
    let mut batch = GsoBatch::new();
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
            let split = offload::split(&mut src[..n], &mut seg, |packet| {
                encapsulate_one(sh, packet, &mut dst, &mut batch);
            });
            if split.is_err() {
                bump(&sh.counters.tun_errors);
            }
            batch.flush(sh);
        }
    }
}

fn encapsulate_one(sh: &Shared, packet: &[u8], dst: &mut [u8], batch: &mut GsoBatch) {
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
    let mut out = DeviceOutput {
        sh,
        peers: &peers,
        peer,
        to: Some(endpoint),
        gso: Some(batch),
        gro: None,
        discarded: None,
    };
    st.noise.send(packet, dst, &mut out);
}

/// UDP -> TUN: handshakes, cookies and data from peers. Datagrams come several per receive
/// (UDP GRO); the opened TCP segments are coalesced into super-packets until the socket runs
/// dry.
fn udp_loop(sh: &Shared) {
    let mut src = vec![0u8; MAX_PACKET];
    let mut dst = vec![0u8; BUF_LEN];
    let mut gro = Coalescer::new();
    let mut staged = StagedWrites::new();
    while !sh.stopped() {
        match enc_sys::poll::wait_readable(sh.udp.as_fd(), TICK) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(_) => {
                bump(&sh.counters.send_errors);
                std::thread::sleep(TICK);
                continue;
            }
        }
        for _ in 0..1024 {
            let (n, from, segment) = match enc_sys::udp::recv_segments(sh.udp.as_fd(), &mut src) {
                Ok((n, Some(from), segment)) => (n, from, segment),
                Ok((_, None, _)) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    // Errors queued on the socket (e.g. ICMP unreachable); reading cleared it.
                    bump(&sh.counters.send_errors);
                    continue;
                }
            };
            for datagram in src[..n].chunks(segment) {
                decapsulate_one(sh, datagram, from, &mut dst, &mut gro, &mut staged);
                // The TUN writes run here, with no lock held: a write carries the packet
                // through the kernel's TCP receive path, and the TUN thread must not wait for
                // that to seal the next segment for the same peer.
                staged.drain(&mut |b: &[u8]| tun_write(sh, b));
            }
        }
        gro.flush(&mut |b: &[u8]| tun_write(sh, b));
    }
}

/// TUN writes produced while a peer's lock is held, written after it is released. A push into
/// the coalescer emits at most two writes (the pending super-packet and a packet that cannot be
/// coalesced), so the buffer never grows past its first use.
struct StagedWrites {
    buf: Vec<u8>,
    ends: Vec<usize>,
}

impl StagedWrites {
    fn new() -> Self {
        Self {
            buf: Vec::with_capacity(2 * (VNET_HDR_LEN + MAX_PACKET)),
            ends: Vec::with_capacity(4),
        }
    }

    /// Keeps a copy of one TUN write (a `virtio_net_hdr` and a packet).
    fn stage(&mut self, write: &[u8]) {
        self.buf.extend_from_slice(write);
        self.ends.push(self.buf.len());
    }

    /// Hands every staged write to `write`, in order, and empties the stage.
    fn drain(&mut self, write: &mut impl FnMut(&[u8])) {
        let mut start = 0;
        for &end in &self.ends {
            write(&self.buf[start..end]);
            start = end;
        }
        self.buf.clear();
        self.ends.clear();
    }
}

/// One write of a `virtio_net_hdr` and a packet into the TUN device.
fn tun_write(sh: &Shared, buf: &[u8]) {
    if (&sh.tun).write(buf).is_err() {
        bump(&sh.counters.tun_errors);
    }
}

fn decapsulate_one(
    sh: &Shared,
    datagram: &[u8],
    from: SocketAddr,
    dst: &mut [u8],
    gro: &mut Coalescer,
    staged: &mut StagedWrites,
) {
    let peers = sh.read();
    // MAC and load check first, so that an unauthenticated flood costs no Diffie-Hellman.
    let target = match peers.keys.verify(from.ip(), datagram, dst) {
        Ok(t) => t,
        Err(Rejected::Cookie(n)) => {
            if sh.udp.send_to(&dst[..n], from).is_err() {
                bump(&sh.counters.send_errors);
            }
            return;
        }
        Err(Rejected::Invalid) => {
            bump(&sh.counters.invalid);
            return;
        }
    };
    let peer = match target {
        Target::Initiation(keys) => peers.by_remote.get(&keys.remote),
        Target::Index(i) => peers.by_index.get(&i),
    };
    let Some(peer) = peer else {
        bump(&sh.counters.unknown_peer);
        if let Some(held_back) = sh.discard_log.allow() {
            tracing::warn!(ifname = %sh.ifname, %from, target = %TargetLog(target), held_back, "datagram dropped: no peer has its session index or static key");
        }
        return;
    };
    let mut st = peer.lock();
    let mut out = DeviceOutput {
        sh,
        peers: &peers,
        peer,
        to: Some(from),
        gso: None,
        gro: Some((gro, staged)),
        discarded: None,
    };
    if !st
        .noise
        .receive(target, from.ip(), datagram, dst, Instant::now(), &mut out)
    {
        if let Some(held_back) = sh.discard_log.allow() {
            let why = out.discarded;
            let indices: Vec<String> = st.noise.indices().map(|i| format!("{i:#08x}")).collect();
            tracing::warn!(ifname = %sh.ifname, %from, target = %TargetLog(target), reason = ?why, generations = ?indices, held_back, "datagram dropped by the peer's noise state");
        }
        return;
    }
    // The datagram authenticated: count it and roam to where it came from.
    peer.rx_bytes.fetch_add(datagram.len() as u64, Relaxed);
    if st.endpoint != Some(from) {
        st.endpoint = Some(from);
    }
}

/// Delivers one peer's noise output: datagrams to `to`, packets to the TUN device (after the
/// cryptokey-routing check); drops are counted.
struct DeviceOutput<'a> {
    sh: &'a Shared,
    peers: &'a Peers,
    peer: &'a Arc<Peer>,
    to: Option<SocketAddr>,
    /// Where the TUN thread batches sealed data for one UDP GSO send.
    gso: Option<&'a mut GsoBatch>,
    /// Where the UDP thread coalesces opened packets for the TUN device, and where the writes
    /// the coalescer emits wait until the locks are released.
    gro: Option<(&'a mut Coalescer, &'a mut StagedWrites)>,
    /// The last drop reported, for the caller's log line.
    discarded: Option<Discard>,
}

/// A [`Target`] for a log line: a session index in hex, or the sender's static key.
struct TargetLog(Target);

impl std::fmt::Display for TargetLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Target::Index(i) => write!(f, "session index {i:#08x}"),
            Target::Initiation(k) => write!(f, "initiation from {} to {}", k.remote, k.local),
        }
    }
}

impl Output for DeviceOutput<'_> {
    fn network(&mut self, datagram: &[u8]) {
        match (self.to, self.gso.as_deref_mut()) {
            (Some(to), Some(batch)) => batch.push(self.sh, self.peer, datagram, to),
            (Some(to), None) => self.sh.send(self.peer, datagram, to),
            (None, _) => bump(&self.sh.counters.no_endpoint),
        }
    }

    fn tunnel(&mut self, packet: &[u8], src: IpAddr) {
        if packet.is_empty() {
            return;
        }
        // Cryptokey routing: the inner source must be one the sending peer owns.
        if !self.peers.is_source_allowed(self.peer, src) {
            bump(&self.sh.counters.bad_source);
            return;
        }
        let sh = self.sh;
        match &mut self.gro {
            Some((gro, staged)) => gro.push(packet, &mut |b: &[u8]| staged.stage(b)),
            // Not on the UDP thread (no path delivers packets elsewhere): write it alone.
            None => Coalescer::new().push(packet, &mut |b: &[u8]| tun_write(sh, b)),
        }
    }

    fn discard(&mut self, why: Discard) {
        self.discarded = Some(why);
        let c = &self.sh.counters;
        bump(match why {
            Discard::UnknownIndex | Discard::UnknownKeys => &c.unknown_peer,
            Discard::Invalid | Discard::Stale => &c.invalid,
            Discard::Noise => &c.noise_errors,
        });
    }
}

/// Runs every peer's timers (handshake retries, rekeys, keepalives) every tick, for every
/// generation, and retires previous generations when due.
fn timer_loop(sh: &Shared) {
    let mut dst = vec![0u8; BUF_LEN];
    let mut retired: Vec<(Arc<Peer>, u32, StaticKeys)> = Vec::new();
    let mut last_log = Instant::now();
    let mut logged = DropCounters::default();
    while !sh.stopped() {
        std::thread::sleep(TICK);
        {
            let peers = sh.read();
            peers.keys.reset_counts();
            let now = Instant::now();
            for entry in peers.by_key.values() {
                let peer = &entry.peer;
                let mut st = peer.lock();
                let mut out = DeviceOutput {
                    sh,
                    peers: &peers,
                    peer,
                    to: st.endpoint,
                    gso: None,
                    gro: None,
                    discarded: None,
                };
                for (index, keys) in st.noise.tick(&mut dst, now, &mut out) {
                    retired.push((Arc::clone(peer), index, keys));
                }
            }
        }
        if !retired.is_empty() {
            let mut peers = sh.write();
            for (peer, index, keys) in retired.drain(..) {
                // Still ours unless the peer was deleted and the index reused meanwhile.
                if peers
                    .by_index
                    .get(&index)
                    .is_some_and(|p| Arc::ptr_eq(p, &peer))
                {
                    peers.by_index.remove(&index);
                }
                if !peer.lock().noise.remotes().any(|r| r == keys.remote) {
                    peers.unregister_remote(&peer, &keys.remote);
                }
                tracing::debug!(
                    ifname = %sh.ifname,
                    remote_key = %keys.remote,
                    local_key = %keys.local,
                    "old key generation retired"
                );
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
    fn drop_counters_by_reason_name_every_counter_once() {
        let c = DropCounters {
            no_route: 1,
            no_endpoint: 2,
            bad_source: 3,
            unknown_peer: 4,
            invalid: 5,
            noise_errors: 6,
            send_errors: 7,
            tun_errors: 8,
        };
        assert_eq!(
            c.by_reason(),
            [
                ("no-route", 1),
                ("no-endpoint", 2),
                ("bad-inner-source", 3),
                ("unknown-peer", 4),
                ("invalid", 5),
                ("noise-error", 6),
                ("send-error", 7),
                ("tun-error", 8),
            ]
        );
        // A fresh device lists every reason at 0.
        assert!(
            DropCounters::default()
                .by_reason()
                .iter()
                .all(|(_, n)| *n == 0)
        );
    }

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
