//! [`LinkBackend`] over a synchronous NETLINK_ROUTE socket.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use enc_sys::netlink::Conn;
use ipnet::IpNet;
use netlink_packet_core::{
    DefaultNla, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, Nla,
};
use netlink_packet_route::link::{
    InfoData, InfoGeneve, InfoKind, InfoVxlan, LinkAttribute, LinkExtentMask, LinkFlags, LinkInfo,
    LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteIp6Tunnel, RouteLwEnCapType,
    RouteLwTunnelEncap, RouteMessage, RouteMetric, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::protocols::NETLINK_ROUTE;

use crate::{
    Error, LinkBackend, LinkSnapshot, NeighSpec, OverlayKind, OverlaySnapshot, OverlaySpec,
    RTPROT_ENC, Result, RouteSpec, RuleFamily, RuleSpec, TunnelEncap,
};

const OP_GETLINK: &str = "RTM_GETLINK";
const OP_NEWLINK: &str = "RTM_NEWLINK";
const OP_NEWROUTE: &str = "RTM_NEWROUTE";
const OP_DELROUTE: &str = "RTM_DELROUTE";
const OP_GETROUTE: &str = "RTM_GETROUTE";
const OP_NEWRULE: &str = "RTM_NEWRULE";
const OP_DELRULE: &str = "RTM_DELRULE";
const OP_GETRULE: &str = "RTM_GETRULE";
const OP_DELLINK: &str = "RTM_DELLINK";
const OP_NEWNEIGH: &str = "RTM_NEWNEIGH";
const OP_DELNEIGH: &str = "RTM_DELNEIGH";
const OP_GETNEIGH: &str = "RTM_GETNEIGH";

// Lightweight-tunnel attributes (`include/uapi/linux/lwtunnel.h`); LWTUNNEL_IP_* and
// LWTUNNEL_IP6_* share the numbers. netlink-packet-route parses IPv6 tunnels but not IPv4 ones,
// so both are emitted as raw attributes and both forms are read back.
const LWTUNNEL_IP_ID: u16 = 1;
const LWTUNNEL_IP_DST: u16 = 2;
const LWTUNNEL_IP_SRC: u16 = 3;
const LWTUNNEL_IP_FLAGS: u16 = 6;
/// `TUNNEL_CSUM | TUNNEL_KEY`: outer UDP checksums, and the id is a key (the VNI).
const TUNNEL_FLAGS: u16 = 0x01 | 0x04;

/// [`LinkBackend`] over rtnetlink, with a synchronous NETLINK_ROUTE socket.
///
/// The socket is opened by [`RtnetlinkLinks::new`] in the network namespace of the calling
/// thread and stays bound to it, whichever thread uses it later. Requests are serialised by a
/// mutex, so one value can be shared between threads.
#[derive(Debug)]
pub struct RtnetlinkLinks {
    conn: Conn<RouteNetlinkMessage>,
}

/// Maps a failed request: a kernel refusal (or a dump interrupted on every attempt, as `EINTR`)
/// is wrapped by `wrap` with the caller's context; transport and decoding failures become
/// [`Error::Socket`] and [`Error::Protocol`].
fn into_error(failure: enc_sys::Error, wrap: impl FnOnce(io::Error) -> Error) -> Error {
    match failure {
        enc_sys::Error::Kernel { source, .. } => wrap(source),
        enc_sys::Error::DumpInterrupted { .. } => wrap(io::Error::from_raw_os_error(libc::EINTR)),
        enc_sys::Error::Syscall { call, source } => Error::Socket {
            op: if call == "socket" { "open" } else { call },
            source,
        },
        enc_sys::Error::Protocol { op, reason } => Error::Protocol { op, reason },
        other => Error::Socket {
            op: "netlink",
            source: io::Error::other(other),
        },
    }
}

impl RtnetlinkLinks {
    /// Opens a NETLINK_ROUTE socket in the current network namespace of the calling thread.
    pub fn new() -> Result<Self> {
        let conn = Conn::open(NETLINK_ROUTE)
            .map_err(|e| into_error(e, |source| Error::Socket { op: "open", source }))?;
        Ok(Self { conn })
    }

    fn get_link(&self, header_index: u32, ifname: Option<&str>) -> Result<Option<LinkSnapshot>> {
        self.get_link_message(header_index, ifname)?
            .map(|link| snapshot(&link))
            .transpose()
    }

    /// The kernel's `RTM_NEWLINK` for the link with index `header_index` or name `ifname`;
    /// `None` if there is none.
    fn get_link_message(
        &self,
        header_index: u32,
        ifname: Option<&str>,
    ) -> Result<Option<LinkMessage>> {
        let mut message = LinkMessage::default();
        message.header.index = header_index;
        if let Some(ifname) = ifname {
            message
                .attributes
                .push(LinkAttribute::IfName(ifname.to_owned()));
        }
        message
            .attributes
            .push(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]));
        let name_for_error = || ifname.map_or_else(|| format!("#{header_index}"), str::to_owned);
        let replies = match self.conn.request(
            RouteNetlinkMessage::GetLink(message),
            NLM_F_REQUEST | NLM_F_ACK,
            OP_GETLINK,
        ) {
            Ok(replies) => replies,
            Err(failure) if failure.kernel_errno() == Some(libc::ENODEV) => {
                return Ok(None);
            }
            Err(failure) => {
                return Err(into_error(failure, |source| Error::Link {
                    op: OP_GETLINK,
                    ifname: name_for_error(),
                    source,
                }));
            }
        };
        for reply in replies {
            if let RouteNetlinkMessage::NewLink(link) = reply {
                return Ok(Some(link));
            }
        }
        Err(Error::Protocol {
            op: OP_GETLINK,
            reason: format!("no RTM_NEWLINK in the reply for link {}", name_for_error()),
        })
    }

    fn ifindex_for_route(&self, spec: &RouteSpec, op: &'static str) -> Result<Option<u32>> {
        Ok(self.link(&spec.dev)?.map(|link| link.index)).inspect(|index| {
            if index.is_none() {
                tracing::debug!(dev = %spec.dev, dst = %spec.dst, op, "route device not found");
            }
        })
    }

    fn dump_family(
        &self,
        family: AddressFamily,
        table: u32,
        names: &mut HashMap<u32, Option<String>>,
        out: &mut Vec<RouteSpec>,
    ) -> Result<()> {
        let dump_error = |source| Error::Dump {
            op: OP_GETROUTE,
            table,
            source,
        };
        let replies = self
            .conn
            .dump(
                || {
                    let mut message = RouteMessage::default();
                    message.header.address_family = family;
                    RouteNetlinkMessage::GetRoute(message)
                },
                OP_GETROUTE,
            )
            .map_err(|failure| into_error(failure, dump_error))?;
        for reply in replies {
            let RouteNetlinkMessage::NewRoute(route) = reply else {
                continue;
            };
            let Some(parsed) = parse_route(&route, table)? else {
                continue;
            };
            let name = match names.get(&parsed.oif) {
                Some(name) => name.clone(),
                None => {
                    let name = self.get_link(parsed.oif, None)?.map(|link| link.ifname);
                    names.insert(parsed.oif, name.clone());
                    name
                }
            };
            match name {
                Some(dev) => out.push(RouteSpec {
                    dst: parsed.dst,
                    dev,
                    mtu: parsed.mtu,
                    table,
                    via: parsed.via,
                    encap: parsed.encap,
                }),
                // The link went away after the dump; so did its routes.
                None => {
                    tracing::debug!(dst = %parsed.dst, oif = parsed.oif, "route device vanished during dump")
                }
            }
        }
        Ok(())
    }
}

fn rule_message(spec: &RuleSpec) -> RuleMessage {
    let mut message = RuleMessage::default();
    message.header.family = match spec.family {
        RuleFamily::V4 => AddressFamily::Inet,
        RuleFamily::V6 => AddressFamily::Inet6,
    };
    message.header.table = u8::try_from(spec.table).unwrap_or(0);
    message.header.action = RuleAction::ToTable;
    message.attributes = vec![
        RuleAttribute::Priority(spec.priority),
        RuleAttribute::FwMark(spec.fwmark),
        RuleAttribute::FwMask(spec.fwmask),
        RuleAttribute::Table(spec.table),
        RuleAttribute::Protocol(RouteProtocol::from(RTPROT_ENC)),
    ];
    message
}

/// Picks enc's rules out of a dump; others are `None`.
fn parse_rule(message: &RuleMessage) -> Option<RuleSpec> {
    let family = match message.header.family {
        AddressFamily::Inet => RuleFamily::V4,
        AddressFamily::Inet6 => RuleFamily::V6,
        _ => return None,
    };
    let mut spec = RuleSpec {
        family,
        priority: 0,
        fwmark: 0,
        fwmask: 0,
        table: u32::from(message.header.table),
    };
    let mut ours = false;
    for attribute in &message.attributes {
        match attribute {
            RuleAttribute::Priority(p) => spec.priority = *p,
            RuleAttribute::FwMark(m) => spec.fwmark = *m,
            RuleAttribute::FwMask(m) => spec.fwmask = *m,
            RuleAttribute::Table(t) => spec.table = *t,
            RuleAttribute::Protocol(p) => ours = u8::from(*p) == RTPROT_ENC,
            _ => {}
        }
    }
    ours.then_some(spec)
}

fn rule_error<'a>(op: &'static str, spec: &'a RuleSpec) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Rule {
        op,
        priority: spec.priority,
        fwmark: spec.fwmark,
        fwmask: spec.fwmask,
        table: spec.table,
        source,
    }
}

fn snapshot(link: &LinkMessage) -> Result<LinkSnapshot> {
    let mut ifname = None;
    let mut mtu = None;
    for attribute in &link.attributes {
        match attribute {
            LinkAttribute::IfName(name) => ifname = Some(name.clone()),
            LinkAttribute::Mtu(value) => mtu = Some(*value),
            _ => {}
        }
    }
    match (ifname, mtu) {
        (Some(ifname), Some(mtu)) => Ok(LinkSnapshot {
            ifname,
            index: link.header.index,
            mtu,
            up: link.header.flags.contains(LinkFlags::Up),
        }),
        _ => Err(Error::Protocol {
            op: OP_GETLINK,
            reason: format!(
                "link #{} without IFLA_IFNAME or IFLA_MTU",
                link.header.index
            ),
        }),
    }
}

/// One of our routes from a dump, before its output device is named.
struct DumpedRoute {
    dst: IpNet,
    oif: u32,
    mtu: Option<u32>,
    via: Option<IpAddr>,
    encap: Option<TunnelEncap>,
}

/// Reads an `RTA_ENCAP` of type IP or IP6 back into a [`TunnelEncap`]; `None` if it lacks an
/// address or the id.
fn parse_encap(kind: RouteLwEnCapType, attributes: &[RouteLwTunnelEncap]) -> Option<TunnelEncap> {
    let mut id = None;
    let mut src = None;
    let mut dst = None;
    let addr = |bytes: &[u8]| -> Option<IpAddr> {
        match bytes.len() {
            4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
            16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
            _ => None,
        }
    };
    for attribute in attributes {
        match attribute {
            RouteLwTunnelEncap::Ip6(RouteIp6Tunnel::Id(v)) => id = Some(*v),
            RouteLwTunnelEncap::Ip6(RouteIp6Tunnel::Destination(a)) => dst = Some(IpAddr::V6(*a)),
            RouteLwTunnelEncap::Ip6(RouteIp6Tunnel::Source(a)) => src = Some(IpAddr::V6(*a)),
            RouteLwTunnelEncap::Other(nla) => {
                let mut value = vec![0u8; nla.value_len()];
                nla.emit_value(&mut value);
                match nla.kind() {
                    LWTUNNEL_IP_ID => {
                        id = <[u8; 8]>::try_from(value.as_slice())
                            .ok()
                            .map(u64::from_be_bytes)
                    }
                    LWTUNNEL_IP_DST => dst = addr(&value),
                    LWTUNNEL_IP_SRC => src = addr(&value),
                    _ => {}
                }
            }
            _ => {}
        }
    }
    if !matches!(kind, RouteLwEnCapType::Ip | RouteLwEnCapType::Ip6) {
        return None;
    }
    Some(TunnelEncap {
        id: u32::try_from(id?).ok()?,
        src: src?,
        dst: dst?,
    })
}

/// The `RTA_ENCAP` attributes of `encap`.
fn encap_attributes(encap: &TunnelEncap) -> (RouteLwEnCapType, Vec<RouteLwTunnelEncap>) {
    let octets = |a: IpAddr| match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    let kind = if encap.dst.is_ipv4() {
        RouteLwEnCapType::Ip
    } else {
        RouteLwEnCapType::Ip6
    };
    let raw = |k: u16, v: Vec<u8>| RouteLwTunnelEncap::Other(DefaultNla::new(k, v));
    (
        kind,
        vec![
            raw(LWTUNNEL_IP_ID, u64::from(encap.id).to_be_bytes().to_vec()),
            raw(LWTUNNEL_IP_DST, octets(encap.dst)),
            raw(LWTUNNEL_IP_SRC, octets(encap.src)),
            raw(LWTUNNEL_IP_FLAGS, TUNNEL_FLAGS.to_be_bytes().to_vec()),
        ],
    )
}

/// Picks enc's unicast routes of `table` out of a dump; others are `None`.
fn parse_route(route: &RouteMessage, table: u32) -> Result<Option<DumpedRoute>> {
    let header = &route.header;
    if u8::from(header.protocol) != RTPROT_ENC
        || header.kind != RouteType::Unicast
        || header.flags.contains(RouteFlags::Cloned)
    {
        return Ok(None);
    }
    let mut route_table = u32::from(header.table);
    let mut dst = None;
    let mut oif = None;
    let mut mtu = None;
    let mut via = None;
    let mut encap_type = None;
    let mut encap = None;
    for attribute in &route.attributes {
        match attribute {
            RouteAttribute::Table(t) => route_table = *t,
            RouteAttribute::Gateway(RouteAddress::Inet(a)) => via = Some(IpAddr::V4(*a)),
            RouteAttribute::Gateway(RouteAddress::Inet6(a)) => via = Some(IpAddr::V6(*a)),
            RouteAttribute::EncapType(t) => encap_type = Some(*t),
            RouteAttribute::Encap(e) => encap = Some(e.clone()),
            RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = Some(IpAddr::V4(*a)),
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => dst = Some(IpAddr::V6(*a)),
            RouteAttribute::Oif(index) => oif = Some(*index),
            RouteAttribute::Metrics(metrics) => {
                for metric in metrics {
                    if let RouteMetric::Mtu(m) = metric {
                        mtu = Some(*m);
                    }
                }
            }
            _ => {}
        }
    }
    if route_table != table {
        return Ok(None);
    }
    let addr = match (dst, header.address_family) {
        (Some(addr), _) => addr,
        (None, AddressFamily::Inet) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        (None, AddressFamily::Inet6) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        (None, _) => return Ok(None),
    };
    let dst = IpNet::new(addr, header.destination_prefix_length).map_err(|e| Error::Protocol {
        op: OP_GETROUTE,
        reason: format!("route {addr}/{}: {e}", header.destination_prefix_length),
    })?;
    let Some(oif) = oif else {
        // A multipath route; enc does not create those.
        tracing::warn!(%dst, table, "ignoring enc route without a single output device");
        return Ok(None);
    };
    let encap = match (encap_type, encap) {
        (Some(kind), Some(attributes)) => parse_encap(kind, &attributes),
        _ => None,
    };
    Ok(Some(DumpedRoute {
        dst,
        oif,
        mtu,
        via,
        encap,
    }))
}

/// The `RTM_NEWROUTE` / `RTM_DELROUTE` message for `spec` via link `oif`.
fn route_message(spec: &RouteSpec, oif: u32, delete: bool) -> RouteMessage {
    let mut message = RouteMessage::default();
    let header = &mut message.header;
    header.address_family = match spec.dst {
        IpNet::V4(_) => AddressFamily::Inet,
        IpNet::V6(_) => AddressFamily::Inet6,
    };
    header.destination_prefix_length = spec.dst.prefix_len();
    // Tables above 255 only fit in RTA_TABLE; the kernel prefers RTA_TABLE when present.
    header.table = u8::try_from(spec.table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
    header.protocol = RouteProtocol::from(RTPROT_ENC);
    // RT_SCOPE_NOWHERE on delete matches a route of any scope, as `ip route del` does. A
    // route through a gateway has universe scope (the kernel refuses an on-link nexthop in a
    // link-scope route).
    header.scope = if delete {
        RouteScope::NoWhere
    } else if spec.via.is_some() {
        RouteScope::Universe
    } else {
        RouteScope::Link
    };
    if spec.via.is_some() && !delete {
        header.flags |= RouteFlags::Onlink;
    }
    header.kind = RouteType::Unicast;
    message.attributes.push(RouteAttribute::Table(spec.table));
    message
        .attributes
        .push(RouteAttribute::Destination(match spec.dst {
            IpNet::V4(net) => RouteAddress::Inet(net.network()),
            IpNet::V6(net) => RouteAddress::Inet6(net.network()),
        }));
    message.attributes.push(RouteAttribute::Oif(oif));
    if let (Some(via), false) = (spec.via, delete) {
        message.attributes.push(RouteAttribute::Gateway(match via {
            IpAddr::V4(a) => RouteAddress::Inet(a),
            IpAddr::V6(a) => RouteAddress::Inet6(a),
        }));
    }
    if let (Some(encap), false) = (&spec.encap, delete) {
        let (kind, attributes) = encap_attributes(encap);
        message.attributes.push(RouteAttribute::EncapType(kind));
        message.attributes.push(RouteAttribute::Encap(attributes));
    }
    if let (Some(mtu), false) = (spec.mtu, delete) {
        message
            .attributes
            .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(mtu)]));
    }
    message
}

fn route_error<'a>(op: &'static str, spec: &'a RouteSpec) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Route {
        op,
        dst: spec.dst,
        dev: spec.dev.clone(),
        table: spec.table,
        source,
    }
}

/// Reads an overlay snapshot out of a link message.
fn overlay_snapshot(link: &LinkMessage) -> Result<OverlaySnapshot> {
    let base = snapshot(link)?;
    let mut kind = None;
    let mut port = None;
    let mut external = false;
    let mut mac = [0u8; 6];
    for attribute in &link.attributes {
        match attribute {
            LinkAttribute::Address(a) if a.len() == 6 => mac.copy_from_slice(a),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(InfoKind::Vxlan) => kind = Some(OverlayKind::Vxlan),
                        LinkInfo::Kind(InfoKind::Geneve) => kind = Some(OverlayKind::Geneve),
                        LinkInfo::Data(InfoData::Vxlan(data)) => {
                            for d in data {
                                match d {
                                    InfoVxlan::Port(p) => port = Some(*p),
                                    InfoVxlan::CollectMetadata(m) => external = *m,
                                    _ => {}
                                }
                            }
                        }
                        LinkInfo::Data(InfoData::Geneve(data)) => {
                            for d in data {
                                match d {
                                    InfoGeneve::Port(p) => port = Some(*p),
                                    InfoGeneve::CollectMetadata => external = true,
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(OverlaySnapshot {
        ifname: base.ifname,
        index: base.index,
        kind,
        port,
        external,
        mtu: base.mtu,
        mac,
        up: base.up,
    })
}

/// The `RTM_NEWLINK` message that creates the external-mode device of `spec`.
fn overlay_create_message(spec: &OverlaySpec) -> LinkMessage {
    let mut message = LinkMessage::default();
    message
        .attributes
        .push(LinkAttribute::IfName(spec.ifname.clone()));
    message.attributes.push(LinkAttribute::Mtu(spec.mtu));
    message
        .attributes
        .push(LinkAttribute::Address(spec.mac.to_vec()));
    let (kind, data) = match spec.kind {
        OverlayKind::Vxlan => (
            InfoKind::Vxlan,
            InfoData::Vxlan(vec![
                InfoVxlan::CollectMetadata(true),
                InfoVxlan::Learning(false),
                InfoVxlan::Port(spec.port),
            ]),
        ),
        OverlayKind::Geneve => (
            InfoKind::Geneve,
            InfoData::Geneve(vec![
                InfoGeneve::CollectMetadata,
                InfoGeneve::Port(spec.port),
            ]),
        ),
    };
    message.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(kind),
        LinkInfo::Data(data),
    ]));
    message
}

fn neigh_message(spec: &NeighSpec, ifindex: u32, with_lladdr: bool) -> NeighbourMessage {
    let mut message = NeighbourMessage::default();
    message.header.family = match spec.ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    message.header.ifindex = ifindex;
    message.header.state = NeighbourState::Permanent;
    message.header.kind = RouteType::Unicast;
    message
        .attributes
        .push(NeighbourAttribute::Destination(match spec.ip {
            IpAddr::V4(a) => NeighbourAddress::Inet(a),
            IpAddr::V6(a) => NeighbourAddress::Inet6(a),
        }));
    if with_lladdr {
        message
            .attributes
            .push(NeighbourAttribute::LinkLocalAddress(spec.mac.to_vec()));
    }
    message
}

fn neigh_error<'a>(op: &'static str, spec: &'a NeighSpec) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Neigh {
        op,
        ip: spec.ip,
        ifname: spec.ifname.clone(),
        source,
    }
}

impl LinkBackend for RtnetlinkLinks {
    fn link(&self, ifname: &str) -> Result<Option<LinkSnapshot>> {
        self.get_link(0, Some(ifname))
    }

    fn set_link(&self, ifname: &str, mtu: u32, up: bool) -> Result<()> {
        // By name with index 0 and without NLM_F_CREATE: the kernel modifies the existing link
        // or answers ENODEV, in one round trip.
        let mut message = LinkMessage::default();
        message.header.flags = if up {
            LinkFlags::Up
        } else {
            LinkFlags::empty()
        };
        message.header.change_mask = LinkFlags::Up;
        message
            .attributes
            .push(LinkAttribute::IfName(ifname.to_owned()));
        message.attributes.push(LinkAttribute::Mtu(mtu));
        self.conn
            .request(
                RouteNetlinkMessage::NewLink(message),
                NLM_F_REQUEST | NLM_F_ACK,
                OP_NEWLINK,
            )
            .map(drop)
            .map_err(|failure| {
                into_error(failure, |source| Error::Link {
                    op: OP_NEWLINK,
                    ifname: ifname.to_owned(),
                    source,
                })
            })
    }

    fn upsert_route(&self, spec: &RouteSpec) -> Result<()> {
        spec.validate()?;
        let Some(oif) = self.ifindex_for_route(spec, OP_NEWROUTE)? else {
            return Err(route_error(OP_NEWROUTE, spec)(
                io::Error::from_raw_os_error(libc::ENODEV),
            ));
        };
        self.conn
            .request(
                RouteNetlinkMessage::NewRoute(route_message(spec, oif, false)),
                NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
                OP_NEWROUTE,
            )
            .map(drop)
            .map_err(|failure| into_error(failure, route_error(OP_NEWROUTE, spec)))
    }

    fn delete_route(&self, spec: &RouteSpec) -> Result<()> {
        spec.validate()?;
        let Some(oif) = self.ifindex_for_route(spec, OP_DELROUTE)? else {
            // No device, no route through it.
            return Ok(());
        };
        match self.conn.request(
            RouteNetlinkMessage::DelRoute(route_message(spec, oif, true)),
            NLM_F_REQUEST | NLM_F_ACK,
            OP_DELROUTE,
        ) {
            Ok(_) => Ok(()),
            Err(failure) => {
                let error = into_error(failure, route_error(OP_DELROUTE, spec));
                if error.is_not_found() {
                    Ok(())
                } else {
                    Err(error)
                }
            }
        }
    }

    fn dump_routes(&self, table: u32) -> Result<Vec<RouteSpec>> {
        let mut names = HashMap::new();
        let mut routes = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            self.dump_family(family, table, &mut names, &mut routes)?;
        }
        Ok(routes)
    }

    fn links(&self) -> Result<Vec<LinkSnapshot>> {
        let replies = self
            .conn
            .dump(
                || {
                    let mut message = LinkMessage::default();
                    message
                        .attributes
                        .push(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]));
                    RouteNetlinkMessage::GetLink(message)
                },
                OP_GETLINK,
            )
            .map_err(|failure| {
                into_error(failure, |source| Error::Dump {
                    op: OP_GETLINK,
                    table: 0,
                    source,
                })
            })?;
        replies
            .iter()
            .filter_map(|reply| match reply {
                RouteNetlinkMessage::NewLink(link) => Some(snapshot(link)),
                _ => None,
            })
            .collect()
    }

    fn add_rule(&self, spec: &RuleSpec) -> Result<()> {
        spec.validate()?;
        match self.conn.request(
            RouteNetlinkMessage::NewRule(rule_message(spec)),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | netlink_packet_core::NLM_F_EXCL,
            OP_NEWRULE,
        ) {
            Ok(_) => Ok(()),
            Err(failure) => {
                let error = into_error(failure, rule_error(OP_NEWRULE, spec));
                if error.is_exists() {
                    Ok(())
                } else {
                    Err(error)
                }
            }
        }
    }

    fn delete_rule(&self, spec: &RuleSpec) -> Result<()> {
        spec.validate()?;
        match self.conn.request(
            RouteNetlinkMessage::DelRule(rule_message(spec)),
            NLM_F_REQUEST | NLM_F_ACK,
            OP_DELRULE,
        ) {
            Ok(_) => Ok(()),
            Err(failure) => {
                let error = into_error(failure, rule_error(OP_DELRULE, spec));
                if error.is_not_found() {
                    Ok(())
                } else {
                    Err(error)
                }
            }
        }
    }

    fn dump_rules(&self) -> Result<Vec<RuleSpec>> {
        let mut rules = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let replies = self
                .conn
                .dump(
                    || {
                        let mut message = RuleMessage::default();
                        message.header.family = family;
                        RouteNetlinkMessage::GetRule(message)
                    },
                    OP_GETRULE,
                )
                .map_err(|failure| {
                    into_error(failure, |source| Error::Dump {
                        op: OP_GETRULE,
                        table: 0,
                        source,
                    })
                })?;
            rules.extend(replies.iter().filter_map(|reply| match reply {
                RouteNetlinkMessage::NewRule(rule) => parse_rule(rule),
                _ => None,
            }));
        }
        Ok(rules)
    }

    fn overlay(&self, ifname: &str) -> Result<Option<OverlaySnapshot>> {
        self.get_link_message(0, Some(ifname))?
            .map(|link| overlay_snapshot(&link))
            .transpose()
    }

    fn upsert_overlay(&self, spec: &OverlaySpec) -> Result<()> {
        spec.validate()?;
        let link_error = |op: &'static str| {
            let ifname = spec.ifname.clone();
            move |source| Error::Link { op, ifname, source }
        };
        match self.overlay(&spec.ifname)? {
            Some(current) if current.matches(spec) => return Ok(()),
            Some(current) if current.compatible_with(spec) => {}
            Some(current) => {
                tracing::info!(
                    ifname = %spec.ifname,
                    kind = ?current.kind,
                    port = ?current.port,
                    external = current.external,
                    "replacing a link that is not the overlay device asked for"
                );
                self.delete_link(&spec.ifname)?;
                self.create_overlay(spec)?;
            }
            None => self.create_overlay(spec)?,
        }
        // MTU, MAC and up, in place.
        let mut message = LinkMessage::default();
        message.header.flags = LinkFlags::Up;
        message.header.change_mask = LinkFlags::Up;
        message
            .attributes
            .push(LinkAttribute::IfName(spec.ifname.clone()));
        message.attributes.push(LinkAttribute::Mtu(spec.mtu));
        message
            .attributes
            .push(LinkAttribute::Address(spec.mac.to_vec()));
        self.conn
            .request(
                RouteNetlinkMessage::NewLink(message),
                NLM_F_REQUEST | NLM_F_ACK,
                OP_NEWLINK,
            )
            .map(drop)
            .map_err(|failure| into_error(failure, link_error(OP_NEWLINK)))
    }

    fn delete_link(&self, ifname: &str) -> Result<()> {
        let mut message = LinkMessage::default();
        message
            .attributes
            .push(LinkAttribute::IfName(ifname.to_owned()));
        match self.conn.request(
            RouteNetlinkMessage::DelLink(message),
            NLM_F_REQUEST | NLM_F_ACK,
            OP_DELLINK,
        ) {
            Ok(_) => Ok(()),
            Err(failure) => {
                let error = into_error(failure, |source| Error::Link {
                    op: OP_DELLINK,
                    ifname: ifname.to_owned(),
                    source,
                });
                if error.is_not_found() {
                    Ok(())
                } else {
                    Err(error)
                }
            }
        }
    }

    fn upsert_neigh(&self, spec: &NeighSpec) -> Result<()> {
        let Some(link) = self.link(&spec.ifname)? else {
            return Err(neigh_error(OP_NEWNEIGH, spec)(
                io::Error::from_raw_os_error(libc::ENODEV),
            ));
        };
        self.conn
            .request(
                RouteNetlinkMessage::NewNeighbour(neigh_message(spec, link.index, true)),
                NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
                OP_NEWNEIGH,
            )
            .map(drop)
            .map_err(|failure| into_error(failure, neigh_error(OP_NEWNEIGH, spec)))
    }

    fn delete_neigh(&self, spec: &NeighSpec) -> Result<()> {
        let Some(link) = self.link(&spec.ifname)? else {
            return Ok(());
        };
        match self.conn.request(
            RouteNetlinkMessage::DelNeighbour(neigh_message(spec, link.index, false)),
            NLM_F_REQUEST | NLM_F_ACK,
            OP_DELNEIGH,
        ) {
            Ok(_) => Ok(()),
            Err(failure) => {
                let error = into_error(failure, neigh_error(OP_DELNEIGH, spec));
                if error.is_not_found() {
                    Ok(())
                } else {
                    Err(error)
                }
            }
        }
    }

    fn dump_neighs(&self, ifname: &str) -> Result<Vec<NeighSpec>> {
        let Some(link) = self.link(ifname)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let replies = self
                .conn
                .dump(
                    || {
                        let mut message = NeighbourMessage::default();
                        message.header.family = family;
                        message.header.ifindex = link.index;
                        RouteNetlinkMessage::GetNeighbour(message)
                    },
                    OP_GETNEIGH,
                )
                .map_err(|failure| {
                    into_error(failure, |source| Error::Neigh {
                        op: OP_GETNEIGH,
                        ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                        ifname: ifname.to_owned(),
                        source,
                    })
                })?;
            for reply in replies {
                let RouteNetlinkMessage::NewNeighbour(n) = reply else {
                    continue;
                };
                if n.header.ifindex != link.index || n.header.state != NeighbourState::Permanent {
                    continue;
                }
                let mut ip = None;
                let mut mac = None;
                for attribute in &n.attributes {
                    match attribute {
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                            ip = Some(IpAddr::V4(*a))
                        }
                        NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                            ip = Some(IpAddr::V6(*a))
                        }
                        NeighbourAttribute::LinkLocalAddress(m) if m.len() == 6 => {
                            let mut b = [0u8; 6];
                            b.copy_from_slice(m);
                            mac = Some(b);
                        }
                        _ => {}
                    }
                }
                if let (Some(ip), Some(mac)) = (ip, mac) {
                    out.push(NeighSpec {
                        ifname: ifname.to_owned(),
                        ip,
                        mac,
                    });
                }
            }
        }
        Ok(out)
    }
}

impl RtnetlinkLinks {
    fn create_overlay(&self, spec: &OverlaySpec) -> Result<()> {
        self.conn
            .request(
                RouteNetlinkMessage::NewLink(overlay_create_message(spec)),
                NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
                OP_NEWLINK,
            )
            .map(drop)
            .map_err(|failure| {
                into_error(failure, |source| Error::Link {
                    op: OP_NEWLINK,
                    ifname: spec.ifname.clone(),
                    source,
                })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dst: &str, table: u32, mtu: Option<u32>) -> RouteSpec {
        RouteSpec {
            dst: dst.parse().unwrap(),
            dev: "enc0".into(),
            mtu,
            table,
            via: None,
            encap: None,
        }
    }

    #[test]
    fn route_message_roundtrips_through_the_dump_parser() {
        for (dst, table, mtu) in [
            ("10.1.0.0/24", 254, Some(1400)),
            ("fd00:1::/64", 254, None),
            ("0.0.0.0/0", 1000, Some(1280)),
            ("::/0", 255, None),
        ] {
            let spec = spec(dst, table, mtu);
            let message = route_message(&spec, 7, false);
            assert_eq!(u8::from(message.header.protocol), RTPROT_ENC);
            assert_eq!(message.header.scope, RouteScope::Link);
            let parsed = parse_route(&message, table).unwrap().unwrap();
            assert_eq!((parsed.dst, parsed.oif, parsed.mtu), (spec.dst, 7, mtu));
            assert!(parse_route(&message, table + 1).unwrap().is_none());
        }
    }

    #[test]
    fn large_table_goes_in_the_attribute_only() {
        let message = route_message(&spec("10.0.0.0/8", 1000, None), 1, false);
        assert_eq!(message.header.table, RouteHeader::RT_TABLE_UNSPEC);
        assert!(message.attributes.contains(&RouteAttribute::Table(1000)));
        let message = route_message(&spec("10.0.0.0/8", 254, None), 1, false);
        assert_eq!(message.header.table, 254);
    }

    #[test]
    fn delete_message_matches_any_scope_and_has_no_metrics() {
        let message = route_message(&spec("10.0.0.0/8", 254, Some(1400)), 1, true);
        assert_eq!(message.header.scope, RouteScope::NoWhere);
        assert!(
            !message
                .attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Metrics(_)))
        );
    }

    #[test]
    fn rule_message_roundtrips() {
        let spec = RuleSpec {
            family: RuleFamily::V6,
            priority: 1000,
            fwmark: 0xe00,
            fwmask: 0xf00,
            table: 1229,
        };
        let message = rule_message(&spec);
        assert_eq!(message.header.table, 0);
        assert_eq!(parse_rule(&message), Some(spec.clone()));
        let mut foreign = message.clone();
        foreign
            .attributes
            .retain(|a| !matches!(a, RuleAttribute::Protocol(_)));
        assert_eq!(parse_rule(&foreign), None);
    }

    #[test]
    fn foreign_protocol_is_ignored() {
        let mut message = route_message(&spec("10.0.0.0/8", 254, None), 1, false);
        message.header.protocol = RouteProtocol::Static;
        assert!(parse_route(&message, 254).unwrap().is_none());
    }
}
