//! The manual page `flexnbd(1)`, rendered as roff (man(7) macros) from [`super::MODES`],
//! the table that also makes the parsers and `flexnbd help`, so that the page, the help and
//! what the program accepts never disagree. `flexnbd help --man` prints it; the copy checked
//! in at `man/flexnbd.1` is compared with it by `tests/man.rs`.
//!
//! The renderer ([`Roff`], [`ManOpt`], [`command_page`]) knows nothing of flexnbd's table, so
//! that a single-command program (`flexnbd-proxy`) can render its page the same way from its
//! own option list.

use super::spec::{self, Kind, MODES};

/// One option as a manual page lists it.
#[derive(Clone, Copy, Debug)]
pub struct ManOpt<'a> {
    /// Without the leading `--`.
    pub long: &'a str,
    pub short: Option<char>,
    /// The value's name (`ADDR`), if the option takes one.
    pub value: Option<&'a str>,
    /// The value may be left out, and is then written `--opt=VALUE` (as `--cache[=BYTES]`).
    pub optional_value: bool,
    pub help: &'a str,
}

/// The page of a program without modes: NAME, SYNOPSIS, DESCRIPTION, OPTIONS, then the
/// extra sections in order.
pub struct CommandPage<'a> {
    /// The program's name (`flexnbd-proxy`); also the page's title, upper-cased.
    pub name: &'a str,
    /// The one line of the NAME section after the dash.
    pub summary: &'a str,
    /// Usage lines (`flexnbd-proxy --addr ADDR ...`): option words are set in bold, value
    /// names (upper-case words) in italics.
    pub synopsis: &'a [&'a str],
    /// Paragraphs of prose.
    pub description: &'a [&'a str],
    pub options: &'a [ManOpt<'a>],
    /// `(title, entries)`: each entry a term (set in bold) and its explanation; an empty
    /// term makes a plain paragraph.
    pub sections: &'a [(&'a str, &'a [(&'a str, &'a str)])],
}

/// Renders a [`CommandPage`] as a section 1 manual page.
pub fn command_page(page: &CommandPage) -> String {
    let mut roff = Roff::new(page.name, 1);
    roff.section("NAME");
    roff.name_line(page.name, page.summary);
    roff.section("SYNOPSIS");
    for usage in page.synopsis {
        roff.usage(usage);
    }
    roff.section("DESCRIPTION");
    for text in page.description {
        roff.paragraph(text);
    }
    if !page.options.is_empty() {
        roff.section("OPTIONS");
        for o in page.options {
            roff.option(o);
        }
    }
    for (title, entries) in page.sections {
        roff.section(title);
        for (term, text) in *entries {
            if term.is_empty() {
                roff.paragraph(text);
            } else {
                roff.item(term, text);
            }
        }
    }
    roff.finish()
}

/// A manual page being written. Every text goes through the escaping here, so a help text
/// can say anything (a leading `.`, a backslash, `--opt`, `1024²`) without breaking the
/// page.
pub struct Roff {
    out: String,
}

impl Roff {
    /// Starts a page: the `.TH` line, and no hyphenation or justification, which would
    /// split option names and stretch the option lists.
    ///
    /// The date is left empty so that the page only changes when its text does.
    pub fn new(name: &str, section: u8) -> Self {
        let mut roff = Roff { out: String::new() };
        roff.line(&format!(
            ".TH \"{}\" {section} \"\" \"flexnbd {}\" \"User Commands\"",
            escape(&name.to_uppercase(), false),
            env!("CARGO_PKG_VERSION")
        ));
        roff.line(".nh");
        roff.line(".ad l");
        roff
    }

    /// `.SH TITLE`.
    pub fn section(&mut self, title: &str) {
        self.line(&format!(".SH {}", quoted(title)));
    }

    /// `.SS TITLE`.
    pub fn subsection(&mut self, title: &str) {
        self.line(&format!(".SS {}", quoted(title)));
    }

    /// The NAME section's line, `name \- summary`, which `whatis` and `apropos` read.
    pub fn name_line(&mut self, name: &str, summary: &str) {
        self.line(&format!("{} \\- {}", escape(name, true), prose(summary)));
    }

    /// A paragraph of prose.
    pub fn paragraph(&mut self, text: &str) {
        self.line(".PP");
        self.line(&prose(text));
    }

    /// A usage line with a hanging indent, so that a long one wraps under itself.
    pub fn usage(&mut self, usage: &str) {
        self.line(".PP");
        self.line(".in +4n");
        self.line(".ti -4n");
        self.line(&usage_line(usage));
        self.line(".in -4n");
    }

    /// One option, `--long, -s VALUE`, and its help below it.
    pub fn option(&mut self, o: &ManOpt) {
        let mut term = format!("\\fB\\-\\-{}\\fR", escape(o.long, true));
        if let Some(s) = o.short {
            term.push_str(&format!(", \\fB\\-{}\\fR", escape(&s.to_string(), true)));
        }
        match (o.value, o.optional_value) {
            (Some(v), false) => term.push_str(&format!(" \\fI{}\\fR", escape(v, true))),
            (Some(v), true) => term.push_str(&format!("[=\\fI{}\\fR]", escape(v, true))),
            (None, _) => {}
        }
        self.line(".TP");
        self.line(&term);
        self.line(&prose(o.help));
    }

    /// A term in bold (an environment variable, a file, an exit status) and its text.
    pub fn item(&mut self, term: &str, text: &str) {
        self.line(".TP");
        self.line(&format!("\\fB{}\\fR", escape(term, true)));
        self.line(&prose(text));
    }

    /// References to other pages, `name(section)`, the names in bold.
    pub fn see_also(&mut self, pages: &[(&str, u8)]) {
        let refs: Vec<String> = pages
            .iter()
            .map(|(name, section)| format!("\\fB{}\\fR({section})", escape(name, true)))
            .collect();
        self.line(&refs.join(",\n"));
    }

    pub fn finish(self) -> String {
        self.out
    }

    /// Appends one line as it is: text must have gone through [`prose`] or [`usage_line`],
    /// which guard a line starting with `.` or `'` (else read as a request).
    fn line(&mut self, line: &str) {
        self.out.push_str(line);
        self.out.push('\n');
    }
}

/// A macro argument in double quotes (a quote inside is written `\(dq`); titles are names
/// (`mirror-speed`), so their hyphens are minus signs.
fn quoted(text: &str) -> String {
    format!("\"{}\"", escape(text, true).replace('"', "\\(dq"))
}

/// Escapes text for roff: `\` as `\e`, `-` as `\-` (a minus, which a reader can copy into
/// a shell) when `minus`, otherwise left a hyphen; characters beyond ASCII as `\[uXXXX]`,
/// which groff reads whatever the input encoding is taken to be.
fn escape(text: &str, minus: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\e"),
            '-' if minus => out.push_str("\\-"),
            c if c.is_ascii() => out.push(c),
            c => out.push_str(&format!("\\[u{:04X}]", c as u32)),
        }
    }
    out
}

/// A line of filled prose: whitespace runs (help texts are wrapped in the source) become one
/// space, words that are options (`--rebind-addr`, `-5`) are set with minus signs and options
/// in bold, and a line that would start with `.` or `'` is guarded with `\&`.
fn prose(text: &str) -> String {
    let words: Vec<String> = text.split_whitespace().map(prose_word).collect();
    let line = words.join(" ");
    if line.starts_with(['.', '\'']) {
        format!("\\&{line}")
    } else {
        line
    }
}

fn prose_word(word: &str) -> String {
    let lead = word.len() - word.trim_start_matches(['(', '[', '"', '`']).len();
    let core_and_tail = &word[lead..];
    let core = core_and_tail.trim_end_matches(['.', ',', ';', ':', ')', ']', '"', '`']);
    let tail = &core_and_tail[core.len()..];
    let is_option = core.len() > 1
        && core.starts_with('-')
        && core[1..].starts_with(|c: char| c == '-' || c.is_ascii_alphanumeric());
    let core = if is_option && core[1..].starts_with('-') {
        format!("\\fB{}\\fR", escape(core, true))
    } else {
        escape(core, is_option)
    };
    format!(
        "{}{core}{}",
        escape(&word[..lead], false),
        escape(tail, false)
    )
}

/// A usage line: option words and command names in bold, value names (upper-case words such
/// as `ADDR` or `ACL_ENTRY`) in italics, brackets and `...` in roman. An option and its
/// value are kept on one line (`\ `, an unbreakable space).
fn usage_line(usage: &str) -> String {
    let is_word = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '/');
    let is_value_name = |run: &str| {
        run.chars().any(|c| c.is_ascii_uppercase())
            && run
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
    };
    let mut out = String::new();
    let mut after_option = false;
    for (i, token) in usage.split_whitespace().enumerate() {
        if i > 0 && after_option && is_value_name(token.trim_end_matches([']', '.'])) {
            out.push_str("\\ ");
        } else if i > 0 {
            out.push(' ');
        }
        after_option = token.trim_start_matches('[').starts_with('-') && !token.ends_with(']');
        let mut rest = token;
        while !rest.is_empty() {
            let split = if rest.starts_with(is_word) {
                rest.find(|c: char| !is_word(c))
            } else {
                rest.find(is_word)
            }
            .unwrap_or(rest.len());
            let (run, after) = rest.split_at(split);
            if !run.starts_with(is_word) {
                out.push_str(&escape(run, false));
            } else if is_value_name(run) {
                out.push_str(&format!("\\fI{}\\fR", escape(run, true)));
            } else {
                out.push_str(&format!("\\fB{}\\fR", escape(run, true)));
            }
            rest = after;
        }
    }
    if out.starts_with(['.', '\'']) {
        out.insert_str(0, "\\&");
    }
    out
}

/// The option of the table as the page lists it. `--killswitch=x` and `--unlink=x` are
/// tolerated for C's sake but documented as the flags they are.
fn man_opt(o: &spec::Opt) -> ManOpt<'static> {
    ManOpt {
        long: o.long,
        short: o.short,
        value: match o.kind {
            Kind::Value(name) => Some(name),
            Kind::Flag | Kind::FlagIgnoringValue => None,
        },
        optional_value: false,
        help: o.help,
    }
}

const DESCRIPTION: &[&str] = &[
    "flexnbd serves a file (a disk image) to network block device (NBD) clients, and \
     migrates it live to another flexnbd while clients keep writing to it. It is a drop-in \
     successor to Bytemark's flexnbd, written in C: the same command line, the same \
     control socket protocol and the same old-style NBD handshake, so it can replace a C \
     flexnbd in place and migrate to and from one. With --newstyle it speaks fixed \
     new-style NBD instead, for the Linux kernel's nbd-client, QEMU and libnbd.",
    "The first argument is the mode; the options follow, parsed as GNU getopt_long \
     parses them: --opt=VALUE or --opt VALUE, clustered short flags (-dv), any unambiguous \
     prefix of a long option, options and other arguments in any order, and -- to end the \
     options.",
    "An access control list is a list of ACL_ENTRY arguments, each an address or \
     ADDR/BITS (10.0.0.0/8, ::1): a client is admitted if its address matches an entry. An \
     empty list admits every client, unless --default-deny is given. The list of a running \
     server can be replaced with the acl mode.",
    "The servers (serve and listen) log to standard error, in flexnbd's format. SIGINT, \
     SIGTERM and SIGQUIT stop them gracefully: they stop accepting, answer the requests in \
     flight (for --grace seconds at most), make the file durable (fdatasync) and exit.",
];

const MIGRATION: &[&str] = &[
    "A server started with --sock opens a control socket at SOCK. The modes acl, status, \
     mirror, mirror-speed and break are its clients: each sends one command and prints the \
     server's answer. A migration runs from a serve (the source) to a listen (the \
     destination): start listen on the destination host, then run mirror against the \
     source's control socket, and follow it with status (or mirror --wait). When the \
     destination has every block, the source hands over and exits, and the destination \
     exits too or, with --rebind-addr and --rebind-port, serves the file on the source's \
     address.",
    "At most one side accepts writes at any moment; status says which one is authoritative \
     (has_control, handoff_phase). If a hand-off is ever in doubt, break refuses to undo it; \
     what to do then is described in docs/migration.md.",
    "docs/control.md describes the control socket's commands, answers and status keys, and \
     docs/migration.md the migration and its hand-off. Both are in the source tree, and \
     make install puts them in share/doc/flexnbd under the installation prefix.",
];

const EXIT_STATUS: &[(&str, &str)] = &[
    (
        "0",
        "Success. A server exits 0 when a signal stopped it gracefully, when serve handed \
         its file over to a migration's destination, and when listen received a migration \
         and took control of the file. The control modes exit 0 when the server's answer \
         was a success.",
    ),
    (
        "1",
        "Invalid arguments (the mode's help follows the message on standard error), a \
         server that could not start (a fatal log line says why: the file is locked by \
         another server, the address is in use, ...), a failed run, or a control command \
         the server refused. A listen that exits 1 never took control of its file.",
    ),
    (
        "2",
        "A control mode could not talk to the server: no socket at SOCK, the connection \
         was refused, or the answer was missing or malformed.",
    ),
    (
        "3",
        "A serve stopped (by a signal) or failed after it had let go of its copy during a \
         migration's hand-off: the destination may hold the authoritative data. Nothing \
         should restart it on its own; check which side took control first (see the \
         migration documentation). A serve that exits 1 after a signal still held every \
         acknowledged write.",
    ),
];

const ENVIRONMENT: &[(&str, &str)] = &[
    (
        "FLEXNBD_MS_REQUEST_LIMIT_SECS",
        "Read by a migration's source: how long, in seconds (a positive number, fractions \
         allowed), the bulk copy waits for the destination to make progress before the \
         attempt fails. The default is 60, as in C flexnbd.",
    ),
    (
        "FLEXNBD_UPSTREAM_TIMEOUT",
        "Not read by flexnbd: flexnbd-proxy(1) reconnects to its server when it moves no \
         byte for this many seconds while requests are outstanding (default 30).",
    ),
];

const FILES: &[(&str, &str)] = &[
    (
        "FILE",
        "The served file, which serve and listen lock (flock(2), shared by read-only \
         servers) so that a second server on it refuses to start, unless --no-lock.",
    ),
    (
        "SOCK",
        "The control socket, a UNIX socket created when the server starts and removed when \
         it exits.",
    ),
    (
        "PREFIX/share/doc/flexnbd/",
        "control.md, migration.md, protocol.md and the other documents of the source tree's \
         docs directory, as make install installs them.",
    ),
];

const SEE_ALSO: &[(&str, u8)] = &[
    ("flexnbd-proxy", 1),
    ("qemu-nbd", 8),
    ("nbdkit", 1),
    ("nbdinfo", 1),
    ("nbd-client", 8),
];

/// The whole `flexnbd(1)` page.
pub fn flexnbd_page() -> String {
    let mut roff = Roff::new("flexnbd", 1);
    roff.section("NAME");
    roff.name_line(
        "flexnbd",
        "serve a disk image over NBD and migrate it live to another host",
    );

    roff.section("SYNOPSIS");
    for mode in MODES {
        roff.usage(mode.usage);
    }
    roff.usage("flexnbd help [MODE]");
    roff.usage("flexnbd version");

    roff.section("DESCRIPTION");
    for text in DESCRIPTION {
        roff.paragraph(text);
    }

    roff.section("COMMANDS");
    for mode in MODES {
        roff.subsection(mode.name);
        roff.usage(mode.usage);
        roff.paragraph(mode.description);
        for o in mode.opts.iter().flat_map(|group| group.iter()) {
            roff.option(&man_opt(o));
        }
    }
    roff.subsection("help");
    roff.usage("flexnbd help [MODE]");
    roff.paragraph(
        "Print the list of modes, or MODE's usage and options, on standard output. The same \
         text is printed by MODE --help.",
    );
    roff.subsection("version");
    roff.usage("flexnbd version");
    roff.paragraph("Print flexnbd's version (also flexnbd --version and flexnbd -V).");

    roff.section("COMMON OPTIONS");
    roff.paragraph("Every mode accepts these options.");
    for o in spec::common_opts() {
        roff.option(&man_opt(o));
    }

    roff.section("MIGRATION AND THE CONTROL SOCKET");
    for text in MIGRATION {
        roff.paragraph(text);
    }
    roff.section("EXIT STATUS");
    for (term, text) in EXIT_STATUS {
        roff.item(term, text);
    }
    roff.section("ENVIRONMENT");
    for (term, text) in ENVIRONMENT {
        roff.item(term, text);
    }
    roff.section("FILES");
    for (term, text) in FILES {
        roff.item(term, text);
    }
    roff.section("SEE ALSO");
    roff.see_also(SEE_ALSO);
    roff.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        assert_eq!(prose(".start"), "\\&.start");
        assert_eq!(prose("'quote"), "\\&'quote");
        assert_eq!(prose("a\\b"), "a\\eb");
        assert_eq!(prose("read-only"), "read-only");
        assert_eq!(
            prose("with --rebind-addr, or -5."),
            "with \\fB\\-\\-rebind\\-addr\\fR, or \\-5."
        );
        assert_eq!(prose("1024²  and\n  more"), "1024\\[u00B2] and more");
        assert_eq!(quoted("a-\"b\""), "\"a\\-\\(dqb\\(dq\"");
    }

    #[test]
    fn usage_words_are_set_by_kind() {
        assert_eq!(
            usage_line("flexnbd acl --sock SOCK [ACL_ENTRY...]"),
            "\\fBflexnbd\\fR \\fBacl\\fR \\fB\\-\\-sock\\fR\\ \\fISOCK\\fR [\\fIACL_ENTRY\\fR...]"
        );
        assert_eq!(
            usage_line("r [--bind BIND_ADDR] [-x]"),
            "\\fBr\\fR [\\fB\\-\\-bind\\fR\\ \\fIBIND_ADDR\\fR] [\\fB\\-x\\fR]"
        );
        assert_eq!(
            usage_line("p [--cache[=BYTES]]"),
            "\\fBp\\fR [\\fB\\-\\-cache\\fR[=\\fIBYTES\\fR]]"
        );
    }

    #[test]
    fn every_mode_and_option_is_on_the_page() {
        let page = flexnbd_page();
        for mode in MODES {
            assert!(page.contains(&format!(".SS \"{}\"", escape(mode.name, true))));
            for o in mode.all_opts() {
                assert!(
                    page.contains(&format!("\\fB\\-\\-{}\\fR", escape(o.long, true))),
                    "--{} of {}",
                    o.long,
                    mode.name
                );
            }
        }
    }

    #[test]
    fn a_command_page_has_its_sections() {
        let page = command_page(&CommandPage {
            name: "flexnbd-proxy",
            summary: "proxy",
            synopsis: &["flexnbd-proxy --addr ADDR"],
            description: &["Proxies."],
            options: &[ManOpt {
                long: "cache",
                short: None,
                value: Some("BYTES"),
                optional_value: true,
                help: "Prefetch.",
            }],
            sections: &[("ENVIRONMENT", &[("FLEXNBD_UPSTREAM_TIMEOUT", "Seconds.")])],
        });
        assert!(page.starts_with(".TH \"FLEXNBD-PROXY\" 1 "));
        assert!(page.contains("\\fB\\-\\-cache\\fR[=\\fIBYTES\\fR]\nPrefetch.\n"));
        assert!(page.contains(".SH \"ENVIRONMENT\"\n.TP\n\\fBFLEXNBD_UPSTREAM_TIMEOUT\\fR\n"));
    }
}
