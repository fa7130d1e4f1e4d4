//! Replays the saved fuzz corpus (`fuzz/corpus/<target>/`) and the inputs
//! that once made a target fail (`fuzz/regressions/<target>/`) through the
//! same functions the fuzz targets call, so `cargo test` keeps them passing.

use std::path::{Path, PathBuf};

/// Files of `fuzz/<dir>/<target>/` (sorted; none if the folder is missing).
fn inputs(dir: &str, target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz")
        .join(dir)
        .join(target);
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&root) {
        Ok(rd) => rd
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

/// Runs `f` on every file, naming the file that fails.
fn replay(dir: &str, target: &str, f: fn(&[u8])) -> usize {
    let files = inputs(dir, target);
    for path in &files {
        let data = std::fs::read(path).unwrap();
        if std::panic::catch_unwind(|| f(&data)).is_err() {
            panic!("{} fails", path.display());
        }
    }
    files.len()
}

#[test]
fn x86_plan_corpus() {
    let n = replay("corpus", "x86_plan", suture_x86::fuzzing::fuzz_plan);
    assert!(n > 0, "no corpus for x86_plan");
}

#[test]
fn x86_plan_regressions() {
    replay("regressions", "x86_plan", suture_x86::fuzzing::fuzz_plan);
}

#[test]
fn x86_dispatch_corpus() {
    let n = replay("corpus", "x86_dispatch", suture_x86::fuzzing::fuzz_dispatch);
    assert!(n > 0, "no corpus for x86_dispatch");
}

#[test]
fn x86_dispatch_regressions() {
    replay(
        "regressions",
        "x86_dispatch",
        suture_x86::fuzzing::fuzz_dispatch,
    );
}
