//! `flexnbd mirror --wait` (ours): start the migration as `mirror` does, then follow it to
//! its end.
//!
//! The outcome comes from a `mirror_wait` request, which the server answers only when the
//! migration ends; a `status` request about once a second feeds the progress line meanwhile.
//!
//! `mirror_wait` is sent as soon as the `mirror` request is on its way, not after its
//! answer: a small `exit` migration can complete, and its server exit, between `Mirror
//! started` and a later request. Until the server has registered the migration it answers
//! `not mirroring`, so the request is repeated until the migration is registered or
//! `mirror`'s answer is in.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::control_client::{answer, exchange, local_failure, print_answer, send, ANSWER_TIMEOUT};
use super::progress;

/// How often the progress line is refreshed.
const POLL: Duration = Duration::from_secs(1);
/// Without a terminal, one progress line this often (a log should not fill up).
const PLAIN_EVERY: Duration = Duration::from_secs(5);
/// A `status` answer comes at once; a server that takes longer is skipped for this round.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// Between two `mirror_wait` requests sent before the migration was registered.
const REGISTER_RETRY: Duration = Duration::from_millis(5);

/// How the migration ended, as far as this client knows.
#[derive(Debug)]
enum Ending {
    /// `mirror_wait`'s answer.
    Answer(i32, String),
    /// The control socket went away (or never answered) without an answer.
    Vanished,
}

/// Sends `mirror` (`lines`), prints its answer as `mirror` does, and if the migration
/// started, follows it. Returns the exit status.
pub fn mirror_and_wait(sock: &str, lines: &[String]) -> i32 {
    let mut mirror = match send(sock, lines, Some(ANSWER_TIMEOUT)) {
        Ok(stream) => stream,
        Err(e) => return local_failure(&e),
    };
    let answered = Arc::new(AtomicBool::new(false));
    let (tx, ending) = mpsc::channel();
    {
        let (sock, answered) = (sock.to_owned(), answered.clone());
        thread::spawn(move || {
            let _ = tx.send(wait_for_end(&sock, &answered));
        });
    }
    let started = answer(&mut mirror, sock);
    answered.store(true, Ordering::SeqCst);
    match started {
        Ok((0, text)) => {
            println!("{text}");
            follow(sock, &ending)
        }
        Ok((code, text)) => print_answer(code, &text),
        Err(e) => local_failure(&e),
    }
}

/// `mirror_wait`, repeated while the answer may predate the migration's registration (see
/// the module docs).
fn wait_for_end(sock: &str, mirror_answered: &AtomicBool) -> Ending {
    let request = ["mirror_wait".to_owned()];
    loop {
        let early = !mirror_answered.load(Ordering::SeqCst);
        match exchange(sock, &request, None) {
            Ok((1, text)) if early && text == "not mirroring" => thread::sleep(REGISTER_RETRY),
            Ok((code, text)) => return Ending::Answer(code, text),
            Err(_) => return Ending::Vanished,
        }
    }
}

/// Shows the progress until the ending arrives, then reports it.
fn follow(sock: &str, ending: &Receiver<Ending>) -> i32 {
    let mut display = Display::new(std::io::stdout().is_terminal());
    let status = ["status".to_owned()];
    loop {
        match ending.recv_timeout(POLL) {
            Ok(end) => {
                display.finish();
                return report(end);
            }
            Err(RecvTimeoutError::Disconnected) => {
                display.finish();
                return report(Ending::Vanished);
            }
            Err(RecvTimeoutError::Timeout) => {
                if let Ok((0, line)) = exchange(sock, &status, Some(STATUS_TIMEOUT)) {
                    display.show(&progress::line(&line));
                }
            }
        }
    }
}

/// Prints the ending and returns the exit status: 0 once handed over, 1 otherwise.
fn report(end: Ending) -> i32 {
    match end {
        Ending::Answer(0, text) => print_answer(0, &text),
        Ending::Answer(10, _) => {
            eprintln!(
                "The server does not know mirror_wait (a C flexnbd server?): the migration \
                 runs on, but cannot be followed; use flexnbd status."
            );
            1
        }
        Ending::Answer(_, text) => {
            print_answer(1, &text);
            1
        }
        Ending::Vanished => {
            eprintln!("the server ended without reporting the outcome");
            1
        }
    }
}

/// The progress line on stdout: redrawn in place on a terminal, one line every
/// [`PLAIN_EVERY`] otherwise.
struct Display {
    terminal: bool,
    drawn: bool,
    last_plain: Option<Instant>,
}

impl Display {
    fn new(terminal: bool) -> Display {
        Display {
            terminal,
            drawn: false,
            last_plain: None,
        }
    }

    fn show(&mut self, line: &str) {
        let mut out = std::io::stdout().lock();
        if self.terminal {
            // Back to the start of the line, then clear what a longer line left behind.
            let _ = write!(out, "\r{line}\x1b[K");
            self.drawn = true;
        } else if self.last_plain.is_none_or(|at| at.elapsed() >= PLAIN_EVERY) {
            let _ = writeln!(out, "{line}");
            self.last_plain = Some(Instant::now());
        }
        let _ = out.flush();
    }

    /// Ends a line drawn in place, so that what follows starts on a line of its own.
    fn finish(&mut self) {
        if self.drawn {
            println!();
            self.drawn = false;
        }
    }
}
