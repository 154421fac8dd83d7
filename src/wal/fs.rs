//! The file-system seam under the WAL: every call the WAL makes on disk goes through
//! [`WalFs`], so tests can make a write, an fsync or a directory fsync fail, cut a write
//! short, or run out of space ([`FaultyFs`]). Production uses [`RealFs`].

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

/// The file-system calls the WAL needs.
pub trait WalFs: Send + Sync + 'static {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// The names of the entries in `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// The whole file, into `buf` (replacing what it held): one buffer serves every
    /// segment of a replay, so its pages are not faulted in afresh for each.
    fn read(&self, path: &Path, buf: &mut Vec<u8>) -> io::Result<()>;
    /// Creates a file that must not exist yet, for writing.
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn WalFile>>;
    /// Opens an existing file for writing (recovery cuts a torn tail through it).
    fn open(&self, path: &Path) -> io::Result<Box<dyn WalFile>>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// fsyncs a directory, so that files created or removed in it stay so after a crash.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// An open segment file.
pub trait WalFile: Send {
    /// Writes all of `buf` at `offset`, or fails (possibly after writing part of it).
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// fdatasync.
    fn sync_data(&mut self) -> io::Result<()>;
    fn set_len(&mut self, len: u64) -> io::Result<()>;
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFs;

impl WalFs for RealFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir)? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }

    fn read(&self, path: &Path, buf: &mut Vec<u8>) -> io::Result<()> {
        use std::io::Read;
        let mut file = fs::File::open(path)?;
        buf.clear();
        buf.reserve(file.metadata()?.len() as usize);
        file.read_to_end(buf)?;
        Ok(())
    }

    fn create_new(&self, path: &Path) -> io::Result<Box<dyn WalFile>> {
        let file = OpenOptions::new().write(true).create_new(true).open(path)?;
        Ok(Box::new(file))
    }

    fn open(&self, path: &Path) -> io::Result<Box<dyn WalFile>> {
        Ok(Box::new(OpenOptions::new().write(true).open(path)?))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

impl WalFile for File {
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        File::sync_data(self)
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }
}

/// A fault [`FaultyFs`] injects into every matching call until it is cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Fault {
    None = 0,
    /// Writes fail with "no space left on device" after writing half their bytes.
    NoSpace = 1,
    /// Writes fail with EIO before writing anything.
    EngineError = 2,
    /// fdatasync on a segment fails.
    SyncError = 3,
    /// fsync of the WAL directory fails.
    DirSyncError = 4,
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
        if self.faults.is(Fault::EngineError) {
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
        RealFs.remove(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        if self.is(Fault::DirSyncError) {
            return Err(io::Error::other("injected directory fsync error"));
        }
        RealFs.sync_dir(dir)
    }
}
