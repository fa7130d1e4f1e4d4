//! `suture build`: compile a C patch into a relocatable object with the
//! flags suture's loader expects. The header ships inside the binary, so
//! the command works from any directory.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The headers patches include.
pub const HEADERS: &[(&str, &str)] = &[
    ("suture.h", include_str!("../../../include/suture.h")),
    (
        "suture_shadow.h",
        include_str!("../../../include/suture_shadow.h"),
    ),
];

/// A directory holding suture's headers (written once per user under the
/// temp dir).
pub fn include_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "suture-include-{}-{}",
        env!("CARGO_PKG_VERSION"),
        nix_uid()
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, text) in HEADERS {
        let h = dir.join(name);
        if std::fs::read_to_string(&h).ok().as_deref() != Some(*text) {
            let tmp = dir.join(format!("{name}.{}", std::process::id()));
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, &h)?;
        }
    }
    Ok(dir)
}

fn nix_uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

/// Compile `src` to `out` (default: `src` with `.o`).
pub fn build(src: &Path, out: Option<&Path>, extra: &[String]) -> Result<PathBuf> {
    if !src.exists() {
        bail!("patch source {} does not exist", src.display());
    }
    let out = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| src.with_extension("o"));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let inc = include_dir()?;
    let status = Command::new(&cc)
        .args(suture_engine::PATCH_CFLAGS)
        .arg("-I")
        .arg(&inc)
        .args(extra)
        .arg(src)
        .arg("-o")
        .arg(&out)
        .status()
        .with_context(|| format!("cannot run the C compiler '{cc}'; install cc or set CC"))?;
    if !status.success() {
        bail!(
            "the C compiler failed on {} ({status}); see its messages above",
            src.display()
        );
    }
    Ok(out)
}
