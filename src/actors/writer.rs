//! The task that owns a session's write half and sends its replies.
//!
//! Replies arrive on a bounded channel in completion order. The writer takes everything
//! queued (up to a batch) and sends it with vectored writes, header and payload `Bytes`
//! side by side with no copy. It is the only place that writes to the socket, so replies are
//! never interleaved. A reply's permits are released only after its bytes were written:
//! that is what bounds a session's memory when a client stops reading.

use std::io::{self, IoSlice};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use crate::storage::Backing;

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

impl Outgoing {
    /// Negotiation replies that hold `share` of the payload budget until written.
    pub fn raw_holding(bytes: Bytes, share: OwnedSemaphorePermit) -> Outgoing {
        Outgoing {
            header: Header::new(&[]),
            body: Body::Data(bytes),
            permits: Permits {
                slot: None,
                bytes: Some(share),
            },
        }
    }
}

/// Runs until the channel closes (every sender gone) or a write fails. Sends `hello`
/// first, then the replies.
pub(crate) async fn run(
    mut sock: OwnedWriteHalf,
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

async fn write_batch(sock: &mut OwnedWriteHalf, batch: &mut Vec<Outgoing>) -> io::Result<()> {
    let mut start = 0;
    while start < batch.len() {
        // Send every in-memory reply up to the next file-streamed one in one go.
        let end = batch[start..]
            .iter()
            .position(|o| matches!(o.body, Body::File { .. }))
            .map_or(batch.len(), |p| start + p);
        write_vectored_all(sock, &batch[start..end]).await?;
        if end < batch.len() {
            stream_file_reply(sock, &batch[end]).await?;
            start = end + 1;
        } else {
            start = end;
        }
    }
    // Dropping the replies releases their permits.
    batch.clear();
    Ok(())
}

async fn write_vectored_all(sock: &mut OwnedWriteHalf, items: &[Outgoing]) -> io::Result<()> {
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
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        let n = sock.write_vectored(slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

async fn stream_file_reply(sock: &mut OwnedWriteHalf, item: &Outgoing) -> io::Result<()> {
    let Body::File {
        backing,
        offset,
        length,
        part,
    } = &item.body
    else {
        return Ok(());
    };
    sock.write_all(item.header.as_slice()).await?;
    let mut done = 0u64;
    while done < *length {
        let len = (*length - done).min(*part as u64) as usize;
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
        sock.write_all(&data).await?;
        done += len as u64;
    }
    Ok(())
}
