//! The `flexnbd` command line: mode dispatch, option parsing and help (flexnbd §3).
//!
//! Options are parsed with clap configured to behave like GNU `getopt_long`: permutation,
//! `--opt=value` and `--opt value`, clustered short flags, unambiguous long prefixes and `--`.
//! Diagnostics and help are ours, worded as flexnbd words them, because scripts and
//! supervisors read them.

mod client;
mod control_client;
mod follow;
pub mod man;
mod progress;
mod serve;
mod spec;

use std::ffi::OsString;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::ArgMatches;

use crate::logging;
pub use spec::{Mode, MODES};

/// Runs `flexnbd` with the arguments after the program name and returns the exit status.
pub fn run(args: Vec<OsString>) -> i32 {
    let args: Vec<String> = args
        .into_iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let Some(mode_name) = args.first() else {
        eprint!("{}", spec::general_help());
        return 1;
    };
    if mode_name == "help" {
        return help_mode(&args[1..]);
    }
    if matches!(mode_name.as_str(), "version" | "--version" | "-V") {
        println!("{}", version());
        return 0;
    }
    let Some(mode) = spec::find(mode_name) else {
        // flexnbd picks the help from what follows the unknown mode.
        match args.get(1).and_then(|m| spec::find(m)) {
            Some(other) => print!("{}", other.help()),
            None => print!("{}", spec::general_help()),
        }
        return 1;
    };
    let matches = match parse(mode, &args[1..]) {
        Ok(m) => m,
        Err(code) => return code,
    };
    if matches.get_flag("help") {
        print!("{}", mode.help());
        return 0;
    }
    logging::init(log_threshold(&matches));
    match mode.name {
        "serve" => serve::serve(&matches),
        "listen" => serve::listen(&matches),
        "read" => client::read(&matches),
        "write" => client::write(&matches),
        "acl" | "status" | "mirror" | "mirror-speed" | "break" => {
            control_client::run(mode.name, &matches)
        }
        other => {
            eprintln!("{other}: this mode is not available in this version of flexnbd yet");
            1
        }
    }
}

/// `flexnbd version`, `flexnbd --version`: the name and the version (ours; C flexnbd has
/// neither).
pub fn version() -> String {
    format!("flexnbd {}", env!("CARGO_PKG_VERSION"))
}

/// `flexnbd help [MODE]`.
fn help_mode(rest: &[String]) -> i32 {
    match rest.first() {
        None => {
            print!("{}", spec::general_help());
            0
        }
        // Hidden: the manual page, for `man/flexnbd.1` (see `tests/man.rs`).
        Some(name) if name == "--man" => match rest.get(1).map(String::as_str) {
            None | Some("flexnbd") => {
                print!("{}", man::flexnbd_page());
                0
            }
            Some("flexnbd-proxy") => {
                print!("{}", crate::proxy::options::man_page());
                0
            }
            Some(_) => {
                eprint!("{}", spec::general_help());
                1
            }
        },
        Some(name) => match spec::find(name).filter(|m| m.in_help_mode) {
            Some(mode) => {
                print!("{}", mode.help());
                0
            }
            None => {
                eprint!("{}", spec::general_help());
                1
            }
        },
    }
}

/// Parses a mode's options; on failure prints a getopt-style diagnostic and the mode's
/// help on stderr and returns the exit status.
fn parse(mode: &Mode, args: &[String]) -> Result<ArgMatches, i32> {
    mode.command().try_get_matches_from(args).map_err(|err| {
        eprintln!("{}", diagnostic(mode.name, &err));
        eprint!("{}", mode.help());
        1
    })
}

/// A getopt-style diagnostic for a clap error, prefixed with `program` (a mode of
/// `flexnbd`, or `flexnbd-proxy`).
pub(crate) fn diagnostic(program: &str, err: &clap::Error) -> String {
    let invalid = match err.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => s.clone(),
        Some(ContextValue::Strings(v)) => v.join(" "),
        _ => String::new(),
    };
    let option = invalid.split([' ', '=']).next().unwrap_or("").to_owned();
    match err.kind() {
        ErrorKind::UnknownArgument if option.starts_with("--") => {
            format!("{program}: unrecognized option '{option}'")
        }
        ErrorKind::UnknownArgument if option.starts_with('-') => {
            format!(
                "{program}: invalid option -- '{}'",
                option.trim_start_matches('-')
            )
        }
        ErrorKind::InvalidValue | ErrorKind::NoEquals if !option.is_empty() => {
            format!("{program}: option '{option}' requires an argument")
        }
        ErrorKind::ArgumentConflict if !option.is_empty() => {
            format!("{program}: option '{option}' is ambiguous or given twice")
        }
        _ => {
            let text = err.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            format!("{program}: {}", first.trim_start_matches("error: "))
        }
    }
}

/// The last of `-v`/`-q` wins (flexnbd §2.3).
fn log_threshold(matches: &ArgMatches) -> u8 {
    let last = |id: &str| {
        matches
            .indices_of(id)
            .and_then(|indices| indices.max())
            .filter(|_| matches.get_count(id) > 0)
    };
    match (last("verbose"), last("quiet")) {
        (Some(v), Some(q)) if v > q => logging::verbose_threshold(),
        (Some(_), None) => logging::verbose_threshold(),
        (_, Some(_)) => logging::FATAL,
        (None, None) => logging::WARN,
    }
}

/// The string value of an option, if given.
fn value<'a>(matches: &'a ArgMatches, id: &str) -> Option<&'a str> {
    matches.get_one::<String>(id).map(String::as_str)
}

/// True if a flag was given (plain flags and the `=value`-tolerant ones alike).
fn flag(matches: &ArgMatches, id: &str) -> bool {
    matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine)
}
