//! Symbols of executables and shared objects built with `cc`.

mod common;

use std::process::Command;

use common::Cc;
use suture_elf::{LookupError, ObjectFile, SymKind};

const A_C: &str = r#"
__attribute__((noinline)) static int helper(void) { return 1; }
int counter = 5;
__attribute__((noinline)) int a_fn(void) { return helper() + counter; }
"#;
const B_C: &str = r#"
__attribute__((noinline)) static int helper(void) { return 2; }
static int counter = 7;
__attribute__((noinline)) int b_fn(void) { return helper() + counter; }
void b_set(int v) { counter = v; }
"#;
const MAIN_C: &str = r#"
int a_fn(void);
int b_fn(void);
int main(void) { return a_fn() + b_fn(); }
"#;

/// Build the PIE, non-PIE executable and shared library in a temp dir.
fn build() -> Cc {
    let cc = Cc::new();
    cc.write("a.c", A_C);
    cc.write("b.c", B_C);
    cc.write("main.c", MAIN_C);
    let common = ["-O1", "-Wl,--build-id"];
    let mut args = common.to_vec();
    args.extend([
        "-fPIE",
        "-pie",
        "-rdynamic",
        "main.c",
        "a.c",
        "b.c",
        "-o",
        "pie",
    ]);
    cc.cc(&args);
    let mut args = common.to_vec();
    args.extend(["-fno-pie", "-no-pie", "main.c", "a.c", "b.c", "-o", "exec"]);
    cc.cc(&args);
    let mut args = common.to_vec();
    args.extend([
        "-fPIC",
        "-shared",
        "-Wl,-soname,libdup.so.1",
        "a.c",
        "b.c",
        "-o",
        "libdup.so",
    ]);
    cc.cc(&args);
    cc.run("strip", &["-o", "pie.stripped", "pie"]);
    cc
}

fn parse(cc: &Cc, name: &str) -> ObjectFile {
    ObjectFile::parse(&cc.read(name)).unwrap()
}

/// The build id as `readelf -n` prints it.
fn readelf_build_id(path: &std::path::Path) -> String {
    let out = Command::new("readelf")
        .arg("-n")
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .expect("readelf shows a build id")
        .trim()
        .to_string()
}

#[test]
fn duplicate_statics_are_ambiguous() {
    let cc = build();
    for file in ["pie", "exec", "libdup.so"] {
        let obj = parse(&cc, file);
        assert!(obj.has_symtab());
        let err = obj.lookup("helper", 0).unwrap_err();
        let LookupError::Ambiguous { name, candidates } = &err else {
            panic!("{file}: {err:?}");
        };
        assert_eq!(name, "helper");
        assert_eq!(candidates.len(), 2, "{file}");
        assert_eq!(candidates[0].sympos, 1);
        assert_eq!(candidates[1].sympos, 2);
        assert!(candidates
            .iter()
            .all(|c| c.local && c.kind == SymKind::Func));
        assert_ne!(candidates[0].vaddr, candidates[1].vaddr);
        let msg = err.to_string();
        assert!(
            msg.contains("sympos 1: 0x") && msg.contains("sympos 2: 0x"),
            "{msg}"
        );
        assert!(msg.contains("local"), "{msg}");
        assert!(msg.contains("set .old_sympos"), "{msg}");

        let second = obj.lookup("helper", 2).unwrap();
        assert_eq!(second, candidates[1]);
        assert_eq!(obj.lookup("helper", 1).unwrap(), candidates[0]);
        assert_eq!(
            obj.lookup("helper", 3).unwrap_err(),
            LookupError::SymposOutOfRange {
                name: "helper".into(),
                sympos: 3,
                count: 2
            }
        );

        // `counter`: a global in a.c and a static in b.c.
        let err = obj.lookup("counter", 0).unwrap_err();
        let LookupError::Ambiguous { candidates, .. } = err else {
            panic!("{err:?}")
        };
        assert_eq!(candidates.len(), 2);
        assert!(candidates
            .iter()
            .any(|c| !c.local && c.kind == SymKind::Object));
        assert!(candidates.iter().any(|c| c.local));

        let a = obj.lookup("a_fn", 0).unwrap();
        assert!(!a.local && a.kind == SymKind::Func && a.size > 0 && a.sympos == 1);
        let (at, off) = obj.symbol_at(a.vaddr + 1).unwrap();
        assert_eq!((at.name.as_str(), off), ("a_fn", 1));
        let (at, off) = obj.symbol_at(second.vaddr).unwrap();
        assert_eq!((at, off), (second.clone(), 0));
    }
}

#[test]
fn not_found_suggests_close_names() {
    let cc = build();
    let obj = parse(&cc, "pie");
    let err = obj.lookup("helpr", 0).unwrap_err();
    let LookupError::NotFound { name, suggestions } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(name, "helpr");
    assert_eq!(suggestions.first().map(String::as_str), Some("helper"));
    assert!(suggestions.len() <= 5);
    assert!(err.to_string().contains("did you mean `helper`"), "{err}");

    let err = obj.lookup("b_fm", 0).unwrap_err();
    let LookupError::NotFound { suggestions, .. } = &err else {
        panic!("{err:?}")
    };
    assert!(suggestions.contains(&"b_fn".to_string()), "{suggestions:?}");
    assert!(suggestions.contains(&"a_fn".to_string()), "{suggestions:?}");

    let err = obj.lookup("completely_unrelated_name_xyz", 0).unwrap_err();
    assert_eq!(
        err,
        LookupError::NotFound {
            name: "completely_unrelated_name_xyz".into(),
            suggestions: vec![]
        }
    );
}

#[test]
fn build_id_soname_and_kind() {
    let cc = build();
    for file in ["pie", "exec", "libdup.so", "pie.stripped"] {
        let obj = parse(&cc, file);
        let id = obj.build_id().expect("build id");
        assert_eq!(id, readelf_build_id(&cc.path(file)), "{file}");
        assert!(id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    }
    assert!(parse(&cc, "exec").is_exec());
    assert!(!parse(&cc, "pie").is_exec());
    assert!(!parse(&cc, "libdup.so").is_exec());
    assert_eq!(
        parse(&cc, "libdup.so").soname().as_deref(),
        Some("libdup.so.1")
    );
    assert_eq!(parse(&cc, "pie").soname(), None);
}

#[test]
fn load_bias() {
    let cc = build();
    let pie = parse(&cc, "pie");
    let segs = pie.segments();
    assert!(segs.len() >= 2);
    assert!(segs.iter().any(|s| s.executable() && s.readable()));
    assert!(segs.iter().any(|s| s.writable()));
    let bias = 0x5555_5555_0000u64;
    // Every segment's first mapping gives the same bias (when its first file
    // page is not shared with the previous segment, which is ambiguous).
    for (i, s) in segs.iter().enumerate() {
        if i > 0 && segs[i - 1].offset + segs[i - 1].filesz > (s.offset & !0xfff) {
            continue;
        }
        let map_start = bias + (s.vaddr & !0xfff);
        let map_offset = s.offset & !0xfff;
        assert_eq!(pie.load_bias(map_start, map_offset), Some(bias), "{s:?}");
    }
    assert_eq!(pie.load_bias(bias, 0x7fff_0000), None);

    let exec = parse(&cc, "exec");
    let s = exec.segments()[0];
    assert_eq!(exec.load_bias(s.vaddr & !0xfff, s.offset & !0xfff), Some(0));
}

#[test]
fn stripped_falls_back_to_dynsym() {
    let cc = build();
    let obj = parse(&cc, "pie.stripped");
    assert!(!obj.has_symtab());
    let full = parse(&cc, "pie").lookup("a_fn", 0).unwrap();
    let a = obj.lookup("a_fn", 0).unwrap();
    assert_eq!(
        (a.vaddr, a.size, a.kind, a.local),
        (full.vaddr, full.size, SymKind::Func, false)
    );
    assert!(matches!(
        obj.lookup("helper", 0),
        Err(LookupError::NotFound { .. })
    ));
    assert_eq!(obj.symbol_at(a.vaddr + 2).unwrap().0.name, "a_fn");
}

#[test]
fn exports() {
    let cc = build();
    let lib = parse(&cc, "libdup.so");
    let a = lib.lookup_export("a_fn").unwrap();
    assert_eq!(a, lib.lookup("a_fn", 0).unwrap());
    assert!(lib.lookup_export("helper").is_none());
    assert!(lib.lookup_export("no_such_symbol").is_none());
    // The exported `counter` is a.c's global, sympos matching lookup().
    let c = lib.lookup_export("counter").unwrap();
    let LookupError::Ambiguous { candidates, .. } = lib.lookup("counter", 0).unwrap_err() else {
        panic!()
    };
    let global = candidates.iter().find(|s| !s.local).unwrap();
    assert_eq!((c.vaddr, c.sympos), (global.vaddr, global.sympos));
}

const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";

/// `(name, address)` of every `.dynsym` entry readelf prints as `name@@VER`
/// (default) and as `name@VER` (hidden).
type Named = Vec<(String, u64)>;

fn readelf_versions() -> (Named, Named) {
    let out = Command::new("readelf")
        .args(["-W", "--dyn-syms", LIBC])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let (mut default, mut hidden) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 || f[6] == "UND" {
            continue;
        }
        let Ok(addr) = u64::from_str_radix(f[1], 16) else {
            continue;
        };
        if let Some((name, _)) = f[7].split_once("@@") {
            default.push((name.to_string(), addr));
        } else if let Some((name, _)) = f[7].split_once('@') {
            hidden.push((name.to_string(), addr));
        }
    }
    (default, hidden)
}

#[test]
fn libc_exports_default_versions() {
    let Ok(bytes) = std::fs::read(LIBC) else {
        eprintln!("skipping: no {LIBC}");
        return;
    };
    let libc = ObjectFile::parse(&bytes).unwrap();
    assert!(libc.soname().unwrap().starts_with("libc.so"));
    let (default, hidden) = readelf_versions();

    let snprintf = libc.lookup_export("snprintf").unwrap();
    assert_eq!(snprintf.kind, SymKind::Func);
    let want = default.iter().find(|(n, _)| n == "snprintf").unwrap().1;
    assert_eq!(snprintf.vaddr, want);

    // A name with both a hidden and a default version at different
    // addresses (memcpy, realpath, ...) resolves to the default.
    let mut checked = 0;
    for (name, addr) in &default {
        if let Some((_, old)) = hidden.iter().find(|(n, a)| n == name && a != addr) {
            let got = libc.lookup_export(name).unwrap();
            assert_eq!(got.vaddr, *addr, "{name}: hidden version at {old:#x}");
            checked += 1;
        }
    }
    assert!(checked > 0, "libc has no symbol with two versions?");
    // IFUNCs are marked.
    if let Some(m) = libc.lookup_export("memcpy") {
        if m.kind != SymKind::Func {
            assert_eq!(m.kind, SymKind::Ifunc);
        }
    }
    // A symbol_at lookup in libc lands inside the function.
    let (s, off) = libc.symbol_at(snprintf.vaddr + 3).unwrap();
    assert_eq!((s.vaddr, off), (snprintf.vaddr, 3));
}

#[test]
fn rejects_non_objects() {
    let cc = Cc::new();
    let o = cc.patch("x", "int f(void) { return 1; }\n");
    let e = ObjectFile::parse(&o).unwrap_err().to_string();
    assert!(e.contains("relocatable object"), "{e}");
    let e = ObjectFile::parse(b"#!/bin/sh\n").unwrap_err().to_string();
    assert!(e.contains("not an ELF file"), "{e}");
    let mut arm = cc.read("x.o");
    arm[16] = 3; // ET_DYN
    arm[18..20].copy_from_slice(&183u16.to_le_bytes());
    let e = ObjectFile::parse(&arm).unwrap_err().to_string();
    assert!(e.contains("aarch64"), "{e}");
}
