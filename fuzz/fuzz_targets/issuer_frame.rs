//! Issuer protocol frames from the network: a request (read by the issuer from any node that
//! connects) and an answer (read by a node from an issuer). The decoders must never panic,
//! never accept a frame over the limit, and whatever they accept must re-encode to a frame
//! that decodes to the same message.
#![no_main]

use enc_api::issuer::{MAX_REQUEST, MAX_RESPONSE, decode_request, decode_response, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((req, used))) = decode_request(data) {
        assert!(used <= data.len() && used <= 4 + MAX_REQUEST);
        let again = encode(&req);
        let (back, n) = decode_request(&again).expect("re-encoded request decodes").expect("complete");
        assert_eq!(back, req);
        assert_eq!(n, again.len());
    }
    if let Ok(Some((resp, used))) = decode_response(data) {
        assert!(used <= data.len() && used <= 4 + MAX_RESPONSE);
        let again = encode(&resp);
        let (back, _) = decode_response(&again).expect("re-encoded answer decodes").expect("complete");
        assert_eq!(back, resp);
    }
});
