//! One process per data directory. A single-node instance's WAL and embedded store are its
//! own: two processes appending to one WAL, or sharing one LSN space, lose acknowledged
//! writes without a word. So an instance holds an exclusive lock on `<data dir>/lock` for
//! its whole life (`flock`, released by the kernel however the process ends, `kill -9`
//! included), and a second one refuses to start, naming the lock and the holder's PID.
//! The WAL directory (`<data dir>/wal`, or `--wal-dir`) is locked the same way, so that
//! no other instance can name it as its own `--wal-dir`.

use crate::wal::fs::create_dir_durably;
use crate::wal::RealFs;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The lock file's name inside the data directory.
pub use crate::wal::LOCK_FILE;

/// Why the data directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "the directory {} is in use by another widgets process (PID {holder}, holding {}): \
         one instance owns its data directory and its WAL directory. Stop the other process, \
         give this one another --data-dir (or --wal-dir), or run several instances in Redis \
         mode",
        dir.display(), lock.display()
    )]
    Held {
        dir: PathBuf,
        lock: PathBuf,
        holder: String,
    },
    #[error(
        "{} is not a directory: --data-dir and --wal-dir name directories (made if missing)",
        dir.display()
    )]
    NotADirectory { dir: PathBuf },
    #[error("locking the directory ({}): {source}", lock.display())]
    Io {
        lock: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The held lock; dropping it releases the directory.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    /// Refuses a `dir` that is there but not a directory, or whose lock another process
    /// holds, before anything is made: a start refused for its second directory left the
    /// first made and locked. (What another process takes after this is refused by
    /// [`Self::acquire`].)
    pub fn check(dir: &Path) -> Result<(), LockError> {
        if dir.exists() && !dir.is_dir() {
            return Err(LockError::NotADirectory {
                dir: dir.to_owned(),
            });
        }
        let lock = dir.join(LOCK_FILE);
        let Ok(mut file) = File::open(&lock) else {
            // None yet (or unreadable: `acquire` says why).
            return Ok(());
        };
        if let Err(TryLockError::WouldBlock) = file.try_lock() {
            return Err(held(dir, lock, &mut file));
        }
        Ok(())
    }

    /// Creates `dir` if needed and locks it, or fails at once if another process holds it.
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        let lock = dir.join(LOCK_FILE);
        let io = |source| LockError::Io {
            lock: lock.clone(),
            source,
        };
        Self::check(dir)?;
        // A new data directory's entry is made durable too, or a power loss could take it
        // with the fsynced WAL inside.
        create_dir_durably(&RealFs, dir).map_err(|(_, e)| io(e))?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(held(dir, lock, &mut file)),
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        // For whoever is refused next: who holds it.
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(Self { _file: file })
    }
}

/// The refusal of `dir`, whose lock `file` (at `lock`) another process holds: it names
/// the holder's PID, which the holder wrote there.
fn held(dir: &Path, lock: PathBuf, file: &mut File) -> LockError {
    let mut holder = String::new();
    let _ = file.read_to_string(&mut holder);
    let holder = match holder.trim() {
        "" => "unknown".to_owned(),
        pid => pid.to_owned(),
    };
    LockError::Held {
        dir: dir.to_owned(),
        lock,
        holder,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_where_the_directory_should_be_is_refused_as_not_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("afile");
        std::fs::write(&file, b"not a directory").unwrap();
        let err = DataDirLock::acquire(&file).unwrap_err();
        assert!(matches!(err, LockError::NotADirectory { .. }), "{err}");
        assert!(err.to_string().contains("is not a directory"), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"not a directory");
    }

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let first = DataDirLock::acquire(&data).unwrap();
        let err = DataDirLock::acquire(&data).unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(&err, LockError::Held { holder, .. } if *holder == std::process::id().to_string()),
            "{message}"
        );
        assert!(
            message.contains(&data.join(LOCK_FILE).display().to_string()),
            "{message}"
        );
        assert!(message.contains("Redis mode"), "{message}");
        drop(first);
        DataDirLock::acquire(&data).expect("free again once the holder is gone");
    }
}
