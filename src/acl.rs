//! Access control lists (`flexnbd-compat.md` §8).

use std::net::IpAddr;

use crate::addr::{atoi, parse_ip};

/// One entry: an address and how many leading bits must match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AclEntry {
    pub addr: IpAddr,
    pub bits: u8,
}

/// An entry that could not be parsed; the text is what the operator wrote.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("Bad ACL entry '{0}'")]
pub struct BadAclEntry(pub String);

impl AclEntry {
    /// Parses `ADDR` or `ADDR/BITS`; BITS must be 1..=32 (IPv4) or 1..=128 (IPv6).
    pub fn parse(text: &str) -> Result<AclEntry, BadAclEntry> {
        let bad = || BadAclEntry(text.to_owned());
        let addr = parse_ip(text).ok_or_else(bad)?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bits = match text.split_once('/') {
            None => max,
            Some((_, after)) => {
                let bits = atoi(after);
                if !(1..=i64::from(max)).contains(&bits) {
                    return Err(bad());
                }
                bits as u8
            }
        };
        Ok(AclEntry { addr, bits })
    }

    /// Families never cross-match: an IPv4 client seen as `::ffff:a.b.c.d` on an IPv6
    /// socket does not match IPv4 entries, as in flexnbd.
    pub fn matches(&self, peer: &IpAddr) -> bool {
        match (self.addr, peer) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.bits),
            (IpAddr::V6(net), IpAddr::V6(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.bits),
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let full = usize::from(bits / 8);
    if a[..full] != b[..full] {
        return false;
    }
    let rest = bits % 8;
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    a[full] & mask == b[full] & mask
}

/// The list and the default that applies when it is empty.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acl {
    entries: Vec<AclEntry>,
    default_deny: bool,
}

impl Acl {
    /// Parses every entry; the first bad one is the error.
    pub fn parse<S: AsRef<str>>(entries: &[S], default_deny: bool) -> Result<Acl, BadAclEntry> {
        let entries = entries
            .iter()
            .map(|e| AclEntry::parse(e.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Acl {
            entries,
            default_deny,
        })
    }

    /// A non-empty list admits exactly the peers some entry matches; an empty one admits
    /// everybody unless `--default-deny` was given.
    pub fn allows(&self, peer: &IpAddr) -> bool {
        if self.entries.is_empty() {
            return !self.default_deny;
        }
        self.entries.iter().any(|e| e.matches(peer))
    }

    pub fn default_deny(&self) -> bool {
        self.default_deny
    }

    pub fn entries(&self) -> &[AclEntry] {
        &self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn entries_parse_like_flexnbd() {
        assert_eq!(AclEntry::parse("10.0.0.0/8").unwrap().bits, 8);
        assert_eq!(AclEntry::parse("127.0.0.1").unwrap().bits, 32);
        assert_eq!(AclEntry::parse("::1").unwrap().bits, 128);
        assert_eq!(AclEntry::parse("[fd00::]/8").unwrap().bits, 8);
        for bad in [
            "10.0.0.0/0",
            "10.0.0.0/33",
            "::/129",
            "1.2.3.4/x",
            "host",
            "10.0.0.0/-1",
        ] {
            assert_eq!(AclEntry::parse(bad), Err(BadAclEntry(bad.into())), "{bad}");
        }
    }

    #[test]
    fn matching_by_prefix_and_family() {
        let acl = Acl::parse(&["10.1.0.0/17", "fd00::/8"], false).unwrap();
        assert!(acl.allows(&ip("10.1.127.255")));
        assert!(!acl.allows(&ip("10.1.128.0")));
        assert!(acl.allows(&ip("fd12::1")));
        assert!(!acl.allows(&ip("fe00::1")));
        assert!(
            !acl.allows(&ip("::ffff:10.1.0.1")),
            "no IPv4-mapped matching"
        );
    }

    #[test]
    fn empty_list_follows_default_deny() {
        assert!(Acl::parse::<&str>(&[], false)
            .unwrap()
            .allows(&ip("1.2.3.4")));
        assert!(!Acl::parse::<&str>(&[], true)
            .unwrap()
            .allows(&ip("1.2.3.4")));
        assert!(Acl::parse(&["1.2.3.4"], true)
            .unwrap()
            .allows(&ip("1.2.3.4")));
    }
}
