//! Laying out and linking patch images.

mod common;

use std::collections::HashMap;

use common::Cc;
use object::{Object, ObjectSection, ObjectSymbol, RelocationFlags, RelocationTarget};
use suture_elf::{Error, LinkedImage, PatchFile, Prot, ResolveFailure, SymRef};

const BASE: u64 = 0x7f12_3450_0000;
const NEAR_FN: u64 = BASE + 0x10_0000;
const FAR_FN: u64 = 0x40_0000;
const COUNTER: u64 = 0x7f00_0000_1000;

const SRC: &str = r#"
#include <suture.h>
extern int counter;
extern int far_fn(int);
extern int near_fn(int);
extern int target_impl(void);
static const char msg[] = "hello";
__attribute__((noinline)) const char *get_msg(void) { return msg; }
static int fixed(int x) {
	counter++;
	int a = far_fn(x);
	return a + near_fn(x) + (get_msg()[0] == 'h');
}
static struct suture_func funcs[] = {
	{ .old_name = "orig", .new_func = fixed },
	{ .old_name = "other", .new_func = target_impl },
	{ }
};
static struct suture_object objs[] = { { .funcs = funcs }, { } };
SUTURE_PATCH(lt) = { .name = "link-test", .objs = objs };
"#;

/// One relocation of the .o, read with the `object` crate.
struct Rel {
    section: String,
    section_index: usize,
    offset: u64,
    r_type: u32,
    symbol: String,
    addend: i64,
}

fn relocations(bytes: &[u8]) -> Vec<Rel> {
    let f = object::File::parse(bytes).unwrap();
    let mut out = Vec::new();
    for s in f.sections() {
        for (offset, r) in s.relocations() {
            let RelocationFlags::Elf { r_type } = r.flags() else {
                panic!("not ELF")
            };
            let RelocationTarget::Symbol(si) = r.target() else {
                continue;
            };
            let sym = f.symbol_by_index(si).unwrap();
            let symbol = if sym.kind() == object::SymbolKind::Section {
                f.section_by_index(sym.section_index().unwrap())
                    .unwrap()
                    .name()
                    .unwrap()
                    .to_string()
            } else {
                sym.name().unwrap().to_string()
            };
            out.push(Rel {
                section: s.name().unwrap().to_string(),
                section_index: s.index().0,
                offset,
                r_type,
                symbol,
                addend: r.addend(),
            });
        }
    }
    out
}

fn addr_of_section(img: &LinkedImage, index: usize) -> u64 {
    img.address_of(&SymRef::Section { index, offset: 0 })
        .unwrap()
}

fn read_u64(img: &LinkedImage, addr: u64) -> u64 {
    let o = (addr - img.base) as usize;
    u64::from_le_bytes(img.bytes[o..o + 8].try_into().unwrap())
}

fn read_i32(img: &LinkedImage, addr: u64) -> i32 {
    let o = (addr - img.base) as usize;
    i32::from_le_bytes(img.bytes[o..o + 4].try_into().unwrap())
}

fn region_prot(img: &LinkedImage, addr: u64) -> Prot {
    img.regions
        .iter()
        .find(|r| addr >= img.base + r.offset && addr < img.base + r.offset + r.len)
        .unwrap_or_else(|| panic!("{addr:#x} is in no region"))
        .prot
}

fn resolver(
    calls: &mut HashMap<String, usize>,
) -> impl FnMut(&str) -> Result<u64, ResolveFailure> + '_ {
    move |name| {
        *calls.entry(name.to_string()).or_default() += 1;
        match name {
            "near_fn" => Ok(NEAR_FN),
            "far_fn" => Ok(FAR_FN),
            "counter" => Ok(COUNTER),
            "target_impl" => Ok(0x5555_0000_1234),
            _ => Err(format!("no symbol `{name}` in the target").into()),
        }
    }
}

#[test]
fn calls_got_plt_and_descriptor() {
    let cc = Cc::new();
    let bytes = cc.patch("lt", SRC);
    let rels = relocations(&bytes);
    let patch = PatchFile::parse(bytes, "lt").unwrap();
    let layout = patch.layout().unwrap();

    let mut undef = layout.undefined_symbols();
    undef.sort();
    assert_eq!(undef, ["counter", "far_fn", "near_fn", "target_impl"]);

    // Regions: page-aligned, contiguous, text first, covering the image.
    let regions = layout.regions();
    assert_eq!(regions[0].offset, 0);
    assert_eq!(regions[0].prot, Prot::RX);
    let mut end = 0;
    for r in &regions {
        assert_eq!(r.offset % 4096, 0);
        assert_eq!(r.len % 4096, 0);
        assert!(r.len > 0);
        assert_eq!(r.offset, end);
        end = r.offset + r.len;
    }
    assert_eq!(end, layout.size());
    let prots: Vec<Prot> = regions.iter().map(|r| r.prot).collect();
    assert_eq!(prots, [Prot::RX, Prot::R, Prot::RW]);

    let mut calls = HashMap::new();
    let img = layout.link(BASE, &mut resolver(&mut calls)).unwrap();
    assert!(calls.values().all(|&n| n == 1), "{calls:?}");
    assert_eq!(img.base, BASE);
    assert_eq!(img.bytes.len() as u64, layout.size());
    let (text_start, text_end) = img.text_range();
    assert!(text_start == BASE && text_end > text_start);

    let mut seen = HashMap::new();
    for r in rels.iter().filter(|r| r.section.starts_with(".text")) {
        let p = addr_of_section(&img, r.section_index) + r.offset;
        let value = read_i32(&img, p) as i64;
        // Every relocation here is of the form X + A - P.
        let x = (p as i64 + value - r.addend) as u64;
        match (r.r_type, r.symbol.as_str()) {
            (object::elf::R_X86_64_PLT32, "near_fn") => assert_eq!(x, NEAR_FN),
            (object::elf::R_X86_64_PLT32, "far_fn") => {
                // Out of rel32 range: through a stub in text.
                assert!(x >= text_start && x < text_end, "{x:#x}");
                let o = (x - BASE) as usize;
                assert_eq!(img.bytes[o..o + 6], [0xff, 0x25, 0, 0, 0, 0]);
                assert_eq!(read_u64(&img, x + 6), FAR_FN);
            }
            (object::elf::R_X86_64_REX_GOTPCRELX | object::elf::R_X86_64_GOTPCREL, "counter") => {
                assert_eq!(region_prot(&img, x), Prot::RW);
                assert_eq!(read_u64(&img, x), COUNTER);
            }
            (object::elf::R_X86_64_PC32, s) if s.starts_with(".rodata") => {
                let o = (x - BASE) as usize;
                assert_eq!(&img.bytes[o..o + 6], b"hello\0");
                assert_eq!(region_prot(&img, x), Prot::R);
            }
            (object::elf::R_X86_64_PLT32 | object::elf::R_X86_64_PC32, "get_msg") => {
                assert_eq!(region_prot(&img, x), Prot::RX);
            }
            (t, s) => panic!("unexpected relocation {t} against {s}"),
        }
        *seen.entry(r.symbol.clone()).or_insert(0) += 1;
    }
    for s in ["near_fn", "far_fn", "counter"] {
        assert!(seen.contains_key(s), "no relocation against {s}: {seen:?}");
    }

    // The descriptor in the image points at the linked strings and arrays.
    let d = patch.descriptor();
    let psec = (0..)
        .find(|&i| patch.section_name(i) == Some(".suture.patch"))
        .unwrap();
    let name_ptr = read_u64(&img, addr_of_section(&img, psec));
    let o = (name_ptr - BASE) as usize;
    assert_eq!(&img.bytes[o..o + 10], b"link-test\0");
    let fixed = img.address_of(&d.objects[0].funcs[0].new_func).unwrap();
    assert!(fixed >= text_start && fixed < text_end);
    assert_eq!(
        img.address_of(&d.objects[0].funcs[1].new_func).unwrap(),
        0x5555_0000_1234
    );
    // The funcs array holds the same address as address_of gives.
    let objs_ptr = read_u64(&img, addr_of_section(&img, psec) + 8);
    let funcs_ptr = read_u64(&img, objs_ptr + 8);
    assert_eq!(read_u64(&img, funcs_ptr + 8), fixed);

    // .eh_frame: read-only, zero-terminated, FDEs point into text.
    let (eh, eh_len) = img.eh_frame().unwrap();
    assert_eq!(region_prot(&img, eh), Prot::R);
    assert_eq!(read_i32(&img, eh + eh_len - 4), 0);
    let cie_len = read_i32(&img, eh) as u64;
    let fde = eh + 4 + cie_len;
    assert!(read_i32(&img, fde) > 0);
    let pc_field = fde + 8;
    let pc_begin = (pc_field as i64 + read_i32(&img, pc_field) as i64) as u64;
    assert!(
        pc_begin >= text_start && pc_begin < text_end,
        "{pc_begin:#x}"
    );
}

#[test]
fn near_targets_need_no_stub() {
    let cc = Cc::new();
    let bytes = cc.patch("lt", SRC);
    let rels = relocations(&bytes);
    let layout = PatchFile::parse(bytes, "lt").unwrap().layout().unwrap();
    let mut resolve = |name: &str| -> Result<u64, ResolveFailure> {
        Ok(match name {
            "far_fn" => BASE - 0x1000_0000,
            _ => BASE + 0x2000_0000,
        })
    };
    let img = layout.link(BASE, &mut resolve).unwrap();
    let r = rels.iter().find(|r| r.symbol == "far_fn").unwrap();
    let p = addr_of_section(&img, r.section_index) + r.offset;
    let x = (p as i64 + read_i32(&img, p) as i64 - r.addend) as u64;
    assert_eq!(x, BASE - 0x1000_0000);
}

#[test]
fn non_pic_data_reference_overflows() {
    let cc = Cc::new();
    let src = r#"
#include <suture.h>
extern int counter;
static int fixed(void) { return counter; }
static struct suture_func funcs[] = { { .old_name = "orig", .new_func = fixed }, { } };
static struct suture_object objs[] = { { .funcs = funcs }, { } };
SUTURE_PATCH(np) = { .objs = objs };
"#;
    let bytes = cc.patch_with("np", src, &["-fno-pic", "-fno-PIC"]);
    let layout = PatchFile::parse(bytes, "np").unwrap().layout().unwrap();
    let e = layout
        .link(BASE, &mut |_| Ok(0x1000))
        .unwrap_err()
        .to_string();
    assert!(e.contains("`counter`"), "{e}");
    assert!(e.contains(".text.fixed+0x"), "{e}");
    assert!(e.contains("-fPIC"), "{e}");
    // In range, it links.
    assert!(layout.link(BASE, &mut |_| Ok(BASE + 0x10_0000)).is_ok());
}

#[test]
fn resolver_errors_pass_through() {
    let cc = Cc::new();
    let layout = PatchFile::parse(cc.patch("lt", SRC), "lt")
        .unwrap()
        .layout()
        .unwrap();
    let e = layout
        .link(BASE, &mut |name| {
            if name == "far_fn" {
                Err("symbol `far_fn` is ambiguous in the target".into())
            } else {
                Ok(0x1000)
            }
        })
        .unwrap_err();
    assert_eq!(e.to_string(), "symbol `far_fn` is ambiguous in the target");
    match e {
        Error::Resolve { name, .. } => assert_eq!(name, "far_fn"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn weak_undefined_becomes_zero() {
    let cc = Cc::new();
    let src = r#"
#include <suture.h>
extern int maybe(void) __attribute__((weak));
static int fixed(void) { return maybe ? maybe() : 0; }
static struct suture_func funcs[] = { { .old_name = "orig", .new_func = fixed }, { } };
static struct suture_object objs[] = { { .funcs = funcs }, { } };
SUTURE_PATCH(w) = { .objs = objs };
"#;
    let bytes = cc.patch("w", src);
    let rels = relocations(&bytes);
    let layout = PatchFile::parse(bytes, "w").unwrap().layout().unwrap();
    assert_eq!(layout.undefined_symbols(), ["maybe"]);
    let img = layout.link(BASE, &mut |_| Err("not found".into())).unwrap();
    let r = rels
        .iter()
        .find(|r| r.symbol == "maybe" && r.r_type != object::elf::R_X86_64_PLT32)
        .expect("a GOT reference to `maybe`");
    let p = addr_of_section(&img, r.section_index) + r.offset;
    let slot = (p as i64 + read_i32(&img, p) as i64 - r.addend) as u64;
    assert_eq!(read_u64(&img, slot), 0);
}

#[test]
fn constructors_and_tls_rejected() {
    let cc = Cc::new();
    let base = r#"
#include <suture.h>
static int fixed(void) { return 1; }
static struct suture_func funcs[] = { { .old_name = "orig", .new_func = fixed }, { } };
static struct suture_object objs[] = { { .funcs = funcs }, { } };
SUTURE_PATCH(c) = { .objs = objs };
"#;
    let ctor = format!("{base}\nvolatile int side;\n__attribute__((constructor)) static void init(void) {{ side = 1; }}\n");
    let e = PatchFile::parse(cc.patch("ctor", &ctor), "ctor")
        .unwrap()
        .layout()
        .unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)));
    assert!(e.to_string().contains("constructors"), "{e}");

    let dtor = format!("{base}\nvolatile int side;\n__attribute__((destructor)) static void fini(void) {{ side = 2; }}\n");
    let e = PatchFile::parse(cc.patch("dtor", &dtor), "dtor")
        .unwrap()
        .layout()
        .unwrap_err();
    assert!(e.to_string().contains("destructors"), "{e}");

    let tls = base.replace(
        "static int fixed(void) { return 1; }",
        "__thread int t;\nstatic int fixed(void) { return ++t; }",
    );
    let e = PatchFile::parse(cc.patch("tls", &tls), "tls")
        .unwrap()
        .layout()
        .unwrap_err();
    assert!(e.to_string().contains("thread-local"), "{e}");

    let tls = base.replace(
        "static int fixed(void) { return 1; }",
        "extern __thread int t;\nstatic int fixed(void) { return ++t; }",
    );
    let e = PatchFile::parse(cc.patch("tls2", &tls), "tls2")
        .unwrap()
        .layout()
        .unwrap_err();
    assert!(e.to_string().contains("thread-local"), "{e}");
}

#[test]
fn unaligned_base_rejected() {
    let cc = Cc::new();
    let layout = PatchFile::parse(cc.patch("lt", SRC), "lt")
        .unwrap()
        .layout()
        .unwrap();
    let e = layout.link(BASE + 8, &mut |_| Ok(0)).unwrap_err();
    assert!(e.to_string().contains("page-aligned"), "{e}");
}

#[test]
fn common_symbols_get_bss_space() {
    let cc = Cc::new();
    let src = r#"
#include <suture.h>
int common_var;
static int fixed(void) { return ++common_var; }
static struct suture_func funcs[] = { { .old_name = "orig", .new_func = fixed }, { } };
static struct suture_object objs[] = { { .funcs = funcs }, { } };
SUTURE_PATCH(cm) = { .objs = objs };
"#;
    let bytes = cc.patch_with("cm", src, &["-fcommon"]);
    let rels = relocations(&bytes);
    let f = object::File::parse(&*bytes).unwrap();
    let sym = f.symbols().find(|s| s.name() == Ok("common_var")).unwrap();
    assert!(sym.is_common(), "cc did not make a COMMON symbol");
    let layout = PatchFile::parse(bytes.clone(), "cm")
        .unwrap()
        .layout()
        .unwrap();
    assert!(layout.undefined_symbols().is_empty());
    let img = layout.link(BASE, &mut |_| Err("none".into())).unwrap();
    let r = rels.iter().find(|r| r.symbol == "common_var").unwrap();
    let p = addr_of_section(&img, r.section_index) + r.offset;
    let slot = (p as i64 + read_i32(&img, p) as i64 - r.addend) as u64;
    let var = read_u64(&img, slot);
    assert_eq!(region_prot(&img, var), Prot::RW);
    assert_eq!(read_i32(&img, var), 0);
}

#[test]
fn large_code_model_links() {
    let cc = Cc::new();
    let bytes = cc.patch_with("large", SRC, &["-mcmodel=large"]);
    let rels = relocations(&bytes);
    let types: Vec<u32> = rels.iter().map(|r| r.r_type).collect();
    assert!(
        types.contains(&object::elf::R_X86_64_GOTPC64)
            || types.contains(&object::elf::R_X86_64_GOTOFF64)
            || types.contains(&object::elf::R_X86_64_PLTOFF64),
        "{types:?}"
    );
    let layout = PatchFile::parse(bytes, "large").unwrap().layout().unwrap();
    assert!(!layout
        .undefined_symbols()
        .contains(&"_GLOBAL_OFFSET_TABLE_".to_string()));
    let mut calls = HashMap::new();
    let img = layout.link(BASE, &mut resolver(&mut calls)).unwrap();
    // PLTOFF64 to far_fn: GOT + value is a stub (or far_fn itself).
    if let Some(r) = rels
        .iter()
        .find(|r| r.r_type == object::elf::R_X86_64_PLTOFF64 && r.symbol == "far_fn")
    {
        let got = rels
            .iter()
            .find(|r| r.r_type == object::elf::R_X86_64_GOTPC64)
            .map(|g| {
                let p = addr_of_section(&img, g.section_index) + g.offset;
                (p as i64 + read_u64(&img, p) as i64 - g.addend) as u64
            })
            .expect("GOTPC64");
        let p = addr_of_section(&img, r.section_index) + r.offset;
        let l = got
            .wrapping_add(read_u64(&img, p))
            .wrapping_sub(r.addend as u64);
        if l != FAR_FN {
            assert_eq!(read_u64(&img, l + 6), FAR_FN);
        }
    }
}
