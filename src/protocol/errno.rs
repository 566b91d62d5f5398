//! Error values carried in NBD replies.
//!
//! NBD replies carry Linux errno numbers. We keep our own small type instead of `libc`
//! constants so that the protocol module stays free of platform crates and so that the set
//! of values we ever put on the wire is visible in one place.

/// An error value as it travels in a reply's `error` field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Errno(pub u32);

impl Errno {
    pub const EPERM: Errno = Errno(1);
    pub const EIO: Errno = Errno(5);
    pub const ENOMEM: Errno = Errno(12);
    pub const EINVAL: Errno = Errno(22);
    pub const ENOSPC: Errno = Errno(28);
    pub const EBADMSG: Errno = Errno(74);
    pub const EOVERFLOW: Errno = Errno(75);
    pub const ENOTSUP: Errno = Errno(95);
    pub const ESHUTDOWN: Errno = Errno(108);

    /// Maps an OS error from a file operation to the value we tell the client.
    ///
    /// NBD only defines a handful of values; anything we cannot express precisely becomes
    /// EIO, which every client treats as "the operation failed".
    pub fn from_os_error(raw: Option<i32>) -> Errno {
        match raw {
            Some(1) | Some(13) => Errno::EPERM, // EPERM, EACCES
            Some(12) => Errno::ENOMEM,
            Some(28) | Some(122) => Errno::ENOSPC, // ENOSPC, EDQUOT
            Some(22) => Errno::EINVAL,
            Some(75) => Errno::EOVERFLOW,
            Some(95) => Errno::ENOTSUP,
            _ => Errno::EIO,
        }
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match *self {
            Errno::EPERM => "EPERM",
            Errno::EIO => "EIO",
            Errno::ENOMEM => "ENOMEM",
            Errno::EINVAL => "EINVAL",
            Errno::ENOSPC => "ENOSPC",
            Errno::EBADMSG => "EBADMSG",
            Errno::EOVERFLOW => "EOVERFLOW",
            Errno::ENOTSUP => "ENOTSUP",
            Errno::ESHUTDOWN => "ESHUTDOWN",
            _ => return write!(f, "errno {}", self.0),
        };
        write!(f, "{name} ({})", self.0)
    }
}
