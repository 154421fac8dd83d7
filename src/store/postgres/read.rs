//! Reading every widget: a start's load, and a repair's read of a database gone back in
//! time, both in one snapshot with the checkpoint that covers it.

use super::conn::{CloseUnlessDone, RowWait, Within};
use super::{stored_checkpoint, PgStore, ASSOCIATION_TABLES};
use crate::domain::{Name, PortType, Ports, Serial, Widget};
use crate::store::{StoreError, Visitor};
use futures_util::TryStreamExt;
use sqlx::{Postgres, Row, Transaction};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Whether a read of every widget checks that each association row has its mirror.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mirrors {
    Checked,
    Unchecked,
}

impl PgStore {
    /// [`Store::load`](crate::store::Store::load), which checks every association row's mirror; a repair of a
    /// database gone back in time reads its rows as they are ([`Mirrors::Unchecked`]),
    /// since it writes each widget it finds differing again, peers and all.
    pub async fn read_widgets(
        &self,
        mut visit: Visitor,
        mirrors: Mirrors,
    ) -> Result<u64, StoreError> {
        let deadline = self.flush.statement_deadline();
        let row_deadline = self.flush.row_deadline();
        let mut conn = CloseUnlessDone::acquire(&self.pool, deadline).await?;
        // One snapshot for the rows and the checkpoint that covers them.
        let mut tx = conn.begin().within(deadline).await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .within(deadline)
            .await?;
        let checkpoint = stored_checkpoint(&mut tx, deadline).await?;
        let mut rows = sqlx::query(
            "SELECT w.serial_number, w.name, w.ports, w.version, \
                    p.peer_serial_number AS p, p.version AS pv, \
                    r.peer_serial_number AS r, r.version AS rv, \
                    q.peer_serial_number AS q, q.version AS qv \
             FROM widgets w \
             LEFT JOIN associations_p p USING (serial_number) \
             LEFT JOIN associations_r r USING (serial_number) \
             LEFT JOIN associations_q q USING (serial_number)",
        )
        .fetch(&mut *tx);
        let mut loaded = 0u64;
        let mut links = LinkBalance::default();
        let mut waiting = RowWait::new(row_deadline);
        while let Some(row) = waiting.for_next(rows.try_next()).await? {
            let key: String = row.try_get("serial_number")?;
            let serial = Serial::parse("serial_number", &key).map_err(|e| corrupt(&key, e))?;
            let name: String = row.try_get("name")?;
            let mut widget = Widget::new(
                Name::parse("name", &name).map_err(|e| corrupt(&key, e))?,
                Ports::from_bits(row.try_get::<i16, _>("ports")? as u8)
                    .ok_or_else(|| corrupt(&key, "ports out of range"))?,
            );
            let mut version: i64 = row.try_get("version")?;
            for port in PortType::ALL {
                let column = port.as_str().to_lowercase();
                let peer: Option<String> = row.try_get(column.as_str())?;
                if let Some(peer) = peer {
                    links.add(&key, &peer, port);
                    widget.peers[port.index()] =
                        Some(Serial::parse("peer", &peer).map_err(|e| corrupt(&key, e))?);
                }
                // A freed port's row (no peer) still carries the version that freed it.
                let v: Option<i64> = row.try_get(format!("{column}v").as_str())?;
                version = version.max(v.unwrap_or(0));
            }
            widget.version = version as u64;
            widget.check(&serial).map_err(|e| corrupt(&key, e))?;
            visit(serial, widget);
            loaded += 1;
            if loaded.is_multiple_of(1_000_000) {
                tracing::info!(loaded, "loading widgets from PostgreSQL");
            }
            if loaded.is_multiple_of(1024) {
                // Rows already received come without a wait: without a yield, a load holds
                // its worker thread for as long as they last, and a task beside it on the
                // same thread (what consumes the visited widgets, a lease's renewal) waits.
                tokio::task::yield_now().await;
            }
        }
        drop(rows);
        if mirrors == Mirrors::Checked && !links.balanced() {
            return Err(one_sided_association(&mut tx, row_deadline).await?);
        }
        tx.commit().within(deadline).await?;
        conn.done();
        self.checkpoint.fetch_max(checkpoint, Ordering::Relaxed);
        Ok(checkpoint)
    }
}

/// Checks, in one pass and constant memory, that every association row has its mirror
/// (`A -> B` on a port and `B -> A` on the same port): each row adds or subtracts a hash
/// of the unordered pair and the port, by the direction it points, so mirrored rows
/// cancel and the sum ends at zero unless a row is one-sided (a false zero needs a 64-bit
/// collision). The rare failure is then named by [`one_sided_association`].
#[derive(Default)]
struct LinkBalance(u64);

impl LinkBalance {
    fn add(&mut self, serial: &str, peer: &str, port: PortType) {
        use std::hash::{Hash, Hasher};
        let (low, high) = if serial < peer {
            (serial, peer)
        } else {
            (peer, serial)
        };
        let mut hasher = std::hash::DefaultHasher::new();
        (low, high, port.index()).hash(&mut hasher);
        let h = hasher.finish();
        self.0 = if serial < peer {
            self.0.wrapping_add(h)
        } else {
            self.0.wrapping_sub(h)
        };
    }

    fn balanced(&self) -> bool {
        self.0 == 0
    }
}

/// The first association row whose mirror is missing, as the error that names it.
async fn one_sided_association(
    tx: &mut Transaction<'_, Postgres>,
    deadline: Duration,
) -> Result<StoreError, StoreError> {
    for port in PortType::ALL {
        let table = ASSOCIATION_TABLES[port.index()];
        let row: Option<(String, String)> = sqlx::query_as(&format!(
            "SELECT a.serial_number, a.peer_serial_number FROM {table} a \
             WHERE a.peer_serial_number IS NOT NULL AND NOT EXISTS ( \
                 SELECT 1 FROM {table} b WHERE b.serial_number = a.peer_serial_number \
                 AND b.peer_serial_number = a.serial_number) \
             ORDER BY a.serial_number LIMIT 1"
        ))
        .fetch_optional(&mut **tx)
        .within(deadline)
        .await?;
        if let Some((serial, peer)) = row {
            return Ok(corrupt(
                &serial,
                format!(
                    "{table}: associated with {peer:?} on port {}, which is not associated back",
                    port.as_str()
                ),
            ));
        }
    }
    Ok(StoreError::Task(
        "the association rows do not mirror each other, but no one-sided row was found".into(),
    ))
}

fn corrupt(key: &str, reason: impl ToString) -> StoreError {
    StoreError::Corrupt {
        key: key.to_owned(),
        reason: reason.to_string(),
    }
}
