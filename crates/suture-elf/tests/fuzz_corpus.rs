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
fn patch_parse_corpus() {
    let n = replay("corpus", "patch_parse", suture_elf::fuzzing::fuzz_patch);
    assert!(n > 0, "no corpus for patch_parse");
}

#[test]
fn patch_parse_regressions() {
    replay(
        "regressions",
        "patch_parse",
        suture_elf::fuzzing::fuzz_patch,
    );
}

#[test]
fn elf_symbols_corpus() {
    let n = replay("corpus", "elf_symbols", suture_elf::fuzzing::fuzz_symbols);
    assert!(n > 0, "no corpus for elf_symbols");
}

#[test]
fn elf_symbols_regressions() {
    replay(
        "regressions",
        "elf_symbols",
        suture_elf::fuzzing::fuzz_symbols,
    );
}
