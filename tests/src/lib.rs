//! Network-namespace test harness of enc.
//!
//! Builds a lab of real `enc-agent` processes: an underlay namespace holding a bridge, one
//! namespace per node attached to it by a veth, and pod namespaces behind each node's pod
//! bridge. Everything lives in namespaces that the harness creates and deletes itself; the
//! host's own network namespace is never touched. Used by the integration tests in `tests/`
//! and by the `enc-lab` demo.

pub mod lab;
pub mod netns;
pub mod offload_check;
pub mod pcap;
pub mod scenarios;
pub mod sys;
pub mod traffic;
pub mod vm;

/// Checks that a privileged test can run. Root is needed; without it the test fails under
/// `CI=true` (it must never pass silently there) and is reported as skipped elsewhere.
/// Returns `false` when the caller should return early.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "{test}: privileged test needs root (euid {euid}) and CI is set: failing instead of skipping"
        );
    }
    eprintln!("SKIPPED {test}: needs root (euid {euid})");
    false
}
