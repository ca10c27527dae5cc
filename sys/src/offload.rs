//! TUN offloads for the userspace datapaths: the `virtio_net_hdr` that a TUN device opened with
//! `IFF_VNET_HDR` puts before every packet, TCP segmentation of the super-packets the kernel
//! hands over once TSO is enabled (`TUNSETOFFLOAD`), and the reverse on the receive side:
//! coalescing consecutive TCP segments of one flow into one super-packet written with a GSO
//! header (as Linux GRO and wireguard-go's TUN offload do).
//!
//! Everything here is a pure function of bytes: the datapaths read from and write to the TUN
//! device themselves. The bytes come from the kernel (reads) or from an authenticated peer
//! (writes), but are parsed defensively all the same: a malformed header is an [`OffloadError`],
//! never a panic.
//!
//! Segments get complete IPv4 header and TCP checksums, so what goes into the tunnel is the
//! same as without offloads. A coalesced super-packet is written with `NEEDS_CSUM` and the
//! pseudo-header sum in the TCP checksum field (`CHECKSUM_PARTIAL`), as the kernel's own GRO
//! leaves it; the segments' own checksums are not verified (their bytes were authenticated by
//! the tunnel's AEAD, so a wrong checksum can only come from the authenticated peer).

use std::fmt;

/// Size of `struct virtio_net_hdr` (without `num_buffers`), the TUN default.
pub const VNET_HDR_LEN: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum at `csum_start + csum_offset` is partial.
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
pub const GSO_TCPV6: u8 = 4;
/// Largest IP packet (and so super-packet) the TUN device carries.
pub const MAX_SUPER: usize = 65535;

const PROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_URG: u8 = 0x20;
const TCP_CWR: u8 = 0x80;

/// Why a packet from the TUN device could not be split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum OffloadError {
    /// Shorter than the `virtio_net_hdr`.
    ShortHeader,
    /// A GSO type other than none, TCPv4 and TCPv6 (or with the ECN bit).
    UnsupportedGso(u8),
    /// `csum_start` / `csum_offset` point outside the packet.
    BadChecksumOffsets,
    /// The IP or TCP header does not match the GSO type, or is truncated.
    BadHeaders,
    /// `gso_size` is zero.
    ZeroSegmentSize,
    /// A segment would not fit the output buffer.
    BufferTooSmall,
}

impl fmt::Display for OffloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ShortHeader => f.write_str("shorter than a virtio_net_hdr"),
            Self::UnsupportedGso(t) => write!(f, "unsupported GSO type {t:#x}"),
            Self::BadChecksumOffsets => f.write_str("checksum offsets outside the packet"),
            Self::BadHeaders => f.write_str("IP/TCP headers do not match the GSO type"),
            Self::ZeroSegmentSize => f.write_str("gso_size is zero"),
            Self::BufferTooSmall => f.write_str("segment does not fit the buffer"),
        }
    }
}

impl std::error::Error for OffloadError {}

/// `struct virtio_net_hdr`, in host byte order (TUN's default for a little-endian host).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHdr {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`.
    pub gso_type: u8,
    /// Length of the headers before the payload.
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where checksumming starts (the L4 header).
    pub csum_start: u16,
    /// Offset of the checksum field from `csum_start`.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Parses the header at the start of `buf`; returns it and the packet after it.
    pub fn parse(buf: &[u8]) -> Result<(Self, &[u8]), OffloadError> {
        if buf.len() < VNET_HDR_LEN {
            return Err(OffloadError::ShortHeader);
        }
        let u = |i: usize| u16::from_ne_bytes([buf[i], buf[i + 1]]);
        Ok((
            Self {
                flags: buf[0],
                gso_type: buf[1],
                hdr_len: u(2),
                gso_size: u(4),
                csum_start: u(6),
                csum_offset: u(8),
            },
            &buf[VNET_HDR_LEN..],
        ))
    }

    /// The header's 10 bytes.
    pub fn encode(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }
}

/// The 16-bit ones'-complement sum of `data` added to `sum` (not folded).
pub fn sum16(data: &[u8], sum: u64) -> u64 {
    // The ones'-complement sum does not depend on byte order (RFC 1071, 2.(B)): add the data as
    // native-endian 32-bit words in four independent lanes, which the compiler turns into wide
    // vector adds, and swap the folded result into network order once at the end. No lane can
    // overflow: each addition is below 2^32 and a packet is far shorter than 2^32 blocks.
    let mut lanes = [0u64; 4];
    let mut blocks = data.chunks_exact(16);
    for b in &mut blocks {
        for (i, lane) in lanes.iter_mut().enumerate() {
            let w = [b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]];
            *lane += u64::from(u32::from_ne_bytes(w));
        }
    }
    let mut native = lanes
        .iter()
        .map(|&l| (l & 0xffff_ffff) + (l >> 32))
        .sum::<u64>();
    let mut words = blocks.remainder().chunks_exact(2);
    for w in &mut words {
        native += u64::from(u16::from_ne_bytes([w[0], w[1]]));
    }
    if let [b] = words.remainder() {
        // An odd last byte is the high byte of a word padded with zero.
        native += u64::from(u16::from_ne_bytes([*b, 0]));
    }
    sum + u64::from(u16::from_be(fold(native)))
}

/// Folds a sum from [`sum16`] to 16 bits (not complemented).
pub fn fold(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The internet checksum of `data` (RFC 1071): the complement of the folded sum.
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum16(data, 0))
}

/// Sum of the TCP/UDP pseudo-header of an IPv4 or IPv6 packet whose L4 part is `l4_len` long.
fn pseudo_sum(ip: &[u8], v6: bool, l4_len: usize) -> u64 {
    let addrs = if v6 { &ip[8..40] } else { &ip[12..20] };
    sum16(addrs, u64::from(PROTO_TCP) + l4_len as u64)
}

/// The IP and TCP header lengths of a TCP packet (IPv4 without fragmentation, or IPv6 with TCP
/// as the next header).
fn tcp_headers(pkt: &[u8], v6: bool) -> Option<(usize, usize)> {
    let ip_len = if v6 {
        if pkt.len() < 40 || pkt[0] >> 4 != 6 || pkt[6] != PROTO_TCP {
            return None;
        }
        40
    } else {
        if pkt.len() < 20 || pkt[0] >> 4 != 4 || pkt[9] != PROTO_TCP {
            return None;
        }
        let ihl = usize::from(pkt[0] & 0x0f) * 4;
        // A fragment (MF set or an offset) cannot be a TSO/GRO packet.
        let frag = u16::from_be_bytes([pkt[6], pkt[7]]) & 0x3fff;
        if ihl < 20 || frag != 0 {
            return None;
        }
        ihl
    };
    let tcp = pkt.get(ip_len..ip_len + 20)?;
    let th = usize::from(tcp[12] >> 4) * 4;
    if th < 20 || pkt.len() < ip_len + th {
        return None;
    }
    Some((ip_len, th))
}

/// Writes IP lengths and the IPv4 header checksum of a packet of `total` bytes.
fn fix_ip(pkt: &mut [u8], v6: bool, ip_len: usize, total: usize) {
    if v6 {
        let pl = (total - 40) as u16;
        pkt[4..6].copy_from_slice(&pl.to_be_bytes());
    } else {
        pkt[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        pkt[10..12].copy_from_slice(&[0, 0]);
        let c = checksum(&pkt[..ip_len]);
        pkt[10..12].copy_from_slice(&c.to_be_bytes());
    }
}

/// Splits one read from a TUN device with `IFF_VNET_HDR` (header and packet) into the packets
/// it stands for, each with complete checksums, and hands each to `emit` (a slice of `scratch`
/// or of `read` itself). Returns the number of packets emitted.
///
/// A GSO packet of `n` payload bytes becomes `ceil(n / gso_size)` TCP segments: the headers of
/// the super-packet with the IP lengths, IPv4 ids (incremented), sequence numbers and
/// checksums of each segment; FIN and PSH only on the last segment, CWR only on the first. A
/// packet without GSO but with `NEEDS_CSUM` gets its checksum completed in place.
pub fn split(
    read: &mut [u8],
    scratch: &mut [u8],
    mut emit: impl FnMut(&[u8]),
) -> Result<usize, OffloadError> {
    let (hdr, _) = VnetHdr::parse(read)?;
    let pkt = &mut read[VNET_HDR_LEN..];
    let v6 = match hdr.gso_type {
        GSO_NONE => {
            if hdr.flags & F_NEEDS_CSUM != 0 {
                let start = usize::from(hdr.csum_start);
                let at = start + usize::from(hdr.csum_offset);
                if at + 2 > pkt.len() {
                    return Err(OffloadError::BadChecksumOffsets);
                }
                // The field holds the pseudo-header sum; the sum over the L4 part includes it.
                let c = checksum(&pkt[start..]);
                pkt[at..at + 2].copy_from_slice(&c.to_be_bytes());
            }
            emit(pkt);
            return Ok(1);
        }
        GSO_TCPV4 => false,
        GSO_TCPV6 => true,
        t => return Err(OffloadError::UnsupportedGso(t)),
    };
    let (ip_len, th) = tcp_headers(pkt, v6).ok_or(OffloadError::BadHeaders)?;
    let hl = ip_len + th;
    let mss = usize::from(hdr.gso_size);
    if mss == 0 {
        return Err(OffloadError::ZeroSegmentSize);
    }
    let payload = &pkt[hl..];
    if payload.len() <= mss && hdr.flags & F_NEEDS_CSUM == 0 {
        emit(pkt);
        return Ok(1);
    }
    let seq0 = u32::from_be_bytes([
        pkt[ip_len + 4],
        pkt[ip_len + 5],
        pkt[ip_len + 6],
        pkt[ip_len + 7],
    ]);
    let id0 = u16::from_be_bytes([pkt[4], pkt[5]]);
    let flags0 = pkt[ip_len + 13];
    let n = payload.len().div_ceil(mss).max(1);
    if scratch.len() < hl + mss.min(payload.len()) {
        return Err(OffloadError::BufferTooSmall);
    }
    for i in 0..n {
        let off = i * mss;
        let chunk = &payload[off..(off + mss).min(payload.len())];
        let total = hl + chunk.len();
        let seg = &mut scratch[..total];
        seg[..hl].copy_from_slice(&pkt[..hl]);
        seg[hl..].copy_from_slice(chunk);
        if !v6 {
            seg[4..6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
        }
        fix_ip(seg, v6, ip_len, total);
        let t = &mut seg[ip_len..];
        t[4..8].copy_from_slice(&seq0.wrapping_add(off as u32).to_be_bytes());
        let mut fl = flags0;
        if i + 1 != n {
            fl &= !(TCP_FIN | TCP_PSH);
        }
        if i != 0 {
            fl &= !TCP_CWR;
        }
        t[13] = fl;
        t[16..18].copy_from_slice(&[0, 0]);
        let ps = pseudo_sum(seg, v6, total - ip_len);
        let c = !fold(sum16(&seg[ip_len..], ps));
        seg[ip_len + 16..ip_len + 18].copy_from_slice(&c.to_be_bytes());
        emit(seg);
    }
    Ok(n)
}

/// Builds GRO super-packets out of consecutive TCP segments of one flow, for a TUN device with
/// `IFF_VNET_HDR`. Feed it every packet to write with [`Coalescer::push`]; it calls `write`
/// with complete TUN writes (a `virtio_net_hdr` and a packet) whenever a packet does not
/// continue the pending one, and [`Coalescer::flush`] writes what is pending (call it when the
/// input runs dry, so coalescing never delays a packet).
///
/// A segment continues the pending packet when it is TCP of the same IP version, addresses,
/// ports, IPv4 TOS/TTL/DF (IPv6 traffic class, flow label, hop limit), acknowledgment number,
/// window and TCP options as the first, has only ACK (and PSH) set, carries payload, starts at
/// the next sequence number, and is no longer than the first segment; a segment shorter than
/// the first, or with PSH, ends the super-packet. Everything else is written as it is.
#[derive(Debug)]
pub struct Coalescer {
    /// `virtio_net_hdr` space followed by the pending packet.
    buf: Vec<u8>,
    /// Length of the pending packet (0: none).
    len: usize,
    ip_len: usize,
    hl: usize,
    v6: bool,
    /// Payload size of the first segment.
    seg: usize,
    /// Segments in the pending packet.
    count: usize,
    /// The next expected sequence number.
    next_seq: u32,
    /// No segment may be appended (the last one was short or had PSH).
    closed: bool,
}

impl Default for Coalescer {
    fn default() -> Self {
        Self::new()
    }
}

impl Coalescer {
    /// An empty coalescer with a buffer for one 64 KiB super-packet.
    pub fn new() -> Self {
        Self {
            buf: vec![0; VNET_HDR_LEN + MAX_SUPER],
            len: 0,
            ip_len: 0,
            hl: 0,
            v6: false,
            seg: 0,
            count: 0,
            next_seq: 0,
            closed: false,
        }
    }

    /// Adds one IP packet; may write the previously pending one first.
    pub fn push(&mut self, pkt: &[u8], write: &mut impl FnMut(&[u8])) {
        if self.len != 0 && self.try_append(pkt) {
            return;
        }
        self.flush(write);
        if !self.start(pkt) {
            write_plain(&mut self.buf, pkt, write);
        }
    }

    /// Writes the pending packet, if any.
    pub fn flush(&mut self, write: &mut impl FnMut(&[u8])) {
        if self.len == 0 {
            return;
        }
        let len = self.len;
        self.len = 0;
        let end = VNET_HDR_LEN + len;
        if self.count == 1 {
            self.buf[..VNET_HDR_LEN].copy_from_slice(&VnetHdr::default().encode());
            write(&self.buf[..end]);
            return;
        }
        let (ip_len, v6) = (self.ip_len, self.v6);
        let pkt = &mut self.buf[VNET_HDR_LEN..end];
        fix_ip(pkt, v6, ip_len, len);
        // CHECKSUM_PARTIAL: the field holds the pseudo-header sum, the kernel completes (or,
        // delivering locally, trusts) the rest.
        let ps = fold(pseudo_sum(pkt, v6, len - ip_len));
        pkt[ip_len + 16..ip_len + 18].copy_from_slice(&ps.to_be_bytes());
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
            hdr_len: self.hl as u16,
            gso_size: self.seg as u16,
            csum_start: ip_len as u16,
            csum_offset: 16,
        };
        self.buf[..VNET_HDR_LEN].copy_from_slice(&hdr.encode());
        write(&self.buf[..end]);
    }

    /// Starts a pending packet with `pkt` if it can be coalesced at all.
    fn start(&mut self, pkt: &[u8]) -> bool {
        let v6 = match pkt.first().map(|b| b >> 4) {
            Some(4) => false,
            Some(6) => true,
            _ => return false,
        };
        let Some((ip_len, th)) = tcp_headers(pkt, v6) else {
            return false;
        };
        let hl = ip_len + th;
        let flags = pkt[ip_len + 13];
        let payload = pkt.len() - hl;
        // The IP length must match what we read (no trailing bytes) for the arithmetic below.
        let stated = if v6 {
            40 + usize::from(u16::from_be_bytes([pkt[4], pkt[5]]))
        } else {
            usize::from(u16::from_be_bytes([pkt[2], pkt[3]]))
        };
        if payload == 0
            || stated != pkt.len()
            || flags & (TCP_SYN | TCP_FIN | TCP_RST | TCP_URG | TCP_CWR) != 0
            || flags & TCP_ACK == 0
            || pkt.len() > MAX_SUPER
        {
            return false;
        }
        self.buf[VNET_HDR_LEN..VNET_HDR_LEN + pkt.len()].copy_from_slice(pkt);
        self.len = pkt.len();
        self.ip_len = ip_len;
        self.hl = hl;
        self.v6 = v6;
        self.seg = payload;
        self.count = 1;
        self.next_seq = tcp_seq(pkt, ip_len).wrapping_add(payload as u32);
        self.closed = flags & TCP_PSH != 0;
        true
    }

    fn try_append(&mut self, pkt: &[u8]) -> bool {
        let (ip_len, hl) = (self.ip_len, self.hl);
        if self.closed
            || pkt.len() <= hl
            || pkt.first().map(|b| b >> 4) != Some(if self.v6 { 6 } else { 4 })
        {
            return false;
        }
        let first = &self.buf[VNET_HDR_LEN..VNET_HDR_LEN + self.len];
        // Same IP header except lengths, id and checksum; same TCP header except sequence
        // number, flags' PSH and checksum.
        let same_ip = if self.v6 {
            pkt.len() >= 40 && first[..4] == pkt[..4] && first[6..40] == pkt[6..40]
        } else {
            pkt.len() >= ip_len
                && first[0..2] == pkt[0..2]
                && first[6..10] == pkt[6..10]
                && first[12..ip_len] == pkt[12..ip_len]
        };
        if !same_ip || tcp_headers(pkt, self.v6) != Some((ip_len, hl - ip_len)) {
            return false;
        }
        let (a, b) = (&first[ip_len..hl], &pkt[ip_len..hl]);
        let flags = b[13];
        let stated = if self.v6 {
            40 + usize::from(u16::from_be_bytes([pkt[4], pkt[5]]))
        } else {
            usize::from(u16::from_be_bytes([pkt[2], pkt[3]]))
        };
        let payload = pkt.len() - hl;
        if a[0..4] != b[0..4]
            || a[8..13] != b[8..13]
            || a[14..16] != b[14..16]
            || a[18..] != b[18..]
            || flags & !TCP_PSH != TCP_ACK
            || stated != pkt.len()
            || tcp_seq(pkt, ip_len) != self.next_seq
            || payload > self.seg
            || self.len + payload > MAX_SUPER
        {
            return false;
        }
        let at = VNET_HDR_LEN + self.len;
        self.buf[at..at + payload].copy_from_slice(&pkt[hl..]);
        self.len += payload;
        self.count += 1;
        self.next_seq = self.next_seq.wrapping_add(payload as u32);
        if flags & TCP_PSH != 0 {
            self.buf[VNET_HDR_LEN + ip_len + 13] |= TCP_PSH;
            self.closed = true;
        }
        if payload < self.seg {
            self.closed = true;
        }
        true
    }
}

fn tcp_seq(pkt: &[u8], ip_len: usize) -> u32 {
    u32::from_be_bytes([
        pkt[ip_len + 4],
        pkt[ip_len + 5],
        pkt[ip_len + 6],
        pkt[ip_len + 7],
    ])
}

/// Writes `pkt` with an empty `virtio_net_hdr`, through `buf` (at least [`VNET_HDR_LEN`] +
/// the packet long; longer packets are not written).
fn write_plain(buf: &mut [u8], pkt: &[u8], write: &mut impl FnMut(&[u8])) {
    let end = VNET_HDR_LEN + pkt.len();
    if end > buf.len() {
        return;
    }
    buf[..VNET_HDR_LEN].copy_from_slice(&VnetHdr::default().encode());
    buf[VNET_HDR_LEN..end].copy_from_slice(pkt);
    write(&buf[..end]);
}

#[cfg(test)]
mod tests;
