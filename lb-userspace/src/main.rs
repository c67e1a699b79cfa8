//! `lb`: the load balancer daemon and its command line.
use std::{net::SocketAddr, process::ExitCode};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use lb_userspace::dataplane::{
    AttachMode, BackendSpec, Dataplane, Forwarding, MapWriter, Options, Protocol, ServiceSpec,
};

#[derive(Parser)]
#[command(name = "lb", version, about = "XDP load balancer for port 443")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Auto,
    Native,
    Skb,
}

#[derive(Subcommand)]
enum Cmd {
    /// Attach to an interface and balance one service over local ports.
    Run {
        /// Interface to attach the XDP and TC programs to.
        #[arg(long)]
        iface: String,
        #[arg(long, value_enum, default_value = "auto")]
        xdp_mode: Mode,
        /// Service address; 0.0.0.0 or :: means any local address.
        #[arg(long, default_value = "0.0.0.0:443")]
        listen: SocketAddr,
        /// A backend on this host, e.g. 127.0.0.1:8001 (repeat the flag).
        #[arg(long = "backend", required = true)]
        backends: Vec<SocketAddr>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Run {
            iface,
            xdp_mode,
            listen,
            backends,
        } => {
            let mode = match xdp_mode {
                Mode::Auto => AttachMode::Auto,
                Mode::Native => AttachMode::Native,
                Mode::Skb => AttachMode::Skb,
            };
            let mut dp = Dataplane::load(Options::default())?;
            dp.attach(&iface, mode)
                .with_context(|| format!("attaching to {iface}"))?;
            let mut writer = MapWriter::new(dp);
            writer.apply(&[ServiceSpec {
                name: "default".into(),
                listen,
                protocols: vec![Protocol::Tcp, Protocol::Udp],
                forwarding: Forwarding::Local,
                backends: backends.iter().map(|b| BackendSpec::new(*b, 100)).collect(),
            }])?;
            tracing::info!(%listen, backends = backends.len(), "balancing; Ctrl-C to stop");
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(shutdown_signal());
            tracing::info!("detaching");
            drop(writer);
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
