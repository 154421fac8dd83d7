//! `widgets bench-seed`: fills an empty durable store with N widgets straight through the
//! store's own write path, so memory and start-up can be measured at 10 million widgets
//! without first pushing 10 million creates and associations through HTTP.
//!
//! Widget `i` is `seed-<i, 10 digits>` with ports P, R and Q; widgets `2k` and `2k + 1`
//! are associated on P and on R, so every widget has two associations and one free port.
//! Everything is written at version 1 with checkpoint 1: the service then starts with an
//! empty WAL and its next write is LSN 2. Widgets go in the store's own order
//! ([`Store::write_order`]), so a seed cut short may leave one of a pair without the other:
//! seed again into a new store.
//!
//! An admin command like `migrate`: the caller (`main`) opens the store and hands it over,
//! so seeding writes through exactly the store the service will load.

use crate::domain::{Mark, Name, PortType, Ports, Serial, Widget};
use crate::store::{FlushBatch, FlushItem, PgStore, Store};
use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Fill the durable store (the data directory's embedded store, or DATABASE_URL) with
/// widgets paired on two ports, for measuring memory and restart at scale.
#[derive(Debug, Clone, clap::Args)]
pub struct SeedArgs {
    /// Widgets to write (default 10000000); even, so every widget has its pair.
    #[arg(long, default_value_t = 10_000_000, value_parser = even_count)]
    pub widgets: u64,

    /// Widgets per store write (default 10000).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch: u64,
}

fn even_count(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(n) if n >= 2 && n % 2 == 0 => Ok(n),
        Ok(_) => Err("must be an even number, at least 2".to_owned()),
        Err(e) => Err(e.to_string()),
    }
}

/// The version and checkpoint everything is written at.
const SEED_LSN: u64 = 1;

pub fn serial(i: u64) -> Serial {
    Serial::parse("serial", &format!("seed-{i:010}")).expect("a valid serial")
}

/// Widget `i` of the seed, with its partner on P and R.
fn widget(i: u64, name: &Name, ports: Ports) -> Widget {
    let partner = serial(i ^ 1);
    let mut w = Widget::new(name.clone(), ports);
    w.peers[PortType::P.index()] = Some(partner.clone());
    w.peers[PortType::R.index()] = Some(partner);
    w.version = SEED_LSN;
    w
}

/// What can be refused before the store is opened (so a refused seed leaves nothing
/// behind): more widgets than the serials can number, or a WAL that holds anything.
pub fn check(args: &SeedArgs, wal_dir: &Path) -> anyhow::Result<()> {
    if args.widgets >= 10_000_000_000 {
        bail!("--widgets: at most 9999999999 (serials have ten digits)");
    }
    // A WAL from an earlier run would be replayed over the seed's checkpoint.
    if std::fs::read_dir(wal_dir).is_ok_and(|mut d| d.next().is_some()) {
        bail!(
            "{} is not empty: bench-seed writes only into a new data directory",
            wal_dir.display()
        );
    }
    Ok(())
}

/// Seeds PostgreSQL (connected and migrated; [`check`] first), then updates the planner's
/// statistics of every table it filled: the widgets' row count is what start-up sizes its
/// map by (`len_hint`), and without the association tables' statistics the first start's
/// load joined them 1.6x slower (10 s against 6 s at 3 M widgets, BENCHMARKS.md).
pub async fn into_postgres(args: &SeedArgs, store: &PgStore) -> anyhow::Result<()> {
    fill(store, args, "PostgreSQL").await?;
    sqlx::query("ANALYZE widgets, associations_p, associations_r, associations_q")
        .execute(store.pool())
        .await
        .context("ANALYZE of the seeded tables")?;
    Ok(())
}

/// Seeds `store` (named `what` in messages), which must be empty; [`check`] first.
pub async fn fill<S: Store>(store: &S, args: &SeedArgs, what: &str) -> anyhow::Result<()> {
    // A store a service has started on, even one it has not flushed to yet: that service's
    // WAL may hold writes the store lacks, which it would replay over the seed's checkpoint
    // or trim behind it. (The service gives its store an identity before it serves.)
    let identity = (store.identity().await).with_context(|| format!("reading {what}"))?;
    if let Some(identity) = identity {
        bail!(
            "{what} belongs to history {identity}: a service has started on it, and its WAL \
             may hold writes the store does not; bench-seed writes only into a store no \
             service has used"
        );
    }
    let held = Arc::new(AtomicU64::new(0));
    let count = held.clone();
    let checkpoint = store
        .load(Box::new(move |_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        }))
        .await
        .with_context(|| format!("reading {what}"))?;
    let held = held.load(Ordering::Relaxed);
    if held > 0 || checkpoint > 0 {
        bail!("{what} already holds {held} widgets (checkpoint {checkpoint}): bench-seed writes only into an empty store");
    }

    let progress = if std::io::stderr().is_terminal() {
        ProgressBar::new(args.widgets).with_style(
            ProgressStyle::with_template("seeding {wide_bar} {pos}/{len} {per_sec} eta {eta}")
                .expect("a valid progress template"),
        )
    } else {
        ProgressBar::hidden()
    };
    let name = Name::parse("name", "seed").expect("a valid name");
    let ports =
        Ports::from_list("ports", &[PortType::P, PortType::R, PortType::Q]).expect("valid ports");
    let mark = Mark {
        row: true,
        ports: 0b011,
    };
    let started = Instant::now();
    let mut order: Vec<(u64, u64)> = (0..args.widgets)
        .map(|i| (store.write_order(serial(i).as_str()), i))
        .collect();
    order.sort_unstable();
    let mut written = 0;
    for batch in order.chunks(usize::try_from(args.batch).unwrap_or(usize::MAX)) {
        let mut items: Vec<_> = (batch.iter())
            .map(|&(_, i)| FlushItem {
                serial: serial(i),
                mark,
                widget: Some(widget(i, &name, ports)),
                version: SEED_LSN,
            })
            .collect();
        items.sort_unstable_by(|a, b| a.serial.cmp(&b.serial));
        let end = written + items.len() as u64;
        store
            .write_batch(FlushBatch {
                items,
                checkpoint: Some(SEED_LSN),
                // What the store will hold, not what it holds yet: a new embedded store
                // is laid out at its first write for the widgets that write says it has.
                widgets: Some(args.widgets),
                redis: None,
            })
            .await
            .with_context(|| {
                format!("writing widgets {written}..{end} (in the store's order) to {what}")
            })?;
        progress.set_position(end);
        written = end;
    }
    progress.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        widgets = args.widgets,
        secs = format!("{secs:.1}"),
        per_sec = (args.widgets as f64 / secs) as u64,
        "seeded {what}"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;

    #[test]
    fn pairs_are_symmetric_and_sorted() {
        let name = Name::parse("name", "seed").unwrap();
        let ports = Ports::from_list("ports", &PortType::ALL).unwrap();
        for i in [0, 1, 2, 9, 4_999_999] {
            let w = widget(i, &name, ports);
            let partner = widget(i ^ 1, &name, ports);
            assert_eq!(w.peer(PortType::P), Some(&serial(i ^ 1)));
            assert_eq!(partner.peer(PortType::R), Some(&serial(i)));
            assert_eq!(w.peer(PortType::Q), None);
        }
        assert!(serial(9) < serial(10), "zero-padded serials sort by number");
    }

    /// A store that keeps what it is given, and orders serials backwards by number.
    #[derive(Default)]
    struct Backwards {
        batches: std::sync::Mutex<Vec<Vec<String>>>,
        counts: std::sync::Mutex<Vec<Option<u64>>>,
    }

    impl Store for Backwards {
        async fn load(&self, _: crate::store::Visitor) -> Result<u64, StoreError> {
            Ok(0)
        }
        async fn len_hint(&self) -> Result<u64, StoreError> {
            Ok(0)
        }
        async fn identity(&self) -> Result<Option<String>, StoreError> {
            Ok(None)
        }
        async fn set_identity(&self, _: &str) -> Result<(), StoreError> {
            Ok(())
        }
        async fn write_batch(&self, batch: FlushBatch) -> Result<(), StoreError> {
            let serials = batch.items.iter().map(|i| i.serial.as_str().to_owned());
            self.batches.lock().unwrap().push(serials.collect());
            self.counts.lock().unwrap().push(batch.widgets);
            Ok(())
        }
        fn write_order(&self, serial: &str) -> u64 {
            u64::MAX - serial["seed-".len()..].parse::<u64>().unwrap()
        }
    }

    #[tokio::test]
    async fn widgets_go_in_the_stores_order_each_batch_sorted() {
        let store = Backwards::default();
        let args = SeedArgs {
            widgets: 10,
            batch: 4,
        };
        fill(&store, &args, "the test's store").await.unwrap();
        let names = |r: std::ops::RangeInclusive<u64>| -> Vec<String> {
            r.map(|i| serial(i).as_str().to_owned()).collect()
        };
        assert_eq!(
            *store.batches.lock().unwrap(),
            [names(6..=9), names(2..=5), names(0..=1)]
        );
        assert_eq!(
            *store.counts.lock().unwrap(),
            [Some(10); 3],
            "every batch says how many the seed writes, which a new store is laid out for"
        );
    }

    #[test]
    fn counts_must_be_even() {
        assert_eq!(even_count("10"), Ok(10));
        for bad in ["0", "1", "7", "-2", "x"] {
            assert!(even_count(bad).is_err(), "{bad}");
        }
    }
}
