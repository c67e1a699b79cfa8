//! `lb`: the load balancer daemon and the commands that talk to it.
use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use lb_userspace::{
    admin, api,
    config::Config,
    daemon::{Daemon, RunOptions, StartError},
    notify::{self, Notifier},
    privs,
};
use tracing::{error, info, warn};

#[derive(Parser)]
#[command(name = "lb", version, about = "XDP load balancer for port 443")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Attach to the interface and serve the configured services and the admin API.
    ///
    /// SIGTERM and Ctrl-C end the daemon but leave the data plane attached
    /// and pinned, so traffic keeps flowing and the next `lb run` adopts it;
    /// `lb stop` removes it. SIGHUP (or `lb reload`) re-reads the config.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Interface to attach to, instead of dataplane.interface.
        #[arg(long)]
        iface: Option<String>,
        /// Ignore the state file (changes made through the API) and start
        /// from the config file's services.
        #[arg(long)]
        reset_state: bool,
        /// Deprecated, does nothing: SIGTERM/Ctrl-C always leave the data
        /// plane attached and pinned for the next `lb run`; `lb stop`
        /// removes it.
        #[arg(long, hide = true)]
        keep_dataplane: bool,
    },
    /// Detach the data plane, remove its pins and end the daemon (SIGTERM
    /// instead leaves traffic flowing for the next `lb run`).
    Stop(ctl::Client),
    /// Re-read the daemon's config file and apply what changed (like SIGHUP).
    Reload(ctl::Client),
    /// Check a config file without touching anything.
    Validate {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show the daemon, the services, their backends and their health.
    Status {
        #[command(flatten)]
        client: ctl::Client,
        #[command(flatten)]
        out: ctl::Output,
    },
    /// List, show, add or remove services.
    Services {
        #[command(subcommand)]
        cmd: ctl::ServiceCmd,
    },
    /// List, add, remove, drain, disable, activate or re-weight backends.
    Backends {
        #[command(subcommand)]
        cmd: ctl::BackendCmd,
    },
    /// Print a shell completion script (e.g. `lb completions bash >
    /// /etc/bash_completion.d/lb`).
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff) of lb and its commands.
    Man,
}

mod ctl;

/// `lb man`: the page of `lb`, then one section per command.
fn man() -> Result<()> {
    let cmd = Cli::command();
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut out)?;
    out.extend_from_slice(
        b".SH \"EXIT STATUS\"\n0 done; 1 error (the daemon refused or failed the request); 2 bad \
          input (arguments, an invalid config, or the API answered 400, 404, 409 or 413); 3 the \
          daemon cannot be reached.\n",
    );
    for sub in cmd.get_subcommands() {
        let name = format!("lb-{}", sub.get_name());
        clap_mangen::Man::new(sub.clone().name(name)).render(&mut out)?;
    }
    use std::io::Write;
    std::io::stdout().write_all(&out)?;
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Validate { config } => match Config::load(&config) {
            Ok(c) => {
                for w in &c.warnings {
                    eprintln!("warning: {w}");
                }
                println!(
                    "{}: valid ({} services, {} backends)",
                    config.display(),
                    c.services.len(),
                    c.services.iter().map(|s| s.backends.len()).sum::<usize>()
                );
                Ok(())
            }
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(2);
            }
        },
        Cmd::Run {
            config,
            iface,
            reset_state,
            keep_dataplane,
        } => {
            let cfg = match Config::load(&config) {
                Ok(c) => {
                    for w in &c.warnings {
                        warn!("{w}");
                    }
                    c
                }
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            if keep_dataplane {
                warn!(
                    "--keep-dataplane is deprecated and does nothing: SIGTERM and Ctrl-C always \
                     leave the data plane running for the next `lb run`; `lb stop` removes it"
                );
            }
            let r = run(
                cfg,
                RunOptions {
                    interface: iface,
                    reset_state,
                },
            );
            if let Err(e) = &r
                && matches!(e.downcast_ref::<StartError>(), Some(StartError::Locked(_)))
            {
                eprintln!("lb: {e:#}");
                return ExitCode::from(2);
            }
            r
        }
        Cmd::Status { client, out } => ctl::status(&client, &out),
        Cmd::Stop(client) => ctl::stop(&client),
        Cmd::Reload(client) => ctl::reload(&client),
        Cmd::Services { cmd } => ctl::services(cmd),
        Cmd::Backends { cmd } => ctl::backends(cmd),
        Cmd::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "lb", &mut script);
            std::io::Write::write_all(&mut std::io::stdout(), &script).map_err(Into::into)
        }
        Cmd::Man => man(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb: {e:#}");
            ExitCode::from(ctl::exit_code(&e))
        }
    }
}

fn run(config: Config, opts: RunOptions) -> Result<()> {
    // Idle admin connections and many health checks must not exhaust
    // descriptors.
    match admin::raise_nofile() {
        Ok((before, after)) if after > before => {
            info!(before, after, "raised the open-file limit");
        }
        Ok(_) => {}
        Err(e) => warn!("cannot raise the open-file limit: {e}"),
    }
    let notifier = Notifier::from_env();
    let listen = config.admin.listen;
    let cannot_listen = || format!("admin API cannot listen on {listen}; nothing was attached");
    let cannot_serve = || {
        format!(
            "admin socket {}: cannot serve it; nothing was attached",
            config.admin.socket.display()
        )
    };
    // Bound before anything is attached: a port in use fails fast. And
    // before the capabilities go: a port below 1024 needs one.
    let tcp = admin_tcp_socket(listen).with_context(cannot_listen)?;
    let unix_socket = admin::AdminSocket::bind(&config.admin.socket).with_context(cannot_serve)?;
    // Loading and attaching need more than the running daemon keeps; the
    // loader thread keeps it all and ends after. Every other thread is
    // started after the drop below and inherits the small set.
    let loader = privs::Loader::spawn().context("starting the loader thread")?;
    let keep = privs::drop_to_needed().context("dropping capabilities; nothing was attached")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tcp.listen(1024).with_context(cannot_listen)?;
        let unix = unix_socket.tokio().with_context(cannot_serve)?;
        // Handled from here on: a SIGHUP while starting must not end the
        // daemon (the default action); it reloads once started. SIGTERM and
        // SIGINT too: while starting they end the daemon through the
        // shutdown path, never by the default action.
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .context("installing the SIGINT handler")?;
        let prepared = {
            let (config, opts) = (config.clone(), opts.clone());
            loader
                .run(move || Daemon::prepare(&config, &opts))
                .await?
        };
        let daemon = Daemon::finish(&config, prepared).await?;
        privs::check_all_threads(keep).context(
            "a thread holds capabilities it should have dropped; the data plane stays attached \
             and pinned for the next `lb run`",
        )?;
        info!(kept = %privs::names(keep), "capabilities dropped: every other one is gone from all sets of every thread, and no_new_privs is set");
        info!(
            %listen,
            socket = %unix_socket.path().display(),
            tcp = if daemon.token().is_some() {
                "admin and read with tokens"
            } else if daemon.read_token().is_some() {
                "read with a token, no changes"
            } else {
                "read only, no token"
            },
            "admin API and /metrics listening"
        );
        notifier.ready(&format!(
            "serving; admin API on {listen} and {}",
            unix_socket.path().display()
        ));
        let notifier = std::sync::Arc::new(notifier);
        let mut tasks = vec![tokio::spawn(reloads(daemon.clone(), notifier.clone(), hup))];
        if let Some(every) = notify::watchdog_interval()
            && notifier.enabled()
        {
            tasks.push(tokio::spawn(watchdog(daemon.clone(), notifier.clone(), every)));
        }
        let detach = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (done_tx, done) = tokio::sync::watch::channel(false);
        let signal = {
            let (daemon, detach) = (daemon.clone(), detach.clone());
            async move {
                tokio::select! {
                    _ = int.recv() => info!("SIGINT: leaving the data plane running for the next daemon"),
                    _ = term.recv() => info!("SIGTERM: leaving the data plane running for the next daemon"),
                    _ = daemon.stop_requested() => {
                        info!("lb stop: detaching the data plane");
                        detach.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                }
                let _ = done_tx.send(true);
            }
        };
        let ended = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|d| *d).await;
        };
        let router = api::router(daemon.clone());
        tokio::join!(
            signal,
            admin::serve(&listener, router.clone(), config.admin.limits, ended(done.clone())),
            admin::serve(&unix, router, config.admin.limits, ended(done)),
        );
        drop(unix_socket);
        notifier.stopping();
        for t in tasks {
            t.abort();
        }
        let detach = detach.load(std::sync::atomic::Ordering::SeqCst);
        daemon.shutdown(!detach).await;
        Ok(())
    })
}

/// The admin API's TCP socket, bound; `listen` (inside the runtime) with a backlog
/// deep enough for bursts of clients.
fn admin_tcp_socket(listen: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
    let sock = if listen.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(listen)?;
    Ok(sock)
}

/// SIGHUP: re-read the config and apply it, telling systemd around it.
async fn reloads(
    daemon: Daemon,
    notifier: std::sync::Arc<Notifier>,
    hup: std::io::Result<tokio::signal::unix::Signal>,
) {
    let Ok(mut hup) = hup else {
        warn!("cannot handle SIGHUP; reload with `lb reload` instead");
        return;
    };
    while hup.recv().await.is_some() {
        info!("SIGHUP: reloading the config");
        notifier.reloading();
        match daemon.reload().await {
            Ok(r) => {
                info!(
                    applied = r.applied,
                    dropped = r.dropped_changes.len(),
                    "config reloaded"
                );
                for n in &r.needs_restart {
                    warn!("{n}");
                }
            }
            Err(e) => error!("{e}"),
        }
        notifier.ready("serving; config reloaded");
    }
}

/// Feeds the systemd watchdog while the daemon's loops are alive.
async fn watchdog(daemon: Daemon, notifier: std::sync::Arc<Notifier>, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        if daemon.alive(every).await {
            notifier.watchdog();
        } else {
            warn!("a daemon loop is dead or stuck; not feeding the systemd watchdog");
        }
    }
}
