//! Privileged tests of the userspace ESP device: two network namespaces A and B joined by a veth
//! (192.0.2.1/24 and 192.0.2.2/24), a `UserspaceEsp` in each, pod addresses 10.99.1.1 (A) and
//! 10.99.2.1 (B) on the TUN interfaces. They need root (and `ip`, `ping`, `tcpdump`); under
//! `CI=true` they fail rather than skip without it. Everything lives in namespaces the tests
//! create and delete; the host's network namespace is not touched.

use std::error::Error as StdError;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use enc_ipsec::userspace::{Encapsulation, UserspaceConfig, UserspaceEsp};
use enc_ipsec::{EspDrop, IpsecBackend as _, IpsecKind, IpsecPeerSnapshot, IpsecPeerSpec, SaKeys};
use enc_tests::lab::Capture;
use enc_tests::netns::Netns;
use enc_tests::{pcap, require_root, sys};

type TestResult<T = ()> = Result<T, Box<dyn StdError + Send + Sync>>;

/// `ping -p` pattern (hex of "enc-plaintext-ma"); it must never be seen on the underlay.
const MARKER_HEX: &str = "656e632d706c61696e746578742d6d61";
const MARKER: &[u8] = b"enc-plaintext-ma";
const UNDERLAY_A: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const UNDERLAY_B: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// Another address in A's namespace that is no peer of B.
const STRANGER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 3);
const ESP: u8 = 50;
const ICMP: u8 = 1;
/// A -> B and B -> A SPIs.
const SPI_AB: u32 = 0x0000_a0b0;
const SPI_BA: u32 = 0x0000_b0a0;
const WAIT: Duration = Duration::from_secs(5);

fn keys(spi: u32, fill: u8) -> SaKeys {
    SaKeys {
        spi,
        key: [fill; 32],
        salt: [fill, 0x5a, 0xa5, fill],
    }
}

fn err(msg: String) -> Box<dyn StdError + Send + Sync> {
    msg.into()
}

/// One node: its namespace and its device. Fields drop in order: the device (closing the TUN
/// and the socket) before the namespace is deleted.
struct Node {
    esp: Option<UserspaceEsp>,
    ns: Netns,
    ifname: &'static str,
    /// The spec of its one peer, as set up.
    spec: IpsecPeerSpec,
}

impl Node {
    fn esp(&self) -> &UserspaceEsp {
        self.esp.as_ref().expect("device running")
    }

    fn peer(&self) -> TestResult<IpsecPeerSnapshot> {
        let mut peers = self.esp().peers()?;
        if peers.len() != 1 {
            return Err(err(format!(
                "{}: expected one peer, got {peers:?}",
                self.ifname
            )));
        }
        Ok(peers.remove(0))
    }

    fn drops(&self, reason: EspDrop) -> TestResult<u64> {
        Ok(count(&self.peer()?.drops, reason))
    }

    fn run(&self, args: &[&str]) -> TestResult {
        self.ns.run(args)?;
        Ok(())
    }
}

fn count(drops: &[(EspDrop, u64)], reason: EspDrop) -> u64 {
    drops
        .iter()
        .find(|(r, _)| *r == reason)
        .map_or(0, |(_, n)| *n)
}

/// Creates A and B (namespaces, veth, devices, peers, TUN addresses and routes). `b_inbound_key`
/// is the key B expects on A's SA: A's key (1) for a working tunnel, anything else for a broken
/// one.
fn setup(tag: &str, b_inbound_key: u8) -> TestResult<(Node, Node)> {
    setup_on(tag, b_inbound_key, Underlay::V4)
}

/// The underlay addresses of A and B.
#[derive(Clone, Copy)]
enum Underlay {
    /// 192.0.2.1/24 and 192.0.2.2/24.
    V4,
    /// 2001:db8::1/64 and 2001:db8::2/64.
    V6,
}

impl Underlay {
    fn addrs(self) -> (IpAddr, IpAddr, u8) {
        match self {
            Underlay::V4 => (UNDERLAY_A.into(), UNDERLAY_B.into(), 24),
            Underlay::V6 => (
                Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).into(),
                Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2).into(),
                64,
            ),
        }
    }
}

fn setup_on(tag: &str, b_inbound_key: u8, underlay: Underlay) -> TestResult<(Node, Node)> {
    let (underlay_a, underlay_b, prefix) = underlay.addrs();
    let pid = std::process::id();
    let ns_a = Netns::new(&format!("enc-ue{pid}-{tag}-a"))?;
    let ns_b = Netns::new(&format!("enc-ue{pid}-{tag}-b"))?;
    ns_a.run(&[
        "ip", "link", "add", "va", "type", "veth", "peer", "name", "vb",
    ])?;
    ns_a.run(&["ip", "link", "set", "vb", "netns", ns_b.name()])?;
    for (ns, dev, addr) in [(&ns_a, "va", underlay_a), (&ns_b, "vb", underlay_b)] {
        let cidr = format!("{addr}/{prefix}");
        if addr.is_ipv6() {
            ns.run(&["ip", "addr", "add", &cidr, "dev", dev, "nodad"])?;
        } else {
            ns.run(&["ip", "addr", "add", &cidr, "dev", dev])?;
        }
        ns.run(&["ip", "link", "set", dev, "up"])?;
    }

    let spec_a = IpsecPeerSpec {
        peer_id: 2,
        name: "node-b".into(),
        local: underlay_a,
        remote: underlay_b,
        local_cidrs: vec!["10.99.1.0/24".parse()?],
        remote_cidrs: vec!["10.99.2.0/24".parse()?],
        epoch: 1,
        outbound: keys(SPI_AB, 1),
        inbound: vec![keys(SPI_BA, 2)],
        older_outbound: vec![],
        bypass: vec![],
    };
    let spec_b = IpsecPeerSpec {
        peer_id: 1,
        name: "node-a".into(),
        local: underlay_b,
        remote: underlay_a,
        local_cidrs: vec!["10.99.2.0/24".parse()?],
        remote_cidrs: vec!["10.99.1.0/24".parse()?],
        epoch: 1,
        outbound: keys(SPI_BA, 2),
        inbound: vec![keys(SPI_AB, b_inbound_key)],
        older_outbound: vec![],
        bypass: vec![],
    };

    let a = start(ns_a, "espa", underlay_a, &spec_a)?;
    let b = start(ns_b, "espb", underlay_b, &spec_b)?;
    for (node, addr, remote) in [
        (&a, "10.99.1.1", "10.99.2.0/24"),
        (&b, "10.99.2.1", "10.99.1.0/24"),
    ] {
        let dev = node.ifname;
        node.run(&["ip", "link", "set", dev, "up", "mtu", "1400"])?;
        node.run(&["ip", "addr", "add", &format!("{addr}/32"), "dev", dev])?;
        node.run(&["ip", "route", "add", remote, "dev", dev, "src", addr])?;
    }
    Ok((a, b))
}

/// Starts a device inside `ns` and configures its one peer.
fn start(ns: Netns, ifname: &'static str, local: IpAddr, spec: &IpsecPeerSpec) -> TestResult<Node> {
    let esp = ns.enter(move || {
        UserspaceEsp::start(UserspaceConfig {
            ifname: ifname.into(),
            local,
            replay_window: 128,
            sa_log: None,
            encapsulation: Encapsulation::None,
        })
    })??;
    assert_eq!(esp.kind(), IpsecKind::Userspace);
    assert_eq!(esp.ifname(), Some(ifname));
    esp.upsert_peer(spec)?;
    // Idempotent.
    esp.upsert_peer(spec)?;
    Ok(Node {
        esp: Some(esp),
        ns,
        ifname,
        spec: spec.clone(),
    })
}

/// Pings B's pod address from A's; true if every reply came back.
fn ping(a: &Node, count: u32) -> TestResult<bool> {
    let out = sys::output_in(
        a.ns.name(),
        &[
            "ping",
            "-n",
            "-q",
            "-c",
            &count.to_string(),
            "-i",
            "0.2",
            "-W",
            "2",
            "-p",
            MARKER_HEX,
            "10.99.2.1",
        ],
    )?;
    Ok(out.status.success())
}

/// Sends `esp` (SPI onwards) from a raw ESP socket in `ns`, from `src` (or the kernel's choice)
/// to `dst`.
fn inject(ns: &Netns, src: Option<Ipv4Addr>, dst: Ipv4Addr, esp: Vec<u8>) -> TestResult {
    let sent = ns.enter(move || -> std::io::Result<()> {
        // SAFETY: plain socket(2) call; the result is checked.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ESP) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let sin = |ip: Ipv4Addr| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(ip.octets()),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        if let Some(src) = src {
            let addr = sin(src);
            // SAFETY: `addr` is a valid sockaddr_in of `len` bytes for the call.
            if unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        let addr = sin(dst);
        // SAFETY: `esp` and `addr` are valid for their lengths for the call.
        let n = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                esp.as_ptr().cast(),
                esp.len(),
                0,
                (&raw const addr).cast(),
                len,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    })?;
    Ok(sent?)
}

/// Waits until the counter `f` reads at least `want`.
fn wait_count(what: &str, want: u64, f: impl Fn() -> TestResult<u64>) -> TestResult {
    let start = Instant::now();
    loop {
        let n = f()?;
        if n >= want {
            return Ok(());
        }
        if start.elapsed() > WAIT {
            return Err(err(format!("{what} is {n} after {WAIT:?}, want {want}")));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The ESP bytes (SPI onwards) of a captured IPv4 frame from `src` to `dst`.
fn esp_of(frame: &pcap::Frame, src: Ipv4Addr, dst: Ipv4Addr) -> Option<Vec<u8>> {
    let ip = frame.ip.as_ref()?;
    if ip.proto != ESP || ip.src != IpAddr::V4(src) || ip.dst != IpAddr::V4(dst) {
        return None;
    }
    let packet = frame.data.get(14..)?;
    let ihl = usize::from(packet.first()? & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([*packet.get(2)?, *packet.get(3)?]));
    packet.get(ihl..total).map(<[u8]>::to_vec)
}

#[test]
fn privileged_userspace_esp_ping_capture_replay_tamper() {
    if !require_root("privileged_userspace_esp_ping_capture_replay_tamper") {
        return;
    }
    if let Err(e) = ping_capture_replay_tamper() {
        panic!("{e}");
    }
}

fn ping_capture_replay_tamper() -> TestResult {
    let (mut a, b) = setup("ok", 1)?;
    let pcap_path = std::env::temp_dir().join(format!("{}-va.pcap", a.ns.name()));
    let _cleanup = RemoveOnDrop(pcap_path.clone());

    // Traffic crosses, encrypted.
    let capture = Capture::start(a.ns.name(), "va", &pcap_path)?;
    if !ping(&a, 3)? {
        return Err(err(format!(
            "ping 10.99.1.1 -> 10.99.2.1 failed; A: {:?} {:?}; B: {:?} {:?}",
            a.peer()?,
            a.esp().device_counters(),
            b.peer()?,
            b.esp().device_counters()
        )));
    }
    let frames = capture.stop()?;
    let esp_frames = frames
        .iter()
        .filter(|f| f.ip.as_ref().is_some_and(|ip| ip.proto == ESP))
        .count();
    let icmp = frames
        .iter()
        .filter(|f| f.ip.as_ref().is_some_and(|ip| ip.proto == ICMP))
        .count();
    let leaks = frames
        .iter()
        .filter(|f| pcap::contains(&f.data, MARKER))
        .count();
    if esp_frames < 6 || icmp != 0 || leaks != 0 {
        return Err(err(format!(
            "capture of {} frames: {esp_frames} ESP (want >= 6), {icmp} ICMP (want 0), \
             {leaks} with the ping pattern (want 0)",
            frames.len()
        )));
    }

    // Sequence numbers and byte counts on both sides.
    for (node, name) in [(&a, "A"), (&b, "B")] {
        let p = node.peer()?;
        let inbound = p
            .inbound
            .first()
            .ok_or_else(|| err(format!("{name}: no inbound SA")))?;
        let ok = p.out_seq >= 3
            && p.tx_packets >= 3
            && p.tx_bytes >= 3 * 84
            && inbound.highest_seq >= 3
            && inbound.packets >= 3
            && inbound.bytes >= 3 * 84
            && p.drops.iter().all(|(_, n)| *n == 0);
        if !ok {
            return Err(err(format!("{name}: unexpected counters {p:?}")));
        }
    }
    assert_eq!(a.peer()?.out_spi, SPI_AB);
    assert_eq!(b.peer()?.inbound[0].spi, SPI_AB);

    let original = frames
        .iter()
        .find_map(|f| esp_of(f, UNDERLAY_A, UNDERLAY_B))
        .ok_or_else(|| err("no ESP packet from A to B captured".into()))?;

    // Replay: the captured packet again.
    let before = b.drops(EspDrop::Replay)?;
    inject(&a.ns, None, UNDERLAY_B, original.clone())?;
    wait_count("B's replay drops", before + 1, || b.drops(EspDrop::Replay))?;

    // Tamper: a fresh sequence number (so the replay check passes) and a flipped ciphertext
    // byte.
    let mut tampered = original.clone();
    let fresh = u32::try_from(b.peer()?.inbound[0].highest_seq + 1000)?;
    tampered[4..8].copy_from_slice(&fresh.to_be_bytes());
    tampered[16 + 4] ^= 0x40;
    let before = b.drops(EspDrop::IcvFailure)?;
    inject(&a.ns, None, UNDERLAY_B, tampered)?;
    wait_count("B's ICV failures", before + 1, || {
        b.drops(EspDrop::IcvFailure)
    })?;

    // Unknown SPI from the peer: charged to the peer.
    let mut unknown = original.clone();
    unknown[..4].copy_from_slice(&0xdead_beef_u32.to_be_bytes());
    let before = b.drops(EspDrop::BadSpi)?;
    inject(&a.ns, None, UNDERLAY_B, unknown)?;
    wait_count("B's bad-SPI drops", before + 1, || b.drops(EspDrop::BadSpi))?;
    let peer_bad_spi = b.drops(EspDrop::BadSpi)?;

    // A valid SA's packet from an address that is no peer: charged to the device.
    a.run(&["ip", "addr", "add", &format!("{STRANGER}/24"), "dev", "va"])?;
    let before = count(&b.esp().device_drops(), EspDrop::BadSpi);
    inject(&a.ns, Some(STRANGER), UNDERLAY_B, original)?;
    wait_count("B's device bad-SPI drops", before + 1, || {
        Ok(count(&b.esp().device_drops(), EspDrop::BadSpi))
    })?;
    if b.drops(EspDrop::BadSpi)? != peer_bad_spi {
        return Err(err(format!("B: unexpected counters {:?}", b.peer()?)));
    }

    // The tunnel still works after all that.
    if !ping(&a, 1)? {
        return Err(err("ping after the injections failed".into()));
    }

    // Shutting down removes the interface.
    if let Some(esp) = a.esp.take() {
        esp.shutdown();
    }
    let gone = sys::output_in(a.ns.name(), &["ip", "link", "show", "espa"])?;
    if gone.status.success() {
        return Err(err("espa still exists after shutdown".into()));
    }
    Ok(())
}

#[test]
fn privileged_userspace_esp_wrong_keys_fail_closed() {
    if !require_root("privileged_userspace_esp_wrong_keys_fail_closed") {
        return;
    }
    if let Err(e) = wrong_keys_fail_closed() {
        panic!("{e}");
    }
}

fn wrong_keys_fail_closed() -> TestResult {
    // B expects key 9 on A's SA; A seals with key 1.
    let (a, b) = setup("wk", 9)?;
    if ping(&a, 2)? {
        return Err(err("ping succeeded with mismatched keys".into()));
    }
    wait_count("B's ICV failures", 2, || b.drops(EspDrop::IcvFailure))?;
    let pb = b.peer()?;
    if pb.inbound[0].packets != 0 || pb.inbound[0].highest_seq != 0 {
        return Err(err(format!(
            "B accepted packets under the wrong key: {pb:?}"
        )));
    }
    let pa = a.peer()?;
    if pa.tx_packets < 2 || pa.inbound[0].packets != 0 {
        return Err(err(format!("A: unexpected counters {pa:?}")));
    }
    Ok(())
}

#[test]
fn privileged_userspace_esp_ipv6_underlay() {
    if !require_root("privileged_userspace_esp_ipv6_underlay") {
        return;
    }
    if let Err(e) = ipv6_underlay() {
        panic!("{e}");
    }
}

/// The same tunnel over an IPv6 underlay, where raw sockets deliver ESP without the IP header.
fn ipv6_underlay() -> TestResult {
    let (a, b) = setup_on("v6", 1, Underlay::V6)?;
    // No DAD on the veth, but neighbour discovery may take a moment: allow one retry.
    if !ping(&a, 3)? && !ping(&a, 3)? {
        return Err(err(format!(
            "ping over the IPv6 underlay failed; A: {:?} {:?}; B: {:?} {:?}",
            a.peer()?,
            a.esp().device_counters(),
            b.peer()?,
            b.esp().device_counters()
        )));
    }
    for (node, name) in [(&a, "A"), (&b, "B")] {
        let p = node.peer()?;
        if p.out_seq < 3 || p.inbound[0].packets < 3 || p.drops.iter().any(|(_, n)| *n != 0) {
            return Err(err(format!("{name}: unexpected counters {p:?}")));
        }
    }
    Ok(())
}

#[test]
fn privileged_userspace_esp_rotation_under_ping_flood() {
    if !require_root("privileged_userspace_esp_rotation_under_ping_flood") {
        return;
    }
    if let Err(e) = rotation_under_ping_flood() {
        panic!("{e}");
    }
}

/// A step of the rotation from epoch `e` to `e + 1`.
#[derive(Clone, Copy, Debug)]
enum Step {
    Steady,
    Prepare,
    Commit,
    Retire,
}

/// Keys of epoch `e`, A -> B with `ab`: SPI bits 31..28 carry the epoch, as the agent's do.
fn epoch_keys(e: u8, ab: bool) -> SaKeys {
    let (spi, fill) = if ab { (SPI_AB, 0x40) } else { (SPI_BA, 0x80) };
    keys(spi | (u32::from(e & 0xF) << 28), fill + e)
}

/// `node`'s spec at `step` of the rotation from `e` (A sends on `ab` keys, B receives them).
fn rotation_spec(node: &Node, e: u8, step: Step) -> IpsecPeerSpec {
    let ab = node.ifname == "espa";
    let next = e + 1;
    let mut s = node.spec.clone();
    (s.epoch, s.outbound) = (e, epoch_keys(e, ab));
    s.inbound = vec![epoch_keys(e, !ab)];
    s.older_outbound = vec![];
    match step {
        Step::Steady => {}
        Step::Prepare => s.inbound.push(epoch_keys(next, !ab)),
        Step::Commit => {
            (s.epoch, s.outbound) = (next, epoch_keys(next, ab));
            s.inbound.push(epoch_keys(next, !ab));
            s.older_outbound = vec![(e, epoch_keys(e, ab))];
        }
        Step::Retire => return rotation_spec(node, next, Step::Steady),
    }
    s
}

/// Four rotations (prepare, commit, retire on both nodes, in the order the agents' protocol
/// gives) while A pings B every 2 ms: no echo lost, no ESP drop on either node.
fn rotation_under_ping_flood() -> TestResult {
    const ROTATIONS: u8 = 4;
    const COUNT: u32 = 2000;
    const STEP: Duration = Duration::from_millis(60);
    let (a, b) = setup("rot", 1)?;
    for node in [&a, &b] {
        node.esp()
            .upsert_peer(&rotation_spec(node, 1, Step::Steady))?;
    }
    if !ping(&a, 1)? {
        return Err(err("ping before the rotations failed".into()));
    }
    let ns = a.ns.name().to_owned();
    let flood = std::thread::spawn(move || {
        sys::output_in(
            &ns,
            &[
                "ping",
                "-n",
                "-q",
                "-c",
                &COUNT.to_string(),
                "-i",
                "0.002",
                "-W",
                "2",
                "10.99.2.1",
            ],
        )
    });
    let rx_before = b.peer()?.rx_packets;
    wait_count("B's packets from the flood", rx_before + 100, || {
        Ok(b.peer()?.rx_packets)
    })?;
    let started = Instant::now();
    for e in 1..=ROTATIONS {
        // Prepare at B, then A; commit at A, then B; retire after a grace period.
        for (node, step) in [
            (&b, Step::Prepare),
            (&a, Step::Prepare),
            (&a, Step::Commit),
            (&b, Step::Commit),
            (&a, Step::Retire),
            (&b, Step::Retire),
        ] {
            std::thread::sleep(STEP);
            node.esp().upsert_peer(&rotation_spec(node, e, step))?;
        }
    }
    let rotating = started.elapsed();
    let out = flood
        .join()
        .map_err(|_| err("ping thread panicked".into()))??;
    let summary = String::from_utf8_lossy(&out.stdout).into_owned();
    let want = format!("{COUNT} packets transmitted, {COUNT} received");
    let (pa, pb) = (a.peer()?, b.peer()?);
    if !summary.contains(&want) {
        return Err(err(format!(
            "echoes lost during the rotations: {summary}; A: {pa:?} {:?}; B: {pb:?} {:?}",
            a.esp().device_counters(),
            b.esp().device_counters()
        )));
    }
    // The flood must have outlasted the rotations, or some steps saw no traffic.
    let flood_time = Duration::from_millis(2 * u64::from(COUNT));
    if rotating >= flood_time {
        return Err(err(format!(
            "rotations took {rotating:?}, longer than the flood ({flood_time:?})"
        )));
    }
    for (p, name) in [(&pa, "A"), (&pb, "B")] {
        if p.drops.iter().any(|(_, n)| *n != 0) || p.inbound.len() != 1 {
            return Err(err(format!("{name}: unexpected state {p:?}")));
        }
    }
    let last = ROTATIONS + 1;
    if (pa.out_spi, pb.out_spi) != (epoch_keys(last, true).spi, epoch_keys(last, false).spi)
        || pa.tx_packets != pb.rx_packets
        || pb.tx_packets != pa.rx_packets
    {
        return Err(err(format!("unexpected counters: A {pa:?}; B {pb:?}")));
    }
    Ok(())
}

/// Removes a file when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
