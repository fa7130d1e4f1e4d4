//! Corrupt input must give errors, never panics: mutate random bytes of real
//! files and parse (and lay out, and link) them thousands of times.

mod common;

use common::{Cc, SIMPLE_PATCH};
use object::{Object, ObjectSection};
use suture_elf::{ObjectFile, PatchFile, ResolveFailure};

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Iterations and seed, overridable for longer runs:
/// `SUTURE_MUTATE_ITERS=200000 SUTURE_MUTATE_SEED=7 cargo test --release --test mutate`.
fn params(iters: usize, seed: u64) -> (usize, u64) {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse().ok());
    (
        env("SUTURE_MUTATE_ITERS").unwrap_or(iters as u64) as usize,
        env("SUTURE_MUTATE_SEED").unwrap_or(seed),
    )
}

/// File ranges worth mutating more often than code: the ELF and program
/// headers, the section header table and every non-code section.
fn hot_ranges(bytes: &[u8]) -> Vec<(usize, usize)> {
    let f = object::File::parse(bytes).unwrap();
    let mut out = vec![(0, 64)];
    let shoff = u64::from_le_bytes(bytes[0x28..0x30].try_into().unwrap()) as usize;
    let shnum = u16::from_le_bytes([bytes[0x3c], bytes[0x3d]]) as usize;
    out.push((shoff, shoff + shnum * 64));
    let phoff = u64::from_le_bytes(bytes[0x20..0x28].try_into().unwrap()) as usize;
    let phnum = u16::from_le_bytes([bytes[0x38], bytes[0x39]]) as usize;
    if phnum > 0 {
        out.push((phoff, phoff + phnum * 56));
    }
    for s in f.sections() {
        if s.kind() == object::SectionKind::Text {
            continue;
        }
        if let Some((off, size)) = s.file_range() {
            if size > 0 {
                out.push((off as usize, (off + size) as usize));
            }
        }
    }
    out
}

/// Mutate 1-8 bytes (half of them in `hot` ranges): random values, bit
/// flips, or interesting integers; sometimes truncate.
fn mutate(rng: &mut Rng, good: &[u8], hot: &[(usize, usize)]) -> Vec<u8> {
    let mut b = good.to_vec();
    for _ in 0..1 + rng.below(8) {
        let at = if rng.below(2) == 0 {
            let (start, end) = hot[rng.below(hot.len())];
            start + rng.below(end - start)
        } else {
            rng.below(b.len())
        };
        match rng.below(4) {
            0 => b[at] = rng.next() as u8,
            1 => b[at] ^= 1 << rng.below(8),
            2 => b[at] = [0, 0xff, 0x7f, 0x80, 1][rng.below(5)],
            _ => {
                let v = [0u64, u64::MAX, 1 << 63, 0x7fff_ffff, 4096][rng.below(5)];
                let end = (at + 8).min(b.len());
                b[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
            }
        }
    }
    if rng.below(20) == 0 {
        b.truncate(rng.below(good.len()));
    }
    b
}

#[test]
fn mutated_patches_never_panic() {
    let cc = Cc::new();
    let good = cc.patch("simple", SIMPLE_PATCH);
    assert!(PatchFile::parse(good.clone(), "simple").is_ok());
    let hot = hot_ranges(&good);
    let (iters, seed) = params(5000, 0x5eed_1234_abcd_0001);
    let mut rng = Rng(seed | 1);
    let (mut parsed, mut linked) = (0, 0);
    for _ in 0..iters {
        let bytes = mutate(&mut rng, &good, &hot);
        let Ok(p) = PatchFile::parse(bytes, "m") else {
            continue;
        };
        parsed += 1;
        let Ok(layout) = p.layout() else {
            continue;
        };
        let _ = layout.undefined_symbols();
        if layout.size() > 16 << 20 {
            continue;
        }
        let fail = rng.below(4) == 0;
        let mut resolve = |name: &str| -> Result<u64, ResolveFailure> {
            if fail && name.len() % 2 == 0 {
                Err("nope".into())
            } else {
                Ok(0x7f00_0000_0000 + name.len() as u64 * 0x1000)
            }
        };
        if let Ok(img) = layout.link(0x7f12_0000_0000, &mut resolve) {
            linked += 1;
            let d = p.descriptor();
            for o in &d.objects {
                for f in &o.funcs {
                    let _ = img.address_of(&f.new_func);
                }
            }
            for s in &d.states {
                if let Some(r) = &s.data {
                    let _ = img.address_of(r);
                }
            }
            let _ = img.eh_frame();
            let _ = img.text_range();
        }
    }
    // The mutations must leave some files parseable, or this tests little.
    eprintln!("{iters} mutations: {parsed} parsed, {linked} linked");
    assert!(
        parsed > 100 && linked > 50,
        "parsed {parsed}, linked {linked}"
    );
}

#[test]
fn mutated_objects_never_panic() {
    let cc = Cc::new();
    cc.write("a.c", "static int helper(void) { return 1; }\nint a_fn(void) { return helper(); }\nint main(void) { return a_fn(); }\n");
    cc.cc(&["-O1", "-Wl,--build-id", "-rdynamic", "a.c", "-o", "a"]);
    let good = cc.read("a");
    assert!(ObjectFile::parse(&good).is_ok());
    let hot = hot_ranges(&good);
    let (iters, seed) = params(3000, 0x0b1e_c7f1_1e00_0002);
    let mut rng = Rng(seed | 1);
    let mut parsed = 0;
    for _ in 0..iters {
        let bytes = mutate(&mut rng, &good, &hot);
        let Ok(o) = ObjectFile::parse(&bytes) else {
            continue;
        };
        parsed += 1;
        let _ = o.build_id();
        let _ = o.soname();
        let _ = o.lookup("helper", 0);
        let _ = o.lookup("helpr", 0);
        let _ = o.lookup("a_fn", 3);
        let _ = o.lookup_export("a_fn");
        let _ = o.symbol_at(rng.next() % 0x10000);
        let _ = o.load_bias(0x5555_0000_0000, rng.next() & 0xf000);
    }
    eprintln!("{iters} mutations: {parsed} parsed");
    assert!(parsed > 100, "parsed {parsed}");
}
