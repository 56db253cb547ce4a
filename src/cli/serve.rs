//! `credbroker serve [--dev]`: start the listeners, reload on SIGHUP, drain on SIGTERM/SIGINT.
//! [`start`] is the library entry the tests use: it binds everything and returns handles.

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::AdminState;
use crate::audit::{AuditLog, AuditOptions, Event, Record};
use crate::broker::Broker;
use crate::config::Config;
use crate::server::{self, ListenerLimits, Role};
use crate::state::StateStore;
use crate::token::SigningKeys;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Zero-setup demo: ephemeral key, plain HTTP on 127.0.0.1:8080, a built-in demo upstream.
    #[arg(long)]
    pub dev: bool,
}

/// A running broker: its bound addresses and the way to stop it.
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub broker: Arc<Broker>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, drains in-flight requests (up to `request_timeout`), writes the
    /// `shutdown` record and flushes the audit log. False when the `shutdown` record could not
    /// be written (a full disk): the log does not say the broker stopped cleanly, and the
    /// exit status says so too.
    pub async fn shutdown(self) -> bool {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        // A credential mint its calls stopped waiting for still writes its record; the
        // `shutdown` record must follow it. Bounded as the mint is.
        if !self
            .broker
            .audit
            .await_promised(crate::credential::MINT_TIMEOUT)
            .await
        {
            tracing::warn!("a credential mint still running is not waited for any longer: its credential_refreshed record may be missing");
        }
        // Deferred admin changes the drained calls made in Redis are recorded before `shutdown`
        // (they left the journal when made).
        crate::admin::audit_replayed(&self.broker).await;
        // Connections still open past the drain budget were stopped by the listeners, their
        // `proxy_result` records written; the extra workers stop now, and `shutdown` is then
        // the log's last record.
        // Both block (joining worker threads, waiting for the last write): off this runtime's
        // thread, which must stay free to act on a second stop signal if they never end.
        let broker = self.broker;
        let tail = tokio::task::spawn_blocking(move || {
            crate::workers::shutdown();
            match broker.audit.close_with(Record::new(Event::Shutdown)) {
                Ok(_) => true,
                Err(e) => {
                    tracing::error!(error = %e, "cannot write the shutdown audit record");
                    false
                }
            }
        });
        tail.await.unwrap_or_else(|_| {
            tracing::error!("the end of the shutdown failed");
            false
        })
    }

    /// Resolves when `shutdown` was asked for (for the signal handler loop).
    pub fn stopper(&self) -> watch::Sender<bool> {
        self.stop.clone()
    }
}

pub fn run(args: ServeArgs, config: &super::ConfigPath) -> anyhow::Result<ExitCode> {
    init_tracing();
    // The demo runs on its embedded config: a file named alongside would be ignored, and the
    // operator would believe it in force.
    anyhow::ensure!(
        !(args.dev && config.explicit),
        "--dev runs the built-in demo config and does not read --config; drop one of them"
    );
    let config_path = config.path.as_path();
    // Worker 0 of the pool (crate::workers): listeners, admin, reloads and signals run here
    // too, next to the connections it is handed.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        crate::workers::install(crate::workers::default_count())
            .context("cannot start the worker runtimes")?;
        // Before anything is bound or said: a supervisor may stop the broker as soon as it
        // reads "listening on", and a signal with no handler yet would kill the process
        // without its drain and `shutdown` record.
        let mut signals = Signals::install();
        let starting = async {
            let (config, dev) = if args.dev {
                let dev = crate::dev::prepare().await?;
                (dev.config()?, Some(dev))
            } else {
                (Config::load(config_path)?, None)
            };
            raise_open_file_limit(&config);
            let running = start_serving(config, dev.is_some()).await?;
            anyhow::Ok((running, dev))
        };
        // A stop asked before the start is done (one that hangs: a disk, a DNS lookup) ends
        // the process as the signal's default would have: nothing is served yet to drain.
        let (running, dev) = tokio::select! {
            started = starting => started?,
            () = Signals::stop_asked(signals.as_mut()) => {
                anyhow::bail!("stopped by a signal before the start was done");
            }
        };
        if let Some(dev) = &dev {
            dev.print_welcome(&running);
        } else {
            say(format_args!(
                "credbroker listening on {}",
                running.proxy_addr
            ));
            if let Some(a) = running.admin_addr {
                say(format_args!("admin listening on {a}"));
            }
        }
        let again = wait_for_signals(&running, signals).await;
        tracing::info!("shutting down: draining in-flight requests");
        if let Some(again) = again {
            // A drain that does not end (a hung disk, a request that outlives its timeout)
            // can still be cut short from the terminal or the supervisor.
            tokio::spawn(async move {
                again.await;
                tracing::error!("a second stop signal: exiting without finishing the drain");
                std::process::exit(1);
            });
        }
        // DESIGN §6: `shutdown` written, exit 0; without it, a supervisor learns of it.
        Ok(match running.shutdown().await {
            true => ExitCode::SUCCESS,
            false => ExitCode::FAILURE,
        })
    })
}

/// Raises the soft open-file limit (often 1024) toward what `max_connections` needs, up to
/// the hard limit, as nginx's `worker_rlimit_nofile` does. Below it, accepting fails with
/// `EMFILE` long before `max_connections`, and so does anything else that opens a file — the
/// audit log's rotation among them.
fn raise_open_file_limit(config: &Config) {
    let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    // A client connection may hold an upstream one too, and the HTTP/2 requests in flight
    // (as many as connections, `server::serve`) one each; then the admin listener's, and room
    // for listeners, files and Redis.
    let admin = config
        .admin
        .as_ref()
        .map_or(0, |a| count(a.max_connections));
    let wanted = count(config.server.max_connections)
        .saturating_mul(3)
        .saturating_add(admin)
        .saturating_add(256);
    match rlimit::increase_nofile_limit(wanted) {
        Ok(have) if have < wanted => tracing::warn!(
            have,
            wanted,
            "the open-file limit (its hard limit) is below what server.max_connections needs: \
             connections beyond it are refused"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}

/// A line on stderr for whoever started the broker; lost if stderr is gone (`eprintln!` would
/// panic, and a serving broker must not stop for its log).
pub(crate) fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        // A log line that cannot be written (stderr a pipe whose reader died: a log shipper
        // restarted) is lost, not reported with `eprintln!`, which panics on that same pipe —
        // in a call, or in the audit writer thread, which would take the log down with it.
        .log_internal_errors(false)
        .try_init();
}

/// The signals `serve` acts on: SIGHUP reloads, SIGTERM and SIGINT stop.
struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Resolves on SIGTERM or SIGINT (on Ctrl-C when no handler could be installed).
    async fn stop_asked(signals: Option<&mut Self>) {
        match signals {
            Some(s) => {
                tokio::select! {
                    _ = s.term.recv() => {}
                    _ = s.int.recv() => {}
                }
            }
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }

    /// `None` (after saying so) when they cannot be installed.
    fn install() -> Option<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::hangup()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(hup), Ok(term), Ok(int)) => Some(Self { hup, term, int }),
            _ => {
                tracing::error!("cannot install signal handlers; waiting for Ctrl-C only");
                None
            }
        }
    }
}

/// SIGHUP reloads (in its own task, so that a reload waiting on the audit log never holds
/// up a stop); SIGTERM or SIGINT return, with what resolves at the next one of them.
async fn wait_for_signals(
    running: &Running,
    signals: Option<Signals>,
) -> Option<impl Future<Output = ()>> {
    let Some(Signals {
        mut hup,
        mut term,
        mut int,
    }) = signals
    else {
        let _ = tokio::signal::ctrl_c().await;
        return None;
    };
    loop {
        tokio::select! {
            _ = hup.recv() => {
                let broker = Arc::clone(&running.broker);
                tokio::spawn(async move {
                    let _ = crate::admin::reload(&broker, "signal:SIGHUP", None).await;
                });
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    Some(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// Opens the audit log and state, binds the listeners and serves until [`Running::shutdown`].
pub async fn start(config: Config) -> anyhow::Result<Running> {
    start_serving(config, false).await
}

/// [`start`]; with `dev`, an earlier dev run's revocations and kill switches are forgotten
/// once the audit log is held — not before: a second `serve --dev` in the same folder, which
/// the log's lock refuses, must not clear the state of the one running there.
async fn start_serving(config: Config, dev: bool) -> anyhow::Result<Running> {
    let keys = Arc::new(match &config.tokens.signing_key {
        Some(path) => SigningKeys::from_pem_file(path)?,
        None => {
            tracing::warn!("no tokens.signing_key: using an ephemeral signing key; tokens die with this process");
            SigningKeys::ephemeral()
        }
    });
    // Both listeners are bound before anything is recorded (a torn tail cut, a `recovered`
    // or `startup` record) or served: a port in use stops the start with the log untouched and
    // no listener left serving. (Bound is not serving: connections wait in the backlog.)
    let proxy_listener = server::bind(config.server.listen).await?;
    let admin_listener = match &config.admin {
        Some(admin) => Some(server::bind(admin.listen).await?),
        None => None,
    };
    let audit = AuditLog::open(AuditOptions {
        path: config.audit.path.clone(),
        fsync: config.audit.fsync,
        rotate_bytes: config.audit.rotate_bytes,
        hmac_key: config.audit.hmac_key.clone(),
        replica: config.state.replica.clone(),
    })
    .with_context(|| format!("cannot open the audit log {}", config.audit.path.display()))?;
    // Each call waits on one record at a time: HTTP/1.1 connections carry one call, HTTP/2
    // ones one of their own plus the listener's places (`server::serve`), as many again.
    let admin_connections = config.admin.as_ref().map_or(0, |a| a.max_connections);
    audit.expect_in_flight(
        config
            .server
            .max_connections
            .saturating_mul(3)
            .saturating_add(admin_connections.saturating_mul(3))
            .saturating_add(1024),
    );
    // The clock skew allowed between replicas' cut-offs: `tokens.leeway`, at most 5 s (each
    // second of it is a second after a revocation or a loss in which new tokens are refused).
    let skew = i64::try_from(config.tokens.leeway.as_secs().min(5)).unwrap_or(5);
    if dev {
        crate::dev::forget_previous_run(&config)?;
    }
    let state = StateStore::open(&config.state, skew)?;
    let limits = ListenerLimits {
        max_connections: config.server.max_connections,
        max_header_bytes: config.server.max_header_bytes,
        header_read_timeout: config.server.header_read_timeout,
        request_timeout: config.server.request_timeout,
    };
    let admin_cfg = config
        .admin
        .as_ref()
        .map(|a| (a.listen, a.token_sha256, a.max_connections));
    let mut startup = Record::new(Event::Startup);
    startup.version = Some(env!("CARGO_PKG_VERSION").to_owned());
    startup.config_sha256 = Some(config.sha256.clone());
    let broker = Arc::new(Broker::new(config, keys, audit, state)?);
    // Shared state: adopt (or start) its epoch and seed it from this replica's journal now,
    // not at the first call. A Redis that is down is no reason not to start: calls are
    // refused until it answers.
    if let StateStore::Redis(redis) = &*broker.state {
        if let Err(e) = redis.join().await {
            tracing::warn!(error = %e, "shared state not reachable at start; calls are refused until it is");
        }
    }
    broker
        .audit
        .append(startup)
        .await
        .context("cannot write the startup audit record")?;

    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::new();
    let proxy_addr = proxy_listener.local_addr()?;
    tasks.push(tokio::spawn(server::serve(
        proxy_listener,
        broker.listener_tls.proxy.clone(),
        limits.clone(),
        Role::Proxy(Arc::clone(&broker)),
        wait_stop(stopped.clone()),
    )));
    let mut admin_addr = None;
    if let Some(((_, token_sha256, max_connections), listener)) = admin_cfg.zip(admin_listener) {
        let tls = broker.listener_tls.admin.clone().flatten();
        admin_addr = Some(listener.local_addr()?);
        let state = Arc::new(AdminState {
            broker: Arc::clone(&broker),
            token_sha256,
        });
        let admin_limits = ListenerLimits {
            max_connections,
            ..limits
        };
        tasks.push(tokio::spawn(server::serve(
            listener,
            tls,
            admin_limits,
            Role::Admin(state),
            wait_stop(stopped.clone()),
        )));
    }
    tasks.extend(crate::admin::watch::start_if_file_backed(
        &broker,
        stopped.clone(),
    ));
    if matches!(&*broker.state, StateStore::Redis(_)) {
        tasks.push(tokio::spawn(watch_shared_state(
            Arc::clone(&broker),
            stopped.clone(),
        )));
    }
    tasks.push(tokio::spawn(sweeper(Arc::clone(&broker), stopped)));
    Ok(Running {
        proxy_addr,
        admin_addr,
        broker,
        stop,
        tasks,
    })
}

async fn wait_stop(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stopped| *stopped).await;
}

/// Shared state (DESIGN §7): notices a Redis that lost its data, keeps this replica's journal
/// of kill switches current, makes the changes deferred while Redis could not take them
/// (`RedisState::watch`), and audits those once made.
async fn watch_shared_state(broker: Arc<Broker>, mut stopped: watch::Receiver<bool>) {
    let StateStore::Redis(redis) = &*broker.state else {
        return;
    };
    let mut tick = tokio::time::interval(crate::state::redis::WATCH_INTERVAL);
    loop {
        let round = tokio::select! {
            _ = tick.tick() => true,
            // A deferred revocation or kill switch made by a call or token request: audited
            // now, not at the next round.
            () = redis.replayed_made() => false,
            // `Running::shutdown` records what is still owed, after the drain.
            _ = stopped.wait_for(|s| *s) => return,
        };
        if round {
            redis.watch().await;
        }
        crate::admin::audit_replayed(&broker).await;
    }
}

/// Drops `max_uses` counters of expired tokens and stale lockout windows once a minute.
async fn sweeper(broker: Arc<Broker>, mut stopped: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = tick.tick() => broker.sweep_expired(chrono::Utc::now().timestamp()),
            _ = stopped.wait_for(|s| *s) => return,
        }
    }
}
