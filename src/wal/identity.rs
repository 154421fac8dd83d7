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

/// A new identity: 128 random bits as 32 lowercase hex digits.
pub fn new_identity() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

/// The WAL directory's identity, or `None` if it has none (a new directory, or a WAL
/// written before identities existed).
pub fn read(fs: &dyn WalFs, dir: &Path) -> Result<Option<String>, WalError> {
    let path = dir.join(IDENTITY_FILE);
    let mut buf = Vec::new();
    match fs.read(&path, &mut buf) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(WalError::io(&path)(e)),
    }
    let identity = String::from_utf8_lossy(&buf).trim().to_owned();
    if identity.len() != 32 || !identity.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(WalError::Corrupt {
            file: path,
            offset: 0,
            reason: format!("{identity:?} is not an identity (32 hex digits)"),
        });
    }
    Ok(Some(identity))
}

/// Writes `identity` as the WAL directory's, durably (the file, then its directory entry).
/// Replaces an identity the directory had.
pub fn write(fs: &dyn WalFs, dir: &Path, identity: &str) -> Result<(), WalError> {
    let path = dir.join(IDENTITY_FILE);
    fs.create_dir_all(dir).map_err(WalError::io(dir))?;
    match fs.remove(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(WalError::io(&path)(e)),
    }
    let mut file = fs.create_new(&path).map_err(WalError::io(&path))?;
    file.write_all_at(format!("{identity}\n").as_bytes(), 0)
        .map_err(WalError::io(&path))?;
    file.sync_data().map_err(WalError::io(&path))?;
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
        std::fs::write(dir.path().join(IDENTITY_FILE), "not an identity").unwrap();
        assert!(matches!(
            read(&RealFs, dir.path()),
            Err(WalError::Corrupt { .. })
        ));
    }
}
