//! Running commands, with errors that carry the command line and its output.

use anyhow::{Context, bail};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Runs a command and fails with its stderr if it exits non-zero.
pub fn run(args: &[&str]) -> anyhow::Result<Output> {
    let out = output(args)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(out)
}

/// Runs a command and returns its output whatever the exit status.
pub fn output(args: &[&str]) -> anyhow::Result<Output> {
    let (prog, rest) = args.split_first().context("empty command")?;
    Command::new(prog)
        .args(rest)
        .output()
        .with_context(|| format!("cannot run `{}` (is it installed?)", args.join(" ")))
}

/// Runs a command inside a network namespace.
pub fn run_in(ns: &str, args: &[&str]) -> anyhow::Result<Output> {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    run(&full)
}

/// Runs a command inside a network namespace, whatever its exit status.
pub fn output_in(ns: &str, args: &[&str]) -> anyhow::Result<Output> {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    output(&full)
}

/// Polls `f` until it returns `Ok(Some(v))` or `timeout` passes; the error names `what` and
/// the last reason `f` gave.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    let mut last = String::from("condition never became true");
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if start.elapsed() >= timeout {
            bail!("timed out after {timeout:?} waiting for {what}: {last}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
