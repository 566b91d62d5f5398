//! Fixed new-style negotiation, server side, as a pure state machine.
//!
//! The session writes [`ServerNegotiation::greeting`], then appends whatever the socket
//! delivers to a `BytesMut` and calls [`ServerNegotiation::feed`], which takes out every
//! complete client message, appends the replies to a `Vec<u8>` for the session to send, and
//! says whether to keep reading, start transmission, or close. No I/O happens here, so the
//! whole negotiation can be driven by tests byte by byte, and the result does not depend on
//! how the bytes were split (see the property tests).
//!
//! What we serve is one export; the empty name (the protocol's "default export") names it
//! too. Supported: EXPORT_NAME, ABORT, LIST, INFO, GO, STRUCTURED_REPLY, LIST and SET of
//! meta contexts (`base:allocation` only) and EXTENDED_HEADERS. Everything else is
//! answered with `NBD_REP_ERR_UNSUP`.
//!
//! STARTTLS follows the server's [`TlsPolicy`] ([`ServerNegotiation::with_tls`]): refused
//! with `NBD_REP_ERR_POLICY` when TLS is not offered (the default); otherwise acknowledged,
//! after which the driver, told so by [`ServerNegotiation::feed_tls`] returning
//! [`TlsProgress::StartTls`], sends the ACK, runs the TLS handshake on the socket and calls
//! [`ServerNegotiation::tls_started`]: every negotiated state is forgotten and options are
//! read again, over TLS. Under [`TlsPolicy::Required`], before the upgrade every option but
//! STARTTLS and ABORT is answered `NBD_REP_ERR_TLS_REQD` (INFO, GO and LIST included) and
//! EXPORT_NAME, which has no error reply, closes the connection.
//!
//! Bounds: an option payload is buffered only up to [`MAX_OPTION_LEN`]; a larger one is
//! skipped as it arrives and answered with `NBD_REP_ERR_TOO_BIG` (an EXPORT_NAME longer than
//! [`MAX_STRING_LEN`] closes instead: that option has no error reply). Names and queries are
//! limited to [`MAX_STRING_LEN`] bytes and a meta context request to [`MAX_META_QUERIES`]
//! queries. Every inner length is checked against the payload before it is used.

use bytes::{Buf, BytesMut};

use super::consts::{tflags, IHAVEOPT, NBD_MAGIC};
use super::request::HeaderStyle;
use super::structured::ReplyStyle;
use super::wire::Reader;

/// Magic that starts every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Length of the server's greeting.
pub const GREETING_LEN: usize = 18;
/// Length of an option header: IHAVEOPT, option, payload length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of an option reply header: magic, option, reply type, payload length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Zero bytes after an EXPORT_NAME reply, unless the client set NO_ZEROES.
pub const EXPORT_NAME_PADDING: usize = 124;

/// Largest option payload we buffer. Real clients send a few hundred bytes at most (a name
/// and a handful of queries); anything larger is skipped and refused with ERR_TOO_BIG.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Longest name, query or description we accept or send; the protocol's string limit.
pub const MAX_STRING_LEN: usize = 4096;
/// Most queries one LIST/SET_META_CONTEXT may carry.
pub const MAX_META_QUERIES: u32 = 256;

/// The one metadata context we offer: which parts of the export are allocated or zero.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// The id `base:allocation` gets when selected; block status replies carry it.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Handshake flags, sent by the server in the greeting.
pub mod hflags {
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags, the client's 32-bit answer to the greeting.
pub mod client_flags {
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    pub const NO_ZEROES: u32 = 1 << 1;
    /// Every bit we know; any other set bit ends the negotiation.
    pub const KNOWN: u32 = FIXED_NEWSTYLE | NO_ZEROES;
}

/// Option numbers.
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types. Errors have bit 31 set.
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    pub const ERR: u32 = 1 << 31;
    pub const ERR_UNSUP: u32 = ERR + 1;
    pub const ERR_POLICY: u32 = ERR + 2;
    pub const ERR_INVALID: u32 = ERR + 3;
    pub const ERR_PLATFORM: u32 = ERR + 4;
    pub const ERR_TLS_REQD: u32 = ERR + 5;
    pub const ERR_UNKNOWN: u32 = ERR + 6;
    pub const ERR_SHUTDOWN: u32 = ERR + 7;
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR + 8;
    pub const ERR_TOO_BIG: u32 = ERR + 9;
    pub const ERR_EXT_HEADER_REQD: u32 = ERR + 10;
}

/// Information types of INFO/GO (the u16 that starts an `NBD_REP_INFO` payload).
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Block size constraints, sent in `NBD_INFO_BLOCK_SIZE`.
///
/// A client that asked for them in GO promises to honour them, which is what lets a server
/// use O_DIRECT or refuse misaligned requests. The caller keeps them valid
/// ([`BlockSize::is_valid`]); we send them as given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSize {
    /// Smallest alignment of offsets and lengths: a power of two, at most 64 KiB.
    pub min: u32,
    /// Size at which requests are efficient: a power of two, at least `min` and 512.
    pub preferred: u32,
    /// Largest payload of a request (READ or WRITE data): a multiple of `min`, at least
    /// `preferred` (or `u32::MAX` for "no limit beyond the protocol's").
    pub max: u32,
}

impl BlockSize {
    /// What the protocol assumes when nothing is advertised, with a 32 MiB payload limit.
    pub const DEFAULT: BlockSize = BlockSize {
        min: 1,
        preferred: 4096,
        max: 32 << 20,
    };

    /// True if these constraints obey the protocol's rules (see the field docs).
    pub fn is_valid(&self) -> bool {
        let pow2 = |v: u32| v.is_power_of_two();
        pow2(self.min)
            && self.min <= 64 * 1024
            && pow2(self.preferred)
            && self.preferred >= self.min.max(512)
            && self.max >= self.preferred
            && (self.max == u32::MAX || self.max.is_multiple_of(self.min))
    }
}

/// Whether a server offers TLS (NBD's NOTLS, SELECTIVETLS-for-every-export and FORCEDTLS).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsPolicy {
    /// No TLS: STARTTLS gets `NBD_REP_ERR_POLICY`.
    #[default]
    None,
    /// Clients may upgrade; plain ones are served too.
    Optional,
    /// Nothing but STARTTLS and ABORT before the upgrade.
    Required,
}

/// What the server offers, fixed for one negotiation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NegotiationConfig {
    /// Name of our one export. Clients may also use the empty name for it.
    pub export_name: String,
    /// Human-readable description, sent in LIST and INFO replies; cut to
    /// [`MAX_STRING_LEN`] bytes.
    pub description: Option<String>,
    /// Export size in bytes.
    pub size: u64,
    /// Advertise READ_ONLY (and no TRIM or WRITE_ZEROES).
    pub read_only: bool,
    /// Constraints sent to clients that ask for them.
    pub block_size: BlockSize,
    /// Advertise CAN_MULTI_CONN: flushes and FUA writes on one connection are visible and
    /// durable for all connections when replied to.
    pub can_multi_conn: bool,
    /// The server is stopping: refuse every option but ABORT with ERR_SHUTDOWN, so clients
    /// go away instead of starting a transmission that would be cut.
    pub shutting_down: bool,
}

/// What the client and we agreed on; the session configures transmission from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// READ replies (and errors) are chunks. Always true with `extended_headers`.
    pub structured_replies: bool,
    /// 32-byte request headers and 32-byte chunk headers.
    pub extended_headers: bool,
    /// Id of `base:allocation` if the client selected it; then BLOCK_STATUS is allowed.
    /// Only ever set with `structured_replies`.
    pub base_allocation: Option<u32>,
    /// The transmission flags the client was sent last; it may rely on exactly these.
    pub transmission_flags: u16,
    /// The client set NO_ZEROES (only matters for EXPORT_NAME, already handled).
    pub no_zeroes: bool,
    /// The export's configured name (also when the client used the empty name).
    pub export_name: String,
    /// The block size constraints the client asked for in GO, and so promised to honour;
    /// `None` if it did not ask (or ended with EXPORT_NAME).
    pub block_size: Option<BlockSize>,
}

impl Negotiated {
    /// The reply encoding of the transmission phase.
    pub fn reply_style(&self) -> ReplyStyle {
        if self.extended_headers {
            ReplyStyle::Extended
        } else if self.structured_replies {
            ReplyStyle::Structured
        } else {
            ReplyStyle::Simple
        }
    }

    /// The request header format of the transmission phase.
    pub fn header_style(&self) -> HeaderStyle {
        if self.extended_headers {
            HeaderStyle::Extended
        } else {
            HeaderStyle::Compact
        }
    }
}

/// What [`ServerNegotiation::feed`] concluded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Send `out`, read more, call `feed` again.
    NeedMore,
    /// Send `out`, then start transmission; bytes left in `input` are the first requests.
    Done(Negotiated),
    /// The client sent NBD_OPT_ABORT: send `out` (its ACK), then close.
    Aborted,
}

/// Why negotiation failed. The server sends what is in `out` and closes the connection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NegotiationError {
    #[error("client flags {0:#x} contain bits we do not know")]
    UnknownClientFlags(u32),
    #[error("option header starts with {0:#018x}, not IHAVEOPT")]
    BadOptionMagic(u64),
    #[error("client did not agree to fixed new-style but sent option {0}")]
    NotFixedNewstyle(u32),
    #[error("EXPORT_NAME asked for an export we do not have: {0:?}")]
    UnknownExport(String),
    #[error("EXPORT_NAME payload of {0} bytes exceeds the name limit")]
    ExportNameTooLong(u32),
    #[error("EXPORT_NAME after extended headers were negotiated")]
    ExportNameAfterExtendedHeaders,
    #[error("EXPORT_NAME while the server is shutting down")]
    ShuttingDown,
    #[error("negotiation is already over")]
    Finished,
    /// EXPORT_NAME under [`TlsPolicy::Required`] before STARTTLS: it cannot be refused with
    /// an error reply, so the connection closes.
    #[error("EXPORT_NAME before STARTTLS, and this server requires TLS")]
    TlsRequired,
    /// Bytes arrived after STARTTLS and before the TLS handshake: a client must wait for the
    /// ACK, and plaintext sent ahead could be injected by anyone on the path.
    #[error("{0} bytes sent after STARTTLS before the TLS handshake")]
    DataAfterStartTls(usize),
    /// [`ServerNegotiation::feed`] was used on a negotiation that offers TLS: only
    /// [`ServerNegotiation::feed_tls`] can report STARTTLS.
    #[error("STARTTLS accepted by a driver that cannot run a TLS handshake")]
    StartTlsNotDriven,
}

/// What [`ServerNegotiation::feed_tls`] concluded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsProgress {
    /// As from [`ServerNegotiation::feed`].
    Progress(Progress),
    /// The client sent STARTTLS and we accept: send `out` (the ACK, after any earlier
    /// replies), run the TLS handshake as the server, then call
    /// [`ServerNegotiation::tls_started`] and go on feeding what arrives over TLS. `input`
    /// is empty (bytes after STARTTLS are an error).
    StartTls,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Waiting for the client's 32-bit flags.
    ClientFlags,
    /// Waiting for a complete option (header and payload).
    Options,
    /// Skipping the payload of an oversized option as it arrives; its reply follows.
    Discarding { option: u32, remaining: u64 },
    /// STARTTLS was acknowledged: nothing is read until the driver's TLS handshake is done.
    AwaitingTls,
    /// Done, aborted or failed: nothing more is read.
    Finished,
}

/// The server side of one fixed new-style negotiation.
#[derive(Debug)]
pub struct ServerNegotiation {
    config: NegotiationConfig,
    state: State,
    /// The client set FIXED_NEWSTYLE; without it only EXPORT_NAME is understood.
    fixed: bool,
    no_zeroes: bool,
    /// Structured replies are in force (also set by extended headers).
    structured: bool,
    extended: bool,
    /// Id of the selected `base:allocation` context; cleared by every SET_META_CONTEXT.
    base_allocation: Option<u32>,
    tls: TlsPolicy,
    /// The TLS handshake is done: options arrive encrypted.
    in_tls: bool,
}

/// What a handled option asks of the feed loop.
enum Step {
    Continue,
    Finish(TlsProgress),
}

impl ServerNegotiation {
    pub fn new(mut config: NegotiationConfig) -> ServerNegotiation {
        if let Some(d) = &mut config.description {
            let end = floor_char_boundary(d, MAX_STRING_LEN);
            d.truncate(end);
        }
        ServerNegotiation {
            config,
            state: State::ClientFlags,
            fixed: false,
            no_zeroes: false,
            structured: false,
            extended: false,
            base_allocation: None,
            tls: TlsPolicy::None,
            in_tls: false,
        }
    }

    /// Offers TLS as `policy` says. The driver must then use [`feed_tls`](Self::feed_tls).
    pub fn with_tls(mut self, policy: TlsPolicy) -> ServerNegotiation {
        self.tls = policy;
        self
    }

    /// The TLS handshake that followed [`TlsProgress::StartTls`] succeeded: forget what was
    /// negotiated in plain text (structured replies, extended headers, meta contexts) as
    /// the protocol requires, and read options again. The client flags stay, and no new
    /// greeting is sent.
    pub fn tls_started(&mut self) {
        if self.state == State::AwaitingTls {
            self.state = State::Options;
        }
        self.in_tls = true;
        self.structured = false;
        self.extended = false;
        self.base_allocation = None;
    }

    /// Whether options now arrive over TLS.
    pub fn in_tls(&self) -> bool {
        self.in_tls
    }

    /// STARTTLS must come first: TLS is required and not yet in force.
    fn tls_missing(&self) -> bool {
        self.tls == TlsPolicy::Required && !self.in_tls
    }

    /// The 18 bytes the server sends first: NBDMAGIC, IHAVEOPT, handshake flags
    /// FIXED_NEWSTYLE | NO_ZEROES.
    pub fn greeting(&self) -> [u8; GREETING_LEN] {
        let mut out = [0u8; GREETING_LEN];
        out[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
        out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        out[16..18].copy_from_slice(&(hflags::FIXED_NEWSTYLE | hflags::NO_ZEROES).to_be_bytes());
        out
    }

    /// Consumes every complete client message in `input` and appends the replies to `out`.
    ///
    /// Incomplete messages stay in `input` (except the payload of an oversized option, which
    /// is dropped as it arrives). After `Done` the rest of `input` belongs to transmission.
    /// After `Done`, `Aborted` or an error, further calls fail with
    /// [`NegotiationError::Finished`].
    pub fn feed(
        &mut self,
        input: &mut BytesMut,
        out: &mut Vec<u8>,
    ) -> Result<Progress, NegotiationError> {
        match self.feed_tls(input, out)? {
            TlsProgress::Progress(p) => Ok(p),
            TlsProgress::StartTls => {
                self.state = State::Finished;
                Err(NegotiationError::StartTlsNotDriven)
            }
        }
    }

    /// As [`feed`](Self::feed), for a driver that can run a TLS handshake: STARTTLS
    /// accepted under a [`TlsPolicy`] other than `None` is reported as
    /// [`TlsProgress::StartTls`].
    pub fn feed_tls(
        &mut self,
        input: &mut BytesMut,
        out: &mut Vec<u8>,
    ) -> Result<TlsProgress, NegotiationError> {
        let result = self.run(input, out);
        match &result {
            Ok(TlsProgress::Progress(Progress::NeedMore)) => {}
            Ok(TlsProgress::StartTls) if input.is_empty() => self.state = State::AwaitingTls,
            Ok(TlsProgress::StartTls) => {
                self.state = State::Finished;
                return Err(NegotiationError::DataAfterStartTls(input.len()));
            }
            _ => self.state = State::Finished,
        }
        result
    }

    fn run(
        &mut self,
        input: &mut BytesMut,
        out: &mut Vec<u8>,
    ) -> Result<TlsProgress, NegotiationError> {
        let need_more = Ok(TlsProgress::Progress(Progress::NeedMore));
        loop {
            match self.state {
                State::Finished | State::AwaitingTls => return Err(NegotiationError::Finished),
                State::ClientFlags => {
                    if input.len() < 4 {
                        return need_more;
                    }
                    let flags = input.get_u32();
                    if flags & !client_flags::KNOWN != 0 {
                        return Err(NegotiationError::UnknownClientFlags(flags));
                    }
                    self.fixed = flags & client_flags::FIXED_NEWSTYLE != 0;
                    self.no_zeroes = flags & client_flags::NO_ZEROES != 0;
                    self.state = State::Options;
                }
                State::Discarding { option, remaining } => {
                    let take = remaining.min(input.len() as u64);
                    // take <= input.len(), so it fits usize.
                    input.advance(take as usize);
                    if take < remaining {
                        self.state = State::Discarding {
                            option,
                            remaining: remaining - take,
                        };
                        return need_more;
                    }
                    self.state = State::Options;
                    if let Step::Finish(p) = self.oversized(option, out) {
                        return Ok(p);
                    }
                }
                State::Options => {
                    let Some(header) = input.get(..OPTION_HEADER_LEN) else {
                        return need_more;
                    };
                    let mut header = header;
                    let magic = header.get_u64();
                    let option = header.get_u32();
                    let len = header.get_u32();
                    if magic != IHAVEOPT {
                        return Err(NegotiationError::BadOptionMagic(magic));
                    }
                    if !self.fixed && option != opt::EXPORT_NAME {
                        return Err(NegotiationError::NotFixedNewstyle(option));
                    }
                    if option == opt::EXPORT_NAME && len as usize > MAX_STRING_LEN {
                        return Err(NegotiationError::ExportNameTooLong(len));
                    }
                    if len > MAX_OPTION_LEN {
                        input.advance(OPTION_HEADER_LEN);
                        self.state = State::Discarding {
                            option,
                            remaining: u64::from(len),
                        };
                        continue;
                    }
                    // len <= MAX_OPTION_LEN: the sum cannot overflow.
                    let total = OPTION_HEADER_LEN + len as usize;
                    if input.len() < total {
                        return need_more;
                    }
                    input.advance(OPTION_HEADER_LEN);
                    let payload = input.split_to(len as usize);
                    match self.option(option, &payload, out)? {
                        Step::Continue => {}
                        Step::Finish(p) => return Ok(p),
                    }
                }
            }
        }
    }

    /// Answers an option whose payload was too large to look at.
    fn oversized(&mut self, option: u32, out: &mut Vec<u8>) -> Step {
        if option == opt::ABORT {
            reply(out, option, rep::ACK, &[]);
            return Step::Finish(TlsProgress::Progress(Progress::Aborted));
        }
        if self.tls_missing() && option != opt::STARTTLS {
            reply(out, option, rep::ERR_TLS_REQD, TLS_REQUIRED);
        } else if self.config.shutting_down {
            reply(out, option, rep::ERR_SHUTDOWN, b"server is shutting down");
        } else {
            reply(out, option, rep::ERR_TOO_BIG, b"option payload too large");
        }
        Step::Continue
    }

    fn option(
        &mut self,
        option: u32,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Step, NegotiationError> {
        match option {
            // A client may always leave; the payload, if any, does not matter.
            opt::ABORT => {
                reply(out, option, rep::ACK, &[]);
                return Ok(Step::Finish(TlsProgress::Progress(Progress::Aborted)));
            }
            opt::EXPORT_NAME if self.tls_missing() => return Err(NegotiationError::TlsRequired),
            opt::EXPORT_NAME => {
                return self
                    .export_name(data, out)
                    .map(|p| Step::Finish(TlsProgress::Progress(p)))
            }
            _ if self.config.shutting_down => {
                reply(out, option, rep::ERR_SHUTDOWN, b"server is shutting down");
            }
            opt::STARTTLS => return Ok(self.starttls(data, out)),
            _ if self.tls_missing() => reply(out, option, rep::ERR_TLS_REQD, TLS_REQUIRED),
            opt::LIST => {
                if data.is_empty() {
                    let mut server = Vec::new();
                    let name = self.config.export_name.as_bytes();
                    // Names longer than 4 GiB cannot exist in memory we could send.
                    server.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    server.extend_from_slice(name);
                    if let Some(d) = &self.config.description {
                        server.extend_from_slice(d.as_bytes());
                    }
                    reply(out, option, rep::SERVER, &server);
                    reply(out, option, rep::ACK, &[]);
                } else {
                    reply(out, option, rep::ERR_INVALID, b"LIST carries no data");
                }
            }
            opt::INFO | opt::GO => return Ok(self.info_or_go(option, data, out)),
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(out, option, rep::ERR_INVALID, b"option carries no data");
                } else if self.extended {
                    // Upstream's answer: extended headers already imply structured
                    // replies, and going back to compact ones is not allowed.
                    reply(
                        out,
                        option,
                        rep::ERR_EXT_HEADER_REQD,
                        b"extended headers already negotiated",
                    );
                } else {
                    // Repeating it is harmless: the answer stays true.
                    self.structured = true;
                    reply(out, option, rep::ACK, &[]);
                }
            }
            opt::EXTENDED_HEADERS => {
                if data.is_empty() {
                    self.extended = true;
                    self.structured = true;
                    reply(out, option, rep::ACK, &[]);
                } else {
                    reply(out, option, rep::ERR_INVALID, b"option carries no data");
                }
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => self.meta_context(option, data, out),
            _ => reply(out, option, rep::ERR_UNSUP, b"option not supported"),
        }
        Ok(Step::Continue)
    }

    /// STARTTLS: acknowledged when TLS is offered, not yet in force and the option is
    /// well-formed.
    fn starttls(&mut self, data: &[u8], out: &mut Vec<u8>) -> Step {
        let option = opt::STARTTLS;
        if self.tls == TlsPolicy::None {
            reply(
                out,
                option,
                rep::ERR_POLICY,
                b"this server does not offer TLS",
            );
        } else if self.in_tls {
            reply(out, option, rep::ERR_INVALID, b"TLS is already in force");
        } else if !data.is_empty() {
            reply(out, option, rep::ERR_INVALID, b"STARTTLS carries no data");
        } else {
            reply(out, option, rep::ACK, &[]);
            return Step::Finish(TlsProgress::StartTls);
        }
        Step::Continue
    }

    /// EXPORT_NAME: the old way to end negotiation. It has no error reply, so every refusal
    /// closes the connection.
    fn export_name(
        &mut self,
        name: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Progress, NegotiationError> {
        if self.extended {
            return Err(NegotiationError::ExportNameAfterExtendedHeaders);
        }
        if self.config.shutting_down {
            return Err(NegotiationError::ShuttingDown);
        }
        if !self.names_our_export(name) {
            return Err(NegotiationError::UnknownExport(
                String::from_utf8_lossy(name).into_owned(),
            ));
        }
        let flags = self.transmission_flags();
        out.extend_from_slice(&self.config.size.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        if !self.no_zeroes {
            out.extend_from_slice(&[0u8; EXPORT_NAME_PADDING]);
        }
        Ok(Progress::Done(self.negotiated(flags, None)))
    }

    /// INFO and GO share their request and replies; GO then ends negotiation.
    fn info_or_go(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Step {
        let mut r = Reader::new(data);
        let Some(name_len) = r.u32() else {
            reply(out, option, rep::ERR_INVALID, b"payload too short");
            return Step::Continue;
        };
        let Some(name) = r.take(name_len as usize) else {
            reply(out, option, rep::ERR_INVALID, b"name overruns the payload");
            return Step::Continue;
        };
        let Some(count) = r.u16() else {
            reply(out, option, rep::ERR_INVALID, b"payload too short");
            return Step::Continue;
        };
        if r.remaining() != usize::from(count) * 2 {
            reply(
                out,
                option,
                rep::ERR_INVALID,
                b"request count differs from the payload",
            );
            return Step::Continue;
        }
        if name.len() > MAX_STRING_LEN {
            reply(out, option, rep::ERR_TOO_BIG, b"name too long");
            return Step::Continue;
        }
        if !self.names_our_export(name) {
            reply(out, option, rep::ERR_UNKNOWN, b"no such export");
            return Step::Continue;
        }
        let (mut want_name, mut want_description, mut want_block_size) = (false, false, false);
        while let Some(request) = r.u16() {
            match request {
                info::NAME => want_name = true,
                info::DESCRIPTION => want_description = true,
                info::BLOCK_SIZE => want_block_size = true,
                // EXPORT is always sent; unknown requests are ignored.
                _ => {}
            }
        }

        let flags = self.transmission_flags();
        let mut export = Vec::with_capacity(12);
        export.extend_from_slice(&info::EXPORT.to_be_bytes());
        export.extend_from_slice(&self.config.size.to_be_bytes());
        export.extend_from_slice(&flags.to_be_bytes());
        reply(out, option, rep::INFO, &export);
        if want_name {
            let mut payload = info::NAME.to_be_bytes().to_vec();
            payload.extend_from_slice(self.config.export_name.as_bytes());
            reply(out, option, rep::INFO, &payload);
        }
        if want_description {
            if let Some(d) = &self.config.description {
                let mut payload = info::DESCRIPTION.to_be_bytes().to_vec();
                payload.extend_from_slice(d.as_bytes());
                reply(out, option, rep::INFO, &payload);
            }
        }
        let bs = self.config.block_size;
        if want_block_size {
            let mut payload = info::BLOCK_SIZE.to_be_bytes().to_vec();
            for v in [bs.min, bs.preferred, bs.max] {
                payload.extend_from_slice(&v.to_be_bytes());
            }
            reply(out, option, rep::INFO, &payload);
        }
        reply(out, option, rep::ACK, &[]);
        if option == opt::GO {
            let agreed = want_block_size.then_some(bs);
            Step::Finish(TlsProgress::Progress(Progress::Done(
                self.negotiated(flags, agreed),
            )))
        } else {
            Step::Continue
        }
    }

    /// LIST_META_CONTEXT and SET_META_CONTEXT: export name, then queries. Only
    /// `base:allocation` exists; LIST matches it with no query, `base:` or its full name,
    /// SET only with its full name. A SET replaces the selection, so it starts by clearing
    /// it: whatever the replies do not name is not selected.
    fn meta_context(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) {
        let set = option == opt::SET_META_CONTEXT;
        if set {
            self.base_allocation = None;
            if !self.structured {
                reply(
                    out,
                    option,
                    rep::ERR_INVALID,
                    b"structured replies not negotiated",
                );
                return;
            }
        }
        let matched = match parse_meta_request(data, set) {
            Ok((name, matched)) => {
                if !self.names_our_export(name) {
                    reply(out, option, rep::ERR_UNKNOWN, b"no such export");
                    return;
                }
                matched
            }
            Err((rtype, message)) => {
                reply(out, option, rtype, message.as_bytes());
                return;
            }
        };
        if matched {
            // In LIST replies the id has no meaning; 0 says so.
            let id = if set { BASE_ALLOCATION_ID } else { 0 };
            let mut payload = id.to_be_bytes().to_vec();
            payload.extend_from_slice(BASE_ALLOCATION.as_bytes());
            reply(out, option, rep::META_CONTEXT, &payload);
            if set {
                self.base_allocation = Some(BASE_ALLOCATION_ID);
            }
        }
        reply(out, option, rep::ACK, &[]);
    }

    fn names_our_export(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.config.export_name.as_bytes()
    }

    /// The transmission flags for the state negotiated so far.
    fn transmission_flags(&self) -> u16 {
        let mut flags =
            tflags::HAS_FLAGS | tflags::SEND_FLUSH | tflags::SEND_FUA | tflags::SEND_CACHE;
        if self.config.read_only {
            flags |= tflags::READ_ONLY;
        } else {
            flags |= tflags::SEND_TRIM | tflags::SEND_WRITE_ZEROES | tflags::SEND_FAST_ZERO;
        }
        if self.config.can_multi_conn {
            flags |= tflags::CAN_MULTI_CONN;
        }
        if self.structured {
            flags |= tflags::SEND_DF;
        }
        flags
    }

    fn negotiated(&self, transmission_flags: u16, block_size: Option<BlockSize>) -> Negotiated {
        Negotiated {
            structured_replies: self.structured,
            extended_headers: self.extended,
            base_allocation: self.base_allocation,
            transmission_flags,
            no_zeroes: self.no_zeroes,
            export_name: self.config.export_name.clone(),
            block_size,
        }
    }
}

/// Parses a meta context request: the export name and whether a query picks
/// `base:allocation`. Errors carry the reply type and message.
fn parse_meta_request(data: &[u8], set: bool) -> Result<(&[u8], bool), (u32, &'static str)> {
    const SHORT: (u32, &str) = (rep::ERR_INVALID, "payload too short");
    let mut r = Reader::new(data);
    let name_len = r.u32().ok_or(SHORT)?;
    let name = r
        .take(name_len as usize)
        .ok_or((rep::ERR_INVALID, "name overruns the payload"))?;
    if name.len() > MAX_STRING_LEN {
        return Err((rep::ERR_TOO_BIG, "name too long"));
    }
    let count = r.u32().ok_or(SHORT)?;
    if count > MAX_META_QUERIES {
        return Err((rep::ERR_TOO_BIG, "too many queries"));
    }
    // LIST without queries lists everything; SET without queries selects nothing.
    let mut matched = !set && count == 0;
    for _ in 0..count {
        let len = r.u32().ok_or(SHORT)?;
        let query = r
            .take(len as usize)
            .ok_or((rep::ERR_INVALID, "query overruns the payload"))?;
        if query.len() > MAX_STRING_LEN {
            return Err((rep::ERR_TOO_BIG, "query too long"));
        }
        matched |= query == BASE_ALLOCATION.as_bytes() || (!set && query == b"base:");
    }
    if r.remaining() != 0 {
        return Err((rep::ERR_INVALID, "trailing bytes after the queries"));
    }
    Ok((name, matched))
}

/// The message of `NBD_REP_ERR_TLS_REQD`.
const TLS_REQUIRED: &[u8] = b"this server requires TLS: send STARTTLS first";

/// Appends one option reply.
fn reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    // Our replies are built from bounded strings: far below 4 GiB.
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// The largest index `<= at` that is a character boundary of `s`.
fn floor_char_boundary(s: &str, at: usize) -> usize {
    if at >= s.len() {
        return s.len();
    }
    let mut end = at;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SIZE: u64 = 0x0123_4567_89ab_cdef;
    const MAGIC_BYTES: [u8; 8] = [0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9];
    /// HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES | SEND_CACHE |
    /// SEND_FAST_ZERO.
    const PLAIN_FLAGS: u16 = 0x0c6d;

    fn config() -> NegotiationConfig {
        NegotiationConfig {
            export_name: "disk".into(),
            description: Some("test disk".into()),
            size: SIZE,
            read_only: false,
            block_size: BlockSize {
                min: 512,
                preferred: 4096,
                max: 32 << 20,
            },
            can_multi_conn: false,
            shutting_down: false,
        }
    }

    fn option(option: u32, data: &[u8]) -> Vec<u8> {
        let mut out = IHAVEOPT.to_be_bytes().to_vec();
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        out
    }

    fn info_payload(name: &str, requests: &[u16]) -> Vec<u8> {
        let mut out = (name.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for r in requests {
            out.extend_from_slice(&r.to_be_bytes());
        }
        out
    }

    fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut out = (name.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            out.extend_from_slice(&(q.len() as u32).to_be_bytes());
            out.extend_from_slice(q.as_bytes());
        }
        out
    }

    /// The exact bytes of one option reply, built by hand.
    fn reply_bytes(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
        let mut out = MAGIC_BYTES.to_vec();
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&reply_type.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        out
    }

    /// Client flags followed by `messages`.
    fn script(flags: u32, messages: &[Vec<u8>]) -> Vec<u8> {
        let mut out = flags.to_be_bytes().to_vec();
        for m in messages {
            out.extend_from_slice(m);
        }
        out
    }

    /// Feeds all of `bytes` at once.
    fn run(
        config: NegotiationConfig,
        bytes: &[u8],
    ) -> (Vec<u8>, Result<Progress, NegotiationError>, BytesMut) {
        let mut neg = ServerNegotiation::new(config);
        let mut input = BytesMut::from(bytes);
        let mut out = Vec::new();
        let result = neg.feed(&mut input, &mut out);
        (out, result, input)
    }

    type Replies = Vec<(u32, u32, Vec<u8>)>;

    /// Splits `out` into option replies; returns them and whatever does not start with the
    /// reply magic (an EXPORT_NAME reply).
    fn parse_replies(mut out: &[u8]) -> (Replies, &[u8]) {
        let mut replies = Vec::new();
        while out.len() >= OPTION_REPLY_HEADER_LEN && out[..8] == MAGIC_BYTES {
            let be32 = |at: usize| u32::from_be_bytes(out[at..at + 4].try_into().unwrap());
            let (option, reply_type, len) = (be32(8), be32(12), be32(16) as usize);
            let end = OPTION_REPLY_HEADER_LEN + len;
            assert!(out.len() >= end, "reply overruns the output");
            replies.push((
                option,
                reply_type,
                out[OPTION_REPLY_HEADER_LEN..end].to_vec(),
            ));
            out = &out[end..];
        }
        (replies, out)
    }

    fn types(out: &[u8]) -> Vec<u32> {
        let (replies, rest) = parse_replies(out);
        assert!(rest.is_empty());
        replies.iter().map(|r| r.1).collect()
    }

    fn done(result: Result<Progress, NegotiationError>) -> Negotiated {
        match result {
            Ok(Progress::Done(n)) => n,
            other => panic!("expected Done, got {other:?}"),
        }
    }

    fn info_export(flags: u16) -> Vec<u8> {
        let mut out = vec![0, 0];
        out.extend_from_slice(&SIZE.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out
    }

    #[test]
    fn greeting_layout() {
        let neg = ServerNegotiation::new(config());
        let g = neg.greeting();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..18], &[0, 3]);
    }

    #[test]
    fn export_name_reply_with_zeroes() {
        let bytes = script(1, &[option(opt::EXPORT_NAME, b"disk")]);
        let (out, result, rest) = run(config(), &bytes);
        let mut expected = SIZE.to_be_bytes().to_vec();
        expected.extend_from_slice(&PLAIN_FLAGS.to_be_bytes());
        expected.extend_from_slice(&[0; 124]);
        assert_eq!(out, expected);
        assert!(rest.is_empty());
        let n = done(result);
        assert_eq!(
            n,
            Negotiated {
                structured_replies: false,
                extended_headers: false,
                base_allocation: None,
                transmission_flags: PLAIN_FLAGS,
                no_zeroes: false,
                export_name: "disk".into(),
                block_size: None,
            }
        );
        assert_eq!(n.reply_style(), ReplyStyle::Simple);
        assert_eq!(n.header_style(), HeaderStyle::Compact);
    }

    #[test]
    fn export_name_reply_without_zeroes_leaves_transmission_bytes() {
        let mut bytes = script(3, &[option(opt::EXPORT_NAME, b"disk")]);
        bytes.extend_from_slice(b"first request");
        let (out, result, rest) = run(config(), &bytes);
        let mut expected = SIZE.to_be_bytes().to_vec();
        expected.extend_from_slice(&PLAIN_FLAGS.to_be_bytes());
        assert_eq!(out, expected);
        assert_eq!(&rest[..], b"first request");
        assert!(done(result).no_zeroes);
    }

    #[test]
    fn export_name_failures_close() {
        let (out, result, _) = run(config(), &script(3, &[option(opt::EXPORT_NAME, b"nope")]));
        assert!(out.is_empty());
        assert_eq!(result, Err(NegotiationError::UnknownExport("nope".into())));

        let long = vec![b'a'; MAX_STRING_LEN + 1];
        let (_, result, _) = run(config(), &script(3, &[option(opt::EXPORT_NAME, &long)]));
        assert_eq!(result, Err(NegotiationError::ExportNameTooLong(4097)));

        let bytes = script(
            3,
            &[
                option(opt::EXTENDED_HEADERS, &[]),
                option(opt::EXPORT_NAME, b"disk"),
            ],
        );
        let (out, result, _) = run(config(), &bytes);
        assert_eq!(types(&out), vec![rep::ACK]);
        assert_eq!(
            result,
            Err(NegotiationError::ExportNameAfterExtendedHeaders)
        );
    }

    #[test]
    fn go_reply_sequence() {
        let mut bytes = script(3, &[option(opt::GO, &info_payload("disk", &[]))]);
        bytes.extend_from_slice(&[0x25, 0x60]);
        let (out, result, rest) = run(config(), &bytes);
        let mut expected = reply_bytes(opt::GO, rep::INFO, &info_export(PLAIN_FLAGS));
        expected.extend_from_slice(&reply_bytes(opt::GO, rep::ACK, &[]));
        assert_eq!(out, expected);
        // Exact layout of the first reply, byte by byte.
        assert_eq!(
            &out[..20],
            &[0, 3, 0xe8, 0x89, 4, 0x55, 0x65, 0xa9, 0, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, 12]
        );
        assert_eq!(&rest[..], &[0x25, 0x60]);
        let n = done(result);
        assert_eq!(n.block_size, None);
        assert_eq!(n.transmission_flags, PLAIN_FLAGS);
    }

    #[test]
    fn go_sends_requested_information() {
        let requests = [
            info::BLOCK_SIZE,
            99,
            info::NAME,
            info::DESCRIPTION,
            info::NAME,
        ];
        let bytes = script(3, &[option(opt::GO, &info_payload("", &requests))]);
        let (out, result, _) = run(config(), &bytes);
        let (replies, rest) = parse_replies(&out);
        assert!(rest.is_empty());
        let mut block_size = vec![0, 3];
        for v in [512u32, 4096, 32 << 20] {
            block_size.extend_from_slice(&v.to_be_bytes());
        }
        assert_eq!(
            replies,
            vec![
                (opt::GO, rep::INFO, info_export(PLAIN_FLAGS)),
                (opt::GO, rep::INFO, b"\0\x01disk".to_vec()),
                (opt::GO, rep::INFO, b"\0\x02test disk".to_vec()),
                (opt::GO, rep::INFO, block_size),
                (opt::GO, rep::ACK, vec![]),
            ]
        );
        let n = done(result);
        assert_eq!(n.block_size, Some(config().block_size));
        assert_eq!(n.export_name, "disk");
    }

    #[test]
    fn info_then_go() {
        let bytes = script(
            3,
            &[
                option(opt::INFO, &info_payload("disk", &[])),
                option(opt::GO, &info_payload("disk", &[])),
            ],
        );
        let (out, result, _) = run(config(), &bytes);
        assert_eq!(types(&out), vec![rep::INFO, rep::ACK, rep::INFO, rep::ACK]);
        done(result);
    }

    #[test]
    fn unknown_option_gets_unsup_and_negotiation_goes_on() {
        let bytes = script(
            3,
            &[
                option(99, b"whatever"),
                option(opt::STARTTLS, &[]),
                option(opt::GO, &info_payload("disk", &[])),
            ],
        );
        let (out, result, _) = run(config(), &bytes);
        let (replies, _) = parse_replies(&out);
        assert_eq!(
            out[..20],
            reply_bytes(99, rep::ERR_UNSUP, &replies[0].2)[..20]
        );
        assert_eq!(&out[12..16], &[0x80, 0, 0, 1]);
        // Without TLS offered, STARTTLS is a policy refusal (and negotiation goes on).
        assert_eq!(replies[1].1, rep::ERR_POLICY);
        done(result);
    }

    /// Feeds all of `bytes` at once to a negotiation offering TLS as `policy`.
    fn run_tls(
        policy: TlsPolicy,
        bytes: &[u8],
    ) -> (
        ServerNegotiation,
        Vec<u8>,
        Result<TlsProgress, NegotiationError>,
        BytesMut,
    ) {
        let mut neg = ServerNegotiation::new(config()).with_tls(policy);
        let mut input = BytesMut::from(bytes);
        let mut out = Vec::new();
        let result = neg.feed_tls(&mut input, &mut out);
        (neg, out, result, input)
    }

    fn reply_types(out: &[u8]) -> Vec<(u32, u32)> {
        parse_replies(out).0.iter().map(|r| (r.0, r.1)).collect()
    }

    #[test]
    fn required_tls_refuses_everything_before_starttls() {
        let go = option(opt::GO, &info_payload("disk", &[]));
        let bytes = script(
            3,
            &[
                option(opt::LIST, &[]),
                option(opt::INFO, &info_payload("disk", &[])),
                option(opt::STRUCTURED_REPLY, &[]),
                option(opt::EXTENDED_HEADERS, &[]),
                option(
                    opt::SET_META_CONTEXT,
                    &meta_payload("disk", &[BASE_ALLOCATION]),
                ),
                option(99, b"x"),
                go.clone(),
            ],
        );
        let (neg, out, result, _) = run_tls(TlsPolicy::Required, &bytes);
        assert_eq!(result, Ok(TlsProgress::Progress(Progress::NeedMore)));
        let types = reply_types(&out);
        assert_eq!(types.len(), 7);
        assert!(types.iter().all(|t| t.1 == rep::ERR_TLS_REQD), "{types:?}");
        assert!(!neg.in_tls());
        // An oversized option too.
        let mut big = option(opt::INFO, &[]);
        big[12..16].copy_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
        big.extend(vec![0u8; MAX_OPTION_LEN as usize + 1]);
        let (_, out, _, _) = run_tls(TlsPolicy::Required, &script(3, &[big]));
        assert_eq!(reply_types(&out), vec![(opt::INFO, rep::ERR_TLS_REQD)]);
        // EXPORT_NAME cannot be refused: the connection closes.
        let (_, out, result, _) = run_tls(
            TlsPolicy::Required,
            &script(3, &[option(opt::EXPORT_NAME, b"disk")]),
        );
        assert_eq!(result, Err(NegotiationError::TlsRequired));
        assert!(out.is_empty());
        // ABORT is answered.
        let (_, out, result, _) =
            run_tls(TlsPolicy::Required, &script(3, &[option(opt::ABORT, &[])]));
        assert_eq!(result, Ok(TlsProgress::Progress(Progress::Aborted)));
        assert_eq!(reply_types(&out), vec![(opt::ABORT, rep::ACK)]);
    }

    #[test]
    fn starttls_then_everything_negotiated_before_is_forgotten() {
        // Optional: a plain client may negotiate, then upgrade.
        let bytes = script(
            3,
            &[
                option(opt::STRUCTURED_REPLY, &[]),
                option(
                    opt::SET_META_CONTEXT,
                    &meta_payload("disk", &[BASE_ALLOCATION]),
                ),
                option(opt::STARTTLS, &[]),
            ],
        );
        let (mut neg, out, result, input) = run_tls(TlsPolicy::Optional, &bytes);
        assert_eq!(result, Ok(TlsProgress::StartTls));
        assert!(input.is_empty());
        let types = reply_types(&out);
        assert_eq!(types.last(), Some(&(opt::STARTTLS, rep::ACK)));
        // Nothing is read until the handshake is done.
        let mut more = BytesMut::from(&option(opt::ABORT, &[])[..]);
        let mut out = Vec::new();
        assert_eq!(
            neg.feed_tls(&mut more, &mut out),
            Err(NegotiationError::Finished)
        );
        let (mut neg, _, _, _) = run_tls(TlsPolicy::Optional, &bytes);
        neg.tls_started();
        assert!(neg.in_tls());
        // A second STARTTLS, or one with data, is invalid; then GO without structured
        // replies or meta contexts (they were forgotten).
        let mut input = BytesMut::new();
        for m in [
            option(opt::STARTTLS, &[]),
            option(opt::STARTTLS, b"x"),
            option(opt::GO, &info_payload("disk", &[])),
        ] {
            input.extend_from_slice(&m);
        }
        let mut out = Vec::new();
        let Ok(TlsProgress::Progress(Progress::Done(n))) = neg.feed_tls(&mut input, &mut out)
        else {
            panic!("GO over TLS did not finish");
        };
        assert!(!n.structured_replies);
        assert_eq!(n.base_allocation, None);
        let types = reply_types(&out);
        assert_eq!(types[0], (opt::STARTTLS, rep::ERR_INVALID));
        assert_eq!(types[1], (opt::STARTTLS, rep::ERR_INVALID));
        assert_eq!(types.last(), Some(&(opt::GO, rep::ACK)));
    }

    #[test]
    fn required_tls_serves_after_the_upgrade() {
        let (mut neg, out, result, _) = run_tls(
            TlsPolicy::Required,
            &script(3, &[option(opt::STARTTLS, &[])]),
        );
        assert_eq!(result, Ok(TlsProgress::StartTls));
        assert_eq!(out, reply_bytes(opt::STARTTLS, rep::ACK, &[]));
        neg.tls_started();
        let mut input = BytesMut::from(&option(opt::EXPORT_NAME, b"disk")[..]);
        let mut out = Vec::new();
        assert!(matches!(
            neg.feed_tls(&mut input, &mut out),
            Ok(TlsProgress::Progress(Progress::Done(_)))
        ));
    }

    #[test]
    fn starttls_misuse() {
        // Bytes pipelined after STARTTLS would be read as if they came over TLS.
        let bytes = script(3, &[option(opt::STARTTLS, &[]), option(opt::ABORT, &[])]);
        let (_, _, result, _) = run_tls(TlsPolicy::Optional, &bytes);
        assert_eq!(result, Err(NegotiationError::DataAfterStartTls(16)));
        // A driver without TLS that enabled it anyway gets an error, not a silent upgrade.
        let mut neg = ServerNegotiation::new(config()).with_tls(TlsPolicy::Optional);
        let mut input = BytesMut::from(&script(3, &[option(opt::STARTTLS, &[])])[..]);
        let mut out = Vec::new();
        assert_eq!(
            neg.feed(&mut input, &mut out),
            Err(NegotiationError::StartTlsNotDriven)
        );
        // With a payload: invalid, negotiation goes on.
        let bytes = script(3, &[option(opt::STARTTLS, b"x")]);
        let (_, out, result, _) = run_tls(TlsPolicy::Required, &bytes);
        assert_eq!(result, Ok(TlsProgress::Progress(Progress::NeedMore)));
        assert_eq!(reply_types(&out), vec![(opt::STARTTLS, rep::ERR_INVALID)]);
    }

    #[test]
    fn wrong_name_gets_err_unknown() {
        let bytes = script(
            3,
            &[
                option(opt::INFO, &info_payload("other", &[])),
                option(opt::GO, &info_payload("other", &[])),
                option(opt::GO, &info_payload("disk", &[])),
            ],
        );
        let (out, result, _) = run(config(), &bytes);
        let (replies, _) = parse_replies(&out);
        assert_eq!(&out[12..16], &[0x80, 0, 0, 6]);
        assert_eq!(
            replies.iter().map(|r| (r.0, r.1)).collect::<Vec<_>>(),
            vec![
                (opt::INFO, rep::ERR_UNKNOWN),
                (opt::GO, rep::ERR_UNKNOWN),
                (opt::GO, rep::INFO),
                (opt::GO, rep::ACK)
            ]
        );
        done(result);
    }

    #[test]
    fn list_reply_layout() {
        let bytes = script(3, &[option(opt::LIST, &[]), option(opt::LIST, b"x")]);
        let (out, result, _) = run(config(), &bytes);
        assert_eq!(result, Ok(Progress::NeedMore));
        let mut expected = reply_bytes(opt::LIST, rep::SERVER, b"\0\0\0\x04disktest disk");
        expected.extend_from_slice(&reply_bytes(opt::LIST, rep::ACK, &[]));
        assert_eq!(out[..expected.len()], expected[..]);
        assert_eq!(types(&out[expected.len()..]), vec![rep::ERR_INVALID]);

        let mut bare = config();
        bare.description = None;
        let (out, _, _) = run(bare, &script(3, &[option(opt::LIST, &[])]));
        let (replies, _) = parse_replies(&out);
        assert_eq!(replies[0].2, b"\0\0\0\x04disk");
    }

    #[test]
    fn transmission_flags() {
        let go = option(opt::GO, &info_payload("disk", &[]));
        let sr = option(opt::STRUCTURED_REPLY, &[]);
        let plain = done(run(config(), &script(3, std::slice::from_ref(&go))).1);
        assert_eq!(plain.transmission_flags, PLAIN_FLAGS);
        assert_eq!(plain.transmission_flags & tflags::SEND_DF, 0);

        let (out, result, _) = run(config(), &script(3, &[sr.clone(), go.clone()]));
        let structured = done(result);
        assert_eq!(structured.transmission_flags, PLAIN_FLAGS | tflags::SEND_DF);
        assert!(structured.structured_replies);
        assert_eq!(structured.reply_style(), ReplyStyle::Structured);
        // The INFO_EXPORT sent is what the session gets.
        let (replies, _) = parse_replies(&out);
        assert_eq!(replies[1].2, info_export(PLAIN_FLAGS | tflags::SEND_DF));

        let mut ro = config();
        ro.read_only = true;
        ro.can_multi_conn = true;
        let n = done(run(ro, &script(3, std::slice::from_ref(&go))).1);
        assert_eq!(
            n.transmission_flags,
            tflags::HAS_FLAGS
                | tflags::READ_ONLY
                | tflags::SEND_FLUSH
                | tflags::SEND_FUA
                | tflags::SEND_CACHE
                | tflags::CAN_MULTI_CONN
        );
        assert_eq!(n.transmission_flags & tflags::BLOCK_STATUS_PAYLOAD, 0);
    }

    #[test]
    fn extended_headers() {
        let bytes = script(
            3,
            &[
                option(opt::EXTENDED_HEADERS, &[]),
                option(opt::STRUCTURED_REPLY, &[]),
                option(opt::EXTENDED_HEADERS, b"x"),
                option(opt::GO, &info_payload("disk", &[])),
            ],
        );
        let (out, result, _) = run(config(), &bytes);
        assert_eq!(
            types(&out),
            vec![
                rep::ACK,
                rep::ERR_EXT_HEADER_REQD,
                rep::ERR_INVALID,
                rep::INFO,
                rep::ACK
            ]
        );
        let n = done(result);
        assert!(n.extended_headers && n.structured_replies);
        assert_eq!(n.reply_style(), ReplyStyle::Extended);
        assert_eq!(n.header_style(), HeaderStyle::Extended);
        assert_eq!(n.transmission_flags, PLAIN_FLAGS | tflags::SEND_DF);
    }

    #[test]
    fn structured_reply_checks() {
        let bytes = script(
            3,
            &[
                option(opt::STRUCTURED_REPLY, b"x"),
                option(opt::STRUCTURED_REPLY, &[]),
                option(opt::STRUCTURED_REPLY, &[]),
                option(opt::EXTENDED_HEADERS, &[]),
            ],
        );
        let (out, _, _) = run(config(), &bytes);
        assert_eq!(
            types(&out),
            vec![rep::ERR_INVALID, rep::ACK, rep::ACK, rep::ACK]
        );
    }

    fn meta_reply(id: u32) -> Vec<u8> {
        let mut out = id.to_be_bytes().to_vec();
        out.extend_from_slice(b"base:allocation");
        out
    }

    #[test]
    fn meta_contexts() {
        let list = |q: &[&str]| option(opt::LIST_META_CONTEXT, &meta_payload("disk", q));
        let set = |name: &str, q: &[&str]| option(opt::SET_META_CONTEXT, &meta_payload(name, q));
        let bytes = script(
            3,
            &[
                set("disk", &["base:allocation"]),
                list(&[]),
                list(&["base:"]),
                list(&["qemu:dirty-bitmap:x"]),
                option(opt::STRUCTURED_REPLY, &[]),
                set(
                    "disk",
                    &["base:", "qemu:x", "base:allocation", "base:allocation"],
                ),
            ],
        );
        let (out, result, _) = run(config(), &bytes);
        assert_eq!(result, Ok(Progress::NeedMore));
        let (replies, _) = parse_replies(&out);
        let expected: Replies = vec![
            (
                opt::SET_META_CONTEXT,
                rep::ERR_INVALID,
                replies[0].2.clone(),
            ),
            (opt::LIST_META_CONTEXT, rep::META_CONTEXT, meta_reply(0)),
            (opt::LIST_META_CONTEXT, rep::ACK, vec![]),
            (opt::LIST_META_CONTEXT, rep::META_CONTEXT, meta_reply(0)),
            (opt::LIST_META_CONTEXT, rep::ACK, vec![]),
            (opt::LIST_META_CONTEXT, rep::ACK, vec![]),
            (opt::STRUCTURED_REPLY, rep::ACK, vec![]),
            (
                opt::SET_META_CONTEXT,
                rep::META_CONTEXT,
                meta_reply(BASE_ALLOCATION_ID),
            ),
            (opt::SET_META_CONTEXT, rep::ACK, vec![]),
        ];
        assert_eq!(replies, expected);

        let go = option(opt::GO, &info_payload("disk", &[]));
        let sr = option(opt::STRUCTURED_REPLY, &[]);
        let n = done(
            run(
                config(),
                &script(3, &[sr.clone(), set("", &["base:allocation"]), go.clone()]),
            )
            .1,
        );
        assert_eq!(n.base_allocation, Some(BASE_ALLOCATION_ID));

        // A later SET replaces the selection, even when it fails or selects nothing.
        for second in [
            set("disk", &["base:"]),
            set("disk", &[]),
            set("other", &["base:allocation"]),
        ] {
            let (out, result, _) = run(
                config(),
                &script(
                    3,
                    &[
                        sr.clone(),
                        set("disk", &["base:allocation"]),
                        second,
                        go.clone(),
                    ],
                ),
            );
            assert_eq!(done(result).base_allocation, None);
            let t = types(&out);
            assert!(t[3] == rep::ACK || t[3] == rep::ERR_UNKNOWN, "{t:?}");
        }
    }

    #[test]
    fn meta_context_bounds() {
        let sr = option(opt::STRUCTURED_REPLY, &[]);
        let many: Vec<&str> = vec!["base:"; MAX_META_QUERIES as usize + 1];
        let long = "q".repeat(MAX_STRING_LEN + 1);
        let bytes = script(
            3,
            &[
                sr,
                option(opt::LIST_META_CONTEXT, &meta_payload("disk", &many)),
                option(opt::LIST_META_CONTEXT, &meta_payload("disk", &[&long])),
                option(opt::LIST_META_CONTEXT, &meta_payload(&long, &[])),
                // A query count larger than the payload.
                option(opt::LIST_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 5]),
                option(opt::LIST_META_CONTEXT, &[0, 0, 0, 9]),
                option(opt::SET_META_CONTEXT, &[0, 0]),
                option(
                    opt::LIST_META_CONTEXT,
                    &[meta_payload("disk", &[]), vec![1]].concat(),
                ),
            ],
        );
        let (out, _, _) = run(config(), &bytes);
        assert_eq!(
            types(&out),
            vec![
                rep::ACK,
                rep::ERR_TOO_BIG,
                rep::ERR_TOO_BIG,
                rep::ERR_TOO_BIG,
                rep::ERR_INVALID,
                rep::ERR_INVALID,
                rep::ERR_INVALID,
                rep::ERR_INVALID
            ]
        );
    }

    #[test]
    fn malformed_info_requests() {
        let long = "n".repeat(MAX_STRING_LEN + 1);
        let bytes = script(
            3,
            &[
                option(opt::INFO, &[0, 0]),
                option(opt::INFO, &[0, 0, 0, 9, b'd']),
                option(opt::INFO, &[0, 0, 0, 0, 0, 2, 0, 1]),
                option(opt::INFO, &[info_payload("disk", &[]), vec![0]].concat()),
                option(opt::GO, &info_payload(&long, &[])),
                option(opt::GO, &info_payload("disk", &[])),
            ],
        );
        let (out, result, _) = run(config(), &bytes);
        assert_eq!(
            types(&out),
            vec![
                rep::ERR_INVALID,
                rep::ERR_INVALID,
                rep::ERR_INVALID,
                rep::ERR_INVALID,
                rep::ERR_TOO_BIG,
                rep::INFO,
                rep::ACK
            ]
        );
        done(result);
    }

    #[test]
    fn shutting_down_refuses_everything_but_abort() {
        let mut cfg = config();
        cfg.shutting_down = true;
        let bytes = script(
            3,
            &[
                option(opt::LIST, &[]),
                option(opt::GO, &info_payload("disk", &[])),
                option(opt::STRUCTURED_REPLY, &[]),
                option(opt::ABORT, &[]),
            ],
        );
        let (out, result, _) = run(cfg.clone(), &bytes);
        assert_eq!(
            types(&out),
            vec![
                rep::ERR_SHUTDOWN,
                rep::ERR_SHUTDOWN,
                rep::ERR_SHUTDOWN,
                rep::ACK
            ]
        );
        assert_eq!(result, Ok(Progress::Aborted));
        let (_, result, _) = run(cfg, &script(3, &[option(opt::EXPORT_NAME, b"disk")]));
        assert_eq!(result, Err(NegotiationError::ShuttingDown));
    }

    #[test]
    fn abort_acks_and_ends() {
        let mut neg = ServerNegotiation::new(config());
        let mut input = BytesMut::from(&script(3, &[option(opt::ABORT, &[])])[..]);
        let mut out = Vec::new();
        assert_eq!(neg.feed(&mut input, &mut out), Ok(Progress::Aborted));
        assert_eq!(out, reply_bytes(opt::ABORT, rep::ACK, &[]));
        assert_eq!(
            neg.feed(&mut input, &mut out),
            Err(NegotiationError::Finished)
        );
    }

    #[test]
    fn client_flag_checks() {
        let (out, result, _) = run(config(), &script(4, &[]));
        assert!(out.is_empty());
        assert_eq!(result, Err(NegotiationError::UnknownClientFlags(4)));

        // Without FIXED_NEWSTYLE only EXPORT_NAME is understood.
        let (_, result, _) = run(config(), &script(0, &[option(opt::LIST, &[])]));
        assert_eq!(result, Err(NegotiationError::NotFixedNewstyle(opt::LIST)));
        let (out, result, _) = run(config(), &script(0, &[option(opt::EXPORT_NAME, b"")]));
        assert_eq!(out.len(), 134);
        done(result);

        let mut bytes = script(3, &[]);
        bytes.extend_from_slice(&[0; 16]);
        let (_, result, _) = run(config(), &bytes);
        assert_eq!(result, Err(NegotiationError::BadOptionMagic(0)));
    }

    #[test]
    fn oversized_options_are_skipped_as_they_arrive() {
        let len = MAX_OPTION_LEN as usize + 10;
        let mut neg = ServerNegotiation::new(config());
        let mut out = Vec::new();
        let mut input = BytesMut::from(&script(3, &[])[..]);
        let mut header = option(opt::LIST, &[]);
        header[12..16].copy_from_slice(&(len as u32).to_be_bytes());
        input.extend_from_slice(&header);
        let chunk = vec![0xaa; 4000];
        let mut sent = 0;
        while sent < len {
            let n = chunk.len().min(len - sent);
            input.extend_from_slice(&chunk[..n]);
            sent += n;
            assert_eq!(neg.feed(&mut input, &mut out), Ok(Progress::NeedMore));
            // Nothing piles up while the payload is skipped.
            assert!(input.is_empty());
        }
        assert_eq!(types(&out), vec![rep::ERR_TOO_BIG]);
        input.extend_from_slice(&option(opt::GO, &info_payload("disk", &[])));
        done(neg.feed(&mut input, &mut out));
    }

    #[test]
    fn block_size_validity() {
        assert!(BlockSize::DEFAULT.is_valid());
        assert!(config().block_size.is_valid());
        let bad = [
            BlockSize {
                min: 3,
                ..BlockSize::DEFAULT
            },
            BlockSize {
                min: 1 << 17,
                preferred: 1 << 17,
                max: 1 << 20,
            },
            BlockSize {
                preferred: 256,
                ..BlockSize::DEFAULT
            },
            BlockSize {
                max: 1024,
                ..BlockSize::DEFAULT
            },
            BlockSize {
                min: 512,
                preferred: 4096,
                max: 4097 * 512 + 1,
            },
        ];
        for b in bad {
            assert!(!b.is_valid(), "{b:?}");
        }
        assert!(BlockSize {
            min: 512,
            preferred: 4096,
            max: u32::MAX
        }
        .is_valid());
    }

    #[test]
    fn description_is_cut_to_the_string_limit() {
        let mut cfg = config();
        cfg.description = Some("ü".repeat(3000));
        let (out, _, _) = run(cfg, &script(3, &[option(opt::LIST, &[])]));
        let (replies, _) = parse_replies(&out);
        assert_eq!(replies[0].2.len(), 4 + 4 + MAX_STRING_LEN);
    }

    // Property tests.

    fn arb_name() -> impl Strategy<Value = &'static str> {
        prop_oneof![Just(""), Just("disk"), Just("other")]
    }

    fn arb_query() -> impl Strategy<Value = &'static str> {
        prop_oneof![
            Just("base:"),
            Just("base:allocation"),
            Just("qemu:x"),
            Just("")
        ]
    }

    /// One client message: mostly well-formed options, some garbage, a few oversized.
    fn arb_message() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            3 => Just(option(opt::LIST, &[])),
            3 => Just(option(opt::STRUCTURED_REPLY, &[])),
            2 => Just(option(opt::EXTENDED_HEADERS, &[])),
            3 => (arb_name(), proptest::collection::vec(0u16..5, 0..4))
                .prop_map(|(n, r)| option(opt::INFO, &info_payload(n, &r))),
            1 => (arb_name(), proptest::collection::vec(0u16..5, 0..4))
                .prop_map(|(n, r)| option(opt::GO, &info_payload(n, &r))),
            3 => (any::<bool>(), arb_name(), proptest::collection::vec(arb_query(), 0..4))
                .prop_map(|(set, n, q)| option(
                    if set { opt::SET_META_CONTEXT } else { opt::LIST_META_CONTEXT },
                    &meta_payload(n, &q))),
            1 => arb_name().prop_map(|n| option(opt::EXPORT_NAME, n.as_bytes())),
            1 => Just(option(opt::ABORT, &[])),
            4 => (0u32..16, proptest::collection::vec(any::<u8>(), 0..40))
                .prop_map(|(o, d)| option(o, &d)),
            1 => (0u32..12, (MAX_OPTION_LEN as usize + 1)..(MAX_OPTION_LEN as usize + 300))
                .prop_map(|(o, n)| option(o, &vec![7; n])),
        ]
    }

    fn arb_config() -> impl Strategy<Value = NegotiationConfig> {
        (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(read_only, multi, down)| {
            NegotiationConfig {
                read_only,
                can_multi_conn: multi,
                shutting_down: down,
                ..config()
            }
        })
    }

    #[derive(Debug, PartialEq)]
    struct Outcome {
        out: Vec<u8>,
        result: Option<Result<Progress, NegotiationError>>,
        rest: Vec<u8>,
        calls: usize,
    }

    /// Feeds `bytes` cut at `cuts`, one `feed` call per piece until negotiation ends; the
    /// pieces after the end are left in the input, as a session would.
    fn drive(config: NegotiationConfig, bytes: &[u8], cuts: &[usize]) -> Outcome {
        let mut neg = ServerNegotiation::new(config);
        let mut input = BytesMut::new();
        let mut out = Vec::new();
        let mut result = None;
        let mut calls = 0;
        let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        bounds.push(bytes.len());
        bounds.sort_unstable();
        let mut pos = 0;
        for end in bounds {
            input.extend_from_slice(&bytes[pos..end]);
            pos = end;
            if result.is_none() {
                calls += 1;
                match neg.feed(&mut input, &mut out) {
                    Ok(Progress::NeedMore) => {}
                    other => result = Some(other),
                }
            }
        }
        Outcome {
            out,
            result,
            rest: input.to_vec(),
            calls,
        }
    }

    proptest! {
        /// Under required TLS, whatever options come before STARTTLS (other than ABORT and
        /// EXPORT_NAME), each gets exactly one reply, NBD_REP_ERR_TLS_REQD, and nothing is
        /// negotiated.
        #[test]
        fn required_tls_refuses_any_option(
            options in proptest::collection::vec(
                (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..64)),
                0..12,
            ),
        ) {
            let options: Vec<(u32, Vec<u8>)> = options
                .into_iter()
                .filter(|(o, _)| ![opt::ABORT, opt::EXPORT_NAME, opt::STARTTLS].contains(o))
                .collect();
            let messages: Vec<Vec<u8>> = options.iter().map(|(o, d)| option(*o, d)).collect();
            let (_, out, result, input) = run_tls(TlsPolicy::Required, &script(3, &messages));
            prop_assert_eq!(result, Ok(TlsProgress::Progress(Progress::NeedMore)));
            prop_assert!(input.is_empty());
            let types = reply_types(&out);
            prop_assert_eq!(types.len(), options.len());
            for ((o, _), (ro, rt)) in options.iter().zip(&types) {
                prop_assert_eq!((*o, rep::ERR_TLS_REQD), (*ro, *rt));
            }
        }

        #[test]
        fn negotiation_is_independent_of_how_bytes_are_split(
            cfg in arb_config(),
            flags in prop_oneof![4 => 0u32..4, 1 => any::<u32>()],
            messages in proptest::collection::vec(arb_message(), 0..10),
            trailer in proptest::collection::vec(any::<u8>(), 0..40),
            cuts in proptest::collection::vec(any::<usize>(), 0..30),
        ) {
            let mut bytes = script(flags, &messages);
            bytes.extend_from_slice(&trailer);
            let whole = drive(cfg.clone(), &bytes, &[]);
            let split = drive(cfg, &bytes, &cuts);
            prop_assert_eq!(&whole.out, &split.out);
            prop_assert_eq!(&whole.result, &split.result);
            prop_assert_eq!(&whole.rest, &split.rest);
            // Replies are well-formed; only an EXPORT_NAME reply may follow them.
            let (replies, tail) = parse_replies(&whole.out);
            prop_assert!(replies.iter().all(|r| r.2.len() <= MAX_OPTION_LEN as usize));
            if !tail.is_empty() {
                prop_assert!(matches!(whole.result, Some(Ok(Progress::Done(_)))));
                prop_assert!(tail.len() == 10 || tail.len() == 134);
            }
            if let Some(Ok(Progress::Done(n))) = &whole.result {
                prop_assert!(n.base_allocation.is_none() || n.structured_replies);
                prop_assert!(!n.extended_headers || n.structured_replies);
                prop_assert_eq!(n.transmission_flags & tflags::SEND_DF != 0, n.structured_replies);
            }
        }

        #[test]
        fn garbage_always_ends_in_a_bounded_number_of_steps(
            cfg in arb_config(),
            prefix in prop_oneof![Just(vec![]), Just(vec![0, 0, 0, 3])],
            messages in proptest::collection::vec(arb_message(), 0..6),
            noise in proptest::collection::vec(any::<u8>(), 0..300),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
            cuts in proptest::collection::vec(any::<usize>(), 0..30),
        ) {
            let mut bytes = prefix;
            for m in &messages {
                bytes.extend_from_slice(m);
            }
            bytes.extend_from_slice(&noise);
            for (at, v) in flips {
                if !bytes.is_empty() {
                    let at = at % bytes.len();
                    bytes[at] = v;
                }
            }
            let run = drive(cfg, &bytes, &cuts);
            // One call per piece: each call returns, whatever it was fed.
            prop_assert!(run.calls <= cuts.len() + 1);
            match &run.result {
                None => {
                    // Waiting for more: what is left is less than one message (or is being
                    // skipped), and feeding nothing new changes nothing.
                    prop_assert!(run.rest.len() < OPTION_HEADER_LEN + MAX_OPTION_LEN as usize);
                }
                Some(Ok(Progress::Done(_))) | Some(Ok(Progress::Aborted)) | Some(Err(_)) => {}
                Some(Ok(Progress::NeedMore)) => prop_assert!(false, "NeedMore is not an end"),
            }
            let (_, tail) = parse_replies(&run.out);
            prop_assert!(tail.is_empty() || tail.len() == 10 || tail.len() == 134);
        }

        #[test]
        fn waiting_is_stable(
            messages in proptest::collection::vec(arb_message(), 0..6),
            cut in any::<usize>(),
        ) {
            let bytes = script(3, &messages);
            let cut = cut % (bytes.len() + 1);
            let mut neg = ServerNegotiation::new(config());
            let mut input = BytesMut::from(&bytes[..cut]);
            let mut out = Vec::new();
            if neg.feed(&mut input, &mut out) == Ok(Progress::NeedMore) {
                let (before_in, before_out) = (input.clone(), out.len());
                prop_assert_eq!(neg.feed(&mut input, &mut out), Ok(Progress::NeedMore));
                prop_assert_eq!(input, before_in);
                prop_assert_eq!(out.len(), before_out);
            }
        }
    }
}
