//! MTU arithmetic: what each encapsulation layer costs.
//!
//! A packet sent into a WireGuard device leaves the node as
//! `outer IP | UDP | WireGuard data header (16) | encrypted inner packet | Poly1305 tag (16)`.
//! The device MTU is therefore the underlay MTU minus [`Underlay::ip_header_len`], [`UDP_HEADER`]
//! and [`WIREGUARD_OVERHEAD`]: 1440 on a 1500-byte IPv4 underlay and 1420 on IPv6, the values
//! `wg-quick` uses.
//!
//! WireGuard pads the plaintext to a multiple of 16 bytes, but Linux caps the padded length at the
//! device MTU (`calculate_skb_padding` in `drivers/net/wireguard/send.c`) and boringtun does not
//! pad, so padding never makes an outer packet exceed the underlay MTU and the device MTU needs
//! no rounding down to a multiple of 16.

use crate::{Error, Result};

/// IPv4 header without options.
pub const IPV4_HEADER: u32 = 20;
/// IPv6 fixed header.
pub const IPV6_HEADER: u32 = 40;
/// UDP header.
pub const UDP_HEADER: u32 = 8;
/// WireGuard transport data message: 16-byte header (type, receiver index, counter) plus the
/// 16-byte Poly1305 authentication tag.
pub const WIREGUARD_OVERHEAD: u32 = 32;
/// Smallest datagram every IPv4 host must accept (RFC 791).
pub const IPV4_MIN_MTU: u32 = 576;
/// IPv6 minimum link MTU (RFC 8200); Linux disables IPv6 on links below it.
pub const IPV6_MIN_MTU: u32 = 1280;

/// Underlay IP version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Underlay {
    /// Nodes talk IPv4.
    V4,
    /// Nodes talk IPv6.
    V6,
}

impl Underlay {
    /// Length of the outer IP header: [`IPV4_HEADER`] or [`IPV6_HEADER`].
    pub fn ip_header_len(self) -> u32 {
        match self {
            Self::V4 => IPV4_HEADER,
            Self::V6 => IPV6_HEADER,
        }
    }
}

/// IP versions the overlay carries inside the tunnel (pod traffic).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Inner {
    /// IPv4 only: the MTU must be at least [`IPV4_MIN_MTU`].
    V4,
    /// IPv6, alone or with IPv4: the MTU must be at least [`IPV6_MIN_MTU`].
    V6,
}

impl Inner {
    fn minimum(self) -> (u32, &'static str) {
        match self {
            Self::V4 => (IPV4_MIN_MTU, "IPv4 minimum datagram size (RFC 791)"),
            Self::V6 => (IPV6_MIN_MTU, "IPv6 minimum link MTU (RFC 8200)"),
        }
    }
}

/// MTU of a WireGuard device on an underlay of `underlay_mtu`: minus the outer IP header (20 or
/// 40), UDP (8) and WireGuard (32: 16 header + 16 tag). See the [module docs](self) for why it is
/// not rounded to a multiple of 16.
///
/// Fails with [`Error::MtuTooSmall`] if the result is below [`IPV4_MIN_MTU`] (576). Use
/// [`wireguard_device_mtu_for`] with [`Inner::V6`] when the tunnel carries IPv6, which needs
/// [`IPV6_MIN_MTU`] (1280).
pub fn wireguard_device_mtu(underlay_mtu: u32, underlay: Underlay) -> Result<u32> {
    wireguard_device_mtu_for(underlay_mtu, underlay, Inner::V4)
}

/// Like [`wireguard_device_mtu`], checking the result against the minimum of the `inner` traffic.
pub fn wireguard_device_mtu_for(
    underlay_mtu: u32,
    underlay: Underlay,
    inner: Inner,
) -> Result<u32> {
    let overhead = underlay.ip_header_len() + UDP_HEADER + WIREGUARD_OVERHEAD;
    let mtu = underlay_mtu.saturating_sub(overhead);
    let (minimum, minimum_name) = inner.minimum();
    if mtu < minimum {
        return Err(Error::MtuTooSmall {
            underlay_mtu,
            mtu,
            minimum,
            minimum_name,
        });
    }
    Ok(mtu)
}

/// ESP header (SPI + sequence number).
pub const ESP_HEADER: u32 = 8;
/// RFC 4106 explicit IV.
pub const ESP_IV: u32 = 8;
/// ESP trailer: pad length and next header.
pub const ESP_TRAILER: u32 = 2;
/// RFC 4106 ICV (GCM tag).
pub const ESP_ICV: u32 = 16;

/// MTU of an ESP tunnel (RFC 4303 tunnel mode, RFC 4106 AES-GCM, 16-byte ICV) on an underlay of
/// `underlay_mtu`: the largest inner packet whose ESP packet fits. The encrypted part (inner +
/// padding + 2-byte trailer) is padded to a multiple of 4, so the result is the largest value
/// for which outer IP + 8 + 8 + round4(inner + 2) + 16 <= underlay MTU: 1446 on a 1500-byte IPv4
/// underlay, 1426 on IPv6.
pub fn esp_device_mtu(underlay_mtu: u32, underlay: Underlay, inner: Inner) -> Result<u32> {
    let room =
        underlay_mtu.saturating_sub(underlay.ip_header_len() + ESP_HEADER + ESP_IV + ESP_ICV);
    // The padded part is a multiple of 4; two of its bytes are the trailer.
    let mtu = (room / 4 * 4).saturating_sub(ESP_TRAILER);
    let (minimum, minimum_name) = inner.minimum();
    if mtu < minimum {
        return Err(Error::MtuTooSmall {
            underlay_mtu,
            mtu,
            minimum,
            minimum_name,
        });
    }
    Ok(mtu)
}

/// VXLAN header (flags, VNI).
pub const VXLAN_HEADER: u32 = 8;
/// Geneve base header, without options (enc sends none).
pub const GENEVE_HEADER: u32 = 8;
/// The inner Ethernet header both overlays carry.
pub const INNER_ETHERNET: u32 = 14;

/// What an overlay adds to each pod packet: outer IP (of the underlay's family) + UDP + the
/// overlay header + the inner Ethernet header: 50 bytes over IPv4, 70 over IPv6, for VXLAN and
/// for Geneve without options.
pub fn overlay_overhead(kind: crate::OverlayKind, underlay: Underlay) -> u32 {
    let header = match kind {
        crate::OverlayKind::Vxlan => VXLAN_HEADER,
        crate::OverlayKind::Geneve => GENEVE_HEADER,
    };
    underlay.ip_header_len() + UDP_HEADER + header + INNER_ETHERNET
}

/// The encryption layer, for [`plan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encryption {
    /// No encryption.
    None,
    /// WireGuard ([`wireguard_device_mtu`]).
    Wireguard,
    /// ESP tunnel mode with AES-GCM ([`esp_device_mtu`]).
    Esp,
    /// ESP as [`Encryption::Esp`], in UDP (RFC 3948): 8 bytes more per packet.
    EspInUdp,
}

/// The MTUs of one node's stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MtuPlan {
    /// The underlay MTU the plan starts from.
    pub underlay: u32,
    /// MTU of the encryption device (and of the routes into it), if there is encryption: the
    /// largest packet it seals into one underlay packet.
    pub encryption: Option<u32>,
    /// MTU of the overlay device, if there is an overlay: equal to `pod`.
    pub overlay: Option<u32>,
    /// The largest pod packet that crosses to another node without fragmentation: the MTU
    /// of the routes to remote pod CIDRs.
    pub pod: u32,
}

/// The MTUs of the stack `encryption` over `overlay` on an underlay of `underlay_mtu`.
///
/// With both, the overlay packet is what gets encrypted (encryption is outermost), so the pod
/// MTU is the encryption device's MTU minus the overlay overhead: 1390 for VXLAN in WireGuard
/// and 1396 for VXLAN in ESP on a 1500-byte IPv4 underlay. Without encryption it is the
/// underlay MTU minus the overlay overhead (1450), and without an overlay the encryption
/// device's MTU (1440 WireGuard, 1446 ESP) or the underlay MTU itself.
///
/// Fails with [`Error::MtuTooSmall`] when the pod MTU would be below the minimum of `inner`.
pub fn plan(
    underlay_mtu: u32,
    underlay: Underlay,
    inner: Inner,
    encryption: Encryption,
    overlay: Option<crate::OverlayKind>,
) -> Result<MtuPlan> {
    let (minimum, minimum_name) = inner.minimum();
    let too_small = |mtu| Error::MtuTooSmall {
        underlay_mtu,
        mtu,
        minimum,
        minimum_name,
    };
    let encryption = match encryption {
        Encryption::None => None,
        Encryption::Wireguard => Some(
            wireguard_device_mtu_for(underlay_mtu, underlay, Inner::V4)
                .map_err(|_| too_small(0))?,
        ),
        Encryption::Esp => {
            Some(esp_device_mtu(underlay_mtu, underlay, Inner::V4).map_err(|_| too_small(0))?)
        }
        Encryption::EspInUdp => Some(
            esp_device_mtu(underlay_mtu.saturating_sub(UDP_HEADER), underlay, Inner::V4)
                .map_err(|_| too_small(0))?,
        ),
    };
    let carrier = encryption.unwrap_or(underlay_mtu);
    let pod = match overlay {
        Some(kind) => carrier.saturating_sub(overlay_overhead(kind, underlay)),
        None => carrier,
    };
    if pod < minimum {
        return Err(too_small(pod));
    }
    Ok(MtuPlan {
        underlay: underlay_mtu,
        encryption,
        overlay: overlay.map(|_| pod),
        pod,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stacks() {
        use crate::OverlayKind::{Geneve, Vxlan};
        let p = |e, o| plan(1500, Underlay::V4, Inner::V4, e, o).unwrap();
        assert_eq!(p(Encryption::None, None).pod, 1500);
        assert_eq!(p(Encryption::None, Some(Vxlan)).pod, 1450);
        assert_eq!(p(Encryption::None, Some(Geneve)).pod, 1450);
        assert_eq!(p(Encryption::Wireguard, None).pod, 1440);
        let wg_vxlan = p(Encryption::Wireguard, Some(Vxlan));
        assert_eq!(
            (wg_vxlan.encryption, wg_vxlan.overlay, wg_vxlan.pod),
            (Some(1440), Some(1390), 1390)
        );
        assert_eq!(p(Encryption::Esp, None).pod, 1446);
        assert_eq!(p(Encryption::Esp, Some(Geneve)).pod, 1396);
        assert_eq!(p(Encryption::EspInUdp, None).pod, 1438);
        let v6 = plan(
            1500,
            Underlay::V6,
            Inner::V6,
            Encryption::Wireguard,
            Some(Vxlan),
        )
        .unwrap();
        assert_eq!((v6.encryption, v6.pod), (Some(1420), 1350));
        assert!(plan(1340, Underlay::V6, Inner::V6, Encryption::None, Some(Vxlan)).is_err());
        let err = plan(
            600,
            Underlay::V4,
            Inner::V4,
            Encryption::Wireguard,
            Some(Vxlan),
        )
        .unwrap_err();
        assert!(err.to_string().contains("576"), "{err}");
    }

    proptest::proptest! {
        /// Every layer fits: a pod packet of exactly the pod MTU becomes an underlay packet of
        /// at most the underlay MTU, and the plan is maximal for the overlay layer.
        #[test]
        fn pod_packets_fit(underlay_mtu in 1280u32..9001, v6 in proptest::bool::ANY,
                           enc in 0u8..4, ov in 0u8..3) {
            let underlay = if v6 { Underlay::V6 } else { Underlay::V4 };
            let encryption = [Encryption::None, Encryption::Wireguard, Encryption::Esp, Encryption::EspInUdp][enc as usize];
            let overlay = [None, Some(crate::OverlayKind::Vxlan), Some(crate::OverlayKind::Geneve)][ov as usize];
            if let Ok(p) = plan(underlay_mtu, underlay, Inner::V4, encryption, overlay) {
                let mut size = p.pod;
                if let Some(kind) = overlay {
                    size += overlay_overhead(kind, underlay);
                }
                size = match encryption {
                    Encryption::None => size,
                    Encryption::Wireguard => size + underlay.ip_header_len() + UDP_HEADER + WIREGUARD_OVERHEAD,
                    Encryption::Esp => underlay.ip_header_len() + ESP_HEADER + ESP_IV + (size + ESP_TRAILER).div_ceil(4) * 4 + ESP_ICV,
                    Encryption::EspInUdp => underlay.ip_header_len() + UDP_HEADER + ESP_HEADER + ESP_IV + (size + ESP_TRAILER).div_ceil(4) * 4 + ESP_ICV,
                };
                proptest::prop_assert!(size <= underlay_mtu, "{size} > {underlay_mtu}");
            }
        }
    }

    #[test]
    fn esp_values() {
        assert_eq!(esp_device_mtu(1500, Underlay::V4, Inner::V4).unwrap(), 1446);
        assert_eq!(esp_device_mtu(1500, Underlay::V6, Inner::V4).unwrap(), 1426);
        // The result always fits exactly: outer + 16 + padded + 16 <= underlay.
        for underlay_mtu in 1280..1600u32 {
            let inner = esp_device_mtu(underlay_mtu, Underlay::V4, Inner::V4).unwrap();
            let padded = (inner + 2).div_ceil(4) * 4;
            assert!(20 + 16 + padded + 16 <= underlay_mtu, "{underlay_mtu}");
            let padded_one_more = (inner + 3).div_ceil(4) * 4;
            assert!(
                20 + 16 + padded_one_more + 16 > underlay_mtu,
                "{underlay_mtu} not maximal"
            );
        }
        assert!(esp_device_mtu(1300, Underlay::V6, Inner::V6).is_err());
    }

    #[test]
    fn standard_values() {
        assert_eq!(wireguard_device_mtu(1500, Underlay::V4).unwrap(), 1440);
        assert_eq!(wireguard_device_mtu(1500, Underlay::V6).unwrap(), 1420);
        assert_eq!(wireguard_device_mtu(9000, Underlay::V4).unwrap(), 8940);
        assert_eq!(
            wireguard_device_mtu_for(1500, Underlay::V6, Inner::V6).unwrap(),
            1420
        );
    }

    #[test]
    fn boundary_of_ipv4_minimum() {
        assert_eq!(wireguard_device_mtu(636, Underlay::V4).unwrap(), 576);
        let err = wireguard_device_mtu(635, Underlay::V4).unwrap_err();
        match &err {
            Error::MtuTooSmall {
                underlay_mtu,
                mtu,
                minimum,
                minimum_name,
            } => {
                assert_eq!((*underlay_mtu, *mtu, *minimum), (635, 575, 576));
                assert!(minimum_name.contains("IPv4"));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("576"), "{err}");
    }

    #[test]
    fn boundary_of_ipv6_minimum() {
        assert_eq!(
            wireguard_device_mtu_for(1360, Underlay::V6, Inner::V6).unwrap(),
            1280
        );
        let err = wireguard_device_mtu_for(1359, Underlay::V6, Inner::V6).unwrap_err();
        assert!(matches!(
            err,
            Error::MtuTooSmall {
                minimum: 1280,
                mtu: 1279,
                ..
            }
        ));
        assert!(err.to_string().contains("1280"), "{err}");
        // 1280 on an IPv4 underlay is fine for IPv4 inner traffic, not for IPv6.
        assert_eq!(wireguard_device_mtu(1280, Underlay::V4).unwrap(), 1220);
        assert!(wireguard_device_mtu_for(1280, Underlay::V4, Inner::V6).is_err());
    }

    #[test]
    fn underlay_smaller_than_overhead_does_not_underflow() {
        for underlay_mtu in [0, 1, 59, 60, 80] {
            for underlay in [Underlay::V4, Underlay::V6] {
                assert!(matches!(
                    wireguard_device_mtu(underlay_mtu, underlay),
                    Err(Error::MtuTooSmall { .. })
                ));
            }
        }
        assert!(matches!(
            wireguard_device_mtu(10, Underlay::V6),
            Err(Error::MtuTooSmall { mtu: 0, .. })
        ));
    }
}
