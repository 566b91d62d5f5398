//! New-style negotiation of one connection, STARTTLS and the TLS handshake included.
//!
//! It runs on the whole connection, before the session splits it into the reader's and the
//! writer's halves: a TLS handshake needs the socket in both directions, and after
//! STARTTLS the halves that exist are those of the TLS session, not of the socket. So the
//! negotiation owns the [`Stream`], writes its replies itself (one write per batch of
//! replies, which over TLS is one record per 16 KiB), and hands back the stream it ended
//! on (plain, or TLS after a STARTTLS) with the bytes that followed the last option. Only
//! then does the session split it; the transmission phase never looks at TLS again except
//! through the halves.
//!
//! Everything here runs on the session's thread (its arbiter), the TLS handshake too: a
//! connection's TLS work stays where the rest of its work is, and nothing blocks (the
//! handshake is async).
//!
//! Bounds: the whole negotiation, handshake included, ends within [`NEGOTIATION_LIMIT`],
//! so a client that stalls (after the greeting, in an option, in the middle of the TLS
//! handshake) never holds a client slot for ever. Replies are written before more input
//! is read, so a client that sends options without reading the replies stops us reading:
//! TCP pushes back, and memory stays at one slice of replies.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::protocol::newstyle::{
    Negotiated, NegotiationConfig, Progress, ServerNegotiation, TlsPolicy, TlsProgress,
};
use crate::tls::{self, ServerTls, Stream};

/// The whole of new-style negotiation must end within this, with or without `-k` (qemu-nbd
/// allows 10 s too); it includes sending the option replies and the TLS handshake.
pub(crate) const NEGOTIATION_LIMIT: Duration = Duration::from_secs(10);
/// Input fed to the negotiation at once: one message of replies stays small (a 16-byte
/// LIST can draw a reply a hundred times its size).
const NEGOTIATION_SLICE: usize = 4096;

/// TLS as a server offers it: the policy and the credentials, loaded once at startup and
/// shared by every connection.
#[derive(Clone, Debug)]
pub struct SessionTls {
    /// [`TlsPolicy::Optional`] (`--tls on`) or [`TlsPolicy::Required`] (`--tls require`).
    pub policy: TlsPolicy,
    pub creds: Arc<ServerTls>,
}

/// How a negotiation ended well: the stream transmission continues on, the bytes already
/// read past the last option (the first requests), and what was agreed.
pub(crate) struct Negotiation {
    pub stream: Stream,
    pub buffered: BytesMut,
    pub negotiated: Negotiated,
}

/// Runs new-style negotiation on `stream` to its end, within [`NEGOTIATION_LIMIT`].
/// `None` if the client aborted, failed, went away or took too long; the reason is logged.
pub(crate) async fn negotiate(
    stream: Stream,
    config: NegotiationConfig,
    tls: Option<SessionTls>,
    peer: SocketAddr,
) -> Option<Negotiation> {
    let deadline = Instant::now() + NEGOTIATION_LIMIT;
    let steps = steps(stream, config, tls, peer, deadline);
    match tokio::time::timeout_at(deadline, steps).await {
        Ok(outcome) => outcome,
        Err(_) => {
            tracing::warn!(
                "Client {peer} did not finish negotiating within {} s; closing it",
                NEGOTIATION_LIMIT.as_secs()
            );
            None
        }
    }
}

async fn steps(
    mut stream: Stream,
    config: NegotiationConfig,
    tls: Option<SessionTls>,
    peer: SocketAddr,
    deadline: Instant,
) -> Option<Negotiation> {
    let mut negotiation = ServerNegotiation::new(config);
    if let Some(tls) = &tls {
        negotiation = negotiation.with_tls(tls.policy);
    }
    if let Err(e) = stream.write_all(&negotiation.greeting()).await {
        tracing::info!("Client {peer} went away before the greeting: {e}");
        return None;
    }
    let mut buf = BytesMut::with_capacity(NEGOTIATION_SLICE);
    let mut slice = NEGOTIATION_SLICE;
    let mut out = Vec::new();
    loop {
        out.clear();
        let take = buf.len().min(slice);
        let offered_all = take == buf.len();
        let mut input = buf.split_to(take);
        let progress = negotiation.feed_tls(&mut input, &mut out);
        let unused = input.len();
        input.unsplit(buf.split());
        buf = input;
        // Replies (an error's too) go out before anything else happens.
        if !out.is_empty() {
            if let Err(e) = stream.write_all(&out).await {
                tracing::info!("Client {peer} went away during negotiation: {e}");
                return None;
            }
        }
        match progress {
            // More is buffered than was offered: go on without reading, with a larger
            // slice if this one held no complete option.
            Ok(TlsProgress::Progress(Progress::NeedMore)) if !offered_all => {
                slice = if unused == take {
                    slice.saturating_mul(2)
                } else {
                    NEGOTIATION_SLICE
                };
            }
            Ok(TlsProgress::Progress(Progress::NeedMore)) => {
                slice = NEGOTIATION_SLICE;
                buf.reserve(NEGOTIATION_SLICE);
                match stream.read_buf(&mut buf).await {
                    Ok(0) => {
                        tracing::info!("Client {peer} closed the connection during negotiation");
                        return None;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!("Reading from client {peer} during negotiation failed: {e}");
                        return None;
                    }
                }
            }
            Ok(TlsProgress::Progress(Progress::Done(negotiated))) => {
                return Some(Negotiation {
                    stream,
                    buffered: buf,
                    negotiated,
                });
            }
            Ok(TlsProgress::Progress(Progress::Aborted)) => {
                tracing::info!("Client {peer} ended negotiation");
                return None;
            }
            Ok(TlsProgress::StartTls) => {
                // The state machine reports STARTTLS only under a policy, which comes with
                // credentials; and only once, so the stream is still plain.
                let (Some(tls), Stream::Plain(tcp)) = (&tls, stream) else {
                    tracing::error!("Client {peer}: STARTTLS without TLS configured");
                    return None;
                };
                let limit = deadline.saturating_duration_since(Instant::now());
                match tls::accept(tcp, &tls.creds, limit).await {
                    Ok(upgraded) => {
                        stream = upgraded;
                        negotiation.tls_started();
                        tracing::debug!("Client {peer} upgraded to TLS");
                    }
                    Err(e) => {
                        // The error names the client.
                        tracing::warn!("{e}; closing the connection");
                        return None;
                    }
                }
            }
            Err(e) => {
                tracing::warn!("Negotiation with client {peer} failed: {e}");
                return None;
            }
        }
    }
}
