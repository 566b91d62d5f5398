//! Sockets as flexnbd configures them (`flexnbd-compat.md` §4.5, §5.1).

use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};

/// Listen backlog of the NBD socket.
const BACKLOG: i32 = 10;
/// Binding is retried this often on EADDRNOTAVAIL, one second apart.
const BIND_ATTEMPTS: u32 = 10;

/// Creates the NBD listening socket: SO_REUSEADDR, TCP_NODELAY, backlog 10. Binding is
/// retried every second (ten times) while the address is not available yet.
pub fn bind_listener(addr: IpAddr, port: u16) -> io::Result<TcpListener> {
    let mut attempt = 1;
    loop {
        match bind_listener_once(addr, port) {
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) && attempt < BIND_ATTEMPTS => {
                tracing::warn!(
                    "Couldn't bind to {} ({e}), retrying in 1 s",
                    SocketAddr::new(addr, port)
                );
                std::thread::sleep(Duration::from_secs(1));
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// One attempt at binding the NBD listening socket (the rebinding actor retries itself).
pub fn bind_listener_once(addr: IpAddr, port: u16) -> io::Result<TcpListener> {
    let target = SocketAddr::new(addr, port);
    let socket = Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nodelay(true)?;
    socket.bind(&target.into())?;
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Options of every accepted NBD socket: keepalive (30 s idle, 10 s interval, 3 probes)
/// and TCP_NODELAY.
pub fn configure_accepted(stream: &impl std::os::fd::AsFd) -> io::Result<()> {
    let sock = SockRef::from(stream);
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    sock.set_tcp_keepalive(&keepalive)?;
    sock.set_nodelay(true)
}

/// Connects to an NBD server with a timeout, binding first only when asked to (C flexnbd
/// always bound, which broke IPv6 without `--bind`).
pub fn connect(
    addr: IpAddr,
    port: u16,
    bind: Option<IpAddr>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let target = SocketAddr::new(addr, port);
    let socket = Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    if let Some(local) = bind {
        socket.bind(&SocketAddr::new(local, 0).into())?;
    }
    socket.connect_timeout(&target.into(), timeout)?;
    socket.set_nodelay(true)?;
    Ok(socket.into())
}
