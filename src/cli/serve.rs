//! `flexnbd serve` (flexnbd §3.2, §5).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use anyhow::{bail, Context as _};
use bytes::Bytes;
use clap::ArgMatches;

use crate::acl::Acl;
use crate::actors::allocation_map::{AllocationMapBuilder, StopBuilder};
use crate::actors::control::{Control, ControlConfig, StopControl, StopMirror};
use crate::actors::inbound::{AttachListener, Inbound, StopInbound, WriteGate};
use crate::actors::listener::{Listener, ListenerConfig, Shutdown};
use crate::actors::rebind::Rebinder;
use crate::actors::session::SessionConfig;
use crate::actors::write_queue::WriteQueue;
use crate::actors::{Events, ServerEvent};
use crate::addr::{parse_ip, parse_port};
use crate::protocol::handshake::OldstyleHello;
use crate::protocol::newstyle::{BlockSize, NegotiationConfig, ServerNegotiation};
use crate::protocol::request::{Dialect, ExportRules};
use crate::protocol::tflags;
use crate::storage::Backing;
use crate::{fatal, logging};

use super::{flag, value};

/// Seconds a `-k` client may make no progress (flexnbd §11).
const KILLSWITCH: Duration = Duration::from_secs(120);
/// Default client limit of `serve` (flexnbd §14).
const DEFAULT_MAX_CLIENTS: usize = 16;
/// The largest `--busy-poll`: polling longer than a millisecond per request would only
/// burn CPU (a wake-up costs tens of microseconds).
const MAX_BUSY_POLL_MICROS: u64 = 1000;

/// Default grace for requests in flight at shutdown.
const DEFAULT_GRACE_SECS: u64 = 10;

/// Which server this process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Serve,
    /// Receive a migration; then exit, or serve on the rebind address.
    Listen {
        rebind: Option<SocketAddr>,
    },
}

/// Everything `serve` and `listen` need, validated.
struct ServeOptions {
    mode: Mode,
    addr: IpAddr,
    port: u16,
    file: PathBuf,
    sock: Option<PathBuf>,
    acl: Acl,
    killswitch: bool,
    max_clients: usize,
    sync_writes: bool,
    grace: Duration,
    /// `--busy-poll`: the longest a session polls for the next request.
    busy_poll: Duration,
    read_only: bool,
    /// `--newstyle`: the name and description to negotiate.
    newstyle: Option<(String, Option<String>)>,
}

/// `flexnbd serve`.
pub fn serve(matches: &ArgMatches) -> i32 {
    run_mode("serve", matches)
}

/// `flexnbd listen`.
pub fn listen(matches: &ArgMatches) -> i32 {
    run_mode("listen", matches)
}

fn run_mode(mode: &str, matches: &ArgMatches) -> i32 {
    let (addr, port, file) = (
        value(matches, "addr"),
        value(matches, "port"),
        value(matches, "file"),
    );
    let mut missing = false;
    if addr.is_none() || port.is_none() {
        eprintln!("both --addr and --port are required.");
        missing = true;
    }
    if file.is_none() {
        eprintln!("--file is required");
        missing = true;
    }
    if missing {
        eprint!(
            "{}",
            super::spec::find(mode).expect("the mode exists").help()
        );
        return 1;
    }
    logging::set_context(file.unwrap_or_default());
    match options(mode, matches).and_then(run) {
        Ok(code) => code,
        Err(e) => {
            fatal!("{e:#}");
            1
        }
    }
}

fn options(mode: &str, matches: &ArgMatches) -> anyhow::Result<ServeOptions> {
    let addr_text = value(matches, "addr").unwrap_or_default();
    let Some(addr) = parse_ip(addr_text) else {
        bail!("Couldn't parse server address '{addr_text}' (use 0 if you want to bind to all)");
    };
    let entries: Vec<&String> = matches
        .get_many::<String>("positional")
        .into_iter()
        .flatten()
        .collect();
    let acl = Acl::parse(&entries, flag(matches, "default-deny"))?;
    let port = parse_port(value(matches, "port").unwrap_or_default())?;
    let mode = match mode {
        "listen" => Mode::Listen {
            rebind: rebind_target(matches)?,
        },
        _ => Mode::Serve,
    };
    let max_clients = match value(matches, "max-clients") {
        // One inbound migration at a time (flexnbd §5.6).
        None if matches!(mode, Mode::Listen { .. }) => 1,
        None => DEFAULT_MAX_CLIENTS,
        Some(text) => match text.parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => bail!("--max-clients must be a positive whole number, not '{text}'"),
        },
    };
    let grace = match value(matches, "grace") {
        None => Duration::from_secs(DEFAULT_GRACE_SECS),
        Some(text) => match text.parse::<f64>() {
            Ok(s) if s.is_finite() && s >= 0.0 => Duration::from_secs_f64(s),
            _ => bail!("--grace must be a number of seconds, not '{text}'"),
        },
    };
    let busy_poll = match value(matches, "busy-poll") {
        None => SessionConfig::DEFAULT_BUSY_POLL,
        Some(text) => match text.parse::<u64>() {
            Ok(us) if us <= MAX_BUSY_POLL_MICROS => Duration::from_micros(us),
            _ => bail!(
                "--busy-poll must be a whole number of microseconds from 0 to {MAX_BUSY_POLL_MICROS}, not '{text}'"
            ),
        },
    };
    let newstyle = flag(matches, "newstyle");
    for option in ["export-name", "description"] {
        if !newstyle && value(matches, option).is_some() {
            bail!("--{option} needs --newstyle: old-style NBD has no export names or descriptions");
        }
    }
    Ok(ServeOptions {
        mode,
        addr,
        port,
        file: PathBuf::from(value(matches, "file").unwrap_or_default()),
        sock: value(matches, "sock").map(PathBuf::from),
        acl,
        // Only `serve` has the option (clap panics, in debug builds, on ids a mode lacks).
        killswitch: mode == Mode::Serve && flag(matches, "killswitch"),
        max_clients,
        sync_writes: flag(matches, "sync-writes"),
        grace,
        busy_poll,
        read_only: flag(matches, "read-only"),
        newstyle: newstyle.then(|| {
            (
                value(matches, "export-name").unwrap_or_default().to_owned(),
                value(matches, "description").map(str::to_owned),
            )
        }),
    })
}

/// `--rebind-addr` and `--rebind-port`, both or neither.
fn rebind_target(matches: &ArgMatches) -> anyhow::Result<Option<SocketAddr>> {
    match (value(matches, "rebind-addr"), value(matches, "rebind-port")) {
        (None, None) => Ok(None),
        (Some(addr), Some(port)) => {
            let ip = parse_ip(addr)
                .ok_or_else(|| anyhow::anyhow!("Couldn't parse rebind address '{addr}'"))?;
            Ok(Some(SocketAddr::new(ip, parse_port(port)?)))
        }
        _ => bail!("--rebind-addr and --rebind-port go together"),
    }
}

/// The session settings of a listener; `gate` for the `listen` socket (a migration target,
/// whose inbound actor decides who may write).
fn session_config(
    opts: &ServeOptions,
    backing: &Arc<Backing>,
    gate: Option<Arc<WriteGate>>,
) -> Arc<SessionConfig> {
    let migration_target = gate.is_some();
    let newstyle = opts
        .newstyle
        .clone()
        .map(|(export_name, description)| NegotiationConfig {
            export_name,
            description,
            size: backing.size(),
            read_only: opts.read_only,
            block_size: BlockSize::DEFAULT,
            can_multi_conn: true,
            shutting_down: false,
        });
    let hello = match &newstyle {
        Some(config) => ServerNegotiation::new(config.clone()).greeting().to_vec(),
        None => {
            let read_only = if opts.read_only { tflags::READ_ONLY } else { 0 };
            let hello = OldstyleHello {
                size: backing.size(),
                flags: tflags::FLEXNBD_COMPAT | read_only,
            };
            hello.encode().to_vec()
        }
    };
    Arc::new(SessionConfig {
        backing: backing.clone(),
        rules: ExportRules {
            size: backing.size(),
            dialect: Dialect::Oldstyle,
            read_only: opts.read_only,
            migration_target,
        },
        hello: Bytes::from(hello),
        newstyle,
        sync_writes: opts.sync_writes,
        max_in_flight: SessionConfig::DEFAULT_IN_FLIGHT,
        payload_budget: SessionConfig::DEFAULT_BUDGET,
        part_size: SessionConfig::DEFAULT_PART,
        // A migration source may pause for long periods (rate limiting): no killswitch on
        // the listen socket (flexnbd §11).
        killswitch: (opts.killswitch && !migration_target).then_some(KILLSWITCH),
        grace: opts.grace,
        busy_poll: opts.busy_poll,
        // A read-only export refuses every write: no thread to wait for them.
        write_queue: if opts.read_only {
            None
        } else {
            WriteQueue::start()
                .map_err(|e| {
                    tracing::warn!(
                        "Couldn't start the write thread ({e}); writes use the blocking pool"
                    )
                })
                .ok()
        },
        gate,
    })
}

fn run(opts: ServeOptions) -> anyhow::Result<i32> {
    // Validate the file before the port is bound, so nothing looks ready for a server that
    // is about to fail (flexnbd §5.1).
    let backing = Arc::new(Backing::open_with(&opts.file, opts.read_only)?);
    if let Some(path) = &opts.sock {
        ControlSocket::check_path(path)?;
    }
    let socket = crate::net::bind_listener(opts.addr, opts.port)
        .map_err(|e| anyhow::anyhow!("Failed to bind() socket: {e}"))?;
    let local = socket.local_addr().context("reading the bound address")?;
    // Only now, with the NBD port listening, may the control socket appear: supervisors
    // take its existence as the readiness signal (flexnbd §5.1).
    let control_socket = opts.sock.as_deref().map(ControlSocket::bind).transpose()?;
    let verb = match opts.mode {
        Mode::Serve => "Serving",
        Mode::Listen { .. } => "Listening for a migration into",
    };
    tracing::info!(
        "{verb} {} ({} bytes) on {local}",
        opts.file.display(),
        backing.size()
    );
    let system = System::new();
    system.block_on(async move {
        Server::start(opts, backing, socket, control_socket)
            .await?
            .run()
            .await
    })
}

/// A running `serve` or `listen` process: its actors and what main waits for.
struct Server {
    opts: ServeOptions,
    backing: Arc<Backing>,
    arbiters: Vec<Arbiter>,
    listener: Addr<Listener>,
    builder: Addr<AllocationMapBuilder>,
    control: Option<Addr<Control>>,
    /// `listen`: the inbound-migration actor (who may write, the hand-off).
    inbound: Option<Addr<Inbound>>,
    control_socket: Option<ControlSocket>,
    events: tokio::sync::mpsc::UnboundedReceiver<ServerEvent>,
    /// Keeps the event channel open while no actor holds a sender.
    _events_tx: Events,
    signals: Signals,
}

impl Server {
    /// Starts the actors (inside the actix system).
    async fn start(
        opts: ServeOptions,
        backing: Arc<Backing>,
        socket: std::net::TcpListener,
        control_socket: Option<ControlSocket>,
    ) -> anyhow::Result<Server> {
        {
            let signals = Signals::install()?;
            let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
            let arbiters: Vec<Arbiter> = (0..workers).map(|_| Arbiter::new()).collect();
            let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
            let listening = matches!(opts.mode, Mode::Listen { .. });
            let inbound = listening.then(|| Inbound::new(backing.clone(), events_tx.clone()));
            let gate = inbound.as_ref().map(Inbound::gate);
            let inbound = inbound.map(Actor::start);
            let config = Self::listener_config(&opts, &backing, &arbiters, gate);
            let mut listener = Listener::new(socket, config);
            if let Some(inbound) = &inbound {
                listener = listener.migration_target(inbound.clone());
            }
            let listener = listener.start();
            if let Some(inbound) = &inbound {
                inbound.do_send(AttachListener(listener.clone()));
            }
            let builder = AllocationMapBuilder::new(backing.clone()).start();
            let control = control_socket.as_ref().map(|sock| {
                let config = ControlConfig {
                    pid: std::process::id(),
                    size: backing.size(),
                    default_deny: opts.acl.default_deny(),
                    listener: listener.clone(),
                    allocation: backing.allocation().clone(),
                    inbound: inbound.clone(),
                };
                let control = Control::new(sock.take_listener(), config);
                match opts.mode {
                    Mode::Serve => control.with_migration(backing.clone(), Some(events_tx.clone())),
                    Mode::Listen { .. } => control,
                }
                .start()
            });
            Ok(Server {
                opts,
                backing,
                arbiters,
                listener,
                builder,
                control,
                inbound,
                control_socket,
                events,
                _events_tx: events_tx,
                signals,
            })
        }
    }

    /// A migration target (`gate`) admits whom its inbound actor decides (flexnbd's one
    /// legacy client, or the current attempt and a few candidates), whatever
    /// `--max-clients` says: that option applies to the server it rebinds to.
    fn listener_config(
        opts: &ServeOptions,
        backing: &Arc<Backing>,
        arbiters: &[Arbiter],
        gate: Option<Arc<WriteGate>>,
    ) -> ListenerConfig {
        ListenerConfig {
            acl: opts.acl.clone(),
            max_clients: opts.max_clients.max(1),
            session: session_config(opts, backing, gate),
            arbiters: arbiters.iter().map(Arbiter::handle).collect(),
        }
    }

    /// Waits for what ends this process (a signal, a migration), then shuts down in
    /// flexnbd's order and returns the exit status.
    async fn run(self) -> anyhow::Result<i32> {
        let mut server = self;
        let code = server.wait_for_end().await;
        server.shut_down().await?;
        Ok(code)
    }

    async fn wait_for_end(&mut self) -> i32 {
        let mut received = false;
        let mut rebinding: Option<tokio::sync::oneshot::Receiver<Result<Addr<Listener>, String>>> =
            None;
        loop {
            let rebound = async {
                match rebinding.as_mut() {
                    Some(rx) => rx
                        .await
                        .unwrap_or_else(|_| Err("the rebinding actor stopped".into())),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                signal = self.signals.wait() => {
                    tracing::info!("Received {signal}: shutting down");
                    return match self.opts.mode {
                        Mode::Serve => {
                            // A signal during an outbound migration abandons it, and the exit
                            // status says it did not complete (flexnbd §2.4).
                            let mirroring = match &self.control {
                                Some(control) => control.send(StopMirror).await.unwrap_or(false),
                                None => false,
                            };
                            if mirroring {
                                tracing::warn!("A migration was running: it was abandoned; exiting with status 1");
                                1
                            } else {
                                0
                            }
                        }
                        // The inbound actor answers whether control was taken, and takes
                        // none from now on: the exit status never contradicts an answer
                        // a source got (exit 1 proves control was not taken).
                        Mode::Listen { .. } => {
                            let taken = match &self.inbound {
                                Some(inbound) => inbound.send(StopInbound).await.unwrap_or(received),
                                None => received,
                            };
                            if taken { 0 } else { 1 }
                        }
                    };
                }
                result = rebound => {
                    rebinding = None;
                    match result {
                        Ok(listener) => self.listener = listener,
                        Err(why) => {
                            crate::fatal!("{why}");
                            return 1;
                        }
                    }
                }
                Some(event) = self.events.recv() => match event {
                    ServerEvent::MigrationSent => {
                        tracing::info!("Migration completed: this server has handed over; exiting");
                        return 0;
                    }
                    ServerEvent::MigrationFatal(why) => {
                        crate::fatal!("{why}");
                        return 1;
                    }
                    ServerEvent::MigrationReceived => {
                        received = true;
                        let Mode::Listen { rebind: Some(target) } = self.opts.mode else {
                            tracing::info!("Migration received: exiting");
                            return 0;
                        };
                        // Close the listen socket first: the export is never served from
                        // two places.
                        let _ = self.listener.send(Shutdown).await;
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        let config = Self::listener_config(&self.opts, &self.backing, &self.arbiters, None);
                        let config = ListenerConfig {
                            max_clients: self.opts.max_clients.max(DEFAULT_MAX_CLIENTS),
                            ..config
                        };
                        Rebinder::new(target, config, self.control.clone(), tx).start();
                        rebinding = Some(rx);
                    }
                },
            }
        }
    }

    async fn shut_down(mut self) -> anyhow::Result<()> {
        // The control socket goes first, before the NBD port closes (flexnbd §5.5).
        if let Some(control) = self.control.take() {
            let _ = control.send(StopControl).await;
        }
        if let Some(sock) = &self.control_socket {
            sock.remove();
        }
        self.builder.do_send(StopBuilder);
        // Sessions enforce the grace themselves; the extra time only guards against a
        // session that cannot even report its end.
        let backstop = self.opts.grace + Duration::from_secs(5);
        if tokio::time::timeout(backstop, self.listener.send(Shutdown))
            .await
            .is_err()
        {
            tracing::error!("Some clients did not close within {backstop:?}; exiting anyway");
        }
        for arbiter in &self.arbiters {
            arbiter.stop();
        }
        for arbiter in self.arbiters.drain(..) {
            let _ = arbiter.join();
        }
        flush(&self.backing).map(|_| ())
    }
}

/// The control socket's path, removed when the server exits (on every path this process
/// controls: a clean shutdown, and errors after the socket was created).
struct ControlSocket {
    path: PathBuf,
    listener: std::cell::Cell<Option<std::os::unix::net::UnixListener>>,
    removed: std::cell::Cell<bool>,
}

impl ControlSocket {
    /// Unix socket paths longer than this do not fit `sockaddr_un` (C flexnbd silently
    /// truncated them).
    const MAX_PATH: usize = 107;

    fn check_path(path: &std::path::Path) -> anyhow::Result<()> {
        let len = path.as_os_str().len();
        if len > Self::MAX_PATH {
            bail!(
                "Control socket path {} is {len} bytes long; at most {} fit",
                path.display(),
                Self::MAX_PATH
            );
        }
        Ok(())
    }

    /// Binds the socket. An existing path is refused, never removed: a stale path is the
    /// operator's (or supervisor's) to remove (flexnbd §6.1).
    fn bind(path: &std::path::Path) -> anyhow::Result<ControlSocket> {
        let listener = std::os::unix::net::UnixListener::bind(path).map_err(|e| {
            anyhow::anyhow!("Couldn't bind control socket to {}: {e}", path.display())
        })?;
        Ok(ControlSocket {
            path: path.to_owned(),
            listener: std::cell::Cell::new(Some(listener)),
            removed: std::cell::Cell::new(false),
        })
    }

    fn take_listener(&self) -> std::os::unix::net::UnixListener {
        self.listener
            .take()
            .expect("the control socket is handed over once")
    }

    fn remove(&self) {
        if !self.removed.replace(true) {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(
                    "Couldn't remove the control socket {}: {e}",
                    self.path.display()
                );
            }
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.remove();
    }
}

/// The last step of every shutdown: nothing acknowledged stays only in the page cache.
fn flush(backing: &Backing) -> anyhow::Result<i32> {
    match backing.sync_data() {
        Ok(()) => {
            tracing::info!("Flushed {}; exiting", backing.path().display());
            Ok(0)
        }
        Err(e) => bail!(
            "Flushing {} at shutdown failed: {e}",
            backing.path().display()
        ),
    }
}

/// SIGINT, SIGTERM and SIGQUIT, the signals that start a graceful shutdown.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            quit: signal(SignalKind::quit()).context("installing the SIGQUIT handler")?,
        })
    }

    async fn wait(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
            _ = self.quit.recv() => "SIGQUIT",
        }
    }
}
