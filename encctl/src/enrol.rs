//! Enrolment with join tokens: `encctl token create|list`, `encctl cert request|sign`.

use std::fmt::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use enc_certs::{CertInfo, CsrFiles, NewToken, TokenInfo, TokenState, TokenStatus};
use serde::Serialize;
use time::OffsetDateTime;

use crate::output;

/// A join token given on the command line (or read from `@FILE`); `Debug` redacts it.
#[derive(Clone)]
pub struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    /// The token text: the argument itself, or the contents of FILE for `@FILE`.
    pub fn resolve(&self) -> anyhow::Result<String> {
        match self.0.strip_prefix('@') {
            Some(file) => std::fs::read_to_string(file)
                .with_context(|| format!("read join token from {file}")),
            None => Ok(self.0.clone()),
        }
    }
}

/// clap value parser of `--token`.
pub fn parse_secret(s: &str) -> Result<Secret, String> {
    if s.is_empty() || s == "@" {
        return Err("must be a join token or @FILE holding one".into());
    }
    Ok(Secret(s.to_owned()))
}

/// `encctl token create -o json`: the one time the secret is shown, with the details.
#[derive(Serialize)]
pub struct CreatedJson<'a> {
    /// The secret.
    pub token: &'a str,
    /// Its public details.
    #[serde(flatten)]
    pub info: &'a TokenInfo,
}

/// `encctl cert request -o json`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestedJson<'a> {
    /// The node name.
    pub node: &'a str,
    /// The addresses requested.
    pub ips: &'a [IpAddr],
    /// The private key file (0600).
    pub key: &'a Path,
    /// The request file (0644).
    pub csr: &'a Path,
}

/// `encctl cert sign -o json`: the certificate summary, its file and the token used.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SignedJson<'a> {
    /// The certificate file written.
    pub path: &'a Path,
    /// The join token used.
    pub token: &'a TokenInfo,
    /// The certificate's summary.
    #[serde(flatten)]
    pub cert: &'a CertInfo,
}

fn ips_text(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn ip_args(ips: &[IpAddr]) -> String {
    ips.iter().map(|ip| format!(" --ip {ip}")).collect()
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// `encctl token create` text: the secret (once), the details and the next steps.
pub fn created_text(new: &NewToken, ca: &Path) -> String {
    let i = &new.info;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "created join token {} for node {} (IPs {}), expires {}",
        i.id,
        i.node,
        ips_text(&i.ips),
        rfc3339(i.expires_at)
    );
    let _ = writeln!(
        s,
        "token (shown only now; it is stored as a hash and cannot be shown again; single use):"
    );
    let _ = writeln!(s, "  {}", new.secret);
    let _ = writeln!(s, "next steps:");
    let _ = writeln!(
        s,
        "  on {}:     encctl cert request --node {}{} --out DIR",
        i.node,
        i.node,
        ip_args(&i.ips)
    );
    let _ = writeln!(
        s,
        "  bring DIR/{}.csr back here (the key stays on the node), then:",
        i.node
    );
    let _ = writeln!(
        s,
        "  with the CA: encctl cert sign --ca {} --csr {}.csr --token @TOKEN_FILE --out DIR",
        ca.display(),
        i.node
    );
    s
}

/// `encctl token list` text: one row per token, never a secret.
pub fn list_text(tokens: &[TokenStatus]) -> String {
    if tokens.is_empty() {
        return "no join tokens\n".to_owned();
    }
    let rows: Vec<Vec<String>> = tokens
        .iter()
        .map(|t| {
            let state = match &t.state {
                TokenState::Unused => "unused".to_owned(),
                TokenState::Expired => "expired".to_owned(),
                TokenState::Used { used_at, serial } => match serial {
                    Some(serial) => format!("used {} (serial {serial})", rfc3339(*used_at)),
                    None => format!("used {}", rfc3339(*used_at)),
                },
            };
            vec![
                t.info.id.clone(),
                t.info.node.clone(),
                ips_text(&t.info.ips),
                rfc3339(t.info.created_at),
                rfc3339(t.info.expires_at),
                state,
            ]
        })
        .collect();
    output::table(&["ID", "NODE", "IPS", "CREATED", "EXPIRES", "STATE"], &rows)
}

/// `encctl cert request` text: the files and what to do with them.
pub fn requested_text(node: &str, files: &CsrFiles) -> String {
    format!(
        "created key and certificate signing request for {node}\n  private key: {} (mode 0600; stays on this node)\n  request:     {}\nsend the request and the join token to the CA operator for `encctl cert sign`; install the\nreturned {node}.crt next to the key\n",
        files.key_path.display(),
        files.csr_path.display(),
    )
}

/// `encctl cert sign` text: the file, the token used and the certificate summary.
pub fn signed_text(path: &Path, token: &TokenInfo, cert: &CertInfo) -> String {
    format!(
        "signed certificate for {} with join token {} (now used)\n  certificate: {}\n{}give {} and the CA certificate back to the node\n",
        token.node,
        token.id,
        path.display(),
        output::cert(cert),
        path.display()
    )
}

/// Arguments of `encctl cert sign`, resolved.
pub struct SignArgs {
    /// The CA directory.
    pub ca: PathBuf,
    /// The request file.
    pub csr: PathBuf,
    /// The join token.
    pub token: Secret,
    /// The certificate lifetime.
    pub lifetime: std::time::Duration,
    /// Where to write NODE.crt.
    pub out: PathBuf,
}

/// Runs `encctl cert sign`: returns the certificate file and what was signed.
pub fn sign(args: &SignArgs) -> anyhow::Result<(PathBuf, enc_certs::SignedNodeCert)> {
    let csr = std::fs::read_to_string(&args.csr)
        .with_context(|| format!("read certificate signing request {}", args.csr.display()))?;
    let token = args.token.resolve()?;
    enc_certs::sign_csr_to_dir(
        &args.ca,
        &csr,
        &token,
        args.lifetime,
        OffsetDateTime::now_utc(),
        &args.out,
    )
    .with_context(|| format!("sign {}", args.csr.display()))
}

/// Arguments of `encctl cert enrol`.
pub struct EnrolArgs {
    /// The issuer, `HOST:PORT`.
    pub issuer: String,
    /// The join token.
    pub token: Secret,
    /// The node name.
    pub node: String,
    /// The addresses to request.
    pub ips: Vec<IpAddr>,
    /// The CA bundle to verify the issuer with.
    pub ca_cert: PathBuf,
    /// Timeout of each step.
    pub timeout: std::time::Duration,
    /// Where to write the files.
    pub out: PathBuf,
}

/// What `encctl cert enrol` wrote.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Enrolled {
    /// The issuer.
    pub issuer: String,
    /// The private key file (0600).
    pub key: PathBuf,
    /// The certificate file.
    pub cert: PathBuf,
    /// The CA bundle file.
    pub ca: PathBuf,
    /// The certificate's summary.
    #[serde(flatten)]
    pub info: CertInfo,
}

impl Enrolled {
    /// `-o json`.
    pub fn json(&self) -> &Self {
        self
    }

    /// The text output.
    pub fn text(&self) -> String {
        format!(
            "enrolled {} with issuer {} (join token now used)\n  private key: {} (mode 0600; made here, never sent)\n  certificate: {}\n  CA bundle:   {}\n{}point the agent's tls.cert, tls.key and tls.ca at these files; with tls.renewal.issuer set it renews the certificate itself\n",
            self.info.dns_names.first().map_or("", String::as_str),
            self.issuer,
            self.key.display(),
            self.cert.display(),
            self.ca.display(),
            output::cert(&self.info),
        )
    }
}

/// Runs `encctl cert enrol`: makes the key and request here, sends the request and the
/// token to the issuer over TLS (verifying the issuer against `--ca-cert`), checks that the
/// answer is a certificate of that CA for this key and these names, and writes the files.
pub fn enrol_online(args: &EnrolArgs) -> anyhow::Result<Enrolled> {
    use enc_api::issuer::{IssuerRequest, IssuerResponse};
    enc_certs::validate_node_name(&args.node)?;
    let key = args.out.join(format!("{}.key", args.node));
    let cert = args.out.join(format!("{}.crt", args.node));
    let ca = args.out.join("ca.crt");
    for p in [&key, &cert, &ca] {
        if p.symlink_metadata().is_ok() {
            anyhow::bail!("refusing to overwrite existing file {}", p.display());
        }
    }
    let ca_pem = std::fs::read_to_string(&args.ca_cert)
        .with_context(|| format!("read --ca-cert {}", args.ca_cert.display()))?;
    let token = args.token.resolve()?;
    let csr = enc_certs::generate_csr(&args.node, &args.ips)?;
    let config = enc_certs::issuer_client_config(ca_pem.as_bytes(), None)
        .with_context(|| format!("--ca-cert {}", args.ca_cert.display()))?;
    let mut stream = enc_certs::connect_issuer(&args.issuer, config, args.timeout)?;
    let answer = enc_api::issuer::call(
        &mut stream,
        &IssuerRequest::Enrol {
            token: token.trim().to_owned(),
            csr: csr.csr_pem.clone(),
        },
    )
    .with_context(|| format!("issuer {}", args.issuer))?;
    let issued = match answer {
        IssuerResponse::Issued(i) => i,
        IssuerResponse::Refused { reason } => {
            anyhow::bail!("issuer {} refused the enrolment: {reason}", args.issuer)
        }
    };
    let bundle = if issued.ca.trim().is_empty() {
        ca_pem.clone()
    } else {
        issued.ca.clone()
    };
    // The certificate must be for this key, signed by the CA we trust, with our names.
    let id = enc_certs::NodeIdentity::from_pem(&issued.cert, &csr.key_pem, &ca_pem)
        .context("the issuer's certificate does not verify against --ca-cert and the new key")?;
    let info = id.info().clone();
    if info.dns_names != [args.node.clone()] || args.ips.iter().any(|ip| !info.ips.contains(ip)) {
        anyhow::bail!(
            "the issuer's certificate names {:?} {:?}, not what was requested",
            info.dns_names,
            info.ips
        );
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("create directory {}", args.out.display()))?;
    write_new(&key, &csr.key_pem, 0o600)?;
    write_new(&cert, &issued.cert, 0o644)?;
    write_new(&ca, &bundle, 0o644)?;
    Ok(Enrolled {
        issuer: args.issuer.clone(),
        key,
        cert,
        ca,
        info,
    })
}

fn write_new(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .and_then(|()| f.write_all(contents.as_bytes()))
        .and_then(|()| f.sync_all())
        .with_context(|| format!("write {}", path.display()))
}
