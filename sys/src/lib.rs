//! The shared bottom layer of enc's backend crates.
//!
//! The backends (`enc-wireguard`, `enc-ipsec`, `enc-geneve-vxlan`, `enc-tunnel-ebpf`) must not
//! depend on each other, yet need the same small pieces of kernel plumbing. Those live here, once:
//!
//! - [`tun`]: interface-name validation and opening a TUN device;
//! - [`offload`]: the TUN `virtio_net_hdr`, TCP segmentation and GRO coalescing;
//! - [`udp`]: UDP GSO sends and GRO receives;
//! - [`mmsg`]: batched sends and receives (`sendmmsg`, `recvmmsg`), with UDP GSO and GRO;
//! - [`poll`]: waiting for a descriptor to become readable;
//! - [`lpm`]: a longest-prefix-match table from IP prefixes to values;
//! - [`netlink`]: a synchronous netlink connection (request, ack, dump) generic over the message
//!   family;
//! - [`sockbuf`]: socket buffers large enough for a userspace datapath;
//! - [`throttle`]: at most one log line per interval from a packet path.
//!
//! This crate depends on no enc crate. Its [`Error`] is deliberately small and carries no
//! caller context: each backend maps it into its own error, adding the interface, SA or route
//! the call was about.

pub mod error;
pub mod lpm;
pub mod mmsg;
pub mod netlink;
pub mod offload;
pub mod poll;
pub mod sockbuf;
pub mod throttle;
pub mod tun;
pub mod udp;

pub use error::{Error, Result};
