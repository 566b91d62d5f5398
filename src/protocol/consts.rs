//! Magic numbers and flag bits of the NBD protocol (`shared/spec/nbd-protocol.md` §1, §4, §5).

/// `NBDMAGIC`: the first eight bytes of every handshake.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// The old-style handshake's second magic (`cliserv_magic`).
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// `IHAVEOPT`: the new-style handshake's second magic and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;

/// Magic of the 28-byte compact request header.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of the 32-byte extended request header.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of the 16-byte simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a 20-byte structured reply chunk header.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of a 32-byte extended reply chunk header.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Length of the old-style hello.
pub const OLDSTYLE_HELLO_LEN: usize = 152;
/// Length of a compact request header.
pub const COMPACT_REQUEST_LEN: usize = 28;
/// Length of an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;

/// Transmission flags, sent with the export size.
pub mod tflags {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_RESIZE: u16 = 1 << 9;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
    pub const BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

    /// What C flexnbd advertises, and what old-style keeps advertising: 13.
    pub const FLEXNBD_COMPAT: u16 = HAS_FLAGS | SEND_FLUSH | SEND_FUA;
}

/// Command flags, carried in every request header.
pub mod cflags {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Command numbers (the `type` field of a request).
pub mod cmd {
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const DISC: u16 = 2;
    pub const FLUSH: u16 = 3;
    pub const TRIM: u16 = 4;
    pub const CACHE: u16 = 5;
    pub const WRITE_ZEROES: u16 = 6;
    pub const BLOCK_STATUS: u16 = 7;
}
