//! The encryption backend in use: WireGuard or IPsec, each behind its crate's seam.

use enc_ipsec::{IpsecBackend, IpsecKind};
use enc_wireguard::{BackendKind, WgBackend};
use std::sync::Arc;

/// The encryption backend of this node.
#[derive(Clone)]
pub enum Crypto {
    /// WireGuard (boringtun or kernel).
    Wireguard(Arc<dyn WgBackend>),
    /// IPsec (kernel XFRM or the userspace ESP engine).
    Ipsec(Arc<dyn IpsecBackend>),
    /// No encryption (`encryption.type: none`): nodes authenticate, nothing is encrypted.
    None,
}

impl Crypto {
    /// Encryption type as configured and announced in the hello: `wireguard`, `ipsec` or
    /// `none`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Crypto::Wireguard(_) => "wireguard",
            Crypto::Ipsec(_) => "ipsec",
            Crypto::None => "none",
        }
    }

    /// The implementation: `boringtun`, `kernel-wireguard`, `userspace-esp` or `kernel-xfrm`.
    pub fn implementation(&self) -> &'static str {
        match self {
            Crypto::Wireguard(wg) => match wg.kind() {
                BackendKind::Boringtun => "boringtun",
                BackendKind::Kernel => "kernel-wireguard",
            },
            Crypto::Ipsec(ipsec) => match ipsec.kind() {
                IpsecKind::Userspace => "userspace-esp",
                IpsecKind::Kernel => "kernel-xfrm",
            },
            Crypto::None => "none",
        }
    }

    /// Packets the userspace datapath dropped, or failed to handle, that belong to no peer, by
    /// kebab-case reason: every reason the implementation counts, zeros included, so that a
    /// counter exists before its first drop. Empty for kernel WireGuard and kernel XFRM (no
    /// such counters; XFRM's own are in `/proc/net/xfrm_stat`) and without encryption.
    pub fn device_drops(&self) -> Vec<(&'static str, u64)> {
        match self {
            Crypto::Wireguard(wg) => wg.device_drop_counts(),
            Crypto::Ipsec(ipsec) => ipsec.device_drop_counts(),
            Crypto::None => Vec::new(),
        }
    }

    /// The device that decrypted traffic comes out of, if there is one (the eBPF pod program
    /// accepts remote-pod traffic only from it, or with the decrypted mark).
    pub fn device(&self) -> Option<&str> {
        match self {
            Crypto::Wireguard(wg) => Some(wg.ifname()),
            Crypto::Ipsec(ipsec) => ipsec.ifname(),
            Crypto::None => None,
        }
    }
}
