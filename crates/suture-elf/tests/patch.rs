//! Parsing patch files compiled from C.

mod common;

use common::{Cc, SIMPLE_PATCH};
use object::{Object, ObjectSection};
use suture_elf::{Error, PatchFile, SymRef};

const FULL: &str = r#"
#include <suture.h>
#include <stdio.h>
extern int counter;
extern int counter2;
extern int real_puts(const char *);
extern int target_impl(void);
SUTURE_SYMBOL(counter2, NULL, "counter", 2);
SUTURE_SYMBOL(real_puts, "libc.so.6", "puts", 0);

static int fixed_parse(const char *s) { counter++; counter2++; return real_puts(s); }
int other(int x) { return x + 1; }
static int pre(struct suture_object *o) { (void)o; return 0; }
static void post_unpatch(struct suture_object *o) { (void)o; }
static void lib_post(struct suture_object *o) { (void)o; }

static struct suture_func funcs[] = {
	{ .old_name = "parse", .new_func = fixed_parse },
	{ .old_name = "helper", .new_func = other, .old_sympos = 2 },
	{ }
};
static struct suture_func libfuncs[] = {
	{ .old_name = "lib_fn", .new_func = fixed_parse, .old_sympos = 1 },
	{ .old_name = "lib_other", .new_func = target_impl },
	{ }
};
static int statedata;
static struct suture_state states[] = {
	{ .id = 7, .version = 2, .data = &statedata },
	{ .id = 9, .version = 1 },
	{ }
};
static struct suture_object objs[] = {
	{ .name = NULL, .funcs = funcs, .callbacks = { .pre_patch = pre }, .build_id = "abCD12" },
	{ .name = "libfoo.so.1", .funcs = libfuncs,
	  .callbacks = { .post_patch = lib_post, .post_unpatch = post_unpatch } },
	{ }
};
SUTURE_PATCH(fix) = { .name = "fix-parse", .objs = objs, .states = states, .replace = 1 };
"#;

fn section_of(p: &PatchFile, r: &SymRef) -> (String, u64) {
    match r {
        SymRef::Section { index, offset } => (p.section_name(*index).unwrap().to_string(), *offset),
        other => panic!("expected a section reference, got {other:?}"),
    }
}

fn parse_err(bytes: Vec<u8>) -> String {
    match PatchFile::parse(bytes, "bad") {
        Ok(p) => panic!("expected an error, parsed {:?}", p.descriptor()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn full_descriptor_round_trip() {
    let cc = Cc::new();
    let p = PatchFile::parse(cc.patch("fix", FULL), "fix").unwrap();
    let d = p.descriptor();
    assert_eq!(d.name, "fix-parse");
    assert!(d.replace);
    assert_eq!(d.objects.len(), 2);

    let main = &d.objects[0];
    assert_eq!(main.name, None);
    assert_eq!(main.build_id.as_deref(), Some("abcd12"));
    assert_eq!(main.funcs.len(), 2);
    assert_eq!(main.funcs[0].old_name, "parse");
    assert_eq!(main.funcs[0].old_sympos, 0);
    assert_eq!(
        section_of(&p, &main.funcs[0].new_func),
        (".text.fixed_parse".into(), 0)
    );
    assert_eq!(main.funcs[1].old_name, "helper");
    assert_eq!(main.funcs[1].old_sympos, 2);
    assert_eq!(
        section_of(&p, &main.funcs[1].new_func),
        (".text.other".into(), 0)
    );
    let pre = main.callbacks.pre_patch.as_ref().unwrap();
    assert_eq!(section_of(&p, pre), (".text.pre".into(), 0));
    assert!(main.callbacks.post_patch.is_none());
    assert!(main.callbacks.pre_unpatch.is_none());
    assert!(main.callbacks.post_unpatch.is_none());

    let lib = &d.objects[1];
    assert_eq!(lib.name.as_deref(), Some("libfoo.so.1"));
    assert_eq!(lib.build_id, None);
    assert_eq!(lib.funcs.len(), 2);
    assert_eq!(lib.funcs[0].old_name, "lib_fn");
    assert_eq!(lib.funcs[0].old_sympos, 1);
    assert_eq!(
        lib.funcs[1].new_func,
        SymRef::Undefined {
            name: "target_impl".into(),
            addend: 0
        }
    );
    assert!(lib.callbacks.pre_patch.is_none());
    assert_eq!(
        section_of(&p, lib.callbacks.post_patch.as_ref().unwrap()).0,
        ".text.lib_post"
    );
    assert_eq!(
        section_of(&p, lib.callbacks.post_unpatch.as_ref().unwrap()).0,
        ".text.post_unpatch"
    );

    assert_eq!(d.states.len(), 2);
    assert_eq!((d.states[0].id, d.states[0].version), (7, 2));
    assert_eq!(
        section_of(&p, d.states[0].data.as_ref().unwrap()),
        (".bss.statedata".into(), 0)
    );
    assert_eq!((d.states[1].id, d.states[1].version), (9, 1));
    assert_eq!(d.states[1].data, None);

    let mut syms = d.symbols.clone();
    syms.sort_by(|a, b| a.alias.cmp(&b.alias));
    assert_eq!(syms.len(), 2);
    assert_eq!(syms[0].alias, "counter2");
    assert_eq!(syms[0].object, None);
    assert_eq!(syms[0].name, "counter");
    assert_eq!(syms[0].sympos, 2);
    assert_eq!(syms[1].alias, "real_puts");
    assert_eq!(syms[1].object.as_deref(), Some("libc.so.6"));
    assert_eq!(syms[1].name, "puts");
    assert_eq!(syms[1].sympos, 0);
}

#[test]
fn name_defaults_to_file_stem() {
    let cc = Cc::new();
    let src = SIMPLE_PATCH.replace(".name = \"simple\", ", "");
    let p = PatchFile::parse(cc.patch("stem", &src), "my-fix").unwrap();
    assert_eq!(p.descriptor().name, "my-fix");
    assert!(!p.descriptor().replace);
    assert_eq!(p.descriptor().symbols.len(), 1);
}

#[test]
fn not_elf() {
    let e = parse_err(b"hello, world".to_vec());
    assert!(e.contains("not an ELF file"), "{e}");
    let e = parse_err(Vec::new());
    assert!(e.contains("not an ELF file"), "{e}");
}

#[test]
fn wrong_architecture_class_and_endianness() {
    let cc = Cc::new();
    let good = cc.patch("p", SIMPLE_PATCH);

    let mut aarch64 = good.clone();
    aarch64[18..20].copy_from_slice(&183u16.to_le_bytes());
    let e = parse_err(aarch64);
    assert_eq!(e, "patch `bad` is an aarch64 object; suture needs x86_64");

    let mut class32 = good.clone();
    class32[4] = 1;
    let e = parse_err(class32);
    assert!(e.contains("32-bit") && e.contains("x86_64"), "{e}");

    let mut be = good.clone();
    be[5] = 2;
    let e = parse_err(be);
    assert!(e.contains("big-endian"), "{e}");

    let e = parse_err(good[..40].to_vec());
    assert!(e.contains("truncated"), "{e}");
}

#[test]
fn shared_object_and_executable_rejected() {
    let cc = Cc::new();
    cc.write("p.c", SIMPLE_PATCH);
    let inc = format!("-I{}", common::include_dir().display());
    cc.cc(&["-shared", "-fPIC", &inc, "p.c", "-o", "p.so"]);
    let e = parse_err(cc.read("p.so"));
    assert!(e.contains("shared object"), "{e}");
    assert!(e.contains("`suture build` or `cc -c`"), "{e}");

    cc.write("m.c", "int main(void) { return 0; }\n");
    cc.cc(&["-no-pie", "m.c", "-o", "m"]);
    let e = parse_err(cc.read("m"));
    assert!(e.contains("an executable"), "{e}");
    assert!(e.contains("relocatable object"), "{e}");
}

#[test]
fn no_descriptor() {
    let cc = Cc::new();
    let bytes = cc.patch("plain", "int f(int x) { return x * 2; }\n");
    let e = parse_err(bytes);
    assert!(e.contains("no SUTURE_PATCH descriptor found"), "{e}");
}

#[test]
fn two_descriptors() {
    let cc = Cc::new();
    let src =
        format!("{SIMPLE_PATCH}\nSUTURE_PATCH(second) = {{ .name = \"again\", .objs = objs }};\n");
    let e = parse_err(cc.patch("two", &src));
    assert!(e.contains("more than one SUTURE_PATCH descriptor"), "{e}");
}

#[test]
fn bad_abi_version() {
    let cc = Cc::new();
    let src = SIMPLE_PATCH.replace(
        "SUTURE_PATCH(simple) =",
        "const unsigned int abi __attribute__((used, section(\".suture.abi\"))) = 2;\n\
         struct suture_patch simple __attribute__((used, section(\".suture.patch\"))) =",
    );
    let e = parse_err(cc.patch("abi", &src));
    assert!(e.contains("ABI version 2"), "{e}");

    // No ABI section at all.
    let src = SIMPLE_PATCH.replace(
        "SUTURE_PATCH(simple) =",
        "struct suture_patch simple __attribute__((used, section(\".suture.patch\"))) =",
    );
    let e = parse_err(cc.patch("noabi", &src));
    assert!(e.contains("no ABI version"), "{e}");
}

#[test]
fn terminator_in_the_middle() {
    let cc = Cc::new();
    let src = SIMPLE_PATCH.replace(
        "{ .old_name = \"parse\", .new_func = fixed_parse },",
        "{ .old_name = \"parse\", .new_func = fixed_parse },\n\t{ .new_func = fixed_parse },",
    );
    let p = PatchFile::parse(cc.patch("mid", &src), "mid").unwrap();
    let funcs = &p.descriptor().objects[0].funcs;
    assert_eq!(funcs.len(), 1);
    assert_eq!(funcs[0].old_name, "parse");
}

#[test]
fn null_new_func() {
    let cc = Cc::new();
    let src = SIMPLE_PATCH.replace(
        "{ .old_name = \"helper\", .new_func = other, .old_sympos = 2 },",
        "{ .old_name = \"helper\" },",
    );
    let e = parse_err(cc.patch("nonew", &src));
    assert!(e.contains("`helper`") && e.contains("new_func"), "{e}");
}

#[test]
fn empty_patch() {
    let cc = Cc::new();
    let src = r#"
#include <suture.h>
static struct suture_func none[] = { { } };
static struct suture_object objs[] = { { .name = "libx.so", .funcs = none }, { } };
SUTURE_PATCH(empty) = { .objs = objs };
"#;
    let e = parse_err(cc.patch("empty", src));
    assert!(e.contains("replaces no functions"), "{e}");

    let src = "#include <suture.h>\nSUTURE_PATCH(empty) = { .name = \"x\" };\n";
    let e = parse_err(cc.patch("empty2", src));
    assert!(e.contains("replaces no functions"), "{e}");
}

#[test]
fn duplicate_functions() {
    let cc = Cc::new();
    let src = SIMPLE_PATCH.replace(
        "{ .old_name = \"helper\", .new_func = other, .old_sympos = 2 },",
        "{ .old_name = \"helper\", .new_func = other, .old_sympos = 2 },\n\
         \t{ .old_name = \"helper\", .new_func = fixed_parse, .old_sympos = 2 },",
    );
    let e = parse_err(cc.patch("dup", &src));
    assert!(e.contains("`helper`") && e.contains("twice"), "{e}");

    // Same name, different sympos: fine.
    let src = SIMPLE_PATCH.replace(
        "{ .old_name = \"helper\", .new_func = other, .old_sympos = 2 },",
        "{ .old_name = \"helper\", .new_func = other, .old_sympos = 2 },\n\
         \t{ .old_name = \"helper\", .new_func = fixed_parse, .old_sympos = 1 },",
    );
    assert!(PatchFile::parse(cc.patch("dup2", &src), "dup2").is_ok());
}

#[test]
fn bad_build_id() {
    let cc = Cc::new();
    let src = SIMPLE_PATCH.replace(
        ".callbacks = { .pre_patch = pre } }",
        ".callbacks = { .pre_patch = pre }, .build_id = \"not-hex!\" }",
    );
    let e = parse_err(cc.patch("bid", &src));
    assert!(e.contains("build_id") && e.contains("not-hex!"), "{e}");
}

/// Index and file range of a section, via the `object` crate.
fn section_info(bytes: &[u8], name: &str) -> (usize, u64, u64) {
    let f = object::File::parse(bytes).unwrap();
    let s = f.section_by_name(name).unwrap();
    let (off, size) = s.file_range().unwrap();
    (s.index().0, off, size)
}

#[test]
fn bad_relocation_symbol_index() {
    let cc = Cc::new();
    let mut bytes = cc.patch("p", SIMPLE_PATCH);
    let (_, off, _) = section_info(&bytes, ".rela.suture.patch");
    // r_info of the first entry: symbol index in the high 32 bits.
    let at = off as usize + 8 + 4;
    bytes[at..at + 4].copy_from_slice(&0x7fffu32.to_le_bytes());
    let e = parse_err(bytes);
    assert!(e.contains("corrupt") && e.contains("symbol 32767"), "{e}");
}

#[test]
fn out_of_range_section_and_truncation() {
    let cc = Cc::new();
    let good = cc.patch("p", SIMPLE_PATCH);
    let (index, _, _) = section_info(&good, ".suture.patch");
    let shoff = u64::from_le_bytes(good[0x28..0x30].try_into().unwrap()) as usize;
    let mut bad = good.clone();
    let sh_offset = shoff + index * 64 + 24;
    bad[sh_offset..sh_offset + 8].copy_from_slice(&0xffff_ff00u64.to_le_bytes());
    let e = parse_err(bad);
    assert!(e.contains("past the end of the file"), "{e}");

    for len in [64, 100, good.len() / 2, good.len() - 1] {
        let e = parse_err(good[..len].to_vec());
        assert!(
            e.contains("corrupt") || e.contains("truncated"),
            "{len}: {e}"
        );
    }
}

#[test]
fn error_kinds() {
    let e = PatchFile::parse(b"nope".to_vec(), "x").unwrap_err();
    assert!(matches!(e, Error::Invalid(_)));
}
