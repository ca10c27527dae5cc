//! A lab cluster: real `enc-agent` processes in network namespaces.
//!
//! Topology, for nodes `i = 1..=n` and pods `j = 1..=m`:
//!
//! ```text
//!  <prefix>-ul        underlay namespace: bridge br0, one veth n<i> per node
//!  <prefix>-n<i>      node i: eth0 = 10.77.0.<i>/24 on the underlay; bridge cbr0 =
//!                     10.78.<i>.1/24 for its pods; IP forwarding on; enc-agent runs here
//!  <prefix>-n<i>p<j>  pod j of node i: eth0 = 10.78.<i>.<10+j>/24, default via 10.78.<i>.1
//! ```
//!
//! Certificates are made with the real `encctl`; nodes listed in `foreign` get theirs from a
//! second, unrelated CA. Dropping the lab stops the agents (SIGTERM) and deletes every
//! namespace it made.

use crate::netns::Netns;
use crate::sys;
use anyhow::{Context, bail};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// WireGuard UDP port the lab's agents use.
pub const WG_PORT: u16 = 51820;
/// Control port the lab's agents use.
pub const CONTROL_PORT: u16 = 51871;
/// Metrics endpoint of every lab agent, inside its node's namespace (the default
/// `metrics.listen`).
pub const METRICS_ADDR: &str = "127.0.0.1:9890";

/// Where the project's binaries are: `ENC_BIN_DIR`, else the directory of the running
/// executable (the `deps` directory's parent for test binaries).
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(d) = std::env::var_os("ENC_BIN_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe().context("locate the running executable")?;
    let mut dir = exe
        .parent()
        .context("executable has no directory")?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    for b in ["enc-agent", "encctl"] {
        if !dir.join(b).is_file() {
            bail!(
                "{} not found next to {}: run `cargo build --bins` (same profile) first, or set ENC_BIN_DIR",
                b,
                exe.display()
            );
        }
    }
    Ok(dir)
}

/// What to build.
#[derive(Clone, Debug)]
pub struct LabOptions {
    /// Short unique tag, part of every namespace name.
    pub tag: String,
    /// Number of nodes.
    pub nodes: usize,
    /// Pods per node.
    pub pods: usize,
    /// 1-based indices of nodes whose certificate comes from a foreign CA.
    pub foreign: Vec<usize>,
    /// Strict mode of every agent.
    pub strict: bool,
    /// Encryption type of every agent: `wireguard`, `ipsec` or `none` (then `strict` must be
    /// false).
    pub encryption: &'static str,
    /// `tunnel.protocol` of every agent: `disabled` (direct routing), `vxlan` or `geneve`.
    pub tunnel: &'static str,
    /// Impostors: node `i` (1-based) holds a valid cluster certificate, but for another name,
    /// and runs under that name at the address where the others expect `node-<i>`.
    pub impostors: Vec<(usize, String)>,
    /// The `rotation:` settings of every agent, as YAML lines (e.g. `  gracePeriod: 1s`).
    pub rotation: Vec<String>,
    /// `encryption.<type>.implementation` per node (1-based index, `auto`, `kernel` or
    /// `userspace`), for mixed pairs; nodes not listed use the default (`auto`).
    pub implementations: Vec<(usize, &'static str)>,
    /// `encryption.ipsec.encapsulation` (`none` or `udp`) of the nodes listed in
    /// `implementations`, if set.
    pub ipsec_encapsulation: Option<&'static str>,
    /// Extra YAML lines under `tls:` per node (1-based index), e.g. `  renewal:` blocks.
    pub tls_extra: Vec<(usize, String)>,
    /// Extra top-level YAML per node (1-based index), e.g. an `issuer:` block.
    pub extra: Vec<(usize, String)>,
}

impl LabOptions {
    /// `nodes` nodes with two pods each, all with cluster certificates.
    pub fn new(tag: &str, nodes: usize) -> Self {
        Self {
            tag: tag.to_owned(),
            nodes,
            pods: 2,
            foreign: vec![],
            impostors: vec![],
            strict: true,
            encryption: "wireguard",
            tunnel: "disabled",
            rotation: vec![],
            implementations: vec![],
            ipsec_encapsulation: None,
            tls_extra: vec![],
            extra: vec![],
        }
    }
}

/// A pod: a namespace with one address.
#[derive(Debug)]
pub struct Pod {
    /// Its namespace.
    pub ns: Netns,
    /// Its address.
    pub addr: Ipv4Addr,
}

/// A node: a namespace, its pods, and its agent.
#[derive(Debug)]
pub struct Node {
    /// 1-based index.
    pub index: usize,
    /// Node name (`node-<i>`), as the other nodes expect it.
    pub name: String,
    /// The name the node's certificate and configuration carry (differs for impostors).
    pub claimed_name: String,
    /// Underlay address.
    pub addr: Ipv4Addr,
    /// Pod CIDR.
    pub pod_cidr: String,
    /// Agent configuration file.
    pub config: PathBuf,
    /// Agent status socket.
    pub socket: PathBuf,
    /// Agent log file.
    pub log: PathBuf,
    /// The agent's `stateDir` (event log, accepted revocation list).
    pub state_dir: PathBuf,
    agent: Option<Child>,
    /// Pods behind the node (dropped before the node's namespace).
    pub pods: Vec<Pod>,
    /// The node's namespace.
    pub ns: Netns,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(child) = self.agent.take() {
            let _ = stop_child(child, Duration::from_secs(5));
        }
    }
}

fn stop_child(mut child: Child, grace: Duration) -> anyhow::Result<std::process::ExitStatus> {
    // SAFETY: kill with a pid we spawned and have not reaped; no memory is involved.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        if start.elapsed() > grace {
            child.kill()?;
            let st = child.wait()?;
            bail!(
                "process {} ignored SIGTERM for {grace:?}; killed ({st})",
                child.id()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A bpffs instance mounted for the lab: the agents pin their eBPF maps and links here, so
/// that state survives an agent restart (as /sys/fs/bpf does on a real node). `ip netns exec`
/// gives each agent its own /sys, so the host's /sys/fs/bpf would not be shared.
#[derive(Debug)]
pub struct BpfMount {
    path: PathBuf,
}

impl BpfMount {
    fn new(path: PathBuf) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        sys::run(&["mount", "-t", "bpf", "bpf", path_str(&path)?])?;
        Ok(Self { path })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BpfMount {
    fn drop(&mut self) {
        if let Err(e) = sys::run(&["umount", "-l", &self.path.to_string_lossy()]) {
            eprintln!("warning: cannot unmount {}: {e:#}", self.path.display());
        }
    }
}

/// The whole lab. Field order is drop order: agents stop before namespaces go.
pub struct Lab {
    /// The nodes.
    pub nodes: Vec<Node>,
    /// The bpffs the agents pin to.
    pub bpffs: BpfMount,
    /// The underlay namespace with bridge `br0`.
    pub underlay: Netns,
    /// Where certificates, configurations, sockets and logs live.
    pub dir: tempfile::TempDir,
    bin: PathBuf,
    prefix: String,
    encryption: &'static str,
}

impl Lab {
    /// Builds the topology and certificates and writes agent configurations; agents are not
    /// started yet (see [`Lab::start_agent`], [`Lab::start_all`]).
    pub fn build(opts: &LabOptions) -> anyhow::Result<Self> {
        let bin = bin_dir()?;
        let prefix = format!("enc{}{}", std::process::id() % 100_000, opts.tag);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{prefix}-"))
            .tempdir()?;
        let bpffs = BpfMount::new(dir.path().join("bpf"))?;
        let underlay = Netns::new(&format!("{prefix}-ul"))?;
        underlay.run(&["ip", "link", "add", "br0", "type", "bridge"])?;
        underlay.run(&["ip", "link", "set", "br0", "up"])?;

        let ca = dir.path().join("ca");
        let foreign_ca = dir.path().join("foreign-ca");
        let certs = dir.path().join("certs");
        let encctl = bin.join("encctl");
        let encctl = encctl.to_str().context("binary path is not UTF-8")?;
        sys::run(&[encctl, "ca", "init", "--out", path_str(&ca)?])?;
        if !opts.foreign.is_empty() {
            sys::run(&[
                encctl,
                "ca",
                "init",
                "--out",
                path_str(&foreign_ca)?,
                "--name",
                "some other CA",
            ])?;
        }

        let mut nodes = Vec::new();
        for i in 1..=opts.nodes {
            let name = format!("node-{i}");
            let addr = Ipv4Addr::new(10, 77, 0, i as u8);
            let ns = Netns::new(&format!("{prefix}-n{i}"))?;
            let uplink = format!("n{i}");
            underlay.run(&[
                "ip",
                "link",
                "add",
                &uplink,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns.name(),
            ])?;
            underlay.run(&["ip", "link", "set", &uplink, "master", "br0", "up"])?;
            ns.run(&["ip", "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            ns.run(&["ip", "link", "set", "eth0", "up"])?;
            ns.sysctl("net.ipv4.ip_forward", "1")?;
            ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
            ns.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
            ns.run(&["ip", "link", "add", "cbr0", "type", "bridge"])?;
            ns.run(&[
                "ip",
                "addr",
                "add",
                &format!("10.78.{i}.1/24"),
                "dev",
                "cbr0",
            ])?;
            ns.run(&["ip", "link", "set", "cbr0", "up"])?;
            let mut pods = Vec::new();
            for j in 1..=opts.pods {
                let pod = Netns::new(&format!("{prefix}-n{i}p{j}"))?;
                let pod_addr = Ipv4Addr::new(10, 78, i as u8, 10 + j as u8);
                let hostside = format!("p{j}");
                ns.run(&[
                    "ip",
                    "link",
                    "add",
                    &hostside,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    pod.name(),
                ])?;
                ns.run(&["ip", "link", "set", &hostside, "master", "cbr0", "up"])?;
                pod.run(&[
                    "ip",
                    "addr",
                    "add",
                    &format!("{pod_addr}/24"),
                    "dev",
                    "eth0",
                ])?;
                pod.run(&["ip", "link", "set", "eth0", "up"])?;
                pod.run(&[
                    "ip",
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("10.78.{i}.1"),
                ])?;
                pods.push(Pod {
                    ns: pod,
                    addr: pod_addr,
                });
            }

            let claimed_name = opts
                .impostors
                .iter()
                .find(|(k, _)| *k == i)
                .map(|(_, n)| n.clone())
                .unwrap_or_else(|| name.clone());
            let issuer = if opts.foreign.contains(&i) {
                &foreign_ca
            } else {
                &ca
            };
            sys::run(&[
                encctl,
                "cert",
                "issue",
                "--ca",
                path_str(issuer)?,
                "--node",
                &claimed_name,
                "--ip",
                &addr.to_string(),
                "--days",
                "2",
                "--out",
                path_str(&certs)?,
            ])?;
            let config = dir.path().join(format!("{name}.yaml"));
            let socket = dir.path().join(format!("{name}.sock"));
            let log = dir.path().join(format!("{name}.log"));
            let state_dir = dir.path().join(format!("{name}-state"));
            nodes.push(Node {
                index: i,
                name,
                claimed_name,
                addr,
                pod_cidr: format!("10.78.{i}.0/24"),
                config,
                socket,
                log,
                state_dir,
                agent: None,
                pods,
                ns,
            });
        }

        for n in &nodes {
            let mut yaml = format!(
                "node:\n  name: {}\n  underlayAddress: {}\n  podCidr: {}\n\
                 tls:\n  cert: certs/{}.crt\n  key: certs/{}.key\n  ca: {}/ca.crt\n  reloadInterval: 1s\n\
                 control:\n  listenPort: {CONTROL_PORT}\n  connectTimeout: 3s\n  keyGracePeriod: 30s\n\
                 encryption:\n  type: {}\n  strictMode: {}\n  wireguard:\n    interface: enc-wg0\n    listenPort: {WG_PORT}\n\
                 underlay:\n  interface: eth0\n\
                 datapath:\n  podInterfacePrefixes: [p]\n  bpfPinDir: {}/{}\n\
                 statusSocket: {}\nstateDir: {}\npeers:\n",
                n.claimed_name,
                n.addr,
                n.pod_cidr,
                n.claimed_name,
                n.claimed_name,
                if opts.foreign.contains(&n.index) {
                    "foreign-ca"
                } else {
                    "ca"
                },
                opts.encryption,
                opts.strict,
                bpffs.path().display(),
                n.claimed_name,
                n.socket.display(),
                n.state_dir.display()
            );
            if let Some((_, imp)) = opts.implementations.iter().find(|(i, _)| *i == n.index) {
                let (section, rest) = match opts.encryption {
                    "wireguard" => ("    listenPort: {WG_PORT}\n", ""),
                    _ => ("underlay:\n", "underlay:\n"),
                };
                let section = section.replace("{WG_PORT}", &WG_PORT.to_string());
                let line = match opts.encryption {
                    "wireguard" => format!("{section}    implementation: {imp}\n"),
                    other => {
                        let encap = opts
                            .ipsec_encapsulation
                            .map(|e| format!("    encapsulation: {e}\n"))
                            .unwrap_or_default();
                        format!("  {other}:\n    implementation: {imp}\n{encap}{rest}")
                    }
                };
                yaml = yaml.replacen(&section, &line, 1);
            }
            if opts.tunnel != "disabled" {
                yaml = yaml.replacen(
                    "datapath:\n",
                    &format!("tunnel:\n  protocol: {}\ndatapath:\n", opts.tunnel),
                    1,
                );
            }
            for (_, lines) in opts.tls_extra.iter().filter(|(i, _)| *i == n.index) {
                yaml = yaml.replacen(
                    "  reloadInterval: 1s\n",
                    &format!("  reloadInterval: 1s\n{lines}"),
                    1,
                );
            }
            for (_, block) in opts.extra.iter().filter(|(i, _)| *i == n.index) {
                yaml.truncate(yaml.len() - "peers:\n".len());
                yaml.push_str(block);
                yaml.push_str("peers:\n");
            }
            if !opts.rotation.is_empty() {
                // Goes before the trailing `peers:` key.
                yaml.truncate(yaml.len() - "peers:\n".len());
                yaml.push_str("rotation:\n");
                for line in &opts.rotation {
                    yaml.push_str(&format!("  {line}\n"));
                }
                yaml.push_str("peers:\n");
            }
            for p in nodes.iter().filter(|p| p.index != n.index) {
                yaml.push_str(&format!(
                    "  - name: {}\n    underlayAddress: {}\n    podCidr: {}\n",
                    p.name, p.addr, p.pod_cidr
                ));
            }
            std::fs::write(&n.config, yaml)
                .with_context(|| format!("write {}", n.config.display()))?;
        }

        Ok(Self {
            nodes,
            bpffs,
            underlay,
            dir,
            bin,
            prefix,
            encryption: opts.encryption,
        })
    }

    /// Namespace-name prefix of this lab.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Node `i` (1-based).
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i - 1]
    }

    /// Starts node `i`'s agent (stopping a running one first is the caller's business).
    pub fn start_agent(&mut self, i: usize) -> anyhow::Result<()> {
        let agent = self.bin.join("enc-agent");
        let node = &mut self.nodes[i - 1];
        if node.agent.is_some() {
            bail!("agent of {} already running", node.name);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .with_context(|| format!("open {}", node.log.display()))?;
        let child = Command::new("ip")
            .args(["netns", "exec", node.ns.name()])
            .arg(&agent)
            .arg("--config")
            .arg(&node.config)
            .env(
                "ENC_LOG",
                std::env::var("ENC_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", agent.display()))?;
        node.agent = Some(child);
        // Wait for the status socket so that callers can query at once.
        let socket = node.socket.clone();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = self.nodes[i - 1]
                .agent
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.nodes[i - 1].agent = None;
                bail!(
                    "agent of node-{i} exited at start-up ({st}); log:\n{}",
                    self.log_tail(i, 30)
                );
            }
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "agent of node-{i} did not open {} within 10s",
                    socket.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts every agent.
    pub fn start_all(&mut self) -> anyhow::Result<()> {
        for i in 1..=self.nodes.len() {
            self.start_agent(i)?;
        }
        Ok(())
    }

    /// Stops node `i`'s agent with SIGTERM and checks that it exited cleanly.
    pub fn stop_agent(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &mut self.nodes[i - 1];
        let child = node
            .agent
            .take()
            .with_context(|| format!("agent of {} is not running", node.name))?;
        let st = stop_child(child, Duration::from_secs(10))?;
        if !st.success() {
            bail!("agent of {} exited with {st}", node.name);
        }
        Ok(())
    }

    /// Pauses node `i`'s agent with SIGSTOP (its sockets stay open; it answers nothing).
    pub fn pause_agent(&self, i: usize) -> anyhow::Result<()> {
        self.signal_agent(i, libc::SIGSTOP)
    }

    /// Resumes a paused agent with SIGCONT.
    pub fn resume_agent(&self, i: usize) -> anyhow::Result<()> {
        self.signal_agent(i, libc::SIGCONT)
    }

    fn signal_agent(&self, i: usize, sig: libc::c_int) -> anyhow::Result<()> {
        let node = self.node(i);
        let child = node
            .agent
            .as_ref()
            .with_context(|| format!("agent of {} is not running", node.name))?;
        // `ip netns exec` execs the agent, so the child's pid is the agent's.
        // SAFETY: kill with a pid we spawned and have not reaped; no memory is involved.
        let rc = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
        if rc != 0 {
            bail!(
                "signal {sig} to agent of {}: {}",
                node.name,
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// Runs `encctl ARGS --socket <node i's socket>` and returns its output whatever the
    /// exit status.
    pub fn encctl_output(&self, i: usize, args: &[&str]) -> anyhow::Result<std::process::Output> {
        let encctl = self.bin.join("encctl");
        let mut full: Vec<&str> = vec![path_str(&encctl)?];
        full.extend_from_slice(args);
        full.extend_from_slice(&["--socket", path_str(&self.node(i).socket)?]);
        sys::output(&full)
    }

    /// Runs `encctl ARGS --socket <node i's socket>`.
    pub fn encctl(&self, i: usize, args: &[&str]) -> anyhow::Result<String> {
        let encctl = self.bin.join("encctl");
        let mut full: Vec<&str> = vec![path_str(&encctl)?];
        full.extend_from_slice(args);
        full.extend_from_slice(&["--socket", path_str(&self.node(i).socket)?]);
        let out = sys::run(&full)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Node `i`'s peers as the status API reports them.
    pub fn peers(&self, i: usize) -> anyhow::Result<Vec<enc_api::PeerInfo>> {
        let text = self.encctl(i, &["peers", "-o", "json"])?;
        let peers: enc_api::Peers =
            serde_json::from_str(&text).context("decode encctl peers -o json")?;
        Ok(peers.peers)
    }

    /// Adds another host on the underlay bridge: a namespace `<prefix>-x` whose `eth0` holds
    /// `addr` (with prefix) — an outsider for tests that inject packets onto the wire.
    pub fn underlay_host(&self, addr: &str) -> anyhow::Result<Netns> {
        let ns = Netns::new(&format!("{}-x", self.prefix))?;
        self.underlay.run(&[
            "ip",
            "link",
            "add",
            "x0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        self.underlay
            .run(&["ip", "link", "set", "x0", "master", "br0", "up"])?;
        ns.run(&["ip", "addr", "add", addr, "dev", "eth0"])?;
        ns.run(&["ip", "link", "set", "eth0", "up"])?;
        Ok(ns)
    }

    /// Gives node `i` (agent stopped) a certificate from a foreign CA, and makes it trust only
    /// that CA: from then on the cluster refuses it and it refuses the cluster.
    pub fn switch_to_foreign_ca(&self, i: usize) -> anyhow::Result<()> {
        let encctl = self.bin.join("encctl");
        let encctl = path_str(&encctl)?;
        let foreign = self.dir.path().join("foreign-ca");
        if !foreign.join("ca.crt").exists() {
            sys::run(&[
                encctl,
                "ca",
                "init",
                "--out",
                path_str(&foreign)?,
                "--name",
                "some other CA",
            ])?;
        }
        let node = self.node(i);
        let out = self.dir.path().join(format!("foreign-certs-{i}"));
        sys::run(&[
            encctl,
            "cert",
            "issue",
            "--ca",
            path_str(&foreign)?,
            "--node",
            &node.claimed_name,
            "--ip",
            &node.addr.to_string(),
            "--days",
            "2",
            "--out",
            path_str(&out)?,
        ])?;
        let certs = self.dir.path().join("certs");
        for ext in ["crt", "key"] {
            let f = format!("{}.{ext}", node.claimed_name);
            std::fs::copy(out.join(&f), certs.join(&f)).with_context(|| format!("replace {f}"))?;
        }
        let text = std::fs::read_to_string(&node.config)?;
        std::fs::write(
            &node.config,
            text.replace("ca: ca/ca.crt", "ca: foreign-ca/ca.crt"),
        )?;
        Ok(())
    }

    /// Node `i`'s datapath counters for traffic to and from `peer`.
    pub fn counters(&self, i: usize, peer: &str) -> anyhow::Result<enc_api::DatapathCounters> {
        let peers = self.peers(i)?;
        let p = peers
            .iter()
            .find(|p| p.name == peer)
            .with_context(|| format!("{peer} not listed on node-{i}"))?;
        Ok(p.counters.clone())
    }

    /// Node `i`'s status.
    pub fn status(&self, i: usize) -> anyhow::Result<enc_api::Status> {
        let text = self.encctl(i, &["status", "-o", "json"])?;
        serde_json::from_str(&text).context("decode encctl status -o json")
    }

    /// Node `i`'s Prometheus metrics: `GET /metrics` on [`METRICS_ADDR`] over a plain TCP
    /// connection made from inside the node's namespace. Fails unless the answer is a 200 in
    /// the text exposition format 0.0.4.
    pub fn metrics(&self, i: usize) -> anyhow::Result<String> {
        let node = &self.node(i).name;
        let response = self.node(i).ns.enter(|| -> anyhow::Result<Vec<u8>> {
            let addr: SocketAddr = METRICS_ADDR.parse()?;
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .with_context(|| format!("connect to {addr}"))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf)?;
            Ok(buf)
        })?;
        let response = response.with_context(|| format!("scrape the metrics of {node}"))?;
        let text = String::from_utf8(response).context("metrics are not UTF-8")?;
        let (head, body) = text
            .split_once("\r\n\r\n")
            .with_context(|| format!("malformed HTTP answer from {node}: {text:?}"))?;
        let head = head.to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            bail!("metrics of {node}: {head}");
        }
        if !head.contains("content-type: text/plain; version=0.0.4") || head.contains("chunked") {
            bail!("metrics of {node}: unexpected headers {head}");
        }
        Ok(body.to_owned())
    }

    /// Waits until node `i` reports each of `names` authenticated with its encryption peer
    /// (WireGuard or IPsec) configured; with encryption `none`, authenticated.
    pub fn wait_authenticated(
        &self,
        i: usize,
        names: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<()> {
        sys::wait_for(
            &format!("node-{i} to authenticate {names:?}"),
            timeout,
            || {
                let peers = self.peers(i)?;
                for n in names {
                    let p = peers
                        .iter()
                        .find(|p| p.name == *n)
                        .with_context(|| format!("{n} not listed"))?;
                    let keyed =
                        p.wireguard.is_some() || p.ipsec.is_some() || self.encryption == "none";
                    if p.auth != enc_api::AuthState::Authenticated || !keyed {
                        bail!("{n} is {:?}", p.auth);
                    }
                }
                Ok(Some(()))
            },
        )
    }

    /// Waits until each of the first `nodes` nodes reports every other authenticated (see
    /// [`Lab::wait_authenticated`]), each within `timeout`.
    pub fn wait_mesh(&self, nodes: usize, timeout: Duration) -> anyhow::Result<()> {
        for i in 1..=nodes {
            let others: Vec<String> = (1..=nodes)
                .filter(|k| *k != i)
                .map(|k| format!("node-{k}"))
                .collect();
            let refs: Vec<&str> = others.iter().map(String::as_str).collect();
            self.wait_authenticated(i, &refs, timeout)?;
        }
        Ok(())
    }

    /// Pings `to` from pod `j` of node `i` with a payload pattern (hex, up to 16 bytes).
    pub fn ping(
        &self,
        i: usize,
        j: usize,
        to: Ipv4Addr,
        count: u32,
        pattern_hex: &str,
    ) -> anyhow::Result<bool> {
        let pod = &self.node(i).pods[j - 1];
        let out = pod.ns.run(&["true"]).and_then(|_| {
            sys::output_in(
                pod.ns.name(),
                &[
                    "ping",
                    "-n",
                    "-q",
                    "-c",
                    &count.to_string(),
                    "-i",
                    "0.2",
                    "-W",
                    "2",
                    "-p",
                    pattern_hex,
                    &to.to_string(),
                ],
            )
        })?;
        Ok(out.status.success())
    }

    /// Sends `payload` over TCP from pod (i, j) to pod (k, l) and checks that it arrived intact.
    pub fn tcp_transfer(
        &self,
        from: (usize, usize),
        to: (usize, usize),
        payload: &[u8],
    ) -> anyhow::Result<()> {
        let dst = &self.node(to.0).pods[to.1 - 1];
        let src = &self.node(from.0).pods[from.1 - 1];
        let listener = dst.ns.enter(|| TcpListener::bind("0.0.0.0:0"))??;
        let port = listener.local_addr()?.port();
        let server = std::thread::spawn(move || -> anyhow::Result<Vec<u8>> {
            listener.set_nonblocking(false)?;
            let (mut s, _) = listener.accept()?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut got = Vec::new();
            s.read_to_end(&mut got)?;
            Ok(got)
        });
        let target = SocketAddr::from((dst.addr, port));
        let data = payload.to_vec();
        let sent = src.ns.enter(move || -> anyhow::Result<()> {
            let mut c = TcpStream::connect_timeout(&target, Duration::from_secs(5))
                .with_context(|| format!("connect to {target}"))?;
            c.set_write_timeout(Some(Duration::from_secs(10)))?;
            c.write_all(&data)?;
            c.shutdown(std::net::Shutdown::Write)?;
            Ok(())
        })?;
        if let Err(e) = sent {
            // Unblock the server's accept before returning.
            let _ = dst
                .ns
                .enter(move || TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))));
            let _ = server.join();
            return Err(e);
        }
        let got = server
            .join()
            .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
        if got != payload {
            bail!(
                "TCP payload from {target} arrived altered: {} bytes of {}",
                got.len(),
                payload.len()
            );
        }
        Ok(())
    }

    /// Starts a packet capture on the underlay bridge.
    pub fn capture(&self, name: &str) -> anyhow::Result<Capture> {
        let path = self.dir.path().join(format!("{name}.pcap"));
        Capture::start(self.underlay.name(), "br0", &path)
    }

    /// The last `lines` lines of node `i`'s agent log.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.node(i).log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The last `lines` lines of node `i`'s agent log that contain `needle` (e.g. `" WARN "`),
    /// from the whole log: the warnings of a failure long before the tail.
    pub fn log_matching(&self, i: usize, needle: &str, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.node(i).log).unwrap_or_default();
        let all: Vec<&str> = text.lines().filter(|l| l.contains(needle)).collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// On error, prints every agent's log tail and panics with the error chain.
    pub fn finish(&self, result: anyhow::Result<()>) {
        if let Err(e) = result {
            if let Some(keep) = std::env::var_os("ENC_LAB_KEEP") {
                let dst = PathBuf::from(keep).join(&self.prefix);
                let _ = std::fs::create_dir_all(&dst);
                let _ = sys::run(&[
                    "cp",
                    "-r",
                    &format!("{}/.", self.dir.path().display()),
                    &dst.to_string_lossy(),
                ]);
                eprintln!(
                    "lab files (configs, logs, captures) kept in {}",
                    dst.display()
                );
            }
            for n in &self.nodes {
                eprintln!(
                    "----- {} agent log (last 40 lines) -----\n{}",
                    n.name,
                    self.log_tail(n.index, 40)
                );
            }
            panic!("{e:#}");
        }
    }
}

/// The value of one sample of a Prometheus text exposition; `series` is the metric name with
/// its labels exactly as the agent renders them, e.g. `enc_rotation_stuck{peer="node-3"}`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("path {} is not UTF-8", p.display()))
}

/// A running tcpdump.
pub struct Capture {
    child: Option<Child>,
    path: PathBuf,
}

impl Capture {
    /// Starts tcpdump in `ns` on `iface`, writing `path`; returns once it is listening.
    pub fn start(ns: &str, iface: &str, path: &Path) -> anyhow::Result<Self> {
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "tcpdump",
                "--immediate-mode",
                "-i",
                iface,
                "-n",
                "-s",
                "0",
                "-U",
                "-Z",
                "root",
                "-w",
            ])
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("start tcpdump (is it installed?)")?;
        let stderr = child.stderr.take().context("tcpdump stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains("listening on") => break,
                Ok(_) => continue,
                Err(_) => {
                    let _ = child.kill();
                    bail!("tcpdump did not start listening on {iface} in {ns}");
                }
            }
        }
        Ok(Self {
            child: Some(child),
            path: path.to_owned(),
        })
    }

    /// Stops the capture and returns its frames.
    pub fn stop(mut self) -> anyhow::Result<Vec<crate::pcap::Frame>> {
        // Let the last packets of the traffic reach the capture before stopping it.
        std::thread::sleep(Duration::from_millis(300));
        if let Some(child) = self.child.take() {
            // SAFETY: signalling a child we spawned and have not reaped.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGINT);
            }
            let mut child = child;
            let start = Instant::now();
            while child.try_wait()?.is_none() {
                if start.elapsed() > Duration::from_secs(5) {
                    child.kill()?;
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.wait();
        }
        crate::pcap::read(&self.path)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
