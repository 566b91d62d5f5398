//! Log lines in flexnbd's format (`flexnbd-compat.md` §2.3), on stderr.
//!
//! `<ms>:<L>:<pid> <thread> <context> <location>: <message>`
//!
//! We log through `tracing` and format with our own layer: the format is part of the
//! compatibility contract (operators grep these lines), so no general-purpose formatter
//! fits. A fatal line is an `error!` carrying the field `fatal = true`; use [`crate::fatal!`].

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::RwLock;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

/// Level numbers of the C program: D 0, I 1, W 2, E 3, F 4.
pub const DEBUG: u8 = 0;
pub const INFO: u8 = 1;
pub const WARN: u8 = 2;
pub const FATAL: u8 = 4;

static THRESHOLD: AtomicU8 = AtomicU8::new(WARN);
static CONTEXT: RwLock<String> = RwLock::new(String::new());

/// Logs a fatal error: an `E`-level event marked fatal, printed with the letter `F`.
#[macro_export]
macro_rules! fatal {
    ($($arg:tt)*) => { ::tracing::error!(fatal = true, $($arg)*) };
}

/// The threshold `-v` selects: I in release builds, D in debug builds.
pub fn verbose_threshold() -> u8 {
    if cfg!(debug_assertions) {
        DEBUG
    } else {
        INFO
    }
}

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(threshold: u8) {
    THRESHOLD.store(threshold, Ordering::Relaxed);
    let subscriber = tracing_subscriber::registry().with(FlexnbdLayer);
    // A second call (tests that start several modes in one process) keeps the first one.
    let _ = tracing::subscriber::set_global_default(subscriber);
}

/// Sets the `<context>` field: the `--file` argument in `serve` and `listen`.
pub fn set_context(context: &str) {
    if let Ok(mut slot) = CONTEXT.write() {
        *slot = context.to_owned();
    }
}

fn level_number(level: &Level, fatal: bool) -> u8 {
    match *level {
        Level::TRACE | Level::DEBUG => DEBUG,
        Level::INFO => INFO,
        Level::WARN => WARN,
        Level::ERROR if fatal => FATAL,
        Level::ERROR => 3,
    }
}

const LETTERS: [char; 5] = ['D', 'I', 'W', 'E', 'F'];

struct FlexnbdLayer;

#[derive(Default)]
struct LineVisitor {
    message: String,
    extra: String,
    fatal: bool,
}

impl Visit for LineVisitor {
    fn record_bool(&mut self, field: &Field, value: bool) {
        if field.name() == "fatal" {
            self.fatal = value;
        } else {
            let _ = write!(self.extra, " {}={value}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.extra, " {}={value}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.extra, " {}={value:?}", field.name());
        }
    }
}

impl<S: Subscriber> Layer<S> for FlexnbdLayer {
    fn enabled(&self, metadata: &tracing::Metadata<'_>, _ctx: Context<'_, S>) -> bool {
        // Errors may be fatal, which only the fields tell: decide those in on_event.
        let threshold = THRESHOLD.load(Ordering::Relaxed);
        *metadata.level() == Level::ERROR || level_number(metadata.level(), false) >= threshold
    }

    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut visitor = LineVisitor::default();
        event.record(&mut visitor);
        let meta = event.metadata();
        let level = level_number(meta.level(), visitor.fatal);
        if level < THRESHOLD.load(Ordering::Relaxed) {
            return;
        }
        let context = CONTEXT.read().map(|c| c.clone()).unwrap_or_default();
        let line = format!(
            "{}:{}:{} {:#x} {} {}:{}: {}{}\n",
            monotonic_ms(),
            LETTERS[level as usize],
            std::process::id(),
            thread_id(),
            context,
            meta.file().unwrap_or("?"),
            meta.line().unwrap_or(0),
            visitor.message,
            visitor.extra,
        );
        // One write per line, so that lines from concurrent threads never interleave.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
}

fn monotonic_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

fn thread_id() -> u64 {
    // SAFETY: pthread_self has no preconditions and cannot fail.
    unsafe { libc::pthread_self() as u64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_map_to_the_c_letters() {
        assert_eq!(LETTERS[level_number(&Level::DEBUG, false) as usize], 'D');
        assert_eq!(LETTERS[level_number(&Level::INFO, false) as usize], 'I');
        assert_eq!(LETTERS[level_number(&Level::WARN, false) as usize], 'W');
        assert_eq!(LETTERS[level_number(&Level::ERROR, false) as usize], 'E');
        assert_eq!(LETTERS[level_number(&Level::ERROR, true) as usize], 'F');
    }
}
