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

/// Logs like `tracing::<level>!`, at most one line per [`Throttle::PERIOD`] from this call
/// site; the next line that gets through says how many were suppressed meanwhile. For
/// messages a storm can repeat thousands of times (EMFILE from `accept`, ENOSPC for every
/// refused write part, a port scan against the ACL).
#[macro_export]
macro_rules! throttled {
    ($level:ident, $($arg:tt)*) => {{
        static THROTTLE: $crate::logging::Throttle = $crate::logging::Throttle::new();
        if let Some(suppressed) = THROTTLE.allow() {
            if suppressed == 0 {
                ::tracing::$level!($($arg)*);
            } else {
                ::tracing::$level!(
                    "{} ({} similar messages suppressed)",
                    format_args!($($arg)*),
                    suppressed
                );
            }
        }
    }};
}

/// One call site's rate limit (see [`throttled!`]).
#[derive(Debug)]
pub struct Throttle {
    /// When a line was last let through, and how many were suppressed since.
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new()
    }
}

impl Throttle {
    /// At most one line per this long from one call site.
    pub const PERIOD: std::time::Duration = std::time::Duration::from_secs(5);

    pub const fn new() -> Throttle {
        Throttle {
            state: std::sync::Mutex::new((None, 0)),
        }
    }

    /// `Some(suppressed)` when a line may be logged now.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(std::time::Instant::now())
    }

    fn allow_at(&self, now: std::time::Instant) -> Option<u64> {
        let mut state = self.state.lock().ok()?;
        match state.0 {
            Some(last) if now.saturating_duration_since(last) < Self::PERIOD => {
                state.1 += 1;
                None
            }
            _ => {
                let suppressed = std::mem::take(&mut state.1);
                state.0 = Some(now);
                Some(suppressed)
            }
        }
    }
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
    fn a_throttle_lets_one_line_through_per_period_and_counts_the_rest() {
        let throttle = Throttle::new();
        let t0 = std::time::Instant::now();
        assert_eq!(throttle.allow_at(t0), Some(0));
        for i in 1..=1000u64 {
            let t = t0 + std::time::Duration::from_millis(i);
            assert_eq!(throttle.allow_at(t), None);
        }
        let later = t0 + Throttle::PERIOD;
        assert_eq!(throttle.allow_at(later), Some(1000));
        assert_eq!(throttle.allow_at(later), None);
    }

    #[test]
    fn levels_map_to_the_c_letters() {
        assert_eq!(LETTERS[level_number(&Level::DEBUG, false) as usize], 'D');
        assert_eq!(LETTERS[level_number(&Level::INFO, false) as usize], 'I');
        assert_eq!(LETTERS[level_number(&Level::WARN, false) as usize], 'W');
        assert_eq!(LETTERS[level_number(&Level::ERROR, false) as usize], 'E');
        assert_eq!(LETTERS[level_number(&Level::ERROR, true) as usize], 'F');
    }
}
