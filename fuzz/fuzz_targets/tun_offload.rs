//! The userspace datapaths' TUN offloads (`enc_sys::offload`): `split` takes what a TUN
//! device with `IFF_VNET_HDR` hands over, `Coalescer` takes decrypted packets from a peer.
//! Neither may panic on any bytes; every super-packet the coalescer writes must be one that
//! `split` accepts, and splitting it again must give back exactly the TCP payload bytes that
//! went in.
#![no_main]

use enc_sys::offload::{Coalescer, MAX_SUPER, VNET_HDR_LEN, VnetHdr, split};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut scratch = vec![0u8; MAX_SUPER + VNET_HDR_LEN];
    if mode & 1 == 0 {
        // One read from the TUN device.
        let mut read = rest.to_vec();
        let _ = split(&mut read, &mut scratch, |pkt| {
            assert!(pkt.len() <= MAX_SUPER + VNET_HDR_LEN);
        });
        return;
    }
    // Decrypted packets, each prefixed with a 2-byte length.
    let mut packets = Vec::new();
    let mut rest = rest;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        packets.push(&rest[2..2 + len]);
        rest = &rest[2 + len..];
    }
    let mut written: Vec<Vec<u8>> = Vec::new();
    let mut c = Coalescer::new();
    for p in &packets {
        c.push(p, &mut |out| written.push(out.to_vec()));
    }
    c.flush(&mut |out| written.push(out.to_vec()));
    let mut total_out = 0usize;
    for mut w in written {
        assert!(VnetHdr::parse(&w).is_ok(), "coalescer wrote a bad virtio_net_hdr");
        assert!(w.len() <= MAX_SUPER + VNET_HDR_LEN);
        let n = split(&mut w, &mut scratch, |pkt| total_out += pkt.len())
            .expect("split refused what the coalescer wrote");
        assert!(n >= 1);
    }
    let total_in: usize = packets.iter().map(|p| p.len()).sum();
    // Segmenting again repeats the headers once per segment, so the bytes come back exactly
    // when every packet was either written as it was or re-split into the same segments.
    assert_eq!(total_out, total_in, "split(coalesce(packets)) changed the byte count");
});
