//! The client side of the handshakes, for our own outbound connections (the mirror):
//! old-style (C flexnbd, ours) and fixed new-style (qemu-nbd, nbdkit, nbd-server).
//!
//! Pure: [`ClientHandshake`] is the whole handshake as a state machine, fed the server's
//! bytes; it says what to read and what to send, and ends with the export's size and
//! transmission flags ([`Negotiated`]) or a [`HandshakeError`]. `crate::client` drives it
//! over a socket. It is built from the helpers below: [`classify`] tells the handshake
//! from the first 16 bytes, [`go_request`] is our new-style answer, and
//! [`decode_option_reply`] and [`parse_info_export`] read the option replies.

use super::consts::{IHAVEOPT, NBD_MAGIC, OLDSTYLE_HELLO_LEN, OLDSTYLE_MAGIC};
use super::handshake::{HelloError, OldstyleHello};
use super::newstyle::{client_flags, hflags, opt, rep, OPTION_REPLY_MAGIC};
use super::wire::Reader;

/// What the first 16 bytes of a server's greeting say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Greeting {
    /// Old-style: 136 more bytes of hello follow.
    Oldstyle,
    /// New-style: a 16-bit handshake flags field follows.
    Newstyle,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClientError {
    #[error("the server's greeting does not start with NBDMAGIC")]
    NotNbd,
    #[error("unknown handshake magic {0:#018x}")]
    UnknownHandshake(u64),
    #[error("the server does not offer fixed new-style negotiation")]
    NotFixedNewstyle,
    #[error("bad option reply magic {0:#018x}")]
    BadReplyMagic(u64),
    #[error("option reply of {0} bytes is too long")]
    ReplyTooLong(u32),
    #[error("the server refused the export (option reply {0:#x})")]
    Refused(u32),
    #[error("malformed NBD_INFO_EXPORT")]
    BadInfo,
}

/// Largest option reply payload we read.
pub const MAX_OPTION_REPLY: u32 = 64 * 1024;

pub fn classify(first16: &[u8; 16]) -> Result<Greeting, ClientError> {
    let mut r = Reader::new(first16);
    if r.u64() != Some(NBD_MAGIC) {
        return Err(ClientError::NotNbd);
    }
    match r.u64().expect("16 bytes") {
        OLDSTYLE_MAGIC => Ok(Greeting::Oldstyle),
        IHAVEOPT => Ok(Greeting::Newstyle),
        other => Err(ClientError::UnknownHandshake(other)),
    }
}

/// Our answer to the server's handshake flags: the client flags (4 bytes), then NBD_OPT_GO
/// for `export` with no information requests.
pub fn go_request(server_flags: u16, export: &str) -> Result<Vec<u8>, ClientError> {
    let mut out = client_flags_for(server_flags)?;
    out.extend(go_option(export));
    Ok(out)
}

/// The client flags (4 bytes) answering the server's handshake flags.
fn client_flags_for(server_flags: u16) -> Result<Vec<u8>, ClientError> {
    if server_flags & hflags::FIXED_NEWSTYLE == 0 {
        return Err(ClientError::NotFixedNewstyle);
    }
    let mut flags = client_flags::FIXED_NEWSTYLE;
    if server_flags & hflags::NO_ZEROES != 0 {
        flags |= client_flags::NO_ZEROES;
    }
    Ok(flags.to_be_bytes().to_vec())
}

/// NBD_OPT_GO for `export` with no information requests.
fn go_option(export: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(28 + export.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&opt::GO.to_be_bytes());
    out.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
    out.extend_from_slice(&(export.len() as u32).to_be_bytes());
    out.extend_from_slice(export.as_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out
}

/// An option without data (NBD_OPT_STRUCTURED_REPLY, NBD_OPT_EXTENDED_HEADERS).
fn empty_option(option: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes());
    out
}

/// An option reply header: `(option, reply type, payload length)`.
pub fn decode_option_reply(header: &[u8; 20]) -> Result<(u32, u32, u32), ClientError> {
    let mut r = Reader::new(header);
    let magic = r.u64().expect("20 bytes");
    if magic != OPTION_REPLY_MAGIC {
        return Err(ClientError::BadReplyMagic(magic));
    }
    let (Some(option), Some(kind), Some(len)) = (r.u32(), r.u32(), r.u32()) else {
        unreachable!("20 bytes");
    };
    if len > MAX_OPTION_REPLY {
        return Err(ClientError::ReplyTooLong(len));
    }
    Ok((option, kind, len))
}

/// The size and transmission flags of an `NBD_REP_INFO` payload, if it is `NBD_INFO_EXPORT`.
pub fn parse_info_export(payload: &[u8]) -> Result<Option<(u64, u16)>, ClientError> {
    let mut r = Reader::new(payload);
    let Some(kind) = r.u16() else {
        return Err(ClientError::BadInfo);
    };
    if kind != super::newstyle::info::EXPORT {
        return Ok(None);
    }
    match (r.u64(), r.u16(), r.remaining()) {
        (Some(size), Some(flags), 0) => Ok(Some((size, flags))),
        _ => Err(ClientError::BadInfo),
    }
}

/// What a server's handshake settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// The export's size in bytes.
    pub size: u64,
    /// Its transmission flags.
    pub flags: u16,
    /// Fixed new-style (NBD_OPT_GO); old-style otherwise.
    pub newstyle: bool,
    /// The server acknowledged NBD_OPT_STRUCTURED_REPLY or NBD_OPT_EXTENDED_HEADERS:
    /// replies to reads are structured. Only ever set if asked for.
    pub structured: bool,
    /// The server acknowledged NBD_OPT_EXTENDED_HEADERS: 32-byte headers both ways
    /// (implies `structured`). Only ever set if asked for.
    pub extended: bool,
}

/// Why a handshake failed. The texts are those of the mirror's log lines and of
/// `migration_last_failure`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    /// The first 16 bytes or an old-style hello did not arrive whole: the connection ended
    /// or failed (the text says how).
    #[error("reading the hello failed: {0}")]
    Hello(String),
    /// The connection ended or failed during new-style negotiation.
    #[error("{0}")]
    Connection(String),
    /// A greeting, flags or option reply we cannot accept.
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("{0}")]
    BadHello(#[from] HelloError),
    /// NBD_OPT_GO was answered with an error reply (its type).
    #[error("the destination refused the export (reply {0:#x})")]
    Refused(u32),
    #[error("no NBD_INFO_EXPORT before the ACK")]
    NoExportInfo,
    /// A reply we cannot accept to NBD_OPT_EXTENDED_HEADERS or NBD_OPT_STRUCTURED_REPLY:
    /// an error other than NBD_REP_ERR_UNSUP, another reply type, an ACK with data, or a
    /// reply to another option.
    #[error(
        "option {asked} got an unexpected reply {kind:#x} of {len} bytes (for option {option})"
    )]
    UnexpectedReply {
        asked: u32,
        option: u32,
        kind: u32,
        len: u32,
    },
    /// We asked for TLS and the server greeted old-style, which cannot negotiate it.
    #[error("the destination is old-style and cannot do TLS")]
    OldstyleNoTls,
    /// STARTTLS was refused (NBD_REP_ERR_POLICY, NBD_REP_ERR_UNSUP, ...: the reply type).
    #[error("the destination does not offer TLS (STARTTLS was answered {0:#x})")]
    TlsNotOffered(u32),
    /// We did not ask for TLS and the server answered NBD_REP_ERR_TLS_REQD.
    #[error("the destination requires TLS; give --tls-creds or --tls-psk")]
    TlsRequired,
    /// Bytes beyond the end of the handshake were fed.
    #[error("{0} bytes after the end of the handshake")]
    Trailing(usize),
    /// The handshake had already failed.
    #[error("the handshake already failed")]
    Spent,
}

/// What the driver of a [`ClientHandshake`] does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Read at most this many bytes (never more: what follows the handshake belongs to the
    /// transmission phase) and [`feed`](ClientHandshake::feed) them.
    Read(usize),
    /// Send these bytes whole.
    Write(Vec<u8>),
    /// The server acknowledged STARTTLS: run the client's TLS handshake on the connection,
    /// then call [`tls_started`](ClientHandshake::tls_started) and go on over TLS.
    StartTls,
    /// The handshake is complete.
    Done(Negotiated),
    /// The handshake failed; `feed` (or `closed`, `read_failed`) returned why.
    Failed,
}

#[derive(Debug)]
enum State {
    /// The first 16 bytes: NBDMAGIC and the handshake's magic.
    Greeting,
    /// A greeting with a wrong magic: the rest of an old-style hello is read whole before
    /// it is rejected, so that the peer does not see its hello cut off (flexnbd §10.2).
    Discard(ClientError),
    /// The rest of an old-style hello (the buffer holds the greeting).
    Oldstyle,
    /// The new-style handshake flags.
    Flags,
    /// The header of the reply to NBD_OPT_STARTTLS.
    StartTlsReply,
    /// Its payload (an error's message, read and dropped); `kind` is the reply type.
    StartTlsPayload {
        kind: u32,
        len: usize,
    },
    /// STARTTLS acknowledged: the driver runs the TLS handshake.
    AwaitingTls,
    /// An option reply's header.
    ReplyHeader,
    /// An option reply's payload.
    ReplyPayload {
        kind: u32,
        len: usize,
    },
    /// The header of the reply to NBD_OPT_EXTENDED_HEADERS or NBD_OPT_STRUCTURED_REPLY
    /// (`asked`).
    OptionReplyHeader {
        asked: u32,
    },
    /// Its payload (an error's message, read and dropped).
    OptionReplyPayload {
        asked: u32,
        kind: u32,
        len: usize,
    },
    Done(Negotiated),
    Failed,
}

/// The client side of a handshake, old-style or fixed new-style with NBD_OPT_GO, as a pure
/// state machine: feed it the server's bytes as they arrive; [`action`](Self::action) says
/// what to read or send next.
///
/// A driver reads at most what [`Action::Read`] asks for, sends [`Action::Write`] whole,
/// and reports the end of the connection with [`closed`](Self::closed) and read or write
/// errors with [`read_failed`](Self::read_failed) / [`write_failed`](Self::write_failed).
/// [`received`](Self::received) counts the bytes fed, which tells a server that sent
/// nothing from one whose hello stopped half-way.
#[derive(Debug)]
pub struct ClientHandshake {
    export: String,
    state: State,
    /// The current item's bytes so far.
    buf: Vec<u8>,
    received: u64,
    /// New-style: the export's size and flags, from the last NBD_INFO_EXPORT.
    info: Option<(u64, u16)>,
    /// Bytes to send, taken by [`action`](Self::action).
    out: Option<Vec<u8>>,
    /// Ask a new-style server for extended headers first (falling back to structured
    /// replies on NBD_REP_ERR_UNSUP).
    want_extended: bool,
    /// Ask a new-style server for structured replies (if extended headers are not in force).
    want_structured: bool,
    /// Upgrade to TLS (NBD_OPT_STARTTLS) before any other option.
    want_tls: bool,
    /// What the server acknowledged.
    structured: bool,
    extended: bool,
}

/// Text of the end of the connection while the hello is awaited (`io::ErrorKind::
/// UnexpectedEof`, as the mirror has always logged it).
const HELLO_EOF: &str = "unexpected end of file";
/// Text of the end of the connection during new-style negotiation (tokio's `read_exact`).
const NEGOTIATION_EOF: &str = "early eof";

impl ClientHandshake {
    /// A handshake that asks for `export` if the server is new-style.
    pub fn new(export: &str) -> ClientHandshake {
        ClientHandshake {
            export: export.to_owned(),
            state: State::Greeting,
            buf: Vec::with_capacity(OLDSTYLE_HELLO_LEN),
            received: 0,
            info: None,
            out: None,
            want_extended: false,
            want_structured: false,
            want_tls: false,
            structured: false,
            extended: false,
        }
    }

    /// Upgrades a new-style connection to TLS first: after the client flags, NBD_OPT_STARTTLS;
    /// once the server acknowledges it, [`Action::StartTls`] asks the driver for the TLS
    /// handshake, and every other option goes over TLS. An old-style server, or one that
    /// refuses STARTTLS, fails the handshake.
    pub fn with_tls(mut self) -> ClientHandshake {
        self.want_tls = true;
        self
    }

    /// The driver's TLS handshake (after [`Action::StartTls`]) succeeded: what it feeds
    /// from now on came over TLS.
    pub fn tls_started(&mut self) {
        if let State::AwaitingTls = self.state {
            self.state = self.first_option(Vec::new());
        }
    }

    /// Sends the first option after `prefix` (the client flags, or nothing after STARTTLS):
    /// what was asked for first, or GO.
    fn first_option(&mut self, mut out: Vec<u8>) -> State {
        let asked = if self.want_extended {
            Some(opt::EXTENDED_HEADERS)
        } else if self.want_structured {
            Some(opt::STRUCTURED_REPLY)
        } else {
            None
        };
        match asked {
            None => {
                out.extend(go_option(&self.export));
                self.out = Some(out);
                State::ReplyHeader
            }
            Some(asked) => {
                out.extend(empty_option(asked));
                self.out = Some(out);
                State::OptionReplyHeader { asked }
            }
        }
    }

    /// Also asks a new-style server, before NBD_OPT_GO, for extended headers
    /// (NBD_OPT_EXTENDED_HEADERS); if it answers NBD_REP_ERR_UNSUP, for structured replies
    /// (NBD_OPT_STRUCTURED_REPLY) instead, as QEMU does. Old-style servers negotiate
    /// nothing. [`Negotiated`] says what was granted.
    pub fn with_extended_headers(mut self) -> ClientHandshake {
        self.want_extended = true;
        self.want_structured = true;
        self
    }

    /// Also asks a new-style server, before NBD_OPT_GO, for structured replies
    /// (NBD_OPT_STRUCTURED_REPLY); NBD_REP_ERR_UNSUP leaves them off. Old-style servers
    /// negotiate nothing.
    pub fn with_structured_replies(mut self) -> ClientHandshake {
        self.want_structured = true;
        self
    }

    /// Bytes fed so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// What to do next. A [`Action::Write`] is answered once.
    pub fn action(&mut self) -> Action {
        if let Some(out) = self.out.take() {
            return Action::Write(out);
        }
        match &self.state {
            State::Done(negotiated) => Action::Done(*negotiated),
            State::Failed => Action::Failed,
            State::AwaitingTls => Action::StartTls,
            _ => Action::Read(self.wanted()),
        }
    }

    /// Bytes the current item still needs.
    fn wanted(&self) -> usize {
        let target = match &self.state {
            State::Greeting => 16,
            State::Discard(_) => OLDSTYLE_HELLO_LEN - 16,
            State::Oldstyle => OLDSTYLE_HELLO_LEN,
            State::Flags => 2,
            State::StartTlsReply => 20,
            State::StartTlsPayload { len, .. } => *len,
            State::ReplyHeader => 20,
            State::ReplyPayload { len, .. } => *len,
            State::OptionReplyHeader { .. } => 20,
            State::OptionReplyPayload { len, .. } => *len,
            State::Done(_) | State::Failed | State::AwaitingTls => return 0,
        };
        target - self.buf.len()
    }

    /// Takes the server's bytes (any split). An error ends the handshake.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), HandshakeError> {
        if let State::Failed = self.state {
            return Err(HandshakeError::Spent);
        }
        while !bytes.is_empty() {
            if let State::Done(_) | State::AwaitingTls = self.state {
                return Err(self.fail(HandshakeError::Trailing(bytes.len())));
            }
            let n = self.wanted().min(bytes.len());
            self.buf.extend_from_slice(&bytes[..n]);
            self.received += n as u64;
            bytes = &bytes[n..];
            self.advance()?;
        }
        Ok(())
    }

    /// Moves on while the current item is complete (an empty payload is complete at once).
    fn advance(&mut self) -> Result<(), HandshakeError> {
        while !matches!(
            self.state,
            State::Done(_) | State::Failed | State::AwaitingTls
        ) && self.wanted() == 0
        {
            if let Err(e) = self.step() {
                return Err(self.fail(e));
            }
        }
        Ok(())
    }

    fn fail(&mut self, error: HandshakeError) -> HandshakeError {
        self.state = State::Failed;
        self.out = None;
        error
    }

    /// The current item is complete: decide.
    fn step(&mut self) -> Result<(), HandshakeError> {
        let item = std::mem::take(&mut self.buf);
        self.state = match std::mem::replace(&mut self.state, State::Failed) {
            State::Greeting => {
                let first16: [u8; 16] = item[..].try_into().expect("16 bytes");
                match classify(&first16) {
                    Ok(Greeting::Oldstyle) => {
                        self.buf = item;
                        State::Oldstyle
                    }
                    Ok(Greeting::Newstyle) => State::Flags,
                    Err(e) => State::Discard(e),
                }
            }
            State::Discard(e) => return Err(e.into()),
            State::Oldstyle if self.want_tls => return Err(HandshakeError::OldstyleNoTls),
            State::Oldstyle => {
                let hello: [u8; OLDSTYLE_HELLO_LEN] = item[..].try_into().expect("a hello");
                let hello = OldstyleHello::decode(&hello)?;
                State::Done(Negotiated {
                    size: hello.size,
                    flags: hello.flags,
                    newstyle: false,
                    structured: false,
                    extended: false,
                })
            }
            State::Flags => {
                let server_flags = u16::from_be_bytes([item[0], item[1]]);
                // Without options asked for first, exactly the bytes we have always sent.
                let flags = client_flags_for(server_flags)?;
                if self.want_tls {
                    let mut out = flags;
                    out.extend(empty_option(opt::STARTTLS));
                    self.out = Some(out);
                    State::StartTlsReply
                } else {
                    self.first_option(flags)
                }
            }
            State::StartTlsReply => {
                let header: [u8; 20] = item[..].try_into().expect("20 bytes");
                let (option, kind, len) = decode_option_reply(&header)?;
                if option != opt::STARTTLS || (kind == rep::ACK && len != 0) {
                    return Err(HandshakeError::UnexpectedReply {
                        asked: opt::STARTTLS,
                        option,
                        kind,
                        len,
                    });
                }
                State::StartTlsPayload {
                    kind,
                    len: len as usize,
                }
            }
            State::StartTlsPayload { kind, .. } => match kind {
                rep::ACK => State::AwaitingTls,
                other if other & rep::ERR != 0 => return Err(HandshakeError::TlsNotOffered(other)),
                other => {
                    return Err(HandshakeError::UnexpectedReply {
                        asked: opt::STARTTLS,
                        option: opt::STARTTLS,
                        kind: other,
                        len: item.len() as u32,
                    })
                }
            },
            State::OptionReplyHeader { asked } => {
                let header: [u8; 20] = item[..].try_into().expect("20 bytes");
                // The length is bounded by MAX_OPTION_REPLY here.
                let (option, kind, len) = decode_option_reply(&header)?;
                if kind == rep::ERR_TLS_REQD && !self.want_tls {
                    return Err(HandshakeError::TlsRequired);
                }
                let unexpected = HandshakeError::UnexpectedReply {
                    asked,
                    option,
                    kind,
                    len,
                };
                // One reply only: an ACK without data, or NBD_REP_ERR_UNSUP (its message is
                // read and dropped). Any other error ends the handshake, as in QEMU.
                let acceptable = option == asked
                    && match kind {
                        rep::ACK => len == 0,
                        rep::ERR_UNSUP => true,
                        _ => false,
                    };
                if !acceptable {
                    return Err(unexpected);
                }
                State::OptionReplyPayload {
                    asked,
                    kind,
                    len: len as usize,
                }
            }
            State::OptionReplyPayload { asked, kind, .. } => {
                let granted = kind == rep::ACK;
                if asked == opt::EXTENDED_HEADERS && granted {
                    self.extended = true;
                    self.structured = true;
                } else if asked == opt::STRUCTURED_REPLY && granted {
                    self.structured = true;
                }
                if asked == opt::EXTENDED_HEADERS && !granted && self.want_structured {
                    self.out = Some(empty_option(opt::STRUCTURED_REPLY));
                    State::OptionReplyHeader {
                        asked: opt::STRUCTURED_REPLY,
                    }
                } else {
                    self.out = Some(go_option(&self.export));
                    State::ReplyHeader
                }
            }
            State::ReplyHeader => {
                let header: [u8; 20] = item[..].try_into().expect("20 bytes");
                let (_, kind, len) = decode_option_reply(&header)?;
                State::ReplyPayload {
                    kind,
                    len: len as usize,
                }
            }
            State::ReplyPayload { kind, .. } => match kind {
                rep::INFO => {
                    if let Some(info) = parse_info_export(&item)? {
                        self.info = Some(info);
                    }
                    State::ReplyHeader
                }
                rep::ACK => {
                    let (size, flags) = self.info.ok_or(HandshakeError::NoExportInfo)?;
                    State::Done(Negotiated {
                        size,
                        flags,
                        newstyle: true,
                        structured: self.structured,
                        extended: self.extended,
                    })
                }
                rep::ERR_TLS_REQD if !self.want_tls => return Err(HandshakeError::TlsRequired),
                other => return Err(HandshakeError::Refused(other)),
            },
            done @ (State::Done(_) | State::Failed | State::AwaitingTls) => done,
        };
        Ok(())
    }

    /// The connection ended before the handshake did: why that fails it.
    pub fn closed(&mut self) -> HandshakeError {
        self.connection_lost(None)
    }

    /// Reading failed (`why`: the error's text): why that fails the handshake.
    pub fn read_failed(&mut self, why: &str) -> HandshakeError {
        self.connection_lost(Some(why))
    }

    /// Sending [`Action::Write`] failed.
    pub fn write_failed(&mut self, why: &str) -> HandshakeError {
        self.fail(HandshakeError::Connection(why.to_owned()))
    }

    fn connection_lost(&mut self, why: Option<&str>) -> HandshakeError {
        let error = match std::mem::replace(&mut self.state, State::Failed) {
            // A bad greeting is rejected for what it is, however its rest ends.
            State::Discard(e) => HandshakeError::Client(e),
            State::Greeting | State::Oldstyle => {
                HandshakeError::Hello(why.unwrap_or(HELLO_EOF).to_owned())
            }
            _ => HandshakeError::Connection(why.unwrap_or(NEGOTIATION_EOF).to_owned()),
        };
        self.fail(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::newstyle::{BlockSize, NegotiationConfig, Progress, ServerNegotiation};
    use bytes::BytesMut;

    #[test]
    fn our_client_negotiates_with_our_server() {
        let mut server = ServerNegotiation::new(our_config("disk", 1 << 20));
        let greeting = server.greeting();
        let first16: [u8; 16] = greeting[..16].try_into().unwrap();
        assert_eq!(classify(&first16), Ok(Greeting::Newstyle));
        let flags = u16::from_be_bytes([greeting[16], greeting[17]]);
        let mut input = BytesMut::from(&go_request(flags, "disk").unwrap()[..]);
        let mut out = Vec::new();
        assert!(matches!(
            server.feed(&mut input, &mut out),
            Ok(Progress::Done(_))
        ));
        // The server's replies: INFO (export) then ACK.
        let mut pos = 0;
        let mut export = None;
        loop {
            let header: [u8; 20] = out[pos..pos + 20].try_into().unwrap();
            let (option, kind, len) = decode_option_reply(&header).unwrap();
            assert_eq!(option, opt::GO);
            let payload = &out[pos + 20..pos + 20 + len as usize];
            pos += 20 + len as usize;
            match kind {
                3 => export = parse_info_export(payload).unwrap().or(export),
                1 => break,
                other => panic!("unexpected reply {other:#x}"),
            }
        }
        let (size, tflags) = export.unwrap();
        assert_eq!(size, 1 << 20);
        assert_ne!(tflags & crate::protocol::tflags::SEND_WRITE_ZEROES, 0);
    }

    #[test]
    fn refuses_what_it_cannot_speak() {
        let mut bad = [0u8; 16];
        assert_eq!(classify(&bad), Err(ClientError::NotNbd));
        bad[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
        assert!(matches!(
            classify(&bad),
            Err(ClientError::UnknownHandshake(_))
        ));
        assert_eq!(go_request(0, ""), Err(ClientError::NotFixedNewstyle));
        assert_eq!(parse_info_export(&[0, 0, 1]), Err(ClientError::BadInfo));
        assert_eq!(parse_info_export(&[0, 1, 0, 0]), Ok(None));
    }

    // -----------------------------------------------------------------------------------
    // The handshake state machine.

    use crate::protocol::handshake::OldstyleHello;
    use crate::protocol::newstyle::{info, rep};

    const SIZE: u64 = 7 << 20;

    fn oldstyle_hello() -> Vec<u8> {
        OldstyleHello {
            size: SIZE,
            flags: 13,
        }
        .encode()
        .to_vec()
    }

    fn greeting(flags: u16) -> Vec<u8> {
        let mut out = NBD_MAGIC.to_be_bytes().to_vec();
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out
    }

    /// A server's reply of `kind` with `payload` to the client's `option`.
    fn reply_for(option: u32, kind: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// A server's reply of `kind` with `payload` to GO.
    fn option_reply(kind: u32, payload: &[u8]) -> Vec<u8> {
        reply_for(opt::GO, kind, payload)
    }

    /// A new-style server's bytes: the greeting with `flags`, then each of `replies`.
    fn server_bytes(flags: u16, replies: &[Vec<u8>]) -> Vec<u8> {
        let mut out = greeting(flags);
        for reply in replies {
            out.extend_from_slice(reply);
        }
        out
    }

    /// [`NegotiationConfig`] of our server for `export` of `size` bytes, writable.
    fn our_config(export: &str, size: u64) -> NegotiationConfig {
        NegotiationConfig {
            export_name: export.into(),
            description: None,
            size,
            read_only: false,
            block_size: BlockSize::DEFAULT,
            can_multi_conn: true,
            shutting_down: false,
        }
    }

    /// Our server's negotiation for `export` of [`SIZE`] bytes.
    fn our_server(export: &str) -> ServerNegotiation {
        ServerNegotiation::new(our_config(export, SIZE))
    }

    fn info_export(size: u64, flags: u16) -> Vec<u8> {
        let mut out = info::EXPORT.to_be_bytes().to_vec();
        out.extend_from_slice(&size.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out
    }

    const NEW_FLAGS: u16 = hflags::FIXED_NEWSTYLE | hflags::NO_ZEROES;

    /// A server's replies to GO: an INFO that is not the export's, the export's INFO, then
    /// the ACK.
    fn go_replies() -> Vec<u8> {
        let mut name = info::NAME.to_be_bytes().to_vec();
        name.extend_from_slice(b"disk");
        [
            option_reply(rep::INFO, &name),
            option_reply(rep::INFO, &info_export(SIZE, 0x4d)),
            option_reply(rep::ACK, &[]),
        ]
        .concat()
    }

    /// A new-style server's bytes: greeting, then [`go_replies`].
    fn newstyle_transcript() -> Vec<u8> {
        server_bytes(NEW_FLAGS, &[go_replies()])
    }

    /// Drives `handshake` with `server`'s bytes in pieces of at most `piece`, as a driver
    /// would: reads never more than asked. Returns the result and what was sent.
    fn drive(
        handshake: &mut ClientHandshake,
        server: &[u8],
        piece: usize,
    ) -> (Result<Negotiated, HandshakeError>, Vec<u8>) {
        let mut sent = Vec::new();
        let mut at = 0;
        loop {
            match handshake.action() {
                Action::Read(n) => {
                    assert!(n > 0, "asked to read nothing");
                    if at == server.len() {
                        return (Err(handshake.closed()), sent);
                    }
                    let k = n.min(piece).min(server.len() - at);
                    if let Err(e) = handshake.feed(&server[at..at + k]) {
                        return (Err(e), sent);
                    }
                    at += k;
                }
                Action::Write(bytes) => sent.extend(bytes),
                // The bytes stand for what TLS carries: the handshake itself is the driver's.
                Action::StartTls => {
                    sent.extend_from_slice(b"<TLS>");
                    handshake.tls_started();
                }
                Action::Done(negotiated) => {
                    assert_eq!(at, server.len(), "stopped before the end");
                    return (Ok(negotiated), sent);
                }
                Action::Failed => panic!("failed without an error"),
            }
        }
    }

    #[test]
    fn starttls_first_then_go_over_tls() {
        let server = server_bytes(
            NEW_FLAGS,
            &[
                reply_for(opt::STARTTLS, rep::ACK, &[]),
                option_reply(rep::INFO, &info_export(SIZE, 0x4d)),
                option_reply(rep::ACK, &[]),
            ],
        );
        for piece in [1, 5, 1000] {
            let mut h = ClientHandshake::new("disk").with_tls();
            let (result, sent) = drive(&mut h, &server, piece);
            assert_eq!(result.unwrap().size, SIZE);
            let mut expected = (client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES)
                .to_be_bytes()
                .to_vec();
            expected.extend(empty_option(opt::STARTTLS));
            expected.extend_from_slice(b"<TLS>");
            expected.extend(go_option("disk"));
            assert_eq!(sent, expected);
        }
        // With extended headers asked for: asked over TLS, after the upgrade.
        let server = server_bytes(
            NEW_FLAGS,
            &[
                reply_for(opt::STARTTLS, rep::ACK, &[]),
                reply_for(opt::EXTENDED_HEADERS, rep::ACK, &[]),
                option_reply(rep::INFO, &info_export(SIZE, 0x4d)),
                option_reply(rep::ACK, &[]),
            ],
        );
        let mut h = ClientHandshake::new("").with_tls().with_extended_headers();
        let (result, sent) = drive(&mut h, &server, 7);
        assert!(result.unwrap().extended);
        let tls_at = sent.windows(5).position(|w| w == b"<TLS>").unwrap();
        assert_eq!(&sent[tls_at + 5 + 12..tls_at + 5 + 16], &[0, 0, 0, 0]);
        assert_eq!(
            &sent[tls_at + 5 + 8..tls_at + 5 + 12],
            &opt::EXTENDED_HEADERS.to_be_bytes()
        );
    }

    #[test]
    fn tls_refusals_are_named() {
        // Old-style cannot negotiate TLS.
        let mut h = ClientHandshake::new("").with_tls();
        let (result, sent) = drive(&mut h, &oldstyle_hello(), 152);
        assert_eq!(result, Err(HandshakeError::OldstyleNoTls));
        assert!(sent.is_empty());
        assert_eq!(
            HandshakeError::OldstyleNoTls.to_string(),
            "the destination is old-style and cannot do TLS"
        );
        // STARTTLS refused, with a message.
        for kind in [rep::ERR_POLICY, rep::ERR_UNSUP] {
            let server = server_bytes(NEW_FLAGS, &[reply_for(opt::STARTTLS, kind, b"no TLS here")]);
            let mut h = ClientHandshake::new("").with_tls();
            let (result, _) = drive(&mut h, &server, 3);
            assert_eq!(result, Err(HandshakeError::TlsNotOffered(kind)));
            assert!(HandshakeError::TlsNotOffered(kind)
                .to_string()
                .starts_with("the destination does not offer TLS"));
        }
        // Without TLS, a server that requires it: GO refused, or the first option.
        let server = server_bytes(
            NEW_FLAGS,
            &[option_reply(rep::ERR_TLS_REQD, b"TLS required")],
        );
        let (result, _) = drive(&mut ClientHandshake::new(""), &server, 1000);
        assert_eq!(result, Err(HandshakeError::TlsRequired));
        let server = server_bytes(
            NEW_FLAGS,
            &[reply_for(opt::EXTENDED_HEADERS, rep::ERR_TLS_REQD, b"")],
        );
        let mut h = ClientHandshake::new("").with_extended_headers();
        let (result, _) = drive(&mut h, &server, 1000);
        assert_eq!(result, Err(HandshakeError::TlsRequired));
        assert_eq!(
            HandshakeError::TlsRequired.to_string(),
            "the destination requires TLS; give --tls-creds or --tls-psk"
        );
    }

    /// Our client and our server, both pure: STARTTLS under required TLS, then GO.
    #[test]
    fn our_client_upgrades_with_our_server() {
        use crate::protocol::newstyle::{TlsPolicy, TlsProgress};
        let mut server = our_server("disk").with_tls(TlsPolicy::Required);
        let mut client = ClientHandshake::new("disk")
            .with_tls()
            .with_structured_replies();
        let mut to_client = server.greeting().to_vec();
        let mut input = BytesMut::new();
        let mut done = None;
        for _ in 0..100 {
            match client.action() {
                Action::Read(n) => {
                    let k = n.min(to_client.len());
                    assert!(k > 0, "the client waits for nothing");
                    client.feed(&to_client[..k]).unwrap();
                    to_client.drain(..k);
                }
                Action::Write(bytes) => {
                    input.extend_from_slice(&bytes);
                    match server.feed_tls(&mut input, &mut to_client).unwrap() {
                        TlsProgress::StartTls => server.tls_started(),
                        TlsProgress::Progress(Progress::Done(n)) => done = Some(n),
                        TlsProgress::Progress(Progress::NeedMore) => {}
                        TlsProgress::Progress(Progress::Aborted) => panic!("aborted"),
                    }
                }
                Action::StartTls => client.tls_started(),
                Action::Done(negotiated) => {
                    assert_eq!(negotiated.size, SIZE);
                    assert!(negotiated.structured);
                    assert!(done.expect("server done").structured_replies);
                    assert!(server.in_tls());
                    return;
                }
                Action::Failed => panic!("failed"),
            }
        }
        panic!("no end");
    }

    #[test]
    fn oldstyle_hello_in_any_pieces() {
        for piece in [1, 2, 7, 16, 100, 152] {
            let mut h = ClientHandshake::new("");
            assert_eq!(h.action(), Action::Read(16));
            let (result, sent) = drive(&mut h, &oldstyle_hello(), piece);
            assert_eq!(
                result,
                Ok(Negotiated {
                    size: SIZE,
                    flags: 13,
                    newstyle: false,
                    structured: false,
                    extended: false,
                })
            );
            assert!(sent.is_empty(), "nothing is sent to an old-style server");
            assert_eq!(h.received(), OLDSTYLE_HELLO_LEN as u64);
        }
    }

    #[test]
    fn newstyle_go_with_info_then_ack() {
        let server = newstyle_transcript();
        for piece in [1, 3, 16, 20, 1000] {
            let mut h = ClientHandshake::new("");
            let (result, sent) = drive(&mut h, &server, piece);
            assert_eq!(
                result,
                Ok(Negotiated {
                    size: SIZE,
                    flags: 0x4d,
                    newstyle: true,
                    structured: false,
                    extended: false,
                })
            );
            assert_eq!(sent, go_request(NEW_FLAGS, "").unwrap());
            assert_eq!(h.received(), server.len() as u64);
        }
    }

    #[test]
    fn the_go_request_is_sent_after_the_flags_and_before_any_reply_is_read() {
        let mut h = ClientHandshake::new("disk");
        h.feed(&greeting(hflags::FIXED_NEWSTYLE)).unwrap();
        assert_eq!(
            h.action(),
            Action::Write(go_request(hflags::FIXED_NEWSTYLE, "disk").unwrap())
        );
        assert_eq!(h.action(), Action::Read(20));
    }

    #[test]
    fn our_server_through_the_state_machine() {
        let mut server = our_server("");
        let mut h = ClientHandshake::new("");
        h.feed(&server.greeting()).unwrap();
        let Action::Write(go) = h.action() else {
            panic!("no GO")
        };
        let mut input = BytesMut::from(&go[..]);
        let mut replies = Vec::new();
        assert!(matches!(
            server.feed(&mut input, &mut replies),
            Ok(Progress::Done(_))
        ));
        h.feed(&replies).unwrap();
        let Action::Done(negotiated) = h.action() else {
            panic!("not done")
        };
        assert_eq!(negotiated.size, SIZE);
        assert!(negotiated.newstyle);
        assert_ne!(
            negotiated.flags & crate::protocol::tflags::SEND_WRITE_ZEROES,
            0
        );
    }

    #[test]
    fn a_refused_export() {
        let server = server_bytes(
            NEW_FLAGS,
            &[option_reply(rep::ERR_UNKNOWN, b"no such export")],
        );
        let mut h = ClientHandshake::new("");
        let (result, _) = drive(&mut h, &server, 1000);
        let error = result.unwrap_err();
        assert_eq!(error, HandshakeError::Refused(rep::ERR_UNKNOWN));
        assert_eq!(
            error.to_string(),
            "the destination refused the export (reply 0x80000006)"
        );
        assert_eq!(h.action(), Action::Failed);
        assert_eq!(h.feed(&[0]), Err(HandshakeError::Spent));
    }

    #[test]
    fn an_ack_without_the_export_info() {
        let server = server_bytes(NEW_FLAGS, &[option_reply(rep::ACK, &[])]);
        let (result, _) = drive(&mut ClientHandshake::new(""), &server, 1000);
        assert_eq!(result, Err(HandshakeError::NoExportInfo));
        assert_eq!(
            HandshakeError::NoExportInfo.to_string(),
            "no NBD_INFO_EXPORT before the ACK"
        );
    }

    #[test]
    fn bad_option_replies_are_refused() {
        let mut bad = option_reply(rep::ACK, &[]);
        bad[0] ^= 1;
        let server = server_bytes(NEW_FLAGS, &[bad]);
        let (result, _) = drive(&mut ClientHandshake::new(""), &server, 1000);
        assert!(matches!(
            result,
            Err(HandshakeError::Client(ClientError::BadReplyMagic(_)))
        ));

        let server = server_bytes(NEW_FLAGS, &[option_reply(rep::INFO, &[0, 0, 1])]);
        let (result, _) = drive(&mut ClientHandshake::new(""), &server, 1000);
        assert_eq!(result, Err(HandshakeError::Client(ClientError::BadInfo)));
    }

    #[test]
    fn a_server_that_is_not_fixed_newstyle() {
        let (result, sent) = drive(&mut ClientHandshake::new(""), &greeting(0), 1000);
        assert_eq!(
            result,
            Err(HandshakeError::Client(ClientError::NotFixedNewstyle))
        );
        assert!(sent.is_empty());
    }

    #[test]
    fn a_bad_magic_hello_is_read_whole_before_it_is_rejected() {
        let mut hello = oldstyle_hello();
        hello[8..16].copy_from_slice(&0x1234u64.to_be_bytes());
        let mut h = ClientHandshake::new("");
        h.feed(&hello[..16]).unwrap();
        // Not rejected yet: the rest of a hello is awaited first.
        assert_eq!(h.action(), Action::Read(OLDSTYLE_HELLO_LEN - 16));
        h.feed(&hello[16..100]).unwrap();
        assert_eq!(h.action(), Action::Read(OLDSTYLE_HELLO_LEN - 100));
        let error = h.feed(&hello[100..]).unwrap_err();
        assert_eq!(
            error,
            HandshakeError::Client(ClientError::UnknownHandshake(0x1234))
        );
        assert_eq!(h.received(), OLDSTYLE_HELLO_LEN as u64);

        // However the rest ends, the rejection is for the magic.
        for cut in 16..OLDSTYLE_HELLO_LEN {
            let mut h = ClientHandshake::new("");
            h.feed(&hello[..cut]).unwrap();
            assert_eq!(
                h.closed(),
                HandshakeError::Client(ClientError::UnknownHandshake(0x1234))
            );
            let mut h = ClientHandshake::new("");
            h.feed(&hello[..cut]).unwrap();
            assert_eq!(
                h.read_failed("reset"),
                HandshakeError::Client(ClientError::UnknownHandshake(0x1234))
            );
        }

        // Not NBD at all: the same.
        let mut h = ClientHandshake::new("");
        h.feed(&[0u8; 16]).unwrap();
        assert_eq!(h.action(), Action::Read(OLDSTYLE_HELLO_LEN - 16));
        assert_eq!(
            h.feed(&[0u8; OLDSTYLE_HELLO_LEN - 16]),
            Err(HandshakeError::Client(ClientError::NotNbd))
        );
    }

    #[test]
    fn truncated_input_at_every_length() {
        let transcripts = [(oldstyle_hello(), false), (newstyle_transcript(), true)];
        for (server, newstyle) in transcripts {
            for cut in 0..server.len() {
                for piece in [1, 5, 1000] {
                    let mut h = ClientHandshake::new("");
                    let (result, _) = drive(&mut h, &server[..cut], piece);
                    // Every byte fed is counted: 0 tells "no hello" from a partial one.
                    assert_eq!(h.received(), cut as u64, "cut {cut}");
                    let expected = if cut < 16 || !newstyle {
                        HandshakeError::Hello("unexpected end of file".into())
                    } else {
                        HandshakeError::Connection("early eof".into())
                    };
                    assert_eq!(result, Err(expected), "cut {cut}, piece {piece}");
                }
                // A read error instead of the end: its text.
                let mut h = ClientHandshake::new("");
                h.feed(&server[..cut]).unwrap();
                let mut action = h.action();
                if let Action::Write(_) = action {
                    action = h.action();
                }
                assert!(matches!(action, Action::Read(n) if n > 0), "cut {cut}");
                let error = h.read_failed("Connection reset by peer (os error 104)");
                let text = error.to_string();
                if cut < 16 || !newstyle {
                    assert_eq!(
                        text,
                        "reading the hello failed: Connection reset by peer (os error 104)"
                    );
                } else {
                    assert_eq!(text, "Connection reset by peer (os error 104)");
                }
            }
        }
    }

    #[test]
    fn nothing_may_follow_the_handshake() {
        let mut hello = oldstyle_hello();
        hello.push(0);
        let mut h = ClientHandshake::new("");
        assert_eq!(h.feed(&hello), Err(HandshakeError::Trailing(1)));
    }

    #[test]
    fn a_failed_write_fails_the_handshake() {
        let mut h = ClientHandshake::new("");
        h.feed(&greeting(NEW_FLAGS)).unwrap();
        assert!(matches!(h.action(), Action::Write(_)));
        assert_eq!(
            h.write_failed("Broken pipe (os error 32)"),
            HandshakeError::Connection("Broken pipe (os error 32)".into())
        );
        assert_eq!(h.action(), Action::Failed);
    }

    // -----------------------------------------------------------------------------------
    // Asking for extended headers and structured replies before GO.

    /// Runs `h` against our own server, a write at a time. Returns what each side settled
    /// and what the client sent.
    fn converse(
        h: &mut ClientHandshake,
        server: &mut ServerNegotiation,
    ) -> (
        Negotiated,
        crate::protocol::newstyle::Negotiated,
        Vec<Vec<u8>>,
    ) {
        h.feed(&server.greeting()).unwrap();
        let mut input = BytesMut::new();
        let mut writes = Vec::new();
        let mut server_done = None;
        loop {
            match h.action() {
                Action::Write(bytes) => {
                    assert!(server_done.is_none(), "a write after GO");
                    input.extend_from_slice(&bytes);
                    writes.push(bytes);
                    let mut replies = Vec::new();
                    match server.feed(&mut input, &mut replies).unwrap() {
                        Progress::Done(n) => server_done = Some(n),
                        Progress::NeedMore => {}
                        Progress::Aborted => panic!("aborted"),
                    }
                    assert!(input.is_empty(), "the server took every byte");
                    h.feed(&replies).unwrap();
                }
                Action::Done(n) => return (n, server_done.expect("server done"), writes),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    fn option_for(option: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = IHAVEOPT.to_be_bytes().to_vec();
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn go_payload(export: &str) -> Vec<u8> {
        let mut out = (export.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(export.as_bytes());
        out.extend_from_slice(&[0, 0]);
        out
    }

    /// A server that answers EXTENDED_HEADERS with ERR_UNSUP, acknowledges
    /// STRUCTURED_REPLY, then GO as in [`newstyle_transcript`].
    fn fallback_transcript() -> Vec<u8> {
        server_bytes(
            NEW_FLAGS,
            &[
                reply_for(
                    opt::EXTENDED_HEADERS,
                    rep::ERR_UNSUP,
                    b"option not supported",
                ),
                reply_for(opt::STRUCTURED_REPLY, rep::ACK, &[]),
                go_replies(),
            ],
        )
    }

    /// Extended headers acknowledged, then GO.
    fn extended_transcript() -> Vec<u8> {
        server_bytes(
            NEW_FLAGS,
            &[
                reply_for(opt::EXTENDED_HEADERS, rep::ACK, &[]),
                go_replies(),
            ],
        )
    }

    /// Structured replies acknowledged, then GO.
    fn structured_transcript() -> Vec<u8> {
        server_bytes(
            NEW_FLAGS,
            &[
                reply_for(opt::STRUCTURED_REPLY, rep::ACK, &[]),
                go_replies(),
            ],
        )
    }

    #[test]
    fn extended_headers_with_our_server() {
        let mut server = our_server("disk");
        let mut h = ClientHandshake::new("disk").with_extended_headers();
        let (ours, theirs, writes) = converse(&mut h, &mut server);
        assert!(ours.newstyle && ours.extended && ours.structured);
        assert_eq!(ours.size, SIZE);
        assert!(theirs.extended_headers && theirs.structured_replies);
        assert_eq!(ours.flags, theirs.transmission_flags);
        // Client flags with the first option, then GO alone: nothing more.
        let mut first = 3u32.to_be_bytes().to_vec();
        first.extend(option_for(opt::EXTENDED_HEADERS, &[]));
        assert_eq!(
            writes,
            vec![first, option_for(opt::GO, &go_payload("disk"))]
        );
    }

    #[test]
    fn structured_replies_with_our_server() {
        let mut server = our_server("");
        let mut h = ClientHandshake::new("").with_structured_replies();
        let (ours, theirs, writes) = converse(&mut h, &mut server);
        assert!(ours.newstyle && ours.structured && !ours.extended);
        assert!(theirs.structured_replies && !theirs.extended_headers);
        assert_eq!(ours.flags, theirs.transmission_flags);
        assert_ne!(ours.flags & crate::protocol::tflags::SEND_DF, 0);
        let mut first = 3u32.to_be_bytes().to_vec();
        first.extend(option_for(opt::STRUCTURED_REPLY, &[]));
        assert_eq!(writes, vec![first, option_for(opt::GO, &go_payload(""))]);
    }

    #[test]
    fn both_builders_ask_for_extended_headers_first() {
        let mut server = our_server("");
        let mut h = ClientHandshake::new("")
            .with_structured_replies()
            .with_extended_headers();
        let (ours, theirs, writes) = converse(&mut h, &mut server);
        assert!(ours.extended && ours.structured && theirs.extended_headers);
        assert_eq!(writes.len(), 2);
    }

    #[test]
    fn the_default_asks_for_nothing_with_our_server() {
        let mut server = our_server("disk");
        let mut h = ClientHandshake::new("disk");
        let (ours, theirs, writes) = converse(&mut h, &mut server);
        assert!(ours.newstyle && !ours.structured && !ours.extended);
        assert!(!theirs.structured_replies && !theirs.extended_headers);
        assert_eq!(writes.len(), 1);
    }

    #[test]
    fn err_unsup_to_extended_headers_falls_back_to_structured_replies() {
        let server = fallback_transcript();
        for piece in [1, 3, 20, 1000] {
            let mut h = ClientHandshake::new("").with_extended_headers();
            let (result, sent) = drive(&mut h, &server, piece);
            assert_eq!(
                result,
                Ok(Negotiated {
                    size: SIZE,
                    flags: 0x4d,
                    newstyle: true,
                    structured: true,
                    extended: false,
                })
            );
            let mut expected = 3u32.to_be_bytes().to_vec();
            expected.extend(option_for(opt::EXTENDED_HEADERS, &[]));
            expected.extend(option_for(opt::STRUCTURED_REPLY, &[]));
            expected.extend(option_for(opt::GO, &go_payload("")));
            assert_eq!(sent, expected, "piece {piece}");
            assert_eq!(h.received(), server.len() as u64);
        }

        // Neither: GO without them.
        let server = server_bytes(
            hflags::FIXED_NEWSTYLE,
            &[
                reply_for(opt::EXTENDED_HEADERS, rep::ERR_UNSUP, &[]),
                reply_for(opt::STRUCTURED_REPLY, rep::ERR_UNSUP, b"no"),
                go_replies(),
            ],
        );
        let mut h = ClientHandshake::new("d").with_extended_headers();
        let (result, sent) = drive(&mut h, &server, 7);
        let negotiated = result.unwrap();
        assert!(negotiated.newstyle && !negotiated.structured && !negotiated.extended);
        let mut expected = 1u32.to_be_bytes().to_vec();
        expected.extend(option_for(opt::EXTENDED_HEADERS, &[]));
        expected.extend(option_for(opt::STRUCTURED_REPLY, &[]));
        expected.extend(option_for(opt::GO, &go_payload("d")));
        assert_eq!(sent, expected);

        // Structured replies only, refused: GO without them.
        let server = server_bytes(
            NEW_FLAGS,
            &[
                reply_for(opt::STRUCTURED_REPLY, rep::ERR_UNSUP, &[]),
                go_replies(),
            ],
        );
        let mut h = ClientHandshake::new("").with_structured_replies();
        let (result, _) = drive(&mut h, &server, 1000);
        assert!(!result.unwrap().structured);
    }

    #[test]
    fn extended_and_structured_transcripts() {
        for (server, extended) in [
            (extended_transcript(), true),
            (structured_transcript(), false),
        ] {
            let mut h = if extended {
                ClientHandshake::new("").with_extended_headers()
            } else {
                ClientHandshake::new("").with_structured_replies()
            };
            let (result, _) = drive(&mut h, &server, 5);
            let negotiated = result.unwrap();
            assert!(negotiated.structured);
            assert_eq!(negotiated.extended, extended);
        }
    }

    #[test]
    fn unacceptable_replies_to_the_new_options() {
        let bad = [
            // Another error than UNSUP.
            reply_for(opt::EXTENDED_HEADERS, rep::ERR_POLICY, b"no"),
            // A reply for another option.
            reply_for(opt::GO, rep::ACK, &[]),
            // An ACK with data.
            reply_for(opt::EXTENDED_HEADERS, rep::ACK, &[0]),
            // Not an ACK.
            reply_for(opt::EXTENDED_HEADERS, rep::INFO, &info_export(SIZE, 1)),
        ];
        for reply in bad {
            let server = server_bytes(NEW_FLAGS, &[reply]);
            let mut h = ClientHandshake::new("").with_extended_headers();
            let (result, _) = drive(&mut h, &server, 1000);
            assert!(
                matches!(result, Err(HandshakeError::UnexpectedReply { .. })),
                "{result:?}"
            );
            assert_eq!(h.action(), Action::Failed);
        }
        // Lengths are bounded before anything is read.
        let mut reply = reply_for(opt::EXTENDED_HEADERS, rep::ERR_UNSUP, &[]);
        reply[16..20].copy_from_slice(&(MAX_OPTION_REPLY + 1).to_be_bytes());
        let server = server_bytes(NEW_FLAGS, &[reply]);
        let mut h = ClientHandshake::new("").with_extended_headers();
        let (result, _) = drive(&mut h, &server, 1000);
        assert_eq!(
            result,
            Err(HandshakeError::Client(ClientError::ReplyTooLong(
                MAX_OPTION_REPLY + 1
            )))
        );
        // Bad magic.
        let mut reply = reply_for(opt::STRUCTURED_REPLY, rep::ACK, &[]);
        reply[0] ^= 1;
        let server = server_bytes(NEW_FLAGS, &[reply]);
        let mut h = ClientHandshake::new("").with_structured_replies();
        let (result, _) = drive(&mut h, &server, 1000);
        assert!(matches!(
            result,
            Err(HandshakeError::Client(ClientError::BadReplyMagic(_)))
        ));
        // Not fixed new-style: nothing sent.
        let mut h = ClientHandshake::new("").with_extended_headers();
        let (result, sent) = drive(&mut h, &greeting(0), 1000);
        assert_eq!(
            result,
            Err(HandshakeError::Client(ClientError::NotFixedNewstyle))
        );
        assert!(sent.is_empty());
    }

    #[test]
    fn the_default_sends_exactly_the_same_bytes() {
        // Written out by hand: client flags, IHAVEOPT, GO (7), length 10, name length 4,
        // "disk", no information requests.
        let expected: Vec<u8> = [
            &[0, 0, 0, 3][..],
            b"IHAVEOPT",
            &[0, 0, 0, 7],
            &[0, 0, 0, 10],
            &[0, 0, 0, 4],
            b"disk",
            &[0, 0],
        ]
        .concat();
        let server = newstyle_transcript();
        let mut h = ClientHandshake::new("disk");
        let (result, sent) = drive(&mut h, &server, 1000);
        assert_eq!(sent, expected);
        assert_eq!(sent, go_request(NEW_FLAGS, "disk").unwrap());
        let negotiated = result.unwrap();
        assert!(!negotiated.structured && !negotiated.extended);

        // Without NO_ZEROES, with the empty name.
        let expected: Vec<u8> = [
            &[0, 0, 0, 1][..],
            b"IHAVEOPT",
            &[0, 0, 0, 7],
            &[0, 0, 0, 6],
            &[0, 0, 0, 0],
            &[0, 0],
        ]
        .concat();
        let mut h = ClientHandshake::new("");
        h.feed(&greeting(hflags::FIXED_NEWSTYLE)).unwrap();
        assert_eq!(h.action(), Action::Write(expected));
        assert_eq!(h.action(), Action::Read(20));
    }

    #[test]
    fn oldstyle_servers_negotiate_nothing() {
        for mut h in [
            ClientHandshake::new("").with_extended_headers(),
            ClientHandshake::new("").with_structured_replies(),
        ] {
            let (result, sent) = drive(&mut h, &oldstyle_hello(), 1000);
            assert_eq!(
                result,
                Ok(Negotiated {
                    size: SIZE,
                    flags: 13,
                    newstyle: false,
                    structured: false,
                    extended: false,
                })
            );
            assert!(sent.is_empty());
        }
    }

    #[test]
    fn truncated_negotiation_at_every_length() {
        type Make = fn() -> ClientHandshake;
        let cases: [(Vec<u8>, Make); 3] = [
            (extended_transcript(), || {
                ClientHandshake::new("").with_extended_headers()
            }),
            (fallback_transcript(), || {
                ClientHandshake::new("").with_extended_headers()
            }),
            (structured_transcript(), || {
                ClientHandshake::new("").with_structured_replies()
            }),
        ];
        for (server, make) in cases {
            // The whole transcript succeeds...
            let (result, _) = drive(&mut make(), &server, 1000);
            assert!(result.is_ok());
            // ...and no prefix of it does, nor panics.
            for cut in 0..server.len() {
                for piece in [1, 5, 1000] {
                    let mut h = make();
                    let (result, _) = drive(&mut h, &server[..cut], piece);
                    assert_eq!(h.received(), cut as u64, "cut {cut}");
                    let expected = if cut < 16 {
                        HandshakeError::Hello("unexpected end of file".into())
                    } else {
                        HandshakeError::Connection("early eof".into())
                    };
                    assert_eq!(result, Err(expected), "cut {cut}, piece {piece}");
                }
                let mut h = make();
                h.feed(&server[..cut]).unwrap();
                while let Action::Write(_) = h.action() {}
                let error = h.read_failed("reset");
                assert!(matches!(
                    error,
                    HandshakeError::Hello(_) | HandshakeError::Connection(_)
                ));
            }
        }
    }
}
