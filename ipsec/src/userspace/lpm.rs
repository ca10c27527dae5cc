//! Longest-prefix match from inner destination addresses to peers.
//!
//! The table is rebuilt from the peer set on every configuration change, so it only needs
//! `insert` and `lookup`. Each address family keeps one hash map per prefix length present,
//! longest first; a lookup probes at most one map per distinct length and never allocates.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;

use ipnet::IpNet;

/// The prefixes of one family, as `(length, network -> value)` levels sorted longest first.
#[derive(Debug)]
struct Levels<K, V> {
    levels: Vec<(u8, HashMap<K, V>)>,
}

impl<K, V> Default for Levels<K, V> {
    fn default() -> Self {
        Self { levels: Vec::new() }
    }
}

impl<K: Hash + Eq, V> Levels<K, V> {
    fn insert(&mut self, len: u8, network: K, value: V) -> Option<V> {
        let at = match self.levels.binary_search_by(|(l, _)| len.cmp(l)) {
            Ok(at) => at,
            Err(at) => {
                self.levels.insert(at, (len, HashMap::new()));
                at
            }
        };
        self.levels[at].1.insert(network, value)
    }

    fn get(&self, len: u8, network: &K) -> Option<&V> {
        let at = self.levels.binary_search_by(|(l, _)| len.cmp(l)).ok()?;
        self.levels[at].1.get(network)
    }

    fn lookup(&self, network_of: impl Fn(u8) -> K) -> Option<&V> {
        self.levels
            .iter()
            .find_map(|(len, map)| map.get(&network_of(*len)))
    }
}

/// `addr` with all but the first `len` bits cleared.
fn mask_v4(addr: u32, len: u8) -> u32 {
    let keep = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    addr & keep
}

/// `addr` with all but the first `len` bits cleared.
fn mask_v6(addr: u128, len: u8) -> u128 {
    let keep = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
    addr & keep
}

/// A longest-prefix-match table. Prefixes are stored truncated (`10.0.0.1/24` is `10.0.0.0/24`).
#[derive(Debug)]
pub(crate) struct Lpm<V> {
    v4: Levels<u32, V>,
    v6: Levels<u128, V>,
}

impl<V> Default for Lpm<V> {
    fn default() -> Self {
        Self {
            v4: Levels::default(),
            v6: Levels::default(),
        }
    }
}

impl<V> Lpm<V> {
    /// Maps `net` to `value`, returning the value it replaced.
    pub(crate) fn insert(&mut self, net: IpNet, value: V) -> Option<V> {
        match net.trunc() {
            IpNet::V4(n) => self.v4.insert(n.prefix_len(), n.network().to_bits(), value),
            IpNet::V6(n) => self.v6.insert(n.prefix_len(), n.network().to_bits(), value),
        }
    }

    /// The value of exactly `net`.
    pub(crate) fn get(&self, net: IpNet) -> Option<&V> {
        match net.trunc() {
            IpNet::V4(n) => self.v4.get(n.prefix_len(), &n.network().to_bits()),
            IpNet::V6(n) => self.v6.get(n.prefix_len(), &n.network().to_bits()),
        }
    }

    /// The value of the longest prefix that contains `addr`.
    pub(crate) fn lookup(&self, addr: IpAddr) -> Option<&V> {
        match addr {
            IpAddr::V4(a) => {
                let a = a.to_bits();
                self.v4.lookup(|len| mask_v4(a, len))
            }
            IpAddr::V6(a) => {
                let a = a.to_bits();
                self.v6.lookup(|len| mask_v6(a, len))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins() {
        let mut t = Lpm::default();
        t.insert(net("10.0.0.0/8"), 1);
        t.insert(net("10.1.0.0/16"), 2);
        t.insert(net("10.1.2.3/32"), 3);
        t.insert(net("0.0.0.0/0"), 4);
        t.insert(net("fd00::/8"), 5);
        t.insert(net("fd00:1::/32"), 6);
        assert_eq!(t.lookup(ip("10.1.2.3")), Some(&3));
        assert_eq!(t.lookup(ip("10.1.2.4")), Some(&2));
        assert_eq!(t.lookup(ip("10.2.0.1")), Some(&1));
        assert_eq!(t.lookup(ip("192.0.2.1")), Some(&4));
        assert_eq!(t.lookup(ip("fd00:1::9")), Some(&6));
        assert_eq!(t.lookup(ip("fe80::1")), None);
        assert_eq!(t.lookup(ip("fdff::1")), Some(&5));
    }

    #[test]
    fn prefixes_are_truncated() {
        let mut t = Lpm::default();
        assert_eq!(t.insert(net("10.9.9.1/24"), 1), None);
        assert_eq!(t.insert(net("10.9.9.0/24"), 2), Some(1));
        assert_eq!(t.get(net("10.9.9.77/24")), Some(&2));
        assert_eq!(t.get(net("10.9.0.0/16")), None);
    }

    #[test]
    fn masks() {
        assert_eq!(mask_v4(0xffff_ffff, 0), 0);
        assert_eq!(mask_v4(0xffff_ffff, 32), 0xffff_ffff);
        assert_eq!(mask_v4(0x0a01_0203, 16), 0x0a01_0000);
        assert_eq!(mask_v6(u128::MAX, 0), 0);
        assert_eq!(mask_v6(u128::MAX, 128), u128::MAX);
        assert_eq!(mask_v6(u128::MAX, 1), 1 << 127);
    }
}
