//! The embedded store: one sled tree, serial -> bincode-encoded widget, plus the checkpoint
//! LSN under a key no serial can have. A flush is one `apply_batch` (atomic in sled) and
//! one `flush` (durable).

use super::{FlushBatch, Store, StoreError, Visitor};
use crate::domain::{Serial, Widget};
use std::path::Path;

/// Serials never contain a NUL byte, so this key cannot collide with a widget.
const CHECKPOINT_KEY: &[u8] = b"\0checkpoint";

#[derive(Clone)]
pub struct SledStore {
    db: sled::Db,
}

impl SledStore {
    /// Opens (or creates) the store in `path`; `cache_bytes` bounds sled's page cache.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .open()?;
        Ok(Self { db })
    }

    fn load_blocking(&self, mut visit: Visitor) -> Result<u64, StoreError> {
        let mut checkpoint = 0;
        let mut loaded = 0u64;
        for entry in self.db.iter() {
            let (key, value) = entry?;
            if &*key == CHECKPOINT_KEY {
                checkpoint = u64::from_be_bytes(value.as_ref().try_into().map_err(|_| {
                    StoreError::Corrupt {
                        key: "checkpoint".into(),
                        reason: format!("{} bytes, expected 8", value.len()),
                    }
                })?);
                continue;
            }
            let corrupt = |reason: String| StoreError::Corrupt {
                key: String::from_utf8_lossy(&key).into_owned(),
                reason,
            };
            let serial = std::str::from_utf8(&key)
                .map_err(|e| corrupt(e.to_string()))
                .and_then(|s| Serial::parse("key", s).map_err(|e| corrupt(e.to_string())))?;
            let (widget, _): (Widget, usize) =
                bincode::serde::decode_from_slice(&value, bincode::config::standard())
                    .map_err(|e| corrupt(e.to_string()))?;
            visit(serial, widget);
            loaded += 1;
            if loaded % 1_000_000 == 0 {
                tracing::info!(loaded, "loading widgets from the embedded store");
            }
        }
        Ok(checkpoint)
    }

    fn write_blocking(&self, batch: FlushBatch) -> Result<(), StoreError> {
        let mut b = sled::Batch::default();
        // A key-value store keeps whole widgets, so every changed widget is written whole.
        for item in &batch.items {
            let key = item.serial.as_str().as_bytes();
            match &item.widget {
                Some(w) => {
                    let value = bincode::serde::encode_to_vec(w, bincode::config::standard())
                        .expect("encoding a widget into memory");
                    b.insert(key, value);
                }
                None => b.remove(key),
            }
        }
        b.insert(CHECKPOINT_KEY, &batch.checkpoint.to_be_bytes());
        self.db.apply_batch(b)?;
        self.db.flush()?;
        Ok(())
    }
}

impl Store for SledStore {
    async fn load(&self, visit: Visitor) -> Result<u64, StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.load_blocking(visit))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    async fn write_batch(&self, batch: FlushBatch) -> Result<(), StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.write_blocking(batch))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }
}
