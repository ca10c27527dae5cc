//! The userspace ESP device: the sans-IO ESP core ([`crate::esp`]) on a TUN interface and an
//! underlay socket, run by two threads of our own. The underlay socket is a raw
//! IP-protocol-50 socket ([`Encapsulation::None`]) or a UDP socket
//! on port 4500 carrying ESP in UDP (RFC 3948, [`Encapsulation::Udp`]).
//!
//! - The TUN thread reads inner packets the kernel routed into the interface, picks the peer by
//!   longest-prefix match of the inner destination over every peer's `remote_cidrs`, seals the
//!   packet with that peer's outbound SA and sends the ESP bytes to the peer's underlay address
//!   (the kernel adds the outer IP header, protocol 50, or the IP and UDP headers).
//! - The network thread reads ESP addressed to our underlay address, finds the inbound SA by
//!   SPI, checks that the outer source (address, and with UDP the port) is the peer owning that
//!   SA, opens the packet (ICV, anti-replay), checks that the inner source lies in the peer's
//!   `remote_cidrs`, and writes the inner packet into the TUN interface.
//!
//! The configuration lives in one `RwLock<Table>`, replaced wholesale on every change (changes are
//! rare, packets are not); each SA sits in its own `Mutex`. Lock order: the table, then one SA.
//! Each thread owns its buffers, so the packet path does not allocate, and it counts what it drops
//! instead of logging it; a summary of the device counters is logged at debug level at most every
//! ten seconds.
//!
//! The TUN interface runs with `IFF_VNET_HDR` and TSO ([`enc_sys::offload`]): the TUN thread
//! reads TCP super-packets of up to 64 KiB and seals each of their segments; the network thread
//! coalesces the TCP segments it opens into super-packets, one TUN write each, until the
//! socket runs dry. ESP on the wire is unchanged: one ESP packet per segment.
//!
//! The underlay socket is batched ([`enc_sys::mmsg`]): the TUN thread seals straight into a
//! send batch, across TUN reads, and sends it with one `sendmmsg` when the TUN interface runs
//! dry or the batch is full; the network thread receives with `recvmmsg`. With UDP the sealed
//! segments of one super-packet (equal sizes, the last one possibly shorter) share one message
//! with `UDP_SEGMENT` (UDP GSO), and the socket has `UDP_GRO`, so one received message holds many
//! ESP packets. No system call is made while a table or SA lock is held.
//!
//! The device never configures the interface: MTU, addresses, link state and routes are the
//! agent's job (over rtnetlink).

mod sys;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::ops::Range;
use std::os::fd::{AsFd as _, BorrowedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::esp::{self, InboundSa, OutboundSa};
use crate::replay::{MAX_WINDOW, MIN_WINDOW};
use crate::sa_log::SaLog;
use crate::{Error, Result};
use crate::{
    EspDrop, InboundSaSnapshot, IpsecBackend, IpsecKind, IpsecPeerSnapshot, IpsecPeerSpec, SaKeys,
};
use enc_sys::lpm::PrefixTable;
use enc_sys::mmsg::{RecvBatch, SendBatch};
use enc_sys::offload::{self, Coalescer, VNET_HDR_LEN};
use enc_sys::throttle::Throttle;
use sys::RawEsp;

/// The longest a thread waits before it checks whether the device is shutting down.
const TICK: Duration = Duration::from_millis(250);
/// Largest IP packet read from the TUN interface or the raw socket.
const MAX_PACKET: usize = 65535;
/// TUN reads per wake-up (and 1/16 as many batched receives) before the stop flag is checked
/// again.
const BATCH: usize = 1024;
/// How often the device counters may be logged.
const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// SPIs 0..=255 are reserved (RFC 4303 section 2.1).
const MIN_SPI: u32 = 256;
/// Least spacing of the log lines about packets with an unknown SPI.
const BAD_SPI_LOG_INTERVAL: Duration = Duration::from_secs(1);
/// Protocol number of ESP.
const PROTO_ESP: u8 = 50;
/// Most messages in one `sendmmsg`: several TSO super-packets' worth of raw ESP packets.
const SEND_MSGS: usize = 256;
/// Bytes of sealed ESP the TUN thread batches before it sends (four full UDP GSO messages).
const SEND_BYTES: usize = 256 << 10;
/// What sealing adds to an inner packet at most: the ESP overhead and 3 bytes of padding.
const SEAL_SLACK: usize = esp::overhead() + 3;
/// Messages per `recvmmsg` on the raw socket (one packet each).
const RECV_MSGS_RAW: usize = 64;
/// Messages per `recvmmsg` on the UDP socket (each up to 64 KiB of GRO-coalesced datagrams).
const RECV_MSGS_UDP: usize = 16;

pub use crate::{ESP_IN_UDP_PORT, Encapsulation};

/// What one UDP datagram received on the ESP-in-UDP port holds (RFC 3948 section 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum UdpPayload {
    /// An ESP packet (a non-zero SPI and at least the ESP header): open it.
    Esp,
    /// A NAT-keepalive (the single byte 0xFF, section 2.3): nothing to do.
    NatKeepalive,
    /// The non-ESP marker (four zero bytes, section 2.2), i.e. IKE. enc runs no IKE: drop it.
    NonEsp,
    /// Too short to be any of the above.
    Malformed,
}

/// Classifies one ESP-in-UDP datagram (its UDP payload) without trusting any of its bytes.
pub fn udp_payload(datagram: &[u8]) -> UdpPayload {
    match datagram {
        [0xff] => UdpPayload::NatKeepalive,
        [0, 0, 0, 0, ..] => UdpPayload::NonEsp,
        d if d.len() >= esp::ESP_HDR_LEN => UdpPayload::Esp,
        _ => UdpPayload::Malformed,
    }
}

/// Configuration of a [`UserspaceEsp`] device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserspaceConfig {
    /// Name of the TUN interface to create (at most 15 bytes).
    pub ifname: String,
    /// This node's underlay address: the raw socket binds it, and every peer's `local` must be
    /// it.
    pub local: IpAddr,
    /// Anti-replay window of inbound SAs, in packets.
    pub replay_window: u32,
    /// If set, every new SA is appended to this file (for decrypting captures).
    pub sa_log: Option<PathBuf>,
    /// Raw ESP or ESP in UDP on the underlay.
    pub encapsulation: Encapsulation,
}

/// Device-wide counters of the packet path (monotonic).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceCounters {
    /// Packets from the TUN interface that are not IP or whose destination no peer's
    /// `remote_cidrs` contains.
    pub no_route: u64,
    /// Packets the outbound SA refused to seal (sequence number space exhausted).
    pub seal_errors: u64,
    /// Failed sends on the raw socket (including a full send buffer).
    pub send_errors: u64,
    /// Failed receives on the raw socket (including ICMP errors it reports).
    pub recv_errors: u64,
    /// Failed reads from or writes to the TUN interface.
    pub tun_errors: u64,
    /// ESP-in-UDP datagrams carrying the non-ESP marker (SPI 0: IKE, which enc does not run),
    /// dropped.
    pub non_esp_marker: u64,
    /// ESP-in-UDP NAT-keepalives (one 0xFF byte), dropped.
    pub nat_keepalives: u64,
    /// ESP-in-UDP datagrams from a source port other than the encapsulation port, dropped
    /// before any SA lookup.
    pub bad_source_port: u64,
}

#[derive(Default)]
struct DeviceStats {
    no_route: AtomicU64,
    seal_errors: AtomicU64,
    send_errors: AtomicU64,
    recv_errors: AtomicU64,
    tun_errors: AtomicU64,
    non_esp_marker: AtomicU64,
    nat_keepalives: AtomicU64,
    bad_source_port: AtomicU64,
}

impl DeviceCounters {
    /// The counters as pairs of a stable kebab-case reason and a count, in declaration order:
    /// `no-route`, `seal-error`, `send-error`, `recv-error`, `tun-error`, `non-esp-marker`,
    /// `nat-keepalive`, `bad-source-port`.
    pub fn by_reason(&self) -> Vec<(&'static str, u64)> {
        // Destructured, so that a new counter cannot be left out of the list.
        let Self {
            no_route,
            seal_errors,
            send_errors,
            recv_errors,
            tun_errors,
            non_esp_marker,
            nat_keepalives,
            bad_source_port,
        } = *self;
        vec![
            ("no-route", no_route),
            ("seal-error", seal_errors),
            ("send-error", send_errors),
            ("recv-error", recv_errors),
            ("tun-error", tun_errors),
            ("non-esp-marker", non_esp_marker),
            ("nat-keepalive", nat_keepalives),
            ("bad-source-port", bad_source_port),
        ]
    }
}

impl DeviceStats {
    fn snapshot(&self) -> DeviceCounters {
        DeviceCounters {
            no_route: self.no_route.load(Relaxed),
            seal_errors: self.seal_errors.load(Relaxed),
            send_errors: self.send_errors.load(Relaxed),
            recv_errors: self.recv_errors.load(Relaxed),
            tun_errors: self.tun_errors.load(Relaxed),
            non_esp_marker: self.non_esp_marker.load(Relaxed),
            nat_keepalives: self.nat_keepalives.load(Relaxed),
            bad_source_port: self.bad_source_port.load(Relaxed),
        }
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

fn add(c: &AtomicU64, n: usize) {
    c.fetch_add(n as u64, Relaxed);
}

/// One counter per [`EspDrop`].
#[derive(Default)]
struct DropCounts([AtomicU64; EspDrop::ALL.len()]);

impl DropCounts {
    fn slot(reason: EspDrop) -> usize {
        match reason {
            EspDrop::BadSpi => 0,
            EspDrop::Replay => 1,
            EspDrop::IcvFailure => 2,
            EspDrop::Malformed => 3,
            EspDrop::BadInnerSource => 4,
        }
    }

    fn bump(&self, reason: EspDrop) {
        bump(&self.0[Self::slot(reason)]);
    }

    /// Every reason, in [`EspDrop::ALL`] order, zeros included.
    fn snapshot(&self) -> Vec<(EspDrop, u64)> {
        EspDrop::ALL
            .iter()
            .map(|&r| (r, self.0[Self::slot(r)].load(Relaxed)))
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Counters of one peer; they survive re-keying and spec changes (not `delete_peer`), so the
/// per-peer totals never go backwards when a rotation replaces SAs.
#[derive(Default)]
struct PeerStats {
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    drops: DropCounts,
}

struct Inbound {
    keys: SaKeys,
    sa: Mutex<InboundSa>,
    packets: AtomicU64,
    bytes: AtomicU64,
}

struct Peer {
    spec: IpsecPeerSpec,
    outbound: Arc<Mutex<OutboundSa>>,
    inbound: Vec<Arc<Inbound>>,
    stats: Arc<PeerStats>,
}

impl Peer {
    fn label(&self) -> String {
        label(&self.spec)
    }

    fn accepts_inner_source(&self, src: IpAddr) -> bool {
        self.spec.remote_cidrs.iter().any(|net| net.contains(&src))
    }
}

fn label(spec: &IpsecPeerSpec) -> String {
    format!("{} ({})", spec.peer_id, spec.name)
}

/// The configuration the packet path reads: the peers and three indexes derived from them.
#[derive(Default)]
struct Table {
    peers: BTreeMap<u16, Arc<Peer>>,
    /// Inbound SPI -> owning peer and SA.
    by_spi: HashMap<u32, (Arc<Peer>, Arc<Inbound>)>,
    /// Underlay address -> peer, to charge drops to the sender (lowest peer id on a tie).
    by_remote: HashMap<IpAddr, Arc<Peer>>,
    /// Inner destination prefix -> peer.
    routes: PrefixTable<Arc<Peer>>,
}

impl Table {
    fn build(peers: BTreeMap<u16, Arc<Peer>>) -> Self {
        let mut by_spi = HashMap::new();
        let mut by_remote = HashMap::new();
        let mut routes = PrefixTable::default();
        for peer in peers.values() {
            for sa in &peer.inbound {
                by_spi.insert(sa.keys.spi, (Arc::clone(peer), Arc::clone(sa)));
            }
            by_remote
                .entry(peer.spec.remote)
                .or_insert_with(|| Arc::clone(peer));
            for net in &peer.spec.remote_cidrs {
                routes.insert(*net, Arc::clone(peer));
            }
        }
        Self {
            peers,
            by_spi,
            by_remote,
            routes,
        }
    }
}

fn invalid(field: &'static str, value: impl fmt::Display, reason: impl Into<String>) -> Error {
    Error::Invalid {
        field,
        value: value.to_string(),
        reason: reason.into(),
    }
}

fn spi_str(spi: u32) -> String {
    format!("{spi:#010x}")
}

/// The device's configuration and counters, and the packet path, without any I/O: the threads
/// hand it packets and do what it returns.
struct State {
    local: IpAddr,
    replay_window: u32,
    sa_log: Option<Mutex<SaLog>>,
    table: RwLock<Table>,
    device_drops: DropCounts,
    stats: DeviceStats,
    /// Gates the log line of an ESP packet whose SPI no SA of its sender has.
    bad_spi_log: Throttle,
}

impl State {
    /// What [`IpsecBackend::device_drop_counts`] reports: the device counters
    /// ([`DeviceCounters::by_reason`]), then the input drops of no peer by [`EspDrop::label`].
    fn device_drop_counts(&self) -> Vec<(&'static str, u64)> {
        let mut out = self.stats.snapshot().by_reason();
        out.extend(
            self.device_drops
                .snapshot()
                .into_iter()
                .map(|(r, n)| (r.label(), n)),
        );
        out
    }

    fn new(local: IpAddr, replay_window: u32, sa_log: Option<SaLog>) -> Self {
        Self {
            local,
            replay_window,
            sa_log: sa_log.map(Mutex::new),
            table: RwLock::new(Table::default()),
            device_drops: DropCounts::default(),
            stats: DeviceStats::default(),
            bad_spi_log: Throttle::new(BAD_SPI_LOG_INTERVAL),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Checks `spec` on its own and against the other peers in `table`.
    fn validate(&self, table: &Table, spec: &IpsecPeerSpec) -> Result<()> {
        let me = label(spec);
        if spec.local != self.local {
            return Err(invalid(
                "local",
                spec.local,
                format!(
                    "peer {me}: the device is bound to {}; every peer must use it",
                    self.local
                ),
            ));
        }
        if spec.remote.is_ipv4() != self.local.is_ipv4() {
            return Err(invalid(
                "remote",
                spec.remote,
                format!(
                    "peer {me}: address family differs from the device's {}",
                    self.local
                ),
            ));
        }
        if spec.remote.is_unspecified() || spec.remote.is_multicast() || spec.remote == self.local {
            return Err(invalid(
                "remote",
                spec.remote,
                format!("peer {me}: not a peer's unicast address"),
            ));
        }
        if spec.remote_cidrs.is_empty() {
            return Err(invalid(
                "remote_cidrs",
                "[]",
                format!("peer {me}: no pod CIDR to route to the peer"),
            ));
        }
        for net in &spec.remote_cidrs {
            if let Some(owner) = table.routes.get(*net)
                && owner.spec.peer_id != spec.peer_id
            {
                return Err(invalid(
                    "remote_cidrs",
                    net,
                    format!(
                        "already routed to peer {}; peer {me} cannot claim it too",
                        owner.label()
                    ),
                ));
            }
        }
        if spec.outbound.spi < MIN_SPI {
            return Err(invalid(
                "outbound.spi",
                spi_str(spec.outbound.spi),
                format!("peer {me}: SPIs below 256 are reserved"),
            ));
        }
        // Not used here (see `IpsecPeerSpec::older_outbound`), but refused like the kernel
        // backend refuses it, so a spec is valid or not whichever backend runs.
        spec.check_older_outbound()?;
        for (i, keys) in spec.inbound.iter().enumerate() {
            if keys.spi < MIN_SPI {
                return Err(invalid(
                    "inbound.spi",
                    spi_str(keys.spi),
                    format!("peer {me}: SPIs below 256 are reserved"),
                ));
            }
            if spec.inbound[..i].iter().any(|k| k.spi == keys.spi) {
                return Err(invalid(
                    "inbound.spi",
                    spi_str(keys.spi),
                    format!("peer {me}: listed twice"),
                ));
            }
            if let Some((owner, _)) = table.by_spi.get(&keys.spi)
                && owner.spec.peer_id != spec.peer_id
            {
                return Err(invalid(
                    "inbound.spi",
                    spi_str(keys.spi),
                    format!(
                        "already an inbound SA of peer {}; peer {me} cannot use it too",
                        owner.label()
                    ),
                ));
            }
        }
        Ok(())
    }

    fn upsert(&self, spec: &IpsecPeerSpec) -> Result<()> {
        let mut table = self.write();
        let old = table.peers.get(&spec.peer_id).cloned();
        if old.as_ref().is_some_and(|p| p.spec == *spec) {
            return Ok(());
        }
        self.validate(&table, spec)?;
        let moved = old.as_ref().is_some_and(|p| p.spec.remote != spec.remote);

        let kept_out = old
            .as_ref()
            .filter(|p| p.spec.outbound == spec.outbound)
            .map(|p| Arc::clone(&p.outbound));
        let new_out = kept_out.is_none();
        let outbound = match kept_out {
            Some(sa) => sa,
            None => Arc::new(Mutex::new(OutboundSa::new(&spec.outbound)?)),
        };
        let mut inbound = Vec::with_capacity(spec.inbound.len());
        let mut new_in = Vec::new();
        for keys in &spec.inbound {
            let kept = old
                .as_ref()
                .and_then(|p| p.inbound.iter().find(|sa| sa.keys == *keys));
            match kept {
                Some(sa) => inbound.push(Arc::clone(sa)),
                None => {
                    inbound.push(Arc::new(Inbound {
                        keys: keys.clone(),
                        sa: Mutex::new(InboundSa::new(keys, self.replay_window)?),
                        packets: AtomicU64::new(0),
                        bytes: AtomicU64::new(0),
                    }));
                    new_in.push(keys.spi);
                }
            }
        }

        // Log before committing: on failure nothing changed and a retry logs again.
        if let Some(log) = &self.sa_log {
            let mut log = lock(log);
            if new_out || moved {
                log.record(self.local, spec.remote, &spec.outbound)?;
            }
            for keys in &spec.inbound {
                if moved || new_in.contains(&keys.spi) {
                    log.record(spec.remote, self.local, keys)?;
                }
            }
        }

        let stats = old
            .as_ref()
            .map(|p| Arc::clone(&p.stats))
            .unwrap_or_default();
        let removed: Vec<u32> = old
            .as_ref()
            .map(|p| {
                p.inbound
                    .iter()
                    .map(|sa| sa.keys.spi)
                    .filter(|spi| !spec.inbound.iter().any(|k| k.spi == *spi))
                    .collect()
            })
            .unwrap_or_default();
        let peer = Arc::new(Peer {
            spec: spec.clone(),
            outbound,
            inbound,
            stats,
        });
        let mut peers = std::mem::take(&mut table.peers);
        peers.insert(spec.peer_id, peer);
        *table = Table::build(peers);
        tracing::debug!(
            peer_id = spec.peer_id,
            peer = %spec.name,
            remote = %spec.remote,
            out_spi = %spi_str(spec.outbound.spi),
            new_outbound = new_out,
            new_inbound = ?new_in.iter().map(|s| spi_str(*s)).collect::<Vec<_>>(),
            removed_inbound = ?removed.iter().map(|s| spi_str(*s)).collect::<Vec<_>>(),
            "userspace ESP peer {}",
            if old.is_some() { "updated" } else { "added" },
        );
        Ok(())
    }

    fn delete(&self, peer_id: u16) {
        let mut table = self.write();
        if !table.peers.contains_key(&peer_id) {
            return;
        }
        let mut peers = std::mem::take(&mut table.peers);
        let removed = peers.remove(&peer_id);
        *table = Table::build(peers);
        if let Some(p) = removed {
            tracing::debug!(peer_id, peer = %p.spec.name, "userspace ESP peer removed");
        }
    }

    fn peers(&self) -> Vec<IpsecPeerSnapshot> {
        let table = self.read();
        table
            .peers
            .values()
            .map(|p| {
                let (out_spi, out_seq) = {
                    let sa = lock(&p.outbound);
                    (sa.spi(), sa.last_seq())
                };
                IpsecPeerSnapshot {
                    peer_id: p.spec.peer_id,
                    out_spi,
                    out_seq,
                    tx_packets: p.stats.tx_packets.load(Relaxed),
                    tx_bytes: p.stats.tx_bytes.load(Relaxed),
                    rx_packets: p.stats.rx_packets.load(Relaxed),
                    rx_bytes: p.stats.rx_bytes.load(Relaxed),
                    inbound: p
                        .inbound
                        .iter()
                        .map(|sa| InboundSaSnapshot {
                            spi: sa.keys.spi,
                            highest_seq: lock(&sa.sa).highest_seq(),
                            packets: sa.packets.load(Relaxed),
                            bytes: sa.bytes.load(Relaxed),
                        })
                        .collect(),
                    drops: p.stats.drops.snapshot(),
                }
            })
            .collect()
    }

    /// Seals an inner packet read from the TUN interface into `out` (ESP from the SPI on) and
    /// returns where to send it, or `None` if it was dropped (and counted).
    #[cfg(test)]
    fn seal(&self, inner: &[u8], out: &mut Vec<u8>) -> Option<IpAddr> {
        out.clear();
        self.seal_append(inner, out)
    }

    /// Appends the ESP packet (from the SPI on) carrying `inner`, a packet read from the TUN
    /// interface, to `out` and returns where to send it, or `None` if it was dropped (and
    /// counted; `out` is then unchanged).
    fn seal_append(&self, inner: &[u8], out: &mut Vec<u8>) -> Option<IpAddr> {
        let Some(dst) = inner_addr(inner, Field::Destination) else {
            bump(&self.stats.no_route);
            return None;
        };
        let table = self.read();
        let Some(peer) = table.routes.lookup(dst) else {
            bump(&self.stats.no_route);
            return None;
        };
        if lock(&peer.outbound).seal(inner, out).is_err() {
            bump(&self.stats.seal_errors);
            return None;
        }
        bump(&peer.stats.tx_packets);
        add(&peer.stats.tx_bytes, inner.len());
        Some(peer.spec.remote)
    }

    /// Opens ESP (SPI onwards) that `src` sent to our underlay address, in place. Returns the
    /// range of `esp` holding the inner packet to write into the TUN interface, or `None` if the
    /// packet was dropped (and counted: on the SA's peer, else on the sending peer, else on the
    /// device).
    fn open(&self, src: IpAddr, esp: &mut [u8]) -> Option<Range<usize>> {
        let table = self.read();
        let charge_sender = |reason| match table.by_remote.get(&src) {
            Some(sender) => sender.stats.drops.bump(reason),
            None => self.device_drops.bump(reason),
        };
        let Some(spi) = esp::spi_of(esp) else {
            charge_sender(EspDrop::Malformed);
            return None;
        };
        // An SA is only usable by the peer it belongs to.
        let Some((peer, sa)) = table.by_spi.get(&spi).filter(|(p, _)| p.spec.remote == src) else {
            charge_sender(EspDrop::BadSpi);
            if let Some(held_back) = self.bad_spi_log.allow() {
                let sender = table.by_remote.get(&src);
                tracing::warn!(
                    %src,
                    spi = %spi_str(spi),
                    peer = sender.map_or("none", |p| p.spec.name.as_str()),
                    inbound_spis = ?sender.map(|p| p.inbound.iter().map(|sa| spi_str(sa.keys.spi)).collect::<Vec<_>>()),
                    held_back,
                    "ESP dropped: its SPI is no inbound SA of the sender"
                );
            }
            return None;
        };
        let opened = match lock(&sa.sa).open(esp) {
            Ok(o) => o,
            Err(reason) => {
                peer.stats.drops.bump(reason);
                return None;
            }
        };
        // The core checked that the inner packet is an IP packet of the next header's version.
        let inner = &esp[opened.inner.clone()];
        let Some(inner_src) = inner_addr(inner, Field::Source) else {
            peer.stats.drops.bump(EspDrop::Malformed);
            return None;
        };
        if !peer.accepts_inner_source(inner_src) {
            peer.stats.drops.bump(EspDrop::BadInnerSource);
            return None;
        }
        bump(&sa.packets);
        add(&sa.bytes, inner.len());
        bump(&peer.stats.rx_packets);
        add(&peer.stats.rx_bytes, inner.len());
        Some(opened.inner)
    }

    /// Opens what a raw ESP socket delivered: for IPv4 the whole packet with its outer header,
    /// for IPv6 the ESP bytes from `from`. Returns the range of `packet` holding the inner
    /// packet, or `None` if it was dropped (and counted) or is not ours.
    fn open_raw(&self, packet: &mut [u8], from: Option<IpAddr>) -> Option<Range<usize>> {
        let (src, esp) = match self.local {
            IpAddr::V4(local) => match outer_v4(packet, local) {
                Outer::Esp { src, esp } => (src, esp),
                Outer::NotOurs => return None,
                Outer::Malformed => {
                    self.device_drops.bump(EspDrop::Malformed);
                    return None;
                }
            },
            // IPv6 raw sockets deliver the payload only; binding filtered the destination.
            IpAddr::V6(_) => match from {
                Some(src) => (src, 0..packet.len()),
                None => {
                    self.device_drops.bump(EspDrop::Malformed);
                    return None;
                }
            },
        };
        let at = esp.start;
        let inner = self.open(src, &mut packet[esp])?;
        Some(at + inner.start..at + inner.end)
    }

    /// Opens one ESP-in-UDP datagram (its UDP payload) from `from`, which must be a peer's
    /// address and `port`. Returns the range of `datagram` holding the inner packet, or `None`
    /// if it was dropped (and counted: NAT-keepalives, the non-ESP marker and a wrong source
    /// port on the device, everything else as [`State::open`] does).
    fn open_udp(&self, from: SocketAddr, port: u16, datagram: &mut [u8]) -> Option<Range<usize>> {
        if from.port() != port {
            bump(&self.stats.bad_source_port);
            return None;
        }
        match udp_payload(datagram) {
            UdpPayload::NatKeepalive => {
                bump(&self.stats.nat_keepalives);
                None
            }
            UdpPayload::NonEsp => {
                bump(&self.stats.non_esp_marker);
                None
            }
            // `open` charges a short packet as malformed to the peer or the device.
            UdpPayload::Esp | UdpPayload::Malformed => self.open(from.ip(), datagram),
        }
    }
}

#[derive(Clone, Copy)]
enum Field {
    Source,
    Destination,
}

/// The source or destination address of an IP packet, if it is one.
fn inner_addr(packet: &[u8], field: Field) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 if packet.len() >= 20 => {
            let at = match field {
                Field::Source => 12,
                Field::Destination => 16,
            };
            let b: [u8; 4] = packet.get(at..at + 4)?.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(b)))
        }
        6 if packet.len() >= 40 => {
            let at = match field {
                Field::Source => 8,
                Field::Destination => 24,
            };
            let b: [u8; 16] = packet.get(at..at + 16)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// What an IPv4 raw socket delivered.
#[derive(Debug, PartialEq, Eq)]
enum Outer {
    /// ESP from `src`, at `esp` in the packet.
    Esp { src: IpAddr, esp: Range<usize> },
    /// Addressed to another of our addresses (or not ESP): not this device's business.
    NotOurs,
    /// No valid IPv4 header.
    Malformed,
}

/// Parses the outer IPv4 header that IPv4 raw sockets deliver.
fn outer_v4(packet: &[u8], local: Ipv4Addr) -> Outer {
    let Some(&first) = packet.first() else {
        return Outer::Malformed;
    };
    let ihl = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || ihl < 20 || packet.len() < ihl {
        return Outer::Malformed;
    }
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    // Linux hands raw sockets the reassembled packet with the wire's total length; take the
    // smaller of the two in case of trailing bytes.
    let end = if total >= ihl {
        total.min(packet.len())
    } else {
        packet.len()
    };
    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    if packet[9] != PROTO_ESP || dst != local {
        return Outer::NotOurs;
    }
    let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    Outer::Esp {
        src: IpAddr::V4(src),
        esp: ihl..end,
    }
}

/// The underlay socket.
enum Net {
    /// Raw ESP, IP protocol 50.
    Raw(RawEsp),
    /// ESP in UDP, bound to the underlay address and `port`, with UDP GRO.
    Udp { sock: UdpSocket, port: u16 },
}

impl Net {
    fn open(local: IpAddr, encapsulation: Encapsulation) -> Result<Self> {
        match encapsulation {
            Encapsulation::None => Ok(Self::Raw(RawEsp::bind(local)?)),
            Encapsulation::Udp { port } => {
                let at = SocketAddr::new(local, port);
                let syscall = |call: &'static str, source: io::Error| Error::Syscall {
                    call,
                    target: at.to_string(),
                    source,
                };
                let sock = UdpSocket::bind(at).map_err(|e| syscall("bind (ESP in UDP)", e))?;
                sock.set_nonblocking(true)
                    .map_err(|e| syscall("fcntl(O_NONBLOCK)", e))?;
                enc_sys::udp::enable_gro(sock.as_fd())
                    .map_err(|e| syscall("setsockopt(UDP_GRO)", e))?;
                enc_sys::sockbuf::set_buffers(
                    sock.as_fd(),
                    enc_sys::sockbuf::DATAPATH_SOCKET_BUFFER,
                )
                .map_err(|e| Error::from_sys(&at.to_string(), e))?;
                Ok(Self::Udp { sock, port })
            }
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Raw(raw) => raw.as_fd(),
            Self::Udp { sock, .. } => sock.as_fd(),
        }
    }

    /// Where ESP for the peer at `ip` goes (raw sockets take port 0: for IPv6 it means the
    /// socket's protocol).
    fn dest(&self, ip: IpAddr) -> SocketAddr {
        match self {
            Self::Raw(_) => SocketAddr::new(ip, 0),
            Self::Udp { port, .. } => SocketAddr::new(ip, *port),
        }
    }
}

/// Everything the threads share.
struct Shared {
    ifname: String,
    state: State,
    tun: File,
    net: Net,
    encapsulation: Encapsulation,
    stop: AtomicBool,
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stop.load(Relaxed)
    }
}

/// Userspace ESP (RFC 4303, AES-256-GCM per RFC 4106) on a TUN interface and a raw ESP socket
/// or (RFC 3948) a UDP socket.
///
/// `start` creates the TUN interface (no addresses, MTU, link state or routes: the caller sets
/// those) and a raw socket bound to the underlay address (or a UDP socket bound to it and the
/// encapsulation port), in the calling thread's network namespace. Dropping the device, or [`UserspaceEsp::shutdown`], stops its threads within about
/// 250 ms and closes the TUN fd, which removes the interface.
///
/// [`IpsecBackend::upsert_peer`] rules:
/// - an unchanged spec is a no-op;
/// - unchanged outbound keys (SPI, key, salt) keep the outbound SA and its sequence number;
///   new ones start a new SA at sequence number 1, and the next packet uses it;
///   `older_outbound` is ignored (packets come by route, whatever their mark's epoch);
/// - inbound SAs are matched by SPI and keys: listed ones are kept with their replay windows
///   and counts, new ones added, unlisted ones removed (the same SPI with a new key is a new
///   SA);
/// - the change is atomic for the packet path: a packet is sealed or opened either wholly
///   before or wholly after it. Each step of a key rotation (prepare: add an inbound SA;
///   commit: switch outbound; retire: remove an inbound SA) therefore loses no packet;
/// - per-peer counters (`tx_*`, `rx_*`, drops) survive every change except `delete_peer`;
///   `out_seq` is the current outbound SA's, so it restarts when outbound switches;
/// - an inbound SPI, or an exact `remote_cidrs` prefix, that another peer holds is
///   [`Error::Invalid`] naming it and both peers; so are a `local` other than the device's, a
///   `remote` of another family, no `remote_cidrs`, and reserved SPIs (below 256);
/// - with an SA log, every new SA is recorded (outbound local -> remote, inbound
///   remote -> local) before the change takes effect; if recording fails nothing changes.
///
/// Input drops are charged to the peer owning the SA; when the SPI is unknown or belongs to
/// another peer's SA, to the peer whose `remote` sent the packet; otherwise to the device
/// ([`UserspaceEsp::device_drops`]).
pub struct UserspaceEsp {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl fmt::Debug for UserspaceEsp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserspaceEsp")
            .field("ifname", &self.shared.ifname)
            .field("local", &self.shared.state.local)
            .field("encapsulation", &self.shared.encapsulation)
            .finish_non_exhaustive()
    }
}

impl UserspaceEsp {
    /// Opens the raw socket, the SA log (if configured) and the TUN interface, and starts the
    /// packet threads.
    pub fn start(cfg: UserspaceConfig) -> Result<Self> {
        let UserspaceConfig {
            ifname,
            local,
            replay_window,
            sa_log,
            encapsulation,
        } = cfg;
        enc_sys::tun::validate_ifname(&ifname).map_err(|e| Error::from_sys(&ifname, e))?;
        if local.is_unspecified() || local.is_multicast() {
            return Err(invalid(
                "local",
                local,
                "the raw socket needs one unicast underlay address",
            ));
        }
        if !(MIN_WINDOW..=MAX_WINDOW).contains(&replay_window) {
            return Err(invalid(
                "replay_window",
                replay_window,
                format!("must be {MIN_WINDOW}..={MAX_WINDOW} packets"),
            ));
        }
        if encapsulation == (Encapsulation::Udp { port: 0 }) {
            return Err(invalid(
                "encapsulation",
                "udp port 0",
                "ESP in UDP needs a fixed port at both ends (4500)",
            ));
        }
        let sa_log = sa_log.as_deref().map(SaLog::open).transpose()?;
        let net = Net::open(local, encapsulation)?;
        let tun =
            enc_sys::tun::open_with_offloads(&ifname).map_err(|e| Error::from_sys(&ifname, e))?;
        let shared = Arc::new(Shared {
            ifname,
            state: State::new(local, replay_window, sa_log),
            tun,
            net,
            encapsulation,
            stop: AtomicBool::new(false),
        });
        let mut dev = Self {
            shared,
            threads: Vec::with_capacity(2),
        };
        // On failure `dev` is dropped, which stops a thread already running.
        dev.spawn("tun", tun_loop)?;
        dev.spawn("net", net_loop)?;
        tracing::info!(
            ifname = %dev.shared.ifname,
            local = %local,
            replay_window,
            encapsulation = %encapsulation,
            "userspace ESP device started"
        );
        Ok(dev)
    }

    fn spawn(&mut self, role: &str, f: fn(&Shared)) -> Result<()> {
        let name = format!("esp-{role}-{}", self.shared.ifname);
        let shared = Arc::clone(&self.shared);
        let handle = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || f(&shared))
            .map_err(|source| Error::Syscall {
                call: "spawn thread",
                target: name,
                source,
            })?;
        self.threads.push(handle);
        Ok(())
    }

    /// Stops the threads and removes the interface (the same as dropping the device).
    pub fn shutdown(self) {
        drop(self);
    }

    /// The underlay address the raw socket is bound to.
    pub fn local(&self) -> IpAddr {
        self.shared.state.local
    }

    /// How ESP travels on the underlay.
    pub fn encapsulation(&self) -> Encapsulation {
        self.shared.encapsulation
    }

    /// Input drops not attributable to a peer (ESP from senders that are no peer's `remote`),
    /// by reason, every reason listed.
    pub fn device_drops(&self) -> Vec<(EspDrop, u64)> {
        self.shared.state.device_drops.snapshot()
    }

    /// Device-wide counters of the packet path.
    pub fn device_counters(&self) -> DeviceCounters {
        self.shared.state.stats.snapshot()
    }
}

impl Drop for UserspaceEsp {
    fn drop(&mut self) {
        self.shared.stop.store(true, Relaxed);
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::warn!(ifname = %self.shared.ifname, "a userspace ESP thread panicked");
            }
        }
        tracing::info!(ifname = %self.shared.ifname, "userspace ESP device stopped");
        // The last Arc<Shared> goes with `self`: the TUN fd closes and the interface goes away.
    }
}

impl IpsecBackend for UserspaceEsp {
    fn kind(&self) -> IpsecKind {
        IpsecKind::Userspace
    }

    fn ifname(&self) -> Option<&str> {
        Some(&self.shared.ifname)
    }

    fn upsert_peer(&self, spec: &IpsecPeerSpec) -> Result<()> {
        self.shared.state.upsert(spec)
    }

    fn delete_peer(&self, peer_id: u16) -> Result<()> {
        self.shared.state.delete(peer_id);
        Ok(())
    }

    fn peers(&self) -> Result<Vec<IpsecPeerSnapshot>> {
        Ok(self.shared.state.peers())
    }

    /// [`DeviceCounters::by_reason`], then [`Self::device_drops`] by [`EspDrop::label`]: 13
    /// reasons, zeros included.
    fn device_drop_counts(&self) -> Vec<(&'static str, u64)> {
        self.shared.state.device_drop_counts()
    }
}

/// Whether a failed read or write is just "nothing more now" (or a signal).
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// Sends what the batch holds (no lock is held here) and counts what the kernel refused.
fn flush(sh: &Shared, batch: &mut SendBatch) {
    if batch.is_empty() {
        return;
    }
    let sent = batch.flush(sh.net.fd());
    add(&sh.state.stats.send_errors, sent.failed);
    if sent.gso_disabled {
        tracing::warn!(
            ifname = %sh.ifname,
            "the kernel refused UDP GSO on the ESP-in-UDP socket (EIO); sending one datagram \
             per message from now on"
        );
    }
}

/// TUN -> underlay socket: seal what the kernel routed into the interface, straight into the
/// send batch, and send the batch when the interface runs dry or the batch is full.
fn tun_loop(sh: &Shared) {
    let st = &sh.state;
    let mut read = vec![0u8; VNET_HDR_LEN + MAX_PACKET];
    let mut seg = vec![0u8; MAX_PACKET];
    let gso = matches!(sh.net, Net::Udp { .. });
    let mut batch = SendBatch::new(SEND_MSGS, SEND_BYTES, gso);
    let mut tun = &sh.tun;
    while !sh.stopped() {
        match enc_sys::poll::wait_readable(sh.tun.as_fd(), TICK) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(_) => {
                bump(&st.stats.tun_errors);
                std::thread::sleep(TICK);
                continue;
            }
        }
        for _ in 0..BATCH {
            let n = match tun.read(&mut read) {
                Ok(n) => n,
                Err(e) if is_transient(&e) => break,
                Err(_) => {
                    bump(&st.stats.tun_errors);
                    break;
                }
            };
            let split = offload::split(&mut read[..n], &mut seg, |inner| {
                if !batch.has_room(inner.len() + SEAL_SLACK) {
                    flush(sh, &mut batch);
                }
                batch.push(|out| st.seal_append(inner, out).map(|ip| sh.net.dest(ip)));
            });
            if split.is_err() {
                bump(&st.stats.tun_errors);
            }
        }
        flush(sh, &mut batch);
    }
}

/// Underlay socket -> TUN: open ESP sent to our underlay address, received in batches, and
/// coalesce what it carries into TUN writes. Also logs the device counters now and then.
fn net_loop(sh: &Shared) {
    let st = &sh.state;
    let mut rx = match sh.net {
        Net::Raw(_) => RecvBatch::new(RECV_MSGS_RAW, MAX_PACKET),
        Net::Udp { .. } => RecvBatch::new(RECV_MSGS_UDP, MAX_PACKET),
    };
    let mut gro = Coalescer::new();
    let mut tun = &sh.tun;
    let mut write = |b: &[u8]| {
        if tun.write(b).is_err() {
            bump(&st.stats.tun_errors);
        }
    };
    let mut last_log = Instant::now();
    let mut logged = (DeviceCounters::default(), st.device_drops.snapshot());
    while !sh.stopped() {
        if last_log.elapsed() >= LOG_INTERVAL {
            last_log = Instant::now();
            let now = (st.stats.snapshot(), st.device_drops.snapshot());
            if now != logged {
                tracing::debug!(
                    ifname = %sh.ifname,
                    counters = ?now.0,
                    unattributed_drops = ?now.1,
                    "userspace ESP device counters"
                );
                logged = now;
            }
        }
        match enc_sys::poll::wait_readable(sh.net.fd(), TICK) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(_) => {
                bump(&st.stats.recv_errors);
                std::thread::sleep(TICK);
                continue;
            }
        }
        for _ in 0..BATCH / 16 {
            let n = match rx.recv(sh.net.fd()) {
                Ok(n) => n,
                Err(e) if is_transient(&e) => break,
                Err(_) => {
                    // Usually an ICMP error queued on the socket; reading it cleared it.
                    bump(&st.stats.recv_errors);
                    continue;
                }
            };
            for i in 0..n {
                let Some(m) = rx.message(i) else { break };
                if m.truncated {
                    st.device_drops.bump(EspDrop::Malformed);
                    continue;
                }
                match &sh.net {
                    Net::Raw(_) => {
                        let from = m.from.map(|a| a.ip());
                        if let Some(inner) = st.open_raw(m.data, from) {
                            gro.push(&m.data[inner], &mut write);
                        }
                    }
                    Net::Udp { port, .. } => {
                        let Some(from) = m.from else {
                            st.device_drops.bump(EspDrop::Malformed);
                            continue;
                        };
                        // One GRO message holds datagrams of one flow (one source address
                        // and port), `segment` bytes each but the last.
                        for datagram in m.data.chunks_mut(m.segment) {
                            if let Some(inner) = st.open_udp(from, *port, datagram) {
                                gro.push(&datagram[inner], &mut write);
                            }
                        }
                    }
                }
            }
        }
        gro.flush(&mut write);
    }
}

#[cfg(test)]
mod tests;
