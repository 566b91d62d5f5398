//! The control socket's text protocol (`flexnbd-compat.md` §6, §7), byte for byte.
//!
//! A request is a sequence of LF-terminated lines ended by an empty line or by end of
//! input; line 1 is the command, the others its arguments. The answer is one line,
//! `<code>: <text>\n`. Everything here is pure: the control actor feeds bytes in and writes
//! the strings out.

use std::net::IpAddr;

use crate::addr::{atoi, parse_ip};

/// Lines longer than this are cut, the rest starting a new line, as flexnbd reads them.
pub const MAX_LINE: usize = 256;
/// A request larger than this is answered as it stands when the limit is reached, so a
/// client cannot make us buffer without bound. 4096 ACL entries fit.
pub const MAX_REQUEST: usize = 1 << 20;

/// Response codes.
pub const OK: u8 = 0;
pub const FAILED: u8 = 1;
pub const MISSING_COMMAND: u8 = 9;
pub const UNKNOWN_COMMAND: u8 = 10;

/// Formats the single response line.
pub fn response(code: u8, text: &str) -> String {
    format!("{code}: {text}\n")
}

/// Collects request lines from bytes as they arrive.
#[derive(Debug, Default)]
pub struct RequestReader {
    lines: Vec<String>,
    current: Vec<u8>,
    total: usize,
    complete: bool,
}

impl RequestReader {
    /// Consumes `bytes`; returns true once the request is complete (an empty line was seen
    /// or the size limit reached). Bytes after the terminating empty line are ignored.
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        for &b in bytes {
            if self.complete {
                break;
            }
            self.total += 1;
            if b == b'\n' {
                if self.current.is_empty() {
                    self.complete = true;
                } else {
                    self.push_line();
                }
            } else {
                self.current.push(b);
                if self.current.len() == MAX_LINE {
                    self.push_line();
                }
            }
            if self.total >= MAX_REQUEST {
                self.complete = true;
            }
        }
        self.complete
    }

    fn push_line(&mut self) {
        let line = String::from_utf8_lossy(&self.current).into_owned();
        self.lines.push(line);
        self.current.clear();
    }

    /// The request's lines. A last line without its LF (end of input came first) is
    /// discarded, as flexnbd does.
    pub fn into_lines(self) -> Vec<String> {
        self.lines
    }
}

/// What `mirror` asks for once its arguments are valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorRequest {
    pub addr: IpAddr,
    pub port: u16,
    pub action: MirrorAction,
    pub bind: Option<IpAddr>,
    /// Bytes per second; `u64::MAX` means unlimited.
    pub max_bps: u64,
    /// How the mirror copies (ours: the optional sixth argument; C flexnbd never sends it).
    pub mode: CopyMode,
    /// TLS to the destination (ours: a named argument after the positional ones, which C
    /// flexnbd never sends). Only paths here: the server loads and checks the files.
    pub tls: Option<MirrorTls>,
}

/// Credentials a `mirror` names for TLS to its destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MirrorTls {
    /// `tls-creds=DIR`: an x509 directory (`ca-cert.pem`, optionally `client-cert.pem` and
    /// `client-key.pem`).
    X509(String),
    /// `tls-psk=FILE`: a psktool key file; the first entry's username is used.
    Psk(String),
}

/// The named `mirror` arguments: `NAME=VALUE`, after the positional ones.
pub const TLS_CREDS_ARG: &str = "tls-creds=";
pub const TLS_PSK_ARG: &str = "tls-psk=";

impl MirrorTls {
    /// The named argument that sends these credentials over the control socket.
    pub fn argument(&self) -> String {
        match self {
            MirrorTls::X509(dir) => format!("{TLS_CREDS_ARG}{dir}"),
            MirrorTls::Psk(file) => format!("{TLS_PSK_ARG}{file}"),
        }
    }
}

/// `arg` as a named argument of `mirror`, if it is one. No positional value can start
/// like this (an address, a port, an action, a number or a mode).
fn named_argument(arg: &str) -> Option<Result<MirrorTls, &'static str>> {
    if let Some(dir) = arg.strip_prefix(TLS_CREDS_ARG) {
        Some(if dir.is_empty() {
            Err("tls-creds needs a directory")
        } else {
            Ok(MirrorTls::X509(dir.to_owned()))
        })
    } else if let Some(file) = arg.strip_prefix(TLS_PSK_ARG) {
        Some(if file.is_empty() {
            Err("tls-psk needs a file")
        } else {
            Ok(MirrorTls::Psk(file.to_owned()))
        })
    } else {
        None
    }
}

/// How a migration copies (`mirror`'s sixth argument, `flexnbd mirror --mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CopyMode {
    /// flexnbd's passes only: clients' writes mark blocks dirty, the mirror sends them
    /// later. Converges only if clients write slower than the copy goes.
    Background,
    /// Write-blocking from the start: a write to a range already copied reaches the
    /// destination before the client gets its answer.
    Active,
    /// Background while each pass leaves less behind than the one before, then active.
    #[default]
    Auto,
}

impl CopyMode {
    pub fn parse(text: &str) -> Option<CopyMode> {
        match text {
            "background" => Some(CopyMode::Background),
            "active" => Some(CopyMode::Active),
            "auto" => Some(CopyMode::Auto),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CopyMode::Background => "background",
            CopyMode::Active => "active",
            CopyMode::Auto => "auto",
        }
    }
}

/// What the source does once the migration has converged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MirrorAction {
    /// Hand over and exit.
    Exit,
    /// Delete the source file, hand over and exit.
    Unlink,
    /// Only report completion and keep serving (control socket only).
    Nothing,
}

/// The argument of `break` that makes an in-doubt source authoritative again.
pub const FORCE_SOURCE: &str = "force-source";

/// A parsed control request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlRequest {
    /// No lines at all.
    Missing,
    Unknown,
    Acl(Vec<String>),
    Status,
    /// `break`; `force_source` with the argument [`FORCE_SOURCE`] (ours: C flexnbd never
    /// sends it), which overrides an in-doubt hand-off.
    Break {
        force_source: bool,
    },
    /// `mirror` with valid arguments.
    Mirror(MirrorRequest),
    /// `mirror` whose arguments were refused; the text is the exact response.
    MirrorRefused(&'static str),
    /// `mirror_max_bps`: its arguments, checked only once it is known that a mirror runs
    /// (`1: Not currently mirroring` comes first).
    MirrorMaxBps(Vec<String>),
    /// `mirror_wait` (ours): answered only when the registered migration ends, so that a
    /// caller can follow a migration to its outcome without polling `status`.
    MirrorWait,
}

impl ControlRequest {
    pub fn parse(lines: &[String]) -> ControlRequest {
        let Some((command, args)) = lines.split_first() else {
            return ControlRequest::Missing;
        };
        match command.as_str() {
            "acl" => ControlRequest::Acl(args.to_vec()),
            "status" => ControlRequest::Status,
            "break" => ControlRequest::Break {
                force_source: args.first().is_some_and(|a| a == FORCE_SOURCE),
            },
            "mirror" => match parse_mirror(args) {
                Ok(m) => ControlRequest::Mirror(m),
                Err(text) => ControlRequest::MirrorRefused(text),
            },
            "mirror_max_bps" => ControlRequest::MirrorMaxBps(args.to_vec()),
            "mirror_wait" => ControlRequest::MirrorWait,
            _ => ControlRequest::Unknown,
        }
    }
}

/// Checks `mirror`'s arguments in flexnbd's order; the error is the response text. Named
/// arguments (ours) follow the positional ones and are checked after them.
fn parse_mirror(args: &[String]) -> Result<MirrorRequest, &'static str> {
    let positional = args
        .iter()
        .position(|a| named_argument(a).is_some())
        .unwrap_or(args.len());
    let (args, named) = args.split_at(positional);
    let mut request = parse_positional(args)?;
    for arg in named {
        let tls = named_argument(arg).ok_or("unrecognised parameters to mirror")??;
        if request.tls.is_some() {
            return Err("give one of tls-creds and tls-psk, once");
        }
        request.tls = Some(tls);
    }
    Ok(request)
}

fn parse_positional(args: &[String]) -> Result<MirrorRequest, &'static str> {
    if args.len() < 2 {
        return Err("mirror takes at least two parameters");
    }
    let addr = parse_ip(&args[0]).ok_or("bad IP address")?;
    let port = u16::try_from(atoi(&args[1])).map_err(|_| "bad IP port number")?;
    let action = match args.get(2).map(String::as_str) {
        None | Some("exit") => MirrorAction::Exit,
        Some("unlink") => MirrorAction::Unlink,
        Some("nothing") => MirrorAction::Nothing,
        Some(_) => return Err("action must be 'exit' or 'nothing'"),
    };
    // An unspecified address (`0.0.0.0`, `::`) binds to nothing in particular: what a
    // client sends to reach the sixth argument without choosing a source address.
    let bind = match args.get(3) {
        None => None,
        Some(text) => Some(parse_ip(text).ok_or("bad bind address")?),
    }
    .filter(|ip| !ip.is_unspecified());
    let max_bps = match args.get(4) {
        None => u64::MAX,
        Some(text) => parse_max_bps(text)?,
    };
    let mode = match args.get(5) {
        None => CopyMode::default(),
        Some(text) => {
            CopyMode::parse(text).ok_or("mode must be 'background', 'active' or 'auto'")?
        }
    };
    if args.len() > 6 {
        return Err("unrecognised parameters to mirror");
    }
    Ok(MirrorRequest {
        addr,
        port,
        action,
        bind,
        max_bps,
        mode,
        tls: None,
    })
}

/// Parses a bandwidth limit with C `strtoull` semantics (base 10): leading space and a sign
/// are accepted, garbage gives 0, a value past `u64::MAX` is out of range, and a minus sign
/// negates modulo 2^64 as C does.
pub fn parse_max_bps(text: &str) -> Result<u64, &'static str> {
    let trimmed = text.trim_start();
    let (negative, digits) = match trimmed.as_bytes().first() {
        Some(b'-') => (true, &trimmed[1..]),
        Some(b'+') => (false, &trimmed[1..]),
        _ => (false, trimmed),
    };
    let mut value: u64 = 0;
    for b in digits.bytes().take_while(u8::is_ascii_digit) {
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(b - b'0')))
            .ok_or("max_bps out of range")?;
    }
    Ok(if negative {
        value.wrapping_neg()
    } else {
        value
    })
}

/// `mirror_max_bps`'s argument check, once a mirror is known to run.
pub fn parse_mirror_max_bps(args: &[String]) -> Result<u64, &'static str> {
    match args {
        [one] => parse_max_bps(one),
        _ => Err("Bad format"),
    }
}

/// The migration part of the status line, present only while a mirror is registered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MigrationStatus {
    pub speed: u64,
    pub duration_secs: u64,
    /// `None` until a rate is known: the key is then omitted.
    pub seconds_left: Option<u64>,
    pub bytes_left: u64,
    /// `None` when unlimited: the key is then omitted.
    pub speed_limit: Option<u64>,
}

/// Everything the status line shows, in flexnbd's order, then our own keys.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    pub pid: u32,
    pub size: u64,
    pub is_mirroring: bool,
    pub clients_allowed: bool,
    pub num_clients: usize,
    pub has_control: bool,
    pub migration: Option<MigrationStatus>,
    /// Our keys, after the compatible ones (tools that split on spaces ignore what they do
    /// not know).
    pub extra: Vec<(&'static str, String)>,
}

impl Status {
    /// `key=value ` for every key, so the line ends with a space (no newline).
    pub fn line(&self) -> String {
        let mut pairs: Vec<(&str, String)> = vec![
            ("pid", self.pid.to_string()),
            ("size", self.size.to_string()),
            ("is_mirroring", self.is_mirroring.to_string()),
            ("clients_allowed", self.clients_allowed.to_string()),
            ("num_clients", self.num_clients.to_string()),
            ("has_control", self.has_control.to_string()),
        ];
        if let (true, Some(m)) = (self.is_mirroring, &self.migration) {
            pairs.push(("migration_speed", m.speed.to_string()));
            pairs.push(("migration_duration", m.duration_secs.to_string()));
            if let Some(left) = m.seconds_left {
                pairs.push(("migration_seconds_left", left.to_string()));
            }
            pairs.push(("migration_bytes_left", m.bytes_left.to_string()));
            if let Some(limit) = m.speed_limit {
                pairs.push(("migration_speed_limit", limit.to_string()));
            }
        }
        pairs.extend(self.extra.iter().map(|(k, v)| (*k, v.clone())));
        pairs.iter().map(|(k, v)| format!("{k}={v} ")).collect()
    }

    /// The same fields as a JSON object (`status --json`), built from a status line.
    /// Booleans and numbers keep their types; everything else is a string.
    pub fn json_from_line(line: &str) -> String {
        let fields: Vec<String> = line
            .split(' ')
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| {
                let value = if v == "true"
                    || v == "false"
                    || (!v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                {
                    v.to_owned()
                } else {
                    format!("\"{}\"", json_escape(v))
                };
                format!("\"{}\":{value}", json_escape(k))
            })
            .collect();
        format!("{{{}}}", fields.join(","))
    }
}

fn json_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lines(text: &[u8]) -> (bool, Vec<String>) {
        let mut reader = RequestReader::default();
        let done = reader.feed(text);
        (done, reader.into_lines())
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn framing_follows_flexnbd() {
        assert_eq!(lines(b"status\n\n"), (true, strings(&["status"])));
        assert_eq!(
            lines(b"acl\n10.0.0.0/8\n::1\n\nignored"),
            (true, strings(&["acl", "10.0.0.0/8", "::1"]))
        );
        // End of input ends the request too; an unterminated last line is discarded.
        assert_eq!(lines(b"status\nhalf"), (false, strings(&["status"])));
        assert_eq!(lines(b""), (false, vec![]));
        assert_eq!(lines(b"\n"), (true, vec![]));
        // CR is not special.
        assert_eq!(lines(b"status\r\n\n"), (true, strings(&["status\r"])));
        let long = vec![b'a'; 300];
        let (_, got) = lines(&[&long[..], b"\n\n"].concat());
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].len(), 256);
        assert_eq!(got[1].len(), 44);
    }

    #[test]
    fn commands() {
        assert_eq!(ControlRequest::parse(&[]), ControlRequest::Missing);
        assert_eq!(
            ControlRequest::parse(&strings(&["bogus"])),
            ControlRequest::Unknown
        );
        assert_eq!(
            ControlRequest::parse(&strings(&["status", "x"])),
            ControlRequest::Status
        );
        assert_eq!(
            ControlRequest::parse(&strings(&["acl"])),
            ControlRequest::Acl(vec![])
        );
        assert_eq!(response(10, "unknown command"), "10: unknown command\n");
        assert_eq!(
            ControlRequest::parse(&strings(&["mirror_wait"])),
            ControlRequest::MirrorWait
        );
        // Arguments are ignored, as `status` ignores them.
        assert_eq!(
            ControlRequest::parse(&strings(&["mirror_wait", "x"])),
            ControlRequest::MirrorWait
        );
    }

    #[test]
    fn mirror_arguments_are_checked_in_order() {
        let refused = |args: &[&str]| match ControlRequest::parse(&strings(args)) {
            ControlRequest::MirrorRefused(text) => text,
            other => panic!("{args:?} gave {other:?}"),
        };
        assert_eq!(
            refused(&["mirror", "127.0.0.1"]),
            "mirror takes at least two parameters"
        );
        assert_eq!(refused(&["mirror", "host", "1"]), "bad IP address");
        assert_eq!(
            refused(&["mirror", "127.0.0.1", "70000"]),
            "bad IP port number"
        );
        assert_eq!(
            refused(&["mirror", "127.0.0.1", "1", "stay"]),
            "action must be 'exit' or 'nothing'"
        );
        assert_eq!(
            refused(&["mirror", "127.0.0.1", "1", "exit", "nope"]),
            "bad bind address"
        );
        assert_eq!(
            refused(&[
                "mirror",
                "127.0.0.1",
                "1",
                "exit",
                "0",
                "99999999999999999999"
            ]),
            "max_bps out of range"
        );
        assert_eq!(
            refused(&["mirror", "127.0.0.1", "1", "exit", "0", "5", "fast"]),
            "mode must be 'background', 'active' or 'auto'"
        );
        assert_eq!(
            refused(&["mirror", "127.0.0.1", "1", "exit", "0", "5", "auto", "x"]),
            "unrecognised parameters to mirror"
        );
        match ControlRequest::parse(&strings(&[
            "mirror",
            "127.0.0.1",
            "1",
            "exit",
            "0.0.0.0",
            "0",
            "active",
        ])) {
            ControlRequest::Mirror(m) => {
                assert_eq!(m.bind, None, "an unspecified bind address binds nothing");
                assert_eq!(m.mode, CopyMode::Active);
            }
            other => panic!("{other:?}"),
        }
        let ok = ControlRequest::parse(&strings(&[
            "mirror", "::1", "4777", "unlink", "::1", "1000",
        ]));
        assert_eq!(
            ok,
            ControlRequest::Mirror(MirrorRequest {
                addr: "::1".parse().unwrap(),
                port: 4777,
                action: MirrorAction::Unlink,
                bind: Some("::1".parse().unwrap()),
                max_bps: 1000,
                mode: CopyMode::Auto,
                tls: None,
            })
        );
        match ControlRequest::parse(&strings(&["mirror", "127.0.0.1", "1"])) {
            ControlRequest::Mirror(m) => {
                assert_eq!(m.action, MirrorAction::Exit);
                assert_eq!(m.max_bps, u64::MAX);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn mirror_takes_tls_as_a_named_argument() {
        let parse = |args: &[&str]| ControlRequest::parse(&strings(args));
        let tls = |args: &[&str]| match parse(args) {
            ControlRequest::Mirror(m) => m.tls,
            other => panic!("{other:?}"),
        };
        // After two, five or six positional arguments; those keep their meaning.
        assert_eq!(
            tls(&["mirror", "::1", "4777", "tls-creds=/etc/pki/nbd"]),
            Some(MirrorTls::X509("/etc/pki/nbd".into()))
        );
        match parse(&[
            "mirror",
            "::1",
            "4777",
            "nothing",
            "0.0.0.0",
            "1000",
            "active",
            "tls-psk=/k.psk",
        ]) {
            ControlRequest::Mirror(m) => {
                assert_eq!(m.action, MirrorAction::Nothing);
                assert_eq!(m.max_bps, 1000);
                assert_eq!(m.mode, CopyMode::Active);
                assert_eq!(m.tls, Some(MirrorTls::Psk("/k.psk".into())));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(tls(&["mirror", "::1", "4777", "exit"]), None);
        let refused = |args: &[&str]| match parse(args) {
            ControlRequest::MirrorRefused(text) => text,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            refused(&["mirror", "::1", "1", "tls-psk=/a", "tls-creds=/b"]),
            "give one of tls-creds and tls-psk, once"
        );
        assert_eq!(
            refused(&["mirror", "::1", "1", "tls-creds="]),
            "tls-creds needs a directory"
        );
        // Positional arguments cannot follow a named one.
        assert_eq!(
            refused(&["mirror", "::1", "1", "tls-psk=/a", "exit"]),
            "unrecognised parameters to mirror"
        );
        // The positional checks come first, as in flexnbd.
        assert_eq!(
            refused(&["mirror", "tls-psk=/a"]),
            "mirror takes at least two parameters"
        );
        assert_eq!(
            MirrorTls::X509("/d".into()).argument(),
            "tls-creds=/d".to_string()
        );
    }

    #[test]
    fn max_bps_follows_strtoull() {
        assert_eq!(parse_max_bps("1000"), Ok(1000));
        assert_eq!(parse_max_bps("garbage"), Ok(0));
        assert_eq!(parse_max_bps(" 12abc"), Ok(12));
        assert_eq!(parse_max_bps("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(
            parse_max_bps("18446744073709551616"),
            Err("max_bps out of range")
        );
        assert_eq!(parse_max_bps("-1"), Ok(u64::MAX));
        assert_eq!(
            parse_mirror_max_bps(&strings(&["1", "2"])),
            Err("Bad format")
        );
    }

    #[test]
    fn status_line_matches_flexnbd() {
        let status = Status {
            pid: 9635,
            size: 1048576,
            is_mirroring: false,
            clients_allowed: true,
            num_clients: 0,
            has_control: true,
            migration: Some(MigrationStatus::default()),
            extra: vec![],
        };
        assert_eq!(
            status.line(),
            "pid=9635 size=1048576 is_mirroring=false clients_allowed=true num_clients=0 has_control=true "
        );
        let mirroring = Status {
            pid: 16388,
            size: 67108864,
            is_mirroring: true,
            clients_allowed: false,
            num_clients: 0,
            has_control: true,
            migration: Some(MigrationStatus {
                speed: 8388608,
                duration_secs: 2,
                seconds_left: Some(3),
                bytes_left: 33554432,
                speed_limit: Some(10000000),
            }),
            extra: vec![("alloc_map", "built".into())],
        };
        assert_eq!(
            mirroring.line(),
            "pid=16388 size=67108864 is_mirroring=true clients_allowed=false num_clients=0 has_control=true \
             migration_speed=8388608 migration_duration=2 migration_seconds_left=3 \
             migration_bytes_left=33554432 migration_speed_limit=10000000 alloc_map=built "
        );
        assert_eq!(
            Status::json_from_line(&mirroring.line()),
            "{\"pid\":16388,\"size\":67108864,\"is_mirroring\":true,\"clients_allowed\":false,\
             \"num_clients\":0,\"has_control\":true,\"migration_speed\":8388608,\"migration_duration\":2,\
             \"migration_seconds_left\":3,\"migration_bytes_left\":33554432,\
             \"migration_speed_limit\":10000000,\"alloc_map\":\"built\"}"
        );
    }

    proptest! {
        #[test]
        fn garbage_never_panics_and_is_bounded(bytes in proptest::collection::vec(any::<u8>(), 0..2000), cut in any::<usize>()) {
            let cut = cut % (bytes.len() + 1);
            let mut split = RequestReader::default();
            split.feed(&bytes[..cut]);
            split.feed(&bytes[cut..]);
            let mut whole = RequestReader::default();
            whole.feed(&bytes);
            let lines = whole.into_lines();
            prop_assert_eq!(&split.into_lines(), &lines);
            prop_assert!(lines.iter().all(|l| l.len() <= MAX_LINE * 3));
            let _ = ControlRequest::parse(&lines);
        }
    }
}
