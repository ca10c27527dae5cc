//! WireGuard backends for enc.
//!
//! [`WgBackend`] is the seam the agent drives: idempotent `upsert_peer` / `delete_peer` / `dump`.
//! Implementations:
//! - [`BoringtunWg`]: userspace WireGuard (boringtun's noise core) on a TUN device, for kernels
//!   without the WireGuard module;
//! - [`FakeWg`]: an in-memory fake for the agent's unit tests;
//! - kernel WireGuard over generic netlink plugs in beside them as another `WgBackend`
//!   ([`BackendKind::Kernel`]).
//!
//! Key material ([`PrivateKey`], [`PresharedKey`]) is never printed and is wiped on drop.

mod allowed_ips;
mod backend;
mod boringtun_wg;
mod error;
mod fake;
mod keys;
mod sys;

pub use allowed_ips::AllowedIps;
pub use backend::{BackendKind, DeviceSnapshot, PeerSnapshot, PeerSpec, WgBackend, overhead};
pub use boringtun_wg::{BoringtunConfig, BoringtunWg, DropCounters};
pub use error::{Error, Result};
pub use fake::FakeWg;
pub use keys::{KEY_LEN, PresharedKey, PrivateKey, PublicKey};
