//! A stream of frames from an authenticated peer, fed to the control session state machine
//! and its rotation steps to the key-rotation state machine (as the follower, with the
//! effects applied): no input may panic either, the session establishes at most once, and
//! the rotation never switches to, or retires into, an epoch it has not installed.
#![no_main]

use enc_agent::control::proto::{Hello, PROTOCOL_VERSION, WireguardAnnounce, decode};
use enc_agent::control::session::{Action, Session, Timing};
use enc_key_manager::Epoch;
use enc_key_manager::rotation::{Effect, Rotation, RotationTiming, Side};
use std::collections::BTreeSet;
use libfuzzer_sys::fuzz_target;
use std::time::{Duration, Instant};

fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        node: "node-1".into(),
        encryption: "wireguard".into(),
        epoch: 0,
        wireguard: Some(WireguardAnnounce {
            public_key: "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=".into(),
            listen_port: 51820,
        }),
    };
    let (mut s, _) = Session::new("node-2", hello, Timing::default(), t0);
    let mut rest = data;
    let mut now = t0;
    let mut established = 0;
    let (mut rot, _) = Rotation::new(Side::Follower, Epoch(1), RotationTiming::default(), t0);
    let mut inbound: BTreeSet<Epoch> = BTreeSet::new();
    let mut outbound: Option<Epoch> = None;
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
                let mut effects = rot.on_tick(now);
                for a in actions {
                    if let Action::Rotation(r) = a {
                        match rot.on_message(r.step, now) {
                            Ok(fx) => effects.extend(fx),
                            Err(_) => return,
                        }
                    }
                }
                for fx in effects {
                    match fx {
                        Effect::InstallInbound(e) => {
                            inbound.insert(e);
                        }
                        Effect::SwitchOutbound(e) => {
                            assert!(inbound.contains(&e), "switched to {e} before installing it");
                            outbound = Some(e);
                        }
                        Effect::Retire(e) => {
                            assert_ne!(outbound, Some(e), "retired the outbound epoch");
                            inbound.remove(&e);
                        }
                        Effect::Send(_) => {}
                    }
                }
            }
            Err(_) => break,
        }
    }
});
