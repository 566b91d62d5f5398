//! The control-socket client modes: `acl`, `status`, `mirror`, `mirror-speed`, `break`
//! (flexnbd §3.6-3.11).
//!
//! Each sends one request (`command\n`, one line per argument, a blank line) and prints the
//! text of the single response line: on stdout when its code is 0, on stderr otherwise. The
//! exit status is the response's code. Failures on our side (no socket, connection refused,
//! a malformed or missing answer) exit with [`LOCAL_FAILURE`], distinct from the server's
//! codes 0, 1, 9 and 10.
//!
//! `mirror --wait` (ours) then follows the migration to its end (see [`super::follow`]).

use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use clap::ArgMatches;

use crate::fatal;
use crate::protocol::control::{CopyMode, MirrorTls, Status, FORCE_SOURCE};

use super::{flag, value};

/// Exit status when we could not get an answer from the server at all.
pub const LOCAL_FAILURE: i32 = 2;
/// The longest response line we read (flexnbd's response buffer).
const MAX_RESPONSE: usize = 1024;
/// `mirror` answers only after the first connection attempt, which may take about 20 s;
/// nothing else should take long, but no answer at all must not hang the caller.
pub(super) const ANSWER_TIMEOUT: Duration = Duration::from_secs(90);

pub fn run(mode: &str, matches: &ArgMatches) -> i32 {
    if let Err(code) = validate(mode, matches) {
        return code;
    }
    let sock = value(matches, "sock").unwrap_or_default();
    let lines = request_lines(mode, matches);
    if mode == "mirror" && flag(matches, "wait") {
        return super::follow::mirror_and_wait(sock, &lines);
    }
    match exchange(sock, &lines, Some(ANSWER_TIMEOUT)) {
        Ok((code, text)) => {
            let json = mode == "status" && flag(matches, "json");
            let text = if json && code == 0 {
                Status::json_from_line(&text)
            } else {
                text
            };
            print_answer(code, &text)
        }
        Err(e) => local_failure(&e),
    }
}

/// Prints an answer's text where flexnbd does (stdout for codes up to 0, stderr otherwise)
/// and returns the exit status, the answer's code.
pub(super) fn print_answer(code: i32, text: &str) -> i32 {
    if code <= 0 {
        println!("{text}");
    } else {
        eprintln!("{text}");
    }
    code
}

/// Logs a failure on our side and returns its exit status.
pub(super) fn local_failure(e: &anyhow::Error) -> i32 {
    fatal!("{e:#}");
    LOCAL_FAILURE
}

fn validate(mode: &str, matches: &ArgMatches) -> Result<(), i32> {
    let mut messages = Vec::new();
    if value(matches, "sock").is_none() {
        messages.push("--sock is required.".to_owned());
    }
    match mode {
        "mirror" if value(matches, "addr").is_none() || value(matches, "port").is_none() => {
            messages.push("both --addr and --port are required.".to_owned())
        }
        "mirror-speed" if value(matches, "max-speed").is_none() => {
            messages.push("--max-speed is required.".to_owned())
        }
        _ => {}
    }
    if let Some(Err(why)) = (mode == "mirror-speed")
        .then(|| value(matches, "max-speed").map(parse_speed))
        .flatten()
    {
        messages.push(why);
    }
    if let Some(Err(why)) = (mode == "mirror")
        .then(|| value(matches, "port").map(parse_mirror_port))
        .flatten()
    {
        messages.push(why);
    }
    if mode == "mirror" {
        if let Err(why) = mirror_tls(matches) {
            messages.push(why);
        }
    }
    let copy_mode = (mode == "mirror").then(|| value(matches, "mode")).flatten();
    if let Some(bad) = copy_mode.filter(|m| CopyMode::parse(m).is_none()) {
        messages.push(format!(
            "--mode must be 'background', 'active' or 'auto', not '{bad}'."
        ));
    }
    if messages.is_empty() {
        return Ok(());
    }
    for m in messages {
        eprintln!("{m}");
    }
    eprint!("{}", super::spec::find(mode).expect("mode exists").help());
    Err(1)
}

/// `mirror-speed --max-speed`: bytes per second, optionally with a suffix `K`, `M` or `G`
/// (powers of 1024, either case); 0 removes the limit. The server parses the number as C's
/// `strtoull` does (`10M` would be 10, `abc` 0 = unlimited, `-5` accepted), so the client
/// checks it and sends plain digits.
pub(crate) fn parse_speed(text: &str) -> Result<u64, String> {
    let refuse = || {
        format!(
            "--max-speed must be a number of bytes per second, optionally with K, M or G \
             (powers of 1024), such as 10M; not '{text}'."
        )
    };
    let (digits, scale) = match text.char_indices().last() {
        Some((at, 'k' | 'K')) => (&text[..at], 1u64 << 10),
        Some((at, 'm' | 'M')) => (&text[..at], 1 << 20),
        Some((at, 'g' | 'G')) => (&text[..at], 1 << 30),
        _ => (text, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(refuse());
    }
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(refuse)
}

/// `mirror --tls-creds` / `--tls-psk` as the named argument the server reads, with an
/// absolute path (the server's working directory is not ours). The server loads and checks
/// the files; this only catches a missing or unreadable one early.
fn mirror_tls(matches: &ArgMatches) -> Result<Option<MirrorTls>, String> {
    let (creds, psk) = (value(matches, "tls-creds"), value(matches, "tls-psk"));
    let (option, text) = match (creds, psk) {
        (Some(_), Some(_)) => return Err("give --tls-creds or --tls-psk, not both.".into()),
        (None, None) => return Ok(None),
        (Some(dir), None) => ("--tls-creds", dir),
        (None, Some(file)) => ("--tls-psk", file),
    };
    let path = std::path::absolute(text).map_err(|e| format!("{option} {text}: {e}"))?;
    // The control protocol is line-based.
    let Some(shown) = path.to_str().filter(|p| !p.contains(['\n', '\r'])) else {
        return Err(format!(
            "{option}: the path {text:?} cannot be sent to the server."
        ));
    };
    let readable = |p: &std::path::Path| {
        std::fs::File::open(p)
            .map(drop)
            .map_err(|e| format!("{option}: {}: {e}", p.display()))
    };
    if creds.is_some() {
        if !path.is_dir() {
            return Err(format!("{option}: {shown}: not a directory"));
        }
        readable(&path.join("ca-cert.pem"))?;
        Ok(Some(MirrorTls::X509(shown.to_owned())))
    } else {
        readable(&path)?;
        Ok(Some(MirrorTls::Psk(shown.to_owned())))
    }
}

/// `mirror --port`: a destination port, 1 to 65535 (port 0 cannot be connected to).
fn parse_mirror_port(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(format!(
            "--port must be the destination's port, 1 to 65535; not '{text}'."
        )),
    }
}

/// The request's lines: the command, then its arguments.
fn request_lines(mode: &str, matches: &ArgMatches) -> Vec<String> {
    let positional = || -> Vec<String> {
        matches
            .get_many::<String>("positional")
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    };
    let get = |id: &str| value(matches, id).unwrap_or_default().to_owned();
    match mode {
        "acl" => std::iter::once("acl".to_owned())
            .chain(positional())
            .collect(),
        "break" => std::iter::once("break".to_owned())
            .chain(flag(matches, "force-source").then(|| FORCE_SOURCE.to_owned()))
            .chain(positional())
            .collect(),
        // Checked in `validate`: what goes out is the plain number the server parses.
        "mirror-speed" => vec![
            "mirror_max_bps".into(),
            parse_speed(&get("max-speed")).map_or_else(|_| get("max-speed"), |n| n.to_string()),
        ],
        "mirror" => {
            let action = if flag(matches, "unlink") {
                "unlink"
            } else {
                "exit"
            };
            let mut lines = vec!["mirror".into(), get("addr"), get("port"), action.into()];
            let bind = value(matches, "bind").map(str::to_owned);
            match value(matches, "mode") {
                // Exactly what C flexnbd's client sends, which C flexnbd servers accept.
                None => lines.extend(bind),
                // The mode is the sixth argument: the two before it say "no choice".
                Some(mode) => lines.extend([
                    bind.unwrap_or_else(|| unspecified_like(&get("addr")).to_owned()),
                    "0".to_owned(),
                    mode.to_owned(),
                ]),
            }
            // A named argument after the positional ones (checked in `validate`).
            if let Ok(Some(tls)) = mirror_tls(matches) {
                lines.push(tls.argument());
            }
            lines
        }
        _ => vec![mode.to_owned()],
    }
}

/// The unspecified address of `addr`'s family, which the server takes as "no bind address"
/// (IPv4 when `addr` is not an address at all: the server refuses it anyway).
fn unspecified_like(addr: &str) -> &'static str {
    match crate::addr::parse_ip(addr) {
        Some(IpAddr::V6(_)) => "::",
        _ => "0.0.0.0",
    }
}

/// Sends the request and reads the answer, `(code, text)`, waiting at most `timeout` for it
/// (`None`: as long as the connection lives).
pub(super) fn exchange(
    sock: &str,
    lines: &[String],
    timeout: Option<Duration>,
) -> anyhow::Result<(i32, String)> {
    let mut stream = send(sock, lines, timeout)?;
    answer(&mut stream, sock)
}

/// Connects and sends the request; the answer is then read with [`answer`].
pub(super) fn send(
    sock: &str,
    lines: &[String],
    timeout: Option<Duration>,
) -> anyhow::Result<UnixStream> {
    let mut stream =
        UnixStream::connect(sock).with_context(|| format!("Couldn't connect to {sock}"))?;
    stream.set_read_timeout(timeout)?;
    stream.set_write_timeout(Some(ANSWER_TIMEOUT))?;
    let mut request = String::new();
    for line in lines {
        request.push_str(line);
        request.push('\n');
    }
    request.push('\n');
    stream
        .write_all(request.as_bytes())
        .with_context(|| format!("Couldn't send the request to {sock}"))?;
    Ok(stream)
}

/// Reads the answer to a request sent with [`send`].
pub(super) fn answer(stream: &mut UnixStream, sock: &str) -> anyhow::Result<(i32, String)> {
    let line = read_line(stream).with_context(|| format!("No answer from {sock}"))?;
    let (code, mut text) = parse_response(&line)?;
    if let Some(cause) = (code != 0).then(|| cause(stream, code)).flatten() {
        text.push('\n');
        text.push_str(&cause);
    }
    Ok((code, text))
}

/// The line that may follow a failure (ours: the cause of a failed `mirror`, which C
/// clients never read), if it has the failure's code; anything else is ignored.
fn cause(stream: &mut UnixStream, code: i32) -> Option<String> {
    let line = read_line(stream).ok()?;
    match parse_response(&line) {
        Ok((again, text)) if again == code && !text.is_empty() => Some(text),
        _ => None,
    }
}

fn read_line(stream: &mut UnixStream) -> anyhow::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < MAX_RESPONSE {
        match stream.read(&mut byte) {
            Ok(0) => bail!("the server closed the connection before answering"),
            Ok(_) if byte[0] == b'\n' => return Ok(String::from_utf8_lossy(&line).into_owned()),
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// `<N>: <text>`: N as `atoi` reads it, the text after the two characters `: `.
fn parse_response(line: &str) -> anyhow::Result<(i32, String)> {
    let colon = line
        .find(':')
        .ok_or_else(|| anyhow!("malformed answer '{line}'"))?;
    let code =
        crate::addr::atoi(&line[..colon]).clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32;
    let text = line.get(colon + 2..).unwrap_or_default().to_owned();
    Ok((code, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn speeds_take_binary_suffixes_and_refuse_garbage() {
        assert_eq!(parse_speed("10M"), Ok(10 << 20));
        assert_eq!(parse_speed("10m"), Ok(10 << 20));
        assert_eq!(parse_speed("512k"), Ok(512 << 10));
        assert_eq!(parse_speed("2G"), Ok(2 << 30));
        assert_eq!(parse_speed("1000000"), Ok(1_000_000));
        assert_eq!(parse_speed("0"), Ok(0), "0 removes the limit, as in C");
        for bad in [
            "",
            "abc",
            "-5",
            "+5",
            "10MB",
            "1.5M",
            "M",
            " 10",
            "99999999999999999999G",
        ] {
            let why = parse_speed(bad).expect_err(bad);
            assert!(why.contains("--max-speed"), "{why}");
        }
        assert_eq!(parse_mirror_port("4777"), Ok(4777));
        for bad in ["0", "65536", "-1", "x", ""] {
            assert!(parse_mirror_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn responses_are_split_like_flexnbd() {
        assert_eq!(parse_response("0: updated").unwrap(), (0, "updated".into()));
        assert_eq!(
            parse_response("10: unknown command").unwrap(),
            (10, "unknown command".into())
        );
        assert_eq!(parse_response("1:").unwrap(), (1, String::new()));
        assert!(parse_response("garbage").is_err());
    }

    fn mirror_lines(args: &[&str]) -> Vec<String> {
        let matches = crate::cli::spec::find("mirror")
            .unwrap()
            .command()
            .try_get_matches_from(args)
            .unwrap();
        request_lines("mirror", &matches)
    }

    #[test]
    fn mirror_sends_the_mode_only_when_asked() {
        let base = ["-s", "S", "-l", "10.0.0.2", "-p", "4777"];
        assert_eq!(
            mirror_lines(&base),
            ["mirror", "10.0.0.2", "4777", "exit"],
            "without --mode, what C flexnbd servers understand"
        );
        assert_eq!(
            mirror_lines(&[&base[..], &["--bind", "10.0.0.1", "-u"]].concat()),
            ["mirror", "10.0.0.2", "4777", "unlink", "10.0.0.1"]
        );
        assert_eq!(
            mirror_lines(&[&base[..], &["--mode", "active"]].concat()),
            ["mirror", "10.0.0.2", "4777", "exit", "0.0.0.0", "0", "active"]
        );
        assert_eq!(
            mirror_lines(&["-s", "S", "-l", "::1", "-p", "1", "--mode=background"]),
            ["mirror", "::1", "1", "exit", "::", "0", "background"]
        );
        assert_eq!(
            mirror_lines(&[&base[..], &["--mode", "auto", "-b", "10.0.0.1", "-u"]].concat()),
            ["mirror", "10.0.0.2", "4777", "unlink", "10.0.0.1", "0", "auto"]
        );
    }

    #[test]
    fn mirror_sends_tls_as_a_named_argument() {
        use crate::protocol::control::{ControlRequest, MirrorTls};
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca-cert.pem"), "x").unwrap();
        let d = dir.path().to_str().unwrap();
        let lines = mirror_lines(&["-s", "S", "-l", "::1", "-p", "1", "--tls-creds", d]);
        assert_eq!(
            lines,
            ["mirror", "::1", "1", "exit", &format!("tls-creds={d}")]
        );
        match ControlRequest::parse(&lines) {
            ControlRequest::Mirror(m) => assert_eq!(m.tls, Some(MirrorTls::X509(d.into()))),
            other => panic!("{other:?}"),
        }
        let lines = mirror_lines(&[
            "-s",
            "S",
            "-l",
            "::1",
            "-p",
            "1",
            "--mode",
            "active",
            "--tls-creds",
            d,
        ]);
        assert_eq!(lines[6], "active");
        assert_eq!(lines[7], format!("tls-creds={d}"));
        // Missing files are caught here already.
        let matches = crate::cli::spec::find("mirror")
            .unwrap()
            .command()
            .try_get_matches_from(["-s", "S", "--tls-psk", "/nonexistent/k.psk"])
            .unwrap();
        let e = mirror_tls(&matches).unwrap_err();
        assert!(e.starts_with("--tls-psk: /nonexistent/k.psk: "), "{e}");
    }

    #[test]
    fn the_lines_with_a_mode_are_a_valid_mirror_request() {
        use crate::protocol::control::{ControlRequest, CopyMode};
        let lines = mirror_lines(&["-s", "S", "-l", "::1", "-p", "1", "--mode", "active"]);
        match ControlRequest::parse(&lines) {
            ControlRequest::Mirror(m) => {
                assert_eq!(m.bind, None);
                assert_eq!(m.mode, CopyMode::Active);
            }
            other => panic!("{other:?}"),
        }
    }
}
