//! Text rendering of API answers.

use enc_api::{AuthState, PeerInfo, Status};
use std::fmt::Write;

/// Renders rows as aligned columns; the last column is not padded.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let n = cells.len();
        let mut s = String::new();
        for (i, c) in cells.into_iter().enumerate() {
            if i + 1 == n {
                s.push_str(c);
            } else {
                let _ = write!(s, "{:<w$}  ", c, w = widths[i]);
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

/// Bytes in binary units.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Seconds as a short age ("42s", "5m", "3h", "2d").
pub fn age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// `encctl peers -o wide`: identity and authentication history per peer.
pub fn peers_wide(peers: &[PeerInfo]) -> String {
    let rows: Vec<Vec<String>> = peers
        .iter()
        .map(|p| {
            let state = match &p.auth {
                AuthState::Pending { .. } => "pending",
                AuthState::Authenticated => "authenticated",
                AuthState::Failed { .. } => "failed",
            };
            let cert = p.certificate.as_ref();
            vec![
                p.name.clone(),
                p.address.to_string(),
                format!("{state} ({})", age(p.state_age_seconds)),
                cert.map(|c| c.serial.clone()).unwrap_or_else(|| "-".into()),
                cert.map(|c| c.issuer.clone()).unwrap_or_else(|| "-".into()),
                cert.map(|c| c.not_after.clone())
                    .unwrap_or_else(|| "-".into()),
                p.last_success_seconds
                    .map(|s| format!("{} ago", age(s)))
                    .unwrap_or_else(|| "never".into()),
                p.failures.to_string(),
                p.last_failure
                    .as_ref()
                    .map(|f| format!("{} ago: {}", age(f.age_seconds), f.reason))
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "ADDRESS",
            "AUTH",
            "SERIAL",
            "ISSUER",
            "EXPIRES",
            "LAST AUTH",
            "FAILURES",
            "LAST FAILURE",
        ],
        &rows,
    )
}

/// One line of `encctl events`.
pub fn event(e: &enc_api::Event) -> String {
    let kind = serde_json::to_value(e.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{:?}", e.kind));
    let mut s = format!("{} #{} {} {}", e.time, e.seq, e.node, kind);
    if let Some(p) = &e.peer {
        let _ = write!(s, " peer={p}");
    }
    if let Some(ep) = e.epoch {
        let _ = write!(s, " epoch={ep}");
    }
    if let Some(serial) = &e.serial {
        let _ = write!(s, " serial={serial}");
    }
    if !e.detail.is_empty() {
        let _ = write!(s, ": {}", e.detail);
    }
    s
}

/// `encctl status` text.
pub fn status(s: &Status) -> String {
    let e = &s.encryption;
    let p = &s.peers;
    format!(
        "node:        {} ({}, pods {})\n\
         agent:       enc-agent {} up {}\n\
         encryption:  {}\n\
         backend:     {}\n\
         {}\
         control:     tls 1.3 mutual auth on {} ({})\n\
         certificate: {} serial {} expires {}\n\
         peers:       {} total, {} authenticated, {} pending, {} failed\n\
         keys:        {}\n\
         {}\
         counters:    {} packets steered ({}), {} dropped{}, {} leaked\n\
         {}{}",
        s.node.name,
        s.node.underlay_address,
        s.node.pod_cidr,
        s.version,
        age(s.uptime_seconds),
        if e.kind == "none" {
            "none: pod traffic crosses unencrypted".to_owned()
        } else {
            format!(
                "{} via {} on {}{} (mtu {})",
                e.kind,
                e.backend,
                e.interface,
                e.listen_port
                    .map(|p| format!(", udp port {p}"))
                    .unwrap_or_default(),
                e.mtu
            )
        },
        e.backend_reason,
        match (&e.public_key, &e.ipsec) {
            (Some(k), _) => format!("public key:  {k}\n"),
            (None, Some(i)) => format!(
                "ipsec keys:  {} of {} expected SAs installed{}\n",
                i.keys_in_use,
                i.keys_expected,
                xfrm_errors(&i.xfrm_stat)
            ),
            (None, None) => String::new(),
        },
        s.control.listen,
        s.control.dial_rule,
        s.certificate.subject,
        s.certificate.serial,
        s.certificate.not_after,
        p.total,
        p.authenticated,
        p.pending,
        p.failed,
        keys(&s.keys),
        if s.datapath.attach_mode == "off" {
            "datapath:    no eBPF programs (encryption is off)\n".to_owned()
        } else {
            format!(
                "datapath:    eBPF via {} on {} and {} pod interface(s), strict mode {}, pinned at {}\n",
                s.datapath.attach_mode,
                s.datapath.underlay_interface,
                s.datapath.pod_interfaces.len(),
                if s.datapath.strict_mode {
                    "on"
                } else {
                    "off (drops are only counted)"
                },
                s.datapath.pin_dir,
            )
        },
        s.datapath.totals.steered_packets,
        bytes(s.datapath.totals.steered_bytes),
        s.datapath.totals.total_drops(),
        drop_detail(&s.datapath.totals),
        s.datapath.totals.leak_packets,
        device_drops(e),
        network(&s.network),
    ) + &expiry(&s.expiry)
        + &renewal(s.renewal.as_ref(), s.issuer.as_ref())
}

/// The `renewal:` and `issuer:` lines of `encctl status` (when configured).
pub fn renewal(r: Option<&enc_api::RenewalInfo>, i: Option<&enc_api::IssuerInfo>) -> String {
    let mut out = String::new();
    if let Some(r) = r {
        let _ = write!(
            out,
            "renewal:     next attempt {} (in {}) with issuer {}; {} renewal(s) since start",
            r.next_attempt,
            age(r.next_attempt_seconds),
            r.issuer,
            r.renewals
        );
        if let Some(last) = &r.last_renewal {
            let _ = write!(out, ", last at {last}");
        }
        match &r.last_error {
            Some(e) => {
                let _ = write!(
                    out,
                    "\n             failing: {} attempt(s), last error: {e}",
                    r.failures
                );
            }
            None => out.push_str("; no error"),
        }
        out.push('\n');
    }
    if let Some(i) = i {
        let _ = writeln!(
            out,
            "issuer:      listening on {}, lifetime {}; {} enrolled, {} renewed, {} refused since start",
            i.listen,
            age(i.cert_lifetime_seconds),
            i.enrolled,
            i.renewed,
            i.refused
        );
    }
    out
}

/// The `expiry:` line of `encctl status`: the certificate that expires first.
pub fn expiry(x: &enc_api::ExpiryInfo) -> String {
    if x.soonest_not_after.is_empty() {
        return String::new();
    }
    let left = if x.soonest_seconds_left < 0 {
        "expired".to_owned()
    } else {
        format!("in {}", age(x.soonest_seconds_left as u64))
    };
    let mut line = format!(
        "expiry:      soonest {} at {} ({left})",
        x.soonest_node, x.soonest_not_after
    );
    if !x.expiring.is_empty() {
        let _ = write!(
            line,
            "; 20% or less of the lifetime left: {}",
            x.expiring.join(", ")
        );
    }
    line.push('\n');
    line
}

/// The `tunnel:` and `mtu:` lines of `encctl status`.
pub fn network(n: &enc_api::NetworkInfo) -> String {
    let tunnel = match (&n.overlay_device, n.overlay_port, n.vni) {
        (Some(dev), Some(port), Some(vni)) => {
            format!("{} on {dev} (udp port {port}, vni {vni})", n.tunnel)
        }
        _ if n.tunnel.is_empty() => "unknown".to_owned(),
        _ => format!("{} (direct routing)", n.tunnel),
    };
    let mut mtu = format!("underlay {}", n.underlay_mtu);
    if let Some(m) = n.encryption_mtu {
        let _ = write!(mtu, ", encryption device {m}");
    }
    if let Some(m) = n.overlay_mtu {
        let _ = write!(mtu, ", overlay device {m}");
    }
    let _ = write!(mtu, ", pod routes {}", n.pod_mtu);
    format!(
        "tunnel:      {tunnel}; on the wire: {}\nmtu:         {mtu}\n",
        n.stack
    )
}

/// The `keys:` line of `encctl status`.
pub fn keys(k: &enc_api::KeysSummary) -> String {
    let mut s = format!(
        "{} in use / {} expected; rotations in progress: {}",
        k.in_use, k.expected, k.rotations_in_progress
    );
    if !k.stuck_peers.is_empty() {
        let _ = write!(s, "; stuck: {}", k.stuck_peers.join(", "));
    }
    match k.rotation_interval_seconds {
        Some(secs) => {
            let _ = write!(
                s,
                "; schedule: every {}",
                humantime::format_duration(std::time::Duration::from_secs(secs))
            );
        }
        None => s.push_str("; no schedule"),
    }
    s
}

/// The ROTATION column of `encctl peers`: outbound epoch, and the rotation in flight.
pub fn rotation(r: Option<&enc_api::RotationInfo>) -> String {
    let Some(r) = r else {
        return "-".into();
    };
    let mut s = r
        .outbound_epoch
        .map_or_else(|| "-".to_owned(), |e| e.to_string());
    if r.phase != "idle" {
        let target = r
            .target_epoch
            .map_or_else(|| "?".to_owned(), |e| e.to_string());
        let _ = write!(s, " -> {target} ({})", r.phase);
    }
    if r.stuck.is_some() {
        s.push_str(" STUCK");
    }
    s
}

fn xfrm_errors(stat: &std::collections::BTreeMap<String, u64>) -> String {
    let nonzero: Vec<String> = stat
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    if nonzero.is_empty() {
        String::new()
    } else {
        format!("; kernel XFRM errors: {}", nonzero.join(", "))
    }
}

/// The `device:` line of `encctl status`: drops of the userspace datapath that belong to no
/// peer (nothing with a kernel backend, or from an agent that does not report them).
fn device_drops(e: &enc_api::EncryptionInfo) -> String {
    if e.device_drops.is_empty() {
        return String::new();
    }
    let total: u64 = e.device_drops.values().sum();
    let parts: Vec<String> = e
        .device_drops
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    let detail = if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    };
    format!(
        "device:      {} dropped {total} packet(s) of no peer{detail}\n",
        e.interface
    )
}

fn drop_detail(c: &enc_api::DatapathCounters) -> String {
    let parts: Vec<String> = c
        .drops
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    }
}

/// `encctl peers` text.
pub fn peers(peers: &[PeerInfo]) -> String {
    let rows: Vec<Vec<String>> = peers
        .iter()
        .map(|p| {
            let (state, detail) = match &p.auth {
                AuthState::Pending { detail } => ("pending", detail.clone()),
                AuthState::Authenticated => ("authenticated", String::new()),
                AuthState::Failed { reason } => ("failed", reason.clone()),
            };
            let cert = p.certificate.as_ref();
            let wg = p.wireguard.as_ref();
            let esp = p.ipsec.as_ref();
            let (link, rx, tx) = match (wg, esp) {
                (Some(w), _) => (
                    w.last_handshake_seconds
                        .map(|s| format!("{} ago", age(s)))
                        .unwrap_or_else(|| "-".into()),
                    bytes(w.rx_bytes),
                    bytes(w.tx_bytes),
                ),
                (None, Some(e)) => (
                    format!("esp {} seq {}", e.out_spi, e.out_seq),
                    bytes(e.rx_bytes),
                    bytes(e.tx_bytes),
                ),
                (None, None) => ("-".into(), "-".into(), "-".into()),
            };
            let esp_drops: Vec<String> = esp
                .map(|e| {
                    e.drops
                        .iter()
                        .filter(|(_, n)| **n > 0)
                        .map(|(k, n)| format!("esp {k} {n}"))
                        .collect()
                })
                .unwrap_or_default();
            let detail = match (detail.is_empty(), esp_drops.is_empty()) {
                (_, true) => detail,
                (true, false) => esp_drops.join(", "),
                (false, false) => format!("{detail}; {}", esp_drops.join(", ")),
            };
            vec![
                p.name.clone(),
                p.address.to_string(),
                format!("{state} ({})", age(p.state_age_seconds)),
                cert.map(|c| c.subject.clone())
                    .unwrap_or_else(|| "-".into()),
                cert.map(|c| short_serial(&c.serial))
                    .unwrap_or_else(|| "-".into()),
                cert.map(|c| c.not_after.clone())
                    .unwrap_or_else(|| "-".into()),
                p.key
                    .as_ref()
                    .map(|k| format!("{}/{}", k.epoch, k.key_id))
                    .unwrap_or_else(|| "-".into()),
                rotation(p.rotation.as_ref()),
                link,
                rx,
                tx,
                p.counters.total_drops().to_string(),
                p.counters.leak_packets.to_string(),
                match drop_detail(&p.counters) {
                    d if d.is_empty() => detail,
                    d if detail.is_empty() => format!("drops:{d}"),
                    d => format!("{detail}; drops:{d}"),
                },
            ]
        })
        .collect();
    let table = table(
        &[
            "NAME",
            "ADDRESS",
            "AUTH",
            "SUBJECT",
            "SERIAL",
            "EXPIRES",
            "EPOCH/KEY",
            "ROTATION",
            "HANDSHAKE/SA",
            "RX",
            "TX",
            "DROPS",
            "LEAKS",
            "DETAIL",
        ],
        &rows,
    );
    // A stuck rotation gets its own line under the peer's row: the text is long.
    let mut out = String::new();
    let mut lines = table.lines();
    if let Some(header) = lines.next() {
        out.push_str(header);
        out.push('\n');
    }
    for (line, p) in lines.zip(peers) {
        out.push_str(line);
        out.push('\n');
        if let Some(stuck) = p.rotation.as_ref().and_then(|r| r.stuck.as_ref()) {
            let _ = writeln!(out, "  {}: {stuck}", p.name);
        }
    }
    out
}

fn short_serial(s: &str) -> String {
    if s.len() > 12 {
        format!("{}…", &s[..12])
    } else {
        s.to_owned()
    }
}

/// `encctl cert inspect` text.
pub fn cert(c: &enc_certs::CertInfo) -> String {
    let mut sans: Vec<String> = c.dns_names.iter().map(|d| format!("DNS:{d}")).collect();
    sans.extend(c.ips.iter().map(|ip| format!("IP:{ip}")));
    format!(
        "  subject:     {}\n  issuer:      {}\n  serial:      {}\n  SANs:        {}\n  not before:  {}\n  not after:   {}\n  sha256:      {}\n  is CA:       {}\n",
        c.subject,
        c.issuer,
        c.serial,
        if sans.is_empty() {
            "-".into()
        } else {
            sans.join(", ")
        },
        rfc3339(c.not_before),
        rfc3339(c.not_after),
        c.sha256_fingerprint,
        c.is_ca,
    )
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(&["A", "BB"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
    }

    #[test]
    fn units() {
        assert_eq!(bytes(10), "10 B");
        assert_eq!(bytes(2048), "2.0 KiB");
        assert_eq!(age(59), "59s");
        assert_eq!(age(3600), "60m");
        assert_eq!(age(86_400 * 3), "3d");
    }

    fn rotation_info(phase: &str, stuck: Option<&str>) -> enc_api::RotationInfo {
        enc_api::RotationInfo {
            side: "leader".into(),
            outbound_epoch: Some(3),
            inbound_epochs: vec![3, 4],
            phase: phase.into(),
            target_epoch: (phase != "idle").then_some(4),
            phase_age_seconds: Some(12),
            stuck: stuck.map(str::to_owned),
            completed: 2,
            last_completed_epoch: Some(3),
            last_completed_seconds_ago: Some(600),
        }
    }

    #[test]
    fn rotation_column() {
        assert_eq!(rotation(None), "-");
        assert_eq!(rotation(Some(&rotation_info("idle", None))), "3");
        assert_eq!(
            rotation(Some(&rotation_info(
                "prepared",
                Some("rotation stuck: no ack")
            ))),
            "3 -> 4 (prepared) STUCK"
        );
    }

    #[test]
    fn device_drops_line() {
        let mut e = enc_api::EncryptionInfo {
            kind: "wireguard".into(),
            backend: "kernel-wireguard".into(),
            backend_reason: "x".into(),
            interface: "enc0".into(),
            listen_port: Some(51820),
            public_key: None,
            mtu: 1420,
            ipsec: None,
            device_drops: Default::default(),
        };
        assert_eq!(device_drops(&e), "");
        e.backend = "boringtun".into();
        e.device_drops = [("invalid".to_owned(), 0), ("no-route".to_owned(), 0)].into();
        assert_eq!(
            device_drops(&e),
            "device:      enc0 dropped 0 packet(s) of no peer\n"
        );
        e.device_drops.insert("no-route".into(), 5);
        e.device_drops.insert("tun-error".into(), 1);
        assert_eq!(
            device_drops(&e),
            "device:      enc0 dropped 6 packet(s) of no peer (no-route 5, tun-error 1)\n"
        );
    }

    #[test]
    fn keys_line() {
        let mut k = enc_api::KeysSummary {
            in_use: 6,
            expected: 6,
            rotations_in_progress: 1,
            stuck_peers: vec!["node-3".into()],
            rotation_interval_seconds: Some(3600),
        };
        assert_eq!(
            keys(&k),
            "6 in use / 6 expected; rotations in progress: 1; stuck: node-3; schedule: every 1h"
        );
        k.stuck_peers.clear();
        k.rotation_interval_seconds = None;
        assert_eq!(
            keys(&k),
            "6 in use / 6 expected; rotations in progress: 1; no schedule"
        );
    }

    #[test]
    fn peers_show_stuck_detail_line() {
        let peer = |name: &str, r: Option<enc_api::RotationInfo>| PeerInfo {
            name: name.into(),
            address: "10.0.0.2".parse().unwrap(),
            pod_cidr: "10.244.2.0/24".into(),
            role: "dial".into(),
            auth: AuthState::Authenticated,
            state_age_seconds: 5,
            failures: 0,
            last_success_seconds: None,
            last_failure: None,
            certificate: None,
            key: Some(enc_api::KeyInfo {
                epoch: 3,
                key_id: "0a1b2c3d".into(),
            }),
            wireguard: None,
            ipsec: None,
            rotation: r,
            datapath_id: 1,
            counters: Default::default(),
        };
        let text = peers(&[
            peer(
                "node-2",
                Some(rotation_info(
                    "prepared",
                    Some("rotation stuck: no ack since 2026-11-22T08:40:01Z (12s)"),
                )),
            ),
            peer("node-3", Some(rotation_info("idle", None))),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].contains("ROTATION"), "{text}");
        assert!(
            lines[1].starts_with("node-2") && lines[1].contains("3 -> 4 (prepared) STUCK"),
            "{text}"
        );
        assert_eq!(
            lines[2],
            "  node-2: rotation stuck: no ack since 2026-11-22T08:40:01Z (12s)"
        );
        assert!(lines[3].starts_with("node-3"), "{text}");
    }
}
