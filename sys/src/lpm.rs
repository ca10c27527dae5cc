//! A longest-prefix-match table from IP prefixes to values.
//!
//! Each address family keeps one hash map per prefix length present, longest first; a lookup
//! probes at most one map per distinct length (at most 33 or 129) and never allocates.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// The prefixes of one family, as `(length, network -> value)` levels sorted longest first.
#[derive(Debug, Clone)]
struct Levels<K, V> {
    levels: Vec<(u8, HashMap<K, V>)>,
}

impl<K, V> Default for Levels<K, V> {
    fn default() -> Self {
        Self { levels: Vec::new() }
    }
}

impl<K: Hash + Eq, V> Levels<K, V> {
    fn position(&self, len: u8) -> Result<usize, usize> {
        self.levels.binary_search_by(|(l, _)| len.cmp(l))
    }

    fn insert(&mut self, len: u8, network: K, value: V) -> Option<V> {
        let at = self.position(len).unwrap_or_else(|at| {
            self.levels.insert(at, (len, HashMap::new()));
            at
        });
        self.levels[at].1.insert(network, value)
    }

    fn remove(&mut self, len: u8, network: &K) -> Option<V> {
        let at = self.position(len).ok()?;
        let old = self.levels[at].1.remove(network);
        if self.levels[at].1.is_empty() {
            self.levels.remove(at);
        }
        old
    }

    fn get(&self, len: u8, network: &K) -> Option<&V> {
        let at = self.position(len).ok()?;
        self.levels[at].1.get(network)
    }

    fn lookup(&self, network_of: impl Fn(u8) -> K) -> Option<&V> {
        self.levels
            .iter()
            .find_map(|(len, map)| map.get(&network_of(*len)))
    }

    fn retain(&mut self, mut f: impl FnMut(u8, &K, &V) -> bool) {
        for (len, map) in &mut self.levels {
            map.retain(|k, v| f(*len, k, v));
        }
        self.levels.retain(|(_, map)| !map.is_empty());
    }

    fn iter(&self) -> impl Iterator<Item = (u8, &K, &V)> + '_ {
        self.levels
            .iter()
            .flat_map(|(len, map)| map.iter().map(move |(k, v)| (*len, k, v)))
    }

    fn len(&self) -> usize {
        self.levels.iter().map(|(_, map)| map.len()).sum()
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

fn net_v4(network: u32, len: u8) -> IpNet {
    IpNet::V4(Ipv4Net::new_assert(network.into(), len))
}

fn net_v6(network: u128, len: u8) -> IpNet {
    IpNet::V6(Ipv6Net::new_assert(network.into(), len))
}

/// A longest-prefix-match table from IP prefixes (IPv4 and IPv6) to values.
///
/// Prefixes are stored truncated (host bits cleared), so `10.0.0.1/24` and `10.0.0.0/24` are the
/// same entry. Lookups do not allocate.
#[derive(Debug, Clone)]
pub struct PrefixTable<V> {
    v4: Levels<u32, V>,
    v6: Levels<u128, V>,
}

impl<V> Default for PrefixTable<V> {
    fn default() -> Self {
        Self {
            v4: Levels::default(),
            v6: Levels::default(),
        }
    }
}

impl<V> PrefixTable<V> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `net` to `value`, returning the value it replaced.
    pub fn insert(&mut self, net: IpNet, value: V) -> Option<V> {
        match net.trunc() {
            IpNet::V4(n) => self.v4.insert(n.prefix_len(), n.network().to_bits(), value),
            IpNet::V6(n) => self.v6.insert(n.prefix_len(), n.network().to_bits(), value),
        }
    }

    /// Removes exactly the prefix `net`, returning its value.
    pub fn remove(&mut self, net: IpNet) -> Option<V> {
        match net.trunc() {
            IpNet::V4(n) => self.v4.remove(n.prefix_len(), &n.network().to_bits()),
            IpNet::V6(n) => self.v6.remove(n.prefix_len(), &n.network().to_bits()),
        }
    }

    /// The value of exactly the prefix `net` (no longest-prefix match).
    pub fn get(&self, net: IpNet) -> Option<&V> {
        match net.trunc() {
            IpNet::V4(n) => self.v4.get(n.prefix_len(), &n.network().to_bits()),
            IpNet::V6(n) => self.v6.get(n.prefix_len(), &n.network().to_bits()),
        }
    }

    /// The value of the longest prefix that contains `addr`.
    pub fn lookup(&self, addr: IpAddr) -> Option<&V> {
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

    /// Keeps only the entries for which `f(prefix, value)` is true.
    pub fn retain(&mut self, mut f: impl FnMut(IpNet, &V) -> bool) {
        self.v4.retain(|len, k, v| f(net_v4(*k, len), v));
        self.v6.retain(|len, k, v| f(net_v6(*k, len), v));
    }

    /// All entries, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (IpNet, &V)> + '_ {
        let v4 = self.v4.iter().map(|(len, k, v)| (net_v4(*k, len), v));
        let v6 = self.v6.iter().map(|(len, k, v)| (net_v6(*k, len), v));
        v4.chain(v6)
    }

    /// Number of prefixes.
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// True if the table holds no prefix.
    pub fn is_empty(&self) -> bool {
        self.v4.levels.is_empty() && self.v6.levels.is_empty()
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
        let mut t = PrefixTable::new();
        t.insert(net("0.0.0.0/0"), "default");
        t.insert(net("10.0.0.0/8"), "ten");
        t.insert(net("10.1.0.0/16"), "ten-one");
        t.insert(net("10.1.2.3/32"), "host");
        t.insert(net("fd00::/8"), "ula");
        t.insert(net("fd00:1::/32"), "ula-1");
        assert_eq!(t.lookup(ip("10.1.2.3")), Some(&"host"));
        assert_eq!(t.lookup(ip("10.1.2.4")), Some(&"ten-one"));
        assert_eq!(t.lookup(ip("10.2.0.1")), Some(&"ten"));
        assert_eq!(t.lookup(ip("192.0.2.1")), Some(&"default"));
        assert_eq!(t.lookup(ip("fd00:1::5")), Some(&"ula-1"));
        assert_eq!(t.lookup(ip("fd00:2::5")), Some(&"ula"));
        assert_eq!(t.lookup(ip("fdff::1")), Some(&"ula"));
        assert_eq!(t.lookup(ip("2001:db8::1")), None);
        assert_eq!(t.lookup(ip("fe80::1")), None);
        assert_eq!(t.len(), 6);
    }

    #[test]
    fn host_bits_are_ignored_and_remove_works() {
        let mut t = PrefixTable::new();
        assert_eq!(t.insert(net("10.0.0.7/24"), 1), None);
        assert_eq!(t.insert(net("10.0.0.0/24"), 2), Some(1));
        assert_eq!(t.lookup(ip("10.0.0.200")), Some(&2));
        assert_eq!(t.lookup(ip("10.0.1.1")), None);
        assert_eq!(t.get(net("10.0.0.77/24")), Some(&2));
        assert_eq!(t.get(net("10.0.0.0/16")), None);
        assert_eq!(t.remove(net("10.0.0.9/24")), Some(2));
        assert_eq!(t.remove(net("10.0.0.0/24")), None);
        assert!(t.is_empty());
        assert_eq!(t.lookup(ip("10.0.0.200")), None);
    }

    #[test]
    fn retain_and_iter() {
        let mut t = PrefixTable::new();
        t.insert(net("10.0.0.0/24"), 'a');
        t.insert(net("10.0.1.0/24"), 'b');
        t.insert(net("::/0"), 'a');
        t.insert(net("fd00::/64"), 'b');
        t.retain(|_, v| *v != 'a');
        let mut all: Vec<_> = t.iter().map(|(n, v)| (n, *v)).collect();
        all.sort();
        assert_eq!(
            all,
            vec![(net("10.0.1.0/24"), 'b'), (net("fd00::/64"), 'b')]
        );
        assert_eq!(t.lookup(ip("::1")), None);
        assert_eq!(t.len(), 2);
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
