//! The audit event log: an append-only JSON-lines file of everything that touches trust and
//! keys (authentication, key installs and switches, rotations, revocations, renewals), with
//! node names and reasons and never key material. `encctl events` reads it through the status
//! API.
//!
//! Each event is one line, written with `O_APPEND` and flushed before [`EventLog::record`]
//! returns, so a crash loses at most the event being written and never garbles earlier ones.
//! Sequence numbers continue across restarts: on open, the last line's `seq` is read back.

use enc_api::{Event, EventKind};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use time::OffsetDateTime;

/// How many recent events the API serves from memory; older ones stay in the file.
const MEMORY: usize = 10_000;

/// The audit log of one agent.
#[derive(Debug)]
pub struct EventLog {
    node: String,
    path: PathBuf,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    file: Option<File>,
    next_seq: u64,
    recent: VecDeque<Event>,
    /// Write failures since the last success (logged once per streak).
    failing: bool,
}

/// What a new event says, besides its kind.
#[derive(Clone, Debug, Default)]
pub struct Detail {
    /// The peer concerned.
    pub peer: Option<String>,
    /// The key epoch concerned.
    pub epoch: Option<u32>,
    /// The certificate serial concerned.
    pub serial: Option<String>,
    /// Reason or detail, in words.
    pub detail: String,
}

impl Detail {
    /// An event about `peer`, with `detail`.
    pub fn peer(peer: &str, detail: impl Into<String>) -> Self {
        Self {
            peer: Some(peer.to_owned()),
            detail: detail.into(),
            ..Self::default()
        }
    }

    /// Sets the epoch.
    #[must_use]
    pub fn epoch(mut self, epoch: u32) -> Self {
        self.epoch = Some(epoch);
        self
    }

    /// Sets the serial.
    #[must_use]
    pub fn serial(mut self, serial: impl Into<String>) -> Self {
        self.serial = Some(serial.into());
        self
    }
}

impl EventLog {
    /// Opens (creating it and its directory if needed, mode 0640) the log at `path` and reads
    /// back the recent events and the next sequence number. A last line cut short by a crash
    /// is skipped; any other unreadable line is skipped with a warning naming its number.
    pub fn open(path: &Path, node: &str) -> Result<Self, crate::Error> {
        let err = |what: &str| crate::Error::io(format!("event log {}: {what}", path.display()));
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err("create its directory"))?;
        }
        let mut recent = VecDeque::new();
        let mut last_seq = 0;
        match File::open(path) {
            Ok(f) => {
                for (i, line) in BufReader::new(f).lines().enumerate() {
                    let line = line.map_err(err("read"))?;
                    if line.trim().is_empty() {
                        continue;
                    }
                    match serde_json::from_str::<Event>(&line) {
                        Ok(e) => {
                            last_seq = last_seq.max(e.seq);
                            if recent.len() == MEMORY {
                                recent.pop_front();
                            }
                            recent.push_back(e);
                        }
                        Err(e) => tracing::warn!(
                            path = %path.display(),
                            line = i + 1,
                            error = %e,
                            "skipping an unreadable event log line"
                        ),
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err("read")(e)),
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(path)
            .map_err(err("open for appending"))?;
        Ok(Self {
            node: node.to_owned(),
            path: path.to_owned(),
            inner: Mutex::new(Inner {
                file: Some(file),
                next_seq: last_seq + 1,
                recent,
                failing: false,
            }),
        })
    }

    /// A log that keeps events in memory only (tests).
    pub fn in_memory(node: &str) -> Self {
        Self {
            node: node.to_owned(),
            path: PathBuf::new(),
            inner: Mutex::new(Inner {
                file: None,
                next_seq: 1,
                recent: VecDeque::new(),
                failing: false,
            }),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends an event now. A write failure is logged (once per streak of failures) and does
    /// not stop the agent; the event is still served from memory.
    pub fn record(&self, kind: EventKind, d: Detail) -> Event {
        self.record_at(kind, d, OffsetDateTime::now_utc())
    }

    fn record_at(&self, kind: EventKind, d: Detail, at: OffsetDateTime) -> Event {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let event = Event {
            seq: inner.next_seq,
            time: at
                .replace_nanosecond(at.nanosecond() / 1_000_000 * 1_000_000)
                .unwrap_or(at)
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_else(|_| at.to_string()),
            node: self.node.clone(),
            kind,
            peer: d.peer,
            epoch: d.epoch,
            serial: d.serial,
            detail: d.detail,
        };
        inner.next_seq += 1;
        let written = match (&mut inner.file, serde_json::to_string(&event)) {
            (Some(f), Ok(mut line)) => {
                line.push('\n');
                f.write_all(line.as_bytes()).and_then(|()| f.flush())
            }
            (None, _) => Ok(()),
            (_, Err(e)) => Err(std::io::Error::other(e)),
        };
        match written {
            Ok(()) => inner.failing = false,
            Err(e) if !inner.failing => {
                inner.failing = true;
                tracing::error!(path = %self.path.display(), error = %e, "cannot append to the event log");
            }
            Err(_) => {}
        }
        if inner.recent.len() == MEMORY {
            inner.recent.pop_front();
        }
        inner.recent.push_back(event.clone());
        event
    }

    /// Events with a sequence number above `after`, oldest first, at most `limit`.
    pub fn since(&self, after: u64, limit: usize) -> Vec<Event> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner
            .recent
            .iter()
            .filter(|e| e.seq > after)
            .take(limit)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_lines_and_continues_the_sequence_after_a_reopen() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("state/events.jsonl");
        let log = EventLog::open(&path, "node-1").unwrap();
        log.record(EventKind::AgentStart, Detail::default());
        log.record(
            EventKind::AuthFailure,
            Detail::peer("node-2", "certificate expired at 2026-01-01T00:00:00Z"),
        );
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text.contains(r#""kind":"auth-failure""#), "{text}");
        assert!(text.contains(r#""peer":"node-2""#), "{text}");
        // A crash mid-line leaves a torn last line: skipped, the sequence goes on.
        std::fs::write(&path, format!("{text}{{\"seq\":3,\"ti")).unwrap();
        let log = EventLog::open(&path, "node-1").unwrap();
        assert_eq!(log.since(0, 100).len(), 2);
        let e = log.record(EventKind::AgentStart, Detail::default());
        assert_eq!(e.seq, 3);
        assert_eq!(log.since(2, 100).len(), 1);
        assert_eq!(log.since(0, 1)[0].seq, 1);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o640);
    }

    #[test]
    fn an_unopenable_log_names_the_path() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let err = EventLog::open(&file.join("events.jsonl"), "n").unwrap_err();
        assert!(err.to_string().contains("events.jsonl"), "{err}");
    }
}
