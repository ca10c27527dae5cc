//! Opt-in SA log in Wireshark's ESP SA table format, so that captures can be decrypted.
//!
//! **Debug only: this writes key material, on purpose, and only when asked.** Nothing in this
//! crate opens an [`SaLog`] by itself; an operator who enables it (for one node, for a
//! debugging session) gets a file that lets anyone who reads it decrypt the node's traffic.
//! The file is created with mode 0600 (and an existing file is narrowed to 0600).
//!
//! Each line is one row of Wireshark's `esp_sa` user access table (the `esp_sa` file in a
//! Wireshark profile directory, Preferences > Protocols > ESP > ESP SAs), whose columns are:
//! protocol (`IPv4`/`IPv6`), source address, destination address, SPI, encryption algorithm,
//! encryption key, authentication algorithm, authentication key. For RFC 4106 the
//! encryption key is the AES key followed by the 4-byte salt; GCM has no separate
//! authentication, so the authentication algorithm is `NULL` with an empty key:
//!
//! ```text
//! "IPv4","192.0.2.1","192.0.2.2","0x0000abcd","AES-GCM with 16 octet ICV [RFC4106]","0x<key><salt>","NULL",""
//! ```
//!
//! Wireshark's table has no extended-sequence-number column: it authenticates with a 32-bit
//! sequence number, so it decrypts our packets but may mark their ICV as incorrect.

use crate::{Error, Result, SaKeys};
use std::fmt::Write as _;
use std::fs::{File, OpenOptions, Permissions};
use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Wireshark's name of RFC 4106 AES-GCM with a 16-byte ICV.
pub const WIRESHARK_AES_GCM_16: &str = "AES-GCM with 16 octet ICV [RFC4106]";

/// An append-only file of ESP SAs in Wireshark's `esp_sa` format. Debug only: see the
/// [module docs](self).
#[derive(Debug)]
pub struct SaLog {
    path: PathBuf,
    file: File,
}

impl SaLog {
    /// Opens `path` for appending, creating it with mode 0600 if needed (and setting 0600 on
    /// an existing file).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let syscall = |call, source| Error::Syscall {
            call,
            target: path.display().to_string(),
            source,
        };
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| syscall("open", e))?;
        file.set_permissions(Permissions::from_mode(0o600))
            .map_err(|e| syscall("fchmod", e))?;
        Ok(SaLog { path, file })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends the SA from `src` to `dst` (outer addresses) with `keys`, as one line. The two
    /// addresses must be of the same family.
    pub fn record(&mut self, src: IpAddr, dst: IpAddr, keys: &SaKeys) -> Result<()> {
        let line = Zeroizing::new(line(src, dst, keys)?);
        self.file
            .write_all(line.as_bytes())
            .map_err(|source| Error::Syscall {
                call: "write",
                target: self.path.display().to_string(),
                source,
            })
    }
}

/// One `esp_sa` row, newline included.
fn line(src: IpAddr, dst: IpAddr, keys: &SaKeys) -> Result<String> {
    let family = match (src, dst) {
        (IpAddr::V4(_), IpAddr::V4(_)) => "IPv4",
        (IpAddr::V6(_), IpAddr::V6(_)) => "IPv6",
        _ => {
            return Err(Error::Invalid {
                field: "SA log addresses",
                value: format!("{src} -> {dst}"),
                reason: "source and destination are of different families".to_owned(),
            });
        }
    };
    let mut s = String::with_capacity(200);
    // Writing to a String cannot fail.
    let _ = write!(
        s,
        "\"{family}\",\"{src}\",\"{dst}\",\"{:#010x}\",\"{WIRESHARK_AES_GCM_16}\",\"0x",
        keys.spi
    );
    for b in keys.key.iter().chain(&keys.salt) {
        let _ = write!(s, "{b:02x}");
    }
    s.push_str("\",\"NULL\",\"\"\n");
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn keys() -> SaKeys {
        let mut key = [0u8; 32];
        for (i, b) in key.iter_mut().enumerate() {
            *b = i as u8;
        }
        SaKeys {
            spi: 0xabcd,
            key,
            salt: [0xde, 0xad, 0xbe, 0xef],
        }
    }

    #[test]
    fn ipv4_line() {
        let l = line(
            Ipv4Addr::new(192, 0, 2, 1).into(),
            Ipv4Addr::new(192, 0, 2, 2).into(),
            &keys(),
        )
        .unwrap();
        assert_eq!(
            l,
            "\"IPv4\",\"192.0.2.1\",\"192.0.2.2\",\"0x0000abcd\",\
             \"AES-GCM with 16 octet ICV [RFC4106]\",\
             \"0x000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1fdeadbeef\",\
             \"NULL\",\"\"\n"
        );
    }

    #[test]
    fn ipv6_line_and_mixed_families() {
        let a: IpAddr = "2001:db8::1".parse::<Ipv6Addr>().unwrap().into();
        let b: IpAddr = "2001:db8::2".parse::<Ipv6Addr>().unwrap().into();
        let l = line(a, b, &keys()).unwrap();
        assert!(l.starts_with("\"IPv6\",\"2001:db8::1\",\"2001:db8::2\",\"0x0000abcd\","));
        assert!(line(a, Ipv4Addr::LOCALHOST.into(), &keys()).is_err());
    }

    #[test]
    fn file_is_0600_and_appended() {
        let dir = std::env::temp_dir().join(format!("enc-sa-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("esp_sa");
        let _ = std::fs::remove_file(&path);
        std::fs::write(&path, "").unwrap();
        std::fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
        let src: IpAddr = Ipv4Addr::new(10, 0, 0, 1).into();
        let dst: IpAddr = Ipv4Addr::new(10, 0, 0, 2).into();
        {
            let mut log = SaLog::open(&path).unwrap();
            log.record(src, dst, &keys()).unwrap();
        }
        let mut log = SaLog::open(&path).unwrap();
        log.record(dst, src, &keys()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("\"IPv4\",\"10.0.0.1\",\"10.0.0.2\""));
        assert!(lines[1].starts_with("\"IPv4\",\"10.0.0.2\",\"10.0.0.1\""));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn fresh_file_is_created_0600() {
        let path = std::env::temp_dir().join(format!("enc-sa-log-new-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        SaLog::open(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_file(&path).unwrap();
    }
}
