//! `flexnbd mirror --wait`: the progress line a person reads, made from the source's status
//! line.
//!
//! Every key is optional: an older server (or one between two phases) may leave any of them
//! out, and the line then just says less.

/// Phases in which data moves, so that a rate and a time left mean something.
const TRANSFERRING: &[&str] = &["sweep", "copying", "final_pass"];
/// Phases in which the last failure explains what is going on.
const TROUBLED: &[&str] = &["retrying", "in_doubt"];

/// The progress line for a status line, e.g.
/// `Migration: sweep, 42%, 18.9 MB/s, 1m05s left, background`.
pub fn line(status: &str) -> String {
    let keys = Keys::parse(status);
    if keys.get("is_mirroring") == Some("false") {
        return "Migration: no longer registered".to_owned();
    }
    let phase = keys.get("migration_phase");
    let mut parts = vec![phase.unwrap_or("running").replace('_', " ")];
    if let Some(percent) = keys.number("migration_progress") {
        parts.push(format!("{}%", percent.min(100)));
    }
    let moving = phase.is_none_or(|p| TRANSFERRING.contains(&p));
    let speed = keys.number("migration_speed").filter(|_| moving);
    if let Some(speed) = speed {
        parts.push(rate(speed));
    }
    if let (Some(1..), Some(left)) = (speed, keys.number("migration_seconds_left")) {
        parts.push(format!("{} left", duration(left)));
    }
    if let Some(mode) = mode(&keys) {
        parts.push(mode);
    }
    if let (true, Some(why)) = (
        phase.is_some_and(|p| TROUBLED.contains(&p)),
        keys.get("migration_last_failure"),
    ) {
        parts.push(format!("last failure: {why}"));
    }
    format!("Migration: {}", parts.join(", "))
}

/// `background`, `active`, or `active since 34s` once an `auto` migration switched.
fn mode(keys: &Keys) -> Option<String> {
    let mode = keys.get("migration_mode")?;
    Some(match (mode, keys.number("migration_active_since")) {
        ("active", Some(since)) => format!("active since {}", duration(since)),
        _ => mode.to_owned(),
    })
}

/// A rate in decimal units with one decimal place: `512 B/s`, `18.9 MB/s`.
pub fn rate(bytes_per_second: u64) -> String {
    const UNITS: [&str; 5] = ["kB/s", "MB/s", "GB/s", "TB/s", "PB/s"];
    if bytes_per_second < 1000 {
        return format!("{bytes_per_second} B/s");
    }
    let mut value = bytes_per_second as f64 / 1000.0;
    let mut unit = 0;
    // 999.96 would print as 1000.0: move to the next unit before that.
    while value >= 999.95 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A duration the way a person says it: `45s`, `1m05s`, `2h03m`.
pub fn duration(seconds: u64) -> String {
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m{:02}s", seconds / 60, seconds % 60),
        _ => format!("{}h{:02}m", seconds / 3600, seconds % 3600 / 60),
    }
}

/// The `key=value` pairs of a status line.
struct Keys<'a>(Vec<(&'a str, &'a str)>);

impl<'a> Keys<'a> {
    fn parse(status: &'a str) -> Keys<'a> {
        Keys(
            status
                .split_whitespace()
                .filter_map(|pair| pair.split_once('='))
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&'a str> {
        self.0.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    /// A number, or `None` if the key is missing or is not one.
    fn number(&self, key: &str) -> Option<u64> {
        self.get(key)?.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_use_decimal_units() {
        assert_eq!(rate(0), "0 B/s");
        assert_eq!(rate(999), "999 B/s");
        assert_eq!(rate(1000), "1.0 kB/s");
        assert_eq!(rate(18_900_000), "18.9 MB/s");
        assert_eq!(rate(18_949_999), "18.9 MB/s");
        assert_eq!(rate(999_990), "1.0 MB/s");
        assert_eq!(rate(2_500_000_000), "2.5 GB/s");
        assert_eq!(rate(u64::MAX), "18446.7 PB/s");
    }

    #[test]
    fn durations_read_like_speech() {
        assert_eq!(duration(0), "0s");
        assert_eq!(duration(59), "59s");
        assert_eq!(duration(60), "1m00s");
        assert_eq!(duration(65), "1m05s");
        assert_eq!(duration(3599), "59m59s");
        assert_eq!(duration(3600), "1h00m");
        assert_eq!(duration(7385), "2h03m");
    }

    #[test]
    fn a_sweep_shows_percent_rate_time_left_and_mode() {
        let status = "pid=1 size=1048576 is_mirroring=true migration_speed=18900000 \
                      migration_duration=3 migration_seconds_left=65 migration_bytes_left=5 \
                      migration_phase=sweep migration_mode=background migration_progress=42 ";
        assert_eq!(
            line(status),
            "Migration: sweep, 42%, 18.9 MB/s, 1m05s left, background"
        );
    }

    #[test]
    fn an_active_migration_says_since_when() {
        let status = "is_mirroring=true migration_phase=final_pass migration_mode=active \
                      migration_active_since=34 migration_progress=97 migration_speed=500 \
                      migration_seconds_left=1 ";
        assert_eq!(
            line(status),
            "Migration: final pass, 97%, 500 B/s, 1s left, active since 34s"
        );
        // Active from the start: no switch time is reported.
        assert_eq!(
            line("migration_phase=copying migration_mode=active "),
            "Migration: copying, active"
        );
    }

    #[test]
    fn missing_keys_shorten_the_line() {
        assert_eq!(line(""), "Migration: running");
        // flexnbd's keys alone: rate and time left.
        assert_eq!(
            line("is_mirroring=true migration_speed=2000 migration_seconds_left=7 "),
            "Migration: running, 2.0 kB/s, 7s left"
        );
        // No time left while nothing moves: the estimate is meaningless.
        assert_eq!(
            line("migration_phase=sweep migration_speed=0 migration_seconds_left=0 "),
            "Migration: sweep, 0 B/s"
        );
        assert_eq!(
            line("migration_phase=sweep migration_progress=garbage "),
            "Migration: sweep"
        );
        assert_eq!(
            line("is_mirroring=false "),
            "Migration: no longer registered"
        );
    }

    #[test]
    fn trouble_shows_the_last_failure_and_no_rate() {
        let status = "migration_phase=retrying migration_speed=100 migration_seconds_left=3 \
                      migration_mode=background migration_last_failure=connection_refused ";
        assert_eq!(
            line(status),
            "Migration: retrying, background, last failure: connection_refused"
        );
        assert_eq!(
            line("migration_phase=handing_off migration_progress=100 "),
            "Migration: handing off, 100%"
        );
    }
}
