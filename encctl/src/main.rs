//! `encctl`: the enc command-line tool.
//!
//! A thin client: certificate commands call `enc-certs`, status commands read the agent's
//! status API on its Unix socket. No command prints key material; a join token is printed
//! once, by `encctl token create`.

mod client;
mod enrol;
mod output;
mod revoke;
mod rotate;

use anyhow::{Context, bail};
use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Command-line tool of enc: cluster CA, node certificates, agent status and peers.
#[derive(Debug, Parser)]
#[command(name = "encctl", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options shared by the commands that talk to an agent.
#[derive(Debug, Args)]
struct AgentOpts {
    /// The agent's status socket.
    #[arg(long, env = "ENC_SOCKET", default_value = enc_api::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: Output,
}

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Human-readable text.
    Text,
    /// JSON, as the API returns it.
    Json,
    /// Text with more columns (`encctl peers`: certificate serial, issuer, expiry, time
    /// since the last successful authentication, failures and the last failure's reason);
    /// other commands print their usual text.
    Wide,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// This node's status: identity, datapath, peer counts.
    Status(AgentOpts),
    /// One row per expected peer: authentication state, certificate, keys, rotation, counters.
    Peers(AgentOpts),
    /// Rotate the keys with every authenticated peer (or one), optionally waiting until the
    /// old keys are retired.
    Rotate(RotateArgs),
    /// The cluster certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Node certificates.
    #[command(subcommand)]
    Cert(CertCommand),
    /// One-time join tokens: let a node enrol with its own key (`encctl cert request` on the
    /// node, `encctl cert sign` here) without the CA key ever leaving this machine.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Revoke node certificates: add them to the CA-signed revocation list DIR/crl.pem.
    Revoke(RevokeArgs),
    /// Certificate revocation lists.
    #[command(subcommand)]
    Crl(CrlCommand),
    /// The agent's audit log: authentications, key installs, rotations, revocations.
    Events(EventsArgs),
}

/// Arguments of `encctl events`.
#[derive(Debug, Args)]
struct EventsArgs {
    /// Keep reading: print new events as they are logged, until interrupted.
    #[arg(short = 'f', long)]
    follow: bool,
    /// Only events after this sequence number.
    #[arg(long, value_name = "SEQ", default_value_t = 0)]
    after: u64,
    /// Only events about this peer.
    #[arg(long, value_name = "NAME", value_parser = parse_peer)]
    peer: Option<String>,
    #[command(flatten)]
    agent: AgentOpts,
}

/// Arguments of `encctl revoke`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("what").required(true).multiple(true).args(["serials", "nodes"])))]
struct RevokeArgs {
    /// Directory holding ca.crt, ca.key and the issuance ledger issued.jsonl.
    #[arg(long)]
    ca: PathBuf,
    /// Serial to revoke, hex with or without colons (repeat for several).
    #[arg(long = "serial", value_name = "S", value_parser = parse_serial)]
    serials: Vec<String>,
    /// Revoke every certificate the issuance ledger lists for this node (repeat for several).
    #[arg(long = "node", value_name = "NAME")]
    nodes: Vec<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: Output,
}

fn parse_serial(s: &str) -> Result<String, String> {
    enc_certs::parse_serial(s).map_err(|e| e.to_string())
}

#[derive(Debug, Subcommand)]
enum CrlCommand {
    /// Show a revocation list: issuer, number, this/next update, revoked serials.
    Inspect {
        /// CRL file (PEM or DER).
        file: PathBuf,
        /// Verify the list's signature against this CA certificate file (PEM).
        #[arg(long, value_name = "CA_CERT_FILE")]
        ca: Option<PathBuf>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Give a revocation list to an agent: it verifies the CA signature, keeps the list if it
    /// is newer than its own (persisted across restarts), tears down the keys of every peer
    /// it revokes, and passes it to every peer over the control channel.
    Push {
        /// CRL file (PEM), as `encctl revoke` writes it.
        file: PathBuf,
        #[command(flatten)]
        agent: AgentOpts,
    },
}

/// `encctl crl inspect -o json`: the list's summary and whether its signature was checked.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct CrlInspect<'a> {
    #[serde(flatten)]
    crl: &'a enc_certs::CrlInfo,
    signature_verified: bool,
}

/// Arguments of `encctl rotate`.
#[derive(Debug, Args)]
struct RotateArgs {
    /// Rotate only with this peer (node name); every authenticated peer when absent.
    #[arg(long, value_name = "NAME", value_parser = parse_peer)]
    peer: Option<String>,
    /// Wait until every rotation is complete (old keys retired), printing each step.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits (e.g. 30s, 2m).
    #[arg(long, value_name = "D", default_value = "60s", value_parser = parse_timeout, requires = "wait")]
    timeout: Duration,
    #[command(flatten)]
    agent: AgentOpts,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a single-use join token for one node and its addresses; prints the token once.
    Create {
        /// Directory holding ca.crt and ca.key; the token's hash goes to DIR/tokens.jsonl.
        #[arg(long)]
        ca: PathBuf,
        /// Node name the certificate will carry (lowercase DNS name).
        #[arg(long)]
        node: String,
        /// Address the node may request (repeat for several).
        #[arg(long = "ip", required = true)]
        ips: Vec<IpAddr>,
        /// How long the token can be used (1m to 30d, e.g. 15m, 2h, 7d).
        #[arg(long, value_name = "D", default_value = "1h", value_parser = parse_ttl)]
        ttl: Duration,
        /// Output format (json includes the token).
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// List the join tokens of a CA: id, node, IPs, created, expires, state (never the token).
    List {
        /// Directory holding the CA and DIR/tokens.jsonl.
        #[arg(long)]
        ca: PathBuf,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = parse_timeout(s)?;
    if !(enc_certs::MIN_TOKEN_TTL..=enc_certs::MAX_TOKEN_TTL).contains(&d) {
        return Err("must be between 1m and 30d".into());
    }
    Ok(d)
}

fn parse_lifetime(s: &str) -> Result<Duration, String> {
    let d = parse_timeout(s)?;
    if d < enc_certs::MIN_CERT_LIFETIME {
        return Err(format!(
            "must be at least {}",
            humantime::format_duration(enc_certs::MIN_CERT_LIFETIME)
        ));
    }
    Ok(d)
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{e} (expected a duration such as 30s, 2m or 1h)"))?;
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(d)
}

fn parse_peer(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("must not be empty (it names a peer node)".into());
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("a node name has no whitespace".into());
    }
    Ok(s.to_owned())
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Create a cluster CA: DIR/ca.crt and DIR/ca.key (mode 0600).
    Init {
        /// Directory to write to (created if missing; existing CA files are never overwritten).
        #[arg(long)]
        out: PathBuf,
        /// Common name of the CA.
        #[arg(long, default_value = "enc cluster CA")]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
enum CertCommand {
    /// Issue a node certificate whose SANs are the node name and its IPs.
    Issue {
        /// Directory holding ca.crt and ca.key.
        #[arg(long)]
        ca: PathBuf,
        /// Node name (lowercase DNS name).
        #[arg(long)]
        node: String,
        /// Node address (repeat for several).
        #[arg(long = "ip", required = true)]
        ips: Vec<IpAddr>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Directory to write NODE.crt and NODE.key (mode 0600) to.
        #[arg(long)]
        out: PathBuf,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// On a node: create its private key NODE.key (mode 0600) and a certificate signing
    /// request NODE.csr for the CA operator to sign with a join token (`encctl cert sign`).
    Request {
        /// Node name (lowercase DNS name), as the join token names it.
        #[arg(long)]
        node: String,
        /// Node address (repeat for several; each must be allowed by the token).
        #[arg(long = "ip", required = true)]
        ips: Vec<IpAddr>,
        /// Directory to write NODE.key and NODE.csr to (an existing key is never overwritten).
        #[arg(long)]
        out: PathBuf,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// With the CA: sign a node's certificate signing request, using up its join token. The
    /// request must name exactly the token's node and some of its addresses.
    Sign {
        /// Directory holding ca.crt, ca.key and tokens.jsonl.
        #[arg(long)]
        ca: PathBuf,
        /// The request file (NODE.csr from `encctl cert request`).
        #[arg(long)]
        csr: PathBuf,
        /// The join token, or @FILE holding it (preferred: keeps it out of shell history).
        #[arg(long, value_name = "TOKEN_OR_@FILE", env = "ENC_JOIN_TOKEN", hide_env_values = true, value_parser = enrol::parse_secret)]
        token: enrol::Secret,
        /// Certificate lifetime (e.g. 24h, 7d; capped at the CA's expiry).
        #[arg(long, value_name = "D", default_value = "24h", value_parser = parse_lifetime)]
        lifetime: Duration,
        /// Directory to write NODE.crt to.
        #[arg(long)]
        out: PathBuf,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// On a new node: enrol online with an issuer (an agent in the issuer role) using a join
    /// token. The key is made here and never sent; writes NODE.key (0600), NODE.crt and the
    /// issuer's CA bundle ca.crt to OUT.
    Enrol {
        /// The issuer, HOST:PORT (HOST must be an IP SAN or DNS SAN of its certificate).
        #[arg(long, value_name = "HOST:PORT")]
        issuer: String,
        /// The join token, or @FILE holding it (preferred: keeps it out of shell history).
        #[arg(long, value_name = "TOKEN_OR_@FILE", env = "ENC_JOIN_TOKEN", hide_env_values = true, value_parser = enrol::parse_secret)]
        token: enrol::Secret,
        /// Node name (lowercase DNS name), as the join token names it.
        #[arg(long)]
        node: String,
        /// Node address (repeat for several; each must be allowed by the token).
        #[arg(long = "ip", required = true)]
        ips: Vec<IpAddr>,
        /// The cluster CA certificate, obtained out of band: the issuer must present a
        /// certificate it signed.
        #[arg(long, value_name = "FILE")]
        ca_cert: PathBuf,
        /// Timeout of each step (connect, handshake, answer).
        #[arg(long, value_name = "D", default_value = "10s", value_parser = parse_timeout)]
        timeout: Duration,
        /// Directory to write NODE.key, NODE.crt and ca.crt to (existing files are never
        /// overwritten).
        #[arg(long)]
        out: PathBuf,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Show a certificate: subject, SANs, serial, issuer, validity, fingerprint.
    Inspect {
        /// Certificate file (PEM or DER).
        file: PathBuf,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("encctl: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Status(opts) => {
            let status: enc_api::Status = client::get(&opts.socket, enc_api::STATUS_PATH)?;
            match opts.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&status)?),
                Output::Text | Output::Wide => print!("{}", output::status(&status)),
            }
        }
        Command::Peers(opts) => {
            let peers: enc_api::Peers = client::get(&opts.socket, enc_api::PEERS_PATH)?;
            match opts.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&peers)?),
                Output::Text => print!("{}", output::peers(&peers.peers)),
                Output::Wide => print!("{}", output::peers_wide(&peers.peers)),
            }
        }
        Command::Rotate(args) => rotate(args)?,
        Command::Events(args) => events(&args)?,
        Command::Crl(CrlCommand::Push { file, agent }) => crl_push(&file, &agent)?,
        Command::Ca(CaCommand::Init {
            out,
            name,
            days,
            output,
        }) => {
            if days == 0 {
                bail!("--days must be at least 1 (got 0)");
            }
            let info = enc_certs::init_ca(
                &out,
                &enc_certs::CaOptions {
                    common_name: name,
                    days,
                },
            )
            .with_context(|| format!("create CA in {}", out.display()))?;
            emit(output, &info, || {
                format!(
                    "created CA {:?} in {}\n  certificate: {}\n  private key: {} (mode 0600; keep it off the nodes)\n",
                    info.subject,
                    out.display(),
                    out.join("ca.crt").display(),
                    out.join("ca.key").display()
                )
            })?;
        }
        Command::Cert(CertCommand::Issue {
            ca,
            node,
            ips,
            days,
            out,
            output,
        }) => {
            let req = enc_certs::NodeCertRequest {
                node: node.clone(),
                ips,
                days,
            };
            let info = enc_certs::issue_node_cert(&ca, &req, &out)
                .with_context(|| format!("issue certificate for node {node:?}"))?;
            emit(output, &info, || {
                format!(
                    "issued certificate for {node}\n  certificate: {}\n  private key: {} (mode 0600)\n{}",
                    out.join(format!("{node}.crt")).display(),
                    out.join(format!("{node}.key")).display(),
                    output::cert(&info)
                )
            })?;
        }
        Command::Cert(CertCommand::Request {
            node,
            ips,
            out,
            output,
        }) => {
            let files = enc_certs::request_node_cert(&node, &ips, &out)
                .with_context(|| format!("create key and request for node {node:?}"))?;
            let json = enrol::RequestedJson {
                node: &node,
                ips: &ips,
                key: &files.key_path,
                csr: &files.csr_path,
            };
            emit(output, &json, || enrol::requested_text(&node, &files))?;
        }
        Command::Cert(CertCommand::Enrol {
            issuer,
            token,
            node,
            ips,
            ca_cert,
            timeout,
            out,
            output,
        }) => {
            let done = enrol::enrol_online(&enrol::EnrolArgs {
                issuer,
                token,
                node,
                ips,
                ca_cert,
                timeout,
                out,
            })?;
            emit(output, &done.json(), || done.text())?;
        }
        Command::Cert(CertCommand::Sign {
            ca,
            csr,
            token,
            lifetime,
            out,
            output,
        }) => {
            let (path, signed) = enrol::sign(&enrol::SignArgs {
                ca,
                csr,
                token,
                lifetime,
                out,
            })?;
            let json = enrol::SignedJson {
                path: &path,
                token: &signed.token,
                cert: &signed.info,
            };
            emit(output, &json, || {
                enrol::signed_text(&path, &signed.token, &signed.info)
            })?;
        }
        Command::Token(TokenCommand::Create {
            ca,
            node,
            ips,
            ttl,
            output,
        }) => {
            let new = enc_certs::create_token(
                &ca,
                &enc_certs::TokenRequest {
                    node: node.clone(),
                    ips,
                    ttl,
                },
                time::OffsetDateTime::now_utc(),
            )
            .with_context(|| format!("create join token for node {node:?}"))?;
            let json = enrol::CreatedJson {
                token: &new.secret,
                info: &new.info,
            };
            emit(output, &json, || enrol::created_text(&new, &ca))?;
        }
        Command::Token(TokenCommand::List { ca, output }) => {
            let tokens = enc_certs::list_tokens(&ca, time::OffsetDateTime::now_utc())
                .with_context(|| format!("list join tokens of the CA in {}", ca.display()))?;
            emit(output, &tokens, || enrol::list_text(&tokens))?;
        }
        Command::Cert(CertCommand::Inspect { file, output }) => {
            let info = enc_certs::inspect_file(&file)
                .with_context(|| format!("inspect {}", file.display()))?;
            emit(output, &info, || output::cert(&info))?;
        }
        Command::Revoke(RevokeArgs {
            ca,
            serials,
            nodes,
            output,
        }) => {
            let out = enc_certs::revoke(&ca, &enc_certs::RevokeRequest { serials, nodes })
                .with_context(|| format!("revoke certificates of the CA in {}", ca.display()))?;
            emit(output, &out, || {
                // Only annotates serials with node names; the revocation is done.
                let ledger = enc_certs::read_ledger(&ca).unwrap_or_default();
                revoke::outcome_text(&out, &ledger)
            })?;
        }
        Command::Crl(CrlCommand::Inspect { file, ca, output }) => {
            let context = || format!("inspect {}", file.display());
            let info = match &ca {
                Some(ca_file) => {
                    let cas = enc_certs::read_pem_certs(ca_file).with_context(context)?;
                    enc_certs::RevocationList::load(&file, &cas)
                        .with_context(context)?
                        .info()
                        .clone()
                }
                None => enc_certs::inspect_crl_file(&file).with_context(context)?,
            };
            let json = CrlInspect {
                crl: &info,
                signature_verified: ca.is_some(),
            };
            emit(output, &json, || {
                revoke::crl_text(&info, ca.as_deref(), time::OffsetDateTime::now_utc())
            })?;
        }
    }
    Ok(())
}

fn crl_push(file: &std::path::Path, agent: &AgentOpts) -> anyhow::Result<()> {
    let pem = std::fs::read_to_string(file)
        .with_context(|| format!("read revocation list {}", file.display()))?;
    let client = client::Client::new(&agent.socket)?;
    let resp: enc_api::CrlPushed = client
        .post(enc_api::CRL_PATH, &enc_api::CrlPush { pem })
        .with_context(|| format!("push {} to the agent", file.display()))?;
    emit(agent.output, &resp, || {
        let what = match resp.outcome.as_str() {
            "adopted" => format!(
                "adopted revocation list {}: persisted, applied and passed on to every peer",
                resp.number
            ),
            "same" => format!("the agent already holds revocation list {}", resp.number),
            _ => format!(
                "the agent holds a newer revocation list ({}) than {}; nothing changed",
                resp.held, resp.number
            ),
        };
        let peers = if resp.revoked_peers.is_empty() {
            "no expected peer's current certificate is revoked".to_owned()
        } else {
            format!("revoked peers: {}", resp.revoked_peers.join(", "))
        };
        format!("{what}\n{peers}\n")
    })
}

fn events(args: &EventsArgs) -> anyhow::Result<()> {
    let client = client::Client::new(&args.agent.socket)?;
    let mut after = args.after;
    loop {
        let batch: Vec<enc_api::Event> = client.get(&format!(
            "{}?after={after}&limit=1000",
            enc_api::EVENTS_PATH
        ))?;
        let full = batch.len() == 1000;
        for e in &batch {
            after = after.max(e.seq);
            if args
                .peer
                .as_ref()
                .is_some_and(|p| e.peer.as_ref() != Some(p))
            {
                continue;
            }
            match args.agent.output {
                Output::Json => println!("{}", serde_json::to_string(e)?),
                Output::Text | Output::Wide => println!("{}", output::event(e)),
            }
        }
        if full {
            continue;
        }
        if !args.follow {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn rotate(args: RotateArgs) -> anyhow::Result<()> {
    let client = client::Client::new(&args.agent.socket)?;
    let started = Instant::now();
    let resp: enc_api::RotateResponse = client.post(
        enc_api::ROTATE_PATH,
        &enc_api::RotateRequest {
            peer: args.peer.clone(),
        },
    )?;
    let json = args.agent.output == Output::Json;
    if !args.wait {
        return emit(args.agent.output, &resp, || rotate::started_text(&resp));
    }
    if !json {
        print!("{}", rotate::started_text(&resp));
    }
    rotate::wait(&client, &resp, args.timeout, json, started)
}

fn emit<T: serde::Serialize>(
    output: Output,
    value: &T,
    text: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Text | Output::Wide => print!("{}", text()),
    }
    Ok(())
}
