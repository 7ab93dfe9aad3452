//! One writer per data dir: the agent, or a command working offline, holds an exclusive
//! `flock` on `<data-dir>/lock` while the store is open. The lock goes with the process,
//! so a crash never leaves a stale lock behind.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use rustix::fs::{FlockOperation, flock};

use crate::StoreError;

pub(crate) struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    pub(crate) fn acquire(root: &Path) -> Result<Self, StoreError> {
        let mut file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(root.join("lock"))?;
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => return Err(StoreError::InUse(root.to_path_buf())),
            Err(e) => return Err(StoreError::Io(e.into())),
        }
        // The holder's pid, for an operator wondering who holds it.
        file.set_len(0)?;
        writeln!(file, "{}", std::process::id())?;
        Ok(Self { _file: file })
    }
}
