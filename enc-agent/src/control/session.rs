//! One control session with one peer, as a sans-IO state machine.
//!
//! The caller owns the TLS stream and the clock: it feeds decoded messages and periodic ticks
//! with `now`, and carries out the returned [`Action`]s. This keeps the protocol testable
//! without sockets and without waiting for real time, as boringtun does for its noise core.

use super::proto::{Goodbye, Hello, Message, PROTOCOL_VERSION, Rotate, Seq};
use enc_wireguard::PublicKey;
use std::time::{Duration, Instant};

/// Timing of a session.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Longest wait for the peer's hello after the TLS handshake.
    pub hello_timeout: Duration,
    /// Idle time after which we send a ping.
    pub ping_interval: Duration,
    /// Silence after which the peer is considered gone.
    pub dead_after: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            hello_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(5),
            dead_after: Duration::from_secs(20),
        }
    }
}

/// What the peer announced in its hello, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerHello {
    /// The epoch the peer last sent with towards us (0: none).
    pub epoch: u32,
    /// The peer's WireGuard public key and UDP port (WireGuard only).
    pub wireguard: Option<(PublicKey, u16)>,
}

/// What the caller must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Write this message to the stream.
    Send(Message),
    /// The peer is authenticated and has announced its parameters: derive keys, install them.
    Established(PeerHello),
    /// A key-rotation step from the peer, for the rotation state machine.
    Rotation(Rotate),
    /// A revocation list from the peer, to verify and adopt if newer.
    Revocations(super::proto::Revocations),
}

/// Why a session ended.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The peer's hello names another node than its certificate. An identity failure.
    #[error("peer announced node {announced:?} but its certificate is for {expected:?}")]
    WrongNode {
        /// The name the certificate was checked against.
        expected: String,
        /// The name in the hello.
        announced: String,
    },
    /// The peer's hello carries an unusable WireGuard parameter.
    #[error("peer hello has an invalid {field}: {value:?}")]
    BadHello {
        /// The field.
        field: &'static str,
        /// The value.
        value: String,
    },
    /// The peer is configured for another encryption type.
    #[error("peer encrypts with {peer:?}, this node with {local:?}")]
    EncryptionMismatch {
        /// This node's type.
        local: String,
        /// The peer's type.
        peer: String,
    },
    /// The peer speaks another protocol version.
    #[error("peer speaks control protocol {0}, this agent speaks {PROTOCOL_VERSION}")]
    Protocol(u32),
    /// A message arrived out of order.
    #[error("unexpected {0} message")]
    Unexpected(&'static str),
    /// No hello within the timeout.
    #[error("no hello from peer within {0:?}")]
    HelloTimeout(Duration),
    /// The peer went silent.
    #[error("peer silent for {0:?}")]
    Silent(Duration),
    /// The peer said goodbye.
    #[error("peer closed the session: {0}")]
    Closed(String),
}

impl SessionError {
    /// Whether the failure is about identity (the peer is then marked failed, not pending).
    pub fn is_auth_failure(&self) -> bool {
        matches!(
            self,
            SessionError::WrongNode { .. } | SessionError::EncryptionMismatch { .. }
        )
    }
}

/// State of one session.
#[derive(Debug)]
pub struct Session {
    expected_peer: String,
    encryption: String,
    timing: Timing,
    started: Instant,
    established: bool,
    last_rx: Instant,
    last_tx: Instant,
    next_seq: u64,
}

impl Session {
    /// Starts a session with the peer whose certificate was verified for `expected_peer`;
    /// returns the hello to send first.
    pub fn new(
        expected_peer: &str,
        hello: Hello,
        timing: Timing,
        now: Instant,
    ) -> (Self, Vec<Action>) {
        let s = Self {
            expected_peer: expected_peer.to_owned(),
            encryption: hello.encryption.clone(),
            timing,
            started: now,
            established: false,
            last_rx: now,
            last_tx: now,
            next_seq: 1,
        };
        (s, vec![Action::Send(Message::Hello(hello))])
    }

    /// Whether the peer's hello has been accepted.
    pub fn is_established(&self) -> bool {
        self.established
    }

    /// Handles one message from the peer.
    pub fn on_message(&mut self, msg: Message, now: Instant) -> Result<Vec<Action>, SessionError> {
        self.last_rx = now;
        match msg {
            Message::Hello(h) => {
                if self.established {
                    return Err(SessionError::Unexpected("second hello"));
                }
                if h.protocol != PROTOCOL_VERSION {
                    return Err(SessionError::Protocol(h.protocol));
                }
                if h.node != self.expected_peer {
                    return Err(SessionError::WrongNode {
                        expected: self.expected_peer.clone(),
                        announced: h.node,
                    });
                }
                if h.encryption != self.encryption {
                    return Err(SessionError::EncryptionMismatch {
                        local: self.encryption.clone(),
                        peer: h.encryption,
                    });
                }
                let wireguard = match (self.encryption.as_str(), h.wireguard) {
                    ("wireguard", Some(wg)) => {
                        let key: PublicKey =
                            wg.public_key.parse().map_err(|_| SessionError::BadHello {
                                field: "wireguard.publicKey",
                                value: wg.public_key.clone(),
                            })?;
                        if wg.listen_port == 0 {
                            return Err(SessionError::BadHello {
                                field: "wireguard.listenPort",
                                value: "0".into(),
                            });
                        }
                        Some((key, wg.listen_port))
                    }
                    ("wireguard", None) => {
                        return Err(SessionError::BadHello {
                            field: "wireguard",
                            value: "missing".into(),
                        });
                    }
                    _ => None,
                };
                self.established = true;
                Ok(vec![Action::Established(PeerHello {
                    epoch: h.epoch,
                    wireguard,
                })])
            }
            _ if !self.established => Err(SessionError::Unexpected("message before hello")),
            Message::Ping(Seq { seq }) => {
                self.last_tx = now;
                Ok(vec![Action::Send(Message::Pong(Seq { seq }))])
            }
            Message::Pong(_) => Ok(vec![]),
            Message::Goodbye(Goodbye { reason }) => Err(SessionError::Closed(reason)),
            Message::Rotate(r) => Ok(vec![Action::Rotation(r)]),
            Message::Revocations(r) => Ok(vec![Action::Revocations(r)]),
        }
    }

    /// Advances timers: hello timeout, liveness pings, dead-peer detection.
    pub fn on_tick(&mut self, now: Instant) -> Result<Vec<Action>, SessionError> {
        if !self.established {
            if now.saturating_duration_since(self.started) >= self.timing.hello_timeout {
                return Err(SessionError::HelloTimeout(self.timing.hello_timeout));
            }
            return Ok(vec![]);
        }
        let silent = now.saturating_duration_since(self.last_rx);
        if silent >= self.timing.dead_after {
            return Err(SessionError::Silent(silent));
        }
        if now.saturating_duration_since(self.last_tx) >= self.timing.ping_interval {
            self.last_tx = now;
            let seq = self.next_seq;
            self.next_seq += 1;
            return Ok(vec![Action::Send(Message::Ping(Seq { seq }))]);
        }
        Ok(vec![])
    }

    /// Notes that the caller wrote to the peer (resets the ping timer).
    pub fn on_sent(&mut self, now: Instant) {
        self.last_tx = now;
    }
}

#[cfg(test)]
mod tests {
    use super::super::proto::WireguardAnnounce;
    use super::*;
    use proptest::prelude::*;

    const KEY: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";

    fn hello(node: &str) -> Hello {
        Hello {
            protocol: PROTOCOL_VERSION,
            node: node.into(),
            encryption: "wireguard".into(),
            epoch: 0,
            wireguard: Some(WireguardAnnounce {
                public_key: KEY.into(),
                listen_port: 51820,
            }),
        }
    }

    fn start(now: Instant) -> Session {
        let (s, actions) = Session::new("node-2", hello("node-1"), Timing::default(), now);
        assert_eq!(actions, vec![Action::Send(Message::Hello(hello("node-1")))]);
        s
    }

    #[test]
    fn hello_establishes() {
        let t0 = Instant::now();
        let mut s = start(t0);
        let a = s.on_message(Message::Hello(hello("node-2")), t0).unwrap();
        assert_eq!(
            a,
            vec![Action::Established(PeerHello {
                epoch: 0,
                wireguard: Some((KEY.parse().unwrap(), 51820))
            })]
        );
        assert!(s.is_established());
        assert_eq!(
            s.on_message(Message::Hello(hello("node-2")), t0),
            Err(SessionError::Unexpected("second hello"))
        );
    }

    #[test]
    fn wrong_node_is_an_auth_failure() {
        let t0 = Instant::now();
        let err = start(t0)
            .on_message(Message::Hello(hello("node-9")), t0)
            .unwrap_err();
        assert!(err.is_auth_failure());
        assert!(err.to_string().contains("node-9"));
    }

    #[test]
    fn bad_hello_fields_are_named() {
        let t0 = Instant::now();
        let mut h = hello("node-2");
        h.wireguard.as_mut().unwrap().public_key = "not-a-key".into();
        let err = start(t0).on_message(Message::Hello(h), t0).unwrap_err();
        assert_eq!(
            err,
            SessionError::BadHello {
                field: "wireguard.publicKey",
                value: "not-a-key".into()
            }
        );
        let mut h = hello("node-2");
        h.protocol = 9;
        assert_eq!(
            start(t0).on_message(Message::Hello(h), t0),
            Err(SessionError::Protocol(9))
        );
        assert_eq!(
            start(t0).on_message(Message::Ping(Seq { seq: 1 }), t0),
            Err(SessionError::Unexpected("message before hello"))
        );
    }

    #[test]
    fn encryption_types_must_agree() {
        let t0 = Instant::now();
        let mut h = hello("node-2");
        h.encryption = "ipsec".into();
        h.wireguard = None;
        let err = start(t0).on_message(Message::Hello(h), t0).unwrap_err();
        assert!(err.is_auth_failure(), "{err}");
        assert!(err.to_string().contains("ipsec"));
        let mut h = hello("node-2");
        h.wireguard = None;
        assert!(matches!(
            start(t0).on_message(Message::Hello(h), t0),
            Err(SessionError::BadHello {
                field: "wireguard",
                ..
            })
        ));
    }

    #[test]
    fn timers() {
        let t0 = Instant::now();
        let mut s = start(t0);
        assert_eq!(s.on_tick(t0 + Duration::from_secs(9)), Ok(vec![]));
        assert!(matches!(
            s.on_tick(t0 + Duration::from_secs(10)),
            Err(SessionError::HelloTimeout(_))
        ));

        let mut s = start(t0);
        s.on_message(Message::Hello(hello("node-2")), t0).unwrap();
        let a = s.on_tick(t0 + Duration::from_secs(5)).unwrap();
        assert_eq!(a, vec![Action::Send(Message::Ping(Seq { seq: 1 }))]);
        assert_eq!(s.on_tick(t0 + Duration::from_secs(6)), Ok(vec![]));
        s.on_message(Message::Pong(Seq { seq: 1 }), t0 + Duration::from_secs(6))
            .unwrap();
        assert!(matches!(
            s.on_tick(t0 + Duration::from_secs(26)),
            Err(SessionError::Silent(_))
        ));
    }

    #[test]
    fn ping_is_answered_and_goodbye_ends() {
        let t0 = Instant::now();
        let mut s = start(t0);
        s.on_message(Message::Hello(hello("node-2")), t0).unwrap();
        assert_eq!(
            s.on_message(Message::Ping(Seq { seq: 7 }), t0).unwrap(),
            vec![Action::Send(Message::Pong(Seq { seq: 7 }))]
        );
        assert_eq!(
            s.on_message(
                Message::Goodbye(Goodbye {
                    reason: "bye".into()
                }),
                t0
            ),
            Err(SessionError::Closed("bye".into()))
        );
    }

    proptest! {
        /// Whatever arrives, in any order and at any time, the session either stays alive or
        /// ends with an error; it establishes at most once and only on a valid hello.
        #[test]
        fn any_sequence_is_handled(steps in proptest::collection::vec((0u8..5, 0u64..30), 0..40)) {
            let t0 = Instant::now();
            let mut s = start(t0);
            let mut now = t0;
            let mut established = 0;
            for (kind, dt) in steps {
                now += Duration::from_secs(dt);
                let r = match kind {
                    0 => s.on_message(Message::Hello(hello("node-2")), now),
                    1 => s.on_message(Message::Ping(Seq { seq: dt }), now),
                    2 => s.on_message(Message::Pong(Seq { seq: dt }), now),
                    3 => s.on_message(Message::Hello(hello("node-3")), now),
                    _ => s.on_tick(now),
                };
                match r {
                    Ok(actions) => {
                        established += actions.iter().filter(|a| matches!(a, Action::Established(_))).count();
                        prop_assert!(established <= 1);
                    }
                    Err(_) => break,
                }
            }
        }
    }
}
