//! Per-input logic of the fuzz targets (`fuzz/fuzz_targets/patch_parse.rs`,
//! `elf_symbols.rs`).
//!
//! Not part of the crate's API: the fuzz targets and the corpus replay test
//! (`tests/fuzz_corpus.rs`) call the same functions, so whatever the fuzzer
//! finds is replayed by `cargo test`. They panic when they find a bug: a
//! panic in the parser or linker, or a linked image that breaks the
//! invariants the callers rely on.

use crate::error::ResolveFailure;
use crate::link::{Layout, LinkedImage, PAGE_SIZE};
use crate::patch::{PatchFile, SymRef};
use crate::symbols::ObjectFile;

/// FNV-1a: a deterministic per-input value to derive addresses from.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// One `patch_parse` input: the bytes of a patch file.
///
/// Parses them as a patch and as a library (the runtime's form); for each
/// that parses, reads the descriptor, lays the image out and links it at
/// several bases, resolving its undefined symbols near the image, far from
/// it (so PLT stubs and overflow checks run) and not at all (weak symbols
/// become 0, others fail), then checks the linked image's invariants.
pub fn fuzz_patch(data: &[u8]) {
    let parsed = [
        PatchFile::parse(data.to_vec(), "fuzz"),
        PatchFile::parse_library(data.to_vec(), "fuzz"),
    ];
    for p in parsed {
        match p {
            Ok(p) => exercise_patch(&p, fnv(data)),
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
}

fn exercise_patch(p: &PatchFile, seed: u64) {
    let desc = p.descriptor();
    assert!(!desc.name.is_empty());
    let mut refs: Vec<&SymRef> = Vec::new();
    for o in &desc.objects {
        refs.push(&o.desc);
        for f in &o.funcs {
            refs.push(&f.new_func);
            let _ = p.global(&f.old_name);
        }
        let cb = &o.callbacks;
        refs.extend(
            [
                &cb.pre_patch,
                &cb.post_patch,
                &cb.pre_unpatch,
                &cb.post_unpatch,
            ]
            .into_iter()
            .flatten(),
        );
    }
    for s in &desc.states {
        refs.push(&s.desc);
        refs.extend(&s.data);
    }
    for r in &refs {
        if let SymRef::Section { index, .. } = r {
            let _ = p.section_name(*index);
        }
    }

    let layout = match p.layout() {
        Ok(l) => l,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    check_layout(&layout);

    let size = layout.size();
    let near_base = 0x7f00_0000_0000 + ((seed & 0xFFFF) << 12);
    let far_base = 0x1000;
    // The highest base the image fits at, and one past it.
    let top_base = (1u64 << 63) - size;
    let cases: [(u64, Resolve); 5] = [
        (near_base, Resolve::Near),
        (near_base, Resolve::Far),
        (far_base, Resolve::Failing),
        (top_base, Resolve::Near),
        (top_base + PAGE_SIZE, Resolve::Near),
    ];
    for (base, how) in cases {
        let mut resolve = |name: &str| how.resolve(name, base, size, seed);
        match layout.link(base, &mut resolve) {
            Ok(img) => check_image(&layout, &img, base, &refs, how, seed),
            Err(e) => {
                assert!(
                    base != near_base || how != Resolve::Near || !is_range_free(&e),
                    "linking near failed: {e}"
                );
                let _ = e.to_string();
            }
        }
    }
}

/// Whether the error is about something else than reaching an address.
fn is_range_free(e: &crate::Error) -> bool {
    let s = e.to_string();
    !(s.contains("overflows") || s.contains("not found"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resolve {
    /// Just past the image (within rel32 of all of it).
    Near,
    /// Anywhere in the address space.
    Far,
    /// Names with an odd hash are not found.
    Failing,
}

impl Resolve {
    fn resolve(self, name: &str, base: u64, size: u64, seed: u64) -> Result<u64, ResolveFailure> {
        let h = fnv(name.as_bytes()) ^ seed;
        match self {
            Resolve::Near => Ok(base.wrapping_add(size).wrapping_add(h & 0xFF_FFF0)),
            Resolve::Far => Ok(h),
            Resolve::Failing if h & 1 == 1 => Err(format!("`{name}` not found").into()),
            Resolve::Failing => Ok(h >> 1),
        }
    }
}

fn check_layout(l: &Layout) {
    let size = l.size();
    assert_eq!(size % PAGE_SIZE, 0);
    assert!(size <= 1 << 30, "image of {size} bytes");
    let mut end = 0;
    for r in l.regions() {
        assert_eq!(r.offset % PAGE_SIZE, 0);
        assert_eq!(r.len % PAGE_SIZE, 0);
        assert!(r.len > 0);
        assert!(r.offset >= end, "regions overlap or are out of order");
        end = r.offset + r.len;
    }
    assert!(end <= size);
    let undef = l.undefined_symbols();
    let mut sorted = undef.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), undef.len(), "undefined symbols repeated");
}

fn check_image(
    l: &Layout,
    img: &LinkedImage,
    base: u64,
    refs: &[&SymRef],
    how: Resolve,
    seed: u64,
) {
    let size = l.size();
    assert!(base % PAGE_SIZE == 0 && base + size <= 1 << 63);
    assert_eq!(img.base, base);
    assert_eq!(img.bytes.len() as u64, size);
    assert_eq!(img.regions, l.regions());
    let inside = |a: u64| a.wrapping_sub(base) <= size;
    let (ts, te) = img.text_range();
    assert!(inside(ts) && inside(te) && ts <= te);
    if let Some((a, len)) = img.eh_frame() {
        assert!(inside(a) && inside(a + len));
        assert!(len >= 4);
        let off = (a - base + len - 4) as usize;
        assert_eq!(img.bytes[off..off + 4], [0; 4], "no .eh_frame terminator");
    }
    for r in refs {
        let addr = img.address_of(r);
        match r {
            SymRef::Section { .. } => {
                if let Ok(a) = addr {
                    assert!(inside(a), "{r:?} at {a:#x} outside the image");
                }
                if let Some((s, e)) = img.extent_of(r) {
                    assert!(inside(s) && inside(e) && s < e);
                    assert_eq!(addr.ok(), Some(s));
                }
            }
            SymRef::Undefined { name, addend } => {
                // Undefined names the image does not reference were not
                // resolved; the others resolve as the resolver said.
                if let Ok(a) = addr {
                    // A failed (weak) resolution links as 0.
                    let want = how.resolve(name, base, size, seed).unwrap_or_default();
                    assert_eq!(a, want.wrapping_add_signed(*addend), "{name}");
                }
                assert!(img.extent_of(r).is_none());
            }
        }
    }
}

/// One `elf_symbols` input: the bytes of an executable or shared object.
///
/// Parses them and runs every query the engine makes: lookups by name (of
/// each symbol found, with sympos 0..=2), exports, the symbol containing
/// addresses around each symbol, and load-bias computations.
pub fn fuzz_symbols(data: &[u8]) {
    let f = match ObjectFile::parse(data) {
        Ok(f) => f,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let _ = (f.build_id(), f.soname(), f.is_exec(), f.has_symtab());
    let segments = f.segments();
    for s in &segments {
        let _ = (s.readable(), s.writable(), s.executable());
        let _ = f.load_bias(0x5555_0000_0000, s.offset & !(PAGE_SIZE - 1));
    }
    let _ = f.load_bias(0, u64::MAX);
    for name in ["main", "", "a"] {
        let _ = f.lookup(name, 0).map_err(|e| e.to_string());
    }
    let mut probes = vec![0, u64::MAX, fnv(data)];
    for s in segments.iter().take(16) {
        probes.extend((0..=8).map(|k| s.vaddr.wrapping_add(s.memsz / 8 * k)));
    }
    for a in probes {
        if let Some((sym, off)) = f.symbol_at(a) {
            assert!(off < sym.size.max(1));
            assert_eq!(sym.vaddr.wrapping_add(off), a);
            for pos in 0..3 {
                if let Err(e) = f.lookup(&sym.name, pos) {
                    let _ = e.to_string();
                }
            }
            if sym.sympos > 0 {
                assert_eq!(f.lookup(&sym.name, sym.sympos).as_ref(), Ok(&sym));
            }
            let _ = f.lookup_export(&sym.name);
        }
    }
}
