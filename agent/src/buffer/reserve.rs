//! Space held back on the buffer's filesystem for when the disk fills up.
//!
//! redb never overwrites a live page: even a transaction that only deletes entries writes new
//! pages first and frees the old ones after it commits. On a filesystem that is 100% full, the
//! deletions that would free space (entries Kafka has acknowledged) therefore fail like
//! everything else, and the buffer could never drain. The reserve is a file of real (not
//! sparse) zeros next to the buffer, written at start; when a transaction fails, the buffer
//! thread deletes it, which gives the next deletions room to commit. Once transactions succeed
//! again, it is written anew.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How much room a released reserve gives: enough for the buffer's deletions to commit in
/// bounded chunks (see `DELETE_CHUNK` in the buffer thread), small next to any real quota.
pub const RESERVE_BYTES: u64 = 512 * 1024;

/// How often to try writing the reserve again while the disk is still short of room.
const RECREATE_EVERY: Duration = Duration::from_secs(5);

/// The reserve file of one buffer.
#[derive(Debug)]
pub struct Reserve {
    path: PathBuf,
    size: u64,
    present: bool,
    last_attempt: Option<Instant>,
}

impl Reserve {
    /// The reserve for the buffer at `buffer`: `<buffer>.reserve`, written now if there is room.
    pub fn new(buffer: &Path, size: u64) -> Self {
        let mut reserve = Reserve { path: buffer.with_extension("reserve"), size, present: false, last_attempt: None };
        reserve.ensure();
        reserve
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_present(&self) -> bool {
        self.present
    }

    /// Writes the reserve if it is missing (at most every few seconds); returns whether it is
    /// in place. A partial file (the disk filled while writing it) is removed.
    pub fn ensure(&mut self) -> bool {
        if self.present || self.last_attempt.is_some_and(|t| t.elapsed() < RECREATE_EVERY) {
            return self.present;
        }
        self.last_attempt = Some(Instant::now());
        match write_zeros(&self.path, self.size) {
            Ok(()) => self.present = true,
            Err(e) => {
                let _ = std::fs::remove_file(&self.path);
                tracing::debug!(path = %self.path.display(), error = %e, "no room for the buffer's disk reserve yet");
            }
        }
        self.present
    }

    /// Deletes the reserve; returns whether that freed anything.
    pub fn release(&mut self) -> bool {
        if !self.present {
            return false;
        }
        self.present = false;
        self.last_attempt = Some(Instant::now());
        std::fs::remove_file(&self.path).is_ok()
    }
}

fn write_zeros(path: &Path, size: u64) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(path)?;
    let chunk = [0u8; 64 * 1024];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        file.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_written_next_to_the_buffer_released_and_written_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let buffer = dir.path().join("buffer.redb");
        let mut r = Reserve::new(&buffer, 100_000);
        assert!(r.is_present());
        assert_eq!(std::fs::metadata(dir.path().join("buffer.reserve")).expect("written").len(), 100_000);
        assert!(r.release());
        assert!(!dir.path().join("buffer.reserve").exists());
        assert!(!r.release(), "nothing left to release");
        // Not rewritten at once (the disk is probably still full) ...
        assert!(!r.ensure());
        // ... but after a while.
        r.last_attempt = Some(Instant::now() - RECREATE_EVERY);
        assert!(r.ensure());
        assert_eq!(std::fs::metadata(r.path()).expect("rewritten").len(), 100_000);
    }

    #[test]
    fn a_reserve_that_does_not_fit_leaves_no_partial_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A directory in the reserve's place makes the write fail like a full disk would.
        let buffer = dir.path().join("buffer.redb");
        std::fs::create_dir(dir.path().join("buffer.reserve")).expect("mkdir");
        let r = Reserve::new(&buffer, 1000);
        assert!(!r.is_present());
    }
}
