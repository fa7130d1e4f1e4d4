//! One suture command at a time per process: an exclusive `flock` on a file
//! named after the process's pid and start time (so a reused pid gets a
//! different lock). The lock dies with the command that holds it.

use crate::Error;
use nix::fcntl::{Flock, FlockArg};
use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use suture_process::Process;

pub struct TargetLock {
    _lock: Flock<File>,
}

fn lock_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SUTURE_LOCK_DIR") {
        return d.into();
    }
    let run = PathBuf::from("/run/suture");
    if std::fs::create_dir_all(&run).is_ok() {
        return run;
    }
    std::env::temp_dir().join("suture-locks")
}

/// Where files about `proc` go: `DIR/PID-STARTTIME.SUFFIX`.
pub fn path_for(proc: &Process, suffix: &str) -> Result<PathBuf, Error> {
    let dir = lock_dir();
    std::fs::create_dir_all(&dir).map_err(|e| {
        Error::Other(format!(
            "cannot create lock directory {}: {e}",
            dir.display()
        ))
    })?;
    Ok(dir.join(format!("{}-{}.{suffix}", proc.pid(), proc.start_time())))
}

/// Take the lock of `proc` if nobody holds it.
pub fn try_lock(proc: &Process) -> Result<Option<TargetLock>, Error> {
    match lock(proc, Duration::ZERO) {
        Ok(l) => Ok(Some(l)),
        Err(Error::Locked { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Take the lock of `proc`, waiting up to `wait` for another command.
pub fn lock(proc: &Process, wait: Duration) -> Result<TargetLock, Error> {
    let path = path_for(proc, "lock")?;
    let deadline = Instant::now() + wait;
    loop {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::Other(format!("cannot open lock file {}: {e}", path.display())))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => return Ok(TargetLock { _lock: l }),
            Err(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => return Err(Error::Locked { pid: proc.pid() }),
        }
    }
}
