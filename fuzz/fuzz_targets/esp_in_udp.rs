//! ESP in UDP from the network (RFC 3948): one UDP GRO message (the first two bytes give the
//! segment size, the rest are the datagrams back to back), each datagram classified by
//! `udp_payload` and, when it is ESP, opened. Nothing may panic on any bytes; the
//! classification must follow RFC 3948 (a NAT-keepalive is the one byte 0xFF, the non-ESP
//! marker four zero bytes, ESP a non-zero SPI and a whole ESP header), so an SPI of 0 never
//! reaches `InboundSa::open`, and whatever `open` accepts lies inside the datagram.
#![no_main]

use enc_ipsec::SaKeys;
use enc_ipsec::esp::{ESP_HDR_LEN, InboundSa};
use enc_ipsec::userspace::{UdpPayload, udp_payload};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((segment, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let segment = usize::from(u16::from_be_bytes(*segment)).max(1);
    let keys = SaKeys {
        spi: 0x0000_1001,
        key: [0x42; 32],
        salt: [1, 2, 3, 4],
    };
    let mut rx = InboundSa::new(&keys, 64).expect("valid window");
    let mut buf = rest.to_vec();
    for datagram in buf.chunks_mut(segment) {
        match udp_payload(datagram) {
            UdpPayload::NatKeepalive => assert_eq!(datagram, [0xff]),
            UdpPayload::NonEsp => assert_eq!(datagram[..4], [0; 4]),
            UdpPayload::Esp => {
                assert!(datagram.len() >= ESP_HDR_LEN && datagram[..4] != [0; 4]);
                if let Ok(opened) = rx.open(datagram) {
                    assert!(opened.inner.end <= datagram.len());
                }
            }
            UdpPayload::Malformed => {
                assert!(datagram.len() < ESP_HDR_LEN && datagram != [0xff]);
            }
            _ => unreachable!("a new UdpPayload kind: extend this target"),
        }
    }
});
