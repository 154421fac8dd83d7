//! The identity of the history a WAL belongs to: the file `IDENTITY` in the WAL directory,
//! holding the same 32 hex digits the durable store keeps ([`crate::store::Store::identity`]).
//! Start-up compares the two, so a WAL and a store from different histories, or a store
//! whose WAL is gone, refuse to start instead of silently skipping or losing records.

use super::fs::WalFs;
use super::WalError;
use std::io;
use std::path::Path;

/// The identity file's name in the WAL directory (never a segment's name).
pub const IDENTITY_FILE: &str = "IDENTITY";

/// Where a new identity is written and synced before it takes [`IDENTITY_FILE`]'s place.
pub const IDENTITY_TEMP_FILE: &str = "IDENTITY.tmp";

/// More bytes than an identity file holds (32 hex digits and a newline).
const MAX_IDENTITY_BYTES: u64 = 256;

/// A new identity: 128 random bits as 32 lowercase hex digits.
pub fn new_identity() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

/// The WAL directory's identity, or `None` if it has none (a new directory, or a WAL
/// written before identities existed).
pub fn read(fs: &dyn WalFs, dir: &Path) -> Result<Option<String>, WalError> {
    let path = dir.join(IDENTITY_FILE);
    let len = match fs.len(&path) {
        Ok(len) => len,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(WalError::io(&path)(e)),
    };
    let damaged = |reason: String| WalError::Identity {
        file: path.clone(),
        reason,
    };
    if len > MAX_IDENTITY_BYTES {
        return Err(damaged(format!("{len} bytes, where an identity is 33")));
    }
    let mut buf = Vec::new();
    fs.read(&path, &mut buf).map_err(WalError::io(&path))?;
    let identity = String::from_utf8_lossy(&buf).trim().to_owned();
    if identity.len() != 32 || !identity.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(damaged(format!(
            "{identity:?} is not an identity (32 hex digits)"
        )));
    }
    Ok(Some(identity))
}

/// Writes `identity` as the WAL directory's, durably, replacing any it had: written and
/// synced under [`IDENTITY_TEMP_FILE`], renamed over [`IDENTITY_FILE`], and the directory
/// synced, so that a crash leaves the old identity or the new one, never none or half of
/// one (which the next start would refuse as a WAL deleted, or damaged).
pub fn write(fs: &dyn WalFs, dir: &Path, identity: &str) -> Result<(), WalError> {
    let (path, temp) = (dir.join(IDENTITY_FILE), dir.join(IDENTITY_TEMP_FILE));
    fs.create_dir_all(dir).map_err(WalError::io(dir))?;
    match fs.remove(&temp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(WalError::io(&temp)(e)),
    }
    let mut file = fs.create_new(&temp).map_err(WalError::io(&temp))?;
    file.write_all_at(format!("{identity}\n").as_bytes(), 0)
        .map_err(WalError::io(&temp))?;
    file.sync_data().map_err(WalError::io(&temp))?;
    fs.rename(&temp, &path).map_err(WalError::io(&path))?;
    fs.sync_dir(dir).map_err(WalError::io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::RealFs;

    #[test]
    fn writes_reads_and_refuses_garbage() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(&RealFs, dir.path()).unwrap(), None);
        let id = new_identity();
        assert_eq!(id.len(), 32);
        write(&RealFs, dir.path(), &id).unwrap();
        assert_eq!(read(&RealFs, dir.path()).unwrap(), Some(id.clone()));
        let other = new_identity();
        assert_ne!(id, other);
        write(&RealFs, dir.path(), &other).unwrap();
        assert_eq!(read(&RealFs, dir.path()).unwrap(), Some(other));
        assert!(!dir.path().join(IDENTITY_TEMP_FILE).exists());
        std::fs::write(dir.path().join(IDENTITY_FILE), "not an identity").unwrap();
        assert!(matches!(
            read(&RealFs, dir.path()),
            Err(WalError::Identity { .. })
        ));
    }

    /// A damaged identity file is named as such, with what to do: the error used to be
    /// the WAL's damage, whose advice (`--wal-recovery truncate`) changes nothing for it.
    /// And one far larger than an identity (a sparse file) is refused unread.
    #[test]
    fn a_damaged_identity_file_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(IDENTITY_FILE);
        std::fs::write(&path, "").unwrap();
        let empty = read(&RealFs, dir.path()).unwrap_err().to_string();
        assert!(
            empty.contains("--accept-mismatched-wal") && empty.contains("does not help"),
            "{empty}"
        );
        std::fs::File::create(&path)
            .unwrap()
            .set_len(8 << 30)
            .unwrap();
        let huge = read(&RealFs, dir.path()).unwrap_err();
        assert!(
            matches!(&huge, WalError::Identity { reason, .. } if reason.contains("8589934592 bytes")),
            "{huge}"
        );
    }
}
