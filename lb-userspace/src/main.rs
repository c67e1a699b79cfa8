//! `lb`: the load balancer daemon and the commands that talk to it.
use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
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
    Stop(Client),
    /// Re-read the daemon's config file and apply what changed (like SIGHUP).
    Reload(Client),
    /// Check a config file without touching anything.
    Validate {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show the services, their backends and their health.
    Status(Client),
    /// Add, remove, drain or re-weight a backend.
    Backends {
        #[command(subcommand)]
        cmd: BackendCmd,
    },
}

#[derive(Args, Clone)]
struct Client {
    /// Base URL of the admin API.
    #[arg(long, default_value = "http://127.0.0.1:9180", env = "LB_API")]
    api: String,
    /// Deprecated: a token on the command line shows in `ps`; use
    /// --token-file or LB_TOKEN.
    #[arg(long, hide = true)]
    token: Option<String>,
    /// File holding the admin token (mode 0600, owned by root or you); or
    /// set LB_TOKEN.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum BackendCmd {
    /// Add a backend to a service.
    Add {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 100)]
        weight: u16,
    },
    /// Remove a backend from a service.
    Remove {
        #[command(flatten)]
        target: Target,
    },
    /// Stop sending new flows to a backend; its open flows finish.
    Drain {
        #[command(flatten)]
        target: Target,
    },
    /// Put a drained or disabled backend back in service.
    Activate {
        #[command(flatten)]
        target: Target,
    },
    /// Change a backend's weight (0..=65535).
    Weight {
        #[command(flatten)]
        target: Target,
        weight: u16,
    },
}

#[derive(Args)]
struct Target {
    /// Service name.
    #[arg(long, short)]
    service: String,
    /// Backend address, e.g. 127.0.0.1:8001.
    address: String,
    #[command(flatten)]
    client: Client,
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
        Cmd::Status(client) => status(&client),
        Cmd::Stop(client) => stop(&client),
        Cmd::Reload(client) => reload(&client),
        Cmd::Backends { cmd } => backends(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: Config, opts: RunOptions) -> Result<()> {
    // Idle admin connections and many health checks must not exhaust
    // descriptors.
    match admin::raise_nofile() {
        Ok((before, after)) if after > before => {
            info!(before, after, "raised the open-file limit")
        }
        Ok(_) => {}
        Err(e) => warn!("cannot raise the open-file limit: {e}"),
    }
    let notifier = Notifier::from_env();
    let listen = config.admin.listen;
    let cannot_listen = || format!("admin API cannot listen on {listen}; nothing was attached");
    // Bound before anything is attached: a port in use fails fast. And
    // before the capabilities go: a port below 1024 needs one.
    let socket = admin_socket(listen).with_context(cannot_listen)?;
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
        let listener = socket.listen(1024).with_context(cannot_listen)?;
        // Handled from here on: a SIGHUP while starting must not end the
        // daemon (the default action); it reloads once started.
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
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
        if !listen.ip().is_loopback() && daemon.token().is_none() {
            warn!(%listen, "the admin API listens beyond loopback without a token: anyone who reaches it can change the balancer; set admin.token_file");
        }
        info!(%listen, "admin API and /metrics listening");
        notifier.ready(&format!("serving; admin API on {listen}"));
        let notifier = std::sync::Arc::new(notifier);
        let mut tasks = vec![tokio::spawn(reloads(daemon.clone(), notifier.clone(), hup))];
        if let Some(every) = notify::watchdog_interval()
            && notifier.enabled()
        {
            tasks.push(tokio::spawn(watchdog(daemon.clone(), notifier.clone(), every)));
        }
        let detach = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let signal = {
            let (daemon, detach) = (daemon.clone(), detach.clone());
            async move {
                use tokio::signal::unix::{SignalKind, signal};
                let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => info!("SIGINT: leaving the data plane running for the next daemon"),
                    _ = term.recv() => info!("SIGTERM: leaving the data plane running for the next daemon"),
                    _ = daemon.stop_requested() => {
                        info!("lb stop: detaching the data plane");
                        detach.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                }
            }
        };
        admin::serve(
            listener,
            api::router(daemon.clone()),
            config.admin.limits,
            signal,
        )
        .await;
        notifier.stopping();
        for t in tasks {
            t.abort();
        }
        let detach = detach.load(std::sync::atomic::Ordering::SeqCst);
        daemon.shutdown(!detach).await;
        Ok(())
    })
}

/// The admin socket, bound; `listen` (inside the runtime) with a backlog
/// deep enough for bursts of clients.
fn admin_socket(listen: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
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

impl Client {
    fn token(&self) -> Result<Option<String>> {
        if let Some(p) = &self.token_file {
            return Ok(Some(read_token(p)?));
        }
        if let Some(t) = std::env::var("LB_TOKEN").ok().filter(|t| !t.is_empty()) {
            return Ok(Some(t));
        }
        if let Some(t) = &self.token {
            eprintln!(
                "warning: --token is deprecated (the token shows in `ps`); use --token-file or LB_TOKEN"
            );
            return Ok(Some(t.clone()));
        }
        Ok(None)
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let url = format!("{}/api/v1{path}", self.api.trim_end_matches('/'));
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(10)))
            .build()
            .into();
        let auth = self.token()?.map(|t| format!("Bearer {t}"));
        let mut resp = match (method, body) {
            ("GET", _) => agent.get(&url).call(),
            (m, Some(b)) => {
                let mut req = match m {
                    "POST" => agent.post(&url),
                    "PUT" => agent.put(&url),
                    _ => agent.patch(&url),
                };
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                req.send_json(b)
            }
            (_, None) => {
                let mut req = agent.delete(&url);
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                req.call()
            }
        }
        .with_context(|| format!("cannot reach the admin API at {}", self.api))?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        let value: serde_json::Value =
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        if status >= 400 {
            let msg = value["error"].as_str().unwrap_or(text.trim());
            bail!("{method} {path}: {status}: {msg}");
        }
        Ok(value)
    }
}

fn read_token(p: &Path) -> Result<String> {
    lb_userspace::files::read_secret(p).with_context(|| format!("token file {}", p.display()))
}

fn stop(client: &Client) -> Result<()> {
    let v = client.call("POST", "/stop", Some(serde_json::json!({})))?;
    println!("{}", v["status"].as_str().unwrap_or("stopping"));
    // Done when the API is gone (the daemon exits after detaching).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while std::time::Instant::now() < deadline {
        if client.call("GET", "/healthz", None).is_err() {
            println!("stopped");
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    bail!("the daemon still answers 15 s after `lb stop`")
}

fn reload(client: &Client) -> Result<()> {
    let v = client.call("POST", "/reload", Some(serde_json::json!({})))?;
    if v["applied"].as_bool() == Some(true) {
        println!("config reloaded: services changed and applied");
    } else {
        println!("config reloaded: services unchanged");
    }
    for d in v["dropped_changes"].as_array().into_iter().flatten() {
        println!(
            "API change dropped (the config changed since it was made): {}",
            d.as_str().unwrap_or("?")
        );
    }
    for n in v["needs_restart"].as_array().into_iter().flatten() {
        println!("note: {}", n.as_str().unwrap_or("?"));
    }
    Ok(())
}

fn status(client: &Client) -> Result<()> {
    if let Ok(st) = client.call("GET", "/status", None) {
        println!(
            "config {} (services {}), state file {}",
            st["config"].as_str().unwrap_or("?"),
            if st["api_changes"].as_bool() == Some(true) {
                "with API changes"
            } else {
                "as in the file"
            },
            st["state_file"].as_str().unwrap_or("?"),
        );
        if st["pins_outlive_daemon"].as_bool() == Some(false) {
            println!(
                "WARNING: the pins die with the daemon; restarts are not hitless (see the log)"
            );
        }
        if let Some(e) = st["last_reload_error"].as_str() {
            println!("last reload failed: {e}");
        }
        for d in st["dropped_changes"].as_array().into_iter().flatten() {
            println!(
                "API change dropped (the config changed since it was made): {}",
                d.as_str().unwrap_or("?")
            );
        }
    }
    let services = client.call("GET", "/services", None)?;
    for s in services.as_array().into_iter().flatten() {
        println!(
            "{} {} {} ({})",
            s["name"].as_str().unwrap_or("?"),
            s["listen"].as_str().unwrap_or("?"),
            s["protocols"]
                .as_array()
                .map(|p| p
                    .iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join("+"))
                .unwrap_or_default(),
            s["forwarding"].as_str().unwrap_or("?"),
        );
        if s["fail_open"].as_bool() == Some(true) {
            println!(
                "  FAIL-OPEN: every backend failed its health checks; the last ones keep taking                  flows (when_all_down = keep_last)"
            );
        }
        for b in s["backends"].as_array().into_iter().flatten() {
            println!(
                "  {:<28} weight {:>5}  {:<9} {}{}",
                b["address"].as_str().unwrap_or("?"),
                b["weight"],
                b["state"].as_str().unwrap_or("?"),
                if b["healthy"].as_bool() == Some(true) {
                    "healthy"
                } else {
                    "UNHEALTHY"
                },
                b["last_error"]
                    .as_str()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default(),
            );
        }
    }
    Ok(())
}

fn backends(cmd: BackendCmd) -> Result<()> {
    let path = |t: &Target| format!("/services/{}/backends/{}", t.service, t.address);
    let (t, result) = match &cmd {
        BackendCmd::Add { target, weight } => (
            target,
            target.client.call(
                "POST",
                &format!("/services/{}/backends", target.service),
                Some(serde_json::json!({"address": target.address, "weight": weight})),
            ),
        ),
        BackendCmd::Remove { target } => {
            (target, target.client.call("DELETE", &path(target), None))
        }
        BackendCmd::Drain { target } => (
            target,
            target.client.call(
                "PATCH",
                &path(target),
                Some(serde_json::json!({"state": "draining"})),
            ),
        ),
        BackendCmd::Activate { target } => (
            target,
            target.client.call(
                "PATCH",
                &path(target),
                Some(serde_json::json!({"state": "active"})),
            ),
        ),
        BackendCmd::Weight { target, weight } => (
            target,
            target.client.call(
                "PATCH",
                &path(target),
                Some(serde_json::json!({"weight": weight})),
            ),
        ),
    };
    result?;
    println!("{} {}: done", t.service, t.address);
    Ok(())
}
