//! Reading the captures that tests take on the underlay (classic pcap, Ethernet frames).

use anyhow::{Context, bail};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

/// IP protocol number of TCP.
pub const TCP: u8 = 6;
/// IP protocol number of UDP.
pub const UDP: u8 = 17;

/// One captured frame.
#[derive(Clone, Debug)]
pub struct Frame {
    /// The whole frame as captured.
    pub data: Vec<u8>,
    /// Ethertype.
    pub ethertype: u16,
    /// The IP header's fields, for IPv4 and IPv6 frames.
    pub ip: Option<IpInfo>,
}

/// Addressing of an IP packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpInfo {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Protocol (IPv4) or next header (IPv6, without extension headers).
    pub proto: u8,
    /// Source port for TCP and UDP.
    pub sport: Option<u16>,
    /// Destination port for TCP and UDP.
    pub dport: Option<u16>,
}

impl IpInfo {
    /// Whether either port equals `port`.
    pub fn has_port(&self, port: u16) -> bool {
        self.sport == Some(port) || self.dport == Some(port)
    }
}

/// Reads a pcap file.
pub fn read(path: &Path) -> anyhow::Result<Vec<Frame>> {
    let bytes = std::fs::read(path).with_context(|| format!("read capture {}", path.display()))?;
    parse(&bytes).with_context(|| format!("parse capture {}", path.display()))
}

/// Parses classic pcap bytes holding Ethernet frames.
pub fn parse(bytes: &[u8]) -> anyhow::Result<Vec<Frame>> {
    if bytes.len() < 24 {
        bail!("pcap file of {} bytes has no global header", bytes.len());
    }
    let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
    let le = match magic {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        _ => bail!("not a pcap file (magic {magic:02x?})"),
    };
    let u32_at = |b: &[u8], at: usize| -> u32 {
        let x = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        if le {
            u32::from_le_bytes(x)
        } else {
            u32::from_be_bytes(x)
        }
    };
    let linktype = u32_at(bytes, 20);
    if linktype != 1 {
        bail!("capture link type {linktype} is not Ethernet (1)");
    }
    let mut frames = Vec::new();
    let mut at = 24;
    while at + 16 <= bytes.len() {
        let caplen = u32_at(bytes, at + 8) as usize;
        let start = at + 16;
        let Some(data) = bytes.get(start..start + caplen) else {
            break; // truncated last record: capture stopped mid-write
        };
        frames.push(frame(data));
        at = start + caplen;
    }
    Ok(frames)
}

fn frame(data: &[u8]) -> Frame {
    let ethertype = if data.len() >= 14 {
        u16::from_be_bytes([data[12], data[13]])
    } else {
        0
    };
    let ip = data.get(14..).and_then(|p| match ethertype {
        0x0800 => ipv4(p),
        0x86dd => ipv6(p),
        _ => None,
    });
    Frame {
        data: data.to_vec(),
        ethertype,
        ip,
    }
}

fn ports(proto: u8, l4: &[u8]) -> (Option<u16>, Option<u16>) {
    if (proto == TCP || proto == UDP) && l4.len() >= 4 {
        (
            Some(u16::from_be_bytes([l4[0], l4[1]])),
            Some(u16::from_be_bytes([l4[2], l4[3]])),
        )
    } else {
        (None, None)
    }
}

fn ipv4(p: &[u8]) -> Option<IpInfo> {
    if p.len() < 20 || p[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let proto = p[9];
    let (sport, dport) = ports(proto, p.get(ihl..)?);
    Some(IpInfo {
        src: IpAddr::V4(Ipv4Addr::new(p[12], p[13], p[14], p[15])),
        dst: IpAddr::V4(Ipv4Addr::new(p[16], p[17], p[18], p[19])),
        proto,
        sport,
        dport,
    })
}

fn ipv6(p: &[u8]) -> Option<IpInfo> {
    if p.len() < 40 || p[0] >> 4 != 6 {
        return None;
    }
    let addr = |at: usize| -> Option<IpAddr> {
        let b: [u8; 16] = p.get(at..at + 16)?.try_into().ok()?;
        Some(IpAddr::V6(Ipv6Addr::from(b)))
    };
    let proto = p[6];
    let (sport, dport) = ports(proto, p.get(40..)?);
    Some(IpInfo {
        src: addr(8)?,
        dst: addr(24)?,
        proto,
        sport,
        dport,
    })
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pcap_with(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut out = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&65535u32.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
        for f in frames {
            out.extend_from_slice(&[0; 8]);
            out.extend_from_slice(&(f.len() as u32).to_le_bytes());
            out.extend_from_slice(&(f.len() as u32).to_le_bytes());
            out.extend_from_slice(f);
        }
        out
    }

    fn udp_frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x08, 0x00]);
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, UDP, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        ip.extend_from_slice(&51820u16.to_be_bytes());
        ip.extend_from_slice(&4242u16.to_be_bytes());
        ip.extend_from_slice(&[0, 0, 0, 0]);
        ip.extend_from_slice(payload);
        f.extend_from_slice(&ip);
        f
    }

    #[test]
    fn finds_addresses_ports_and_marker() {
        let bytes = pcap_with(&[udp_frame(b"xx enc-marker yy"), udp_frame(b"nothing")]);
        let frames = parse(&bytes).unwrap();
        assert_eq!(frames.len(), 2);
        let ip = frames[0].ip.as_ref().unwrap();
        assert_eq!(ip.src, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(
            (ip.proto, ip.sport, ip.dport),
            (UDP, Some(51820), Some(4242))
        );
        assert!(ip.has_port(51820));
        assert!(contains(&frames[0].data, b"enc-marker"));
        assert!(!contains(&frames[1].data, b"enc-marker"));
    }

    #[test]
    fn rejects_non_pcap() {
        assert!(parse(b"definitely not a capture file").is_err());
    }
}
