//! Network namespaces owned by a test, deleted on drop.

use crate::sys;
use anyhow::{Context, bail};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::thread::JoinHandle;

/// A named network namespace (`ip netns`), deleted with everything in it when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace with loopback up. Fails if it already exists.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        if name.len() > 64 {
            bail!("namespace name {name:?} too long");
        }
        sys::run(&["ip", "netns", "add", name])?;
        let ns = Self {
            name: name.to_owned(),
        };
        sys::run_in(name, &["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs a command in the namespace.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        sys::run_in(&self.name, args)
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.run(&["sysctl", "-qw", &format!("{key}={value}")])
            .map(|_| ())
    }

    /// Runs `f` on a new thread that has entered this namespace, and returns its result.
    /// Sockets created there stay in the namespace.
    pub fn enter<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        self.spawn(f)?
            .join()
            .map_err(|_| anyhow::anyhow!("thread in namespace {} panicked", self.name))?
    }

    /// Starts `f` on a new thread that enters this namespace first, without waiting for it.
    /// The thread's result is an error if it could not enter the namespace; sockets created
    /// there stay in the namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<JoinHandle<anyhow::Result<T>>> {
        let path = format!("/var/run/netns/{}", self.name);
        let file = File::open(&path).with_context(|| format!("open {path}"))?;
        std::thread::Builder::new()
            .name(format!("netns-{}", self.name))
            .spawn(move || -> anyhow::Result<T> {
                // SAFETY: setns on a valid namespace fd affects only the calling thread (network
                // namespaces are per-thread); the fd outlives the call.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    bail!("setns({path}): {}", std::io::Error::last_os_error());
                }
                Ok(f())
            })
            .with_context(|| format!("spawn a thread for namespace {}", self.name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Kill what still runs inside, then delete; errors are reported, not fatal.
        if let Ok(out) = sys::output(&["ip", "netns", "pids", &self.name]) {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = sys::output(&["kill", "-9", pid]);
            }
        }
        if let Err(e) = sys::run(&["ip", "netns", "del", &self.name]) {
            eprintln!("warning: cannot delete namespace {}: {e:#}", self.name);
        }
    }
}
