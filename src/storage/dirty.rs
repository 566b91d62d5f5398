//! Which blocks changed since a migration last sent them, and which changes must reach the
//! destination before their client is answered (active mirroring).
//!
//! The mirror turns tracking on before its first sweep; from then on every completed write,
//! trim or zeroing sets its blocks, *after* the file operation and before the reply. The
//! mirror takes the set bits (one atomic swap per word) and only then reads the data, so a
//! write is either already in the file when its block is read, or sets its bit again and
//! is sent on a later pass: no update can be lost.
//!
//! # Active mirroring
//! While the mirror is active ([`DirtyMap::set_active`]), a change that falls entirely
//! inside the part of the export this attempt has already copied ([`DirtyMap::set_copied`])
//! sets no bits: the session asks for a [`Forward`] instead and answers its client only once
//! the destination holds the range (or, if that failed, once the range is dirty again). The
//! forward carries no data: the mirror reads the range from the file when it sends it, in
//! the same step as it queues the write, so whatever order forwards of overlapping writes
//! arrive in, the last one sent holds what the file holds (see `actors::mirror::run`).
//! This is what makes the dirty set shrink whatever clients do: their writes to copied
//! ranges no longer add to it.
//!
//! The copied prefix only grows within an attempt and active mode only switches on, so the
//! two looks at the state (one when the file operation records, one when the session asks
//! for a forward) can only disagree across an attempt's restart, which starts from a clean
//! map and copies everything again anyway.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::{mpsc, oneshot};

use super::bitmap::{BlockBitmap, BLOCK};

/// Session → mirror: send `[offset, offset + len)` to the destination now, and answer
/// `true` once the destination acknowledged every request that carried it; `false` (or
/// a dropped sender) when it could not, after which the range is marked dirty again.
#[derive(Debug)]
pub struct ForwardRequest {
    pub offset: u64,
    pub len: u64,
    pub done: oneshot::Sender<bool>,
}

#[derive(Debug)]
pub struct DirtyMap {
    bits: BlockBitmap,
    tracking: AtomicBool,
    /// Writes to copied ranges are forwarded rather than marked dirty.
    active: AtomicBool,
    /// `[0, copied)` has been copied at least once in this attempt.
    copied: AtomicU64,
    /// Where forwards go while a mirror is active. Locked only to clone or replace the
    /// sender, never across I/O, and only by writes that are forwarded.
    forwarder: Mutex<Option<mpsc::Sender<ForwardRequest>>>,
}

impl DirtyMap {
    pub fn new(size: u64) -> DirtyMap {
        DirtyMap {
            bits: BlockBitmap::new(size),
            tracking: AtomicBool::new(false),
            active: AtomicBool::new(false),
            copied: AtomicU64::new(0),
            forwarder: Mutex::new(None),
        }
    }

    /// Starts (or restarts) tracking with every block clean and nothing copied.
    pub fn start(&self) {
        self.copied.store(0, Ordering::SeqCst);
        self.bits.clear_all();
        self.tracking.store(true, Ordering::Release);
    }

    /// Stops tracking and forwarding; the bits are left as they are.
    pub fn stop(&self) {
        self.tracking.store(false, Ordering::Release);
        self.active.store(false, Ordering::SeqCst);
        self.copied.store(0, Ordering::SeqCst);
    }

    pub fn is_tracking(&self) -> bool {
        self.tracking.load(Ordering::Acquire)
    }

    /// Switches forwarding on or off (the mirror's copy mode).
    pub fn set_active(&self, active: bool) {
        self.active.store(active, Ordering::SeqCst);
    }

    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::SeqCst)
    }

    /// `[0, copied)` has now been sent at least once in this attempt.
    pub fn set_copied(&self, copied: u64) {
        self.copied.fetch_max(copied, Ordering::SeqCst);
    }

    /// Where forwards go from now on (`None`: nowhere; forwards then mark dirty).
    pub fn set_forwarder(&self, forwarder: Option<mpsc::Sender<ForwardRequest>>) {
        if let Ok(mut slot) = self.forwarder.lock() {
            *slot = forwarder;
        }
    }

    /// Whether a completed change of `[offset, offset + len)` is forwarded rather than
    /// recorded.
    pub fn forwarding(&self, offset: u64, len: u64) -> bool {
        self.is_tracking()
            && self.is_active()
            && offset.saturating_add(len) <= self.copied.load(Ordering::SeqCst)
    }

    /// Records a completed change of `[offset, offset + len)`, unless it is forwarded.
    pub fn record(&self, offset: u64, len: u64) {
        if self.is_tracking() && !self.forwarding(offset, len) {
            self.bits.set_range(offset, len);
        }
    }

    /// Marks `[offset, offset + len)` dirty whatever the mode (a forward that failed).
    pub fn mark(&self, offset: u64, len: u64) {
        if self.is_tracking() {
            self.bits.set_range(offset, len);
        }
    }

    /// For a change of `[offset, offset + len)` that has completed in the file: `None`
    /// when its client may be answered now; otherwise a future that forwards the range to
    /// the mirror and resolves once the destination holds it, or once the range is dirty
    /// again. The future waits while the mirror's queue is full (backpressure).
    pub fn forward(&self, offset: u64, len: u64) -> Option<impl Future<Output = ()> + '_> {
        if len == 0 || !self.forwarding(offset, len) {
            return None;
        }
        let sender = self.forwarder.lock().ok().and_then(|s| s.clone());
        let Some(sender) = sender else {
            self.mark(offset, len);
            return None;
        };
        Some(async move {
            let (done, answer) = oneshot::channel();
            let request = ForwardRequest { offset, len, done };
            let delivered = sender.send(request).await.is_ok() && answer.await == Ok(true);
            if !delivered {
                self.mark(offset, len);
            }
        })
    }

    /// Bytes waiting to be sent (whole blocks).
    pub fn pending_bytes(&self) -> u64 {
        self.bits.count() * BLOCK
    }

    /// Takes dirty ranges, about `max_bytes` of them; see [`BlockBitmap::take_runs`].
    pub fn take(&self, max_bytes: u64) -> Vec<(u64, u64)> {
        self.bits.take_runs(max_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_changes_while_tracking_are_recorded() {
        let map = DirtyMap::new(1 << 20);
        map.record(0, 10);
        assert_eq!(map.pending_bytes(), 0);
        map.start();
        map.record(8192, 10);
        assert_eq!(map.pending_bytes(), BLOCK);
        assert_eq!(map.take(u64::MAX), vec![(8192, BLOCK)]);
        map.record(0, 1);
        map.start();
        assert_eq!(map.pending_bytes(), 0, "a restart begins clean");
        map.stop();
        map.record(0, 1);
        assert_eq!(map.pending_bytes(), 0);
    }

    #[test]
    fn only_changes_inside_the_copied_prefix_are_forwarded() {
        let map = DirtyMap::new(1 << 20);
        map.start();
        map.set_copied(64 * BLOCK);
        assert!(!map.forwarding(0, BLOCK), "background: never forwarded");
        map.set_active(true);
        assert!(map.forwarding(0, BLOCK));
        assert!(map.forwarding(63 * BLOCK, BLOCK));
        assert!(
            !map.forwarding(63 * BLOCK, BLOCK + 1),
            "straddles the copied edge"
        );
        map.record(0, BLOCK);
        map.record(63 * BLOCK, 2 * BLOCK);
        assert_eq!(map.take(u64::MAX), vec![(63 * BLOCK, 2 * BLOCK)]);
        map.set_copied(BLOCK);
        assert!(
            map.forwarding(63 * BLOCK, BLOCK),
            "the prefix never shrinks"
        );
        map.start();
        assert!(
            !map.forwarding(0, BLOCK),
            "a new attempt has copied nothing"
        );
        map.stop();
        map.start();
        map.set_copied(1 << 20);
        assert!(!map.forwarding(0, BLOCK), "stop ends active mode");
    }

    #[tokio::test]
    async fn a_forward_without_a_mirror_marks_the_range_dirty() {
        let map = DirtyMap::new(1 << 20);
        map.start();
        map.set_active(true);
        map.set_copied(1 << 20);
        assert!(map.forward(0, BLOCK).is_none());
        assert_eq!(map.take(u64::MAX), vec![(0, BLOCK)]);
    }

    #[tokio::test]
    async fn a_refused_or_dropped_forward_marks_the_range_dirty() {
        let map = DirtyMap::new(1 << 20);
        map.start();
        map.set_active(true);
        map.set_copied(1 << 20);
        let (tx, mut rx) = mpsc::channel(4);
        map.set_forwarder(Some(tx));
        let mirror = async {
            let ok = rx.recv().await.expect("first");
            assert_eq!((ok.offset, ok.len), (0, BLOCK));
            ok.done.send(true).expect("answer");
            let refused = rx.recv().await.expect("second");
            refused.done.send(false).expect("answer");
            drop(rx.recv().await.expect("third"));
        };
        let sessions = async {
            map.forward(0, BLOCK).expect("forwarded").await;
            assert_eq!(map.pending_bytes(), 0, "acknowledged: nothing dirty");
            map.forward(BLOCK, BLOCK).expect("forwarded").await;
            map.forward(4 * BLOCK, BLOCK).expect("forwarded").await;
        };
        tokio::join!(mirror, sessions);
        assert_eq!(map.take(u64::MAX), vec![(BLOCK, BLOCK), (4 * BLOCK, BLOCK)]);
    }
}
