//! Control-channel frames from a peer: the decoder must never panic, and whatever it accepts
//! must re-encode to a frame that decodes to the same message.
#![no_main]

use enc_agent::control::proto::{decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((msg, used))) = decode(data) {
        assert!(used <= data.len());
        let again = encode(&msg);
        let (back, n) = decode(&again).expect("re-encoded frame decodes").expect("complete frame");
        assert_eq!(back, msg);
        assert_eq!(n, again.len());
    }
});
