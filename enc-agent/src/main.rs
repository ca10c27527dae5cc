//! `enc-agent`: the enc node agent.

use anyhow::Context;
use clap::Parser;
use enc_agent::config::Config;
use std::path::PathBuf;
use tracing_subscriber::EnvFilter;

/// The enc node agent: authenticates peers with mutual TLS and encrypts pod traffic between
/// nodes.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (YAML).
    #[arg(long, env = "ENC_CONFIG")]
    config: PathBuf,
    /// Validate the configuration, print it (no key material) and exit.
    #[arg(long)]
    print_config: bool,
    /// Remove everything enc configured on this node (routes, rules, pinned eBPF programs
    /// and maps) and exit. A normal stop leaves the eBPF strict mode in place.
    #[arg(long, conflicts_with = "print_config")]
    cleanup: bool,
    /// Run only the issuer role, without a datapath (the chart's issuer Deployment): the
    /// config file is then a standalone issuer configuration (`issuer`, `serverName`,
    /// `serverAddress` or `serverAddressEnv`).
    #[arg(long, conflicts_with = "cleanup")]
    issuer_only: bool,
    /// Debug only: write every ESP SA, keys included, to FILE in Wireshark's esp_sa format so
    /// that captures can be decrypted. Never enable in production.
    #[arg(long, value_name = "FILE")]
    esp_sa_log: Option<PathBuf>,
    /// Log format.
    #[arg(long, env = "ENC_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("enc-agent: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    // netlink-packet-route warns about every attribute newer than itself; that is noise.
    let filter = EnvFilter::try_from_env("ENC_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let filter = filter.add_directive(
        "netlink_packet_route=error"
            .parse()
            .context("built-in log directive")?,
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }

    if args.issuer_only {
        let config = enc_agent::config::StandaloneIssuerConfig::load(&args.config)?;
        if args.print_config {
            print!("{}", config.to_yaml());
            return Ok(());
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("enc-issuer")
            .build()
            .context("start the async runtime")?;
        return runtime
            .block_on(enc_agent::issuer::run_standalone(config, shutdown_signal()))
            .context("enc-agent --issuer-only failed");
    }

    // Kubernetes discovery fills the node's name, address and pod CIDR from the downward API
    // and its Node object; a static configuration is read as it is.
    let config: Config = enc_agent::discovery::load_config(&args.config)?;
    if args.print_config {
        print!("{}", config.to_yaml());
        return Ok(());
    }
    if args.cleanup {
        return enc_agent::app::cleanup(&config).context("enc-agent --cleanup failed");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("enc-agent")
        .build()
        .context("start the async runtime")?;
    runtime.block_on(async {
        let opts = enc_agent::app::RunOptions {
            esp_sa_log: args.esp_sa_log.clone(),
        };
        enc_agent::app::run(config, opts, shutdown_signal())
            .await
            .context("enc-agent failed")
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the agent can still be stopped by SIGKILL; run until then.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
