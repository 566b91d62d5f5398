//! The pure decisions of a proxy session: what to do with a client's request (flexnbd §12.3),
//! what it costs in the session's memory budget, and the prefetch cache (§12.5).

use bytes::Bytes;

use crate::protocol::{Command, Request};

/// Largest READ or WRITE a client may send (flexnbd's `NBD_MAX_SIZE`); exactly this much is
/// allowed. Larger ones end the session, as in C.
pub const MAX_REQUEST: u64 = 32 << 20;

/// What the session does with a request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send it upstream after reading `payload` bytes from the client.
    Forward { payload: u64 },
    /// The client is done: answer what is in flight, then end the session (not forwarded).
    Disconnect,
    /// A READ or WRITE over [`MAX_REQUEST`]: end the session.
    TooLong,
}

/// Decides what to do with `request`, whose payload is `payload` bytes on the wire.
pub fn verdict(request: &Request, payload: u64) -> Verdict {
    match request.command {
        Command::Disconnect => Verdict::Disconnect,
        Command::Read | Command::Write if request.length > MAX_REQUEST => Verdict::TooLong,
        _ if payload > MAX_REQUEST => Verdict::TooLong,
        _ => Verdict::Forward { payload },
    }
}

/// Bytes of the session's budget a request holds from the moment it is read until its reply
/// has been written to the client: its payload, or the data of its reply (twice the length
/// for a READ that may be prefetched). Never more than [`MAX_REQUEST`], so a request always
/// fits a budget of at least that much.
pub fn cost(request: &Request, payload: u64, cache: &Cache) -> u64 {
    let data = match request.command {
        Command::Read if cache.would_prefetch(request.offset, request.length) => request.length * 2,
        Command::Read => request.length,
        _ => payload,
    };
    data.min(MAX_REQUEST)
}

/// The prefetch cache: after a READ of `len` at `from` the proxy asks upstream for `2·len`,
/// answers the client with the first half and keeps `[from+len, from+2·len)` here, so that
/// a sequential reader's next READ is answered without a round trip.
///
/// Pipelining adds one rule to flexnbd's: a prefetch's second half is kept only if no other
/// request than a READ was received since the prefetch was sent ([`Cache::generation`]),
/// because a WRITE sent meanwhile may have changed the range before or after upstream read
/// it. Any non-READ empties the cache, and so does a reconnect.
#[derive(Debug)]
pub struct Cache {
    capacity: u64,
    /// The upstream export size: a prefetch never reads past it.
    size: u64,
    from: u64,
    data: Bytes,
    generation: u64,
}

impl Cache {
    /// A cache of `capacity` bytes (0: disabled) for an export of `size` bytes.
    pub fn new(capacity: usize, size: u64) -> Cache {
        Cache {
            capacity: capacity as u64,
            size,
            from: 0,
            data: Bytes::new(),
            generation: 0,
        }
    }

    /// The data of `[from, from+len)` if all of it is cached.
    pub fn lookup(&self, from: u64, len: u64) -> Option<Bytes> {
        let start = from.checked_sub(self.from)?;
        let end = start.checked_add(len)?;
        if len == 0 || end > self.data.len() as u64 {
            return None;
        }
        Some(self.data.slice(start as usize..end as usize))
    }

    /// True if a READ of `len` at `from` that missed should fetch `2·len`: `0 < len ≤
    /// capacity`, `from + 2·len` neither overflows nor passes the export's end, and
    /// `2·len ≤` [`MAX_REQUEST`] (flexnbd §12.5, with C's buffer overflow corrected).
    pub fn would_prefetch(&self, from: u64, len: u64) -> bool {
        let Some(double) = len.checked_mul(2) else {
            return false;
        };
        len > 0
            && len <= self.capacity
            && double <= MAX_REQUEST
            && from.checked_add(double).is_some_and(|end| end <= self.size)
    }

    /// The generation a prefetch records when it is sent.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// A request other than a READ was received: what is cached may be stale, and so may
    /// every prefetch in flight.
    pub fn invalidate(&mut self) {
        self.generation += 1;
        self.clear();
    }

    /// Empties the cache (a reconnect).
    pub fn clear(&mut self) {
        self.data = Bytes::new();
        self.from = 0;
    }

    /// A prefetch of `2·len` at `from`, sent in `generation`, was answered with `data`:
    /// returns the client's half and keeps the other, if nothing was written since.
    pub fn fill(&mut self, from: u64, len: u64, data: Bytes, generation: u64) -> Bytes {
        let half = (len as usize).min(data.len());
        if generation == self.generation && data.len() as u64 == len * 2 {
            self.from = from + len;
            self.data = data.slice(half..);
        }
        data.slice(..half)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(command: Command, offset: u64, length: u64) -> Request {
        Request {
            flags: 0,
            command,
            cookie: 7,
            offset,
            length,
        }
    }

    #[test]
    fn the_32_mib_limit_ends_the_session_only_above_it() {
        let ok = verdict(&req(Command::Write, 0, MAX_REQUEST), MAX_REQUEST);
        assert_eq!(
            ok,
            Verdict::Forward {
                payload: MAX_REQUEST
            }
        );
        assert_eq!(
            verdict(&req(Command::Write, 0, MAX_REQUEST + 1), MAX_REQUEST + 1),
            Verdict::TooLong
        );
        assert_eq!(
            verdict(&req(Command::Read, 0, MAX_REQUEST + 1), 0),
            Verdict::TooLong
        );
        assert_eq!(
            verdict(&req(Command::Read, 0, MAX_REQUEST), 0),
            Verdict::Forward { payload: 0 }
        );
        // Trims and zeroes carry no data: any length is forwarded.
        assert_eq!(
            verdict(&req(Command::Trim, 0, 1 << 40), 0),
            Verdict::Forward { payload: 0 }
        );
        assert_eq!(
            verdict(&req(Command::Disconnect, 0, 0), 0),
            Verdict::Disconnect
        );
        assert_eq!(
            verdict(&req(Command::Unknown(99), 0, 5), 0),
            Verdict::Forward { payload: 0 }
        );
    }

    #[test]
    fn costs_are_bounded_by_the_request_limit() {
        let off = Cache::new(0, 1 << 30);
        let on = Cache::new(16 << 20, 1 << 30);
        assert_eq!(cost(&req(Command::Write, 0, 4096), 4096, &off), 4096);
        assert_eq!(cost(&req(Command::Read, 0, 4096), 0, &off), 4096);
        assert_eq!(cost(&req(Command::Read, 0, 4096), 0, &on), 8192);
        assert_eq!(cost(&req(Command::Flush, 0, 0), 0, &on), 0);
        assert_eq!(cost(&req(Command::Read, 0, 16 << 20), 0, &on), MAX_REQUEST);
    }

    #[test]
    fn a_prefetch_serves_the_next_sequential_read() {
        let mut cache = Cache::new(4096, 1 << 20);
        assert!(cache.would_prefetch(0, 4096));
        let data: Bytes = (0..8192u32).map(|i| i as u8).collect::<Vec<_>>().into();
        let first = cache.fill(0, 4096, data.clone(), cache.generation());
        assert_eq!(first, data.slice(..4096));
        assert_eq!(cache.lookup(4096, 4096), Some(data.slice(4096..)));
        assert_eq!(cache.lookup(5000, 100), Some(data.slice(5000..5100)));
        assert_eq!(cache.lookup(4000, 200), None, "starts before the cache");
        assert_eq!(cache.lookup(8000, 200), None, "ends after it");
        assert_eq!(cache.lookup(4096, 0), None);
        cache.invalidate();
        assert_eq!(cache.lookup(4096, 4096), None, "a write empties it");
    }

    #[test]
    fn a_write_during_a_prefetch_keeps_its_half_out() {
        let mut cache = Cache::new(4096, 1 << 20);
        let sent = cache.generation();
        cache.invalidate();
        let half = cache.fill(0, 4096, Bytes::from(vec![1u8; 8192]), sent);
        assert_eq!(half.len(), 4096);
        assert_eq!(cache.lookup(4096, 4096), None);
    }

    #[test]
    fn prefetch_limits() {
        let cache = Cache::new(64 << 20, 1 << 30);
        assert!(
            cache.would_prefetch(0, 16 << 20),
            "2·len = 32 MiB is allowed"
        );
        assert!(
            !cache.would_prefetch(0, (16 << 20) + 512),
            "2·len over 32 MiB would overflow C's buffer"
        );
        assert!(!cache.would_prefetch(0, 0));
        assert!(
            !cache.would_prefetch((1 << 30) - 4096, 4096),
            "past the end"
        );
        assert!(
            cache.would_prefetch((1 << 30) - 8192, 4096),
            "up to the end"
        );
        assert!(!cache.would_prefetch(u64::MAX - 10, 4096), "overflow");
        let small = Cache::new(4096, 1 << 30);
        assert!(!small.would_prefetch(0, 4097), "larger than the cache");
    }
}
