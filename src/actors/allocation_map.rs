//! The allocation-map builder: walks the backing file's extents in the background.
//!
//! Started after the NBD port is bound, so serving starts at once; the walk runs on the
//! blocking pool and never delays a reply or a `status`. Sessions keep the map true through
//! `Backing::write_at` meanwhile, and nothing consults it before the walk completed.
//!
//! # Handshakes
//! The builder reports through the map's own state (`Building` → `Built` or `Failed`),
//! which `status` reads. [`StopBuilder`] (main → builder, at shutdown) cancels the walk.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;

use crate::storage::Backing;

/// Main → builder, at shutdown: cancel the walk and stop. No answer.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct StopBuilder;

pub struct AllocationMapBuilder {
    backing: Arc<Backing>,
    /// Set when the builder stops; the walk checks it between extents.
    cancel: Arc<AtomicBool>,
}

impl AllocationMapBuilder {
    pub fn new(backing: Arc<Backing>) -> AllocationMapBuilder {
        AllocationMapBuilder {
            backing,
            cancel: Arc::default(),
        }
    }
}

impl Actor for AllocationMapBuilder {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let map = self.backing.allocation().clone();
        let file = match self.backing.file_for_walk() {
            Ok(file) => file,
            Err(e) => {
                map.mark_failed();
                tracing::warn!("Couldn't build the allocation map ({e}); serving without it");
                return;
            }
        };
        let cancel = self.cancel.clone();
        let started = Instant::now();
        let walk = tokio::task::spawn_blocking(move || {
            let result = map.build_from(&file, &cancel);
            (result, map)
        });
        ctx.spawn(walk.into_actor(self).map(move |joined, _, _| match joined {
            Ok((Ok(()), map)) => tracing::info!(
                "Allocation map built in {:?}: {} of {} bytes allocated",
                started.elapsed(),
                map.allocated_bytes().min(map.size()),
                map.size()
            ),
            Ok((Err(e), _)) => {
                tracing::warn!("Couldn't build the allocation map ({e}); serving without it")
            }
            Err(e) => tracing::warn!("The allocation walk failed ({e}); serving without the map"),
        }));
    }

    fn stopping(&mut self, _ctx: &mut Self::Context) -> Running {
        self.cancel.store(true, Ordering::Relaxed);
        Running::Stop
    }
}

impl Handler<StopBuilder> for AllocationMapBuilder {
    type Result = ();

    fn handle(&mut self, _msg: StopBuilder, ctx: &mut Self::Context) {
        ctx.stop();
    }
}
