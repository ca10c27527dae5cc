//! ESP packets from the network: `InboundSa::open` must never panic, whatever the bytes, and
//! whatever it accepts lies inside the buffer, is an IP packet, and is then a replay.
#![no_main]

use enc_ipsec::SaKeys;
use enc_ipsec::esp::InboundSa;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let keys = SaKeys {
        spi: u32::from_be_bytes([data.first().copied().unwrap_or(0), 0, 0, 1]),
        key: [0x42; 32],
        salt: [1, 2, 3, 4],
    };
    let mut rx = InboundSa::new(&keys, 64).expect("valid window");
    let mut buf = data.to_vec();
    if let Ok(opened) = rx.open(&mut buf) {
        assert!(opened.inner.end <= buf.len());
        assert!(matches!(opened.next_header, 4 | 41));
        assert_eq!(rx.highest_seq(), opened.seq);
        let mut again = data.to_vec();
        assert!(rx.open(&mut again).is_err());
    }
});
