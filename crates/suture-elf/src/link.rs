//! Lay out a patch as a memory image and link it at an address.
//!
//! The image has up to three page-aligned regions, in this order:
//!
//! 1. text (`r-x`): every executable section, then 16-byte PLT stubs;
//! 2. rodata (`r--`): read-only sections, then `.eh_frame` followed by a
//!    4-byte zero terminator (so it can be handed to `__register_frame`);
//! 3. data (`rw-`): writable sections, the GOT, then NOBITS sections
//!    (`.bss*`) and COMMON symbols.
//!
//! A GOT slot (8 bytes, holding the symbol's address) is made for every
//! symbol referenced through a GOT relocation (`R_X86_64_GOTPCREL*`, ...).
//! A PLT stub (`jmp *0(%rip)` followed by the 8-byte target) is reserved
//! for every undefined symbol called through `R_X86_64_PLT32`; the call uses
//! it only when the target is out of rel32 range.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use object::elf;

use crate::elf::{reloc_name, RelObject, SymPlace};
use crate::error::{Error, ResolveFailure};
use crate::patch::{PatchFile, SymRef};

/// Page size of the image's regions.
pub const PAGE_SIZE: u64 = 4096;
/// Largest image accepted (keeps every in-image reference within rel32).
const MAX_IMAGE: u64 = 1 << 30;
/// Size of one PLT stub.
const PLT_STUB_SIZE: u64 = 16;
/// The symbol naming the GOT itself.
const GOT_SYMBOL: &str = "_GLOBAL_OFFSET_TABLE_";

/// Memory protection of a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Prot {
    pub r: bool,
    pub w: bool,
    pub x: bool,
}

impl Prot {
    pub const RX: Prot = Prot {
        r: true,
        w: false,
        x: true,
    };
    pub const R: Prot = Prot {
        r: true,
        w: false,
        x: false,
    };
    pub const RW: Prot = Prot {
        r: true,
        w: true,
        x: false,
    };
}

/// A page-aligned part of the image (`offset` and `len` are multiples of
/// [`PAGE_SIZE`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Region {
    pub offset: u64,
    pub len: u64,
    pub prot: Prot,
}

/// How a relocation computes its value (psABI notation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Calc {
    /// Nothing to do.
    None,
    /// S + A
    Abs,
    /// S + A - P
    Pc,
    /// L + A - P (L: S, or a PLT stub when S is out of range)
    Plt,
    /// GOT + A - P
    GotPc,
    /// G + GOT + A - P (the slot's address)
    GotRel,
    /// S + A - GOT
    GotOff,
    /// G + A (the slot's offset in the GOT)
    GotEntry,
    /// L + A - GOT
    PltOff,
    /// Z + A
    Size,
}

/// How the value is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    W64,
    /// 32 bits, value must zero-extend.
    U32,
    /// 32 bits, value must sign-extend.
    S32,
}

impl Field {
    fn width(self) -> u64 {
        match self {
            Field::W64 => 8,
            Field::U32 | Field::S32 => 4,
        }
    }
}

fn is_tls_reloc(t: u32) -> bool {
    matches!(
        t,
        elf::R_X86_64_DTPMOD64
            | elf::R_X86_64_DTPOFF64
            | elf::R_X86_64_TPOFF64
            | elf::R_X86_64_TLSGD
            | elf::R_X86_64_TLSLD
            | elf::R_X86_64_DTPOFF32
            | elf::R_X86_64_GOTTPOFF
            | elf::R_X86_64_TPOFF32
            | elf::R_X86_64_GOTPC32_TLSDESC
            | elf::R_X86_64_TLSDESC_CALL
            | elf::R_X86_64_TLSDESC
            | elf::R_X86_64_CODE_4_GOTTPOFF
            | elf::R_X86_64_CODE_4_GOTPC32_TLSDESC
            | elf::R_X86_64_CODE_5_GOTTPOFF
            | elf::R_X86_64_CODE_5_GOTPC32_TLSDESC
            | elf::R_X86_64_CODE_6_GOTTPOFF
            | elf::R_X86_64_CODE_6_GOTPC32_TLSDESC
    )
}

fn classify(t: u32) -> Option<(Calc, Field)> {
    Some(match t {
        elf::R_X86_64_NONE => (Calc::None, Field::W64),
        elf::R_X86_64_64 => (Calc::Abs, Field::W64),
        elf::R_X86_64_PC32 => (Calc::Pc, Field::S32),
        elf::R_X86_64_PLT32 => (Calc::Plt, Field::S32),
        elf::R_X86_64_32 => (Calc::Abs, Field::U32),
        elf::R_X86_64_32S => (Calc::Abs, Field::S32),
        elf::R_X86_64_PC64 => (Calc::Pc, Field::W64),
        elf::R_X86_64_GOTPCREL
        | elf::R_X86_64_GOTPCRELX
        | elf::R_X86_64_REX_GOTPCRELX
        | elf::R_X86_64_CODE_4_GOTPCRELX
        | elf::R_X86_64_CODE_5_GOTPCRELX
        | elf::R_X86_64_CODE_6_GOTPCRELX => (Calc::GotRel, Field::S32),
        elf::R_X86_64_GOTPCREL64 => (Calc::GotRel, Field::W64),
        elf::R_X86_64_GOTPC32 => (Calc::GotPc, Field::S32),
        elf::R_X86_64_GOTPC64 => (Calc::GotPc, Field::W64),
        elf::R_X86_64_GOTOFF64 => (Calc::GotOff, Field::W64),
        elf::R_X86_64_GOT32 => (Calc::GotEntry, Field::U32),
        elf::R_X86_64_GOT64 | elf::R_X86_64_GOTPLT64 => (Calc::GotEntry, Field::W64),
        elf::R_X86_64_PLTOFF64 => (Calc::PltOff, Field::W64),
        elf::R_X86_64_SIZE32 => (Calc::Size, Field::U32),
        elf::R_X86_64_SIZE64 => (Calc::Size, Field::W64),
        _ => return None,
    })
}

/// What a relocation's symbol stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    /// An offset in the image.
    Image(u64),
    /// A fixed address.
    Abs(u64),
    /// An undefined symbol, resolved by the caller.
    Extern(String),
    /// `_GLOBAL_OFFSET_TABLE_`.
    GotBase,
}

/// Which part of the image a section goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Text,
    Rodata,
    EhFrame,
    Data,
    Bss,
}

/// The laid-out patch image, ready to be linked at any page-aligned base.
#[derive(Clone, Debug)]
pub struct Layout {
    elf: Arc<RelObject>,
    size: u64,
    regions: Vec<Region>,
    /// (offset, len) of the text region's used part.
    text: (u64, u64),
    section_off: Vec<Option<u64>>,
    /// Target of each symbol used by a relocation, by symbol index.
    targets: HashMap<usize, Target>,
    got_off: u64,
    /// Symbol index -> GOT slot offset (image offset).
    got_slots: Vec<(usize, u64)>,
    got_index: HashMap<usize, u64>,
    /// Symbol index -> PLT stub offset (image offset).
    plt_stubs: Vec<(usize, u64)>,
    plt_index: HashMap<usize, u64>,
    /// (offset, len) of `.eh_frame` including the zero terminator.
    eh_frame: Option<(u64, u64)>,
    undefined: Vec<String>,
    /// Undefined names only ever referenced weakly (0 when unresolved).
    weak: HashSet<String>,
}

/// A linked image: `bytes` is to be copied to `base` in the target, then
/// each region protected as given.
#[derive(Clone, Debug)]
pub struct LinkedImage {
    pub base: u64,
    /// The image, [`Layout::size`] bytes long; NOBITS parts are zero.
    pub bytes: Vec<u8>,
    pub regions: Vec<Region>,
    section_addr: Vec<Option<(u64, u64)>>,
    resolved: HashMap<String, u64>,
    eh_frame: Option<(u64, u64)>,
    text: (u64, u64),
    what: String,
}

fn align_up(v: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    v.checked_add(align - 1).map(|x| x & !(align - 1))
}

fn section_part(name: &str, sh_type: u32, flags: u64) -> Part {
    if name == ".eh_frame" || sh_type == elf::SHT_X86_64_UNWIND {
        Part::EhFrame
    } else if flags & u64::from(elf::SHF_EXECINSTR) != 0 {
        Part::Text
    } else if flags & u64::from(elf::SHF_WRITE) == 0 {
        Part::Rodata
    } else if sh_type == elf::SHT_NOBITS {
        Part::Bss
    } else {
        Part::Data
    }
}

impl PatchFile {
    /// Lay out the patch image, validating everything that does not depend
    /// on addresses (constructors, TLS, relocation types and offsets).
    pub fn layout(&self) -> Result<Layout, Error> {
        Layout::new(self.elf.clone())
    }
}

struct Placer {
    off: u64,
    what: String,
}

impl Placer {
    fn place(&mut self, align: u64, size: u64) -> Result<u64, Error> {
        let start = align_up(self.off, align.max(1));
        let end = start.and_then(|s| s.checked_add(size));
        match (start, end) {
            (Some(start), Some(end)) if end <= MAX_IMAGE => {
                self.off = end;
                Ok(start)
            }
            _ => Err(Error::Unsupported(format!(
                "{} is too large: its image would exceed {} MiB",
                self.what,
                MAX_IMAGE >> 20
            ))),
        }
    }

    fn page(&mut self) -> Result<u64, Error> {
        self.place(PAGE_SIZE, 0)
    }
}

impl Layout {
    fn new(elf: Arc<RelObject>) -> Result<Layout, Error> {
        let what = elf.what.clone();
        let nsec = elf.sections.len();

        // Sections: reject what a patch may not contain, sort the rest.
        let mut parts: Vec<Option<Part>> = vec![None; nsec];
        for (i, s) in elf.sections.iter().enumerate() {
            if !s.is_alloc() {
                continue;
            }
            let ctor = matches!(
                s.sh_type,
                elf::SHT_INIT_ARRAY | elf::SHT_FINI_ARRAY | elf::SHT_PREINIT_ARRAY
            ) || [
                ".ctors",
                ".dtors",
                ".init_array",
                ".fini_array",
                ".preinit_array",
            ]
            .iter()
            .any(|p| s.name == *p || s.name.starts_with(&format!("{p}.")))
                || s.name == ".init"
                || s.name == ".fini";
            if ctor {
                return Err(Error::Unsupported(format!(
                    "{what} has constructors or destructors (section {}); patches may not have them, use the pre_patch/post_patch callbacks instead",
                    s.name
                )));
            }
            if s.flags & u64::from(elf::SHF_TLS) != 0 {
                return Err(Error::Unsupported(format!(
                    "{what} defines thread-local variables (section {}); patches may not use thread-local storage",
                    s.name
                )));
            }
            if s.align > PAGE_SIZE {
                return Err(Error::Unsupported(format!(
                    "{what}: section {} needs {}-byte alignment; suture supports at most {PAGE_SIZE}",
                    s.name, s.align
                )));
            }
            let part = section_part(&s.name, s.sh_type, s.flags);
            if part == Part::Text && s.flags & u64::from(elf::SHF_WRITE) != 0 {
                return Err(Error::Unsupported(format!(
                    "{what}: section {} is both writable and executable, which suture does not map",
                    s.name
                )));
            }
            parts[i] = Some(part);
        }
        for s in &elf.symbols {
            if s.st_type == elf::STT_TLS {
                return Err(Error::Unsupported(format!(
                    "{what} uses the thread-local variable `{}`; patches may not use thread-local storage",
                    s.name
                )));
            }
            if s.st_type == elf::STT_GNU_IFUNC && s.place != SymPlace::Undefined {
                return Err(Error::Unsupported(format!(
                    "{what} defines the indirect function (ifunc) `{}`, which suture does not support",
                    s.name
                )));
            }
        }

        // Relocations: validate and collect GOT/PLT needs and targets.
        let mut got_syms: Vec<usize> = Vec::new();
        let mut plt_syms: Vec<usize> = Vec::new();
        let mut seen_got = HashSet::new();
        let mut seen_plt = HashSet::new();
        let mut undefined: Vec<String> = Vec::new();
        let mut seen_undef = HashSet::new();
        let mut strong = HashSet::new();
        let mut weak = HashSet::new();
        let mut syms_used: Vec<usize> = Vec::new();
        let mut seen_sym = HashSet::new();
        for (sec, list) in elf.relocs.iter().enumerate() {
            if parts[sec].is_none() {
                continue;
            }
            let s = &elf.sections[sec];
            for r in list {
                let at = || format!("{}+{:#x}", s.name, r.offset);
                if is_tls_reloc(r.r_type) {
                    return Err(Error::Unsupported(format!(
                        "{what} uses thread-local storage ({} against `{}` at {}); patches may not use thread-local storage",
                        reloc_name(r.r_type),
                        elf.symbol_display(r.sym),
                        at()
                    )));
                }
                let Some((calc, field)) = classify(r.r_type) else {
                    return Err(Error::Unsupported(format!(
                        "{what} has a relocation suture does not support ({} at {})",
                        reloc_name(r.r_type),
                        at()
                    )));
                };
                if calc == Calc::None {
                    continue;
                }
                if s.is_nobits() {
                    return Err(Error::Invalid(format!(
                        "{what} is corrupt: relocation at {} applies to a section without contents",
                        at()
                    )));
                }
                if r.offset
                    .checked_add(field.width())
                    .is_none_or(|e| e > s.size)
                {
                    return Err(Error::Invalid(format!(
                        "{what} is corrupt: relocation at {} is past the end of the section",
                        at()
                    )));
                }
                let sym = &elf.symbols[r.sym];
                if r.sym != 0 && sym.place == SymPlace::Undefined && sym.name != GOT_SYMBOL {
                    if sym.name.is_empty() {
                        return Err(Error::Invalid(format!(
                            "{what} is corrupt: relocation at {} refers to an undefined symbol without a name",
                            at()
                        )));
                    }
                    if seen_undef.insert(sym.name.clone()) {
                        undefined.push(sym.name.clone());
                    }
                    if sym.bind == elf::STB_WEAK {
                        weak.insert(sym.name.clone());
                    } else {
                        strong.insert(sym.name.clone());
                    }
                }
                if let SymPlace::Section(t) = sym.place {
                    if parts[t].is_none() {
                        return Err(Error::Invalid(format!(
                            "{what}: relocation at {} refers to section {}, which is not loaded into memory",
                            at(),
                            elf.sections[t].name
                        )));
                    }
                }
                if seen_sym.insert(r.sym) {
                    syms_used.push(r.sym);
                }
                let external = matches!(sym.place, SymPlace::Undefined | SymPlace::Absolute)
                    && r.sym != 0
                    && sym.name != GOT_SYMBOL;
                let needs_got = matches!(calc, Calc::GotRel | Calc::GotEntry);
                let needs_plt = external && matches!(calc, Calc::Plt | Calc::PltOff);
                if needs_got && seen_got.insert(r.sym) {
                    got_syms.push(r.sym);
                }
                if needs_plt && seen_plt.insert(r.sym) {
                    plt_syms.push(r.sym);
                }
            }
        }
        weak.retain(|n| !strong.contains(n));

        // COMMON symbols that are referenced get space in bss.
        let mut commons: Vec<usize> = Vec::new();
        for &si in &syms_used {
            let s = &elf.symbols[si];
            if s.place == SymPlace::Common {
                let align = s.value.max(1);
                if !align.is_power_of_two() || align > PAGE_SIZE {
                    return Err(Error::Invalid(format!(
                        "{what}: common symbol `{}` has an invalid alignment ({})",
                        s.name, s.value
                    )));
                }
                commons.push(si);
            }
        }

        // Place everything.
        let mut p = Placer {
            off: 0,
            what: what.clone(),
        };
        let mut section_off = vec![None; nsec];
        let mut place_part = |p: &mut Placer, part: Part| -> Result<(), Error> {
            for (i, s) in elf.sections.iter().enumerate() {
                if parts[i] == Some(part) {
                    section_off[i] = Some(p.place(s.align, s.size)?);
                }
            }
            Ok(())
        };
        let mut regions = Vec::new();
        let mut push_region = |start: u64, end: u64, prot: Prot| {
            if end > start {
                regions.push(Region {
                    offset: start,
                    len: end - start,
                    prot,
                });
            }
        };

        // Text.
        place_part(&mut p, Part::Text)?;
        let mut plt_index = HashMap::new();
        let mut plt_stubs = Vec::new();
        for &si in &plt_syms {
            let off = p.place(16, PLT_STUB_SIZE)?;
            plt_index.insert(si, off);
            plt_stubs.push((si, off));
        }
        let text = (0, p.off);
        let text_end = p.page()?;
        push_region(0, text_end, Prot::RX);

        // Read-only data, then .eh_frame and its terminator.
        place_part(&mut p, Part::Rodata)?;
        // The frame data starts at the first .eh_frame section.
        let eh_align = (0..nsec)
            .find(|&i| parts[i] == Some(Part::EhFrame))
            .map(|i| elf.sections[i].align);
        let eh_start = p.place(eh_align.unwrap_or(1), 0)?;
        place_part(&mut p, Part::EhFrame)?;
        let eh_frame = match eh_align {
            Some(_) => {
                let term = p.place(4, 4)?;
                Some((eh_start, term + 4 - eh_start))
            }
            None => None,
        };
        let ro_start = text_end;
        let ro_end = p.page()?;
        push_region(ro_start, ro_end, Prot::R);

        // Data, GOT, bss, commons.
        place_part(&mut p, Part::Data)?;
        let got_off = p.place(8, 0)?;
        let mut got_index = HashMap::new();
        let mut got_slots = Vec::new();
        for &si in &got_syms {
            let off = p.place(8, 8)?;
            got_index.insert(si, off);
            got_slots.push((si, off));
        }
        place_part(&mut p, Part::Bss)?;
        let mut common_off = HashMap::new();
        for &si in &commons {
            let s = &elf.symbols[si];
            common_off.insert(si, p.place(s.value.max(1), s.size)?);
        }
        let data_end = p.page()?;
        push_region(ro_end, data_end, Prot::RW);
        let size = data_end;

        // Relocation targets.
        let mut targets = HashMap::new();
        for &si in syms_used.iter().chain(&got_syms).chain(&plt_syms) {
            let s = &elf.symbols[si];
            let t = match s.place {
                _ if si == 0 => Target::Abs(0),
                SymPlace::Section(i) => match section_off[i] {
                    Some(o) => Target::Image(o.wrapping_add(s.value)),
                    None => {
                        return Err(Error::Invalid(format!(
                            "{what}: symbol `{}` is in section {}, which is not loaded into memory",
                            s.name, elf.sections[i].name
                        )))
                    }
                },
                SymPlace::Common => Target::Image(common_off[&si]),
                SymPlace::Absolute => Target::Abs(s.value),
                SymPlace::Undefined if s.name == GOT_SYMBOL => Target::GotBase,
                SymPlace::Undefined => Target::Extern(s.name.clone()),
            };
            targets.insert(si, t);
        }

        Ok(Layout {
            elf,
            size,
            regions,
            text,
            section_off,
            targets,
            got_off,
            got_slots,
            got_index,
            plt_stubs,
            plt_index,
            eh_frame,
            undefined,
            weak,
        })
    }

    /// Total size of the image in bytes (a multiple of [`PAGE_SIZE`]).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The image's regions, in address order: text (`r-x`), rodata and
    /// `.eh_frame` (`r--`), data, GOT and bss (`rw-`). Empty ones are left out.
    pub fn regions(&self) -> Vec<Region> {
        self.regions.clone()
    }

    /// Names of the undefined symbols the image references (each once, in
    /// order of first reference), i.e. what `resolve` will be asked for.
    pub fn undefined_symbols(&self) -> Vec<String> {
        self.undefined.clone()
    }

    /// Link the image at `base` (page-aligned). `resolve(name)` gives the
    /// absolute address of an undefined symbol; it is called once per name.
    /// A weak undefined symbol whose resolution fails becomes 0.
    pub fn link(
        &self,
        base: u64,
        resolve: &mut dyn FnMut(&str) -> Result<u64, ResolveFailure>,
    ) -> Result<LinkedImage, Error> {
        let elf = &*self.elf;
        let what = &elf.what;
        if base % PAGE_SIZE != 0 {
            return Err(Error::Link(format!(
                "cannot link {what} at {base:#x}: the address is not page-aligned"
            )));
        }
        if base.checked_add(self.size).is_none_or(|e| e > 1 << 63) {
            return Err(Error::Link(format!(
                "cannot link {what} at {base:#x}: the image does not fit in the address space"
            )));
        }

        let mut resolved = HashMap::new();
        for name in &self.undefined {
            let addr = match resolve(name) {
                Ok(a) => a,
                Err(_) if self.weak.contains(name) => 0,
                Err(failure) => {
                    return Err(Error::Resolve {
                        name: name.clone(),
                        failure,
                    })
                }
            };
            resolved.insert(name.clone(), addr);
        }

        let got_base = base + self.got_off;
        let sym_addr = |si: usize| -> u64 {
            match &self.targets[&si] {
                Target::Image(o) => base.wrapping_add(*o),
                Target::Abs(a) => *a,
                Target::Extern(n) => resolved[n],
                Target::GotBase => got_base,
            }
        };

        let mut bytes = vec![0u8; self.size as usize];
        for (i, off) in self.section_off.iter().enumerate() {
            if let (Some(off), Some(data)) = (off, elf.section_data(i)) {
                let off = *off as usize;
                bytes[off..off + data.len()].copy_from_slice(data);
            }
        }
        for &(si, off) in &self.got_slots {
            let off = off as usize;
            bytes[off..off + 8].copy_from_slice(&sym_addr(si).to_le_bytes());
        }
        for &(si, off) in &self.plt_stubs {
            let off = off as usize;
            let stub = &mut bytes[off..off + PLT_STUB_SIZE as usize];
            stub[..6].copy_from_slice(&[0xff, 0x25, 0, 0, 0, 0]); // jmp *0(%rip)
            stub[6..14].copy_from_slice(&sym_addr(si).to_le_bytes());
            stub[14..].copy_from_slice(&[0xcc, 0xcc]);
        }

        for (sec, list) in elf.relocs.iter().enumerate() {
            let Some(soff) = self.section_off[sec] else {
                continue;
            };
            let sname = &elf.sections[sec].name;
            for r in list {
                // Validated by `Layout::new`.
                let Some((calc, field)) = classify(r.r_type) else {
                    continue;
                };
                if calc == Calc::None {
                    continue;
                }
                let img_off = soff + r.offset;
                let p = base + img_off;
                let s = sym_addr(r.sym);
                let a = r.addend;
                let got_slot = || self.got_index[&r.sym];
                let plt = |direct_from: u64| -> u64 {
                    // L: the symbol itself if in range of `direct_from`, else its stub.
                    match self.plt_index.get(&r.sym) {
                        Some(&stub) => {
                            let d = s.wrapping_add_signed(a).wrapping_sub(direct_from) as i64;
                            if i32::try_from(d).is_ok() {
                                s
                            } else {
                                base + stub
                            }
                        }
                        None => s,
                    }
                };
                let value = match calc {
                    Calc::None => continue,
                    Calc::Abs => s.wrapping_add_signed(a),
                    Calc::Pc => s.wrapping_add_signed(a).wrapping_sub(p),
                    Calc::Plt => plt(p).wrapping_add_signed(a).wrapping_sub(p),
                    Calc::GotPc => got_base.wrapping_add_signed(a).wrapping_sub(p),
                    Calc::GotRel => (base + got_slot()).wrapping_add_signed(a).wrapping_sub(p),
                    Calc::GotOff => s.wrapping_add_signed(a).wrapping_sub(got_base),
                    Calc::GotEntry => (got_slot() - self.got_off).wrapping_add_signed(a),
                    // 64-bit: no range concern, so the stub is only used
                    // for external symbols.
                    Calc::PltOff => match self.plt_index.get(&r.sym) {
                        Some(&stub) => base + stub,
                        None => s,
                    }
                    .wrapping_add_signed(a)
                    .wrapping_sub(got_base),
                    Calc::Size => elf.symbols[r.sym].size.wrapping_add_signed(a),
                };
                let fits = match field {
                    Field::W64 => true,
                    Field::U32 => value <= u64::from(u32::MAX),
                    Field::S32 => i32::try_from(value as i64).is_ok(),
                };
                if !fits {
                    let sym = elf.symbol_display(r.sym);
                    let hint = match calc {
                        Calc::Pc | Calc::Abs => {
                            "; rebuild the patch with -fPIC so that references to the target's data go through the GOT"
                        }
                        _ => "",
                    };
                    return Err(Error::Link(format!(
                        "{what}: relocation {} against `{sym}` at {sname}+{:#x} overflows: {s:#x} is out of 32-bit range of the patch at {base:#x}{hint}",
                        reloc_name(r.r_type),
                        r.offset
                    )));
                }
                let o = img_off as usize;
                match field {
                    Field::W64 => bytes[o..o + 8].copy_from_slice(&value.to_le_bytes()),
                    Field::U32 | Field::S32 => {
                        bytes[o..o + 4].copy_from_slice(&(value as u32).to_le_bytes())
                    }
                }
            }
        }

        let section_addr = self
            .section_off
            .iter()
            .enumerate()
            .map(|(i, o)| o.map(|o| (base + o, elf.sections[i].size)))
            .collect();
        Ok(LinkedImage {
            base,
            bytes,
            regions: self.regions.clone(),
            section_addr,
            resolved,
            eh_frame: self.eh_frame.map(|(o, l)| (base + o, l)),
            text: (base + self.text.0, base + self.text.1),
            what: what.clone(),
        })
    }
}

impl LinkedImage {
    /// The address a descriptor pointer refers to: for a section reference
    /// `base` + the section's offset + `offset`; for an undefined symbol its
    /// resolved address + addend.
    pub fn address_of(&self, r: &SymRef) -> Result<u64, Error> {
        match r {
            SymRef::Section { index, offset } => match self.section_addr.get(*index) {
                Some(Some((addr, size))) if offset <= size => Ok(addr + offset),
                Some(Some(_)) => Err(Error::Link(format!(
                    "{}: offset {offset:#x} is past the end of section {index}",
                    self.what
                ))),
                _ => Err(Error::Link(format!(
                    "{}: section {index} is not part of the patch image",
                    self.what
                ))),
            },
            SymRef::Undefined { name, addend } => match self.resolved.get(name) {
                Some(a) => Ok(a.wrapping_add_signed(*addend)),
                None => Err(Error::Link(format!(
                    "{}: `{name}` was not resolved while linking",
                    self.what
                ))),
            },
        }
    }

    /// `[start, end)` of the code a descriptor pointer refers to, as far as
    /// this image can tell: from the address to the end of its section
    /// (patches are built with one section per function). `None` for
    /// undefined symbols, which are not part of the image.
    pub fn extent_of(&self, r: &SymRef) -> Option<(u64, u64)> {
        match r {
            SymRef::Section { index, offset } => match self.section_addr.get(*index) {
                Some(Some((addr, size))) if offset < size => Some((addr + offset, addr + size)),
                _ => None,
            },
            SymRef::Undefined { .. } => None,
        }
    }

    /// `(address, len)` of the `.eh_frame` data, including a 4-byte zero
    /// terminator at its end (suitable for `__register_frame`).
    pub fn eh_frame(&self) -> Option<(u64, u64)> {
        self.eh_frame
    }

    /// `(start, end)` addresses (end exclusive) of the code in the image:
    /// all executable sections and PLT stubs.
    pub fn text_range(&self) -> (u64, u64) {
        self.text
    }
}
