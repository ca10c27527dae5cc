//! The control channel: mutually authenticated TLS 1.3 between agents.
//!
//! [`proto`] is the wire format and [`session`] the per-peer protocol, both sans-IO;
//! [`net`] runs them over tokio sockets.

pub mod net;
pub mod proto;
pub mod session;
