//! Naming addresses of a compiled program, with and without DWARF.

mod common;

use suture_elf::ObjectFile;
use suture_unwind::{file_line, symbolize, Symbolizer};

/// Compiles `symbols.c` with `flags`; returns the executable's bytes.
fn build(flags: &[&str]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let exe = common::compile(dir.path(), "symbols", flags);
    std::fs::read(exe).unwrap()
}

fn vaddr(bytes: &[u8], name: &str) -> u64 {
    ObjectFile::parse(bytes)
        .unwrap()
        .lookup(name, 0)
        .unwrap()
        .vaddr
}

/// The 1-based lines of `marker`'s definition: its signature to its `}`.
fn marker_lines() -> (u32, u32) {
    let text = std::fs::read_to_string(common::source("symbols")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let first = lines
        .iter()
        .position(|l| l.contains("int marker(int x)"))
        .unwrap();
    let last = first + lines[first..].iter().position(|l| *l == "}").unwrap();
    (first as u32 + 1, last as u32 + 1)
}

#[test]
fn name_offset_and_line_with_dwarf() {
    let bytes = build(&["-O2", "-g"]);
    let marker = vaddr(&bytes, "marker");
    let s = Symbolizer::new(&bytes).unwrap();
    let sym = s.symbolize(marker + 3).unwrap();
    assert_eq!((sym.name.as_str(), sym.offset), ("marker", 3));
    let (file, line) = sym.file_line.clone().expect("file:line from DWARF");
    assert!(file.ends_with("symbols.c"), "{file}");
    let (first, last) = marker_lines();
    assert!(
        (first..=last).contains(&line),
        "line {line} not in {first}..={last}"
    );
    // The one-shot functions agree.
    assert_eq!(file_line(&bytes, marker + 3), sym.file_line);
    assert_eq!(symbolize(&bytes, marker + 3), Some(sym));
}

#[test]
fn name_and_offset_without_dwarf() {
    let bytes = build(&["-O2"]);
    let marker = vaddr(&bytes, "marker");
    let sym = symbolize(&bytes, marker).unwrap();
    assert_eq!(
        (sym.name.as_str(), sym.offset, sym.file_line),
        ("marker", 0, None)
    );
}

#[test]
fn mangled_names_are_demangled() {
    let bytes = build(&["-O2"]);
    let f = vaddr(&bytes, "_ZN6suture4test7mangledEv");
    let sym = symbolize(&bytes, f + 1).unwrap();
    assert_eq!(
        (sym.name.as_str(), sym.offset),
        ("suture::test::mangled()", 1)
    );
}

#[test]
fn addresses_outside_functions_and_junk() {
    let bytes = build(&["-O2"]);
    assert_eq!(symbolize(&bytes, 0), None);
    assert_eq!(symbolize(&bytes, u64::MAX), None);
    assert_eq!(symbolize(b"not an elf file", 0x1000), None);
    assert!(Symbolizer::new(&bytes[..100]).is_err());
}
