//! One thread that does the long buffered writes into the export, in arrival order.
//!
//! Linux serialises buffered writes to one file on its inode lock (ext4, tmpfs and XFS all
//! take it exclusively for a buffered write), so writing one file from several threads
//! buys no parallelism: the threads of the blocking pool only spun and slept on that lock
//! (`rwsem_spin_on_owner` and context switches in the profile of nbdcopy writing over two
//! connections) and woke each other through the pool's condition variable. One thread per
//! export, fed by a channel, does the same writes without the contention, and while it has
//! work queued it does not sleep between jobs.
//!
//! This is a plain thread, not an actor: a buffered write may block, and it must not block
//! an arbiter. Sessions submit jobs that write and then hand their reply to the session's
//! writer task themselves, exactly as a blocking-pool job does.
//!
//! What goes through it: WRITEs and WRITE parts that do not need a sync and are too long to
//! be done inline (see `Session::write`). Writes with FUA or `--sync-writes` stay on the
//! blocking pool, where several `RWF_DSYNC` writes can wait for the disk together.
//!
//! Lifetime: the thread ends when the last handle is dropped (every session config that
//! holds it is gone) and its queue is empty. Shutdown needs nothing more: a session answers
//! a WRITE only after its job has run, and the server syncs the file only after every
//! session has drained.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;

/// A write to do, and whatever it does afterwards (sending the reply).
pub type WriteJob = Box<dyn FnOnce() + Send>;

/// The handle sessions submit jobs through.
#[derive(Debug)]
pub struct WriteQueue {
    jobs: mpsc::Sender<WriteJob>,
}

impl WriteQueue {
    /// Starts the thread.
    pub fn start() -> std::io::Result<WriteQueue> {
        let (jobs, queue) = mpsc::channel::<WriteJob>();
        std::thread::Builder::new()
            .name("flexnbd-writes".into())
            .spawn(move || run(queue))?;
        Ok(WriteQueue { jobs })
    }

    /// Queues `job`. If the thread is gone (it cannot be, short of a bug) the job comes
    /// back, for the caller to run elsewhere.
    pub fn submit(&self, job: WriteJob) -> Result<(), WriteJob> {
        self.jobs.send(job).map_err(|mpsc::SendError(job)| job)
    }
}

fn run(queue: mpsc::Receiver<WriteJob>) {
    while let Ok(job) = queue.recv() {
        // A job that panics loses its own reply (its permits are released as it unwinds),
        // as on the blocking pool; the queue goes on for everybody else.
        if catch_unwind(AssertUnwindSafe(job)).is_err() {
            tracing::error!("A write job panicked; its request gets no reply");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn jobs_run_in_order_and_survive_a_panicking_one() {
        let queue = WriteQueue::start().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (done_tx, done_rx) = mpsc::channel();
        for i in 0..50 {
            let seen = seen.clone();
            let done = done_tx.clone();
            let job: WriteJob = Box::new(move || {
                if i == 10 {
                    panic!("job 10 fails");
                }
                seen.lock().unwrap().push(i);
                let _ = done.send(i);
            });
            assert!(queue.submit(job).is_ok());
        }
        for _ in 0..49 {
            done_rx
                .recv_timeout(std::time::Duration::from_secs(10))
                .expect("a job did not run");
        }
        let expected: Vec<i32> = (0..50).filter(|&i| i != 10).collect();
        assert_eq!(*seen.lock().unwrap(), expected);
    }
}
