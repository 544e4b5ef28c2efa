//! The buffer's storage: redb's file backend, except that growing the file allocates its blocks.
//!
//! redb grows its file with `set_len`, which leaves a sparse hole, and then writes pages into
//! it. On a full filesystem that write fails with ENOSPC, however much free space redb itself
//! has inside the file — so a buffer that had emptied itself could still fail every commit,
//! and a transaction could fail half-way through writing its pages. Here growth calls
//! `fallocate`, so the space is taken (or refused) when the file grows: every page inside the
//! file is backed by real blocks, and commits that fit in the pages redb has freed succeed on a
//! full disk. Filesystems without `fallocate` (some ZFS versions) fall back to `set_len`.

use std::fs::File;
use std::io;
use std::ops::Bound;

use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};
use rustix::fs::{FallocateFlags, fallocate};

#[derive(Debug)]
pub struct AllocatingBackend {
    inner: FileBackend,
    /// A second handle on the same file, for `fallocate`.
    file: File,
}

impl AllocatingBackend {
    pub fn new(file: File) -> io::Result<Self> {
        let handle = file.try_clone()?;
        let inner = FileBackend::new(file).map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Self { inner, file: handle })
    }
}

impl StorageBackend for AllocatingBackend {
    fn len(&self) -> Result<u64, io::Error> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let old = self.inner.len()?;
        if len <= old {
            return self.inner.set_len(len);
        }
        match fallocate(&self.file, FallocateFlags::empty(), old, len - old) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS) => self.inner.set_len(len),
            Err(e) => {
                // Give back whatever part of the range was allocated before the failure.
                let _ = self.inner.set_len(old);
                Err(e.into())
            }
        }
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        self.inner.write(offset, data)
    }

    fn close(&self) -> Result<(), io::Error> {
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn growing_allocates_blocks_and_shrinking_releases_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let file =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).expect("open");
        let b = AllocatingBackend::new(file).expect("backend");
        b.set_len(1 << 20).expect("grow");
        let meta = std::fs::metadata(&path).expect("stat");
        assert_eq!(meta.len(), 1 << 20);
        // st_blocks counts 512-byte units: the whole MiB is allocated, not a hole.
        assert!(meta.blocks() * 512 >= 1 << 20, "allocated {} bytes", meta.blocks() * 512);
        b.write(4096, b"page").expect("write");
        let mut out = [0u8; 4];
        b.read(4096, &mut out).expect("read");
        assert_eq!(&out, b"page");
        b.set_len(8192).expect("shrink");
        assert_eq!(b.len().expect("len"), 8192);
    }
}
