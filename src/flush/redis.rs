//! Redis mode's side of a flush, run by a flusher in every instance, safe to run
//! concurrently.
//!
//! Each round takes a batch of dirty widgets with their state (atomically), every change
//! in it whole: both ends of an association and the peers it freed, so PostgreSQL never
//! shows one side of an association (see [`crate::engine::redis::RedisEngine::take`]). The flusher
//! writes it to PostgreSQL, and only after the commit is each serial removed from Redis's
//! dirty set, and only if its entry has not moved since it was taken. A flusher that dies
//! before its commit or between its commit and that removal loses nothing: the serials are
//! still dirty and the next round writes them again (an idempotent write). PostgreSQL's
//! version guards stop a slow flusher from writing older state over what a faster one
//! wrote. A batch PostgreSQL did not commit needs no handing back: it never left the set.

use super::{Source, Taken};
use crate::engine::redis::{Acks, RedisEngine};
use crate::engine::EngineError;
use std::sync::Arc;

/// Most widgets one round picks: each take is one script, and a script blocks Redis while
/// it runs, so rounds stay small. The other widgets of the picked widgets' changes come
/// along (so every change commits whole), which can make a round larger.
const MAX_ROUND: usize = 2000;

/// The Redis engine, taken from in rounds of at most `round` widgets.
pub struct RedisSource {
    engine: Arc<RedisEngine>,
    round: usize,
}

impl RedisSource {
    /// Rounds of `batch` widgets, but at most 2,000.
    pub fn new(engine: Arc<RedisEngine>, batch: usize) -> Self {
        Self {
            engine,
            round: batch.clamp(1, MAX_ROUND),
        }
    }
}

impl Source for RedisSource {
    type Ticket = Acks;

    async fn take(&self) -> Result<Option<Taken<Acks>>, EngineError> {
        Ok(self
            .engine
            .take_flush(self.round)
            .await?
            .map(|(batch, acks)| Taken {
                batch,
                last: acks.whole_set_at.is_some(),
                ticket: acks,
            }))
    }

    async fn finish(&self, acks: Acks, written: bool) -> Result<(), EngineError> {
        if written {
            self.engine.finish_flush(&acks).await?;
        }
        Ok(())
    }

    async fn wanted(&self) {
        // Redis mode flushes on the interval only.
        std::future::pending().await
    }

    fn halt(&self, reason: String) {
        // Redis-mode instances all write; none is ever fenced off.
        tracing::error!(%reason, "the store refused this instance for good");
    }
}
