//! Make-before-break noise state of one boringtun peer: up to two generations of `Tunn`.
//!
//! A generation is bound to (our static key, the peer's static key, preshared key). A change of
//! any of them (or of the keepalive) cannot be applied to a running `Tunn`, and a new `Tunn` has
//! no session until a handshake under the new keys completes, which needs the peer to have
//! switched too. So a change adds a generation instead of replacing one:
//! - `current` holds the newest keys. It starts a handshake at once.
//! - `previous` keeps the old keys' session. It sends until `current` has a session, decrypts
//!   what arrives for its session index, and is retired [`PREVIOUS_GRACE`] after `current` got a
//!   session, at the latest [`REJECT_AFTER_TIME`] after the change.
//! - `draining` holds up to [`MAX_DRAINING`] generations that a newer change pushed out of
//!   `previous` while they still had a session. They only open data messages for their session
//!   index (no timers, no handshakes, nothing sent) and go once none arrived for
//!   [`DRAIN_QUIET`], at the latest [`DRAIN_MAX`] after they were pushed out. Rotations can
//!   follow each other faster than a starved receiver drains its socket: a userspace device
//!   under emulation has been seen seconds behind, and the packets the peer sealed under the
//!   generation before last must still open.
//!
//! Each generation has its own 24-bit session index, so responses, cookies and data find their
//! generation by receiver index. An initiation shows which of our static keys it was sent to and
//! the sender's static key ([`crate::keyring`]) but not the preshared key: it goes to the
//! generation with those static keys, `current` if both have them (a preshared-key-only change).
//! So while the two ends roll their static keys a few seconds apart, a re-handshake of the
//! peer's old generation is answered by our `previous`.
//!
//! No I/O and no OS clock here: callers pass `now` and an [`Output`] (boringtun's timers inside
//! `Tunn` still read the clock).

use std::mem;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::{Tunn, TunnResult};

use crate::keys::PublicKey;

/// How long `previous` outlives the moment `current` got a session. The peer has switched by
/// then, so only stragglers and the peer's last packets before its own switch still use it.
pub(crate) const PREVIOUS_GRACE: Duration = Duration::from_secs(30);
/// WireGuard's REJECT_AFTER_TIME: no session outlives it, so no `previous` outlives a change by more.
pub(crate) const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
/// A draining generation goes once no data message opened under it for this long.
pub(crate) const DRAIN_QUIET: Duration = Duration::from_secs(2);
/// The longest a draining generation is kept, however busy.
pub(crate) const DRAIN_MAX: Duration = Duration::from_secs(60);
/// Most draining generations of one peer; a change beyond drops the oldest.
pub(crate) const MAX_DRAINING: usize = 2;
/// WireGuard's REKEY_TIMEOUT: boringtun retries an unanswered initiation this often.
const REKEY_TIMEOUT: Duration = Duration::from_secs(5);
/// Caps the spacing of paced retries at `REKEY_TIMEOUT << 4` (80 s).
const MAX_RETRY_SHIFT: u32 = 4;
/// Tolerance between boringtun's retry clock and ours (timers run every 250 ms).
const RETRY_SLACK: Duration = Duration::from_secs(1);
/// Least spacing of the keepalives that show the peer our `current` session (see `nudge`).
const NUDGE_INTERVAL: Duration = Duration::from_secs(1);
/// Size of a handshake initiation.
const HANDSHAKE_INIT_LEN: usize = 148;
/// Size of a handshake response.
const HANDSHAKE_RESPONSE_LEN: usize = 92;

/// Why a datagram or packet went nowhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Discard {
    /// The receiver index matches no generation of the peer (e.g. a retired one).
    UnknownIndex,
    /// A handshake initiation for static keys that no generation of the peer has.
    UnknownKeys,
    /// The noise layer rejected an incoming datagram (bad tag, replay, wrong key, ...).
    Invalid,
    /// The noise layer failed to encapsulate or to run timers.
    Noise,
    /// A handshake response to an initiation that a newer one of the same generation replaced
    /// (see [`Generation::last_init`]).
    Stale,
}

/// Where a peer's noise output goes: the device sends and writes it, tests collect it.
pub(crate) trait Output {
    /// A datagram for the peer.
    fn network(&mut self, datagram: &[u8]);
    /// A decrypted IP packet from the peer, with its inner source address.
    fn tunnel(&mut self, packet: &[u8], src: IpAddr);
    /// Something was dropped.
    fn discard(&mut self, why: Discard);
}

/// The static keys of a generation's handshakes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct StaticKeys {
    /// Ours (one of the device's keys).
    pub(crate) local: PublicKey,
    /// The peer's.
    pub(crate) remote: PublicKey,
}

/// Which generation an incoming message is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// A handshake initiation sent to our key `local` by the peer's `remote`: the generation
    /// with these keys, `current` if both have them.
    Initiation(StaticKeys),
    /// A handshake response, cookie reply or data message: the generation with this 24-bit
    /// session index (boringtun puts it in the top bits of the 32-bit receiver index).
    Index(u32),
}

/// One of a peer's generations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gen {
    Current,
    Previous,
}

/// Which old generation a change keeps as `previous`: the one with a working session,
/// preferring the newer; none if neither has one. This keeps the only working session when a
/// second change comes before the first completed.
fn keep_on_change(current_has_session: bool, previous_has_session: Option<bool>) -> Option<Gen> {
    if current_has_session {
        Some(Gen::Current)
    } else if previous_has_session == Some(true) {
        Some(Gen::Previous)
    } else {
        None
    }
}

/// Which generation sends: `current` once it has a session; until then `previous` if it has one
/// (never queue behind a handshake that waits for the peer to switch); else `current`, where
/// boringtun queues the packet and starts a handshake.
fn outbound(current_ready: bool, previous_has_session: Option<bool>) -> Gen {
    if !current_ready && previous_has_session == Some(true) {
        Gen::Previous
    } else {
        Gen::Current
    }
}

/// Whether `previous` is due to go.
fn retire_previous(now: Instant, changed_at: Instant, ready_since: Option<Instant>) -> bool {
    ready_since.is_some_and(|t| now.saturating_duration_since(t) >= PREVIOUS_GRACE)
        || now.saturating_duration_since(changed_at) >= REJECT_AFTER_TIME
}

/// Whether a handshake initiation that `which`'s timers produced goes out.
fn timer_initiation(
    which: Gen,
    current_ready: bool,
    previous_carries: bool,
    pacing: &mut RetryPacing,
    now: Instant,
) -> bool {
    match which {
        // Once `current` has a session the peer runs the new keys: an old-key initiation could
        // only fail (after a preshared-key change it would also reset the peer's new
        // generation's handshake state) or renew a session about to be retired.
        Gen::Previous => !current_ready,
        // While `previous` carries the traffic nothing waits for these retries, and each one the
        // peer answers with its old key costs the peer's old generation one slot of boringtun's
        // eight-session ring: space them out so a lasting mismatch does not evict its live session.
        Gen::Current if previous_carries && !current_ready => pacing.allow(now),
        Gen::Current => true,
    }
}

/// Spacing of `current`'s handshake initiations while `previous` carries the traffic: the first
/// retry after REKEY_TIMEOUT as usual, then doubling gaps (10 s, 20 s, ... 80 s).
#[derive(Debug, Default)]
struct RetryPacing {
    sent: u32,
    last: Option<Instant>,
}

impl RetryPacing {
    fn record(&mut self, now: Instant) {
        self.sent = self.sent.saturating_add(1);
        self.last = Some(now);
    }

    /// Whether an initiation may go out now; records it if so.
    fn allow(&mut self, now: Instant) -> bool {
        if let Some(last) = self.last {
            let shift = self.sent.saturating_sub(1).min(MAX_RETRY_SHIFT);
            let gap = REKEY_TIMEOUT * (1 << shift);
            if now.saturating_duration_since(last) + RETRY_SLACK < gap {
                return false;
            }
        }
        self.record(now);
        true
    }
}

fn is_initiation(datagram: &[u8]) -> bool {
    initiation_sender(datagram).is_some()
}

/// The sender index of a handshake initiation (message type 1, 148 bytes).
fn initiation_sender(datagram: &[u8]) -> Option<u32> {
    match datagram {
        [1, 0, 0, 0, a, b, c, d, ..] if datagram.len() == HANDSHAKE_INIT_LEN => {
            Some(u32::from_le_bytes([*a, *b, *c, *d]))
        }
        _ => None,
    }
}

/// The receiver index of a handshake response (message type 2, 92 bytes).
fn response_receiver(datagram: &[u8]) -> Option<u32> {
    match datagram {
        [2, 0, 0, 0, _, _, _, _, a, b, c, d, ..] if datagram.len() == HANDSHAKE_RESPONSE_LEN => {
            Some(u32::from_le_bytes([*a, *b, *c, *d]))
        }
        _ => None,
    }
}

/// Sends what the generation's `tunn` queued while it had no session.
fn flush(generation: &mut Generation, dst: &mut [u8], out: &mut impl Output) {
    while let TunnResult::WriteToNetwork(d) = generation.tunn.decapsulate(None, &[], dst) {
        generation.sent(d, out);
    }
}

struct Generation {
    tunn: Tunn,
    /// 24-bit session index of `tunn`.
    index: u32,
    /// The static keys `tunn` was built with.
    keys: StaticKeys,
    /// Sender index of the last handshake initiation this generation put on the wire. Only a
    /// response to that one is let through: a peer drops the keys of an initiation once it
    /// takes a newer one (the kernel keeps one pending keypair per peer), so a late response
    /// to an initiation that a retry replaced would give a session whose data the peer drops.
    /// boringtun itself also accepts a response to the initiation before last; with a receiver
    /// seconds behind its socket (seen under emulation), that swapped a working session for a
    /// dead one and stalled traffic until the next handshake.
    last_init: Option<u32>,
}

impl Generation {
    fn new(tunn: Tunn, index: u32, keys: StaticKeys) -> Self {
        Self {
            tunn,
            index,
            keys,
            last_init: None,
        }
    }

    /// Whether encapsulation would use a session (rather than queue and start a handshake).
    fn has_session(&self) -> bool {
        self.tunn.time_since_last_handshake().is_some()
    }

    /// Puts `datagram`, which this generation's `tunn` produced, on the wire.
    fn sent(&mut self, datagram: &[u8], out: &mut impl Output) {
        if let Some(sender) = initiation_sender(datagram) {
            self.last_init = Some(sender);
        }
        out.network(datagram);
    }

    /// Whether `datagram` is a handshake response to an initiation other than the last one
    /// this generation sent.
    fn is_stale_response(&self, datagram: &[u8]) -> bool {
        response_receiver(datagram).is_some_and(|r| self.last_init != Some(r))
    }
}

/// A generation pushed out of `previous` that still opens what arrives for its index.
struct Draining {
    generation: Generation,
    /// When it was pushed out.
    since: Instant,
    /// When a data message last opened under it (initially `since`).
    last_rx: Instant,
}

impl Draining {
    /// Whether it is due to go.
    fn done(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_rx) >= DRAIN_QUIET
            || now.saturating_duration_since(self.since) >= DRAIN_MAX
    }
}

/// A peer's noise state: `current` and, during a key change, `previous` and the `draining`
/// generations before it (see the module docs).
pub(crate) struct Generations {
    current: Generation,
    previous: Option<Generation>,
    /// Oldest first.
    draining: Vec<Draining>,
    /// When `current` was created.
    changed_at: Instant,
    /// When `current` was first seen with a session.
    ready_since: Option<Instant>,
    /// Spacing of `current`'s retries while `previous` carries the traffic.
    pacing: RetryPacing,
    last_nudge: Option<Instant>,
}

impl Generations {
    /// A peer's first generation; `tunn` was built with `keys`.
    pub(crate) fn new(tunn: Tunn, index: u32, keys: StaticKeys, now: Instant) -> Self {
        Self {
            current: Generation::new(tunn, index, keys),
            previous: None,
            draining: Vec::new(),
            changed_at: now,
            ready_since: None,
            pacing: RetryPacing::default(),
            last_nudge: None,
        }
    }

    /// The session indices of all generations, draining ones included (to register or
    /// unregister them).
    pub(crate) fn indices(&self) -> impl Iterator<Item = u32> + use<> {
        let draining: Vec<u32> = self.draining.iter().map(|d| d.generation.index).collect();
        std::iter::once(self.current.index)
            .chain(self.previous.as_ref().map(|g| g.index))
            .chain(draining)
    }

    /// The peer's static keys of `current` and `previous`, `current` first (to route
    /// initiations; draining generations take none).
    pub(crate) fn remotes(&self) -> impl Iterator<Item = PublicKey> + use<> {
        std::iter::once(self.current.keys.remote)
            .chain(self.previous.as_ref().map(|g| g.keys.remote))
    }

    /// Our static key of the newest generation.
    pub(crate) fn local_key(&self) -> PublicKey {
        self.current.keys.local
    }

    /// How many generations the peer holds that take part in handshakes: 1, or 2 during a key
    /// change (draining ones, which only open late data, are not counted).
    pub(crate) fn count(&self) -> u8 {
        1 + u8::from(self.previous.is_some())
    }

    /// Whether the newest generation has a session.
    pub(crate) fn current_has_session(&self) -> bool {
        self.current.has_session()
    }

    /// Time since the newest generation's last handshake; `None` while it has no session.
    pub(crate) fn last_handshake(&self) -> Option<Duration> {
        self.current.tunn.time_since_last_handshake()
    }

    /// Replaces `current` with `tunn` (built with `keys`, new `index`) and starts its handshake.
    /// The old `current` becomes `previous` if it has a session, and the old `previous`, if it
    /// has one too, starts draining; otherwise the old `previous` stays if it has one. Returns
    /// the indices of the generations dropped.
    pub(crate) fn change(
        &mut self,
        tunn: Tunn,
        index: u32,
        keys: StaticKeys,
        now: Instant,
        out: &mut impl Output,
    ) -> Vec<u32> {
        let keep = keep_on_change(
            self.current.has_session(),
            self.previous.as_ref().map(Generation::has_session),
        );
        let old_current = mem::replace(&mut self.current, Generation::new(tunn, index, keys));
        let old_previous = self.previous.take();
        let mut dropped = Vec::with_capacity(2);
        match keep {
            Some(Gen::Current) => {
                self.previous = Some(old_current);
                match old_previous {
                    Some(g) if g.has_session() => {
                        if self.draining.len() == MAX_DRAINING {
                            dropped.push(self.draining.remove(0).generation.index);
                        }
                        self.draining.push(Draining {
                            generation: g,
                            since: now,
                            last_rx: now,
                        });
                    }
                    Some(g) => dropped.push(g.index),
                    None => {}
                }
            }
            Some(Gen::Previous) => {
                self.previous = old_previous;
                dropped.push(old_current.index);
            }
            None => {
                dropped.push(old_current.index);
                dropped.extend(old_previous.map(|g| g.index));
            }
        }
        self.changed_at = now;
        self.ready_since = None;
        self.pacing = RetryPacing::default();
        self.last_nudge = None;

        let mut buf = [0u8; HANDSHAKE_INIT_LEN];
        match self
            .current
            .tunn
            .format_handshake_initiation(&mut buf, false)
        {
            TunnResult::WriteToNetwork(d) => {
                self.pacing.record(now);
                self.current.sent(d, out);
            }
            TunnResult::Err(_) => out.discard(Discard::Noise),
            TunnResult::Done
            | TunnResult::WriteToTunnelV4(..)
            | TunnResult::WriteToTunnelV6(..) => {}
        }
        dropped
    }

    /// Encrypts an outbound IP packet with the generation that should send it.
    pub(crate) fn send(&mut self, packet: &[u8], dst: &mut [u8], out: &mut impl Output) {
        let previous = match (&self.ready_since, &self.previous) {
            (None, Some(p)) => Some(p.has_session()),
            _ => None,
        };
        let which = outbound(self.ready_since.is_some(), previous);
        let generation = self.generation(which);
        match generation.tunn.encapsulate(packet, dst) {
            TunnResult::WriteToNetwork(d) => generation.sent(d, out),
            TunnResult::Err(_) => out.discard(Discard::Noise),
            TunnResult::Done
            | TunnResult::WriteToTunnelV4(..)
            | TunnResult::WriteToTunnelV6(..) => {}
        }
    }

    /// Handles a datagram from the peer whose MACs the device already checked. Returns whether
    /// the noise layer accepted it.
    pub(crate) fn receive(
        &mut self,
        target: Target,
        src: IpAddr,
        datagram: &[u8],
        dst: &mut [u8],
        now: Instant,
        out: &mut impl Output,
    ) -> bool {
        let which = match target {
            Target::Initiation(k) if k == self.current.keys => Gen::Current,
            Target::Initiation(k) if self.previous.as_ref().is_some_and(|p| p.keys == k) => {
                Gen::Previous
            }
            Target::Initiation(_) => {
                out.discard(Discard::UnknownKeys);
                return false;
            }
            Target::Index(i) if i == self.current.index => Gen::Current,
            Target::Index(i) if self.previous.as_ref().is_some_and(|p| p.index == i) => {
                Gen::Previous
            }
            Target::Index(i) => match self.draining.iter().position(|d| d.generation.index == i) {
                Some(at) => return self.drain(at, src, datagram, dst, now, out),
                None => {
                    out.discard(Discard::UnknownIndex);
                    return false;
                }
            },
        };
        let generation = self.generation(which);
        if generation.is_stale_response(datagram) {
            out.discard(Discard::Stale);
            return false;
        }
        match generation.tunn.decapsulate(Some(src), datagram, dst) {
            TunnResult::Done => {}
            TunnResult::Err(_) => {
                out.discard(Discard::Invalid);
                return false;
            }
            TunnResult::WriteToNetwork(d) => {
                generation.sent(d, out);
                // boringtun contract: repeat with an empty datagram until Done to flush its queue.
                flush(generation, dst, out);
            }
            TunnResult::WriteToTunnelV4(p, ip) => out.tunnel(p, IpAddr::V4(ip)),
            TunnResult::WriteToTunnelV6(p, ip) => out.tunnel(p, IpAddr::V6(ip)),
        }
        match which {
            Gen::Current => self.observe_ready(dst, now, out),
            Gen::Previous => self.nudge(dst, now, out),
        }
        true
    }

    /// Opens a data message under the draining generation at `at`. Whatever else it would do
    /// (answer, send queued packets) is dropped: a draining generation never sends.
    fn drain(
        &mut self,
        at: usize,
        src: IpAddr,
        datagram: &[u8],
        dst: &mut [u8],
        now: Instant,
        out: &mut impl Output,
    ) -> bool {
        let d = &mut self.draining[at];
        match d.generation.tunn.decapsulate(Some(src), datagram, dst) {
            TunnResult::WriteToTunnelV4(p, ip) => out.tunnel(p, IpAddr::V4(ip)),
            TunnResult::WriteToTunnelV6(p, ip) => out.tunnel(p, IpAddr::V6(ip)),
            // A keepalive.
            TunnResult::Done => {}
            TunnResult::WriteToNetwork(_) | TunnResult::Err(_) => {
                out.discard(Discard::Invalid);
                return false;
            }
        }
        d.last_rx = now;
        self.nudge(dst, now, out);
        true
    }

    /// Runs the timers (retries, rekeys, keepalives) of `current` and `previous`, and retires
    /// `previous` and draining generations when due. Returns the retired generations' indices
    /// and keys.
    pub(crate) fn tick(
        &mut self,
        dst: &mut [u8],
        now: Instant,
        out: &mut impl Output,
    ) -> Vec<(u32, StaticKeys)> {
        let ready = self.ready_since.is_some();
        let previous_carries = self.previous.as_ref().is_some_and(Generation::has_session);
        for which in [Gen::Current, Gen::Previous] {
            let generation = match which {
                Gen::Current => &mut self.current,
                Gen::Previous => match self.previous.as_mut() {
                    Some(p) => p,
                    None => break,
                },
            };
            match generation.tunn.update_timers(dst) {
                TunnResult::WriteToNetwork(d) => {
                    // A retry held back here was never on the wire: boringtun keeps the one
                    // before it pending, and `last_init` still names that one.
                    if !is_initiation(d)
                        || timer_initiation(which, ready, previous_carries, &mut self.pacing, now)
                    {
                        generation.sent(d, out);
                    }
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) | TunnResult::Done => {}
                TunnResult::Err(_) => out.discard(Discard::Noise),
                TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
            }
        }
        self.observe_ready(dst, now, out);
        let mut retired = Vec::new();
        if self.previous.is_some() && retire_previous(now, self.changed_at, self.ready_since) {
            retired.extend(self.previous.take().map(|g| (g.index, g.keys)));
        }
        self.draining.retain(|d| {
            let done = d.done(now);
            if done {
                retired.push((d.generation.index, d.generation.keys));
            }
            !done
        });
        retired
    }

    fn generation(&mut self, which: Gen) -> &mut Generation {
        match (which, &mut self.previous) {
            (Gen::Previous, Some(p)) => p,
            _ => &mut self.current,
        }
    }

    /// Notes when `current` first has a session, and sends what it queued before.
    fn observe_ready(&mut self, dst: &mut [u8], now: Instant, out: &mut impl Output) {
        if self.ready_since.is_some() || !self.current.has_session() {
            return;
        }
        self.ready_since = Some(now);
        // A responder's session starts with the peer's first data packet, after which boringtun
        // does not flush on its own.
        flush(&mut self.current, dst, out);
    }

    /// The peer still sends under `previous` although our `current` has a session: its new
    /// generation may have missed the keepalive that completes the handshake (a responder
    /// needs one data packet before it sends). Send another, at most once per second.
    fn nudge(&mut self, dst: &mut [u8], now: Instant, out: &mut impl Output) {
        if self.ready_since.is_none()
            || self
                .last_nudge
                .is_some_and(|t| now.saturating_duration_since(t) < NUDGE_INTERVAL)
            || !self.current.has_session()
        {
            return;
        }
        self.last_nudge = Some(now);
        if let TunnResult::WriteToNetwork(d) = self.current.tunn.encapsulate(&[], dst) {
            self.current.sent(d, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use boringtun::noise::Packet;

    use crate::keyring::{KeyRing, Rejected};
    use crate::keys::{PresharedKey, PrivateKey};

    use super::*;

    const A_IP: [u8; 4] = [10, 0, 0, 1];
    const B_IP: [u8; 4] = [10, 0, 0, 2];
    const UNDERLAY: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

    #[derive(Default)]
    struct Collect {
        net: Vec<Vec<u8>>,
        tun: Vec<Vec<u8>>,
        discards: Vec<Discard>,
    }

    impl Output for Collect {
        fn network(&mut self, datagram: &[u8]) {
            self.net.push(datagram.to_vec());
        }
        fn tunnel(&mut self, packet: &[u8], _src: IpAddr) {
            self.tun.push(packet.to_vec());
        }
        fn discard(&mut self, why: Discard) {
            self.discards.push(why);
        }
    }

    /// The private key with seed `b`.
    fn key(b: u8) -> PrivateKey {
        PrivateKey::from_bytes([b; 32])
    }

    /// Static keys from the seeds of our private key and the peer's.
    fn keys(local: u8, remote: u8) -> StaticKeys {
        StaticKeys {
            local: key(local).public_key(),
            remote: key(remote).public_key(),
        }
    }

    /// One end: its device keys and generations, plus what reached its tunnel.
    struct Side {
        gens: Generations,
        /// The device's keys, which route incoming messages as the device does.
        ring: KeyRing,
        next_index: u32,
        ip: [u8; 4],
        peer_ip: [u8; 4],
        /// Sequence numbers of the data packets that reached the tunnel.
        got: Vec<u32>,
        discards: Vec<Discard>,
    }

    impl Side {
        fn tunn(&mut self, keys: StaticKeys, psk: u8) -> (Tunn, u32) {
            self.next_index += 1;
            let tunn = self
                .ring
                .get(&keys.local)
                .expect("local key not in the ring")
                .tunn(
                    &keys.remote,
                    Some(&PresharedKey::from_bytes([psk; 32])),
                    None,
                    self.next_index,
                );
            (tunn, self.next_index)
        }

        fn absorb(&mut self, out: Collect) -> Vec<Vec<u8>> {
            for p in out.tun {
                self.got
                    .push(u32::from_be_bytes(p[20..24].try_into().unwrap()));
            }
            self.discards.extend(out.discards);
            out.net
        }

        /// A new preshared key, same static keys.
        fn change(&mut self, psk: u8, now: Instant) -> (Vec<Vec<u8>>, Vec<u32>) {
            self.change_keys(self.gens.current.keys, psk, now)
        }

        /// New static keys and preshared key.
        fn change_keys(
            &mut self,
            keys: StaticKeys,
            psk: u8,
            now: Instant,
        ) -> (Vec<Vec<u8>>, Vec<u32>) {
            let (tunn, index) = self.tunn(keys, psk);
            let mut out = Collect::default();
            let dropped = self.gens.change(tunn, index, keys, now, &mut out);
            (self.absorb(out), dropped)
        }

        fn send(&mut self, seq: u32) -> Vec<Vec<u8>> {
            let mut packet = vec![0u8; 24];
            packet[0] = 0x45;
            packet[2..4].copy_from_slice(&24u16.to_be_bytes());
            packet[8] = 64;
            packet[9] = 17;
            packet[12..16].copy_from_slice(&self.ip);
            packet[16..20].copy_from_slice(&self.peer_ip);
            packet[20..24].copy_from_slice(&seq.to_be_bytes());
            let mut dst = vec![0u8; 2048];
            let mut out = Collect::default();
            self.gens.send(&packet, &mut dst, &mut out);
            self.absorb(out)
        }

        /// Routes a datagram as the device does: MAC1 and initiation keys by the key ring,
        /// then the generation by keys or index. The ring's rejections count as `Invalid`.
        fn receive(&mut self, datagram: &[u8], now: Instant) -> Vec<Vec<u8>> {
            let mut dst = vec![0u8; 2048];
            let target = match self.ring.verify(UNDERLAY, datagram, &mut dst) {
                Ok(t) => t,
                Err(Rejected::Cookie(n)) => return vec![dst[..n].to_vec()],
                Err(Rejected::Invalid) => {
                    self.discards.push(Discard::Invalid);
                    return Vec::new();
                }
            };
            let mut out = Collect::default();
            self.gens
                .receive(target, UNDERLAY, datagram, &mut dst, now, &mut out);
            self.absorb(out)
        }

        fn tick(&mut self, now: Instant) -> (Vec<Vec<u8>>, Vec<u32>) {
            let mut dst = vec![0u8; 2048];
            let mut out = Collect::default();
            let retired = self.gens.tick(&mut dst, now, &mut out);
            (
                self.absorb(out),
                retired.into_iter().map(|(index, _)| index).collect(),
            )
        }
    }

    fn side(me: u8, peer: u8, psk: u8, now: Instant) -> Side {
        let ring = KeyRing::new(&key(me), 1000);
        let index = u32::from(me) << 12;
        let keys = keys(me, peer);
        let tunn = ring.primary().tunn(
            &keys.remote,
            Some(&PresharedKey::from_bytes([psk; 32])),
            None,
            index,
        );
        Side {
            gens: Generations::new(tunn, index, keys, now),
            ring,
            next_index: index,
            ip: if me == 1 { A_IP } else { B_IP },
            peer_ip: if me == 1 { B_IP } else { A_IP },
            got: Vec::new(),
            discards: Vec::new(),
        }
    }

    /// Delivers datagrams both ways until neither side has more to say.
    fn exchange(
        a: &mut Side,
        b: &mut Side,
        mut to_a: Vec<Vec<u8>>,
        mut to_b: Vec<Vec<u8>>,
        now: Instant,
    ) {
        for _ in 0..20 {
            if to_a.is_empty() && to_b.is_empty() {
                return;
            }
            for d in mem::take(&mut to_b) {
                to_a.extend(b.receive(&d, now));
            }
            for d in mem::take(&mut to_a) {
                to_b.extend(a.receive(&d, now));
            }
        }
        panic!("the two sides never went quiet");
    }

    /// A and B with an established session under `psk`.
    fn pair(psk: u8, now: Instant) -> (Side, Side) {
        let (mut a, mut b) = (side(1, 2, psk, now), side(2, 1, psk, now));
        // The first packet is queued and starts the handshake; it goes out once A has a session.
        let init = a.send(0);
        exchange(&mut a, &mut b, Vec::new(), init, now);
        assert_eq!(b.got, vec![0]);
        b.got.clear();
        assert!(a.gens.current_has_session() && b.gens.current_has_session());
        (a, b)
    }

    /// Sends `seqs` both ways, one at a time, and checks that each one arrives.
    fn traffic(a: &mut Side, b: &mut Side, seqs: std::ops::Range<u32>, now: Instant) {
        for seq in seqs {
            let to_b = a.send(seq);
            let to_a = b.send(seq);
            exchange(a, b, to_a, to_b, now);
            assert_eq!(a.got.pop(), Some(seq), "B -> A lost {seq}");
            assert_eq!(b.got.pop(), Some(seq), "A -> B lost {seq}");
        }
    }

    /// The receiver index (its 24-bit part) of the next data packet `from` sends.
    fn sends_to(from: &mut Side, seq: u32) -> u32 {
        let d = from.send(seq);
        assert_eq!(d.len(), 1);
        match Tunn::parse_incoming_packet(&d[0]).unwrap() {
            Packet::PacketData(p) => p.receiver_idx >> 8,
            other => panic!("not data: {other:?}"),
        }
    }

    #[test]
    fn staggered_change_loses_nothing_and_moves_to_the_new_key() {
        let now = Instant::now();
        let (mut a, mut b) = pair(1, now);
        let (a_old, b_old) = (a.gens.current.index, b.gens.current.index);
        traffic(&mut a, &mut b, 1..5, now);

        // A switches first; B still answers A's initiation with the old key, which A rejects.
        let (init, dropped) = a.change(2, now);
        assert!(dropped.is_empty());
        assert_eq!(init.len(), 1);
        assert!(is_initiation(&init[0]));
        assert_eq!(a.gens.count(), 2);
        // B encrypted this under the old session before anything happened; it arrives late.
        let late = b.send(100);
        exchange(&mut a, &mut b, Vec::new(), init, now);
        assert_eq!(a.discards, vec![Discard::Invalid]);
        assert!(!a.gens.current_has_session());
        assert_eq!(a.gens.last_handshake(), None);
        // Meanwhile the old session carries traffic both ways.
        traffic(&mut a, &mut b, 5..10, now);
        assert_eq!(sends_to(&mut a, 10), b_old);

        // B switches: its new generation's handshake reaches A's new one and succeeds.
        let (init, dropped) = b.change(2, now);
        assert!(dropped.is_empty());
        exchange(&mut a, &mut b, init, Vec::new(), now);
        assert!(a.gens.current_has_session() && b.gens.current_has_session());
        assert!(a.gens.last_handshake().is_some());
        assert_eq!((a.gens.count(), b.gens.count()), (2, 2));
        assert_eq!(sends_to(&mut a, 11), b.gens.current.index);
        assert_eq!(sends_to(&mut b, 11), a.gens.current.index);

        // The late packet still decrypts under A's previous generation.
        exchange(&mut a, &mut b, late, Vec::new(), now);
        assert_eq!(a.got, vec![100]);
        a.got.clear();
        traffic(&mut a, &mut b, 12..20, now);

        // Previous generations go after the grace period, not before.
        assert_eq!(a.tick(now + PREVIOUS_GRACE / 2).1, Vec::<u32>::new());
        let (_, retired) = a.tick(now + PREVIOUS_GRACE + Duration::from_secs(1));
        assert_eq!(retired, vec![a_old]);
        assert_eq!(a.gens.count(), 1);
        assert_eq!(
            a.gens.indices().collect::<Vec<_>>(),
            vec![a.gens.current.index]
        );
        let (_, retired) = b.tick(now + PREVIOUS_GRACE + Duration::from_secs(1));
        assert_eq!(retired, vec![b_old]);
        traffic(&mut a, &mut b, 20..25, now);

        // A packet for a retired index is dropped as unknown.
        let mut stale = a.send(25);
        stale[0][4..8].copy_from_slice(&(b_old << 8 | 1).to_le_bytes());
        exchange(&mut a, &mut b, Vec::new(), stale, now);
        assert_eq!(b.discards.last(), Some(&Discard::UnknownIndex));
    }

    #[test]
    fn simultaneous_change_succeeds() {
        let now = Instant::now();
        let (mut a, mut b) = pair(1, now);
        let (to_b, _) = a.change(2, now);
        let (to_a, _) = b.change(2, now);
        exchange(&mut a, &mut b, to_a, to_b, now);
        assert!(a.gens.current_has_session() && b.gens.current_has_session());
        traffic(&mut a, &mut b, 0..5, now);
        assert_eq!(sends_to(&mut a, 5), b.gens.current.index);
    }

    #[test]
    fn second_change_before_the_first_completes_keeps_the_working_generation() {
        let now = Instant::now();
        let (mut a, mut b) = pair(1, now);
        let a_old = a.gens.current.index;

        let (init, _) = a.change(2, now);
        let a_second = a.gens.current.index;
        exchange(&mut a, &mut b, Vec::new(), init, now);
        assert!(!a.gens.current_has_session());

        // The generation without a session goes; the one with the working session stays.
        let (init, dropped) = a.change(3, now);
        assert_eq!(dropped, vec![a_second]);
        assert_eq!(a.gens.count(), 2);
        assert_eq!(a.gens.previous.as_ref().map(|p| p.index), Some(a_old));
        exchange(&mut a, &mut b, Vec::new(), init, now);
        traffic(&mut a, &mut b, 0..5, now);

        // B catches up with the latest key.
        let (init, _) = b.change(3, now);
        exchange(&mut a, &mut b, init, Vec::new(), now);
        assert!(a.gens.current_has_session() && b.gens.current_has_session());
        traffic(&mut a, &mut b, 5..10, now);

        // A third change with an established `current` keeps it and lets the oldest drain:
        // it goes once nothing arrived under it for `DRAIN_QUIET`.
        let kept = a.gens.current.index;
        let (_, dropped) = a.change(4, now);
        assert_eq!(dropped, Vec::<u32>::new());
        assert_eq!(a.gens.previous.as_ref().map(|p| p.index), Some(kept));
        assert_eq!(a.gens.indices().count(), 3);
        traffic(&mut a, &mut b, 10..15, now);
        assert_eq!(a.tick(now + DRAIN_QUIET).1, vec![a_old]);
        assert_eq!(a.gens.indices().count(), 2);
    }

    /// Two changes a few seconds apart, and a receiver that opens the peer's packets long after
    /// they were sent: what the peer sealed under the generation before last still opens, for
    /// as long as such packets keep arriving; then the generation goes, and after that its
    /// packets are unknown.
    #[test]
    fn packets_under_the_generation_before_last_open_while_they_keep_coming() {
        let now = Instant::now();
        let (mut a, mut b) = pair(1, now);
        let a_first = a.gens.current.index;
        // Sealed by B under the first generation, still queued at A.
        let late: Vec<Vec<u8>> = (100..110).flat_map(|seq| b.send(seq)).collect();
        for psk in [2, 3] {
            let (init, _) = a.change(psk, now);
            exchange(&mut a, &mut b, Vec::new(), init, now);
            let (init, _) = b.change(psk, now);
            exchange(&mut a, &mut b, init, Vec::new(), now);
            assert!(a.gens.current_has_session() && b.gens.current_has_session());
            let base = u32::from(psk) * 10;
            traffic(&mut a, &mut b, base..base + 5, now);
        }
        assert_eq!(a.gens.indices().count(), 3);
        assert!(a.gens.indices().any(|i| i == a_first));
        // A opens one late packet every second: the first generation stays, past any number
        // of quiet periods measured from the change.
        let step = Duration::from_secs(1);
        a.discards.clear();
        let mut t = now;
        for d in &late[..8] {
            t += step;
            assert_eq!(
                a.tick(t).1,
                Vec::<u32>::new(),
                "at {:?}, got {:?}, discards {:?}",
                t - now,
                a.got,
                a.discards
            );
            exchange(&mut a, &mut b, vec![d.clone()], Vec::new(), t);
        }
        assert_eq!(a.got, (100..108).collect::<Vec<_>>());
        a.got.clear();
        // Quiet for `DRAIN_QUIET`: retired, and its packets are unknown from then on.
        assert_eq!(a.tick(t + DRAIN_QUIET).1, vec![a_first]);
        exchange(&mut a, &mut b, late[8..].to_vec(), Vec::new(), t);
        assert!(a.got.is_empty());
        assert_eq!(a.discards, vec![Discard::UnknownIndex; 2]);
        // The draining generation never sent anything, and the pair still works.
        traffic(&mut a, &mut b, 40..45, t);
    }

    #[test]
    fn draining_generations_are_capped_and_time_limited() {
        let now = Instant::now();
        let (mut a, mut b) = pair(1, now);
        let mut firsts = vec![a.gens.current.index];
        for psk in 2..=5 {
            let (init, _) = a.change(psk, now);
            exchange(&mut a, &mut b, Vec::new(), init, now);
            let (init, _) = b.change(psk, now);
            exchange(&mut a, &mut b, init, Vec::new(), now);
            traffic(&mut a, &mut b, 0..2, now);
            firsts.push(a.gens.current.index);
        }
        // current, previous and the two newest draining ones; the oldest was dropped.
        assert_eq!(a.gens.indices().count(), 2 + MAX_DRAINING);
        assert!(!a.gens.indices().any(|i| i == firsts[0]));
        // However busy, a draining generation goes after `DRAIN_MAX`.
        for d in &mut a.gens.draining {
            d.last_rx = now + DRAIN_MAX;
        }
        let (_, retired) = a.tick(now + DRAIN_MAX);
        // (`previous` goes too, its grace period being over.)
        assert_eq!(retired, vec![firsts[3], firsts[1], firsts[2]]);
    }

    #[test]
    fn one_sided_change_with_the_same_key_completes_at_once() {
        // A keepalive change: a new generation, but the peer already has the key.
        let now = Instant::now();
        let (mut a, mut b) = pair(1, now);
        let late = b.send(100);
        let (init, _) = a.change(1, now);
        exchange(&mut a, &mut b, Vec::new(), init, now);
        assert!(a.gens.current_has_session());
        assert_eq!((a.gens.count(), b.gens.count()), (2, 1));
        traffic(&mut a, &mut b, 0..5, now);
        assert_eq!(sends_to(&mut b, 5), a.gens.current.index);
        exchange(&mut a, &mut b, late, Vec::new(), now);
        assert_eq!(a.got, vec![100]);
        assert!(a.discards.is_empty() && b.discards.is_empty());
    }

    #[test]
    fn change_without_any_session_replaces_the_generation() {
        let now = Instant::now();
        let mut a = side(1, 2, 1, now);
        let old = a.gens.current.index;
        let (init, dropped) = a.change(2, now);
        assert_eq!(dropped, vec![old]);
        assert_eq!(a.gens.count(), 1);
        assert_eq!(init.len(), 1);
    }

    #[test]
    fn mismatch_keeps_the_previous_generation_until_reject_after_time() {
        let now = Instant::now();
        let (mut a, mut b) = pair(1, now);
        let (init, _) = a.change(2, now);
        exchange(&mut a, &mut b, Vec::new(), init, now);
        traffic(&mut a, &mut b, 0..5, now);
        assert_eq!(a.tick(now + PREVIOUS_GRACE * 2).1, Vec::<u32>::new());
        assert_eq!(a.gens.count(), 2);
        let (_, retired) = a.tick(now + REJECT_AFTER_TIME);
        assert_eq!(retired.len(), 1);
        assert_eq!(a.gens.count(), 1);
    }

    /// When B rolls its keys after A, in the static-key test below.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Lag {
        /// B switches while A's initiation is in flight: the two initiations cross.
        Crossing,
        /// A's initiation reaches B after B added its new key but before it switched: B has no
        /// generation with those keys and drops it.
        AfterArrival,
        /// A's initiation reaches B before B even holds its new key: MAC1 fails.
        BeforeKeyAdded,
    }

    /// Both ends roll their static keys and the preshared key, (a, b, 1) -> (a', b', 2), B up to
    /// a round trip after A (or later): no packet is lost, packets in flight under the old keys
    /// still arrive, and both converge on the new keys and then drop the old generation.
    #[test]
    fn staggered_static_key_change_loses_nothing_and_converges() {
        for lag in [Lag::Crossing, Lag::AfterArrival, Lag::BeforeKeyAdded] {
            let now = Instant::now();
            let (mut a, mut b) = pair(1, now);
            let (a_old, b_old) = (a.gens.current.index, b.gens.current.index);
            traffic(&mut a, &mut b, 1..5, now);

            a.ring.add(&key(11));
            if lag != Lag::BeforeKeyAdded {
                b.ring.add(&key(12));
            }
            let (init, dropped) = a.change_keys(keys(11, 12), 2, now);
            assert!(dropped.is_empty(), "{lag:?}");
            assert_eq!((init.len(), a.gens.count()), (1, 2), "{lag:?}");
            assert_eq!(a.gens.local_key(), key(11).public_key());
            // Encrypted under the old keys now, delivered after both ends switched.
            let late_to_a = b.send(100);
            let late_to_b = a.send(100);
            traffic(&mut a, &mut b, 5..10, now);
            let to_b = if lag == Lag::Crossing {
                init
            } else {
                exchange(&mut a, &mut b, Vec::new(), init, now);
                let why = match lag {
                    Lag::AfterArrival => Discard::UnknownKeys,
                    _ => Discard::Invalid,
                };
                assert_eq!(b.discards, vec![why], "{lag:?}");
                b.discards.clear();
                traffic(&mut a, &mut b, 10..15, now);
                b.ring.add(&key(12));
                Vec::new()
            };
            let (init, dropped) = b.change_keys(keys(12, 11), 2, now);
            assert!(dropped.is_empty(), "{lag:?}");
            exchange(&mut a, &mut b, init, to_b, now);
            assert!(
                a.gens.current_has_session() && b.gens.current_has_session(),
                "{lag:?}"
            );
            traffic(&mut a, &mut b, 15..20, now);
            assert_eq!(sends_to(&mut a, 20), b.gens.current.index, "{lag:?}");
            assert_eq!(sends_to(&mut b, 20), a.gens.current.index, "{lag:?}");

            exchange(&mut a, &mut b, late_to_a, late_to_b, now);
            assert_eq!(
                (a.got.as_slice(), b.got.as_slice()),
                (&[100][..], &[100][..])
            );
            a.got.clear();
            b.got.clear();
            traffic(&mut a, &mut b, 21..25, now);
            assert!(
                a.discards.is_empty() && b.discards.is_empty(),
                "{lag:?}: A {:?}, B {:?}",
                a.discards,
                b.discards
            );

            // Both key pairs' generations are kept until the grace period is over.
            let remotes = |s: &Side| s.gens.remotes().collect::<Vec<_>>();
            assert_eq!(remotes(&a), vec![key(12).public_key(), key(2).public_key()]);
            assert_eq!(remotes(&b), vec![key(11).public_key(), key(1).public_key()]);
            let later = now + PREVIOUS_GRACE + Duration::from_secs(1);
            assert_eq!(a.tick(later).1, vec![a_old], "{lag:?}");
            assert_eq!(b.tick(later).1, vec![b_old], "{lag:?}");
            assert_eq!(remotes(&a), vec![key(12).public_key()]);
            assert_eq!(remotes(&b), vec![key(11).public_key()]);
            traffic(&mut a, &mut b, 25..30, now);
        }
    }

    /// Only A has rolled its static keys when B's generation re-handshakes (as it does every two
    /// minutes): the initiation is for A's old key, so A's previous generation answers it, not
    /// `current`, whose keys differ, and the old keys' session goes on until B rolls too.
    #[test]
    fn rehandshake_under_the_old_static_keys_is_answered_by_previous() {
        let now = Instant::now();
        let (mut a, mut b) = pair(1, now);
        let a_old = a.gens.current.index;
        a.ring.add(&key(11));
        b.ring.add(&key(12));
        let (init, _) = a.change_keys(keys(11, 12), 2, now);
        exchange(&mut a, &mut b, Vec::new(), init, now);
        assert_eq!(b.discards, vec![Discard::UnknownKeys]);
        b.discards.clear();

        let mut buf = [0u8; HANDSHAKE_INIT_LEN];
        let init = match b
            .gens
            .current
            .tunn
            .format_handshake_initiation(&mut buf, true)
        {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            _ => panic!("no initiation"),
        };
        // Sent as `tick` sends a rekey: noted as the generation's last initiation.
        b.gens.current.last_init = initiation_sender(&init);
        let answer = a.receive(&init, now);
        assert!(a.discards.is_empty(), "{:?}", a.discards);
        assert_eq!(answer.len(), 1);
        assert!(matches!(
            Tunn::parse_incoming_packet(&answer[0]),
            Ok(Packet::HandshakeResponse(_))
        ));
        // The response's sender index is the answering generation's.
        let sender = u32::from_le_bytes(answer[0][4..8].try_into().unwrap());
        assert_eq!(sender >> 8, a_old);
        exchange(&mut a, &mut b, Vec::new(), answer, now);
        traffic(&mut a, &mut b, 0..5, now);
        assert!(!a.gens.current_has_session());
        assert_eq!(a.gens.count(), 2);
        assert_eq!(sends_to(&mut b, 5), a_old);
        assert!(
            a.discards.is_empty() && b.discards.is_empty(),
            "A {:?}, B {:?}",
            a.discards,
            b.discards
        );

        // B rolls too: both move to the new keys.
        let (init, _) = b.change_keys(keys(12, 11), 2, now);
        exchange(&mut a, &mut b, init, Vec::new(), now);
        assert!(a.gens.current_has_session() && b.gens.current_has_session());
        traffic(&mut a, &mut b, 6..10, now);
        assert_eq!(sends_to(&mut b, 10), a.gens.current.index);
    }

    /// A receiver seconds behind its socket gets the response to a new generation's first
    /// initiation after boringtun has retried. The peer (the kernel keeps one pending keypair)
    /// has dropped that response's keys by then, so it must not make a session: the previous
    /// generation keeps carrying the traffic until the response to the retry arrives. (boringtun
    /// alone accepts it: with that, the mixed VM pair stalled TCP for over 10 s.) Waits
    /// REKEY_TIMEOUT of real time: boringtun's retry timer reads the clock.
    #[test]
    fn a_late_response_to_a_replaced_initiation_makes_no_session() {
        let now = Instant::now();
        let (mut a, mut b) = pair(1, now);
        traffic(&mut a, &mut b, 0..3, now);
        let b_old = b.gens.current.index;
        // B switches first (its initiation is lost), then A.
        let _ = b.change(2, now);
        let (first, _) = a.change(2, now);
        let first_response = b.receive(&first[0], now);
        assert_eq!(first_response.len(), 1);

        // The response lags; A retries after REKEY_TIMEOUT.
        std::thread::sleep(REKEY_TIMEOUT + Duration::from_millis(300));
        let later = Instant::now();
        let (retry, _) = a.tick(later);
        let retry: Vec<_> = retry.into_iter().filter(|d| is_initiation(d)).collect();
        assert_eq!(retry.len(), 1, "no retry after REKEY_TIMEOUT");
        let second_response = b.receive(&retry[0], later);

        // The late response to the first initiation is refused; traffic still goes over the
        // previous generation.
        assert!(a.receive(&first_response[0], later).is_empty());
        assert_eq!(a.discards, vec![Discard::Stale]);
        assert!(!a.gens.current_has_session());
        assert_eq!(sends_to(&mut a, 100), b_old);

        // The response to the retry makes the session, and data moves to it.
        let to_b = a.receive(&second_response[0], later);
        assert!(a.gens.current_has_session());
        exchange(&mut a, &mut b, Vec::new(), to_b, later);
        traffic(&mut a, &mut b, 200..205, later);
        assert_eq!(sends_to(&mut a, 300), b.gens.current.index);
        assert_eq!(a.discards, vec![Discard::Stale]);
    }

    #[test]
    fn stale_response_filter_reads_the_indices() {
        let mut init = vec![0u8; HANDSHAKE_INIT_LEN];
        init[0] = 1;
        init[4..8].copy_from_slice(&0x0012_3401u32.to_le_bytes());
        assert_eq!(initiation_sender(&init), Some(0x0012_3401));
        assert_eq!(initiation_sender(&init[..100]), None);
        let mut resp = vec![0u8; HANDSHAKE_RESPONSE_LEN];
        resp[0] = 2;
        resp[8..12].copy_from_slice(&0x0012_3402u32.to_le_bytes());
        assert_eq!(response_receiver(&resp), Some(0x0012_3402));
        assert_eq!(response_receiver(&init), None);
        resp[1] = 1;
        assert_eq!(response_receiver(&resp), None);
    }

    #[test]
    fn keep_on_change_prefers_the_newest_working_session() {
        assert_eq!(keep_on_change(true, None), Some(Gen::Current));
        assert_eq!(keep_on_change(true, Some(true)), Some(Gen::Current));
        assert_eq!(keep_on_change(true, Some(false)), Some(Gen::Current));
        assert_eq!(keep_on_change(false, Some(true)), Some(Gen::Previous));
        assert_eq!(keep_on_change(false, Some(false)), None);
        assert_eq!(keep_on_change(false, None), None);
    }

    #[test]
    fn outbound_uses_previous_only_while_current_waits() {
        assert_eq!(outbound(true, Some(true)), Gen::Current);
        assert_eq!(outbound(false, Some(true)), Gen::Previous);
        assert_eq!(outbound(false, Some(false)), Gen::Current);
        assert_eq!(outbound(false, None), Gen::Current);
        assert_eq!(outbound(true, None), Gen::Current);
    }

    #[test]
    fn retirement_after_grace_or_reject_after_time() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        assert!(!retire_previous(t0 + s(10), t0, None));
        assert!(!retire_previous(t0 + s(10), t0, Some(t0 + s(1))));
        assert!(retire_previous(t0 + s(31), t0, Some(t0 + s(1))));
        assert!(!retire_previous(t0 + s(179), t0, None));
        assert!(retire_previous(t0 + s(180), t0, None));
        // A clock reading before the change does not underflow.
        assert!(!retire_previous(t0, t0 + s(1), Some(t0 + s(1))));
    }

    #[test]
    fn timer_initiations_of_previous_stop_once_current_has_a_session() {
        let now = Instant::now();
        let mut p = RetryPacing::default();
        assert!(timer_initiation(Gen::Previous, false, true, &mut p, now));
        assert!(!timer_initiation(Gen::Previous, true, true, &mut p, now));
        assert!(timer_initiation(Gen::Current, true, true, &mut p, now));
        assert!(timer_initiation(Gen::Current, false, false, &mut p, now));
    }

    #[test]
    fn retries_of_a_waiting_current_back_off() {
        let t0 = Instant::now();
        let mut p = RetryPacing::default();
        p.record(t0);
        // boringtun retries every ~5.25 s (REKEY_TIMEOUT rounded up to the next 250 ms tick).
        let sent: Vec<u64> = (1..=18)
            .map(|k| Duration::from_millis(5250 * k))
            .filter(|&d| timer_initiation(Gen::Current, false, true, &mut p, t0 + d))
            .map(|d| d.as_secs())
            .collect();
        // Gaps of 5, 10, 20, 40 s: five initiations in all before boringtun gives up at 90 s.
        assert_eq!(sent, vec![5, 15, 36, 78]);
    }
}
