//! `encctl`: the enc command-line tool.
//!
//! A thin client: certificate commands call `enc-certs`, status commands read the agent's
//! status API on its Unix socket. No command prints key material.

mod client;
mod output;
mod rotate;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
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
                Output::Text => print!("{}", output::status(&status)),
            }
        }
        Command::Peers(opts) => {
            let peers: enc_api::Peers = client::get(&opts.socket, enc_api::PEERS_PATH)?;
            match opts.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&peers)?),
                Output::Text => print!("{}", output::peers(&peers.peers)),
            }
        }
        Command::Rotate(args) => rotate(args)?,
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
        Command::Cert(CertCommand::Inspect { file, output }) => {
            let info = enc_certs::inspect_file(&file)
                .with_context(|| format!("inspect {}", file.display()))?;
            emit(output, &info, || output::cert(&info))?;
        }
    }
    Ok(())
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
        Output::Text => print!("{}", text()),
    }
    Ok(())
}
