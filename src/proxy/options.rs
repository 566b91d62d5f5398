//! The `flexnbd-proxy` command line (flexnbd §12.1, §3.1), parsed GNU-style with clap as
//! the `flexnbd` modes are: `--opt=value` and `--opt value`, clustered short flags,
//! unambiguous long prefixes, `--`, and stray positional words ignored.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Arg, ArgAction, ArgMatches, Command};

use crate::addr::{atoi, parse_ip, parse_port};
use crate::logging;

/// The cache size of a bare `--cache`.
pub const DEFAULT_CACHE: usize = 4096; // also the literal in command()
/// The upstream timeout without `FLEXNBD_UPSTREAM_TIMEOUT`.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest UNIX socket path (`sun_path` holds 108 bytes with its terminating NUL).
const MAX_UNIX_PATH: usize = 107;

/// Where the proxy listens for its clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    /// A path: `--addr` started with `/`.
    Unix(PathBuf),
}

/// Everything the proxy needs, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    pub listen: Listen,
    pub upstream: SocketAddr,
    pub bind: Option<IpAddr>,
    /// Prefetch cache size in bytes; 0 disables it.
    pub cache: usize,
    /// Fixed new-style negotiation towards clients instead of old-style.
    pub newstyle: bool,
    /// The export to ask a new-style upstream for.
    pub upstream_export: String,
    /// TLS to upstream (STARTTLS; a new-style upstream only).
    pub upstream_tls: Option<UpstreamTls>,
    /// The log threshold (`-v`/`-q`, last one wins).
    pub threshold: u8,
}

/// The credentials `--tls-creds` or `--tls-psk` name; loaded and checked at startup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpstreamTls {
    /// An x509 directory: `ca-cert.pem`, optionally `client-cert.pem` and `client-key.pem`.
    X509(PathBuf),
    /// A psktool key file; its first username is used.
    Psk(PathBuf),
}

/// What parsing the command line decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    Run(Options),
    /// `-h`: print [`help`] on stdout, exit 0.
    Help,
    /// A diagnostic to print on stderr (followed by the help unless it is fatal-style),
    /// and exit 1.
    Invalid {
        message: String,
        with_help: bool,
    },
}

/// Why the options cannot be used; the texts are flexnbd's.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    #[error("--addr is required.")]
    NoAddr,
    #[error("both --conn-addr and --conn-port are required.")]
    NoUpstream,
    #[error("Downstream port not specified")]
    NoPort,
    #[error("Couldn't parse the listen address '{0}' (an IP address, or a path starting with /)")]
    BadAddr(String),
    #[error("Couldn't parse the upstream address '{0}' (an IP address is needed)")]
    BadConnAddr(String),
    #[error("Couldn't parse the bind address '{0}' (an IP address is needed)")]
    BadBind(String),
    #[error("The UNIX socket path '{0}' is longer than {MAX_UNIX_PATH} bytes")]
    LongPath(String),
    #[error("{0}")]
    Port(#[from] crate::addr::BadPort),
    #[error("give --tls-creds or --tls-psk, not both.")]
    TlsTwice,
}

struct Opt {
    long: &'static str,
    short: Option<char>,
    value: Option<&'static str>,
    help: &'static str,
}

const OPTS: &[Opt] = &[
    Opt {
        long: "addr",
        short: Some('l'),
        value: Some("ADDR"),
        help: "Listen on ADDR (an IP address, or a UNIX socket path starting with /).",
    },
    Opt {
        long: "port",
        short: Some('p'),
        value: Some("PORT"),
        help: "Listen on PORT (TCP only).",
    },
    Opt {
        long: "conn-addr",
        short: Some('C'),
        value: Some("ADDR"),
        help: "The IP address of the upstream NBD server.",
    },
    Opt {
        long: "conn-port",
        short: Some('P'),
        value: Some("PORT"),
        help: "The port of the upstream NBD server.",
    },
    Opt {
        long: "bind",
        short: Some('b'),
        value: Some("ADDR"),
        help: "Connect to upstream from this local address.",
    },
    Opt {
        long: "cache",
        short: None,
        value: None,
        help: "--cache[=BYTES]: prefetch cache of BYTES (default 4096): a READ of up to \
               BYTES fetches twice as much and answers the next sequential READ locally.",
    },
    Opt {
        long: "newstyle",
        short: None,
        value: None,
        help: "Speak fixed new-style NBD to clients (flags from upstream) instead of old-style.",
    },
    Opt {
        long: "conn-export",
        short: None,
        value: Some("NAME"),
        help: "The export to ask a new-style upstream for (default: the empty name).",
    },
    Opt {
        long: "tls-creds",
        short: None,
        value: Some("DIR"),
        help: "Speak TLS to upstream (STARTTLS; a new-style upstream only) with the x509 \
               credentials in DIR: ca-cert.pem, the CA upstream's certificate must be \
               signed by (it must also name --conn-addr), and optionally client-cert.pem and \
               client-key.pem, presented to an upstream that asks. Every reconnection \
               repeats the TLS handshake.",
    },
    Opt {
        long: "tls-psk",
        short: None,
        value: Some("FILE"),
        help: "Speak TLS to upstream with the pre-shared key of FILE's first line \
               (username:hexkey, as psktool writes it).",
    },
    Opt {
        long: "help",
        short: Some('h'),
        value: None,
        help: "Print this text and exit.",
    },
    Opt {
        long: "verbose",
        short: Some('v'),
        value: None,
        help: "Log informational messages (and debug ones in debug builds).",
    },
    Opt {
        long: "quiet",
        short: Some('q'),
        value: None,
        help: "Log only fatal errors.",
    },
];

const USAGE: &str = "flexnbd-proxy --addr ADDR [--port PORT] --conn-addr ADDR --conn-port PORT \
     [--bind ADDR] [--cache[=BYTES]] [--newstyle] [--tls-creds DIR | --tls-psk FILE]";
const SUMMARY: &str = "Proxy NBD clients on ADDR:PORT to the server on --conn-addr:--conn-port, \
     reconnecting and resending requests when the server goes away.";
const UPSTREAM_TIMEOUT_TEXT: &str = "FLEXNBD_UPSTREAM_TIMEOUT=SECONDS (default 30): reconnect \
     when upstream moves no byte for this long while requests are outstanding.";

/// The help text: usage, description, one tab-indented line per option.
pub fn help() -> String {
    let mut out = format!("Usage: {USAGE}\n\n{SUMMARY}\n\n");
    for o in OPTS {
        let short = o.short.map(|s| format!(",-{s}")).unwrap_or_default();
        let arg = o.value.map(|v| format!(" <{v}>")).unwrap_or_default();
        out.push_str(&format!("\t--{}{short}{arg}\t{}\n", o.long, o.help));
    }
    out.push_str(&format!("\nEnvironment: {UPSTREAM_TIMEOUT_TEXT}\n"));
    out
}

/// The manual page `flexnbd-proxy(1)`, from the same table as [`help`] (`flexnbd help
/// --man flexnbd-proxy` prints it; `man/flexnbd-proxy.1` is checked against it).
pub fn man_page() -> String {
    use crate::cli::man::{command_page, CommandPage, ManOpt};
    let options: Vec<ManOpt> = OPTS
        .iter()
        .map(|o| ManOpt {
            long: o.long,
            short: o.short,
            value: o.value.or((o.long == "cache").then_some("BYTES")),
            optional_value: o.long == "cache",
            help: o.help.strip_prefix("--cache[=BYTES]: ").unwrap_or(o.help),
        })
        .collect();
    command_page(&CommandPage {
        name: "flexnbd-proxy",
        summary: "keep NBD clients connected across server restarts and migrations",
        synopsis: &[USAGE],
        description: &[
            SUMMARY,
            "It runs next to the client (a VM's host), connects to the upstream server first \
             (exit 1 if it cannot), then accepts clients: old-style NBD by default, fixed \
             new-style with --newstyle. Each client gets its own upstream connection; many \
             requests are in flight at once (64 and 64 MiB per client), and replies are \
             relayed as they arrive. A WRITE is acknowledged only once upstream \
             acknowledged it.",
            "When upstream fails (the connection ends, an error, a bad reply, or no byte \
             moving for the upstream timeout while requests are outstanding) the proxy \
             reconnects every 3 seconds and sends every unanswered request again, in the \
             client's order; the client sees a pause, never an error. After a migration's \
             hand-off the destination serves on the source's address (flexnbd listen \
             --rebind-addr/--rebind-port) and the proxy reconnects there.",
        ],
        options: &options,
        sections: &[
            (
                "ENVIRONMENT",
                &[("FLEXNBD_UPSTREAM_TIMEOUT", UPSTREAM_TIMEOUT_TEXT)],
            ),
            (
                "SIGNALS",
                &[(
                    "SIGINT, SIGTERM, SIGQUIT",
                    "Close the listening socket (removing a UNIX socket's path), the clients' \
                     and the upstream connections, and exit 0.",
                )],
            ),
            (
                "EXIT STATUS",
                &[
                    ("0", "Stopped by a signal."),
                    (
                        "1",
                        "Invalid arguments, upstream unreachable at startup (the proxy then \
                         never listens), or the listening socket could not be created.",
                    ),
                ],
            ),
            (
                "SEE ALSO",
                &[(
                    "",
                    "flexnbd(1); docs/proxy.md in the source or the installed documentation.",
                )],
            ),
        ],
    })
}

fn command() -> Command {
    let mut cmd = Command::new("flexnbd-proxy")
        .no_binary_name(true)
        .disable_help_flag(true)
        .disable_version_flag(true)
        .infer_long_args(true)
        .allow_negative_numbers(false);
    for o in OPTS {
        let mut arg = Arg::new(o.long).long(o.long);
        if let Some(s) = o.short {
            arg = arg.short(s);
        }
        arg = match (o.long, o.value) {
            ("cache", _) => arg
                .num_args(0..=1)
                .require_equals(true)
                .default_missing_value("4096")
                .action(ArgAction::Set),
            ("help" | "newstyle", _) => arg.action(ArgAction::SetTrue),
            ("verbose" | "quiet", _) => arg.action(ArgAction::Count),
            (_, Some(v)) => arg.value_name(v).action(ArgAction::Set),
            (_, None) => arg.action(ArgAction::SetTrue),
        };
        cmd = cmd.arg(arg);
    }
    // `--cache 8192` leaves a stray word, which flexnbd ignores.
    cmd.arg(
        Arg::new("stray")
            .num_args(0..)
            .action(ArgAction::Append)
            .hide(true),
    )
}

/// Parses the arguments after the program name.
pub fn parse(args: &[String]) -> Parsed {
    let matches = match command().try_get_matches_from(args) {
        Ok(m) => m,
        Err(e) => {
            return Parsed::Invalid {
                message: crate::cli::diagnostic("flexnbd-proxy", &e),
                with_help: true,
            }
        }
    };
    if matches.get_flag("help") {
        return Parsed::Help;
    }
    match options(&matches) {
        Ok(o) => Parsed::Run(o),
        Err(e) => Parsed::Invalid {
            with_help: matches!(e, OptionsError::NoAddr | OptionsError::NoUpstream),
            message: e.to_string(),
        },
    }
}

fn value<'a>(matches: &'a ArgMatches, id: &str) -> Option<&'a str> {
    matches.get_one::<String>(id).map(String::as_str)
}

fn options(m: &ArgMatches) -> Result<Options, OptionsError> {
    let addr = value(m, "addr").ok_or(OptionsError::NoAddr)?;
    let (Some(conn_addr), Some(conn_port)) = (value(m, "conn-addr"), value(m, "conn-port")) else {
        return Err(OptionsError::NoUpstream);
    };
    let listen = if addr.starts_with('/') {
        if addr.len() > MAX_UNIX_PATH {
            return Err(OptionsError::LongPath(addr.into()));
        }
        Listen::Unix(addr.into())
    } else {
        let ip = parse_ip(addr).ok_or_else(|| OptionsError::BadAddr(addr.into()))?;
        let port = value(m, "port").ok_or(OptionsError::NoPort)?;
        Listen::Tcp(SocketAddr::new(ip, parse_port(port)?))
    };
    let conn_ip = parse_ip(conn_addr).ok_or_else(|| OptionsError::BadConnAddr(conn_addr.into()))?;
    let bind = match value(m, "bind") {
        Some(b) => Some(parse_ip(b).ok_or_else(|| OptionsError::BadBind(b.into()))?),
        None => None,
    };
    let upstream_tls = match (value(m, "tls-creds"), value(m, "tls-psk")) {
        (Some(_), Some(_)) => return Err(OptionsError::TlsTwice),
        (Some(dir), None) => Some(UpstreamTls::X509(dir.into())),
        (None, Some(file)) => Some(UpstreamTls::Psk(file.into())),
        (None, None) => None,
    };
    Ok(Options {
        listen,
        upstream: SocketAddr::new(conn_ip, parse_port(conn_port)?),
        bind,
        cache: cache_size(value(m, "cache")),
        newstyle: m.get_flag("newstyle"),
        upstream_export: value(m, "conn-export").unwrap_or("").to_owned(),
        upstream_tls,
        threshold: threshold(m),
    })
}

/// `--cache=N` with atoi semantics; negative disables the cache, as does its absence.
fn cache_size(text: Option<&str>) -> usize {
    text.map_or(0, |t| usize::try_from(atoi(t)).unwrap_or(0))
}

/// The last of `-v`/`-q` wins (flexnbd §2.3).
fn threshold(m: &ArgMatches) -> u8 {
    let last = |id: &str| {
        m.indices_of(id)
            .and_then(|i| i.max())
            .filter(|_| m.get_count(id) > 0)
    };
    match (last("verbose"), last("quiet")) {
        (Some(v), Some(q)) if v > q => logging::verbose_threshold(),
        (Some(_), None) => logging::verbose_threshold(),
        (_, Some(_)) => logging::FATAL,
        (None, None) => logging::WARN,
    }
}

/// `FLEXNBD_UPSTREAM_TIMEOUT`: whole seconds, used only when greater than 0.
pub fn upstream_timeout(env: Option<&str>) -> Duration {
    match env.map(atoi) {
        Some(secs) if secs > 0 => Duration::from_secs(secs as u64),
        _ => DEFAULT_UPSTREAM_TIMEOUT,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Parsed {
        parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    fn options(args: &[&str]) -> Options {
        match run(args) {
            Parsed::Run(o) => o,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    const UP: [&str; 4] = ["--conn-addr", "127.0.0.1", "--conn-port", "4777"];

    fn with_up<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        let mut v = extra.to_vec();
        v.extend(UP);
        v
    }

    #[test]
    fn upstream_tls() {
        let o = options(&with_up(&["-l", "0", "-p", "5000"]));
        assert_eq!(o.upstream_tls, None);
        let o = options(&with_up(&["-l", "0", "-p", "5000", "--tls-creds", "/pki"]));
        assert_eq!(o.upstream_tls, Some(UpstreamTls::X509("/pki".into())));
        let o = options(&with_up(&["-l", "0", "-p", "5000", "--tls-psk=/k.psk"]));
        assert_eq!(o.upstream_tls, Some(UpstreamTls::Psk("/k.psk".into())));
        match run(&with_up(&[
            "-l",
            "0",
            "-p",
            "1",
            "--tls-psk",
            "/k",
            "--tls-creds",
            "/d",
        ])) {
            Parsed::Invalid { message, .. } => {
                assert_eq!(message, "give --tls-creds or --tls-psk, not both.")
            }
            other => panic!("{other:?}"),
        }
        assert!(help().contains("\t--tls-creds <DIR>\t"));
    }

    #[test]
    fn tcp_and_unix_listen_addresses() {
        let o = options(&with_up(&["-l", "0", "-p", "5000"]));
        assert_eq!(o.listen, Listen::Tcp("0.0.0.0:5000".parse().unwrap()));
        assert_eq!(o.upstream, "127.0.0.1:4777".parse().unwrap());
        assert_eq!((o.cache, o.newstyle, o.bind), (0, false, None));
        let o = options(&with_up(&["--addr=/tmp/p.sock"]));
        assert_eq!(o.listen, Listen::Unix("/tmp/p.sock".into()));
    }

    #[test]
    fn missing_options_give_flexnbds_messages() {
        let invalid = |args: &[&str]| match run(args) {
            Parsed::Invalid { message, .. } => message,
            other => panic!("{other:?}"),
        };
        assert_eq!(invalid(&UP), "--addr is required.");
        assert_eq!(
            invalid(&["--addr", "/x", "--conn-addr", "1.2.3.4"]),
            "both --conn-addr and --conn-port are required."
        );
        assert_eq!(
            invalid(&with_up(&["--addr", "127.0.0.1"])),
            "Downstream port not specified"
        );
        assert_eq!(
            invalid(&with_up(&["-c", "1"])),
            "flexnbd-proxy: invalid option -- 'c'"
        );
        assert_eq!(
            invalid(&with_up(&["--bogus"])),
            "flexnbd-proxy: unrecognized option '--bogus'"
        );
        let long = format!("/{}", "x".repeat(120));
        assert!(invalid(&with_up(&["--addr", long.as_str()])).contains("longer than"));
    }

    #[test]
    fn cache_forms() {
        let cache = |extra: &[&str]| options(&with_up(&[&["-l", "/s"][..], extra].concat())).cache;
        assert_eq!(cache(&[]), 0);
        assert_eq!(cache(&["--cache"]), 4096);
        assert_eq!(cache(&["--cache=8192"]), 8192);
        assert_eq!(cache(&["--cache=0"]), 0);
        assert_eq!(cache(&["--cache=-5"]), 0);
        // The space form is the default size and a stray word.
        assert_eq!(cache(&["--cache", "8192"]), 4096);
    }

    #[test]
    fn help_verbosity_and_prefixes() {
        assert_eq!(run(&["-h"]), Parsed::Help);
        assert!(run(&["--help", "--bogus-after"]).is_help_or_invalid());
        let o = options(&with_up(&["-l", "/s", "-v", "-q"]));
        assert_eq!(o.threshold, logging::FATAL);
        let o = options(&with_up(&["-l", "/s", "-q", "-v", "--newst"]));
        assert_eq!(o.threshold, logging::verbose_threshold());
        assert!(o.newstyle);
        assert!(help().contains("\t--conn-addr,-C <ADDR>\t"));
    }

    #[test]
    fn upstream_timeout_from_the_environment() {
        assert_eq!(upstream_timeout(None), Duration::from_secs(30));
        assert_eq!(upstream_timeout(Some("2")), Duration::from_secs(2));
        assert_eq!(upstream_timeout(Some("0")), Duration::from_secs(30));
        assert_eq!(upstream_timeout(Some("-3")), Duration::from_secs(30));
        assert_eq!(upstream_timeout(Some("junk")), Duration::from_secs(30));
    }

    impl Parsed {
        fn is_help_or_invalid(&self) -> bool {
            matches!(self, Parsed::Help | Parsed::Invalid { .. })
        }
    }
}
