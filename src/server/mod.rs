//! The composition root of a `serve` or `listen` process (flexnbd §3.2, §5): from
//! validated [`Options`] it opens the file, binds the NBD port and the control socket,
//! starts the actors (arbiters, listener, inbound-migration actor, allocation-map builder,
//! control actor), waits for what ends the process (a signal, a finished migration, a
//! [`ShutdownHandle`]), rebinds after a received migration, shuts down in flexnbd's order
//! and returns the exit status.
//!
//! `cli::serve` turns the command line into [`Options`] and calls [`run`]; tests can call
//! [`Server::bind`] and [`Server::run`] directly, without the binary.

mod control_socket;
mod notify;
mod stop;
#[cfg(test)]
mod tests;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use anyhow::{bail, Context as _};
use bytes::Bytes;

use crate::acl::Acl;
use crate::actors::allocation_map::{AllocationMapBuilder, StopBuilder};
use crate::actors::control::{Control, ControlConfig, MigrationSummary, StopControl, StopMirror};
use crate::actors::inbound::{AttachListener, Inbound, StopInbound, WriteGate};
use crate::actors::listener::{Listener, ListenerConfig, Shutdown};
use crate::actors::rebind::Rebinder;
use crate::actors::session::{SessionConfig, SessionTls};
use crate::actors::write_queue::WriteQueue;
use crate::actors::{Events, ServerEvent};
use crate::protocol::handshake::OldstyleHello;
use crate::protocol::newstyle::{BlockSize, NegotiationConfig, ServerNegotiation, TlsPolicy};
use crate::protocol::request::{Dialect, ExportRules};
use crate::protocol::tflags;
use crate::storage::Backing;

use control_socket::ControlSocket;
pub use stop::ShutdownHandle;

/// Seconds a `-k` client may make no progress (flexnbd §11).
const KILLSWITCH: Duration = Duration::from_secs(120);
/// Default client limit of `serve` (flexnbd §14), and the least a `listen` server applies
/// once it serves after `--rebind-*`.
pub const DEFAULT_MAX_CLIENTS: usize = 16;

/// Which server this process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `serve`: serve the file, and migrate it out when the control socket says so.
    Serve,
    /// `listen`: receive a migration; then exit, or serve on the rebind address.
    Listen {
        /// `--rebind-addr` and `--rebind-port`: where to serve once the migration is
        /// received (`None`: exit instead).
        rebind: Option<SocketAddr>,
    },
}

/// Everything `serve` and `listen` need, validated (`cli::serve` parses them from the
/// command line).
#[derive(Clone, Debug)]
pub struct Options {
    /// `serve` or `listen`.
    pub mode: Mode,
    /// `--addr`: the address the NBD port is bound to (`0.0.0.0` or `::` for all).
    pub addr: IpAddr,
    /// `--port`: the NBD port (0 picks a free one; see [`Server::local_addr`]).
    pub port: u16,
    /// `--file`: the file or block device served.
    pub file: PathBuf,
    /// `--sock`: the control socket's path, created once the NBD port listens and removed
    /// at exit; `None` for no control socket.
    pub sock: Option<PathBuf>,
    /// The access control list (the positional entries and `--default-deny`).
    pub acl: Acl,
    /// `-k`: close a client whose request makes no progress for 120 s (`serve` only; the
    /// `listen` socket never has it).
    pub killswitch: bool,
    /// `--max-clients`: clients served at once (at least 1 is applied). `listen` admits whom
    /// the migration allows and applies this, at least [`DEFAULT_MAX_CLIENTS`], once it
    /// serves after `--rebind-*`.
    pub max_clients: usize,
    /// `--sync-writes`: make every write durable before its reply.
    pub sync_writes: bool,
    /// `--grace`: at shutdown, how long sessions wait for the requests in flight.
    pub grace: Duration,
    /// `--busy-poll`: the longest a session polls for the next request.
    pub busy_poll: Duration,
    /// `-r`: refuse writes, trims and zeroes.
    pub read_only: bool,
    /// Take the file's advisory lock (everything but `--no-lock`): a second server on the
    /// same file refuses to start.
    pub lock: bool,
    /// `--newstyle`: the export name (`--export-name`, empty by default) and description
    /// (`--description`) to negotiate; `None` speaks flexnbd's old-style protocol.
    pub newstyle: Option<(String, Option<String>)>,
    /// `--tls on|require` with the credentials loaded (`--tls-creds`, `--tls-psk`), for
    /// new-style connections; `None` for `--tls off`.
    pub tls: Option<SessionTls>,
}

/// Runs a server to its end and returns the process's exit status: 0 after a signal
/// (nothing in doubt) or a completed migration, 1 when a migration was abandoned or
/// failed, a `listen` server stopped without having taken control, or a fatal error,
/// which is logged (`F`) here; [`EXIT_LET_GO`] when this server had let go of its copy.
pub fn run(opts: Options) -> i32 {
    match Server::bind(opts).and_then(Server::run) {
        Ok(code) => code,
        Err(e) => {
            crate::fatal!("{e:#}");
            1
        }
    }
}

/// How often a service manager hears how a migration is going (`STATUS=`).
const STATUS_EVERY: Duration = Duration::from_secs(2);

/// The exit status of a `serve` that ended after letting go of its copy during a migration
/// (stopped by a signal in doubt, or a fatal hand-off failure): the destination may hold
/// the authoritative data, so nothing should restart this server on its own. Distinct from
/// 1 (a migration abandoned while this side still held everything, which a supervisor may
/// restart) so that a service manager can tell them apart (`RestartPreventExitStatus=3`).
pub const EXIT_LET_GO: i32 = 3;

/// A server whose file is open and whose NBD port (and control socket) are bound, ready to
/// [`run`](Server::run).
pub struct Server {
    opts: Options,
    backing: Arc<Backing>,
    socket: std::net::TcpListener,
    local: SocketAddr,
    control_socket: Option<ControlSocket>,
    requests: stop::Requests,
}

impl Server {
    /// Opens the file, binds the NBD port, then creates the control socket (whose
    /// existence tells supervisors the server is ready), and logs what it serves. An error
    /// means the process must exit 1.
    pub fn bind(opts: Options) -> anyhow::Result<Server> {
        // Validate the file before the port is bound, so nothing looks ready for a server
        // that is about to fail (flexnbd §5.1).
        let backing = Arc::new(Backing::open_with(&opts.file, opts.read_only)?);
        if opts.lock {
            backing.lock(opts.read_only)?;
        }
        if let Some(path) = &opts.sock {
            ControlSocket::check_path(path)?;
        }
        let socket = crate::net::bind_listener(opts.addr, opts.port).map_err(|e| {
            let at = SocketAddr::new(opts.addr, opts.port);
            anyhow::anyhow!("Failed to bind() socket to {at}: {e}")
        })?;
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
        if let Some(tls) = &opts.tls {
            let how = match tls.policy {
                TlsPolicy::Required => "required",
                _ => "offered",
            };
            tracing::info!("TLS {how}, with the {}", tls.creds.description);
        }
        Ok(Server {
            opts,
            backing,
            socket,
            local,
            control_socket,
            requests: stop::Requests::new(),
        })
    }

    /// The address the NBD port is bound to (with the port the system picked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// A handle that shuts this server down as a signal would.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.requests.handle()
    }

    /// Runs the server in an actix `System` on the calling thread until a signal (SIGINT,
    /// SIGTERM, SIGQUIT, whose handlers it installs), a [`ShutdownHandle`] or a migration
    /// ends it; then shuts down in flexnbd's order and returns the exit status (see
    /// [`run`]). An error is fatal: the process must log it and exit 1.
    pub fn run(self) -> anyhow::Result<i32> {
        let Server {
            opts,
            backing,
            socket,
            local: _,
            control_socket,
            requests,
        } = self;
        let system = System::new();
        system.block_on(async move {
            Running::start(opts, backing, socket, control_socket, requests)
                .await?
                .run()
                .await
        })
    }
}

/// The session settings of a listener; `gate` for the `listen` socket (a migration target,
/// whose inbound actor decides who may write).
fn session_config(
    opts: &Options,
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
        tls: opts.tls.clone(),
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

/// A running `serve` or `listen` server: its actors and what main waits for.
struct Running {
    opts: Options,
    backing: Arc<Backing>,
    arbiters: Vec<Arbiter>,
    listener: Addr<Listener>,
    builder: Addr<AllocationMapBuilder>,
    control: Option<Addr<Control>>,
    /// `listen`: the inbound-migration actor (who may write, the hand-off).
    inbound: Option<Addr<Inbound>>,
    control_socket: Option<ControlSocket>,
    /// The service manager, when one asked to be told (`NOTIFY_SOCKET`).
    notifier: Option<notify::Notifier>,
    /// Where the NBD port listens (the port the system chose for port 0).
    local: SocketAddr,
    events: tokio::sync::mpsc::UnboundedReceiver<ServerEvent>,
    /// Keeps the event channel open while no actor holds a sender.
    _events_tx: Events,
    stop: stop::Stop,
}

impl Running {
    /// Starts the actors (inside the actix system).
    async fn start(
        opts: Options,
        backing: Arc<Backing>,
        socket: std::net::TcpListener,
        control_socket: Option<ControlSocket>,
        requests: stop::Requests,
    ) -> anyhow::Result<Running> {
        let stop = stop::Stop::install(requests)?;
        let local = socket.local_addr().context("reading the bound address")?;
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
        // The port listens and the control socket exists: flexnbd's "ready".
        let notifier = notify::Notifier::from_env();
        if let Some(notifier) = &notifier {
            notifier.ready(&Self::serving_status(&opts, &backing, local));
        }
        Ok(Running {
            opts,
            backing,
            arbiters,
            listener,
            builder,
            control,
            inbound,
            control_socket,
            notifier,
            local,
            events,
            _events_tx: events_tx,
            stop,
        })
    }

    /// A migration target (`gate`) admits whom its inbound actor decides (flexnbd's one
    /// legacy client, or the current attempt and a few candidates), whatever
    /// `--max-clients` says: that option applies to the server it rebinds to.
    fn listener_config(
        opts: &Options,
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

    /// What the server does, for the service manager's `STATUS=`.
    fn serving_status(opts: &Options, backing: &Backing, local: SocketAddr) -> String {
        let verb = match opts.mode {
            Mode::Serve => "Serving",
            Mode::Listen { .. } => "Waiting for a migration into",
        };
        format!(
            "{verb} {} ({} bytes) on {}",
            opts.file.display(),
            backing.size(),
            local
        )
    }

    /// Under a service manager, tells it how the migration is going (or that none runs),
    /// when that changed.
    async fn report_status(&self, last: &mut Option<String>) {
        let (Some(notifier), Some(control)) = (&self.notifier, &self.control) else {
            return;
        };
        let summary = control.send(MigrationSummary).await.ok().flatten();
        let text =
            summary.unwrap_or_else(|| Self::serving_status(&self.opts, &self.backing, self.local));
        if last.as_deref() != Some(text.as_str()) {
            notifier.status(&text);
            *last = Some(text);
        }
    }

    async fn wait_for_end(&mut self) -> i32 {
        let mut received = false;
        let mut status_tick =
            tokio::time::interval_at(tokio::time::Instant::now() + STATUS_EVERY, STATUS_EVERY);
        // READY=1 carried this one.
        let mut last_status = Some(Self::serving_status(&self.opts, &self.backing, self.local));
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
                _ = status_tick.tick(), if self.notifier.is_some() => {
                    self.report_status(&mut last_status).await;
                }
                signal = self.stop.wait() => {
                    tracing::info!("Received {signal}: shutting down");
                    return match self.opts.mode {
                        Mode::Serve => {
                            // A signal during an outbound migration abandons it, and the exit
                            // status says it did not complete (flexnbd §2.4).
                            let mirroring = match &self.control {
                                Some(control) => control.send(StopMirror).await.unwrap_or(None),
                                None => None,
                            };
                            match mirroring {
                                None => 0,
                                Some(true) => {
                                    tracing::warn!("A migration was running: it was abandoned; exiting with status 1");
                                    1
                                }
                                Some(false) => {
                                    tracing::error!(
                                        "A migration was running and this server had let go of its copy (in doubt): the destination may hold the authoritative data; exiting with status {EXIT_LET_GO}. Do not serve this file again before checking the destination (docs/migration.md)"
                                    );
                                    EXIT_LET_GO
                                }
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
                        return EXIT_LET_GO;
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
        if let Some(notifier) = &self.notifier {
            notifier.stopping();
        }
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
