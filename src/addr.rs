//! Parsing of addresses and ports as flexnbd does it (`flexnbd-compat.md` §2.1, §2.2).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Parses an IP address the flexnbd way: an optional `[` is skipped, then the longest run
/// (at most 64) of `[0-9a-fA-F:.]` is taken, so `[::1]:4777` and `10.0.0.0/8` yield the
/// address part; `0` means 0.0.0.0; host names are never resolved.
pub fn parse_ip(text: &str) -> Option<IpAddr> {
    let text = text.strip_prefix('[').unwrap_or(text);
    let end = text
        .char_indices()
        .take_while(|(i, c)| *i < 64 && (c.is_ascii_hexdigit() || *c == ':' || *c == '.'))
        .map(|(i, c)| i + c.len_utf8())
        .last()
        .unwrap_or(0);
    let candidate = &text[..end];
    if candidate == "0" {
        return Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    }
    if let Ok(v4) = candidate.parse::<Ipv4Addr>() {
        return Some(IpAddr::V4(v4));
    }
    candidate.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
}

/// C's `atoi`: leading white space, an optional sign, then decimal digits; anything else
/// ends the number, and no digits at all give 0. Saturates instead of overflowing.
pub fn atoi(text: &str) -> i64 {
    let text = text.trim_start();
    let (negative, digits) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let mut value: i64 = 0;
    for b in digits.bytes().take_while(u8::is_ascii_digit) {
        value = value.saturating_mul(10).saturating_add(i64::from(b - b'0'));
    }
    if negative {
        -value
    } else {
        value
    }
}

/// Error for a port outside 0..=65535, worded as flexnbd words it.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("Port number must be >= 0 and <= 65535")]
pub struct BadPort;

/// Parses a port with `atoi` semantics: garbage gives 0 (the kernel then picks one).
pub fn parse_port(text: &str) -> Result<u16, BadPort> {
    u16::try_from(atoi(text)).map_err(|_| BadPort)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flexnbd_address_forms() {
        assert_eq!(parse_ip("127.0.0.1"), Some("127.0.0.1".parse().unwrap()));
        assert_eq!(parse_ip("0"), Some("0.0.0.0".parse().unwrap()));
        assert_eq!(parse_ip("[::1]"), Some("::1".parse().unwrap()));
        assert_eq!(parse_ip("[::1]:4777"), Some("::1".parse().unwrap()));
        assert_eq!(parse_ip("::1"), Some("::1".parse().unwrap()));
        assert_eq!(parse_ip("10.0.0.0/8"), Some("10.0.0.0".parse().unwrap()));
        assert_eq!(parse_ip("1.2.3.4:99"), None);
        assert_eq!(parse_ip("localhost"), None);
        assert_eq!(parse_ip(""), None);
        assert_eq!(parse_ip("fe80::1%eth0"), Some("fe80::1".parse().unwrap()));
    }

    #[test]
    fn ports_follow_atoi() {
        assert_eq!(parse_port("4777"), Ok(4777));
        assert_eq!(parse_port("4777abc"), Ok(4777));
        assert_eq!(parse_port("abc"), Ok(0));
        assert_eq!(parse_port("65536"), Err(BadPort));
        assert_eq!(parse_port("-1"), Err(BadPort));
        assert_eq!(parse_port("99999999999999999999999"), Err(BadPort));
    }
}
