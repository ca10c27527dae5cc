//! [`XfrmBackend`] over a synchronous NETLINK_XFRM socket.

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsFd as _;

use enc_sys::netlink::Conn;
use ipnet::IpNet;
use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST};
use netlink_packet_xfrm::policy::{
    DelGetMessage as PolicyDelGetMessage, ModifyMessage as PolicyModifyMessage,
};
use netlink_packet_xfrm::state::{
    DelGetMessage as SaDelGetMessage, GetDumpMessage, ModifyMessage as SaModifyMessage,
};
use netlink_packet_xfrm::{
    AF_INET, AF_INET6, Address, AlgAead, EncapTmpl, IPPROTO_ESP, LifetimeConfig, Mark, ReplayEsn,
    Selector, UserPolicyId, UserPolicyInfo, UserSaId, UserSaInfo, UserTemplate,
    XFRM_ALG_AEAD_NAME_LEN, XFRM_INF, XFRM_MODE_TUNNEL, XFRM_POLICY_ALLOW, XFRM_POLICY_BLOCK,
    XFRM_POLICY_FWD, XFRM_POLICY_IN, XFRM_POLICY_OUT, XFRM_STATE_ESN, XfrmAttrs, XfrmMessage,
};
use netlink_sys::protocols::NETLINK_XFRM;
use zeroize::Zeroize;

use super::{
    AEAD_ICV_BITS, AEAD_NAME, EncapSocket, PolicyAction, PolicyDir, PolicySpec, SaId, SaSnapshot,
    SaSpec, Tmpl, UdpEncap, XfrmBackend,
};
use crate::{Error, Result};

/// The socket's name in errors.
const NETLINK_XFRM_NAME: &str = "NETLINK_XFRM";

const OP_NEWSA: &str = "XFRM_MSG_NEWSA";
const OP_UPDSA: &str = "XFRM_MSG_UPDSA";
const OP_DELSA: &str = "XFRM_MSG_DELSA";
const OP_GETSA: &str = "XFRM_MSG_GETSA";
const OP_UPDPOLICY: &str = "XFRM_MSG_UPDPOLICY";
const OP_DELPOLICY: &str = "XFRM_MSG_DELPOLICY";
const OP_GETPOLICY: &str = "XFRM_MSG_GETPOLICY";

/// [`XfrmBackend`] over a synchronous NETLINK_XFRM socket.
///
/// The socket is opened by [`NetlinkXfrm::new`] in the network namespace of the calling
/// thread and stays bound to it, whichever thread uses it later. Requests are serialised by a
/// mutex, so one value can be shared between threads. Buffers that held key material (SA
/// requests, SA dumps) are zeroed after use.
#[derive(Debug)]
pub struct NetlinkXfrm {
    conn: Conn<XfrmMessage>,
}

/// Maps a failed request: a kernel refusal (or a dump interrupted on every attempt, as `EINTR`)
/// becomes [`Error::Xfrm`] naming the operation and the state or policy; transport and decoding
/// failures keep their own variants.
fn xfrm_error(op: &'static str, what: String) -> impl FnOnce(enc_sys::Error) -> Error {
    move |error| match error {
        enc_sys::Error::Kernel { source, .. } => Error::Xfrm { op, what, source },
        enc_sys::Error::DumpInterrupted { .. } => Error::Xfrm {
            op,
            what,
            source: io::Error::from_raw_os_error(libc::EINTR),
        },
        other => Error::from_sys(NETLINK_XFRM_NAME, other),
    }
}

impl NetlinkXfrm {
    /// Opens a NETLINK_XFRM socket in the current network namespace of the calling thread.
    pub fn new() -> Result<Self> {
        // Acks carry only the header of the request, not the request (and its key); requests
        // are wiped once serialised and the buffers zeroed after use.
        let conn = Conn::open(NETLINK_XFRM)
            .map_err(|e| Error::from_sys(NETLINK_XFRM_NAME, e))?
            .scrubbing(wipe_keys);
        Ok(Self { conn })
    }

    /// Sends a request that is answered by an ack (never a dump), and wipes any reply.
    fn request(
        &self,
        message: XfrmMessage,
        flags: u16,
        op: &'static str,
    ) -> std::result::Result<(), enc_sys::Error> {
        let mut replies = self.conn.request(message, flags, op)?;
        replies.iter_mut().for_each(wipe_keys);
        Ok(())
    }

    /// A dump request, restarted when a concurrent change interrupts it.
    fn dump(
        &self,
        message: impl Fn() -> XfrmMessage,
        op: &'static str,
    ) -> Result<Vec<XfrmMessage>> {
        self.conn
            .dump(message, op)
            .map_err(xfrm_error(op, "dump".to_owned()))
    }

    fn sa_request(&self, sa: &SaSpec, update: bool) -> std::result::Result<(), enc_sys::Error> {
        let (message, op) = if update {
            (XfrmMessage::UpdateSa(sa_message(sa)), OP_UPDSA)
        } else {
            (XfrmMessage::AddSa(sa_message(sa)), OP_NEWSA)
        };
        let flags = if update {
            NLM_F_REQUEST | NLM_F_ACK
        } else {
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        };
        // `request` wipes the key from the message and from the serialised copy.
        self.request(message, flags, op)
    }
}

/// Zeroes any key material a message holds.
fn wipe_keys(message: &mut XfrmMessage) {
    if let XfrmMessage::AddSa(m) | XfrmMessage::UpdateSa(m) = message {
        for nla in &mut m.nlas {
            match nla {
                XfrmAttrs::EncryptionAlgAead(alg) => alg.alg_key.zeroize(),
                XfrmAttrs::EncryptionAlg(alg) | XfrmAttrs::AuthenticationAlg(alg) => {
                    alg.alg_key.zeroize();
                }
                XfrmAttrs::AuthenticationAlgTrunc(alg) => alg.alg_key.zeroize(),
                _ => {}
            }
        }
    }
}

fn family_of(addr: IpAddr) -> u16 {
    if addr.is_ipv4() { AF_INET } else { AF_INET6 }
}

/// Lifetimes without limits (as `ip xfrm` sets them): zero limits would expire at once.
fn no_limits() -> LifetimeConfig {
    LifetimeConfig {
        soft_byte_limit: XFRM_INF,
        hard_byte_limit: XFRM_INF,
        soft_packet_limit: XFRM_INF,
        hard_packet_limit: XFRM_INF,
        ..LifetimeConfig::default()
    }
}

fn address(addr: Address, family: u16) -> Option<IpAddr> {
    match family {
        AF_INET => Some(IpAddr::V4(addr.to_ipv4())),
        AF_INET6 => Some(IpAddr::V6(addr.to_ipv6())),
        _ => None,
    }
}

fn aead_name() -> [u8; XFRM_ALG_AEAD_NAME_LEN] {
    let mut name = [0u8; XFRM_ALG_AEAD_NAME_LEN];
    name[..AEAD_NAME.len()].copy_from_slice(AEAD_NAME.as_bytes());
    name
}

/// Words of the replay bitmap for a window of `window` packets.
fn bmp_len(window: u32) -> u32 {
    window.div_ceil(32)
}

/// The `XFRM_MSG_NEWSA` / `XFRM_MSG_UPDSA` body of `sa`. Holds the key: wipe it after use.
pub(super) fn sa_message(sa: &SaSpec) -> SaModifyMessage {
    let family = family_of(sa.dst);
    let mut info = UserSaInfo::default();
    // A tunnel-mode SA takes any inner traffic the policy hands it.
    info.selector.family = family;
    info.id.daddr = Address::from_ip(&sa.dst);
    info.id.spi = sa.spi;
    info.id.proto = IPPROTO_ESP;
    info.saddr = Address::from_ip(&sa.src);
    info.lifetime_cfg = no_limits();
    info.reqid = sa.reqid;
    info.family = family;
    info.mode = XFRM_MODE_TUNNEL;
    // The window lives in XFRMA_REPLAY_ESN_VAL; the kernel refuses both at once.
    info.replay_window = 0;
    info.flags = if sa.esn { XFRM_STATE_ESN } else { 0 };

    let mut key = Vec::with_capacity(crate::KEY_LEN + crate::SALT_LEN);
    key.extend_from_slice(&sa.keys.key);
    key.extend_from_slice(&sa.keys.salt);
    let mut nlas = vec![
        XfrmAttrs::EncryptionAlgAead(AlgAead {
            alg_name: aead_name(),
            alg_key_len: u32::try_from(key.len() * 8).unwrap_or(u32::MAX),
            alg_icv_len: AEAD_ICV_BITS,
            alg_key: key,
        }),
        XfrmAttrs::ReplayStateEsn(ReplayEsn {
            bmp_len: bmp_len(sa.replay_window),
            replay_window: sa.replay_window,
            bmp: vec![0; bmp_len(sa.replay_window) as usize],
            ..ReplayEsn::default()
        }),
    ];
    if let Some((value, mask)) = sa.mark {
        nlas.push(XfrmAttrs::Mark(Mark { value, mask }));
    }
    if let Some((value, mask)) = sa.output_mark {
        nlas.push(XfrmAttrs::MarkVal(value));
        nlas.push(XfrmAttrs::MarkMask(mask));
    }
    if let Some(encap) = sa.encap {
        // `EncapTmpl` takes the ports in host order and emits them in network order.
        nlas.push(XfrmAttrs::EncapsulationTemplate(EncapTmpl {
            encap_type: encap.kind,
            encap_sport: encap.sport,
            encap_dport: encap.dport,
            encap_oa: Address::default(),
        }));
    }
    SaModifyMessage {
        user_sa_info: info,
        nlas,
    }
}

/// Reads an SA from a dump reply, without its key. `None` for what is not an ESP SA.
pub(super) fn parse_sa(message: &SaModifyMessage) -> Option<SaSnapshot> {
    let info = &message.user_sa_info;
    if info.id.proto != IPPROTO_ESP {
        return None;
    }
    let dst = address(info.id.daddr, info.family)?;
    let src = address(info.saddr, info.family)?;
    let mut snapshot = SaSnapshot {
        id: SaId {
            src,
            dst,
            spi: info.id.spi,
        },
        reqid: info.reqid,
        mark: None,
        output_mark: None,
        esn: info.flags & XFRM_STATE_ESN != 0,
        replay_window: u32::from(info.replay_window),
        oseq: 0,
        seq: 0,
        bytes: info.lifetime_cur.bytes,
        packets: info.lifetime_cur.packets,
        replay_drops: info.stats.replay,
        integrity_failed: info.stats.integrity_failed,
        encap: None,
    };
    let mut set_mark = None;
    let mut set_mask = None;
    for nla in &message.nlas {
        match nla {
            XfrmAttrs::Mark(mark) => snapshot.mark = Some((mark.value, mark.mask)),
            XfrmAttrs::MarkVal(value) => set_mark = Some(*value),
            XfrmAttrs::MarkMask(mask) => set_mask = Some(*mask),
            XfrmAttrs::EncapsulationTemplate(t) => {
                snapshot.encap = Some(UdpEncap {
                    kind: t.encap_type,
                    sport: t.encap_sport,
                    dport: t.encap_dport,
                });
            }
            XfrmAttrs::ReplayStateEsn(replay) => {
                snapshot.replay_window = replay.replay_window;
                snapshot.oseq = (u64::from(replay.oseq_hi) << 32) | u64::from(replay.oseq);
                snapshot.seq = (u64::from(replay.seq_hi) << 32) | u64::from(replay.seq);
            }
            // The kernel sends either this (legacy replay state) or the ESN one.
            XfrmAttrs::ReplayState(replay) if snapshot.oseq == 0 && snapshot.seq == 0 => {
                snapshot.oseq = u64::from(replay.oseq);
                snapshot.seq = u64::from(replay.seq);
            }
            _ => {}
        }
    }
    // Without XFRMA_SET_MARK_MASK the kernel takes a mask of all ones.
    snapshot.output_mark = set_mark.map(|value| (value, set_mask.unwrap_or(u32::MAX)));
    Some(snapshot)
}

fn selector(src: IpNet, dst: IpNet) -> Selector {
    let mut sel = Selector::default();
    sel.source_prefix(&src.network(), src.prefix_len());
    sel.destination_prefix(&dst.network(), dst.prefix_len());
    // `*_prefix` leave the family unset for unspecified addresses.
    sel.family = family_of(dst.addr());
    sel
}

fn dir_code(dir: PolicyDir) -> u8 {
    match dir {
        PolicyDir::In => XFRM_POLICY_IN,
        PolicyDir::Out => XFRM_POLICY_OUT,
        PolicyDir::Fwd => XFRM_POLICY_FWD,
    }
}

/// The `XFRM_MSG_UPDPOLICY` body of `p`.
pub(super) fn policy_message(p: &PolicySpec) -> PolicyModifyMessage {
    let mut info = UserPolicyInfo {
        selector: selector(p.src, p.dst),
        lifetime_cfg: no_limits(),
        priority: p.priority,
        direction: dir_code(p.dir),
        action: match p.action {
            PolicyAction::Allow => XFRM_POLICY_ALLOW,
            PolicyAction::Block => XFRM_POLICY_BLOCK,
        },
        ..UserPolicyInfo::default()
    };
    info.share = 0;
    let mut nlas = vec![XfrmAttrs::Mark(Mark {
        value: p.mark.0,
        mask: p.mark.1,
    })];
    if let Some(tmpl) = p.tmpl {
        let mut t = UserTemplate::default();
        t.source(&tmpl.src);
        t.destination(&tmpl.dst);
        t.protocol(IPPROTO_ESP);
        t.mode(XFRM_MODE_TUNNEL);
        t.reqid(tmpl.reqid);
        nlas.push(XfrmAttrs::Template(vec![t]));
    }
    PolicyModifyMessage {
        user_policy_info: info,
        nlas,
    }
}

/// The `XFRM_MSG_DELPOLICY` body of `p`: selector, direction, mark.
fn policy_id_message(p: &PolicySpec) -> PolicyDelGetMessage {
    PolicyDelGetMessage {
        user_policy_id: UserPolicyId {
            selector: selector(p.src, p.dst),
            index: 0,
            direction: dir_code(p.dir),
        },
        nlas: vec![XfrmAttrs::Mark(Mark {
            value: p.mark.0,
            mask: p.mark.1,
        })],
    }
}

fn prefix(addr: Address, family: u16, len: u8) -> Option<IpNet> {
    IpNet::new(address(addr, family)?, len).ok()
}

/// Reads a policy from a dump reply. `None` for what enc cannot express (several templates,
/// other protocols or modes, port selectors); such a policy is not enc's either.
pub(super) fn parse_policy(message: &PolicyModifyMessage) -> Option<PolicySpec> {
    let info = &message.user_policy_info;
    let sel = &info.selector;
    if sel.proto != 0 || sel.dport_mask != 0 || sel.sport_mask != 0 || sel.ifindex != 0 {
        return None;
    }
    let dir = match info.direction {
        XFRM_POLICY_IN => PolicyDir::In,
        XFRM_POLICY_OUT => PolicyDir::Out,
        XFRM_POLICY_FWD => PolicyDir::Fwd,
        _ => return None,
    };
    let action = match info.action {
        XFRM_POLICY_ALLOW => PolicyAction::Allow,
        XFRM_POLICY_BLOCK => PolicyAction::Block,
        _ => return None,
    };
    let mut mark = (0, 0);
    let mut tmpl = None;
    for nla in &message.nlas {
        match nla {
            XfrmAttrs::Mark(m) => mark = (m.value, m.mask),
            XfrmAttrs::Template(templates) => match templates.as_slice() {
                [] => {}
                [t] if t.id.proto == IPPROTO_ESP && t.mode == XFRM_MODE_TUNNEL => {
                    tmpl = Some(Tmpl {
                        src: address(t.saddr, t.family)?,
                        dst: address(t.id.daddr, t.family)?,
                        reqid: t.reqid,
                    });
                }
                _ => return None,
            },
            _ => {}
        }
    }
    Some(PolicySpec {
        dir,
        src: prefix(sel.saddr, sel.family, sel.prefixlen_s)?,
        dst: prefix(sel.daddr, sel.family, sel.prefixlen_d)?,
        mark,
        priority: info.priority,
        action,
        tmpl,
    })
}

fn sa_id_message(id: &SaId, mark: Option<(u32, u32)>) -> SaDelGetMessage {
    let mut sa_id = UserSaId::default();
    sa_id.destination(&id.dst);
    sa_id.spi = id.spi;
    sa_id.proto = IPPROTO_ESP;
    let mut nlas = Vec::new();
    if let Some((value, _)) = mark {
        // The kernel looks SAs up with `(mark & sa.mask) == sa.value`: the SA's own value
        // under a full mask finds exactly it.
        nlas.push(XfrmAttrs::Mark(Mark {
            value,
            mask: u32::MAX,
        }));
    }
    SaDelGetMessage {
        user_sa_id: sa_id,
        nlas,
    }
}

/// Binds a UDP socket to `at` and makes it an ESP-in-UDP socket for XFRM.
pub(super) fn bind_esp_in_udp(at: SocketAddr) -> Result<UdpSocket> {
    let sock = UdpSocket::bind(at).map_err(|source| {
        if source.raw_os_error() == Some(libc::EADDRINUSE) {
            Error::PortInUse { at, source }
        } else {
            Error::Syscall {
                call: "bind (ESP in UDP for XFRM)",
                target: at.to_string(),
                source,
            }
        }
    })?;
    enc_sys::udp::enable_esp_in_udp(sock.as_fd()).map_err(|source| Error::Syscall {
        call: "setsockopt(SOL_UDP, UDP_ENCAP, UDP_ENCAP_ESPINUDP)",
        target: at.to_string(),
        source,
    })?;
    Ok(sock)
}

impl XfrmBackend for NetlinkXfrm {
    fn open_esp_in_udp(&self, at: SocketAddr) -> Result<EncapSocket> {
        let sock = bind_esp_in_udp(at)?;
        // Port 0 asks for any port; report the one the kernel chose.
        let bound = sock.local_addr().unwrap_or(at);
        Ok(EncapSocket::new(bound, sock))
    }

    fn upsert_sa(&self, sa: &SaSpec) -> Result<()> {
        sa.validate()?;
        let what = || sa.id().to_string();
        match self.sa_request(sa, false) {
            Ok(()) => Ok(()),
            Err(failure) if failure.kernel_errno() == Some(libc::EEXIST) => self
                .sa_request(sa, true)
                .map_err(xfrm_error(OP_UPDSA, what())),
            Err(failure) => Err(xfrm_error(OP_NEWSA, what())(failure)),
        }
    }

    fn delete_sa(&self, id: &SaId) -> Result<()> {
        // The kernel needs the SA's mark to find it; only enc's SAs are candidates, so a
        // foreign SA that happens to share destination and SPI is never touched.
        let Some(current) = self
            .dump_sas()?
            .into_iter()
            .find(|sa| sa.id.dst == id.dst && sa.id.spi == id.spi)
        else {
            return Ok(());
        };
        match self.request(
            XfrmMessage::DeleteSa(sa_id_message(id, current.mark)),
            NLM_F_REQUEST | NLM_F_ACK,
            OP_DELSA,
        ) {
            Ok(_) => Ok(()),
            Err(failure) if failure.kernel_errno() == Some(libc::ESRCH) => Ok(()),
            Err(failure) => Err(xfrm_error(OP_DELSA, id.to_string())(failure)),
        }
    }

    fn dump_sas(&self) -> Result<Vec<SaSnapshot>> {
        let mut replies = self.dump(
            || XfrmMessage::GetDumpSa(GetDumpMessage::default()),
            OP_GETSA,
        )?;
        let sas = replies
            .iter()
            .filter_map(|reply| match reply {
                XfrmMessage::AddSa(sa) | XfrmMessage::UpdateSa(sa) => parse_sa(sa),
                _ => None,
            })
            .filter(SaSnapshot::is_enc)
            .collect();
        replies.iter_mut().for_each(wipe_keys);
        Ok(sas)
    }

    fn upsert_policy(&self, p: &PolicySpec) -> Result<()> {
        p.validate()?;
        self.request(
            XfrmMessage::UpdatePolicy(policy_message(p)),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
            OP_UPDPOLICY,
        )
        .map_err(xfrm_error(OP_UPDPOLICY, p.to_string()))
    }

    fn delete_policy(&self, p: &PolicySpec) -> Result<()> {
        p.validate()?;
        match self.request(
            XfrmMessage::DeletePolicy(policy_id_message(p)),
            NLM_F_REQUEST | NLM_F_ACK,
            OP_DELPOLICY,
        ) {
            Ok(_) => Ok(()),
            Err(failure) if failure.kernel_errno() == Some(libc::ENOENT) => Ok(()),
            Err(failure) => Err(xfrm_error(OP_DELPOLICY, p.to_string())(failure)),
        }
    }

    fn dump_policies(&self) -> Result<Vec<PolicySpec>> {
        let replies = self.dump(
            || XfrmMessage::GetPolicy(PolicyDelGetMessage::default()),
            OP_GETPOLICY,
        )?;
        Ok(replies
            .iter()
            .filter_map(|reply| match reply {
                XfrmMessage::AddPolicy(p) | XfrmMessage::UpdatePolicy(p) => parse_policy(p),
                _ => None,
            })
            .filter(PolicySpec::is_enc)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SaKeys;
    use crate::xfrm::{OUT_MARK_MASK, PRIORITY_PEER, encrypt_mark};
    use netlink_packet_core::{Emitable, NetlinkHeader, NetlinkMessage, NetlinkPayload};

    fn sa(esn: bool, window: u32) -> SaSpec {
        SaSpec {
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            spi: 0x1234_5678,
            reqid: 7,
            keys: SaKeys {
                spi: 0x1234_5678,
                key: [0x11; 32],
                salt: [0x22; 4],
            },
            mark: Some((encrypt_mark(3, 1), OUT_MARK_MASK)),
            output_mark: Some((0xD00, 0xF00)),
            replay_window: window,
            esn,
            encap: None,
        }
    }

    /// Encodes as a full netlink message and decodes it back, as a dump reply would arrive.
    fn wire(message: XfrmMessage) -> XfrmMessage {
        let mut header = NetlinkHeader::default();
        header.message_type = message.message_type();
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        packet.finalize();
        let mut bytes = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut bytes);
        let parsed = NetlinkMessage::<XfrmMessage>::deserialize(&bytes).unwrap();
        match parsed.payload {
            NetlinkPayload::InnerMessage(inner) => inner,
            other => panic!("unexpected payload {other:?}"),
        }
    }

    #[test]
    fn sa_message_layout() {
        let message = sa_message(&sa(true, 2048));
        let info = &message.user_sa_info;
        assert_eq!(info.id.proto, IPPROTO_ESP);
        assert_eq!(info.mode, XFRM_MODE_TUNNEL);
        assert_eq!(info.flags, XFRM_STATE_ESN);
        assert_eq!(info.replay_window, 0);
        assert_eq!(info.lifetime_cfg.hard_byte_limit, XFRM_INF);
        let aead = message
            .nlas
            .iter()
            .find_map(|n| match n {
                XfrmAttrs::EncryptionAlgAead(a) => Some(a),
                _ => None,
            })
            .unwrap();
        assert_eq!(&aead.alg_name[..17], b"rfc4106(gcm(aes))");
        assert_eq!(aead.alg_name[17], 0);
        assert_eq!((aead.alg_key_len, aead.alg_icv_len), (288, 128));
        assert_eq!(&aead.alg_key[..32], &[0x11; 32]);
        assert_eq!(&aead.alg_key[32..], &[0x22; 4]);
        let replay = message
            .nlas
            .iter()
            .find_map(|n| match n {
                XfrmAttrs::ReplayStateEsn(r) => Some(r),
                _ => None,
            })
            .unwrap();
        assert_eq!((replay.bmp_len, replay.replay_window), (64, 2048));
        // The emitted buffer has the struct sizes the kernel checks.
        let len = message.buffer_len();
        assert_eq!(len % 4, 0);
        assert!(len >= 224 + 4 + 72 + 36 + 4 + 24 + 256);
    }

    #[test]
    fn sa_roundtrips_without_key() {
        for (esn, window) in [(true, 2048), (false, 0), (true, 0), (false, 64)] {
            let spec = sa(esn, window);
            let reply = wire(XfrmMessage::AddSa(sa_message(&spec)));
            let XfrmMessage::AddSa(message) = reply else {
                panic!("not NEWSA")
            };
            let snapshot = parse_sa(&message).unwrap();
            assert_eq!(snapshot.id, spec.id());
            assert_eq!(snapshot.reqid, 7);
            assert_eq!(snapshot.mark, spec.mark);
            assert_eq!(snapshot.output_mark, spec.output_mark);
            assert_eq!(snapshot.esn, esn);
            assert_eq!(snapshot.replay_window, window);
            assert!(snapshot.is_enc());
            assert_eq!(snapshot.peer(), Some(3));
            assert!(!format!("{snapshot:?}").contains("17, 17"));
        }
    }

    #[test]
    fn esp_in_udp_sa_carries_xfrma_encap_in_the_kernel_layout() {
        let mut spec = sa(true, 2048);
        spec.encap = Some(UdpEncap::esp_in_udp(4500));
        let message = sa_message(&spec);
        let mut bytes = vec![0u8; message.buffer_len()];
        message.emit(&mut bytes);
        // struct nlattr { u16 nla_len = 4 + 24; u16 nla_type = XFRMA_ENCAP (4) }, then
        // struct xfrm_encap_tmpl { u16 encap_type = UDP_ENCAP_ESPINUDP (2, host order);
        // be16 encap_sport = 4500; be16 encap_dport = 4500; 2 bytes padding;
        // xfrm_address_t encap_oa = 0 (16 bytes) }.
        let mut want = vec![28, 0, 4, 0, 2, 0, 0x11, 0x94, 0x11, 0x94, 0, 0];
        want.extend([0u8; 16]);
        let at = bytes
            .windows(want.len())
            .position(|w| w == want.as_slice())
            .unwrap_or_else(|| panic!("no XFRMA_ENCAP {want:02x?} in {bytes:02x?}"));
        assert_eq!(at % 4, 0, "attribute not 4-aligned");
        // Once, and after the fixed header (struct xfrm_usersa_info, 224 bytes).
        assert!(at >= 224);
        assert_eq!(
            bytes
                .windows(4)
                .enumerate()
                .filter(|(i, w)| i % 4 == 0 && *i >= 224 && w[2..4] == [4, 0] && w[0] == 28)
                .count(),
            1
        );
        // Without encapsulation there is no XFRMA_ENCAP at all.
        let plain = sa_message(&sa(true, 2048));
        assert!(
            !plain
                .nlas
                .iter()
                .any(|n| matches!(n, XfrmAttrs::EncapsulationTemplate(_)))
        );
        assert_eq!(message.buffer_len(), plain.buffer_len() + 28);
    }

    #[test]
    fn esp_in_udp_sa_roundtrips_its_encap() {
        let mut spec = sa(true, 2048);
        spec.encap = Some(UdpEncap::esp_in_udp(4500));
        let XfrmMessage::AddSa(message) = wire(XfrmMessage::AddSa(sa_message(&spec))) else {
            panic!("not NEWSA")
        };
        let snapshot = parse_sa(&message).unwrap();
        assert_eq!(snapshot.encap, Some(UdpEncap::esp_in_udp(4500)));
        assert_eq!(
            snapshot.encap.map(|e| (e.kind, e.sport, e.dport)),
            Some((2, 4500, 4500))
        );
        let XfrmMessage::AddSa(message) = wire(XfrmMessage::AddSa(sa_message(&sa(true, 0)))) else {
            panic!("not NEWSA")
        };
        assert_eq!(parse_sa(&message).unwrap().encap, None);
    }

    #[test]
    fn bad_encapsulations_are_refused() {
        for encap in [
            UdpEncap::esp_in_udp(0),
            UdpEncap {
                kind: 1,
                sport: 4500,
                dport: 4500,
            },
        ] {
            let mut spec = sa(true, 0);
            spec.encap = Some(encap);
            assert!(
                matches!(
                    spec.validate(),
                    Err(Error::Invalid {
                        field: "sa.encap",
                        ..
                    })
                ),
                "{encap:?}"
            );
        }
    }

    #[test]
    fn esp_in_udp_socket_binds_and_a_taken_port_names_address_and_port() {
        // Unprivileged: UDP_ENCAP needs no capability. Port 0 picks a free port.
        let xfrm_less = bind_esp_in_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        let at = xfrm_less.local_addr().unwrap();
        let Err(err) = bind_esp_in_udp(at) else {
            panic!("a second bind to {at} succeeded")
        };
        assert!(
            matches!(err, Error::PortInUse { at: a, .. } if a == at),
            "{err:?}"
        );
        assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE));
        let text = err.to_string();
        assert!(text.contains(&at.to_string()), "{text}");
    }

    #[test]
    fn wipe_keys_zeroes_the_aead_key() {
        let mut message = XfrmMessage::AddSa(sa_message(&sa(true, 0)));
        wipe_keys(&mut message);
        let XfrmMessage::AddSa(m) = message else {
            unreachable!()
        };
        for nla in m.nlas {
            if let XfrmAttrs::EncryptionAlgAead(a) = nla {
                assert!(a.alg_key.iter().all(|b| *b == 0));
            }
        }
    }

    #[test]
    fn sa_esn_sequence_numbers_are_64_bit() {
        let mut message = sa_message(&sa(true, 32));
        for nla in &mut message.nlas {
            if let XfrmAttrs::ReplayStateEsn(r) = nla {
                r.oseq = 5;
                r.oseq_hi = 1;
                r.seq = 9;
                r.seq_hi = 2;
            }
        }
        let snapshot = parse_sa(&message).unwrap();
        assert_eq!(snapshot.oseq, (1 << 32) | 5);
        assert_eq!(snapshot.seq, (2 << 32) | 9);
    }

    fn policy(dir: PolicyDir, src: &str, dst: &str, tmpl: bool) -> PolicySpec {
        PolicySpec {
            dir,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            mark: (encrypt_mark(9, 2), OUT_MARK_MASK),
            priority: PRIORITY_PEER,
            action: if tmpl {
                PolicyAction::Allow
            } else {
                PolicyAction::Block
            },
            tmpl: tmpl.then(|| Tmpl {
                src: "192.168.1.1".parse().unwrap(),
                dst: "192.168.1.2".parse().unwrap(),
                reqid: 42,
            }),
        }
    }

    #[test]
    fn policy_roundtrips() {
        for p in [
            policy(PolicyDir::Out, "10.1.0.0/24", "10.2.0.0/24", true),
            policy(PolicyDir::In, "10.2.0.0/24", "10.1.0.0/24", true),
            policy(PolicyDir::Fwd, "fd00:2::/64", "fd00:1::/64", true),
            policy(PolicyDir::Out, "0.0.0.0/0", "0.0.0.0/0", false),
            policy(PolicyDir::Out, "::/0", "::/0", false),
        ] {
            let reply = wire(XfrmMessage::UpdatePolicy(policy_message(&p)));
            let XfrmMessage::UpdatePolicy(message) = reply else {
                panic!("not UPDPOLICY")
            };
            assert_eq!(parse_policy(&message), Some(p.clone()), "{p}");
        }
    }

    #[test]
    fn policy_id_names_selector_direction_and_mark() {
        let p = policy(PolicyDir::Fwd, "10.2.0.0/16", "10.1.0.0/16", true);
        let id = policy_id_message(&p);
        assert_eq!(id.user_policy_id.direction, XFRM_POLICY_FWD);
        assert_eq!(id.user_policy_id.selector.prefixlen_s, 16);
        assert_eq!(id.user_policy_id.selector.family, AF_INET);
        assert_eq!(
            id.nlas,
            vec![XfrmAttrs::Mark(Mark {
                value: p.mark.0,
                mask: p.mark.1
            })]
        );
        let reply = wire(XfrmMessage::DeletePolicy(id.clone()));
        assert_eq!(reply, XfrmMessage::DeletePolicy(id));
    }

    #[test]
    fn sa_id_carries_the_mark_under_a_full_mask() {
        let spec = sa(true, 0);
        let message = sa_id_message(&spec.id(), spec.mark);
        assert_eq!(message.user_sa_id.spi, spec.spi);
        assert_eq!(message.user_sa_id.family, AF_INET);
        assert_eq!(
            message.nlas,
            vec![XfrmAttrs::Mark(Mark {
                value: encrypt_mark(3, 1),
                mask: u32::MAX
            })]
        );
        assert!(sa_id_message(&spec.id(), None).nlas.is_empty());
    }

    #[test]
    fn foreign_and_unexpressible_policies_are_skipped() {
        let mut message = policy_message(&policy(PolicyDir::Out, "10.0.0.0/8", "10.0.0.0/8", true));
        message.user_policy_info.selector.proto = 6;
        assert_eq!(parse_policy(&message), None);
        let mut unmarked = policy(PolicyDir::Out, "10.0.0.0/8", "10.0.0.0/8", true);
        unmarked.mark = (0, 0);
        let parsed = parse_policy(&policy_message(&unmarked)).unwrap();
        assert!(!parsed.is_enc());
    }

    #[test]
    fn ipv6_addresses_roundtrip() {
        let mut spec = sa(true, 0);
        spec.src = "fd00::1".parse().unwrap();
        spec.dst = "fd00::2".parse().unwrap();
        let XfrmMessage::AddSa(message) = wire(XfrmMessage::AddSa(sa_message(&spec))) else {
            panic!()
        };
        assert_eq!(parse_sa(&message).unwrap().id, spec.id());
    }
}
