//! The crate's error type.

use crate::{Hook, PeerId};
use ipnet::IpNet;
use std::path::PathBuf;

/// Result of datapath operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of the datapath. Each variant names what it was working on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A CIDR was refused before it reached a map.
    #[error("invalid CIDR {cidr}: {reason}")]
    InvalidCidr {
        /// The CIDR.
        cidr: IpNet,
        /// Why.
        reason: &'static str,
    },
    /// The CIDR's prefix length is not in use yet for its family, and the datapath already
    /// holds CIDRs of the maximum number of distinct prefix lengths (the programs try one hash
    /// lookup per length in use).
    #[error(
        "cannot add CIDR {cidr}: its prefix length /{} would be one more distinct IPv{} prefix \
         length than the datapath supports (at most {limit}; in use: {})",
        cidr.prefix_len(),
        if cidr.addr().is_ipv4() { 4 } else { 6 },
        fmt_lens(in_use)
    )]
    TooManyPrefixLengths {
        /// The CIDR.
        cidr: IpNet,
        /// The limit (`common::MAX_PREFIX_LENS`).
        limit: usize,
        /// The prefix lengths in use for the CIDR's family, longest first.
        in_use: Vec<u8>,
    },
    /// Peer id 0 means "no peer" in the mark and cannot be used.
    #[error("invalid peer id {peer}: 0 means no peer")]
    InvalidPeerId {
        /// The peer id.
        peer: PeerId,
    },
    /// An interface name was refused.
    #[error("invalid interface name {ifname:?}: {reason}")]
    InvalidIfname {
        /// The name.
        ifname: String,
        /// Why.
        reason: &'static str,
    },
    /// A map entry the programs or a previous agent wrote does not decode.
    #[error("invalid entry in map {map} for key {key}: {reason}")]
    InvalidEntry {
        /// The map.
        map: &'static str,
        /// The key.
        key: u32,
        /// Why.
        reason: &'static str,
    },
    /// The library was built with `AYA_BUILD_SKIP` and embeds no eBPF object.
    #[error("this build embeds no eBPF object (built with AYA_BUILD_SKIP)")]
    NoObject,
    /// A file-system operation on the pin directory failed.
    #[error("{op} {}: {source}", path.display())]
    PinDir {
        /// What was being done (`create`, `remove`, `read`).
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The pin directory is not on a BPF file system (see [`crate::mount_bpffs`]).
    #[error("{} is not on bpffs (mount -t bpf bpf /sys/fs/bpf)", path.display())]
    NotBpffs {
        /// The pin directory.
        path: PathBuf,
    },
    /// Loading the eBPF object (maps, relocations) failed.
    #[error("load eBPF object with maps pinned in {}: {source}", pin_dir.display())]
    Load {
        /// The pin directory.
        pin_dir: PathBuf,
        /// The aya error.
        #[source]
        source: Box<aya::EbpfError>,
    },
    /// The object lacks a program or map this crate expects.
    #[error("eBPF object has no {kind} named {name}")]
    Missing {
        /// `program` or `map`.
        kind: &'static str,
        /// Its name.
        name: &'static str,
    },
    /// Loading (verifying) or running a program failed.
    #[error("program {program} ({hook}): {op}: {source}")]
    Program {
        /// The hook.
        hook: Hook,
        /// The program name.
        program: &'static str,
        /// What was being done.
        op: &'static str,
        /// The aya error.
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// A map had the wrong type or key/value size, or an operation on it failed.
    #[error("map {map}: {op}: {source}")]
    Map {
        /// The map.
        map: &'static str,
        /// What was being done (with the key where there is one).
        op: String,
        /// The aya error.
        #[source]
        source: Box<aya::maps::MapError>,
    },
    /// Attaching or detaching a program on an interface failed.
    #[error("{op} {program} ({hook}) on {ifname}: {source}")]
    Attach {
        /// What was being done.
        op: &'static str,
        /// The interface.
        ifname: String,
        /// The hook.
        hook: Hook,
        /// The program name.
        program: &'static str,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// Reading the kernel version failed.
    #[error("cannot read the kernel version: {0}")]
    KernelVersion(String),
}

impl Error {
    /// The OS error number behind the error, where there is one (a failed syscall or
    /// file-system operation).
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Self::PinDir { source, .. } => source.raw_os_error(),
            Self::Program { source, .. } => match source.as_ref() {
                aya::programs::ProgramError::SyscallError(s) => s.io_error.raw_os_error(),
                _ => None,
            },
            Self::Map { source, .. } => match source.as_ref() {
                aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error(),
                _ => None,
            },
            _ => None,
        }
    }

    /// Whether the error is about a value refused before reaching the kernel.
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            Self::InvalidCidr { .. }
                | Self::TooManyPrefixLengths { .. }
                | Self::InvalidPeerId { .. }
                | Self::InvalidIfname { .. }
        )
    }
}

/// "/26, /24, /16".
fn fmt_lens(lens: &[u8]) -> String {
    lens.iter()
        .map(|l| format!("/{l}"))
        .collect::<Vec<_>>()
        .join(", ")
}
