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
//! A device holds several static key pairs while the node rolls its key make-before-break
//! ([`WgBackend::add_private_key`]): each peer uses one of them ([`PeerSpec::local_key`]), and a
//! peer that rolled its key is re-keyed in place ([`PeerSpec::previous_public_key`]).
//!
//! Key material ([`PrivateKey`], [`PresharedKey`]) is never printed and is wiped on drop.

mod backend;
mod boringtun_wg;
mod error;
mod fake;
mod generations;
mod kernel;
mod keyring;
mod keys;

pub use backend::{BackendKind, DeviceSnapshot, PeerSnapshot, PeerSpec, WgBackend, overhead};
pub use boringtun_wg::{BoringtunConfig, BoringtunWg, DropCounters};
pub use error::{Error, Result};
pub use fake::FakeWg;
pub use kernel::{KernelConfig, KernelWg};
pub use keys::{KEY_LEN, PresharedKey, PrivateKey, PublicKey};

/// A longest-prefix-match table from allowed IPs to peers (cryptokey routing).
///
/// Prefixes are stored truncated (host bits cleared), so `10.0.0.1/24` and `10.0.0.0/24` are the
/// same entry. Lookups do not allocate. The table itself is [`enc_sys::lpm::PrefixTable`].
pub type AllowedIps<V> = enc_sys::lpm::PrefixTable<V>;
