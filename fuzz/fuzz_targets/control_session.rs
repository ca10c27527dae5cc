//! A stream of frames from an authenticated peer, fed to the control session state machine:
//! no input may panic it, and it establishes at most once.
#![no_main]

use enc_agent::control::proto::{Hello, PROTOCOL_VERSION, WireguardAnnounce, decode};
use enc_agent::control::session::{Action, Session, Timing};
use libfuzzer_sys::fuzz_target;
use std::time::{Duration, Instant};

fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        node: "node-1".into(),
        encryption: "wireguard".into(),
        wireguard: Some(WireguardAnnounce {
            public_key: "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=".into(),
            listen_port: 51820,
        }),
    };
    let (mut s, _) = Session::new("node-2", hello, Timing::default(), t0);
    let mut rest = data;
    let mut now = t0;
    let mut established = 0;
    while let Ok(Some((msg, used))) = decode(rest) {
        rest = &rest[used..];
        now += Duration::from_millis(u64::from(used as u8) * 100);
        match s.on_message(msg, now).and_then(|mut a| {
            a.extend(s.on_tick(now)?);
            Ok(a)
        }) {
            Ok(actions) => {
                established += actions.iter().filter(|a| matches!(a, Action::Established(_))).count();
                assert!(established <= 1);
            }
            Err(_) => break,
        }
    }
});
