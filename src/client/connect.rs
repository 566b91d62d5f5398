//! Connecting to an NBD server: TCP with a connect timeout and liveness options, then the
//! handshake within a time limit; with TLS, STARTTLS and the TLS handshake in the middle of
//! it, each part within the same limit.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::protocol::client::{Action, ClientHandshake, HandshakeError, Negotiated};
use crate::tls::{self, ClientTls, Stream, TlsError};

/// TCP liveness of the connection: keepalive probes while nothing is outstanding, and
/// TCP_USER_TIMEOUT for data that is never acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkOptions {
    pub keepalive_idle: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_probes: u32,
    pub user_timeout: Duration,
}

/// How to connect.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// The local address to bind to first, if any.
    pub bind: Option<IpAddr>,
    /// Limit of the TCP connect.
    pub connect_timeout: Duration,
    /// The whole hello (or new-style negotiation) must arrive within this.
    pub hello_timeout: Duration,
    pub link: LinkOptions,
    /// The export asked for from a new-style server.
    pub export: String,
    /// Upgrade to TLS with these credentials (STARTTLS: new-style servers only). A server
    /// certificate must name the address connected to.
    pub tls: Option<Arc<ClientTls>>,
}

/// A connected server, after its handshake.
#[derive(Debug)]
pub struct Connection {
    /// Plain TCP, or TLS when [`ConnectOptions::tls`] was given.
    pub stream: Stream,
    /// What the handshake settled: size, transmission flags, new-style or not.
    pub export: Negotiated,
}

/// Why connecting failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No TCP connection (or the socket could not be set up).
    #[error("couldn't connect to {target}: {why}")]
    Connect { target: SocketAddr, why: String },
    /// Connected, but not a byte of hello within the limit.
    #[error("{target} sent no hello within {limit:?}")]
    NoHello { target: SocketAddr, limit: Duration },
    /// Part of a hello, then nothing more within the limit.
    #[error("{target} sent an incomplete hello within {limit:?}")]
    IncompleteHello { target: SocketAddr, limit: Duration },
    /// The handshake failed (a bad hello, a refused export, the connection ended).
    #[error("{0}")]
    Handshake(#[from] HandshakeError),
    /// The TLS handshake failed (certificate refused, PSK mismatch, timeout, ...).
    #[error("{0}")]
    Tls(#[from] TlsError),
}

/// Connects to `target` and runs the handshake.
pub async fn connect(
    target: SocketAddr,
    options: &ConnectOptions,
) -> Result<Connection, ConnectError> {
    let connect_failed = |why: String| ConnectError::Connect { target, why };
    let socket = if target.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| connect_failed(e.to_string()))?;
    if let Some(bind) = options.bind {
        socket
            .bind(SocketAddr::new(bind, 0))
            .map_err(|e| connect_failed(format!("binding to {bind}: {e}")))?;
    }
    let mut stream =
        match tokio::time::timeout(options.connect_timeout, socket.connect(target)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(connect_failed(e.to_string())),
            Err(_) => return Err(connect_failed("timed out".into())),
        };
    let _ = stream.set_nodelay(true);
    if let Err(e) = watch_link(&stream, &options.link) {
        tracing::warn!("Couldn't set keepalive on the connection to {target}: {e}");
    }
    let mut handshake = ClientHandshake::new(&options.export);
    if options.tls.is_some() {
        handshake = handshake.with_tls();
    }
    let limit = options.hello_timeout;
    let timed_out = |handshake: &ClientHandshake| {
        // Nothing at all is "failed to respond"; a partial hello is a bad one.
        if handshake.received() == 0 {
            ConnectError::NoHello { target, limit }
        } else {
            ConnectError::IncompleteHello { target, limit }
        }
    };
    let first = tokio::time::timeout(limit, drive(&mut stream, &mut handshake)).await;
    match first {
        Ok(Driven::Done(export)) => {
            return Ok(Connection {
                stream: Stream::Plain(stream),
                export,
            })
        }
        Ok(Driven::Failed(e)) => return Err(e.into()),
        Ok(Driven::StartTls) => {}
        Err(_) => return Err(timed_out(&handshake)),
    }
    let Some(credentials) = &options.tls else {
        return Err(HandshakeError::Spent.into());
    };
    let host = target.ip().to_string();
    let mut stream = tls::connect(stream, credentials, &host, limit).await?;
    handshake.tls_started();
    match tokio::time::timeout(limit, drive(&mut stream, &mut handshake)).await {
        Ok(Driven::Done(export)) => Ok(Connection { stream, export }),
        Ok(Driven::Failed(e)) => Err(e.into()),
        Ok(Driven::StartTls) => Err(HandshakeError::Spent.into()),
        Err(_) => Err(ConnectError::IncompleteHello { target, limit }),
    }
}

/// Where [`drive`] stopped.
enum Driven {
    Done(Negotiated),
    /// STARTTLS was acknowledged: the TLS handshake comes next.
    StartTls,
    Failed(HandshakeError),
}

/// Runs `handshake` over `stream` until it is done or asks for TLS, reading no byte beyond
/// it.
async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    handshake: &mut ClientHandshake,
) -> Driven {
    match drive_inner(stream, handshake).await {
        Ok(driven) => driven,
        Err(e) => Driven::Failed(e),
    }
}

async fn drive_inner<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    handshake: &mut ClientHandshake,
) -> Result<Driven, HandshakeError> {
    let mut buf = [0u8; 4096];
    loop {
        match handshake.action() {
            Action::Read(n) => {
                let n = n.min(buf.len());
                match stream.read(&mut buf[..n]).await {
                    Ok(0) => return Err(handshake.closed()),
                    Ok(got) => handshake.feed(&buf[..got])?,
                    Err(e) => return Err(handshake.read_failed(&e.to_string())),
                }
            }
            Action::Write(bytes) => {
                // Flushed: a TLS stream may hold what was written.
                let sent = async {
                    stream.write_all(&bytes).await?;
                    stream.flush().await
                };
                if let Err(e) = sent.await {
                    return Err(handshake.write_failed(&e.to_string()));
                }
            }
            Action::StartTls => return Ok(Driven::StartTls),
            Action::Done(negotiated) => return Ok(Driven::Done(negotiated)),
            Action::Failed => return Err(HandshakeError::Spent),
        }
    }
}

/// Makes a dead or blackholed link fail in about `link.user_timeout`: keepalive probes
/// while nothing is outstanding, TCP_USER_TIMEOUT for data that is never acknowledged.
fn watch_link(stream: &TcpStream, link: &LinkOptions) -> io::Result<()> {
    let socket = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(link.keepalive_idle)
        .with_interval(link.keepalive_interval)
        .with_retries(link.keepalive_probes);
    socket.set_tcp_keepalive(&keepalive)?;
    socket.set_tcp_user_timeout(Some(link.user_timeout))
}

#[cfg(test)]
mod tests {
    use std::io;

    use crate::protocol::client::ClientHandshake;

    /// The end of the connection during the hello reads as it always has in the log
    /// (`io::ErrorKind::UnexpectedEof`'s text).
    #[test]
    fn hello_eof_text_is_the_io_error_text() {
        let eof = io::Error::from(io::ErrorKind::UnexpectedEof).to_string();
        let mut handshake = ClientHandshake::new("");
        assert_eq!(
            handshake.closed().to_string(),
            format!("reading the hello failed: {eof}")
        );
    }
}
