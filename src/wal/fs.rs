//! The file-system seam under the WAL: every call the WAL makes on disk goes through
//! [`WalFs`], so tests can make a write, an fsync or a directory fsync fail, cut a write
//! short, or run out of space (`FaultyFs`, built only for tests and with the
//! `fault-injection` feature). Production uses [`RealFs`].

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The file-system calls the WAL needs.
pub trait WalFs: Send + Sync + 'static {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// The names of the entries in `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// The whole file, into `buf` (replacing what it held): one buffer serves every
    /// segment of a replay, so its pages are not faulted in afresh for each.
    fn read(&self, path: &Path, buf: &mut Vec<u8>) -> io::Result<()>;
    /// The file's length in bytes.
    fn len(&self, path: &Path) -> io::Result<u64>;
    /// Creates a file that must not exist yet, for writing.
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn WalFile>>;
    /// Opens an existing file for writing (recovery cuts a torn tail through it).
    fn open(&self, path: &Path) -> io::Result<Box<dyn WalFile>>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Renames a file (replacing `to` if it exists; the WAL never asks that).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
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

/// Creates `dir` (and any missing parent) so that it survives a crash: each new directory's
/// entry is fsynced into its parent, as every new segment's entry is fsynced into the WAL
/// directory. On failure, the path it failed on.
pub fn create_dir_durably(fs: &dyn WalFs, dir: &Path) -> Result<(), (PathBuf, io::Error)> {
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    fs.create_dir_all(dir).map_err(|e| (dir.to_owned(), e))?;
    for created in missing {
        let parent = match created.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        fs.sync_dir(parent).map_err(|e| (parent.to_owned(), e))?;
    }
    Ok(())
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

    fn len(&self, path: &Path) -> io::Result<u64> {
        Ok(fs::metadata(path)?.len())
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

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
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
