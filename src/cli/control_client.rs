//! The control-socket client modes: `acl`, `status`, `mirror`, `mirror-speed`, `break`
//! (flexnbd §3.6-3.11).
//!
//! Each sends one request (`command\n`, one line per argument, a blank line) and prints the
//! text of the single response line: on stdout when its code is 0, on stderr otherwise. The
//! exit status is the response's code. Failures on our side (no socket, connection refused,
//! a malformed or missing answer) exit with [`LOCAL_FAILURE`], distinct from the server's
//! codes 0, 1, 9 and 10.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use clap::ArgMatches;

use crate::fatal;
use crate::protocol::control::{Status, FORCE_SOURCE};

use super::{flag, value};

/// Exit status when we could not get an answer from the server at all.
pub const LOCAL_FAILURE: i32 = 2;
/// The longest response line we read (flexnbd's response buffer).
const MAX_RESPONSE: usize = 1024;
/// `mirror` answers only after the first connection attempt, which may take about 20 s;
/// nothing else should take long, but no answer at all must not hang the caller.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(90);

pub fn run(mode: &str, matches: &ArgMatches) -> i32 {
    if let Err(code) = validate(mode, matches) {
        return code;
    }
    let sock = value(matches, "sock").unwrap_or_default();
    let lines = request_lines(mode, matches);
    match exchange(sock, &lines) {
        Ok((code, text)) => {
            let json = mode == "status" && flag(matches, "json");
            if code <= 0 {
                let text = if json && code == 0 {
                    Status::json_from_line(&text)
                } else {
                    text
                };
                println!("{text}");
            } else {
                eprintln!("{text}");
            }
            code
        }
        Err(e) => {
            fatal!("{e:#}");
            LOCAL_FAILURE
        }
    }
}

fn validate(mode: &str, matches: &ArgMatches) -> Result<(), i32> {
    let mut messages = Vec::new();
    if value(matches, "sock").is_none() {
        messages.push("--sock is required.");
    }
    match mode {
        "mirror" if value(matches, "addr").is_none() || value(matches, "port").is_none() => {
            messages.push("both --addr and --port are required.")
        }
        "mirror-speed" if value(matches, "max-speed").is_none() => {
            messages.push("--max-speed is required.")
        }
        _ => {}
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
        "mirror-speed" => vec!["mirror_max_bps".into(), get("max-speed")],
        "mirror" => {
            let action = if flag(matches, "unlink") {
                "unlink"
            } else {
                "exit"
            };
            let mut lines = vec!["mirror".into(), get("addr"), get("port"), action.into()];
            if let Some(bind) = value(matches, "bind") {
                lines.push(bind.to_owned());
            }
            lines
        }
        _ => vec![mode.to_owned()],
    }
}

/// Sends the request and reads the answer: `(code, text)`.
fn exchange(sock: &str, lines: &[String]) -> anyhow::Result<(i32, String)> {
    let mut stream =
        UnixStream::connect(sock).with_context(|| format!("Couldn't connect to {sock}"))?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
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
    let line = read_line(&mut stream).with_context(|| format!("No answer from {sock}"))?;
    parse_response(&line)
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
    fn responses_are_split_like_flexnbd() {
        assert_eq!(parse_response("0: updated").unwrap(), (0, "updated".into()));
        assert_eq!(
            parse_response("10: unknown command").unwrap(),
            (10, "unknown command".into())
        );
        assert_eq!(parse_response("1:").unwrap(), (1, String::new()));
        assert!(parse_response("garbage").is_err());
    }
}
