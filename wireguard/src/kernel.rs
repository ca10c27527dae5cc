//! [`WgBackend`] on the kernel's WireGuard: a `wireguard` link created over rtnetlink and
//! configured with `WG_CMD_SET_DEVICE` / `WG_CMD_GET_DEVICE` over generic netlink
//! (netlink-packet-wireguard, MIT; no LGPL code). `wg show` lists what it configured.
//!
//! # How a session survives each rotation step
//!
//! - **Preshared key (every epoch):** the kernel mixes the PSK into handshakes only. Setting a
//!   new one leaves the current session's keypairs alone, so traffic keeps flowing under them;
//!   the next handshake (a rekey after at most 120 s, or one the peer starts) uses the new PSK.
//!   If the two ends change it a moment apart and a handshake falls in between, it fails and
//!   is retried (5 s later) while the established keypairs keep carrying traffic, for up to
//!   180 s (`REJECT_AFTER_TIME`). No packet is lost.
//! - **Static key pair (a key roll):** a kernel device holds exactly one private key and
//!   identifies a peer by exactly one public key, so there is no make-before-break as with
//!   boringtun's key ring. Setting a new private key expires the current keypairs and starts
//!   a handshake with the new key; the kernel queues the packets meanwhile (up to 128 per
//!   peer). A peer whose public key changed (`previous_public_key`) is replaced in one
//!   `WG_CMD_SET_DEVICE` (old peer removed, new one added with the same allowed IPs and
//!   preshared key), which drops the old peer's sessions. Each roll therefore costs about one
//!   handshake round trip; what is sent during it is queued or, beyond the queue, lost.
//!   `local_key` is ignored: the device's one key is the local key of every peer.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use enc_sys::netlink::Conn;
use ipnet::IpNet;
use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST};
use netlink_packet_generic::GenlMessage;
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};
use netlink_sys::protocols::{NETLINK_GENERIC, NETLINK_ROUTE};
use zeroize::Zeroize;

use crate::backend::{BackendKind, DeviceSnapshot, PeerSnapshot, PeerSpec, WgBackend};
use crate::error::{Error, Result};
use crate::keys::{KEY_LEN, PrivateKey, PublicKey};

type WgMsg = GenlMessage<WireguardMessage>;

const OP_NEWLINK: &str = "RTM_NEWLINK type wireguard";
const OP_DELLINK: &str = "RTM_DELLINK";
const OP_FAMILY: &str = "CTRL_CMD_GETFAMILY wireguard";
const OP_SET: &str = "WG_CMD_SET_DEVICE";
const OP_GET: &str = "WG_CMD_GET_DEVICE";

/// How to start a kernel WireGuard device.
pub struct KernelConfig {
    /// Interface name.
    pub ifname: String,
    /// The device's static private key.
    pub private_key: PrivateKey,
    /// UDP listen port (the kernel binds all addresses).
    pub listen_port: u16,
}

/// A kernel WireGuard device, configured over generic netlink. Deleted on drop.
pub struct KernelWg {
    ifname: String,
    genl: Conn<WgMsg>,
    rtnl: Conn<RouteNetlinkMessage>,
    family: u16,
    state: Mutex<State>,
}

struct State {
    private_key: PrivateKey,
    public_key: PublicKey,
    listen_port: u16,
}

impl std::fmt::Debug for KernelWg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelWg")
            .field("ifname", &self.ifname)
            .field("family", &self.family)
            .finish_non_exhaustive()
    }
}

fn netlink_error(op: &'static str, ifname: &str, e: enc_sys::Error) -> Error {
    let (detail, io_error) = match e {
        enc_sys::Error::Kernel { source, .. } => (source.to_string(), Some(source)),
        enc_sys::Error::Syscall { call, source } => (format!("{call}: {source}"), Some(source)),
        other => (other.to_string(), None),
    };
    Error::Netlink {
        op,
        ifname: ifname.to_owned(),
        detail,
        io_error,
    }
}

/// Zeroes the key attributes of a message once it is serialised (requests) or read (replies).
fn scrub(message: &mut WgMsg) {
    for attr in &mut message.payload.attributes {
        match attr {
            WireguardAttribute::PrivateKey(k) => k.zeroize(),
            WireguardAttribute::Peers(peers) => {
                for peer in peers {
                    for a in &mut peer.0 {
                        if let WireguardPeerAttribute::PresharedKey(k) = a {
                            k.zeroize();
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

impl KernelWg {
    /// Creates the `wireguard` link `ifname` (or adopts one left by an earlier run), resolves
    /// the generic netlink family, and sets the private key and listen port. Fails with an
    /// [`Error::Netlink`] whose errno is `EOPNOTSUPP` when the kernel has no WireGuard (see
    /// [`Error::is_unsupported`]).
    pub fn start(cfg: KernelConfig) -> Result<Self> {
        let KernelConfig {
            ifname,
            private_key,
            listen_port,
        } = cfg;
        enc_sys::tun::validate_ifname(&ifname).map_err(|e| Error::from_sys(&ifname, e))?;
        let rtnl = Conn::<RouteNetlinkMessage>::open(NETLINK_ROUTE)
            .map_err(|e| netlink_error(OP_NEWLINK, &ifname, e))?;
        let mut link = LinkMessage::default();
        link.attributes.push(LinkAttribute::IfName(ifname.clone()));
        link.attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                InfoKind::Wireguard,
            )]));
        match rtnl.request(
            RouteNetlinkMessage::NewLink(link),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            OP_NEWLINK,
        ) {
            Ok(_) => tracing::debug!(%ifname, "created kernel WireGuard link"),
            Err(enc_sys::Error::Kernel { source, .. })
                if source.raw_os_error() == Some(libc::EEXIST) =>
            {
                tracing::info!(%ifname, "adopting the existing WireGuard link");
            }
            Err(e) => return Err(netlink_error(OP_NEWLINK, &ifname, e)),
        }
        let family = resolve_family(&ifname)?;
        let genl = Conn::<WgMsg>::open(NETLINK_GENERIC)
            .map_err(|e| netlink_error(OP_SET, &ifname, e))?
            .scrubbing(scrub);
        let public_key = private_key.public_key();
        let wg = Self {
            ifname,
            genl,
            rtnl,
            family,
            state: Mutex::new(State {
                private_key,
                public_key,
                listen_port,
            }),
        };
        {
            let st = wg.lock();
            let attrs = vec![
                WireguardAttribute::PrivateKey(*st.private_key.expose_secret()),
                WireguardAttribute::ListenPort(listen_port),
            ];
            if let Err(e) = wg.set(attrs) {
                drop(st);
                wg.delete_link();
                return Err(e);
            }
        }
        Ok(wg)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn message(&self, cmd: WireguardCmd, mut attributes: Vec<WireguardAttribute>) -> WgMsg {
        attributes.insert(0, WireguardAttribute::IfName(self.ifname.clone()));
        let mut m = GenlMessage::from_payload(WireguardMessage { cmd, attributes });
        m.set_resolved_family_id(self.family);
        m
    }

    fn set(&self, attributes: Vec<WireguardAttribute>) -> Result<()> {
        let m = self.message(WireguardCmd::SetDevice, attributes);
        self.genl
            .request(m, NLM_F_REQUEST | NLM_F_ACK, OP_SET)
            .map(drop)
            .map_err(|e| netlink_error(OP_SET, &self.ifname, e))
    }

    fn get(&self) -> Result<KernelDevice> {
        let replies = self
            .genl
            .dump(|| self.message(WireguardCmd::GetDevice, Vec::new()), OP_GET)
            .map_err(|e| netlink_error(OP_GET, &self.ifname, e))?;
        let mut payloads: Vec<WireguardMessage> = replies.into_iter().map(|m| m.payload).collect();
        let device = parse_device(&payloads);
        for p in &mut payloads {
            scrub_payload(p);
        }
        device.map_err(|detail| Error::Netlink {
            op: OP_GET,
            ifname: self.ifname.clone(),
            detail,
            io_error: None,
        })
    }

    fn delete_link(&self) {
        let mut link = LinkMessage::default();
        link.attributes
            .push(LinkAttribute::IfName(self.ifname.clone()));
        match self.rtnl.request(
            RouteNetlinkMessage::DelLink(link),
            NLM_F_REQUEST | NLM_F_ACK,
            OP_DELLINK,
        ) {
            Ok(_) => tracing::info!(ifname = %self.ifname, "deleted kernel WireGuard link"),
            Err(e) => {
                tracing::warn!(ifname = %self.ifname, error = %netlink_error(OP_DELLINK, &self.ifname, e), "cannot delete kernel WireGuard link")
            }
        }
    }
}

fn scrub_payload(p: &mut WireguardMessage) {
    let mut m = GenlMessage::from_payload(std::mem::replace(
        p,
        WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: Vec::new(),
        },
    ));
    scrub(&mut m);
    *p = m.payload;
}

impl Drop for KernelWg {
    fn drop(&mut self) {
        self.delete_link();
    }
}

/// The id of the `wireguard` generic netlink family.
fn resolve_family(ifname: &str) -> Result<u16> {
    let conn = Conn::<GenlMessage<GenlCtrl>>::open(NETLINK_GENERIC)
        .map_err(|e| netlink_error(OP_FAMILY, ifname, e))?;
    let mut m = GenlMessage::from_payload(GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName("wireguard".to_owned())],
    });
    m.set_resolved_family_id(libc::GENL_ID_CTRL as u16);
    let replies = conn
        .request(m, NLM_F_REQUEST | NLM_F_ACK, OP_FAMILY)
        .map_err(|e| netlink_error(OP_FAMILY, ifname, e))?;
    replies
        .iter()
        .flat_map(|r| r.payload.nlas.iter())
        .find_map(|a| match a {
            GenlCtrlAttrs::FamilyId(id) => Some(*id),
            _ => None,
        })
        .ok_or_else(|| Error::Netlink {
            op: OP_FAMILY,
            ifname: ifname.to_owned(),
            detail: "the reply carries no family id".into(),
            io_error: None,
        })
}

/// One peer as the kernel reports it (keys are public only; the preshared key is reduced to
/// whether it is set and a comparison with the desired one).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct KernelPeer {
    pub(crate) preshared_key: Option<[u8; KEY_LEN]>,
    pub(crate) endpoint: Option<SocketAddr>,
    pub(crate) keepalive: u16,
    pub(crate) allowed_ips: Vec<IpNet>,
    pub(crate) last_handshake: Option<(i64, i64)>,
    pub(crate) rx_bytes: u64,
    pub(crate) tx_bytes: u64,
}

impl Drop for KernelPeer {
    fn drop(&mut self) {
        if let Some(k) = &mut self.preshared_key {
            k.zeroize();
        }
    }
}

/// The device as the kernel reports it.
#[derive(Debug, Default)]
pub(crate) struct KernelDevice {
    pub(crate) public_key: Option<PublicKey>,
    pub(crate) listen_port: u16,
    pub(crate) peers: BTreeMap<PublicKey, KernelPeer>,
}

/// Merges the messages of one `WG_CMD_GET_DEVICE` dump. A peer with many allowed IPs is split
/// over several messages, each repeating its public key.
pub(crate) fn parse_device(
    messages: &[WireguardMessage],
) -> std::result::Result<KernelDevice, String> {
    let mut device = KernelDevice::default();
    for m in messages {
        for attr in &m.attributes {
            match attr {
                WireguardAttribute::PublicKey(k) => device.public_key = Some(PublicKey(*k)),
                WireguardAttribute::ListenPort(p) => device.listen_port = *p,
                WireguardAttribute::Peers(peers) => {
                    for peer in peers {
                        parse_peer(peer, &mut device.peers)?;
                    }
                }
                _ => {}
            }
        }
    }
    Ok(device)
}

fn parse_peer(
    peer: &WireguardPeer,
    peers: &mut BTreeMap<PublicKey, KernelPeer>,
) -> std::result::Result<(), String> {
    let key = peer
        .0
        .iter()
        .find_map(|a| match a {
            WireguardPeerAttribute::PublicKey(k) => Some(PublicKey(*k)),
            _ => None,
        })
        .ok_or("a peer without a public key")?;
    let entry = peers.entry(key).or_default();
    for a in &peer.0 {
        match a {
            WireguardPeerAttribute::PresharedKey(k) => {
                entry.preshared_key = (k.iter().any(|b| *b != 0)).then_some(*k);
            }
            WireguardPeerAttribute::Endpoint(e) => entry.endpoint = Some(*e),
            WireguardPeerAttribute::PersistentKeepalive(k) => entry.keepalive = *k,
            WireguardPeerAttribute::LastHandshake(t) => {
                entry.last_handshake =
                    (t.seconds != 0 || t.nano_seconds != 0).then_some((t.seconds, t.nano_seconds));
            }
            WireguardPeerAttribute::RxBytes(b) => entry.rx_bytes = *b,
            WireguardPeerAttribute::TxBytes(b) => entry.tx_bytes = *b,
            WireguardPeerAttribute::AllowedIps(ips) => {
                for ip in ips {
                    entry.allowed_ips.push(parse_allowed_ip(ip)?);
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn parse_allowed_ip(ip: &WireguardAllowedIp) -> std::result::Result<IpNet, String> {
    let mut addr = None;
    let mut cidr = None;
    for a in &ip.0 {
        match a {
            WireguardAllowedIpAttr::IpAddr(x) => addr = Some(*x),
            WireguardAllowedIpAttr::Cidr(c) => cidr = Some(*c),
            _ => {}
        }
    }
    match (addr, cidr) {
        (Some(a), Some(c)) => IpNet::new(a, c).map_err(|e| format!("allowed IP {a}/{c}: {e}")),
        _ => Err(format!("an allowed IP without address or mask: {ip:?}")),
    }
}

fn allowed_ip(net: &IpNet) -> WireguardAllowedIp {
    let family = match net.addr() {
        IpAddr::V4(_) => WireguardAddressFamily::Ipv4,
        IpAddr::V6(_) => WireguardAddressFamily::Ipv6,
    };
    WireguardAllowedIp(vec![
        WireguardAllowedIpAttr::Family(family),
        WireguardAllowedIpAttr::IpAddr(net.addr()),
        WireguardAllowedIpAttr::Cidr(net.prefix_len()),
    ])
}

/// The peer configuration that brings `current` (absent: a new peer) to `spec`, or `None`
/// when nothing differs (no write, so an established session is left alone). `public_key` is
/// the key the peer is written under.
///
/// Only what differs is written. Allowed IPs in particular are sent (with
/// `WGPEER_F_REPLACE_ALLOWEDIPS`) only when they change: the kernel removes the old set
/// before adding the new one, and packets routed in between find no peer and are dropped
/// (a preshared-key rotation that rewrote them lost 4 to 7 packets each time at 1000/s).
pub(crate) fn peer_update(
    public_key: &PublicKey,
    current: Option<&KernelPeer>,
    spec: &PeerSpec,
) -> Option<WireguardPeer> {
    let mut want_ips: Vec<IpNet> = spec.allowed_ips.clone();
    want_ips.sort();
    want_ips.dedup();
    let want_psk = spec.preshared_key.as_ref().map(|k| *k.expose_secret());
    let want_keepalive = spec.persistent_keepalive.unwrap_or(0);
    let (ips_differ, psk_differs, keepalive_differs, endpoint_differs) = match current {
        None => (true, true, true, spec.endpoint.is_some()),
        Some(c) => {
            let mut have_ips = c.allowed_ips.clone();
            have_ips.sort();
            (
                have_ips != want_ips,
                c.preshared_key != want_psk,
                c.keepalive != want_keepalive,
                spec.endpoint.is_some_and(|e| c.endpoint != Some(e)),
            )
        }
    };
    if !(ips_differ || psk_differs || keepalive_differs || endpoint_differs) {
        return None;
    }
    let mut attrs = vec![WireguardPeerAttribute::PublicKey(*public_key.as_bytes())];
    if psk_differs {
        // All zeroes clears the key.
        attrs.push(WireguardPeerAttribute::PresharedKey(
            want_psk.unwrap_or([0; KEY_LEN]),
        ));
    }
    if keepalive_differs {
        attrs.push(WireguardPeerAttribute::PersistentKeepalive(want_keepalive));
    }
    if ips_differ {
        attrs.push(WireguardPeerAttribute::Flags(
            WireguardPeerFlags::ReplaceAllowedIps,
        ));
        attrs.push(WireguardPeerAttribute::AllowedIps(
            want_ips.iter().map(allowed_ip).collect(),
        ));
    }
    if endpoint_differs && let Some(e) = spec.endpoint {
        attrs.push(WireguardPeerAttribute::Endpoint(e));
    }
    Some(WireguardPeer(attrs))
}

fn remove_peer(key: &PublicKey) -> WireguardPeer {
    WireguardPeer(vec![
        WireguardPeerAttribute::PublicKey(*key.as_bytes()),
        WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
    ])
}

fn age(handshake: Option<(i64, i64)>) -> Option<Duration> {
    let (s, ns) = handshake?;
    let at = UNIX_EPOCH + Duration::new(u64::try_from(s).ok()?, u32::try_from(ns).ok()?);
    Some(SystemTime::now().duration_since(at).unwrap_or_default())
}

impl WgBackend for KernelWg {
    fn kind(&self) -> BackendKind {
        BackendKind::Kernel
    }

    fn ifname(&self) -> &str {
        &self.ifname
    }

    fn public_key(&self) -> PublicKey {
        self.lock().public_key
    }

    fn add_private_key(&self, key: PrivateKey) -> Result<PublicKey> {
        let public = key.public_key();
        let mut st = self.lock();
        if public == st.public_key {
            return Ok(public);
        }
        self.set(vec![WireguardAttribute::PrivateKey(*key.expose_secret())])?;
        tracing::info!(ifname = %self.ifname, key = %public, "kernel WireGuard static key replaced; sessions re-handshake");
        st.private_key = key;
        st.public_key = public;
        Ok(public)
    }

    fn retain_private_keys(&self, keep: &[PublicKey]) -> Result<()> {
        let st = self.lock();
        if keep.contains(&st.public_key) {
            Ok(())
        } else {
            Err(Error::PrimaryKeyDropped {
                ifname: self.ifname.clone(),
                key: st.public_key,
            })
        }
    }

    fn private_keys(&self) -> Vec<PublicKey> {
        vec![self.lock().public_key]
    }

    fn listen_port(&self) -> u16 {
        self.lock().listen_port
    }

    fn upsert_peer(&self, spec: &PeerSpec) -> Result<()> {
        let _st = self.lock();
        let device = self.get()?;
        let current = device.peers.get(&spec.public_key);
        let mut peers = Vec::new();
        let mut inherited = None;
        if current.is_none()
            && let Some(prev) = spec.previous_public_key
            && let Some(old) = device.peers.get(&prev)
        {
            // The peer rolled its static key: replace it in one request, keeping its
            // endpoint if the spec names none.
            peers.push(remove_peer(&prev));
            inherited = old.endpoint;
            tracing::info!(ifname = %self.ifname, from = %prev, to = %spec.public_key, "kernel WireGuard peer re-keyed; its sessions re-handshake");
        }
        let Some(mut update) = peer_update(&spec.public_key, current, spec) else {
            return Ok(());
        };
        if spec.endpoint.is_none()
            && let Some(e) = inherited
        {
            update.0.push(WireguardPeerAttribute::Endpoint(e));
        }
        peers.push(update);
        self.set(vec![WireguardAttribute::Peers(peers)])
    }

    fn delete_peer(&self, key: &PublicKey) -> Result<()> {
        let _st = self.lock();
        // The kernel ignores the removal of a peer it does not have.
        self.set(vec![WireguardAttribute::Peers(vec![remove_peer(key)])])
    }

    fn dump(&self) -> Result<DeviceSnapshot> {
        let st = self.lock();
        let device = self.get()?;
        if device.public_key.is_some_and(|k| k != st.public_key) {
            return Err(Error::Netlink {
                op: OP_GET,
                ifname: self.ifname.clone(),
                detail: format!(
                    "the device's public key is {}, not {} as configured (changed behind enc's back?)",
                    device.public_key.map(|k| k.to_string()).unwrap_or_default(),
                    st.public_key
                ),
                io_error: None,
            });
        }
        let peers = device
            .peers
            .iter()
            .map(|(key, p)| {
                let last_handshake = age(p.last_handshake);
                let mut allowed_ips = p.allowed_ips.clone();
                allowed_ips.sort();
                PeerSnapshot {
                    public_key: *key,
                    local_key: st.public_key,
                    endpoint: p.endpoint,
                    allowed_ips,
                    last_handshake,
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                    has_preshared_key: p.preshared_key.is_some(),
                    generations: 1,
                    current_has_session: last_handshake.is_some(),
                }
            })
            .collect();
        Ok(DeviceSnapshot {
            ifname: self.ifname.clone(),
            public_key: st.public_key,
            listen_port: device.listen_port,
            peers,
        })
    }
}

impl Error {
    /// True when the kernel has no WireGuard: the `wireguard` link kind is unknown
    /// (`EOPNOTSUPP`, "Unknown device type") or the generic netlink family is missing.
    pub fn is_unsupported(&self) -> bool {
        match self {
            Error::Netlink {
                op,
                io_error: Some(e),
                ..
            } => {
                e.raw_os_error() == Some(libc::EOPNOTSUPP)
                    || (*op == OP_FAMILY && e.raw_os_error() == Some(libc::ENOENT))
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PresharedKey;
    use netlink_packet_core::{Emitable, ParseableParametrized};
    use netlink_packet_generic::GenlHeader;
    use netlink_packet_wireguard::WireguardTimeSpec;
    use proptest::prelude::*;

    fn key(b: u8) -> PublicKey {
        PublicKey([b; KEY_LEN])
    }

    fn spec(psk: Option<u8>, ips: &[&str]) -> PeerSpec {
        PeerSpec {
            public_key: key(1),
            preshared_key: psk.map(|b| PresharedKey::from_bytes([b; KEY_LEN])),
            endpoint: Some("10.0.0.2:51820".parse().unwrap()),
            allowed_ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            persistent_keepalive: None,
            local_key: None,
            previous_public_key: None,
        }
    }

    fn applied(spec: &PeerSpec) -> KernelPeer {
        KernelPeer {
            preshared_key: spec.preshared_key.as_ref().map(|k| *k.expose_secret()),
            endpoint: spec.endpoint,
            keepalive: 0,
            allowed_ips: spec.allowed_ips.clone(),
            ..KernelPeer::default()
        }
    }

    #[test]
    fn unchanged_peer_is_not_written() {
        let s = spec(Some(7), &["10.1.0.0/24", "fd00:1::/64"]);
        let mut current = applied(&s);
        current.allowed_ips.reverse();
        current.rx_bytes = 99;
        current.last_handshake = Some((1, 2));
        assert!(peer_update(&s.public_key, Some(&current), &s).is_none());
        // No endpoint in the spec keeps whatever the kernel has (roamed).
        let mut roaming = s.clone();
        roaming.endpoint = None;
        assert!(peer_update(&s.public_key, Some(&current), &roaming).is_none());
    }

    fn has(update: &WireguardPeer, f: impl Fn(&WireguardPeerAttribute) -> bool) -> bool {
        update.0.iter().any(f)
    }

    #[test]
    fn only_what_differs_is_written() {
        let s = spec(Some(7), &["10.1.0.0/24"]);
        let current = applied(&s);
        let is_psk =
            |a: &WireguardPeerAttribute| matches!(a, WireguardPeerAttribute::PresharedKey(_));
        let is_ips =
            |a: &WireguardPeerAttribute| matches!(a, WireguardPeerAttribute::AllowedIps(_));
        let is_replace = |a: &WireguardPeerAttribute| {
            *a == WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps)
        };

        // A preshared-key rotation writes the key alone: the allowed IPs stay in place, so
        // no packet finds the peer without them.
        let rotated = spec(Some(8), &["10.1.0.0/24"]);
        let u = peer_update(&rotated.public_key, Some(&current), &rotated).unwrap();
        assert!(has(&u, |a| *a
            == WireguardPeerAttribute::PresharedKey([8; KEY_LEN])));
        assert!(!has(&u, is_ips) && !has(&u, is_replace), "{u:?}");

        let cleared = spec(None, &["10.1.0.0/24"]);
        let u = peer_update(&cleared.public_key, Some(&current), &cleared).unwrap();
        assert!(has(&u, |a| *a
            == WireguardPeerAttribute::PresharedKey([0; KEY_LEN])));

        let more = spec(Some(7), &["10.1.0.0/24", "10.2.0.0/24"]);
        let u = peer_update(&more.public_key, Some(&current), &more).unwrap();
        assert!(
            has(&u, is_ips) && has(&u, is_replace) && !has(&u, is_psk),
            "{u:?}"
        );

        let keepalive = PeerSpec {
            persistent_keepalive: Some(25),
            ..s.clone()
        };
        let u = peer_update(&s.public_key, Some(&current), &keepalive).unwrap();
        assert!(has(&u, |a| *a
            == WireguardPeerAttribute::PersistentKeepalive(25)));
        assert!(!has(&u, is_ips) && !has(&u, is_psk));

        let moved = PeerSpec {
            endpoint: Some("10.0.0.9:51820".parse().unwrap()),
            ..s.clone()
        };
        let u = peer_update(&s.public_key, Some(&current), &moved).unwrap();
        assert!(has(&u, |a| matches!(
            a,
            WireguardPeerAttribute::Endpoint(_)
        )));
        assert!(!has(&u, is_ips) && !has(&u, is_psk));

        // A new peer gets everything.
        let u = peer_update(&s.public_key, None, &s).unwrap();
        assert!(has(&u, is_psk) && has(&u, is_ips) && has(&u, is_replace));
    }

    fn roundtrip(m: &WireguardMessage) -> WireguardMessage {
        let genl = GenlMessage::from_payload(m.clone());
        let mut buf = vec![0; genl.buffer_len()];
        genl.emit(&mut buf);
        let header = GenlHeader {
            cmd: m.cmd.into(),
            version: 1,
        };
        WireguardMessage::parse_with_param(&buf[4..], header).unwrap()
    }

    #[test]
    fn multi_part_dump_merges_peers() {
        let ts = WireguardTimeSpec {
            seconds: 1_700_000_000,
            nano_seconds: 5,
        };
        let first = WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![
                WireguardAttribute::IfName("enc-wg0".into()),
                WireguardAttribute::PublicKey([9; KEY_LEN]),
                WireguardAttribute::ListenPort(51820),
                WireguardAttribute::Peers(vec![WireguardPeer(vec![
                    WireguardPeerAttribute::PublicKey([1; KEY_LEN]),
                    WireguardPeerAttribute::PresharedKey([0; KEY_LEN]),
                    WireguardPeerAttribute::Endpoint("10.0.0.2:51820".parse().unwrap()),
                    WireguardPeerAttribute::LastHandshake(ts),
                    WireguardPeerAttribute::RxBytes(10),
                    WireguardPeerAttribute::TxBytes(20),
                    WireguardPeerAttribute::AllowedIps(vec![allowed_ip(
                        &"10.1.0.0/24".parse().unwrap(),
                    )]),
                ])]),
            ],
        };
        // The kernel continues a peer's allowed IPs in the next message.
        let second = WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::Peers(vec![
                WireguardPeer(vec![
                    WireguardPeerAttribute::PublicKey([1; KEY_LEN]),
                    WireguardPeerAttribute::AllowedIps(vec![allowed_ip(
                        &"fd00:1::/64".parse().unwrap(),
                    )]),
                ]),
                WireguardPeer(vec![
                    WireguardPeerAttribute::PublicKey([2; KEY_LEN]),
                    WireguardPeerAttribute::PresharedKey([3; KEY_LEN]),
                ]),
            ])],
        };
        let parsed = [roundtrip(&first), roundtrip(&second)];
        let d = parse_device(&parsed).unwrap();
        assert_eq!(d.public_key, Some(key(9)));
        assert_eq!(d.listen_port, 51820);
        let p1 = &d.peers[&key(1)];
        assert_eq!(p1.allowed_ips.len(), 2);
        assert_eq!(p1.preshared_key, None);
        assert_eq!(p1.last_handshake, Some((1_700_000_000, 5)));
        assert_eq!((p1.rx_bytes, p1.tx_bytes), (10, 20));
        assert_eq!(d.peers[&key(2)].preshared_key, Some([3; KEY_LEN]));
        assert!(age(p1.last_handshake).unwrap() > Duration::from_secs(1));
    }

    #[test]
    fn scrub_zeroes_keys() {
        let mut m = GenlMessage::from_payload(WireguardMessage {
            cmd: WireguardCmd::SetDevice,
            attributes: vec![
                WireguardAttribute::PrivateKey([7; KEY_LEN]),
                WireguardAttribute::Peers(vec![WireguardPeer(vec![
                    WireguardPeerAttribute::PublicKey([1; KEY_LEN]),
                    WireguardPeerAttribute::PresharedKey([8; KEY_LEN]),
                ])]),
            ],
        });
        scrub(&mut m);
        assert_eq!(
            m.payload.attributes[0],
            WireguardAttribute::PrivateKey([0; KEY_LEN])
        );
        let WireguardAttribute::Peers(p) = &m.payload.attributes[1] else {
            panic!()
        };
        assert_eq!(p[0].0[0], WireguardPeerAttribute::PublicKey([1; KEY_LEN]));
        assert_eq!(
            p[0].0[1],
            WireguardPeerAttribute::PresharedKey([0; KEY_LEN])
        );
    }

    proptest! {
        /// Reply bytes from the kernel are parsed without panicking, whatever they are.
        #[test]
        fn reply_parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let header = GenlHeader { cmd: 0, version: 1 };
            if let Ok(m) = WireguardMessage::parse_with_param(&bytes, header) {
                let _ = parse_device(&[m]);
            }
        }
    }
}
