//! The single-node engine's side of a flush: one batch a flush, the whole dirty set as an
//! exact cut at its checkpoint (see [`MemoryEngine::take_flush`]); once the store has it,
//! the WAL drops what the checkpoint covers.

use super::{Source, Taken};
use crate::engine::{EngineError, FlushTicket, MemoryEngine};

impl Source for MemoryEngine {
    type Ticket = FlushTicket;

    async fn take(&self) -> Result<Option<Taken<FlushTicket>>, EngineError> {
        Ok(self.take_flush().await?.map(|(batch, ticket)| Taken {
            batch,
            ticket,
            last: true,
        }))
    }

    async fn finish(&self, ticket: FlushTicket, written: bool) -> Result<(), EngineError> {
        self.finish_flush(ticket, written);
        Ok(())
    }

    async fn wanted(&self) {
        self.flush_wanted().await
    }

    fn halt(&self, reason: String) {
        self.refuse_writes(reason);
    }

    fn store_behind(&self, stored: u64) {
        MemoryEngine::store_behind(self, stored);
    }
}

#[cfg(test)]
mod tests {
    use crate::domain::{Associate, Create, Delete, Name, PortType, Ports, Serial, Widget};
    use crate::engine::{EngineSettings, MemoryEngine, SequencerPriority};
    use crate::flush::Flusher;
    use crate::store::{FlushBatch, SledStore, Store, StoreError, Visitor};
    use crate::wal::{FsyncMode, RealFs, RecoveryMode};
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::sync::Mutex;
    use std::time::Duration;

    /// The real sled store, with a switch that makes writes fail.
    struct Switchable {
        inner: SledStore,
        down: AtomicBool,
    }

    impl Store for Switchable {
        async fn load(&self, visit: Visitor) -> Result<u64, StoreError> {
            self.inner.load(visit).await
        }

        async fn len_hint(&self) -> Result<u64, StoreError> {
            self.inner.len_hint().await
        }

        async fn identity(&self) -> Result<Option<String>, StoreError> {
            self.inner.identity().await
        }

        async fn set_identity(&self, identity: &str) -> Result<(), StoreError> {
            self.inner.set_identity(identity).await
        }

        async fn write_batch(&self, batch: FlushBatch) -> Result<(), StoreError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(StoreError::Task("store switched off by the test".into()));
            }
            self.inner.write_batch(batch).await
        }
    }

    fn settings() -> EngineSettings {
        EngineSettings {
            fsync: FsyncMode::Always,
            fsync_interval: Duration::from_secs(1),
            commit_delay: Duration::ZERO,
            wal_segment_bytes: 1024,
            wal_preallocate: true,
            flush_nice: 10,
            sequencer_priority: SequencerPriority::Normal,
            wal_max_bytes: 1 << 30,
            wal_recovery: RecoveryMode::Strict,
            queue_depth: 1024,
            max_dirty: 1 << 20,
            flush_batch_size: 1 << 20,
            accept_mismatched_wal: false,
        }
    }

    /// Creates `serial` with port P.
    async fn create(engine: &MemoryEngine, serial: &str) {
        let create = Create {
            serial: s(serial),
            name: Name::parse("n", "widget").unwrap(),
            ports: Ports::from_list("p", &[PortType::P]).unwrap(),
        };
        engine.execute(create).await.unwrap();
    }

    /// Plugs w0 into w1 on P and deletes w2: one association change, one deletion.
    async fn plug_w0_and_delete_w2(engine: &MemoryEngine) {
        let assoc = Associate {
            port: PortType::P,
            serial: s("w0"),
            peer: s("w1"),
        };
        engine.execute(assoc).await.unwrap();
        engine.execute(Delete { serial: s("w2") }).await.unwrap();
    }

    fn s(x: &str) -> Serial {
        Serial::parse("s", x).unwrap()
    }

    async fn stored(store: &SledStore) -> (HashMap<Serial, Widget>, u64) {
        let all = Arc::new(Mutex::new(HashMap::new()));
        let sink = all.clone();
        let checkpoint = store
            .load(Box::new(move |serial, w| {
                sink.lock().unwrap().insert(serial, w);
            }))
            .await
            .unwrap();
        let map = std::mem::take(&mut *all.lock().unwrap());
        (map, checkpoint)
    }

    #[tokio::test]
    async fn flush_once_writes_current_state_and_checkpoint_then_trims_the_wal() {
        let dir = tempfile::TempDir::new().unwrap();
        let wal_dir = dir.path().join("wal");
        let sled = SledStore::open(&dir.path().join("store"), 1 << 20).unwrap();
        let store = Arc::new(Switchable {
            inner: sled.clone(),
            down: AtomicBool::new(false),
        });
        let engine = Arc::new(
            MemoryEngine::recover(&*store, &wal_dir, Arc::new(RealFs), settings())
                .await
                .unwrap(),
        );
        let flusher = Flusher::new(engine.clone(), store.clone());
        assert_eq!(flusher.flush_once().await.unwrap(), 0, "nothing dirty yet");

        for i in 0..30 {
            create(&engine, &format!("w{i}")).await;
        }
        plug_w0_and_delete_w2(&engine).await;
        let segments = || {
            std::fs::read_dir(&wal_dir)
                .unwrap()
                .filter(|e| e.as_ref().unwrap().path().extension() == Some("wal".as_ref()))
                .count()
        };
        let segments_before = segments();
        assert!(segments_before > 1, "the test needs a rotated WAL");

        // The store is down: nothing is lost, the serials stay dirty, the WAL stays.
        store.down.store(true, Ordering::SeqCst);
        assert!(flusher.flush_once().await.is_err());
        assert_eq!(engine.dirty_len(), 30);
        assert_eq!(engine.checkpoint(), 0);

        store.down.store(false, Ordering::SeqCst);
        assert_eq!(
            flusher.flush_once().await.unwrap(),
            30,
            "29 widgets and one deletion"
        );
        assert!(engine.dirty_len() == 0);
        let (widgets, checkpoint) = stored(&sled).await;
        assert_eq!(checkpoint, 32);
        assert_eq!(widgets.len(), 29);
        assert!(!widgets.contains_key(&s("w2")));
        assert_eq!(widgets[&s("w0")].peer(PortType::P), Some(&s("w1")));
        assert_eq!(widgets[&s("w1")].peer(PortType::P), Some(&s("w0")));
        assert_eq!(
            widgets[&s("w1")].version,
            31,
            "a widget's version is the LSN that last touched it"
        );

        // The trim runs on the sequencer thread after the checkpoint; stop() waits for it.
        tokio::task::spawn_blocking({
            let engine = engine.clone();
            move || engine.stop()
        })
        .await
        .unwrap();
        assert_eq!(segments(), 1, "only the active segment is left");
    }

    /// The nice values of this process's threads named `name` (as the kernel keeps it: its
    /// first 15 bytes).
    #[cfg(target_os = "linux")]
    fn nice_of_threads(name: &str) -> Vec<i64> {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|task| {
                let path = task.ok()?.path();
                let comm = std::fs::read_to_string(path.join("comm")).ok()?;
                (comm.trim_end() == &name[..name.len().min(15)]).then_some(())?;
                let stat = std::fs::read_to_string(path.join("stat")).ok()?;
                let after_name = &stat[stat.rfind(')')? + 2..];
                after_name.split(' ').nth(16)?.parse().ok()
            })
            .collect()
    }

    /// A flush's batch is built on a thread of the engine's own at `--flush-nice` (10
    /// here), not on tokio's blocking pool at the requests' priority.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn flush_batches_are_built_at_the_flush_nice_value() {
        let dir = tempfile::TempDir::new().unwrap();
        let sled = SledStore::open(&dir.path().join("store"), 1 << 20).unwrap();
        let engine = Arc::new(
            MemoryEngine::recover(&sled, &dir.path().join("wal"), Arc::new(RealFs), settings())
                .await
                .unwrap(),
        );
        create(&engine, "w0").await;
        let flusher = Flusher::new(engine.clone(), Arc::new(sled));
        assert_eq!(flusher.flush_once().await.unwrap(), 1);
        let niced = nice_of_threads("widgets-flush-prep");
        assert!(!niced.is_empty(), "no flush thread");
        assert!(niced.iter().all(|&nice| nice >= 10), "{niced:?}");
        tokio::task::spawn_blocking(move || engine.stop())
            .await
            .unwrap();
    }

    /// The embedded store writes a large flush in chunks, the checkpoint with the last (see
    /// `store::sled`): a crash between chunks leaves widgets newer than the checkpoint, here
    /// one side of an association. Start-up replays the WAL above the checkpoint over them
    /// and must end where the writes did.
    #[tokio::test]
    async fn a_store_cut_short_between_chunks_recovers_from_the_wal() {
        let dir = tempfile::TempDir::new().unwrap();
        let wal_dir = dir.path().join("wal");
        let sled = SledStore::open(&dir.path().join("store"), 1 << 20).unwrap();
        let engine = MemoryEngine::recover(&sled, &wal_dir, Arc::new(RealFs), settings())
            .await
            .unwrap();
        let engine = Arc::new(engine);
        let flusher = Flusher::new(engine.clone(), Arc::new(sled.clone()));
        for serial in ["w0", "w1", "w2"] {
            create(&engine, serial).await;
        }
        flusher.flush_once().await.unwrap();
        assert_eq!(stored(&sled).await.1, 3);
        plug_w0_and_delete_w2(&engine).await;
        // The first chunk of the next flush got in (w0 and the deletion), then the crash.
        let first_chunk = FlushBatch {
            items: vec![
                crate::store::FlushItem {
                    serial: s("w0"),
                    mark: Default::default(),
                    widget: engine.get(&s("w0")),
                    version: 4,
                },
                crate::store::FlushItem {
                    serial: s("w2"),
                    mark: Default::default(),
                    widget: None,
                    version: 5,
                },
            ],
            checkpoint: None,
            widgets: None,
            redis: None,
        };
        sled.write_batch(first_chunk).await.unwrap();
        tokio::task::spawn_blocking({
            let engine = engine.clone();
            move || engine.stop()
        })
        .await
        .unwrap();
        drop((flusher, engine));
        let (widgets, checkpoint) = stored(&sled).await;
        assert_eq!(
            checkpoint, 3,
            "the checkpoint is still the last whole flush's"
        );
        assert_eq!(widgets[&s("w0")].peer(PortType::P), Some(&s("w1")));
        assert_eq!(widgets[&s("w1")].peer(PortType::P), None, "one side only");

        let engine = MemoryEngine::recover(&sled, &wal_dir, Arc::new(RealFs), settings())
            .await
            .unwrap();
        let engine = Arc::new(engine);
        assert_eq!(
            engine.get(&s("w1")).unwrap().peer(PortType::P),
            Some(&s("w0"))
        );
        assert!(engine.get(&s("w2")).is_none());
        Flusher::new(engine.clone(), Arc::new(sled.clone()))
            .flush_once()
            .await
            .unwrap();
        let (widgets, checkpoint) = stored(&sled).await;
        assert_eq!(checkpoint, 5);
        assert_eq!(widgets.len(), 2);
        assert_eq!(widgets[&s("w0")].peer(PortType::P), Some(&s("w1")));
        assert_eq!(widgets[&s("w1")].peer(PortType::P), Some(&s("w0")));
        tokio::task::spawn_blocking(move || engine.stop())
            .await
            .unwrap();
    }

    /// Under `--fsync interval` a write is acknowledged before its record is synced. Once
    /// a sync has failed, the log is not synced again and may have lost those records: the
    /// store is then their only durable copy, so a flush still writes them there. The
    /// flush's own sync of the log (`Job::Sync`) refused every flush from then on, and the
    /// writes stayed in memory alone.
    #[tokio::test]
    async fn after_a_failed_wal_sync_acknowledged_writes_still_reach_the_store() {
        let dir = tempfile::TempDir::new().unwrap();
        let sled = SledStore::open(&dir.path().join("store"), 1 << 20).unwrap();
        let fs = crate::wal::FaultyFs::new();
        let settings = EngineSettings {
            fsync: FsyncMode::Interval,
            fsync_interval: Duration::from_millis(50),
            ..settings()
        };
        let engine = Arc::new(
            MemoryEngine::recover(
                &sled,
                &dir.path().join("wal"),
                Arc::new(fs.clone()),
                settings,
            )
            .await
            .unwrap(),
        );
        fs.set(crate::wal::Fault::SyncError);
        for serial in ["a", "b", "c"] {
            create(&engine, serial).await;
        }
        for _ in 0..100 {
            if engine.failure().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            engine.failure().is_some(),
            "the interval's sync did not fail"
        );
        fs.set(crate::wal::Fault::None);

        let flusher = Flusher::new(engine.clone(), Arc::new(sled.clone()));
        let flushed = flusher.flush_once().await;
        let (stored, _) = stored(&sled).await;
        assert_eq!(stored.len(), 3, "the flush: {flushed:?}");
        let stopping = engine.clone();
        tokio::task::spawn_blocking(move || stopping.stop())
            .await
            .unwrap();
    }
}
