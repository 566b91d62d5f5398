//! `flexnbd read` and `flexnbd write`: one request to an NBD server (flexnbd §3.4, §3.5),
//! with the C bugs fixed: every failure exits non-zero, IPv6 works without `--bind`, and a
//! short standard input is an error instead of a hang.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpStream};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use clap::ArgMatches;

use crate::addr::{parse_ip, parse_port};
use crate::fatal;
use crate::protocol::handshake::OldstyleHello;
use crate::protocol::reply::decode_simple_reply;
use crate::protocol::request::HeaderStyle;
use crate::protocol::{Command, Request, OLDSTYLE_HELLO_LEN, SIMPLE_REPLY_LEN};

use super::value;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// C flexnbd waits for the hello without a deadline; we give it the connect timeout.
const HELLO_TIMEOUT: Duration = Duration::from_secs(15);
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Once the reply has started, data may flow slowly but must keep flowing.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(60);
const COPY_CHUNK: usize = 1 << 20;

struct Target {
    addr: IpAddr,
    port: u16,
    bind: Option<IpAddr>,
    from: u64,
}

/// Validates the options shared by both modes; prints flexnbd's messages on failure.
fn validate(mode: &str, matches: &ArgMatches) -> Result<(), i32> {
    let mut missing = false;
    if value(matches, "addr").is_none() || value(matches, "port").is_none() {
        eprintln!("both --addr and --port are required.");
        missing = true;
    }
    if value(matches, "from").is_none() || value(matches, "size").is_none() {
        eprintln!("both --from and --size are required.");
        missing = true;
    }
    if missing {
        eprint!("{}", super::spec::find(mode).expect("mode exists").help());
        return Err(1);
    }
    Ok(())
}

fn target(matches: &ArgMatches) -> anyhow::Result<Target> {
    let addr_text = value(matches, "addr").unwrap_or_default();
    let addr =
        parse_ip(addr_text).ok_or_else(|| anyhow!("Couldn't parse address '{addr_text}'"))?;
    let port = parse_port(value(matches, "port").unwrap_or_default())?;
    let bind = match value(matches, "bind") {
        None => None,
        Some(text) => {
            Some(parse_ip(text).ok_or_else(|| anyhow!("Couldn't parse bind address '{text}'"))?)
        }
    };
    let from_text = value(matches, "from").unwrap_or_default();
    let from = parse_count("--from", from_text)?;
    Ok(Target {
        addr,
        port,
        bind,
        from,
    })
}

/// A decimal byte count. C used `atol` and silently turned garbage into 0; we refuse it.
fn parse_count(option: &str, text: &str) -> anyhow::Result<u64> {
    let trimmed = text.trim();
    if trimmed.starts_with('-') {
        bail!("{option} must not be negative ('{text}')");
    }
    trimmed
        .parse::<u64>()
        .map_err(|_| anyhow!("{option} must be a decimal number of bytes, not '{text}'"))
}

fn size_arg(text: &str) -> anyhow::Result<u32> {
    let size = parse_count("--size", text)?;
    u32::try_from(size).map_err(|_| anyhow!("--size must be less than 4 GiB (it is {size})"))
}

/// Connects, reads and checks the hello, and checks the range.
fn open(target: &Target, len: u32, what: &str) -> anyhow::Result<(TcpStream, u64)> {
    let stream = crate::net::connect(target.addr, target.port, target.bind, CONNECT_TIMEOUT)
        .with_context(|| {
            format!(
                "Couldn't connect to {}",
                std::net::SocketAddr::new(target.addr, target.port)
            )
        })?;
    stream.set_read_timeout(Some(HELLO_TIMEOUT))?;
    let mut hello = [0u8; OLDSTYLE_HELLO_LEN];
    (&stream)
        .read_exact(&mut hello)
        .context("Couldn't read the server's hello")?;
    let hello = OldstyleHello::decode(&hello)
        .context("The server's hello is not an old-style NBD hello")?;
    let end = target.from.checked_add(u64::from(len));
    if end.is_none_or(|end| end > hello.size) {
        bail!(
            "{what} request {}+{len} is out of range given size {}",
            target.from,
            hello.size
        );
    }
    Ok((stream, hello.size))
}

fn request(command: Command, from: u64, len: u32) -> (Vec<u8>, u64) {
    let cookie = random_cookie();
    let req = Request {
        flags: 0,
        command,
        cookie,
        offset: from,
        length: u64::from(len),
    };
    let mut bytes = Vec::with_capacity(28);
    req.encode(HeaderStyle::Compact, &mut bytes)
        .expect("a u32 length fits");
    (bytes, cookie)
}

fn random_cookie() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    hasher.finish()
}

/// Waits for the reply and checks magic, error and cookie.
fn await_reply(stream: &TcpStream, cookie: u64) -> anyhow::Result<()> {
    stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
    let mut bytes = [0u8; SIMPLE_REPLY_LEN];
    let mut s = stream;
    s.read_exact(&mut bytes).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            anyhow!("No reply from the server within {REPLY_TIMEOUT:?}")
        }
        _ => anyhow!("Couldn't read the reply: {e}"),
    })?;
    let reply =
        decode_simple_reply(&bytes).ok_or_else(|| anyhow!("The reply has a bad magic number"))?;
    if reply.cookie != cookie {
        bail!(
            "The reply's handle {:#x} does not match the request's {cookie:#x}",
            reply.cookie
        );
    }
    if reply.error != 0 {
        bail!(
            "The server answered with error {}",
            crate::protocol::Errno(reply.error)
        );
    }
    stream.set_read_timeout(Some(TRANSFER_TIMEOUT))?;
    Ok(())
}

pub fn read(matches: &ArgMatches) -> i32 {
    if let Err(code) = validate("read", matches) {
        return code;
    }
    let result = (|| {
        let target = target(matches)?;
        let len = size_arg(value(matches, "size").unwrap_or_default())?;
        let (stream, _) = open(&target, len, "read")?;
        let (header, cookie) = request(Command::Read, target.from, len);
        (&stream)
            .write_all(&header)
            .context("Couldn't send the request")?;
        await_reply(&stream, cookie)?;
        let copied = io::copy(
            &mut (&stream).take(u64::from(len)),
            &mut io::stdout().lock(),
        )
        .context("Couldn't copy the data to standard output")?;
        if copied != u64::from(len) {
            bail!("The server sent {copied} of {len} bytes");
        }
        io::stdout()
            .flush()
            .context("Couldn't flush standard output")
    })();
    finish(result)
}

pub fn write(matches: &ArgMatches) -> i32 {
    if let Err(code) = validate("write", matches) {
        return code;
    }
    let result = (|| {
        let target = target(matches)?;
        let size_text = value(matches, "size").unwrap_or_default();
        // flexnbd's rule: a value whose first character sorts below ':' is a number of
        // bytes to read from stdin; anything else names a file to send whole.
        let (len, mut source): (u32, Box<dyn Read>) = match size_text.bytes().next() {
            Some(b) if b >= b':' => {
                let file =
                    File::open(size_text).with_context(|| format!("Couldn't open {size_text}"))?;
                let len = file.metadata()?.len();
                let len =
                    u32::try_from(len).map_err(|_| anyhow!("{size_text} is larger than 4 GiB"))?;
                (len, Box::new(file))
            }
            _ => (size_arg(size_text)?, Box::new(io::stdin())),
        };
        let (stream, _) = open(&target, len, "write")?;
        let (header, cookie) = request(Command::Write, target.from, len);
        (&stream)
            .write_all(&header)
            .context("Couldn't send the request")?;
        send_payload(&mut source, &stream, u64::from(len))?;
        await_reply(&stream, cookie)
    })();
    finish(result)
}

/// Copies exactly `len` bytes from `source` to the server; a short source is an error.
fn send_payload(source: &mut dyn Read, mut stream: &TcpStream, len: u64) -> anyhow::Result<()> {
    let mut buf = vec![0u8; COPY_CHUNK.min(len as usize).max(1)];
    let mut left = len;
    while left > 0 {
        let want = buf.len().min(left as usize);
        let n = match source.read(&mut buf[..want]) {
            Ok(0) => bail!("The input ended after {} of {len} bytes", len - left),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("Couldn't read the input"),
        };
        stream
            .write_all(&buf[..n])
            .context("Couldn't send the data")?;
        left -= n as u64;
    }
    Ok(())
}

fn finish(result: anyhow::Result<()>) -> i32 {
    match result {
        Ok(()) => 0,
        Err(e) => {
            fatal!("{e:#}");
            1
        }
    }
}
