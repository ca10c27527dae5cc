//! The VM test tier: boots Debian's cloud kernel under qemu and runs one `enc-vm-scenario`
//! command inside it, for the kernel backends this host's kernel lacks (WireGuard, XFRM ESP,
//! Geneve) and for the older kernel's eBPF attach path (clsact instead of tcx).
//!
//! `scripts/vm-setup.sh` installs qemu and the tools, and unpacks the kernel package into a
//! cache directory (`ENC_VM_CACHE`, default `/var/cache/enc-vm`) whose `kernel.env` names the
//! kernel. [`Vm::run`] then:
//!
//! 1. builds an initramfs (newc cpio, written here; uncompressed, which boots faster under
//!    TCG than gzip): busybox and its applets, the kernel modules of [`MODULES`] and
//!    [`MODULE_DIRS`] with their dependencies, the host tools of [`HOST_TOOLS`] and the
//!    project's binaries ([`PROJECT_BINS`], debug info stripped), each with the shared libraries
//!    `ldd` names, and an `/init` script ([`INIT`]). The part without the project's binaries is
//!    cached by the identity of its inputs; so are the stripped binaries;
//! 2. boots `qemu-system-x86_64` (TCG unless `ENC_VM_ACCEL` says otherwise) with the console
//!    on a log file, under a wall-clock timeout (`ENC_VM_TIMEOUT`, default 10 min);
//! 3. reads the console: the guest prints `ENC-VM-KERNEL: <uname -r>` once it is up, the
//!    scenario's output, `ENC-VM-RESULT: ok` or `ENC-VM-RESULT: fail (exit N)`, and powers off.
//!
//! The in-guest scenarios are in [`scenario`].

pub mod scenario;

use anyhow::{Context, bail};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, UNIX_EPOCH};

/// Console line the guest prints once booted, followed by `uname -r`.
pub const KERNEL_MARKER: &str = "ENC-VM-KERNEL: ";
/// Console line the guest prints before running the scenario, followed by its arguments.
pub const SCENARIO_MARKER: &str = "ENC-VM-SCENARIO: ";
/// Console line the guest prints after the scenario: `ok` or `fail (exit N)`.
pub const RESULT_MARKER: &str = "ENC-VM-RESULT: ";
/// Console line the guest prints for each module that `modprobe` could not load.
pub const MODULE_FAILED_MARKER: &str = "ENC-VM-MODULE-FAILED: ";

/// Kernel modules loaded at boot; their dependencies (from `modules.dep`) come along.
pub const MODULES: &[&str] = &[
    // WireGuard (pulls in the chacha, poly1305, curve25519 and UDP tunnel modules).
    "wireguard",
    // XFRM ESP with rfc4106(gcm(aes)): the netlink interface, ESP, and the AEAD's parts.
    "xfrm_user",
    "xfrm_algo",
    "esp4",
    "esp6",
    "gcm",
    "ctr",
    "ghash-generic",
    "ghash-clmulni-intel",
    "aesni-intel",
    "seqiv",
    "echainiv",
    // seqiv's IV generator copies through ecb(cipher_null); missing it, every ESP SA fails
    // with "Kernel was unable to initialize cryptographic operations".
    "ecb",
    "authenc",
    // Tunnels and links.
    "geneve",
    "vxlan",
    "veth",
    "bridge",
    "tun",
    "dummy",
    // tc clsact with eBPF classifiers (no tcx before 6.6).
    "sch_ingress",
    "cls_bpf",
    "act_bpf",
];

/// Module directories included whole (with their `modules.alias` lines), so that the
/// kernel's on-demand loads (`request_module`: crypto templates, xfrm and tc pieces) find
/// what they ask for.
pub const MODULE_DIRS: &[&str] = &[
    "kernel/crypto",
    "kernel/arch/x86/crypto",
    "kernel/lib/crypto",
    "kernel/net/xfrm",
    "kernel/net/ipv4",
    "kernel/net/ipv6",
    "kernel/net/sched",
];

/// Host programs copied into the guest, with their shared libraries. They take precedence
/// over busybox applets of the same name.
pub const HOST_TOOLS: &[&str] = &[
    "ip", "tc", "ss", "tcpdump", "ping", "wg", "iperf3", "sysctl",
];

/// The project's binaries copied into the guest's `/enc/bin` (from [`crate::lab::bin_dir`]).
pub const PROJECT_BINS: &[&str] = &["enc-agent", "encctl", "enc-vm-scenario"];

/// The guest's `/init`. busybox `sh` runs its own applets before anything on `PATH`, so
/// `ip` here is busybox's; programs started from Rust (`Command`) get the host tools.
pub const INIT: &str = r#"#!/bin/sh
# enc VM tier: set up a minimal system, load modules, run one scenario, power off.
export PATH=/usr/sbin:/usr/bin HOME=/root RUST_BACKTRACE=1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /dev/shm
mkdir -p /run/netns /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf || echo "enc-vm: cannot mount bpffs"
mount -t cgroup2 cgroup2 /sys/fs/cgroup || echo "enc-vm: cannot mount cgroup2"
hostname enc-vm
ip link set lo up
# Under emulation a busy host stalls the guest's softirq work for a few hundred ms while the
# traffic tools catch up on their schedule; with the default per-CPU input backlog of 1000
# packets, the veth queues overflowed (rx/tx dropped on the pod veths, column 2 of
# /proc/net/softnet_stat) and the rotation test counted those as lost. Room for 20 s of the
# scenarios' traffic, so only the datapath can lose packets.
echo 20000 > /proc/sys/net/core/netdev_max_backlog
for m in $(cat /etc/enc-vm/modules); do
    modprobe "$m" || echo "ENC-VM-MODULE-FAILED: $m"
done
echo "ENC-VM-KERNEL: $(uname -r)"
echo "enc-vm: up $(cut -d' ' -f1 /proc/uptime)s, $(grep -c '^processor' /proc/cpuinfo) cpus"
scenario=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        enc.scenario=*) scenario="${arg#enc.scenario=}" ;;
        enc.log=*) export ENC_LOG="${arg#enc.log=}" ;;
    esac
done
set -- $(echo "$scenario" | tr ',' ' ')
echo "ENC-VM-SCENARIO: $*"
cd /tmp
/enc/bin/enc-vm-scenario "$@" 2>&1
rc=$?
echo "enc-vm: done at $(cut -d' ' -f1 /proc/uptime)s"
if [ "$rc" -eq 0 ]; then
    echo "ENC-VM-RESULT: ok"
else
    echo "ENC-VM-RESULT: fail (exit $rc)"
fi
sync
poweroff -f
echo o > /proc/sysrq-trigger
"#;

/// Files of the guest's `/etc`.
const ETC: &[(&str, &str)] = &[
    ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
    ("etc/group", "root:x:0:\n"),
    (
        "etc/nsswitch.conf",
        "passwd: files\ngroup: files\nhosts: files\n",
    ),
    ("etc/hosts", "127.0.0.1 localhost enc-vm\n"),
];

/// The cache directory of `scripts/vm-setup.sh`: `ENC_VM_CACHE`, else `/var/cache/enc-vm`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("ENC_VM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/enc-vm"))
}

/// Why the VM tier cannot run on this machine (as opposed to a failure of the tier itself).
#[derive(Debug)]
pub struct NotSetUp(pub String);

impl std::fmt::Display for NotSetUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (run scripts/vm-setup.sh as root)", self.0)
    }
}

impl std::error::Error for NotSetUp {}

/// The unpacked guest kernel that `scripts/vm-setup.sh` describes in `kernel.env`.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// `uname -r` of the kernel, e.g. `6.1.0-56-cloud-amd64`.
    pub version: String,
    /// The kernel image.
    pub vmlinuz: PathBuf,
    /// `lib/modules/<version>` of the unpacked package, with `depmod` run over it.
    pub modules: PathBuf,
}

impl Kernel {
    /// Reads `<cache>/kernel.env`. A missing file or kernel is a [`NotSetUp`] error.
    pub fn from_cache(cache: &Path) -> anyhow::Result<Self> {
        let env = cache.join("kernel.env");
        let text = match std::fs::read_to_string(&env) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(
                    NotSetUp(format!("no guest kernel: {} is missing", env.display())).into(),
                );
            }
            Err(e) => return Err(e).with_context(|| format!("read {}", env.display())),
        };
        let mut vars = BTreeMap::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (k, v) = line
                .split_once('=')
                .with_context(|| format!("{}: bad line {line:?}", env.display()))?;
            vars.insert(k.trim(), v.trim());
        }
        let var = |k: &str| -> anyhow::Result<&str> {
            vars.get(k)
                .copied()
                .with_context(|| format!("{} does not set {k}", env.display()))
        };
        let kernel = Self {
            version: var("ENC_VM_KERNEL_VERSION")?.to_owned(),
            vmlinuz: PathBuf::from(var("ENC_VM_VMLINUZ")?),
            modules: PathBuf::from(var("ENC_VM_MODULES")?),
        };
        for p in [&kernel.vmlinuz, &kernel.modules.join("modules.dep")] {
            if !p.exists() {
                return Err(NotSetUp(format!(
                    "{} names {}, which is missing",
                    env.display(),
                    p.display()
                ))
                .into());
            }
        }
        Ok(kernel)
    }
}

/// How to run the VM.
#[derive(Clone, Debug)]
pub struct VmOptions {
    /// Wall-clock limit of one boot; qemu is killed after it.
    pub timeout: Duration,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Guest CPUs.
    pub cpus: u32,
    /// qemu `-accel` value (`tcg`, or `kvm` where it works).
    pub accel: String,
    /// Where the project's binaries are.
    pub bin_dir: PathBuf,
    /// The cache directory (kernel and initramfs pieces).
    pub cache: PathBuf,
}

impl VmOptions {
    /// Defaults, overridden by `ENC_VM_TIMEOUT` (seconds, or with an `s`/`m` suffix),
    /// `ENC_VM_ACCEL`, `ENC_VM_MEMORY` (MiB), `ENC_VM_CPUS` and `ENC_VM_CACHE`; binaries from
    /// `ENC_VM_BIN_DIR`, else [`crate::lab::bin_dir`]. `scripts/test.sh` points
    /// `ENC_VM_BIN_DIR` at release builds: under TCG the debug-built userspace datapaths fell
    /// 5 to 17 s behind their sockets, release builds 0.16 s (docs/vm-tier.md).
    pub fn from_env() -> anyhow::Result<Self> {
        let timeout = match std::env::var("ENC_VM_TIMEOUT") {
            Ok(v) => parse_duration(&v).with_context(|| format!("ENC_VM_TIMEOUT={v:?}"))?,
            Err(_) => Duration::from_secs(600),
        };
        let num = |k: &str, default: u32| -> anyhow::Result<u32> {
            match std::env::var(k) {
                Ok(v) => v
                    .parse()
                    .with_context(|| format!("{k}={v:?} is not a number")),
                Err(_) => Ok(default),
            }
        };
        Ok(Self {
            timeout,
            memory_mib: num("ENC_VM_MEMORY", 2048)?,
            cpus: num("ENC_VM_CPUS", 2)?,
            accel: std::env::var("ENC_VM_ACCEL").unwrap_or_else(|_| "tcg".into()),
            bin_dir: match std::env::var_os("ENC_VM_BIN_DIR") {
                Some(d) if !d.is_empty() => PathBuf::from(d),
                _ => crate::lab::bin_dir()?,
            },
            cache: cache_dir(),
        })
    }
}

fn parse_duration(v: &str) -> anyhow::Result<Duration> {
    let v = v.trim();
    let (num, mult) = if let Some(n) = v.strip_suffix('m') {
        (n, 60)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1)
    } else {
        (v, 1)
    };
    let n: u64 = num.parse().context("expected seconds, `<n>s` or `<n>m`")?;
    Ok(Duration::from_secs(n * mult))
}

/// The outcome of one boot that reached the scenario's end (or at least booted).
#[derive(Clone, Debug)]
pub struct VmRun {
    /// The scenario's arguments.
    pub scenario: Vec<String>,
    /// `uname -r` inside the guest.
    pub kernel: String,
    /// What the scenario printed (stdout and stderr, interleaved with kernel warnings).
    pub output: String,
    /// Whether the scenario exited 0.
    pub passed: bool,
    /// The scenario's exit status when it failed.
    pub exit_code: Option<i32>,
    /// Modules `modprobe` could not load.
    pub failed_modules: Vec<String>,
    /// From qemu's start to the guest's `ENC-VM-KERNEL` line.
    pub boot_time: Duration,
    /// From qemu's start to its exit.
    pub elapsed: Duration,
    /// Building the initramfs, before qemu started.
    pub prepare_time: Duration,
    /// The whole console log.
    pub console: String,
}

impl VmRun {
    /// Ok if the scenario passed; otherwise an error with the last 80 console lines.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.passed {
            return Ok(());
        }
        bail!(
            "scenario `{}` failed in the VM (exit {}) on kernel {}; last console lines:\n{}",
            self.scenario.join(" "),
            self.exit_code
                .map_or_else(|| "?".to_owned(), |c| c.to_string()),
            self.kernel,
            tail(&self.console, 80)
        )
    }

    /// `vm: ran <scenario> on kernel <version> in <secs>s (boot <secs>s)`.
    pub fn summary(&self) -> String {
        format!(
            "vm: ran {} on kernel {} in {:.1}s (initramfs {:.1}s, boot {:.1}s, scenario {:.1}s){}",
            self.scenario
                .iter()
                .map(|a| if a.len() > 40 {
                    format!("{}...", &a[..37])
                } else {
                    a.clone()
                })
                .collect::<Vec<_>>()
                .join(" "),
            self.kernel,
            self.elapsed.as_secs_f64(),
            self.prepare_time.as_secs_f64(),
            self.boot_time.as_secs_f64(),
            self.elapsed.saturating_sub(self.boot_time).as_secs_f64(),
            if self.failed_modules.is_empty() {
                String::new()
            } else {
                format!("; modules not loaded: {}", self.failed_modules.join(" "))
            }
        )
    }

    /// Values of the scenario's output lines `enc-vm.<key>: <value>` (see [`scenario`]).
    pub fn values(&self, key: &str) -> Vec<String> {
        let prefix = format!("{}{key}: ", scenario::VALUE_PREFIX);
        self.output
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .map(|v| v.trim().to_owned())
            .collect()
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Checks that the VM tier can run: qemu, the guest kernel and static busybox are there.
/// When they are not, the test fails under `CI=true` (it must never pass silently there) and
/// is reported as skipped elsewhere; returns `None` when the caller should return early.
/// Other errors (the project's binaries not built, say) fail the test.
pub fn require_vm(test: &str) -> Option<Vm> {
    match Vm::from_env() {
        Ok(vm) => Some(vm),
        Err(e) if e.downcast_ref::<NotSetUp>().is_some() => {
            if std::env::var_os("CI").is_some() {
                panic!("{test}: the VM tier cannot run and CI is set: {e:#}");
            }
            eprintln!("SKIPPED {test}: {e:#}");
            None
        }
        Err(e) => panic!("{test}: {e:#}"),
    }
}

/// One guest kernel and the means to boot it.
#[derive(Debug)]
pub struct Vm {
    /// The guest kernel.
    pub kernel: Kernel,
    /// How to run it.
    pub opts: VmOptions,
    qemu: PathBuf,
}

/// One VM at a time per process: a TCG guest wants every core of this machine.
static VM_LOCK: Mutex<()> = Mutex::new(());

impl Vm {
    /// A VM with options from the environment ([`VmOptions::from_env`]).
    pub fn from_env() -> anyhow::Result<Self> {
        let cache = cache_dir();
        let kernel = Kernel::from_cache(&cache)?;
        Self::new(kernel, VmOptions::from_env()?)
    }

    /// A VM booting `kernel`. Missing qemu or busybox is a [`NotSetUp`] error.
    pub fn new(kernel: Kernel, opts: VmOptions) -> anyhow::Result<Self> {
        let qemu = which("qemu-system-x86_64")
            .ok_or_else(|| NotSetUp("qemu-system-x86_64 not found".into()))?;
        if !Path::new(BUSYBOX).is_file() {
            return Err(NotSetUp(format!("{BUSYBOX} not found (busybox-static)")).into());
        }
        for b in PROJECT_BINS {
            if !opts.bin_dir.join(b).is_file() {
                bail!(
                    "{b} not found in {}: run `cargo build --workspace --bins` first, or set ENC_VM_BIN_DIR (or ENC_BIN_DIR)",
                    opts.bin_dir.display()
                );
            }
        }
        Ok(Self { kernel, opts, qemu })
    }

    /// Builds the initramfs into `dir` and returns its path.
    pub fn initramfs(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let pieces = initramfs_cache(&self.opts.cache);
        std::fs::create_dir_all(&pieces).with_context(|| format!("create {}", pieces.display()))?;
        let base = base_archive(&self.kernel)?;
        let mut base_libs = BTreeSet::new();
        for e in &base.entries {
            if e.0.starts_with("usr/lib") {
                base_libs.insert(e.0.clone());
            }
        }
        let base_path = base.write_cached(&pieces, "base")?;
        let project = project_archive(&self.opts.bin_dir, &pieces, &base_libs)?;

        // The kernel unpacks concatenated archives in turn: the cached base, then the
        // project's binaries (new with every build, so written afresh).
        let out = dir.join("initrd.cpio");
        let mut w = BufWriter::new(
            std::fs::File::create(&out).with_context(|| format!("create {}", out.display()))?,
        );
        let mut f = std::fs::File::open(&base_path)
            .with_context(|| format!("open {}", base_path.display()))?;
        std::io::copy(&mut f, &mut w).with_context(|| format!("copy {}", base_path.display()))?;
        write_newc(&project.entries, &mut w).context("write the project's initramfs part")?;
        w.flush()?;
        Ok(out)
    }

    /// Boots the guest and runs a shell script in it (`enc-vm-scenario shell`), for
    /// debugging; the kernel command line limits it to about 1.4 kB.
    pub fn run_script(&self, script: &str) -> anyhow::Result<VmRun> {
        self.run(&["shell", &base64(script.as_bytes())])
    }

    /// Boots the guest and runs `enc-vm-scenario <args>` in it. Errors when the VM cannot be
    /// started, does not boot, times out, or ends without a result (each with the console's
    /// tail); a scenario that ran and failed is an `Ok` [`VmRun`] with `passed == false`
    /// (see [`VmRun::check`]).
    pub fn run(&self, args: &[&str]) -> anyhow::Result<VmRun> {
        for a in args {
            if a.is_empty() || a.contains([',', ' ', '"', '\'']) || !a.is_ascii() {
                bail!(
                    "scenario argument {a:?}: must be non-empty ASCII without spaces, commas or quotes"
                );
            }
        }
        let _guard = VM_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::Builder::new().prefix("enc-vm-").tempdir()?;
        let prepare = Instant::now();
        let initrd = self.initramfs(dir.path())?;
        let prepare_time = prepare.elapsed();
        let log = dir.path().join("console.log");
        let qemu_out = dir.path().join("qemu.out");

        let mut append = format!(
            "console=ttyS0 panic=-1 loglevel=4 mitigations=off enc.scenario={}",
            args.join(",")
        );
        if let Ok(filter) = std::env::var("ENC_LOG")
            && !filter.is_empty()
            && !filter.contains(char::is_whitespace)
        {
            let _ = write!(append, " enc.log={filter}");
        }
        let stdout = std::fs::File::create(&qemu_out)?;
        let start = Instant::now();
        let mut child = Command::new(&self.qemu)
            .args(["-machine", "q35", "-accel", &self.opts.accel, "-cpu", "max"])
            .args(["-smp", &self.opts.cpus.to_string()])
            .args(["-m", &self.opts.memory_mib.to_string()])
            .arg("-kernel")
            .arg(&self.kernel.vmlinuz)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", &append])
            .args(["-nodefaults", "-display", "none", "-vga", "none"])
            .args(["-monitor", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", log.display()))
            .stdin(Stdio::null())
            .stdout(stdout.try_clone()?)
            .stderr(stdout)
            .spawn()
            .with_context(|| format!("start {}", self.qemu.display()))?;

        let mut boot_time = None;
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if boot_time.is_none() && read_lossy(&log).contains(KERNEL_MARKER) {
                boot_time = Some(start.elapsed());
            }
            if start.elapsed() > self.opts.timeout {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "VM timed out after {:?} ({}; ENC_VM_TIMEOUT raises the limit); last console lines:\n{}",
                    self.opts.timeout,
                    if boot_time.is_some() {
                        "booted, scenario unfinished"
                    } else {
                        "never booted"
                    },
                    tail(&read_lossy(&log), 80)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let elapsed = start.elapsed();
        if let Some(keep) = std::env::var_os("ENC_VM_KEEP") {
            let keep = PathBuf::from(keep);
            let dst = keep.join(format!("{}.console.log", args.join("-")));
            match std::fs::create_dir_all(&keep).and_then(|()| std::fs::copy(&log, &dst)) {
                Ok(_) => eprintln!("vm: console log kept in {}", dst.display()),
                Err(e) => eprintln!("vm: cannot keep the console log in {}: {e}", dst.display()),
            }
        }
        let console = read_lossy(&log);
        let console = console.replace('\r', "");
        let qemu_text = read_lossy(&qemu_out);
        let qemu_said = if qemu_text.trim().is_empty() {
            String::new()
        } else {
            format!("qemu said: {}\n", qemu_text.trim())
        };
        let Some(kernel) = marker_value(&console, KERNEL_MARKER) else {
            bail!(
                "VM did not boot (qemu {status}; no {KERNEL_MARKER:?} line)\n{qemu_said}console:\n{}",
                tail(&console, 80)
            );
        };
        let Some(result) = marker_value(&console, RESULT_MARKER) else {
            bail!(
                "VM ended without a result (qemu {status}); the guest crashed or the scenario never finished\n{qemu_said}last console lines:\n{}",
                tail(&console, 80)
            );
        };
        let passed = result == "ok";
        let exit_code = result
            .strip_prefix("fail (exit ")
            .and_then(|r| r.strip_suffix(')'))
            .and_then(|c| c.parse().ok());
        let output = scenario_output(&console);
        let failed_modules = console
            .lines()
            .filter_map(|l| l.strip_prefix(MODULE_FAILED_MARKER))
            .map(|m| m.trim().to_owned())
            .collect();
        Ok(VmRun {
            scenario: args.iter().map(|a| (*a).to_owned()).collect(),
            kernel,
            output,
            passed,
            exit_code,
            failed_modules,
            boot_time: boot_time.unwrap_or(elapsed),
            elapsed,
            prepare_time,
            console,
        })
    }
}

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ABC[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn read_lossy(p: &Path) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = std::fs::File::open(p) {
        let _ = f.read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// The value of the first console line that starts with `marker` (kernel messages may share
/// the line's start; the marker is looked for anywhere in it).
fn marker_value(console: &str, marker: &str) -> Option<String> {
    console.lines().find_map(|l| {
        l.find(marker)
            .map(|at| l[at + marker.len()..].trim().to_owned())
    })
}

/// The lines between the scenario marker and the result marker.
fn scenario_output(console: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in console.lines() {
        if line.contains(RESULT_MARKER) {
            break;
        }
        if inside {
            out.push_str(line);
            out.push('\n');
        } else if line.contains(SCENARIO_MARKER) {
            inside = true;
        }
    }
    out
}

const BUSYBOX: &str = "/bin/busybox";

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Where initramfs pieces are cached: `<cache>/initramfs`, or a directory under the system's
/// temporary directory when the cache is not writable.
fn initramfs_cache(cache: &Path) -> PathBuf {
    let dir = cache.join("initramfs");
    if std::fs::create_dir_all(&dir).is_ok() && tempfile::tempfile_in(&dir).is_ok() {
        return dir;
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    std::env::temp_dir().join(format!("enc-vm-{uid}"))
}

/// One entry of a cpio archive.
#[derive(Clone, Debug, Hash)]
enum Node {
    Dir,
    /// A regular file copied from the host (with the host file's mode).
    File(PathBuf),
    /// A regular file with the given contents and mode.
    Data(Vec<u8>, u32),
    Symlink(String),
    CharDev(u32, u32),
}

/// An archive being assembled: guest paths (without the leading `/`) to their contents.
/// Sorted, so that every directory precedes what it holds.
#[derive(Debug, Default)]
struct Archive {
    entries: BTreeMap<String, Node>,
}

impl Archive {
    fn add(&mut self, path: &str, node: Node) {
        let path = path.trim_start_matches('/').to_owned();
        let mut parent = Path::new(&path).parent();
        while let Some(p) = parent {
            let s = p.to_string_lossy();
            if s.is_empty() {
                break;
            }
            self.entries.entry(s.into_owned()).or_insert(Node::Dir);
            parent = p.parent();
        }
        self.entries.insert(path, node);
    }

    /// A key over everything that goes into the archive: paths, contents given inline, and the
    /// size and modification time of each host file.
    fn key(&self) -> anyhow::Result<u64> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for (path, node) in &self.entries {
            path.hash(&mut h);
            node.hash(&mut h);
            if let Node::File(src) = node {
                let m =
                    std::fs::metadata(src).with_context(|| format!("stat {}", src.display()))?;
                m.len().hash(&mut h);
                m.modified()?
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .hash(&mut h);
            }
        }
        Ok(h.finish())
    }

    /// Writes the archive to `<dir>/<label>-<key>.cpio` unless it is there already; removes
    /// older archives of the same label.
    fn write_cached(&self, dir: &Path, label: &str) -> anyhow::Result<PathBuf> {
        let name = format!("{label}-{:016x}.cpio", self.key()?);
        let path = dir.join(&name);
        if !path.exists() {
            let tmp = tempfile::NamedTempFile::new_in(dir)?;
            {
                let mut w = BufWriter::new(tmp.as_file());
                write_newc(&self.entries, &mut w)
                    .with_context(|| format!("write initramfs piece {name}"))?;
                w.flush()?;
            }
            tmp.persist(&path)
                .with_context(|| format!("store {}", path.display()))?;
        }
        prune(dir, &format!("{label}-"), &name);
        Ok(path)
    }
}

/// Removes files in `dir` named `<prefix>*` other than `keep` that are over ten minutes old
/// (a concurrent run may still be about to read a recent one).
fn prune(dir: &Path, prefix: &str, keep: &str) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with(prefix) || name == keep {
            continue;
        }
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(600));
        if old {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Writes a newc ("070701") cpio archive, as the kernel's initramfs unpacker reads it.
fn write_newc(entries: &BTreeMap<String, Node>, w: &mut impl Write) -> anyhow::Result<()> {
    let mut written = 0u64;
    for (ino, (path, node)) in (1u32..).zip(entries) {
        let (mode, rdev, size) = match node {
            Node::Dir => (S_IFDIR | 0o755, (0, 0), 0),
            Node::File(src) => {
                use std::os::unix::fs::PermissionsExt as _;
                let m =
                    std::fs::metadata(src).with_context(|| format!("stat {}", src.display()))?;
                (S_IFREG | (m.permissions().mode() & 0o7777), (0, 0), m.len())
            }
            Node::Data(d, mode) => (S_IFREG | mode, (0, 0), d.len() as u64),
            Node::Symlink(t) => (S_IFLNK | 0o777, (0, 0), t.len() as u64),
            Node::CharDev(maj, min) => (S_IFCHR | 0o600, (*maj, *min), 0),
        };
        let size32 =
            u32::try_from(size).with_context(|| format!("{path} is too large for cpio"))?;
        written += write_header(w, ino, mode, size32, rdev, path)?;
        match node {
            Node::File(src) => {
                let f =
                    std::fs::File::open(src).with_context(|| format!("open {}", src.display()))?;
                let n = std::io::copy(&mut f.take(size), w)?;
                if n != size {
                    bail!("{} changed size while being archived", src.display());
                }
            }
            Node::Data(d, _) => w.write_all(d)?,
            Node::Symlink(t) => w.write_all(t.as_bytes())?,
            Node::Dir | Node::CharDev(..) => {}
        }
        written += size;
        written += pad(w, written, 4)?;
    }
    written += write_header(w, 0, 0, 0, (0, 0), "TRAILER!!!")?;
    // Whole 512-byte blocks, so that concatenated archives stay aligned.
    pad(w, written, 512)?;
    Ok(())
}

fn write_header(
    w: &mut impl Write,
    ino: u32,
    mode: u32,
    size: u32,
    rdev: (u32, u32),
    name: &str,
) -> anyhow::Result<u64> {
    let nlink = if mode & S_IFDIR == S_IFDIR { 2 } else { 1 };
    let namesize = name.len() + 1;
    let fields = [
        ino,
        mode,
        0,
        0,
        nlink,
        0,
        size,
        0,
        0,
        rdev.0,
        rdev.1,
        namesize as u32,
        0,
    ];
    let mut h = String::with_capacity(110);
    h.push_str("070701");
    for f in fields {
        let _ = write!(h, "{f:08X}");
    }
    w.write_all(h.as_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    let n = (h.len() + namesize) as u64;
    Ok(n + pad(w, n, 4)?)
}

/// Writes zeros up to the next multiple of `align` after `at` bytes; returns how many.
fn pad(w: &mut impl Write, at: u64, align: u64) -> anyhow::Result<u64> {
    let n = (align - at % align) % align;
    w.write_all(&vec![0; n as usize])?;
    Ok(n)
}

/// Where a host file goes in the guest, whose `/bin`, `/sbin`, `/lib` and `/lib64` are links
/// into `/usr`: the host path with its directory resolved, keeping the file name (a soname
/// link such as `libpcap.so.0.8` must keep its name).
fn guest_path(host: &Path) -> anyhow::Result<String> {
    let dir = host.parent().context("file without a directory")?;
    let name = host.file_name().context("path without a file name")?;
    let dir = std::fs::canonicalize(dir).with_context(|| format!("resolve {}", dir.display()))?;
    let full = dir.join(name);
    let s = full.to_string_lossy().trim_start_matches('/').to_owned();
    for top in ["bin/", "sbin/", "lib/", "lib64/"] {
        if s.starts_with(top) {
            return Ok(format!("usr/{s}"));
        }
    }
    Ok(s)
}

/// The shared libraries and loader `ldd` names for `bin` (none for a static binary).
fn shared_libs(bin: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context("run ldd (libc-bin)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if text.contains("not a dynamic executable")
            || String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable")
        {
            return Ok(vec![]);
        }
        bail!(
            "ldd {}: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut libs = vec![];
    for line in text.lines() {
        let line = line.trim();
        if line.contains("not found") {
            bail!("ldd {}: {line}", bin.display());
        }
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// Adds a host executable and its libraries at their guest paths; returns the guest paths of
/// the libraries.
fn add_with_libs(a: &mut Archive, host: &Path, guest: &str) -> anyhow::Result<Vec<String>> {
    a.add(guest, Node::File(host.to_owned()));
    let mut libs = vec![];
    for lib in shared_libs(host)? {
        let g = guest_path(&lib)?;
        a.add(&g, Node::File(lib));
        libs.push(g);
    }
    Ok(libs)
}

/// Module name as the kernel knows it: file stem with `-` as `_`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.trim_end_matches(".ko")
        .trim_end_matches(".ko.xz")
        .replace('-', "_")
}

/// The modules of [`MODULES`] and [`MODULE_DIRS`] and their dependencies, as `modules.dep` paths (relative to the
/// modules directory), and the filtered `modules.dep` lines.
fn module_closure(modules_dir: &Path) -> anyhow::Result<(Vec<String>, String)> {
    let dep_path = modules_dir.join("modules.dep");
    let dep = std::fs::read_to_string(&dep_path)
        .with_context(|| format!("read {}", dep_path.display()))?;
    let builtin = std::fs::read_to_string(modules_dir.join("modules.builtin")).unwrap_or_default();
    let builtin: BTreeSet<String> = builtin.lines().map(module_name).collect();
    let mut by_name: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    let mut lines: BTreeMap<String, String> = BTreeMap::new();
    for line in dep.lines() {
        let Some((path, deps)) = line.split_once(':') else {
            continue;
        };
        let deps = deps.split_whitespace().map(str::to_owned).collect();
        by_name.insert(module_name(path), (path.to_owned(), deps));
        lines.insert(path.to_owned(), line.to_owned());
    }
    let mut want: Vec<String> = MODULES.iter().map(|m| m.replace('-', "_")).collect();
    for path in lines.keys() {
        if MODULE_DIRS
            .iter()
            .any(|d| path.starts_with(&format!("{d}/")))
        {
            want.push(module_name(path));
        }
    }
    let mut paths = BTreeSet::new();
    while let Some(m) = want.pop() {
        match by_name.get(&m) {
            Some((path, deps)) => {
                if paths.insert(path.clone()) {
                    want.extend(deps.iter().map(|d| module_name(d)));
                }
            }
            None if builtin.contains(&m) => {}
            None => bail!(
                "module {m} is neither in {} nor built in",
                dep_path.display()
            ),
        }
    }
    let mut filtered = String::new();
    for p in &paths {
        if let Some(l) = lines.get(p) {
            filtered.push_str(l);
            filtered.push('\n');
        }
    }
    Ok((paths.into_iter().collect(), filtered))
}

/// Everything but the project's binaries: layout, busybox, `/init`, modules, host tools.
fn base_archive(kernel: &Kernel) -> anyhow::Result<Archive> {
    let mut a = Archive::default();
    for d in [
        "dev", "proc", "sys", "tmp", "run", "root", "mnt", "var/tmp", "usr/sbin",
    ] {
        a.add(d, Node::Dir);
    }
    for (link, target) in [
        ("bin", "usr/bin"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
        ("var/run", "../run"),
    ] {
        a.add(link, Node::Symlink(target.into()));
    }
    // The kernel opens /dev/console for /init before devtmpfs is mounted.
    a.add("dev/console", Node::CharDev(5, 1));
    a.add("init", Node::Data(INIT.as_bytes().to_vec(), 0o755));
    for (path, text) in ETC {
        a.add(path, Node::Data(text.as_bytes().to_vec(), 0o644));
    }

    // Host tools (they shadow busybox applets of the same name).
    let mut taken = BTreeSet::new();
    for tool in HOST_TOOLS {
        let host = which(tool).ok_or_else(|| {
            NotSetUp(format!(
                "{tool} not found on the host (it goes into the guest)"
            ))
        })?;
        let guest = guest_path(&host)?;
        add_with_libs(&mut a, &host, &guest)?;
        taken.insert((*tool).to_owned());
    }

    // busybox, with a link per applet.
    a.add("usr/bin/busybox", Node::File(PathBuf::from(BUSYBOX)));
    let list = Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .with_context(|| format!("run {BUSYBOX} --list"))?;
    for applet in String::from_utf8_lossy(&list.stdout).split_whitespace() {
        if !taken.contains(applet) && !applet.contains('/') && applet != "busybox" {
            a.add(
                &format!("usr/bin/{applet}"),
                Node::Symlink("busybox".into()),
            );
        }
    }
    // The kernel's request_module runs /sbin/modprobe.
    a.add("usr/sbin/modprobe", Node::Symlink("../bin/busybox".into()));

    // Modules and the depmod files busybox modprobe reads, filtered to what is included.
    let (paths, dep) = module_closure(&kernel.modules)?;
    let mdir = format!("usr/lib/modules/{}", kernel.version);
    let names: BTreeSet<String> = paths.iter().map(|p| module_name(p)).collect();
    for p in &paths {
        a.add(&format!("{mdir}/{p}"), Node::File(kernel.modules.join(p)));
    }
    a.add(
        &format!("{mdir}/modules.dep"),
        Node::Data(dep.into_bytes(), 0o644),
    );
    for f in ["modules.alias", "modules.symbols"] {
        let text = std::fs::read_to_string(kernel.modules.join(f)).unwrap_or_default();
        let kept: String = text
            .lines()
            .filter(|l| {
                l.split_whitespace()
                    .last()
                    .is_some_and(|m| names.contains(&m.replace('-', "_")))
            })
            .map(|l| format!("{l}\n"))
            .collect();
        a.add(&format!("{mdir}/{f}"), Node::Data(kept.into_bytes(), 0o644));
    }
    for f in ["modules.builtin", "modules.softdep"] {
        let p = kernel.modules.join(f);
        if p.exists() {
            a.add(&format!("{mdir}/{f}"), Node::File(p));
        }
    }
    let list: String = MODULES.iter().map(|m| format!("{m}\n")).collect();
    a.add("etc/enc-vm/modules", Node::Data(list.into_bytes(), 0o644));
    Ok(a)
}

/// The project's binaries (debug info stripped, cached in `<pieces>/bin`) in `/enc/bin`, with
/// the libraries the base archive lacks.
fn project_archive(
    bin_dir: &Path,
    pieces: &Path,
    base_libs: &BTreeSet<String>,
) -> anyhow::Result<Archive> {
    let mut a = Archive::default();
    let stripped_dir = pieces.join("bin");
    std::fs::create_dir_all(&stripped_dir)?;
    for b in PROJECT_BINS {
        let src = bin_dir.join(b);
        let stripped = stripped(&src, &stripped_dir, b)?;
        a.add(&format!("enc/bin/{b}"), Node::File(stripped));
        for lib in shared_libs(&src)? {
            let g = guest_path(&lib)?;
            if !base_libs.contains(&g) {
                a.add(&g, Node::File(lib));
            }
        }
    }
    Ok(a)
}

/// A copy of `src` without debug info (`strip --strip-debug`), cached by the source's size
/// and modification time; the source itself when `strip` is missing.
fn stripped(src: &Path, dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let m = std::fs::metadata(src).with_context(|| format!("stat {}", src.display()))?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    src.hash(&mut h);
    m.len().hash(&mut h);
    m.modified()?
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .hash(&mut h);
    let file = format!("{name}-{:016x}", h.finish());
    let out = dir.join(&file);
    if out.exists() {
        return Ok(out);
    }
    let tmp = dir.join(format!(".{file}.{}", std::process::id()));
    let st = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&tmp)
        .arg(src)
        .status();
    match st {
        Ok(s) if s.success() => {
            std::fs::rename(&tmp, &out).with_context(|| format!("store {}", out.display()))?;
            prune(dir, &format!("{name}-"), &file);
            Ok(out)
        }
        _ => {
            let _ = std::fs::remove_file(&tmp);
            Ok(src.to_owned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout_is_aligned_and_terminated() {
        let mut a = Archive::default();
        a.add("usr/bin/x", Node::Data(b"hello".to_vec(), 0o755));
        a.add("bin", Node::Symlink("usr/bin".into()));
        let mut out = Vec::new();
        write_newc(&a.entries, &mut out).unwrap();
        assert_eq!(out.len() % 512, 0);
        // Walk the headers: each starts 4-aligned with the newc magic; parents come first.
        let mut at = 0;
        let mut names = vec![];
        while at < out.len() && &out[at..at + 6] == b"070701" {
            let field = |i: usize| {
                let s = std::str::from_utf8(&out[at + 6 + i * 8..at + 14 + i * 8]).unwrap();
                usize::from_str_radix(s, 16).unwrap()
            };
            let (size, namesize) = (field(6), field(11));
            let name = &out[at + 110..at + 110 + namesize - 1];
            names.push(String::from_utf8(name.to_vec()).unwrap());
            let data = (at + 110 + namesize).next_multiple_of(4);
            at = (data + size).next_multiple_of(4);
        }
        assert_eq!(names, ["bin", "usr", "usr/bin", "usr/bin/x", "TRAILER!!!"]);
        assert!(out[at..].iter().all(|b| *b == 0));
    }

    #[test]
    fn markers_are_parsed() {
        let console = "boot\nENC-VM-KERNEL: 6.1.0-56-cloud-amd64\nENC-VM-SCENARIO: probe\nline 1\nenc-vm.backend: kernel\nENC-VM-RESULT: fail (exit 3)\n";
        assert_eq!(
            marker_value(console, KERNEL_MARKER).as_deref(),
            Some("6.1.0-56-cloud-amd64")
        );
        assert_eq!(scenario_output(console), "line 1\nenc-vm.backend: kernel\n");
        assert_eq!(
            marker_value(console, RESULT_MARKER).as_deref(),
            Some("fail (exit 3)")
        );
    }

    #[test]
    fn values_are_read_back() {
        let run = VmRun {
            scenario: vec!["probe".into()],
            kernel: "6.1.0-56-cloud-amd64".into(),
            output: "encryption:  wireguard via boringtun\nenc-vm.backend: kernel-wireguard\nenc-vm.tcx: absent\n".into(),
            passed: true,
            exit_code: None,
            failed_modules: vec![],
            boot_time: Duration::from_secs(4),
            elapsed: Duration::from_secs(11),
            prepare_time: Duration::ZERO,
            console: String::new(),
        };
        assert_eq!(run.values("backend"), ["kernel-wireguard"]);
        assert_eq!(run.values("tcx"), ["absent"]);
        assert!(run.values("encryption").is_empty());
        assert!(
            run.summary()
                .starts_with("vm: ran probe on kernel 6.1.0-56-cloud-amd64 in 11.0s")
        );
        assert!(run.check().is_ok());
    }

    #[test]
    fn base64_pads() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"ip -V\n"), "aXAgLVYK");
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert!(parse_duration("soon").is_err());
    }
}
