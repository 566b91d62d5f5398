//! The table of modes and options, from which both the clap parsers and the help texts are
//! made, so that the two never disagree.

use clap::{Arg, ArgAction, Command};

/// How an option takes its value.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `--opt VALUE` or `--opt=VALUE`.
    Value(&'static str),
    /// A plain flag.
    Flag,
    /// A plain flag that tolerates (and ignores) `--opt=VALUE`, as C's `--killswitch` and
    /// `--unlink` took one (flexnbd §3.2). A following separate word is never consumed.
    FlagIgnoringValue,
}

pub struct Opt {
    pub long: &'static str,
    pub short: Option<char>,
    pub kind: Kind,
    pub help: &'static str,
}

pub struct Mode {
    pub name: &'static str,
    pub usage: &'static str,
    pub description: &'static str,
    /// Option groups (shared ones, then the mode's own).
    pub opts: &'static [&'static [Opt]],
    /// Name of the positional arguments, if the mode takes any.
    pub positional: Option<&'static str>,
    /// `flexnbd help MODE` knows this mode (flexnbd §3.12).
    pub in_help_mode: bool,
}

const fn opt(long: &'static str, short: char, kind: Kind, help: &'static str) -> Opt {
    Opt {
        long,
        short: Some(short),
        kind,
        help,
    }
}

const fn long_only(long: &'static str, kind: Kind, help: &'static str) -> Opt {
    Opt {
        long,
        short: None,
        kind,
        help,
    }
}

use Kind::{Flag, FlagIgnoringValue, Value};

const COMMON: &[Opt] = &[
    opt("help", 'h', Flag, "Print this text and exit."),
    opt(
        "verbose",
        'v',
        Flag,
        "Log informational messages (and debug ones in debug builds).",
    ),
    opt("quiet", 'q', Flag, "Log only fatal errors."),
];

/// Options of both `serve` and `listen`.
const SERVER_OPTS: &[Opt] = &[
    opt(
        "addr",
        'l',
        Value("ADDR"),
        "The address to serve on (0 for every IPv4 address).",
    ),
    opt("port", 'p', Value("PORT"), "The port to serve on."),
    opt("file", 'f', Value("FILE"), "The file to serve."),
    opt(
        "sock",
        's',
        Value("SOCK"),
        "Path of the control socket to open.",
    ),
    opt(
        "default-deny",
        'd',
        Flag,
        "Refuse every client while the access control list is empty.",
    ),
    long_only(
        "max-clients",
        Value("N"),
        "Serve at most N clients at once (default 16). listen admits whom the migration \
         allows (one legacy client, or the source's current attempt and a few candidates) \
         and applies N, at least 16, once it serves after --rebind.",
    ),
    long_only(
        "sync-writes",
        Flag,
        "Make every write durable before answering it, as C flexnbd does.",
    ),
    long_only(
        "grace",
        Value("SECONDS"),
        "At shutdown, wait this long for requests in flight (default 10).",
    ),
    long_only(
        "busy-poll",
        Value("MICROSECONDS"),
        "After answering, poll for the next request up to this long before sleeping; the \
         window adapts to the client, and it does not poll while the host has no idle CPU (default 200, 0 to never poll).",
    ),
    opt(
        "read-only",
        'r',
        Flag,
        "Refuse writes, trims and zeroes (EPERM).",
    ),
    long_only(
        "no-lock",
        Flag,
        "Do not take FILE's advisory lock; by default a second server on the same file \
         refuses to start (read-only servers share it).",
    ),
    long_only(
        "newstyle",
        Flag,
        "Speak fixed new-style NBD instead of flexnbd's old-style.",
    ),
    long_only(
        "export-name",
        Value("NAME"),
        "New-style: the export's name (default: the empty name).",
    ),
    long_only(
        "description",
        Value("TEXT"),
        "New-style: the export's description.",
    ),
    long_only(
        "tls",
        Value("MODE"),
        "New-style: TLS (STARTTLS). off (the default): refused; on: clients may upgrade, \
         plain ones are served too; require: every option but STARTTLS is refused until the \
         client has upgraded. on and require need --tls-creds or --tls-psk.",
    ),
    long_only(
        "tls-creds",
        Value("DIR"),
        "The x509 credentials for --tls, as qemu's tls-creds-x509 lays them out: \
         server-cert.pem, server-key.pem and ca-cert.pem (the CA of client certificates, \
         with --tls-verify-peer).",
    ),
    long_only(
        "tls-verify-peer",
        Flag,
        "With --tls-creds: serve only clients that present a certificate signed by \
         ca-cert.pem.",
    ),
    long_only(
        "tls-psk",
        Value("FILE"),
        "The pre-shared keys for --tls: username:hexkey lines, as psktool writes them; a \
         client must use one of the usernames and its key.",
    ),
];

/// `serve`'s own options.
const SERVE_OPTS: &[Opt] = &[opt(
    "killswitch",
    'k',
    FlagIgnoringValue,
    "Close a client whose request makes no progress for 120 s.",
)];

/// `listen`'s own options.
const LISTEN_OPTS: &[Opt] = &[
    long_only(
        "rebind-addr",
        Value("ADDR"),
        "After a received migration, serve the file on ADDR instead of exiting.",
    ),
    long_only(
        "rebind-port",
        Value("PORT"),
        "The port to serve on after a received migration (with --rebind-addr).",
    ),
];

const CLIENT_OPTS: &[Opt] = &[
    opt("addr", 'l', Value("ADDR"), "The address of the server."),
    opt("port", 'p', Value("PORT"), "The port of the server."),
    opt("from", 'F', Value("OFFSET"), "Byte offset to start at."),
    opt(
        "size",
        'S',
        Value("SIZE"),
        "Number of bytes (for write: or a file whose contents to write).",
    ),
    opt(
        "bind",
        'b',
        Value("BIND_ADDR"),
        "Local address to connect from.",
    ),
];

const SOCK_ONLY: &[Opt] = &[opt(
    "sock",
    's',
    Value("SOCK"),
    "The control socket of the server.",
)];

pub const MODES: &[Mode] = &[
    Mode {
        name: "serve",
        usage: "flexnbd serve --addr ADDR --port PORT --file FILE [--sock SOCK] [--default-deny] [--killswitch] [--newstyle [--tls on|require (--tls-creds DIR [--tls-verify-peer] | --tls-psk FILE)]] [ACL_ENTRY...]",
        description: "Serve FILE over NBD on ADDR:PORT to the clients the access control list admits.",
        opts: &[SERVER_OPTS, SERVE_OPTS],
        positional: Some("ACL_ENTRY"),
        in_help_mode: true,
    },
    Mode {
        name: "listen",
        usage: "flexnbd listen --addr ADDR --port PORT --file FILE [--sock SOCK] [--default-deny] [--rebind-addr ADDR --rebind-port PORT] [--newstyle [--tls on|require (--tls-creds DIR [--tls-verify-peer] | --tls-psk FILE)]] [ACL_ENTRY...]",
        description: "Receive a migration into FILE on ADDR:PORT, then exit (or serve the file on the rebind address).",
        opts: &[SERVER_OPTS, LISTEN_OPTS],
        positional: Some("ACL_ENTRY"),
        in_help_mode: true,
    },
    Mode {
        name: "read",
        usage: "flexnbd read --addr ADDR --port PORT --from OFFSET --size SIZE [--bind BIND_ADDR]",
        description: "Read SIZE bytes at OFFSET from an NBD server and write them to standard output.",
        opts: &[CLIENT_OPTS],
        positional: None,
        in_help_mode: true,
    },
    Mode {
        name: "write",
        usage: "flexnbd write --addr ADDR --port PORT --from OFFSET --size SIZE [--bind BIND_ADDR]",
        description: "Write SIZE bytes from standard input to an NBD server at OFFSET.",
        opts: &[CLIENT_OPTS],
        positional: None,
        in_help_mode: true,
    },
    Mode {
        name: "acl",
        usage: "flexnbd acl --sock SOCK [ACL_ENTRY...]",
        description: "Replace the access control list of a running server.",
        opts: &[SOCK_ONLY],
        positional: Some("ACL_ENTRY"),
        in_help_mode: true,
    },
    Mode {
        name: "mirror-speed",
        usage: "flexnbd mirror-speed --sock SOCK --max-speed BPS",
        description: "Set the bandwidth limit of a running migration.",
        opts: &[&[
            opt("sock", 's', Value("SOCK"), "The control socket of the source server."),
            opt(
                "max-speed",
                'm',
                Value("BPS"),
                "The limit in bytes per second; K, M and G multiply by 1024, 1024² and 1024³ \
                 (10M); 0 removes the limit.",
            ),
        ]],
        positional: None,
        in_help_mode: false,
    },
    Mode {
        name: "mirror",
        usage: "flexnbd mirror --addr ADDR --port PORT --sock SOCK [--unlink] [--bind BIND_ADDR] [--mode MODE] [--tls-creds DIR | --tls-psk FILE] [--wait]",
        description: "Migrate a running server's export to the server listening on ADDR:PORT.",
        opts: &[&[
            opt("sock", 's', Value("SOCK"), "The control socket of the source server."),
            opt("addr", 'l', Value("ADDR"), "The address of the destination."),
            opt("port", 'p', Value("PORT"), "The port of the destination."),
            opt("unlink", 'u', FlagIgnoringValue, "Delete the source file before handing over."),
            opt("bind", 'b', Value("BIND_ADDR"), "Local address to connect from."),
            long_only(
                "mode",
                Value("MODE"),
                "How to copy: background (clients' writes are sent in later passes), active \
                 (a client's write to a range already copied reaches the destination before \
                 it is answered) or auto (background, then active if the passes stop \
                 shrinking; the server's default). C flexnbd servers refuse it.",
            ),
            long_only(
                "tls-creds",
                Value("DIR"),
                "Speak TLS to the destination (STARTTLS: a new-style destination such as \
                 nbdkit, qemu-nbd or ours with --tls) with the x509 credentials in DIR: \
                 ca-cert.pem, the CA the destination's certificate must be signed by (the \
                 certificate must also name ADDR), and optionally client-cert.pem and \
                 client-key.pem for a destination that checks clients. The source server \
                 reads the files. C flexnbd servers refuse it.",
            ),
            long_only(
                "tls-psk",
                Value("FILE"),
                "Speak TLS to the destination with the pre-shared key of FILE's first line \
                 (username:hexkey, as psktool writes it). The source server reads the file.",
            ),
            long_only(
                "wait",
                Flag,
                "Once started, show the migration's progress and exit when it ends: 0 when \
                 handed over, 1 with the reason otherwise.",
            ),
        ]],
        positional: None,
        in_help_mode: true,
    },
    Mode {
        name: "break",
        usage: "flexnbd break --sock SOCK [--force-source]",
        description: "Stop a running migration. Refused once the hand-off may have reached \
                      the destination (in doubt) or the source file was removed.",
        opts: &[
            SOCK_ONLY,
            &[long_only(
                "force-source",
                Flag,
                "In doubt: make this source authoritative again although the destination \
                 may have taken control. Only after the destination was stopped and exited \
                 with status 1 (see docs/migration.md); otherwise two servers may take writes.",
            )],
        ],
        positional: Some("ARG"),
        in_help_mode: false,
    },
    Mode {
        name: "status",
        usage: "flexnbd status --sock SOCK [--json]",
        description: "Print the status line of a running server.",
        opts: &[
            SOCK_ONLY,
            &[long_only("json", Flag, "Print the same fields as a JSON object.")],
        ],
        positional: None,
        in_help_mode: true,
    },
];

/// The options every mode takes (`-h`, `-v`, `-q`), which the manual page lists once.
pub fn common_opts() -> &'static [Opt] {
    COMMON
}

pub fn find(name: &str) -> Option<&'static Mode> {
    MODES.iter().find(|m| m.name == name)
}

pub fn general_help() -> String {
    let mut out = String::from(
        "Usage: flexnbd <cmd> [cmd options]\n\n\
         Commands:\n\
         \tflexnbd serve\n\
         \tflexnbd listen\n\
         \tflexnbd read\n\
         \tflexnbd write\n\
         \tflexnbd acl\n\
         \tflexnbd mirror-speed\n\
         \tflexnbd mirror\n\
         \tflexnbd break\n\
         \tflexnbd status\n\
         \tflexnbd help\n\
         \tflexnbd version\n\n",
    );
    out.push_str("See flexnbd help <cmd> for further info\n");
    out
}

impl Mode {
    pub fn all_opts(&self) -> impl Iterator<Item = &Opt> {
        self.opts
            .iter()
            .flat_map(|group| group.iter())
            .chain(COMMON.iter())
    }

    /// `Usage: ...`, a description, then one tab-indented line per option.
    pub fn help(&self) -> String {
        let mut out = format!("Usage: {}\n\n{}\n\n", self.usage, self.description);
        for o in self.all_opts() {
            let short = o.short.map(|s| format!(",-{s}")).unwrap_or_default();
            let arg = match o.kind {
                Value(name) => format!(" <{name}>"),
                _ => String::new(),
            };
            out.push_str(&format!("\t--{}{short}{arg}\t{}\n", o.long, o.help));
        }
        out
    }

    /// A clap parser for this mode, getopt-like (see the module docs of `cli`).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(self.name)
            .no_binary_name(true)
            .disable_help_flag(true)
            .disable_version_flag(true)
            .infer_long_args(true)
            .allow_negative_numbers(false)
            .dont_delimit_trailing_values(true);
        for o in self.all_opts() {
            let mut arg = Arg::new(o.long).long(o.long);
            if let Some(s) = o.short {
                arg = arg.short(s);
            }
            arg = match o.kind {
                Value(name) => arg
                    .value_name(name)
                    .num_args(1)
                    .allow_hyphen_values(true)
                    .action(ArgAction::Set),
                Flag if o.long == "verbose" || o.long == "quiet" => arg.action(ArgAction::Count),
                Flag => arg.action(ArgAction::SetTrue),
                FlagIgnoringValue => arg
                    .num_args(0..=1)
                    .require_equals(true)
                    .default_missing_value("")
                    .action(ArgAction::Set),
            };
            cmd = cmd.arg(arg);
        }
        if let Some(name) = self.positional {
            cmd = cmd.arg(
                Arg::new("positional")
                    .value_name(name)
                    .num_args(0..)
                    .action(ArgAction::Append),
            );
        }
        cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsers_are_well_formed() {
        for mode in MODES {
            mode.command().debug_assert();
        }
    }
}
