//! Connecting to an NBD server: TCP with a connect timeout and liveness options, then the
//! handshake within a time limit.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::protocol::client::{Action, ClientHandshake, HandshakeError, Negotiated};

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
#[derive(Clone, Debug, PartialEq, Eq)]
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
}

/// A connected server, after its handshake.
#[derive(Debug)]
pub struct Connection {
    pub stream: TcpStream,
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
    let limit = options.hello_timeout;
    let export = match tokio::time::timeout(limit, drive(&mut stream, &mut handshake)).await {
        Ok(result) => result?,
        // Nothing at all is "failed to respond"; a partial hello is a bad one.
        Err(_) if handshake.received() == 0 => return Err(ConnectError::NoHello { target, limit }),
        Err(_) => return Err(ConnectError::IncompleteHello { target, limit }),
    };
    Ok(Connection { stream, export })
}

/// Runs `handshake` over `stream`, reading no byte beyond it.
async fn drive(
    stream: &mut TcpStream,
    handshake: &mut ClientHandshake,
) -> Result<Negotiated, HandshakeError> {
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
                if let Err(e) = stream.write_all(&bytes).await {
                    return Err(handshake.write_failed(&e.to_string()));
                }
            }
            Action::Done(negotiated) => return Ok(negotiated),
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
