//! The task that owns a session's write half and sends its replies.
//!
//! Replies arrive on a bounded channel in completion order. The writer takes everything
//! queued (up to a batch) and sends it with vectored writes, header and payload `Bytes`
//! side by side with no copy. It is the only place that writes to the socket, so replies are
//! never interleaved. A reply's permits are released only after its bytes were written:
//! that is what bounds a session's memory when a client stops reading.
//!
//! The socket is a [`WriteHalf`]: plain TCP (the socket's own half: a vectored write is one
//! `writev`, as before) or TLS, where a vectored write joins a reply header with the start
//! of its payload so that both go in one record, and large payloads go in full 16 KiB
//! records. `sendfile` is for plain TCP only: a cached read that reaches the writer of a
//! TLS connection (the session never sends one) is read and encrypted like a streamed one.

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use crate::storage::Backing;
use crate::tls::WriteHalf;

/// Replies gathered into one vectored write at most.
const BATCH: usize = 64;

/// The permits a request holds from the moment its header is read until its reply has
/// been written: one in-flight slot, and its share of the payload byte budget.
#[derive(Debug, Default)]
pub(crate) struct Permits {
    #[expect(dead_code, reason = "held only for its Drop, which frees the slot")]
    pub slot: Option<OwnedSemaphorePermit>,
    pub bytes: Option<OwnedSemaphorePermit>,
}

/// What follows a reply header.
pub(crate) enum Body {
    None,
    Data(Bytes),
    /// A read too large to buffer whole: the writer reads and sends it part by part, so the
    /// reply stays contiguous on the wire while memory stays bounded.
    File {
        backing: Arc<Backing>,
        offset: u64,
        length: u64,
        part: usize,
    },
    /// A read whose bytes are all in the page cache: `sendfile` hands the cached pages to
    /// the socket, with no copy into a buffer of ours and none out of it (see
    /// [`Backing::is_cached`]). Plain TCP only: a TLS connection must encrypt every byte.
    Cached {
        backing: Arc<Backing>,
        offset: u64,
        length: u64,
    },
}

impl Body {
    /// Sent by a routine of its own rather than gathered into a vectored write.
    fn is_streamed(&self) -> bool {
        matches!(self, Body::File { .. } | Body::Cached { .. })
    }
}

/// A reply header, stored inline: replies are the hottest allocation site otherwise.
/// Large enough for every header the protocol has with its fixed-size payload prefix: an
/// extended hole chunk, the largest, is 32 + 12 bytes.
pub(crate) struct Header {
    bytes: [u8; HEADER_MAX],
    len: u8,
}

const HEADER_MAX: usize = 48;

thread_local! {
    /// Scratch space for the encoders, which append to a Vec.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(HEADER_MAX));
}

impl Header {
    /// `encoded` must be at most 48 bytes long.
    pub fn new(encoded: &[u8]) -> Header {
        let mut bytes = [0u8; HEADER_MAX];
        bytes[..encoded.len()].copy_from_slice(encoded);
        Header {
            bytes,
            len: encoded.len() as u8,
        }
    }

    /// A header produced by an encoder that appends to a `Vec` (at most 48 bytes).
    pub fn encode(encoder: impl FnOnce(&mut Vec<u8>)) -> Header {
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            scratch.clear();
            encoder(&mut scratch);
            Header::new(&scratch)
        })
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// One reply, ready to be written.
pub(crate) struct Outgoing {
    pub header: Header,
    pub body: Body,
    #[expect(
        dead_code,
        reason = "held only for its Drop, after the reply is written"
    )]
    pub permits: Permits,
}

/// Runs until the channel closes (every sender gone) or a write fails. Sends `hello`
/// first (nothing if it is empty: a new-style greeting was sent by the negotiation), then
/// the replies.
pub(crate) async fn run(
    mut sock: WriteHalf,
    hello: Bytes,
    mut replies: mpsc::Receiver<Outgoing>,
) -> io::Result<()> {
    sock.write_all(&hello).await?;
    let mut batch: Vec<Outgoing> = Vec::with_capacity(BATCH);
    while let Some(first) = replies.recv().await {
        batch.push(first);
        while batch.len() < BATCH {
            match replies.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        write_batch(&mut sock, &mut batch).await?;
    }
    sock.shutdown().await
}

async fn write_batch(sock: &mut WriteHalf, batch: &mut Vec<Outgoing>) -> io::Result<()> {
    let mut start = 0;
    while start < batch.len() {
        // Send every in-memory reply up to the next file-streamed one in one go.
        let end = batch[start..]
            .iter()
            .position(|o| o.body.is_streamed())
            .map_or(batch.len(), |p| start + p);
        write_vectored_all(sock, &batch[start..end]).await?;
        if end < batch.len() {
            match &batch[end].body {
                Body::Cached { .. } if !sock.is_tls() => {
                    send_cached_reply(sock, &batch[end]).await?
                }
                body => {
                    // A TLS session never asks for `sendfile` (the tests run with debug
                    // assertions); were it to, the data is still read and encrypted.
                    debug_assert!(
                        !matches!(body, Body::Cached { .. }),
                        "sendfile asked of a TLS connection"
                    );
                    stream_file_reply(sock, &batch[end]).await?
                }
            }
            start = end + 1;
        } else {
            start = end;
        }
    }
    // Dropping the replies releases their permits.
    batch.clear();
    Ok(())
}

async fn write_vectored_all(sock: &mut WriteHalf, items: &[Outgoing]) -> io::Result<()> {
    if items.is_empty() {
        return Ok(());
    }
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(items.len() * 2);
    for item in items {
        if item.header.len > 0 {
            slices.push(IoSlice::new(item.header.as_slice()));
        }
        if let Body::Data(data) = &item.body {
            if !data.is_empty() {
                slices.push(IoSlice::new(data));
            }
        }
    }
    write_slices_all(sock, &mut slices).await
}

/// Writes every byte of `slices` with vectored writes.
async fn write_slices_all(sock: &mut WriteHalf, slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    let mut slices = slices;
    while !slices.is_empty() {
        let n = sock.write_vectored(slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

/// Parts a cached read is read in when it cannot be sent with `sendfile` (over TLS).
const CACHED_PART: usize = 1 << 20;

/// Sends a read part by part, each read on the blocking pool. The header goes with the
/// first part, in one vectored write: over TLS that puts it in the first record instead of
/// a record of its own.
async fn stream_file_reply(sock: &mut WriteHalf, item: &Outgoing) -> io::Result<()> {
    let (backing, offset, length, part) = match &item.body {
        Body::File {
            backing,
            offset,
            length,
            part,
        } => (backing, offset, length, *part),
        Body::Cached {
            backing,
            offset,
            length,
        } => (backing, offset, length, CACHED_PART),
        _ => return Ok(()),
    };
    let mut header = item.header.as_slice();
    let mut done = 0u64;
    while done < *length {
        let len = (*length - done).min(part as u64) as usize;
        let at = offset + done;
        let backing = backing.clone();
        let data = tokio::task::spawn_blocking(move || {
            let mut buf = BytesMut::with_capacity(len);
            backing.read_into(&mut buf, at, len).map(|()| buf)
        })
        .await
        .map_err(io::Error::other)??;
        // A failure here, after an OK header, can only be reported by closing the
        // connection: the `?` ends the writer and the session closes the socket.
        write_slices_all(sock, &mut [IoSlice::new(header), IoSlice::new(&data)]).await?;
        header = &[];
        done += len as u64;
    }
    sock.write_all(header).await
}

/// Sends a reply whose data is in the page cache: the header with MSG_MORE (so that it
/// leaves in the same segment as the first data), then the data with `sendfile`.
async fn send_cached_reply(sock: &mut WriteHalf, item: &Outgoing) -> io::Result<()> {
    let (
        Body::Cached {
            backing,
            offset,
            length,
        },
        WriteHalf::Plain(sock),
    ) = (&item.body, &*sock)
    else {
        return Ok(());
    };
    let stream: &TcpStream = sock.as_ref();
    let mut header = item.header.as_slice();
    while !header.is_empty() {
        let n = stream
            .async_io(Interest::WRITABLE, || send_more(stream.as_fd(), header))
            .await?;
        header = &header[n..];
    }
    let mut done = 0u64;
    while done < *length {
        let len = (*length - done).min(SENDFILE_MAX) as usize;
        let n = stream
            .async_io(Interest::WRITABLE, || {
                backing.send_to(stream.as_fd(), offset + done, len)
            })
            .await?;
        if n == 0 {
            // The file ended under the read (truncated from outside). The header promised
            // data, so, as for a failed streamed read, only closing the connection is left.
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} ended at {}", backing.path().display(), offset + done),
            ));
        }
        done += n as u64;
    }
    Ok(())
}

/// The most one `sendfile` call is asked for (the kernel caps it near 2 GiB anyway).
const SENDFILE_MAX: u64 = 1 << 30;

/// `send(2)` with MSG_MORE: the bytes wait for what follows instead of leaving in a
/// segment of their own (TCP_NODELAY is on for every session).
fn send_more(socket: BorrowedFd<'_>, bytes: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `bytes` is a live slice of the given length; the kernel only reads it.
        let n = unsafe {
            libc::send(
                socket.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_MORE | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}
