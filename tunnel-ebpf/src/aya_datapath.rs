//! The real datapath: the embedded programs loaded with aya, maps and tc links pinned on bpffs.
//!
//! Pin directory layout (`pin_dir`, e.g. `/sys/fs/bpf/enc/<node>`):
//!
//! ```text
//! REMOTE_NETS_V4 REMOTE_NETS_V6 PREFIX_LENS PEERS COUNTERS CONFIG OVERLAY   maps, by name
//! links/<hook>/<ifname>                                       tcx links (tcx mode only)
//! ```
//!
//! A directory pinned by an earlier version lacks `OVERLAY`: `load` creates and pins it
//! (zeroed: no overlay check until the next `set_config`).
//!
//! `PREFIX_LENS` is derived from `REMOTE_NETS_*` (the distinct prefix lengths in use, longest
//! first): this loader keeps a count of CIDRs per length, rebuilds it from the maps on every
//! `load` and rewrites the list then, so it stays consistent across restarts. A pin directory
//! of an earlier version, with LPM tries `REMOTE_CIDRS_V4/V6`, is migrated on `load`: their
//! entries are copied into `REMOTE_NETS_*` before any link moves to the new programs, and the
//! old pins are removed.
//!
//! A new `AyaDatapath::load` on the same directory reuses the pinned maps (state and counters
//! survive) and moves every pinned link to the newly loaded programs with `BPF_LINK_UPDATE`,
//! so there is no moment without a program on an interface. Links whose interface is gone are
//! unpinned. In clsact mode (kernels < 6.6) filters are not pinnable: they stay in the kernel
//! across a restart (on the same maps), and the agent's next `attach_*` replaces them in place.

use crate::{
    AttachMode, Datapath, DatapathConfig, Error, Hook, PeerCounters, PeerId, PeerState,
    PrefixLenSet, Result, TestRun, common, validate_cidr, validate_ifname, validate_peer,
};
use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuHashMap};
use aya::programs::links::{FdLink, LinkOrder, PinnedLink};
use aya::programs::tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::{ProgramError, SchedClassifier, TcAttachType, TestRun as _, TestRunOptions};
use aya::{Ebpf, EbpfLoader};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// The programs, built by build.rs.
static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/enc-tunnel-ebpf-programs"));

/// clsact mode: our filters' priority and handle (the same on every hook; ingress and egress
/// are separate filter lists).
const CLSACT_PRIORITY: u16 = 0xE0;
const CLSACT_HANDLE: TcHandle = TcHandle::new(0, 0xE1);

/// Size of `struct __sk_buff` (the BPF_PROG_TEST_RUN context) is 192 bytes today; the output
/// buffer is larger so a future kernel with a longer struct does not fail with ENOSPC.
const SKB_CTX_OUT_LEN: usize = 256;
/// The input context only needs to reach `ingress_ifindex` (offset 36) and `ifindex` (40).
const SKB_CTX_IN_LEN: usize = 44;
const SKB_OFF_MARK: usize = 8;
const SKB_OFF_INGRESS_IFINDEX: usize = 36;

/// The aya-backed [`Datapath`].
pub struct AyaDatapath {
    pin_dir: PathBuf,
    mode: AttachMode,
    inner: Mutex<Inner>,
}

struct Inner {
    ebpf: Ebpf,
    nets_v4: HashMap<MapData, common::NetKeyV4, u32>,
    nets_v6: HashMap<MapData, common::NetKeyV6, u32>,
    prefix_lens: HashMap<MapData, u32, common::PrefixLens>,
    /// CIDRs per prefix length and family, mirroring `nets_v4` / `nets_v6`; rebuilt by `load`.
    lens: PrefixLenSet,
    peers: HashMap<MapData, u32, common::PeerState>,
    counters: PerCpuHashMap<MapData, u32, common::PeerCounters>,
    config: Array<MapData, common::Config>,
    overlay: Array<MapData, common::OverlayConfig>,
    /// clsact mode only: what this process attached (filters cannot be enumerated by pin).
    clsact_attached: BTreeSet<(String, Hook)>,
}

impl std::fmt::Debug for AyaDatapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AyaDatapath")
            .field("pin_dir", &self.pin_dir)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

fn map_err(map: &'static str, op: impl Into<String>) -> impl FnOnce(MapError) -> Error {
    move |source| Error::Map {
        map,
        op: op.into(),
        source: Box::new(source),
    }
}

fn pin_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error {
    let path = path.to_owned();
    move |source| Error::PinDir { op, path, source }
}

fn attach_err<E>(op: &'static str, ifname: &str, hook: Hook) -> impl FnOnce(E) -> Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    let ifname = ifname.to_owned();
    move |source| Error::Attach {
        op,
        ifname,
        hook,
        program: hook.program_name(),
        source: Box::new(source),
    }
}

/// Whether a map delete failed only because the key was absent.
fn is_absent(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound | MapError::ElementNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn program_errno(e: &ProgramError) -> Option<i32> {
    match e {
        ProgramError::SyscallError(s) => s.io_error.raw_os_error(),
        _ => None,
    }
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(Error::Missing { kind: "map", name })?;
    T::try_from(map).map_err(map_err(name, "open"))
}

fn classifier(ebpf: &mut Ebpf, hook: Hook) -> Result<&mut SchedClassifier> {
    let name = hook.program_name();
    let prog = ebpf.program_mut(name).ok_or(Error::Missing {
        kind: "program",
        name,
    })?;
    prog.try_into().map_err(|source| Error::Program {
        hook,
        program: name,
        op: "type",
        source: Box::new(source),
    })
}

const fn attach_type(hook: Hook) -> TcAttachType {
    if hook.is_ingress() {
        TcAttachType::Ingress
    } else {
        TcAttachType::Egress
    }
}

fn link_dir(pin_dir: &Path, hook: Hook) -> PathBuf {
    pin_dir.join("links").join(hook.slug())
}

fn detect_mode() -> Result<AttachMode> {
    let v = aya::util::KernelVersion::current().map_err(|e| Error::KernelVersion(e.to_string()))?;
    Ok(if v >= aya::util::KernelVersion::new(6, 6, 0) {
        AttachMode::Tcx
    } else {
        AttachMode::Clsact
    })
}

/// Names of the links pinned for `hook` (the interface names), sorted.
fn pinned_ifnames(pin_dir: &Path, hook: Hook) -> Result<Vec<String>> {
    let dir = link_dir(pin_dir, hook);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(pin_err("read", &dir)(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(pin_err("read", &dir))?;
        if let Some(name) = entry.file_name().to_str() {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// bpffs' `f_type` (`BPF_FS_MAGIC`).
const BPF_FS_MAGIC: i64 = 0xCAFE_4A11;

fn statfs_type(path: &Path) -> Result<i64> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::PinDir {
        op: "statfs",
        path: path.to_owned(),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })?;
    // SAFETY: statfs is plain data; zeroed is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid out-pointer, both live for the call.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(pin_err("statfs", path)(io::Error::last_os_error()));
    }
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type is not i64 on every libc target"
    )]
    Ok(st.f_type as i64)
}

fn is_bpffs(path: &Path) -> Result<bool> {
    Ok(statfs_type(path)? == BPF_FS_MAGIC)
}

/// Mounts bpffs on `path` (usually `/sys/fs/bpf`) unless a bpffs is already mounted there;
/// `path` must exist. Pin directories given to [`AyaDatapath::load`] must be on bpffs.
pub fn mount_bpffs(path: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    if is_bpffs(path)? {
        return Ok(());
    }
    let target =
        std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::PinDir {
            op: "mount bpffs on",
            path: path.to_owned(),
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })?;
    // SAFETY: all pointers are NUL-terminated strings that outlive the call; data is null.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(pin_err("mount bpffs on", path)(io::Error::last_os_error()));
    }
    tracing::info!(path = %path.display(), "mounted bpffs");
    Ok(())
}

fn remove_file_if_exists(path: &Path) -> Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(pin_err("remove", path)(e)),
    }
}

fn bad_entry(map: &'static str, key: u32, reason: &'static str) -> Error {
    Error::InvalidEntry { map, key, reason }
}

/// A CIDR read back from a map: host bits must be clear (the programs would never match it).
fn checked_net(map: &'static str, net: IpNet) -> Result<IpNet> {
    if net.trunc() != net {
        return Err(bad_entry(
            map,
            u32::from(net.prefix_len()),
            "host bits are set in the address",
        ));
    }
    Ok(net)
}

fn checked_peer(map: &'static str, peer: u32) -> Result<PeerId> {
    PeerId::try_from(peer).map_err(|_| bad_entry(map, peer, "peer id > 65535"))
}

fn key_v4(n: Ipv4Net) -> common::NetKeyV4 {
    common::NetKeyV4::masked(n.addr().octets(), u32::from(n.prefix_len()))
}

fn key_v6(n: Ipv6Net) -> common::NetKeyV6 {
    common::NetKeyV6::masked(n.addr().octets(), u32::from(n.prefix_len()))
}

const fn nets_map(cidr: IpNet) -> &'static str {
    match cidr {
        IpNet::V4(_) => common::map_names::REMOTE_NETS_V4,
        IpNet::V6(_) => common::map_names::REMOTE_NETS_V6,
    }
}

impl Inner {
    fn net_exists(&self, cidr: IpNet) -> Result<bool> {
        let res = match cidr {
            IpNet::V4(n) => self.nets_v4.get(&key_v4(n), 0).map(drop),
            IpNet::V6(n) => self.nets_v6.get(&key_v6(n), 0).map(drop),
        };
        match res {
            Ok(()) => Ok(true),
            Err(e) if is_absent(&e) => Ok(false),
            Err(e) => Err(map_err(nets_map(cidr), format!("look up {cidr}"))(e)),
        }
    }

    fn net_insert(&mut self, cidr: IpNet, peer: u32) -> Result<()> {
        match cidr {
            IpNet::V4(n) => self.nets_v4.insert(key_v4(n), peer, 0),
            IpNet::V6(n) => self.nets_v6.insert(key_v6(n), peer, 0),
        }
        .map_err(map_err(nets_map(cidr), format!("insert {cidr}")))
    }

    /// Removes the entry of `cidr`; returns whether there was one.
    fn net_remove(&mut self, cidr: IpNet) -> Result<bool> {
        let res = match cidr {
            IpNet::V4(n) => self.nets_v4.remove(&key_v4(n)),
            IpNet::V6(n) => self.nets_v6.remove(&key_v6(n)),
        };
        match res {
            Ok(()) => Ok(true),
            Err(e) if is_absent(&e) => Ok(false),
            Err(e) => Err(map_err(nets_map(cidr), format!("remove {cidr}"))(e)),
        }
    }

    /// Writes the `PREFIX_LENS` list of the family of `cidr` from `self.lens`.
    fn write_prefix_lens(&mut self, cidr: IpNet) -> Result<()> {
        let v4 = cidr.addr().is_ipv4();
        let key = if v4 {
            common::PREFIX_LENS_V4
        } else {
            common::PREFIX_LENS_V6
        };
        self.prefix_lens
            .insert(key, self.lens.to_raw(v4), 0)
            .map_err(map_err(
                common::map_names::PREFIX_LENS,
                format!("set the IPv{} list", if v4 { 4 } else { 6 }),
            ))
    }

    /// Recounts the prefix lengths of `REMOTE_NETS_*` and rewrites both `PREFIX_LENS` lists
    /// (they may be missing, from an interrupted update, or from an earlier version).
    fn rebuild_prefix_lens(&mut self) -> Result<()> {
        let mut lens = PrefixLenSet::default();
        let mut cidrs = Vec::new();
        for item in self.nets_v4.keys() {
            let map = common::map_names::REMOTE_NETS_V4;
            let key = item.map_err(map_err(map, "iterate"))?;
            let prefix = u8::try_from(key.prefix_len).unwrap_or(u8::MAX);
            let net = Ipv4Net::new(Ipv4Addr::from(key.addr), prefix)
                .map_err(|_| bad_entry(map, key.prefix_len, "prefix length out of range"))?;
            cidrs.push(IpNet::V4(net));
        }
        for item in self.nets_v6.keys() {
            let map = common::map_names::REMOTE_NETS_V6;
            let key = item.map_err(map_err(map, "iterate"))?;
            let prefix = u8::try_from(key.prefix_len).unwrap_or(u8::MAX);
            let net = Ipv6Net::new(Ipv6Addr::from(key.addr), prefix)
                .map_err(|_| bad_entry(map, key.prefix_len, "prefix length out of range"))?;
            cidrs.push(IpNet::V6(net));
        }
        // Longest first, so that if a future limit is lower, the CIDR named is a short one.
        cidrs.sort_by_key(|c| std::cmp::Reverse(c.prefix_len()));
        for cidr in cidrs {
            lens.check_new(cidr)?;
            lens.add(cidr);
        }
        let v4 = IpNet::V4(Ipv4Net::default());
        let v6 = IpNet::V6(Ipv6Net::default());
        let before = (self.read_prefix_lens(true), self.read_prefix_lens(false));
        self.lens = lens;
        self.write_prefix_lens(v4)?;
        self.write_prefix_lens(v6)?;
        let after = (Some(self.lens.to_raw(true)), Some(self.lens.to_raw(false)));
        if before != after {
            tracing::info!(
                v4 = ?self.lens.in_use(v4),
                v6 = ?self.lens.in_use(v6),
                "rebuilt the prefix-length lists"
            );
        }
        Ok(())
    }

    fn read_prefix_lens(&self, v4: bool) -> Option<common::PrefixLens> {
        let key = if v4 {
            common::PREFIX_LENS_V4
        } else {
            common::PREFIX_LENS_V6
        };
        self.prefix_lens.get(&key, 0).ok()
    }
}

/// Copies the entries of the LPM tries pinned by an earlier version (`REMOTE_CIDRS_V4/V6`) into
/// `REMOTE_NETS_*` (an entry already there wins), then unpins the tries.
fn migrate_legacy_lpm(inner: &mut Inner, pin_dir: &Path) -> Result<()> {
    use common::map_names as m;
    for name in [m::LEGACY_REMOTE_CIDRS_V4, m::LEGACY_REMOTE_CIDRS_V6] {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let map = MapData::from_pin(&path)
            .and_then(Map::from_map_data)
            .map_err(map_err(name, "open the legacy pin"))?;
        let mut cidrs = Vec::new();
        if name == m::LEGACY_REMOTE_CIDRS_V4 {
            let trie: LpmTrie<MapData, [u8; 4], u32> =
                LpmTrie::try_from(map).map_err(map_err(name, "open the legacy pin"))?;
            for item in trie.iter() {
                let (key, peer) = item.map_err(map_err(name, "iterate"))?;
                let prefix = u8::try_from(key.prefix_len()).unwrap_or(u8::MAX);
                let net = Ipv4Net::new(Ipv4Addr::from(key.data()), prefix)
                    .map_err(|_| bad_entry(name, key.prefix_len(), "prefix length out of range"))?;
                cidrs.push((IpNet::V4(net.trunc()), peer));
            }
        } else {
            let trie: LpmTrie<MapData, [u8; 16], u32> =
                LpmTrie::try_from(map).map_err(map_err(name, "open the legacy pin"))?;
            for item in trie.iter() {
                let (key, peer) = item.map_err(map_err(name, "iterate"))?;
                let prefix = u8::try_from(key.prefix_len()).unwrap_or(u8::MAX);
                let net = Ipv6Net::new(Ipv6Addr::from(key.data()), prefix)
                    .map_err(|_| bad_entry(name, key.prefix_len(), "prefix length out of range"))?;
                cidrs.push((IpNet::V6(net.trunc()), peer));
            }
        }
        let n = cidrs.len();
        for (cidr, peer) in cidrs {
            if !inner.net_exists(cidr)? {
                inner.net_insert(cidr, peer)?;
            }
        }
        remove_file_if_exists(&path)?;
        tracing::info!(
            map = name,
            cidrs = n,
            "migrated the legacy LPM trie and unpinned it"
        );
    }
    Ok(())
}

impl AyaDatapath {
    /// Loads the programs, pinning maps (and tc links) under `pin_dir` (e.g.
    /// `/sys/fs/bpf/enc/<node>`, created if missing; it must be on bpffs). Maps already pinned
    /// there are reused, so state and counters survive a restart, and links pinned there are
    /// moved to the new programs atomically. Attach mode: tcx on kernels >= 6.6, else clsact.
    pub fn load(pin_dir: &Path) -> Result<Self> {
        if OBJECT.is_empty() {
            return Err(Error::NoObject);
        }
        std::fs::create_dir_all(pin_dir).map_err(pin_err("create", pin_dir))?;
        if !is_bpffs(pin_dir)? {
            return Err(Error::NotBpffs {
                path: pin_dir.to_owned(),
            });
        }
        let mode = detect_mode()?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(OBJECT)
            .map_err(|source| Error::Load {
                pin_dir: pin_dir.to_owned(),
                source: Box::new(source),
            })?;
        for hook in Hook::ALL {
            classifier(&mut ebpf, hook)?
                .load()
                .map_err(|source| Error::Program {
                    hook,
                    program: hook.program_name(),
                    op: "load",
                    source: Box::new(source),
                })?;
        }
        use common::map_names as m;
        let mut inner = Inner {
            nets_v4: take(&mut ebpf, m::REMOTE_NETS_V4)?,
            nets_v6: take(&mut ebpf, m::REMOTE_NETS_V6)?,
            prefix_lens: take(&mut ebpf, m::PREFIX_LENS)?,
            lens: PrefixLenSet::default(),
            peers: take(&mut ebpf, m::PEERS)?,
            counters: take(&mut ebpf, m::COUNTERS)?,
            config: take(&mut ebpf, m::CONFIG)?,
            overlay: take(&mut ebpf, m::OVERLAY)?,
            ebpf,
            clsact_attached: BTreeSet::new(),
        };
        // Before any link moves to the new programs: they must see every CIDR.
        migrate_legacy_lpm(&mut inner, pin_dir)?;
        inner.rebuild_prefix_lens()?;
        let dp = Self {
            pin_dir: pin_dir.to_owned(),
            mode,
            inner: Mutex::new(inner),
        };
        if mode == AttachMode::Tcx {
            dp.adopt_links()?;
        }
        tracing::info!(pin_dir = %pin_dir.display(), ?mode, "eBPF datapath loaded");
        Ok(dp)
    }

    /// Detaches everything and removes the pin directory (for `enc-agent --cleanup`; not for a
    /// normal shutdown, since strict mode must outlive a restart). A missing directory is Ok.
    pub fn remove_all(pin_dir: &Path) -> Result<()> {
        if !pin_dir.exists() {
            return Ok(());
        }
        // Unpinning a tcx link we hold no fd of detaches it.
        for hook in Hook::ALL {
            for ifname in pinned_ifnames(pin_dir, hook)? {
                remove_file_if_exists(&link_dir(pin_dir, hook).join(&ifname))?;
                tracing::info!(%ifname, %hook, "detached (link unpinned)");
            }
        }
        if detect_mode()? == AttachMode::Clsact {
            // Filters are not pinned: remove ours from every interface of this namespace.
            let net = Path::new("/sys/class/net");
            let entries = std::fs::read_dir(net).map_err(pin_err("read", net))?;
            for entry in entries.flatten() {
                let Some(ifname) = entry.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                for hook in Hook::ALL {
                    if aya::programs::tc::qdisc_detach_program(
                        &ifname,
                        attach_type(hook),
                        hook.program_name(),
                    )
                    .is_ok()
                    {
                        tracing::info!(%ifname, %hook, "detached (clsact filter)");
                    }
                }
            }
        }
        std::fs::remove_dir_all(pin_dir).map_err(pin_err("remove", pin_dir))?;
        Ok(())
    }

    /// Runs the program of `hook` on `packet` (an Ethernet frame, at least 14 bytes) with
    /// `BPF_PROG_TEST_RUN`, with skb `ingress_ifindex` set and mark 0, `repeat` times (0 is
    /// taken as 1). It uses the live maps: counters count.
    pub fn test_run(
        &self,
        hook: Hook,
        packet: &[u8],
        ingress_ifindex: u32,
        repeat: u32,
    ) -> Result<TestRun> {
        self.test_run_with_mark(hook, packet, ingress_ifindex, 0, repeat)
    }

    /// Like [`AyaDatapath::test_run`], with the skb mark the packet arrives with.
    pub fn test_run_with_mark(
        &self,
        hook: Hook,
        packet: &[u8],
        ingress_ifindex: u32,
        mark: u32,
        repeat: u32,
    ) -> Result<TestRun> {
        let mut ctx_in = [0u8; SKB_CTX_IN_LEN];
        ctx_in[SKB_OFF_MARK..SKB_OFF_MARK + 4].copy_from_slice(&mark.to_ne_bytes());
        ctx_in[SKB_OFF_INGRESS_IFINDEX..SKB_OFF_INGRESS_IFINDEX + 4]
            .copy_from_slice(&ingress_ifindex.to_ne_bytes());
        let mut ctx_out = [0u8; SKB_CTX_OUT_LEN];
        // Room for the packet (the programs never grow it).
        let mut data_out = vec![0u8; packet.len() + 256];
        let mut inner = self.lock();
        let prog = classifier(&mut inner.ebpf, hook)?;
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut data_out),
            ctx_in: Some(&ctx_in),
            ctx_out: Some(&mut ctx_out),
            repeat: repeat.max(1),
            ..TestRunOptions::new()
        };
        let res = prog.test_run(opts).map_err(|source| Error::Program {
            hook,
            program: hook.program_name(),
            op: "BPF_PROG_TEST_RUN",
            source: Box::new(source),
        })?;
        let mut mark_out = [0u8; 4];
        mark_out.copy_from_slice(&ctx_out[SKB_OFF_MARK..SKB_OFF_MARK + 4]);
        Ok(TestRun {
            action: res.return_value as i32,
            mark: u32::from_ne_bytes(mark_out),
            duration: res.duration,
        })
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Moves every pinned link to the programs just loaded; unpins links whose interface is gone.
    fn adopt_links(&self) -> Result<()> {
        for hook in Hook::ALL {
            for ifname in pinned_ifnames(&self.pin_dir, hook)? {
                let mut inner = self.lock();
                let adopted = self.adopt_link(&mut inner, hook, &ifname)?;
                if adopted {
                    tracing::info!(%ifname, %hook, "adopted pinned tcx link");
                } else {
                    tracing::info!(%ifname, %hook, "unpinned the link of a vanished interface");
                }
            }
        }
        Ok(())
    }

    /// If a link is pinned for (hook, ifname), points it at our program and returns true;
    /// if the pinned link is defunct (its interface was deleted), unpins it and returns false.
    fn adopt_link(&self, inner: &mut Inner, hook: Hook, ifname: &str) -> Result<bool> {
        let path = link_dir(&self.pin_dir, hook).join(ifname);
        let pinned = match PinnedLink::from_pin(&path) {
            Ok(p) => p,
            Err(aya::programs::links::LinkError::SyscallError(s))
                if s.io_error.kind() == io::ErrorKind::NotFound =>
            {
                return Ok(false);
            }
            Err(e) => return Err(attach_err("open pinned link", ifname, hook)(e)),
        };
        let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(attach_err(
            "adopt pinned link",
            ifname,
            hook,
        ))?;
        let prog = classifier(&mut inner.ebpf, hook)?;
        match prog.attach_to_link(link) {
            Ok(id) => {
                // Dropping our handle closes the fd; the pin keeps the link attached.
                drop(
                    prog.take_link(id)
                        .map_err(attach_err("take link", ifname, hook))?,
                );
                Ok(true)
            }
            Err(e) if program_errno(&e) == Some(libc::ENOLINK) => {
                remove_file_if_exists(&path)?;
                Ok(false)
            }
            Err(e) => Err(attach_err("update pinned link", ifname, hook)(e)),
        }
    }

    fn attach(&self, ifname: &str, hook: Hook) -> Result<()> {
        validate_ifname(ifname)?;
        let mut inner = self.lock();
        match self.mode {
            AttachMode::Tcx => self.attach_tcx(&mut inner, ifname, hook),
            AttachMode::Clsact => Self::attach_clsact(&mut inner, ifname, hook),
        }
    }

    fn attach_tcx(&self, inner: &mut Inner, ifname: &str, hook: Hook) -> Result<()> {
        if self.adopt_link(inner, hook, ifname)? {
            return Ok(());
        }
        let dir = link_dir(&self.pin_dir, hook);
        std::fs::create_dir_all(&dir).map_err(pin_err("create", &dir))?;
        let prog = classifier(&mut inner.ebpf, hook)?;
        let id = prog
            .attach_with_options(
                ifname,
                attach_type(hook),
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(attach_err("attach (tcx)", ifname, hook))?;
        let link = prog
            .take_link(id)
            .map_err(attach_err("take link", ifname, hook))?;
        let fd_link =
            FdLink::try_from(link).map_err(attach_err("convert tcx link", ifname, hook))?;
        fd_link
            .pin(dir.join(ifname))
            .map_err(attach_err("pin tcx link", ifname, hook))?;
        tracing::info!(%ifname, %hook, "attached (tcx)");
        Ok(())
    }

    fn attach_clsact(inner: &mut Inner, ifname: &str, hook: Hook) -> Result<()> {
        // Already there is fine; a real failure shows up in the attach below.
        if let Err(e) = aya::programs::tc::qdisc_add_clsact(ifname) {
            tracing::debug!(%ifname, error = %e, "clsact qdisc not added");
        }
        let prog = classifier(&mut inner.ebpf, hook)?;
        // Replace our filter in place if it exists (a restart), else create it.
        let replaced = SchedClassifierLink::attached(
            ifname,
            attach_type(hook),
            CLSACT_PRIORITY,
            CLSACT_HANDLE,
            None,
        )
        .ok()
        .and_then(|existing| prog.attach_to_link(existing).ok());
        let id = match replaced {
            Some(id) => id,
            None => prog
                .attach_with_options(
                    ifname,
                    attach_type(hook),
                    TcAttachOptions::Netlink(NlOptions {
                        priority: CLSACT_PRIORITY,
                        handle: CLSACT_HANDLE,
                        classid: None,
                    }),
                )
                .map_err(attach_err("attach (clsact)", ifname, hook))?,
        };
        let link = prog
            .take_link(id)
            .map_err(attach_err("take link", ifname, hook))?;
        // Dropping a netlink link detaches the filter; it must outlive us. It owns no fd.
        std::mem::forget(link);
        // aya cannot list filters, so a filter that vanished (its interface was recreated)
        // cannot be told from one still there: every call replaces ours in place, which is
        // atomic for cls_bpf. Only the first attach of this process is worth a log line.
        if inner.clsact_attached.insert((ifname.to_owned(), hook)) {
            tracing::info!(%ifname, %hook, "attached (clsact)");
        } else {
            tracing::debug!(%ifname, %hook, "re-applied (clsact)");
        }
        Ok(())
    }

    fn detach(&self, ifname: &str, hook: Hook) -> Result<()> {
        validate_ifname(ifname)?;
        let mut inner = self.lock();
        match self.mode {
            AttachMode::Tcx => {
                if remove_file_if_exists(&link_dir(&self.pin_dir, hook).join(ifname))? {
                    tracing::info!(%ifname, %hook, "detached (tcx)");
                }
            }
            AttachMode::Clsact => {
                inner.clsact_attached.remove(&(ifname.to_owned(), hook));
                match aya::programs::tc::qdisc_detach_program(
                    ifname,
                    attach_type(hook),
                    hook.program_name(),
                ) {
                    Ok(()) => tracing::info!(%ifname, %hook, "detached (clsact)"),
                    Err(aya::programs::TcError::IoError(e))
                        if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(attach_err("detach (clsact)", ifname, hook)(e)),
                }
            }
        }
        Ok(())
    }

    /// Whether the link pinned for (hook, ifname) is attached to `ifname` right now.
    fn tcx_link_live(&self, hook: Hook, ifname: &str) -> bool {
        let path = link_dir(&self.pin_dir, hook).join(ifname);
        let Ok(pinned) = PinnedLink::from_pin(&path) else {
            return false;
        };
        let Ok(info) = FdLink::from(pinned).info() else {
            return false;
        };
        let Ok((_, progs)) = SchedClassifier::query_tcx(ifname, attach_type(hook)) else {
            return false;
        };
        progs.iter().any(|p| p.id() == info.program_id())
    }
}

impl Datapath for AyaDatapath {
    fn attach_mode(&self) -> AttachMode {
        self.mode
    }

    /// Writes `OVERLAY` first, then `CONFIG`: the two are separate maps, and a failure leaves
    /// `CONFIG` as it was (on a fresh pin directory, unwritten and so strict).
    fn set_config(&self, cfg: DatapathConfig) -> Result<()> {
        let mut inner = self.lock();
        inner
            .overlay
            .set(0, cfg.overlay_raw(), 0)
            .map_err(map_err(common::map_names::OVERLAY, "set 0"))?;
        inner
            .config
            .set(0, cfg.to_raw(), 0)
            .map_err(map_err(common::map_names::CONFIG, "set 0"))
    }

    fn upsert_cidr(&self, cidr: IpNet, peer: PeerId) -> Result<()> {
        validate_cidr(cidr)?;
        validate_peer(peer)?;
        let mut inner = self.lock();
        let new_len = inner.lens.check_new(cidr)?;
        let existed = !new_len && inner.net_exists(cidr)?;
        if new_len {
            // The length first: until the entry is in, the programs only try one more length.
            inner.lens.add(cidr);
            if let Err(e) = inner.write_prefix_lens(cidr) {
                inner.lens.remove(cidr);
                return Err(e);
            }
        }
        match inner.net_insert(cidr, u32::from(peer)) {
            Ok(()) => {
                if !new_len && !existed {
                    inner.lens.add(cidr);
                }
                Ok(())
            }
            Err(e) => {
                if new_len {
                    inner.lens.remove(cidr);
                    // Best effort: a stale length in the list only costs a lookup that misses.
                    if let Err(e2) = inner.write_prefix_lens(cidr) {
                        tracing::warn!(%cidr, error = %e2, "cannot drop the prefix length again");
                    }
                }
                Err(e)
            }
        }
    }

    fn delete_cidr(&self, cidr: IpNet) -> Result<()> {
        validate_cidr(cidr)?;
        let mut inner = self.lock();
        // The entry first, then (if it was the last of its length) the length.
        if inner.net_remove(cidr)? && inner.lens.remove(cidr) {
            inner.write_prefix_lens(cidr)?;
        }
        Ok(())
    }

    fn dump_cidrs(&self) -> Result<Vec<(IpNet, PeerId)>> {
        let inner = self.lock();
        let mut out = Vec::new();
        for item in inner.nets_v4.iter() {
            let map = common::map_names::REMOTE_NETS_V4;
            let (key, peer) = item.map_err(map_err(map, "iterate"))?;
            let prefix = u8::try_from(key.prefix_len).unwrap_or(u8::MAX);
            let net = Ipv4Net::new(Ipv4Addr::from(key.addr), prefix)
                .map_err(|_| bad_entry(map, key.prefix_len, "prefix length out of range"))?;
            out.push((checked_net(map, IpNet::V4(net))?, checked_peer(map, peer)?));
        }
        for item in inner.nets_v6.iter() {
            let map = common::map_names::REMOTE_NETS_V6;
            let (key, peer) = item.map_err(map_err(map, "iterate"))?;
            let prefix = u8::try_from(key.prefix_len).unwrap_or(u8::MAX);
            let net = Ipv6Net::new(Ipv6Addr::from(key.addr), prefix)
                .map_err(|_| bad_entry(map, key.prefix_len, "prefix length out of range"))?;
            out.push((checked_net(map, IpNet::V6(net))?, checked_peer(map, peer)?));
        }
        out.sort();
        Ok(out)
    }

    fn upsert_peer(&self, peer: PeerId, state: PeerState) -> Result<()> {
        validate_peer(peer)?;
        self.lock()
            .peers
            .insert(u32::from(peer), state.to_raw(), 0)
            .map_err(map_err(common::map_names::PEERS, format!("insert {peer}")))
    }

    fn delete_peer(&self, peer: PeerId) -> Result<()> {
        validate_peer(peer)?;
        let mut inner = self.lock();
        let key = u32::from(peer);
        match inner.peers.remove(&key) {
            Err(e) if !is_absent(&e) => {
                return Err(map_err(common::map_names::PEERS, format!("remove {peer}"))(
                    e,
                ));
            }
            _ => {}
        }
        match inner.counters.remove(&key) {
            Err(e) if !is_absent(&e) => Err(map_err(
                common::map_names::COUNTERS,
                format!("remove {peer}"),
            )(e)),
            _ => Ok(()),
        }
    }

    fn dump_peers(&self) -> Result<Vec<(PeerId, PeerState)>> {
        let inner = self.lock();
        let map = common::map_names::PEERS;
        let mut out = Vec::new();
        for item in inner.peers.iter() {
            let (key, raw) = item.map_err(map_err(map, "iterate"))?;
            let peer = PeerId::try_from(key).map_err(|_| Error::InvalidEntry {
                map,
                key,
                reason: "peer id > 65535",
            })?;
            out.push((peer, PeerState::from_raw(peer, raw)?));
        }
        out.sort_by_key(|(p, _)| *p);
        Ok(out)
    }

    fn counters(&self) -> Result<BTreeMap<PeerId, PeerCounters>> {
        let inner = self.lock();
        let map = common::map_names::COUNTERS;
        let mut out = BTreeMap::new();
        for item in inner.counters.iter() {
            let (key, per_cpu) = item.map_err(map_err(map, "iterate"))?;
            let peer = PeerId::try_from(key).map_err(|_| Error::InvalidEntry {
                map,
                key,
                reason: "peer id > 65535",
            })?;
            let sum: &mut PeerCounters = out.entry(peer).or_default();
            for raw in per_cpu.iter() {
                sum.add_raw(raw);
            }
        }
        Ok(out)
    }

    fn attach_pod(&self, ifname: &str) -> Result<()> {
        self.attach(ifname, Hook::PodIngress)?;
        self.attach(ifname, Hook::PodEgress)
    }

    fn detach_pod(&self, ifname: &str) -> Result<()> {
        self.detach(ifname, Hook::PodIngress)?;
        self.detach(ifname, Hook::PodEgress)
    }

    fn attach_underlay(&self, ifname: &str) -> Result<()> {
        self.attach(ifname, Hook::UnderlayIngress)?;
        self.attach(ifname, Hook::UnderlayEgress)
    }

    fn attached(&self) -> Result<Vec<(String, Hook)>> {
        match self.mode {
            AttachMode::Tcx => {
                let mut out = Vec::new();
                for hook in Hook::ALL {
                    for ifname in pinned_ifnames(&self.pin_dir, hook)? {
                        if self.tcx_link_live(hook, &ifname) {
                            out.push((ifname, hook));
                        }
                    }
                }
                out.sort();
                Ok(out)
            }
            AttachMode::Clsact => Ok(self.lock().clsact_attached.iter().cloned().collect()),
        }
    }
}
