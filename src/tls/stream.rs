//! The transport both sides use: a TCP socket, or TLS over one.
//!
//! Plain TCP stays exactly what it was: [`Stream::into_split`] of a plain stream is
//! `TcpStream::into_split` (no lock, no allocation), and every call is one `match` away from
//! the socket's own. TLS halves share the session through `tokio::io::split` (a lock per
//! call): a TLS session has one state for both directions.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_openssl::SslStream;

/// Vectored writes of TLS halves gather at most this much into one buffer (one `SSL_write`,
/// so the header of a reply and its payload share a record) before writing: one full
/// record. With ENABLE_PARTIAL_WRITE (set on our contexts) an `SSL_write` returns after
/// each record, so gathering more would copy bytes only to copy them again on the next
/// call.
const COALESCE: usize = 16 * 1024;

/// A connection: plain TCP or TLS.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<SslStream<TcpStream>>),
}

impl Stream {
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref(),
        }
    }

    /// Splits into halves that can be used from two tasks.
    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Plain(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Plain(r), WriteHalf::Plain(w))
            }
            Stream::Tls(s) => {
                let fd = s.get_ref().as_raw_fd();
                let (r, w) = tokio::io::split(*s);
                (
                    ReadHalf::Tls { half: r, fd },
                    WriteHalf::Tls { half: w, fd },
                )
            }
        }
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        self.tcp().as_raw_fd()
    }
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Stream {
        Stream::Plain(s)
    }
}

/// The read half of a [`Stream`].
#[derive(Debug)]
pub enum ReadHalf {
    Plain(OwnedReadHalf),
    Tls {
        half: tokio::io::ReadHalf<SslStream<TcpStream>>,
        /// The socket's descriptor (valid while either half lives).
        fd: RawFd,
    },
}

impl ReadHalf {
    /// The plain TCP half, for what only a socket can do (`try_read` while busy-polling).
    pub fn as_plain_mut(&mut self) -> Option<&mut OwnedReadHalf> {
        match self {
            ReadHalf::Plain(r) => Some(r),
            ReadHalf::Tls { .. } => None,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, ReadHalf::Tls { .. })
    }
}

impl AsRawFd for ReadHalf {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            ReadHalf::Plain(r) => r.as_ref().as_raw_fd(),
            ReadHalf::Tls { fd, .. } => *fd,
        }
    }
}

/// The write half of a [`Stream`].
#[derive(Debug)]
pub enum WriteHalf {
    Plain(OwnedWriteHalf),
    Tls {
        half: tokio::io::WriteHalf<SslStream<TcpStream>>,
        /// The socket's descriptor (valid while either half lives).
        fd: RawFd,
    },
}

impl WriteHalf {
    pub fn is_tls(&self) -> bool {
        matches!(self, WriteHalf::Tls { .. })
    }
}

impl AsRawFd for WriteHalf {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            WriteHalf::Plain(w) => w.as_ref().as_raw_fd(),
            WriteHalf::Tls { fd, .. } => *fd,
        }
    }
}

impl AsyncRead for Stream {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

/// `AsyncWrite` for an enum of a plain and a TLS transport ([`Stream`], [`WriteHalf`]):
/// every call is a `match` that forwards to the variant's own (vectored writes over TLS
/// go through [`poll_write_coalesced`]). `$plain` and `$tls` are the two variants'
/// patterns, binding what `$p` and `$t` turn into the `&mut` transport to pin. The
/// expansion is the hand-written `match` it replaces: the plain path stays one `match`
/// away from the socket, with no boxing or dynamic dispatch.
macro_rules! impl_async_write {
    ($ty:ty, $plain:pat => $p:expr, $tls:pat => $t:expr) => {
        impl AsyncWrite for $ty {
            #[inline]
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $plain => Pin::new($p).poll_write(cx, buf),
                    $tls => Pin::new($t).poll_write(cx, buf),
                }
            }

            #[inline]
            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $plain => Pin::new($p).poll_write_vectored(cx, bufs),
                    $tls => poll_write_coalesced(Pin::new($t), cx, bufs),
                }
            }

            fn is_write_vectored(&self) -> bool {
                match self {
                    $plain => $p.is_write_vectored(),
                    // The TLS variant: vectored writes are coalesced.
                    _ => true,
                }
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $plain => Pin::new($p).poll_flush(cx),
                    $tls => Pin::new($t).poll_flush(cx),
                }
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $plain => Pin::new($p).poll_shutdown(cx),
                    $tls => Pin::new($t).poll_shutdown(cx),
                }
            }
        }
    };
}

impl_async_write!(Stream, Stream::Plain(s) => s, Stream::Tls(s) => s.as_mut());

impl AsyncRead for ReadHalf {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadHalf::Plain(r) => Pin::new(r).poll_read(cx, buf),
            ReadHalf::Tls { half, .. } => Pin::new(half).poll_read(cx, buf),
        }
    }
}

impl_async_write!(WriteHalf, WriteHalf::Plain(w) => w, WriteHalf::Tls { half, .. } => half);

/// A vectored write over TLS. OpenSSL has no vectored write, and writing the slices one by
/// one would make a record of every small slice (a 16-byte reply header alone). Small
/// leading slices are copied together with the start of the next ones, up to [`COALESCE`]
/// bytes, into one `SSL_write`; a first slice that is already large is written as it is.
///
/// A TLS write, once begun, must be retried with the same bytes: tokio's contract (the
/// caller retries with the same buffers after `Pending`) together with OpenSSL's
/// ACCEPT_MOVING_WRITE_BUFFER mode (set on our contexts) makes the copy safe to rebuild.
fn poll_write_coalesced<W: AsyncWrite>(
    mut w: Pin<&mut W>,
    cx: &mut Context<'_>,
    bufs: &[IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    let Some(first) = bufs.iter().position(|b| !b.is_empty()) else {
        return Poll::Ready(Ok(0));
    };
    let bufs = &bufs[first..];
    if bufs.len() == 1 || bufs[0].len() >= COALESCE {
        return w.as_mut().poll_write(cx, &bufs[0]);
    }
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    let mut joined = Vec::with_capacity(total.min(COALESCE));
    for b in bufs {
        let room = COALESCE - joined.len();
        if room == 0 {
            break;
        }
        joined.extend_from_slice(&b[..b.len().min(room)]);
    }
    w.as_mut().poll_write(cx, &joined)
}
