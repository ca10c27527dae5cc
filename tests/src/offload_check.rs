//! What the privileged offload tests of the userspace devices share: two namespaces on one
//! veth, a tunnel device's addresses and routes, and large TCP transfers checked end to end
//! with SHA-256 (the TSO split, GSO/GRO and coalescing paths must deliver every byte intact).

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::{Context as _, bail};
use ring::digest::{Context, SHA256};

use crate::netns::Netns;

/// Joins `a` and `b` with a veth pair named `ifname` at both ends and puts `addrs[0]` on `a`'s
/// end and `addrs[1]` on `b`'s (CIDR notation), both up.
pub fn veth_pair(a: &Netns, b: &Netns, ifname: &str, addrs: [&str; 2]) -> anyhow::Result<()> {
    a.run(&[
        "ip",
        "link",
        "add",
        ifname,
        "type",
        "veth",
        "peer",
        "name",
        ifname,
        "netns",
        b.name(),
    ])?;
    for (ns, addr) in [(a, addrs[0]), (b, addrs[1])] {
        ns.run(&["ip", "addr", "add", addr, "dev", ifname])?;
        ns.run(&["ip", "link", "set", ifname, "up"])?;
    }
    Ok(())
}

/// Sets `dev` up with `mtu`, gives it the host addresses `local` (an IPv4 and an IPv6
/// address) and routes the host addresses `remote` into it.
pub fn tunnel_addresses(
    ns: &Netns,
    dev: &str,
    mtu: u32,
    local: [&str; 2],
    remote: [&str; 2],
) -> anyhow::Result<()> {
    ns.run(&["ip", "link", "set", dev, "mtu", &mtu.to_string(), "up"])?;
    ns.run(&["ip", "addr", "add", &format!("{}/32", local[0]), "dev", dev])?;
    ns.run(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{}/128", local[1]),
        "dev",
        dev,
        "nodad",
    ])?;
    ns.run(&[
        "ip",
        "route",
        "add",
        &format!("{}/32", remote[0]),
        "dev",
        dev,
    ])?;
    ns.run(&[
        "ip",
        "-6",
        "route",
        "add",
        &format!("{}/128", remote[1]),
        "dev",
        dev,
    ])?;
    Ok(())
}

/// Sends `total` deterministic bytes from `client` to a listener on `dst` in `server`, in
/// writes of 1 byte to 64 KiB (small writes with NODELAY make small segments between the TSO
/// super-packets), and fails unless the SHA-256 of what arrived equals that of what was sent.
pub fn sha256_transfer(
    client: &Netns,
    server: &Netns,
    dst: SocketAddr,
    total: usize,
) -> anyhow::Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    let srv = server.spawn(move || -> anyhow::Result<([u8; 32], usize)> {
        let l = TcpListener::bind(dst).with_context(|| format!("bind {dst}"))?;
        let _ = tx.send(());
        let (mut s, _) = l.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut h = Context::new(&SHA256);
        let mut buf = vec![0u8; 1 << 16];
        let mut n = 0;
        while n < total {
            let k = s
                .read(&mut buf)
                .with_context(|| format!("read after {n} bytes"))?;
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
            n += k;
        }
        Ok((digest(h), n))
    })?;
    rx.recv_timeout(Duration::from_secs(10))
        .with_context(|| format!("the listener on {dst} did not start"))?;
    let cli = client.spawn(move || -> anyhow::Result<[u8; 32]> {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(10))
            .with_context(|| format!("connect to {dst}"))?;
        s.set_nodelay(true)?;
        let data: Vec<u8> = (0..total)
            .map(|i| (i ^ (i >> 11) ^ (i >> 19)) as u8)
            .collect();
        let mut h = Context::new(&SHA256);
        h.update(&data);
        let (mut off, mut step) = (0, 1usize);
        while off < total {
            // 1, 7, 49, ... bytes up to 64 KiB, cycling.
            let len = step.min(total - off);
            s.write_all(&data[off..off + len])
                .with_context(|| format!("write at byte {off}"))?;
            off += len;
            step = if step >= 1 << 16 { 1 } else { step * 7 };
        }
        Ok(digest(h))
    })?;
    let sent = cli
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))???;
    let (got, n) = srv
        .join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))???;
    if n != total {
        bail!("{dst}: the stream ended after {n} of {total} bytes");
    }
    if sent != got {
        bail!("{dst}: SHA-256 of the {total} bytes received differs from what was sent");
    }
    Ok(())
}

/// [`sha256_transfer`] of `total` bytes both ways between `a` and `b` over IPv4 and IPv6:
/// `v4` and `v6` hold `a`'s address first; ports `port` and `port + 1` (`+ 10` for the way
/// back).
pub fn transfers_both_ways(
    a: &Netns,
    b: &Netns,
    v4: [&str; 2],
    v6: [&str; 2],
    port: u16,
    total: usize,
) -> anyhow::Result<()> {
    for (p, addrs) in [(port, v4), (port + 1, v6)] {
        let to_b = SocketAddr::new(addrs[1].parse()?, p);
        sha256_transfer(a, b, to_b, total)?;
        let to_a = SocketAddr::new(addrs[0].parse()?, p + 10);
        sha256_transfer(b, a, to_a, total)?;
    }
    Ok(())
}

fn digest(h: Context) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(h.finish().as_ref());
    out
}
