//! The control actor: the Unix control socket and its text protocol (flexnbd §6).
//!
//! Unlike C flexnbd, control connections are served concurrently: each connection is a
//! task that reads its request, asks the control actor to execute it and writes the single
//! response line. A client that connects and never sends blocks nobody (it is dropped after
//! [`IDLE_LIMIT`] without an answer).
//!
//! # Handshakes
//! - [`Execute`] (connection task → control): answered with the exact response line. If
//!   the control actor is gone the task answers `1: shutting down` itself.
//! - Status: control → listener [`GetStatus`], answered at once.
//! - `acl`: control → listener [`ReplaceAcl`], answered once the list is in force.
//! - [`StopControl`] (main → control, at shutdown): stops accepting; answered when the
//!   socket is closed, so that main can unlink its path before the NBD port closes.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures_util::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::acl::Acl;
use crate::protocol::control::{
    response, ControlRequest, RequestReader, Status, FAILED, MISSING_COMMAND, OK, UNKNOWN_COMMAND,
};
use crate::storage::AllocationMap;

use super::listener::{GetStatus, Listener, ReplaceAcl};

/// A control connection that sends nothing for this long is closed without an answer.
pub const IDLE_LIMIT: Duration = Duration::from_secs(60);

/// What the control actor needs to answer.
pub struct ControlConfig {
    pub pid: u32,
    pub size: u64,
    /// Fixed at startup; `acl` keeps it (flexnbd §8).
    pub default_deny: bool,
    /// `serve`: true from the start.
    pub has_control: bool,
    pub listener: Addr<Listener>,
    pub allocation: Arc<AllocationMap>,
}

pub struct Control {
    socket: Option<std::os::unix::net::UnixListener>,
    accept: Option<SpawnHandle>,
    config: ControlConfig,
}

/// Connection task → control: execute a parsed request, answer the response line.
#[derive(Message, Debug)]
#[rtype(result = "String")]
pub struct Execute(pub ControlRequest);

/// Main → control: stop accepting and close the socket.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct StopControl;

struct Accepted(std::io::Result<UnixStream>);

impl Control {
    /// `socket` must already be bound and listening (after the NBD port, flexnbd §5.1).
    pub fn new(socket: std::os::unix::net::UnixListener, config: ControlConfig) -> Control {
        Control {
            socket: Some(socket),
            accept: None,
            config,
        }
    }

    fn accept_stream(listener: tokio::net::UnixListener) -> impl Stream<Item = Accepted> {
        futures_util::stream::unfold(listener, |listener| async move {
            let result = listener.accept().await.map(|(stream, _)| stream);
            if let Err(e) = &result {
                tracing::error!("accept() on the control socket failed: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Some((Accepted(result), listener))
        })
    }

    fn status(&self) -> ResponseFuture<String> {
        let listener = self.config.listener.clone();
        let map = self.config.allocation.clone();
        let (pid, size, has_control) = (self.config.pid, self.config.size, self.config.has_control);
        Box::pin(async move {
            let Ok(clients) = listener.send(GetStatus).await else {
                return response(FAILED, "shutting down");
            };
            let status = Status {
                pid,
                size,
                is_mirroring: false,
                clients_allowed: clients.clients_allowed,
                num_clients: clients.num_clients,
                has_control,
                migration: None,
                extra: vec![
                    ("alloc_map", map.state().name().to_owned()),
                    ("alloc_map_progress", map.progress_percent().to_string()),
                ],
            };
            response(OK, &status.line())
        })
    }

    fn acl(&self, entries: Vec<String>) -> ResponseFuture<String> {
        let parsed = Acl::parse(&entries, self.config.default_deny);
        let listener = self.config.listener.clone();
        Box::pin(async move {
            match parsed {
                Err(bad) => response(FAILED, &format!("bad spec: {}", bad.0)),
                Ok(acl) => match listener.send(ReplaceAcl(acl)).await {
                    Ok(()) => response(OK, "updated"),
                    Err(_) => response(FAILED, "shutting down"),
                },
            }
        })
    }
}

impl Actor for Control {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let Some(socket) = self.socket.take() else {
            return;
        };
        match socket
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixListener::from_std(socket))
        {
            Ok(listener) => self.accept = Some(ctx.add_stream(Self::accept_stream(listener))),
            Err(e) => {
                tracing::error!(
                    "Couldn't register the control socket: {e}; control is unavailable"
                );
                ctx.stop();
            }
        }
    }
}

impl StreamHandler<Accepted> for Control {
    fn handle(&mut self, item: Accepted, ctx: &mut Self::Context) {
        if let Accepted(Ok(stream)) = item {
            actix_rt::spawn(serve_connection(stream, ctx.address()));
        }
    }

    fn finished(&mut self, _ctx: &mut Self::Context) {}
}

impl Handler<Execute> for Control {
    type Result = ResponseFuture<String>;

    fn handle(&mut self, msg: Execute, _ctx: &mut Self::Context) -> Self::Result {
        let now = |text: String| -> ResponseFuture<String> { Box::pin(async move { text }) };
        match msg.0 {
            ControlRequest::Missing => now(response(MISSING_COMMAND, "missing command")),
            ControlRequest::Unknown => now(response(UNKNOWN_COMMAND, "unknown command")),
            ControlRequest::Status => self.status(),
            ControlRequest::Acl(entries) => self.acl(entries),
            ControlRequest::Break => now(response(FAILED, "not mirroring")),
            ControlRequest::MirrorMaxBps(_) => now(response(FAILED, "Not currently mirroring")),
            ControlRequest::MirrorRefused(text) => now(response(FAILED, text)),
            ControlRequest::Mirror(_) => now(response(
                FAILED,
                "mirroring is not available in this version of flexnbd",
            )),
        }
    }
}

impl Handler<StopControl> for Control {
    type Result = ();

    fn handle(&mut self, _msg: StopControl, ctx: &mut Self::Context) {
        if let Some(accept) = self.accept.take() {
            ctx.cancel_future(accept);
        }
        ctx.stop();
    }
}

/// One control connection: read the request, execute it, write the answer, close.
async fn serve_connection(mut stream: UnixStream, control: Addr<Control>) {
    let mut reader = RequestReader::default();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(IDLE_LIMIT, stream.read(&mut buf)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => {
                if reader.feed(&buf[..n]) {
                    break;
                }
            }
            Ok(Err(e)) => {
                tracing::warn!("Reading a control request failed: {e}");
                return;
            }
            Err(_) => {
                tracing::warn!("A control client sent nothing for {IDLE_LIMIT:?}; closing it");
                return;
            }
        }
    }
    let request = ControlRequest::parse(&reader.into_lines());
    tracing::info!("Control request: {request:?}");
    let answer = control
        .send(Execute(request))
        .await
        .unwrap_or_else(|_| response(FAILED, "shutting down"));
    if let Ok(Err(e)) = tokio::time::timeout(IDLE_LIMIT, stream.write_all(answer.as_bytes())).await
    {
        tracing::warn!("Answering a control request failed: {e}");
    }
    let _ = stream.shutdown().await;
}
