//! Plans patch sites on real compiler output: a small C file is built with the
//! system `cc` (skipped when there is none) and every function symbol of the
//! result is planned. The ELF file is read with a minimal section-header
//! parser; addresses are mapped through section headers.

use std::path::PathBuf;
use std::process::Command;

use super::*;

const SOURCE: &str = r#"
int counter;
__attribute__((noinline)) int g0(int x) { counter += x; return counter * 3; }
__attribute__((noinline)) int g1(int x) { counter -= x; return counter ^ 5; }
__attribute__((noinline)) int g2(int x) { counter *= x; return counter + 11; }
__attribute__((noinline)) int g3(int x) { counter |= x; return counter - 2; }

int zero(void) { return 0; }
int add(int a, int b) { return a + b; }
int bump(void) { return ++counter; }
int sw(int x, int y) {
    switch (x) {
    case 0: return g0(y);
    case 1: return g1(y) + 1;
    case 2: return g2(y) * 2;
    case 3: return g3(y) - 3;
    case 4: return g0(y + 4);
    case 5: return g1(y * 5);
    case 6: return g2(y ^ 6);
    case 7: return g3(y | 7);
    default: return -1;
    }
}
long sum(const long *p, long n) { long s = 0; for (long i = 0; i < n; i++) s += p[i] * i; return s; }
int spin(volatile int *p) { while (*p) ; return 1; }
int caller(int x) { return g0(x) + g1(x); }
"#;

struct Elf {
    bytes: Vec<u8>,
    /// (addr, size, file offset) of allocated sections with file contents.
    sections: Vec<(u64, u64, u64)>,
    /// (name, addr, size) of function symbols.
    funcs: Vec<(String, u64, u64)>,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

impl Elf {
    fn parse(bytes: Vec<u8>) -> Elf {
        assert_eq!(&bytes[..4], b"\x7fELF");
        let shoff = u64_at(&bytes, 0x28) as usize;
        let shentsize = u16_at(&bytes, 0x3A) as usize;
        let shnum = u16_at(&bytes, 0x3C) as usize;
        let sh = |i: usize| shoff + i * shentsize;
        let mut sections = Vec::new();
        let mut funcs = Vec::new();
        for i in 0..shnum {
            let h = sh(i);
            let (ty, addr, off, size) = (
                u32_at(&bytes, h + 4),
                u64_at(&bytes, h + 16),
                u64_at(&bytes, h + 24),
                u64_at(&bytes, h + 32),
            );
            if addr != 0 && ty != 8 {
                sections.push((addr, size, off));
            }
            if ty == 2 {
                // SHT_SYMTAB; sh_link is the string table.
                let strtab = sh(u32_at(&bytes, h + 40) as usize);
                let stroff = u64_at(&bytes, strtab + 24) as usize;
                for s in (off as usize..(off + size) as usize).step_by(24) {
                    let (name, info, value, sz) = (
                        u32_at(&bytes, s) as usize,
                        bytes[s + 4],
                        u64_at(&bytes, s + 8),
                        u64_at(&bytes, s + 16),
                    );
                    if info & 0xF == 2 && sz > 0 && value != 0 {
                        let start = stroff + name;
                        let end = start + bytes[start..].iter().position(|&c| c == 0).unwrap();
                        let name = String::from_utf8_lossy(&bytes[start..end]).into_owned();
                        funcs.push((name, value, sz));
                    }
                }
            }
        }
        Elf {
            bytes,
            sections,
            funcs,
        }
    }
}

impl Memory for Elf {
    fn read(&self, addr: u64, len: usize) -> Option<Vec<u8>> {
        self.sections.iter().find_map(|&(a, size, off)| {
            let rel = addr.checked_sub(a)?;
            if rel.checked_add(len as u64)? > size {
                return None;
            }
            let start = (off + rel) as usize;
            self.bytes.get(start..start + len).map(<[u8]>::to_vec)
        })
    }
}

/// Compiles SOURCE with `flags`; `None` if the compiler is unavailable.
fn compile(tag: &str, flags: &[&str]) -> Option<Elf> {
    let dir = std::env::temp_dir().join(format!("suture-x86-cc-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let src: PathBuf = dir.join("f.c");
    let out: PathBuf = dir.join("f.out");
    std::fs::write(&src, SOURCE).ok()?;
    let status = Command::new("cc")
        .args(flags)
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .status()
        .ok()?;
    let bytes = std::fs::read(&out).ok();
    let _ = std::fs::remove_dir_all(&dir);
    if !status.success() {
        eprintln!("cc {flags:?} failed; skipping");
        return None;
    }
    Some(Elf::parse(bytes?))
}

fn check_build(tag: &str, flags: &[&str], endbr: bool) {
    let Some(elf) = compile(tag, flags) else {
        eprintln!("no usable C compiler; skipping {tag}");
        return;
    };
    let mut seen_table = false;
    for (name, addr, size) in &elf.funcs {
        let code = elf.read(*addr, *size as usize).expect("function bytes");
        let result = plan_site(*addr, &code, &elf);
        eprintln!("{tag} {name} ({size} bytes): {result:?}");
        match name.as_str() {
            "zero" | "add" => assert!(matches!(result, Err(PlanError::TooSmall { .. }))),
            // With endbr64, GCC aligns the loop head with a 4-byte nop:
            // `endbr64; nopl 0(%rax); L: mov (%rdi),%eax; test; jne L` —
            // L (+0x8) is inside the site +0x4..+0xa, so this must be refused.
            "spin" if endbr => assert!(
                matches!(result, Err(PlanError::BranchIntoSite { .. })),
                "{result:?}"
            ),
            "bump" | "caller" | "sum" | "sw" | "spin" => {
                let p = result.unwrap_or_else(|e| panic!("{tag} {name}: {e}"));
                assert_eq!(p.has_endbr(), endbr, "{name}");
                let at = addr + 0x10_0000;
                let reloc = p.relocated_original(at).unwrap();
                assert!(reloc.len() <= p.max_relocated_len());
            }
            _ => {}
        }
        if name == "sw" {
            let instrs = sweep(*addr, &code).instrs;
            let found = tables::find_jump_tables(&instrs);
            assert_eq!(found.len(), 1, "{tag}: jump table of sw not found");
            let mut entries = 0;
            tables::read_entries(&found[0], &elf, MAX_JUMP_TABLE_ENTRIES, |_, t| {
                if t.wrapping_sub(*addr) < *size {
                    entries += 1;
                    tables::Visit::Continue
                } else {
                    tables::Visit::Stop
                }
            });
            assert!(entries >= 8, "{tag}: only {entries} jump table entries");
            seen_table = true;
        }
    }
    assert!(seen_table, "{tag}: function sw not found");
}

#[test]
fn gcc_pic_shared_object() {
    check_build(
        "pic",
        &[
            "-O2",
            "-fPIC",
            "-shared",
            "-nostdlib",
            "-fcf-protection=none",
        ],
        false,
    );
}

#[test]
fn gcc_pic_shared_object_with_endbr() {
    check_build(
        "pic-cet",
        &[
            "-O2",
            "-fPIC",
            "-shared",
            "-nostdlib",
            "-fcf-protection=full",
        ],
        true,
    );
}

#[test]
fn gcc_non_pic_executable() {
    check_build(
        "nopic",
        &[
            "-O2",
            "-fno-pic",
            "-no-pie",
            "-static",
            "-nostdlib",
            "-fcf-protection=none",
            "-Wl,-e,zero",
        ],
        false,
    );
}
