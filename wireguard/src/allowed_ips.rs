//! Longest-prefix-match table from allowed IPs to peers (cryptokey routing).

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// One address family: a hash map per prefix length, probed from the longest length down.
/// A lookup costs one hash probe per distinct prefix length present (at most 33 or 129).
#[derive(Debug, Clone)]
struct Family<K, V> {
    /// Sorted by prefix length, longest first.
    levels: Vec<(u8, HashMap<K, V>)>,
}

impl<K, V> Default for Family<K, V> {
    fn default() -> Self {
        Self { levels: Vec::new() }
    }
}

impl<K: std::hash::Hash + Eq + Copy, V> Family<K, V> {
    fn insert(&mut self, len: u8, key: K, value: V) -> Option<V> {
        let pos = match self.levels.binary_search_by(|(l, _)| len.cmp(l)) {
            Ok(p) => p,
            Err(p) => {
                self.levels.insert(p, (len, HashMap::new()));
                p
            }
        };
        self.levels[pos].1.insert(key, value)
    }

    fn remove(&mut self, len: u8, key: &K) -> Option<V> {
        let pos = self.levels.binary_search_by(|(l, _)| len.cmp(l)).ok()?;
        let old = self.levels[pos].1.remove(key);
        if self.levels[pos].1.is_empty() {
            self.levels.remove(pos);
        }
        old
    }

    fn lookup(&self, mask: impl Fn(u8) -> K) -> Option<&V> {
        self.levels
            .iter()
            .find_map(|(len, map)| map.get(&mask(*len)))
    }

    fn retain(&mut self, mut f: impl FnMut(u8, &K, &V) -> bool) {
        for (len, map) in &mut self.levels {
            map.retain(|k, v| f(*len, k, v));
        }
        self.levels.retain(|(_, m)| !m.is_empty());
    }
}

fn mask4(addr: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        addr & (u32::MAX << (32 - u32::from(len)))
    }
}

fn mask6(addr: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        addr & (u128::MAX << (128 - u32::from(len)))
    }
}

/// A longest-prefix-match table from IP prefixes to values (peers).
///
/// Prefixes are stored truncated (host bits cleared), so `10.0.0.1/24` and `10.0.0.0/24` are the
/// same entry. Lookups do not allocate.
#[derive(Debug, Clone)]
pub struct AllowedIps<V> {
    v4: Family<u32, V>,
    v6: Family<u128, V>,
}

impl<V> Default for AllowedIps<V> {
    fn default() -> Self {
        Self {
            v4: Family::default(),
            v6: Family::default(),
        }
    }
}

impl<V> AllowedIps<V> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts `net` -> `value`, returning the value it replaced.
    pub fn insert(&mut self, net: IpNet, value: V) -> Option<V> {
        match net.trunc() {
            IpNet::V4(n) => self
                .v4
                .insert(n.prefix_len(), u32::from(n.network()), value),
            IpNet::V6(n) => self
                .v6
                .insert(n.prefix_len(), u128::from(n.network()), value),
        }
    }

    /// Removes the exact prefix `net`, returning its value.
    pub fn remove(&mut self, net: IpNet) -> Option<V> {
        match net.trunc() {
            IpNet::V4(n) => self.v4.remove(n.prefix_len(), &u32::from(n.network())),
            IpNet::V6(n) => self.v6.remove(n.prefix_len(), &u128::from(n.network())),
        }
    }

    /// The value of the longest prefix containing `addr`.
    pub fn lookup(&self, addr: IpAddr) -> Option<&V> {
        match addr {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4.lookup(|len| mask4(a, len))
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                self.v6.lookup(|len| mask6(a, len))
            }
        }
    }

    /// Keeps only the entries for which `f(prefix, value)` is true.
    pub fn retain(&mut self, mut f: impl FnMut(IpNet, &V) -> bool) {
        self.v4
            .retain(|len, k, v| f(IpNet::V4(Ipv4Net::new_assert((*k).into(), len)), v));
        self.v6
            .retain(|len, k, v| f(IpNet::V6(Ipv6Net::new_assert((*k).into(), len)), v));
    }

    /// All entries, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (IpNet, &V)> + '_ {
        let v4 = self.v4.levels.iter().flat_map(|(len, m)| {
            m.iter()
                .map(move |(k, v)| (IpNet::V4(Ipv4Net::new_assert((*k).into(), *len)), v))
        });
        let v6 = self.v6.levels.iter().flat_map(|(len, m)| {
            m.iter()
                .map(move |(k, v)| (IpNet::V6(Ipv6Net::new_assert((*k).into(), *len)), v))
        });
        v4.chain(v6)
    }

    /// Number of prefixes.
    pub fn len(&self) -> usize {
        self.v4.levels.iter().map(|(_, m)| m.len()).sum::<usize>()
            + self.v6.levels.iter().map(|(_, m)| m.len()).sum::<usize>()
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
        let mut t = AllowedIps::new();
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
        assert_eq!(t.lookup(ip("2001:db8::1")), None);
        assert_eq!(t.len(), 6);
    }

    #[test]
    fn host_bits_are_ignored_and_remove_works() {
        let mut t = AllowedIps::new();
        assert_eq!(t.insert(net("10.0.0.7/24"), 1), None);
        assert_eq!(t.insert(net("10.0.0.0/24"), 2), Some(1));
        assert_eq!(t.lookup(ip("10.0.0.200")), Some(&2));
        assert_eq!(t.lookup(ip("10.0.1.1")), None);
        assert_eq!(t.remove(net("10.0.0.9/24")), Some(2));
        assert!(t.is_empty());
        assert_eq!(t.lookup(ip("10.0.0.200")), None);
    }

    #[test]
    fn retain_and_iter() {
        let mut t = AllowedIps::new();
        t.insert(net("10.0.0.0/24"), 'a');
        t.insert(net("10.0.1.0/24"), 'b');
        t.insert(net("::/0"), 'a');
        t.retain(|_, v| *v != 'a');
        let all: Vec<_> = t.iter().map(|(n, v)| (n, *v)).collect();
        assert_eq!(all, vec![(net("10.0.1.0/24"), 'b')]);
        assert_eq!(t.lookup(ip("::1")), None);
    }
}
