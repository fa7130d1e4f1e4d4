//! Who may have written a patch file. A patch runs with the target's
//! privileges, so a file that someone other than its owner or root could
//! have written (or replaced, through a directory on its path) is refused
//! unless the operator says otherwise.

use crate::Error;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Check that only root or the invoking user could have written `path`:
/// the file and every directory above it are owned by one of them and not
/// writable by group or others (a sticky directory such as /tmp is fine:
/// others cannot replace an entry there).
pub fn check_patch_file(path: &Path) -> Result<(), Error> {
    let real = std::fs::canonicalize(path).map_err(|e| Error::PatchIo {
        path: path.display().to_string(),
        cause: e,
    })?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let trusted_owner = |uid: u32| uid == 0 || uid == me;
    let refuse = |what: &Path, why: String| {
        Err(Error::Other(format!(
            "refusing patch file {}: {} {why}, so someone other than its owner could have changed it; fix the permissions (chmod go-w) or pass --allow-untrusted",
            path.display(),
            what.display()
        )))
    };
    let meta = std::fs::metadata(&real).map_err(|e| Error::PatchIo {
        path: path.display().to_string(),
        cause: e,
    })?;
    if !trusted_owner(meta.uid()) {
        return refuse(&real, format!("belongs to uid {}", meta.uid()));
    }
    if meta.mode() & 0o022 != 0 {
        return refuse(
            &real,
            format!(
                "is writable by group or others (mode {:o})",
                meta.mode() & 0o7777
            ),
        );
    }
    for dir in real.ancestors().skip(1) {
        let m = std::fs::metadata(dir).map_err(|e| Error::PatchIo {
            path: dir.display().to_string(),
            cause: e,
        })?;
        if !trusted_owner(m.uid()) {
            return refuse(dir, format!("belongs to uid {}", m.uid()));
        }
        if m.mode() & 0o022 != 0 && m.mode() & 0o1000 == 0 {
            return refuse(
                dir,
                format!(
                    "is writable by group or others (mode {:o})",
                    m.mode() & 0o7777
                ),
            );
        }
    }
    Ok(())
}
