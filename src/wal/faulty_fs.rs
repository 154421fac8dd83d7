//! A [`WalFs`] with switchable faults, for tests: the real file system until a test sets a
//! fault. Compiled for the crate's own tests and, for the integration tests, with the
//! `fault-injection` feature; never into a production build.

use super::fs::{RealFs, WalFile, WalFs};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

/// A fault [`FaultyFs`] injects into every matching call until it is cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Fault {
    None = 0,
    /// Writes fail with "no space left on device" after writing half their bytes.
    NoSpace = 1,
    /// Writes fail with EIO before writing anything.
    WalWrite = 2,
    /// fdatasync on a segment fails.
    SyncError = 3,
    /// fsync of the WAL directory fails.
    DirSyncError = 4,
    /// Deleting a file fails.
    RemoveError = 5,
}

/// The real file system with switchable faults, for tests.
#[derive(Debug, Clone, Default)]
pub struct FaultyFs {
    fault: Arc<AtomicU8>,
}

impl FaultyFs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Injects `fault` from now on (`Fault::None` clears it).
    pub fn set(&self, fault: Fault) {
        self.fault.store(fault as u8, Ordering::SeqCst);
    }

    fn is(&self, fault: Fault) -> bool {
        self.fault.load(Ordering::SeqCst) == fault as u8
    }
}

struct FaultyFile {
    inner: File,
    faults: FaultyFs,
}

impl WalFile for FaultyFile {
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.faults.is(Fault::NoSpace) {
            FileExt::write_all_at(&self.inner, &buf[..buf.len() / 2], offset)?;
            return Err(io::Error::from(io::ErrorKind::StorageFull));
        }
        if self.faults.is(Fault::WalWrite) {
            return Err(io::Error::other("injected write error"));
        }
        FileExt::write_all_at(&self.inner, buf, offset)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        if self.faults.is(Fault::SyncError) {
            return Err(io::Error::other("injected fsync error"));
        }
        self.inner.sync_data()
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
}

impl WalFs for FaultyFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        RealFs.create_dir_all(dir)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        RealFs.list(dir)
    }

    fn read(&self, path: &Path, buf: &mut Vec<u8>) -> io::Result<()> {
        RealFs.read(path, buf)
    }

    fn len(&self, path: &Path) -> io::Result<u64> {
        RealFs.len(path)
    }

    fn create_new(&self, path: &Path) -> io::Result<Box<dyn WalFile>> {
        if self.is(Fault::NoSpace) {
            return Err(io::Error::from(io::ErrorKind::StorageFull));
        }
        let inner = OpenOptions::new().write(true).create_new(true).open(path)?;
        Ok(Box::new(FaultyFile {
            inner,
            faults: self.clone(),
        }))
    }

    fn open(&self, path: &Path) -> io::Result<Box<dyn WalFile>> {
        let inner = OpenOptions::new().write(true).open(path)?;
        Ok(Box::new(FaultyFile {
            inner,
            faults: self.clone(),
        }))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        if self.is(Fault::RemoveError) {
            return Err(io::Error::other("injected remove error"));
        }
        RealFs.remove(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        RealFs.rename(from, to)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        if self.is(Fault::DirSyncError) {
            return Err(io::Error::other("injected directory fsync error"));
        }
        RealFs.sync_dir(dir)
    }
}
