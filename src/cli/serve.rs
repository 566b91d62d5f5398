//! `flexnbd serve` and `flexnbd listen` (flexnbd §3.2, §5): the command line turned into
//! validated [`server::Options`]; the server itself is [`crate::server`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::ArgMatches;

use crate::acl::Acl;
use crate::actors::session::{SessionConfig, SessionTls};
use crate::addr::{parse_ip, parse_port};
use crate::protocol::newstyle::TlsPolicy;
use crate::server::{self, Mode, DEFAULT_MAX_CLIENTS};
use crate::tls::{ServerTls, TlsMode};
use crate::{fatal, logging};

use super::{flag, value};

/// The largest `--busy-poll`: polling longer than a millisecond per request would only
/// burn CPU (a wake-up costs tens of microseconds).
const MAX_BUSY_POLL_MICROS: u64 = 1000;

/// Default grace for requests in flight at shutdown.
const DEFAULT_GRACE_SECS: u64 = 10;

/// `flexnbd serve`.
pub fn serve(matches: &ArgMatches) -> i32 {
    run_mode("serve", matches)
}

/// `flexnbd listen`.
pub fn listen(matches: &ArgMatches) -> i32 {
    run_mode("listen", matches)
}

fn run_mode(mode: &str, matches: &ArgMatches) -> i32 {
    let (addr, port, file) = (
        value(matches, "addr"),
        value(matches, "port"),
        value(matches, "file"),
    );
    let mut missing = false;
    if addr.is_none() || port.is_none() {
        eprintln!("both --addr and --port are required.");
        missing = true;
    }
    if file.is_none() {
        eprintln!("--file is required");
        missing = true;
    }
    if missing {
        eprint!(
            "{}",
            super::spec::find(mode).expect("the mode exists").help()
        );
        return 1;
    }
    logging::set_context(file.unwrap_or_default());
    match options(mode, matches) {
        Ok(opts) => server::run(opts),
        Err(e) => {
            fatal!("{e:#}");
            1
        }
    }
}

fn options(mode: &str, matches: &ArgMatches) -> anyhow::Result<server::Options> {
    let addr_text = value(matches, "addr").unwrap_or_default();
    let Some(addr) = parse_ip(addr_text) else {
        bail!("Couldn't parse server address '{addr_text}' (use 0 if you want to bind to all)");
    };
    let entries: Vec<&String> = matches
        .get_many::<String>("positional")
        .into_iter()
        .flatten()
        .collect();
    let acl = Acl::parse(&entries, flag(matches, "default-deny"))?;
    let port = parse_port(value(matches, "port").unwrap_or_default())?;
    let mode = match mode {
        "listen" => Mode::Listen {
            rebind: rebind_target(matches)?,
        },
        _ => Mode::Serve,
    };
    let max_clients = match value(matches, "max-clients") {
        // One inbound migration at a time (flexnbd §5.6).
        None if matches!(mode, Mode::Listen { .. }) => 1,
        None => DEFAULT_MAX_CLIENTS,
        Some(text) => match text.parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => bail!("--max-clients must be a positive whole number, not '{text}'"),
        },
    };
    let grace = match value(matches, "grace") {
        None => Duration::from_secs(DEFAULT_GRACE_SECS),
        Some(text) => match text.parse::<f64>() {
            Ok(s) if s.is_finite() && s >= 0.0 => Duration::from_secs_f64(s),
            _ => bail!("--grace must be a number of seconds, not '{text}'"),
        },
    };
    let busy_poll = match value(matches, "busy-poll") {
        None => SessionConfig::DEFAULT_BUSY_POLL,
        Some(text) => match text.parse::<u64>() {
            Ok(us) if us <= MAX_BUSY_POLL_MICROS => Duration::from_micros(us),
            _ => bail!(
                "--busy-poll must be a whole number of microseconds from 0 to {MAX_BUSY_POLL_MICROS}, not '{text}'"
            ),
        },
    };
    let newstyle = flag(matches, "newstyle");
    for option in ["export-name", "description"] {
        if !newstyle && value(matches, option).is_some() {
            bail!("--{option} needs --newstyle: old-style NBD has no export names or descriptions");
        }
    }
    let tls = tls_options(matches, newstyle)?;
    Ok(server::Options {
        mode,
        addr,
        port,
        file: PathBuf::from(value(matches, "file").unwrap_or_default()),
        sock: value(matches, "sock").map(PathBuf::from),
        acl,
        // Only `serve` has the option (clap panics, in debug builds, on ids a mode lacks).
        killswitch: mode == Mode::Serve && flag(matches, "killswitch"),
        max_clients,
        sync_writes: flag(matches, "sync-writes"),
        grace,
        busy_poll,
        read_only: flag(matches, "read-only"),
        lock: !flag(matches, "no-lock"),
        newstyle: newstyle.then(|| {
            (
                value(matches, "export-name").unwrap_or_default().to_owned(),
                value(matches, "description").map(str::to_owned),
            )
        }),
        tls,
    })
}

/// `--tls`, `--tls-creds`, `--tls-verify-peer` and `--tls-psk`, checked together, with the
/// credentials loaded: a file that is missing or wrong stops the server at startup, with
/// an error that names it, rather than failing every client's handshake.
fn tls_options(matches: &ArgMatches, newstyle: bool) -> anyhow::Result<Option<SessionTls>> {
    let mode = match value(matches, "tls") {
        None => TlsMode::Off,
        Some(text) => TlsMode::parse(text)?,
    };
    let creds = value(matches, "tls-creds");
    let psk = value(matches, "tls-psk");
    let verify_peer = flag(matches, "tls-verify-peer");
    let policy = match mode {
        TlsMode::Off => {
            if creds.is_some() || psk.is_some() || verify_peer {
                bail!(
                    "--tls-creds, --tls-psk and --tls-verify-peer need --tls on or --tls require"
                );
            }
            return Ok(None);
        }
        TlsMode::On => TlsPolicy::Optional,
        TlsMode::Require => TlsPolicy::Required,
    };
    if !newstyle {
        bail!(
            "--tls {mode} needs --newstyle: old-style NBD cannot negotiate, so it cannot \
             start TLS"
        );
    }
    let creds = match (creds, psk) {
        (Some(dir), None) => ServerTls::x509(Path::new(dir), verify_peer),
        (None, Some(file)) => {
            if verify_peer {
                bail!("--tls-verify-peer needs --tls-creds: PSK clients have no certificate");
            }
            ServerTls::psk(Path::new(file))
        }
        (None, None) => bail!("--tls {mode} needs --tls-creds DIR or --tls-psk FILE"),
        (Some(_), Some(_)) => bail!("give --tls-creds or --tls-psk, not both"),
    }
    .context("loading the TLS credentials")?;
    Ok(Some(SessionTls {
        policy,
        creds: Arc::new(creds),
    }))
}

/// `--rebind-addr` and `--rebind-port`, both or neither.
fn rebind_target(matches: &ArgMatches) -> anyhow::Result<Option<SocketAddr>> {
    match (value(matches, "rebind-addr"), value(matches, "rebind-port")) {
        (None, None) => Ok(None),
        (Some(addr), Some(port)) => {
            let ip = parse_ip(addr)
                .ok_or_else(|| anyhow::anyhow!("Couldn't parse rebind address '{addr}'"))?;
            Ok(Some(SocketAddr::new(ip, parse_port(port)?)))
        }
        _ => bail!("--rebind-addr and --rebind-port go together"),
    }
}
