//! Parse a patch file: a relocatable x86_64 ELF object carrying exactly one
//! `SUTURE_PATCH` descriptor (`struct suture_patch` in `.suture.patch`), the
//! ABI version in `.suture.abi` and optional `SUTURE_SYMBOL` aliases in
//! `.suture.symbols` (see `include/suture.h`).
//!
//! Pointer fields are not read as numbers: in a relocatable object they are
//! `R_X86_64_64` relocations, so each pointer is resolved through its
//! relocation to a place in the patch ([`SymRef::Section`]) or to an
//! undefined symbol ([`SymRef::Undefined`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use object::elf;

use crate::elf::{check_ident, RelObject, SymPlace};
use crate::error::{invalid, Error};

/// Section holding the `struct suture_patch` descriptor.
pub const PATCH_SECTION: &str = ".suture.patch";
/// Section holding the `unsigned int` ABI version.
pub const ABI_SECTION: &str = ".suture.abi";
/// Section holding `struct suture_symbol` entries.
pub const SYMBOLS_SECTION: &str = ".suture.symbols";
/// The ABI version this crate understands (`SUTURE_ABI_VERSION`).
pub const ABI_VERSION: u32 = 1;

const PATCH_SIZE: u64 = 32;
const OBJECT_SIZE: u64 = 56;
const FUNC_SIZE: u64 = 24;
const STATE_SIZE: u64 = 24;
const SYMBOL_SIZE: u64 = 32;

/// Longest string accepted from a descriptor (names, build ids).
const MAX_STRING: usize = 4096;
/// Most entries accepted in one descriptor array.
const MAX_ENTRIES: u64 = 65536;

/// Where a pointer of the patch points.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SymRef {
    /// `offset` bytes into ELF section `index` of the patch file.
    Section { index: usize, offset: u64 },
    /// An undefined symbol (resolved in the target) plus an addend.
    Undefined { name: String, addend: i64 },
}

/// The parsed `struct suture_patch`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PatchDesc {
    /// `.name`, or the patch file's stem when NULL.
    pub name: String,
    pub replace: bool,
    pub objects: Vec<ObjectDesc>,
    pub states: Vec<StateDesc>,
    /// `SUTURE_SYMBOL` aliases.
    pub symbols: Vec<SymbolAlias>,
}

/// One `struct suture_object`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectDesc {
    /// `None`: the main program.
    pub name: Option<String>,
    /// Lowercase hex GNU build-id the object must have.
    pub build_id: Option<String>,
    pub funcs: Vec<FuncDesc>,
    pub callbacks: CallbacksDesc,
    /// Where this `struct suture_object` itself lies (the argument its
    /// callbacks receive).
    pub desc: SymRef,
}

/// One `struct suture_func`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FuncDesc {
    pub old_name: String,
    pub old_sympos: u64,
    pub new_func: SymRef,
}

/// `struct suture_callbacks`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallbacksDesc {
    pub pre_patch: Option<SymRef>,
    pub post_patch: Option<SymRef>,
    pub pre_unpatch: Option<SymRef>,
    pub post_unpatch: Option<SymRef>,
}

/// One `struct suture_state`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateDesc {
    pub id: u64,
    pub version: u32,
    pub data: Option<SymRef>,
    /// Where this `struct suture_state` itself lies.
    pub desc: SymRef,
}

/// One `struct suture_symbol` (`SUTURE_SYMBOL(alias, object, name, sympos)`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SymbolAlias {
    pub alias: String,
    /// `None`: the main program.
    pub object: Option<String>,
    pub name: String,
    pub sympos: u64,
}

/// A parsed, validated patch file. Owns the file's bytes.
#[derive(Clone, Debug)]
pub struct PatchFile {
    pub(crate) elf: Arc<RelObject>,
    desc: PatchDesc,
}

impl PatchFile {
    /// Parse and validate a patch file. `file_stem` names the patch in
    /// messages and is its default name.
    pub fn parse(bytes: Vec<u8>, file_stem: &str) -> Result<PatchFile, Error> {
        let what = format!("patch `{file_stem}`");
        let e_type = check_ident(&bytes, &what)?;
        match e_type {
            elf::ET_REL => {}
            other => {
                let kind = match other {
                    elf::ET_DYN => "a shared object (or a position-independent executable)",
                    elf::ET_EXEC => "an executable",
                    elf::ET_CORE => "a core dump",
                    _ => "not a relocatable object",
                };
                return Err(invalid(format!(
                    "{what} is {kind}; a patch is a relocatable object built with `suture build` or `cc -c`"
                )));
            }
        }
        let elf = RelObject::parse(bytes, what)?;
        let desc = Reader::new(&elf).descriptor(file_stem)?;
        Ok(PatchFile {
            elf: Arc::new(elf),
            desc,
        })
    }

    /// Parse a relocatable object that carries no patch descriptor (suture's
    /// own runtime): it is laid out and linked like a patch, and its global
    /// functions are found with [`PatchFile::global`].
    pub fn parse_library(bytes: Vec<u8>, name: &str) -> Result<PatchFile, Error> {
        let what = format!("library `{name}`");
        if check_ident(&bytes, &what)? != elf::ET_REL {
            return Err(invalid(format!("{what} is not a relocatable object")));
        }
        let elf = RelObject::parse(bytes, what)?;
        Ok(PatchFile {
            elf: Arc::new(elf),
            desc: PatchDesc {
                name: name.to_string(),
                replace: false,
                objects: Vec::new(),
                states: Vec::new(),
                symbols: Vec::new(),
            },
        })
    }

    /// A global symbol defined in the object, as a descriptor pointer.
    pub fn global(&self, name: &str) -> Option<SymRef> {
        self.elf.symbols.iter().find_map(|sym| match sym.place {
            crate::elf::SymPlace::Section(index)
                if sym.name == name && sym.bind == elf::STB_GLOBAL =>
            {
                Some(SymRef::Section {
                    index,
                    offset: sym.value,
                })
            }
            _ => None,
        })
    }

    pub fn descriptor(&self) -> &PatchDesc {
        &self.desc
    }

    /// The name of ELF section `index` (for messages), if it exists.
    pub fn section_name(&self, index: usize) -> Option<&str> {
        self.elf.sections.get(index).map(|s| s.name.as_str())
    }
}

/// Reads descriptor structures, following pointers through relocations.
struct Reader<'a> {
    elf: &'a RelObject,
    /// (section, offset) -> relocation index in `elf.relocs[section]`;
    /// `usize::MAX` marks two relocations at one offset.
    rel_at: HashMap<(usize, u64), usize>,
}

impl<'a> Reader<'a> {
    fn new(elf: &'a RelObject) -> Self {
        let mut rel_at = HashMap::new();
        for (sec, list) in elf.relocs.iter().enumerate() {
            if !elf.sections[sec].is_alloc() {
                continue;
            }
            for (i, r) in list.iter().enumerate() {
                rel_at
                    .entry((sec, r.offset))
                    .and_modify(|v| *v = usize::MAX)
                    .or_insert(i);
            }
        }
        Reader { elf, rel_at }
    }

    fn what(&self) -> &str {
        &self.elf.what
    }

    fn sec_name(&self, sec: usize) -> &str {
        &self.elf.sections[sec].name
    }

    fn descriptor(&self, file_stem: &str) -> Result<PatchDesc, Error> {
        let what = self.what();
        let patch_secs = self.sections_named(PATCH_SECTION);
        if patch_secs.is_empty() {
            return Err(invalid(format!(
                "no SUTURE_PATCH descriptor found in {what} (no {PATCH_SECTION} section); declare one with SUTURE_PATCH from suture.h"
            )));
        }
        let total: u64 = patch_secs
            .iter()
            .map(|&s| self.elf.sections[s].size)
            .fold(0u64, |a, b| a.saturating_add(b));
        if total > PATCH_SIZE {
            return Err(invalid(format!(
                "{what} has more than one SUTURE_PATCH descriptor; a patch file declares exactly one"
            )));
        }
        if total < PATCH_SIZE || patch_secs.len() != 1 {
            return Err(invalid(format!(
                "{what} is corrupt: section {PATCH_SECTION} is {total} bytes, not one {PATCH_SIZE}-byte struct suture_patch"
            )));
        }
        self.check_abi()?;
        let psec = patch_secs[0];

        let name = match self.read_ptr(psec, 0, "the patch's .name")? {
            None => file_stem.to_string(),
            Some(r) => self.read_str(&r, "the patch's .name")?,
        };
        if name.is_empty() {
            return Err(invalid(format!("{what} has an empty .name")));
        }
        let objs = self.read_ptr(psec, 8, "the patch's .objs")?;
        let states = self.read_ptr(psec, 16, "the patch's .states")?;
        let replace = self.read_u32(psec, 24)? != 0;

        let objects = match objs {
            None => Vec::new(),
            Some(r) => self.objects(&r)?,
        };
        if objects.iter().all(|o| o.funcs.is_empty()) {
            return Err(invalid(format!(
                "{what} replaces no functions: its descriptor's .objs has no suture_func entries"
            )));
        }
        let states = match states {
            None => Vec::new(),
            Some(r) => self.states(&r)?,
        };
        let symbols = self.symbols()?;
        Ok(PatchDesc {
            name,
            replace,
            objects,
            states,
            symbols,
        })
    }

    fn sections_named(&self, name: &str) -> Vec<usize> {
        self.elf
            .sections
            .iter()
            .enumerate()
            .filter(|(_, s)| s.name == name)
            .map(|(i, _)| i)
            .collect()
    }

    fn check_abi(&self) -> Result<(), Error> {
        let what = self.what();
        let secs = self.sections_named(ABI_SECTION);
        if secs.is_empty() {
            return Err(invalid(format!(
                "{what} has no ABI version ({ABI_SECTION} section); declare the descriptor with SUTURE_PATCH from suture.h"
            )));
        }
        for s in secs {
            let size = self.elf.sections[s].size;
            if size == 0 || size % 4 != 0 {
                return Err(invalid(format!(
                    "{what} is corrupt: section {ABI_SECTION} is {size} bytes, not a 4-byte version"
                )));
            }
            let mut off = 0;
            while off < size {
                let v = self.read_u32(s, off)?;
                if v != ABI_VERSION {
                    return Err(invalid(format!(
                        "{what} was built for suture ABI version {v}, but this suture supports version {ABI_VERSION}; rebuild it with this suture's suture.h"
                    )));
                }
                off += 4;
            }
        }
        Ok(())
    }

    fn objects(&self, r: &SymRef) -> Result<Vec<ObjectDesc>, Error> {
        let what = self.what();
        let (sec, base) = self.array_start(r, "the patch's .objs")?;
        let mut objects: Vec<ObjectDesc> = Vec::new();
        for i in 0..MAX_ENTRIES {
            let at = self.entry(sec, base, i, OBJECT_SIZE, "the .objs array")?;
            let name_ref = self.read_ptr(sec, at, "an object's .name")?;
            let funcs_ref = self.read_ptr(sec, at + 8, "an object's .funcs")?;
            if name_ref.is_none() && funcs_ref.is_none() {
                return Ok(objects);
            }
            let name = match &name_ref {
                None => None,
                Some(r) => Some(self.read_str(r, "an object's .name")?),
            };
            let label = match &name {
                None => "the main program".to_string(),
                Some(n) => format!("object `{n}`"),
            };
            if name.as_deref() == Some("") {
                return Err(invalid(format!(
                    "{what} has an object with an empty .name; use NULL for the main program"
                )));
            }
            if objects.iter().any(|o| o.name == name) {
                return Err(invalid(format!(
                    "{what} lists {label} twice in .objs; put all of its functions in one entry"
                )));
            }
            let callbacks = CallbacksDesc {
                pre_patch: self.code_ptr(sec, at + 16, &label, "pre_patch callback")?,
                post_patch: self.code_ptr(sec, at + 24, &label, "post_patch callback")?,
                pre_unpatch: self.code_ptr(sec, at + 32, &label, "pre_unpatch callback")?,
                post_unpatch: self.code_ptr(sec, at + 40, &label, "post_unpatch callback")?,
            };
            let build_id = match self.read_ptr(sec, at + 48, "an object's .build_id")? {
                None => None,
                Some(r) => {
                    let s = self.read_str(&r, "an object's .build_id")?;
                    Some(parse_build_id(&s).ok_or_else(|| {
                        invalid(format!(
                            "{what} gives {label} the build_id \"{s}\", which is not a hex string (as printed by `readelf -n` or `file`)"
                        ))
                    })?)
                }
            };
            let funcs = match funcs_ref {
                None => Vec::new(),
                Some(r) => self.funcs(&r, &label)?,
            };
            objects.push(ObjectDesc {
                name,
                build_id,
                funcs,
                callbacks,
                desc: SymRef::Section {
                    index: sec,
                    offset: at,
                },
            });
        }
        Err(invalid(format!(
            "{what} has more than {MAX_ENTRIES} objects (missing terminator in .objs?)"
        )))
    }

    fn funcs(&self, r: &SymRef, label: &str) -> Result<Vec<FuncDesc>, Error> {
        let what = self.what();
        let (sec, base) = self.array_start(r, &format!("the .funcs of {label}"))?;
        let mut funcs: Vec<FuncDesc> = Vec::new();
        let mut seen = HashSet::new();
        for i in 0..MAX_ENTRIES {
            let at = self.entry(sec, base, i, FUNC_SIZE, "a .funcs array")?;
            let Some(name_ref) = self.read_ptr(sec, at, "a function's .old_name")? else {
                return Ok(funcs);
            };
            let old_name = self.read_str(&name_ref, "a function's .old_name")?;
            if old_name.is_empty() {
                return Err(invalid(format!(
                    "{what} has a function with an empty .old_name in {label}"
                )));
            }
            let old_sympos = self.read_u64(sec, at + 16)?;
            let new_func = self
                .code_ptr(sec, at + 8, label, &format!("new_func for `{old_name}`"))?
                .ok_or_else(|| {
                    invalid(format!(
                        "{what}: function `{old_name}` of {label} has no .new_func"
                    ))
                })?;
            if !seen.insert((old_name.clone(), old_sympos)) {
                let pos = if old_sympos == 0 {
                    String::new()
                } else {
                    format!(" (old_sympos {old_sympos})")
                };
                return Err(invalid(format!(
                    "{what} replaces function `{old_name}`{pos} of {label} twice"
                )));
            }
            funcs.push(FuncDesc {
                old_name,
                old_sympos,
                new_func,
            });
        }
        Err(invalid(format!(
            "{what} has more than {MAX_ENTRIES} functions in {label} (missing terminator?)"
        )))
    }

    fn states(&self, r: &SymRef) -> Result<Vec<StateDesc>, Error> {
        let what = self.what();
        let (sec, base) = self.array_start(r, "the patch's .states")?;
        let mut states: Vec<StateDesc> = Vec::new();
        for i in 0..MAX_ENTRIES {
            let at = self.entry(sec, base, i, STATE_SIZE, "the .states array")?;
            let id = self.read_u64(sec, at)?;
            if id == 0 {
                return Ok(states);
            }
            if states.iter().any(|s| s.id == id) {
                return Err(invalid(format!("{what} declares state id {id} twice")));
            }
            let version = self.read_u32(sec, at + 8)?;
            let data = self.read_ptr(sec, at + 16, "a state's .data")?;
            states.push(StateDesc {
                id,
                version,
                data,
                desc: SymRef::Section {
                    index: sec,
                    offset: at,
                },
            });
        }
        Err(invalid(format!(
            "{what} has more than {MAX_ENTRIES} states (missing terminator?)"
        )))
    }

    fn symbols(&self) -> Result<Vec<SymbolAlias>, Error> {
        let what = self.what();
        let mut out: Vec<SymbolAlias> = Vec::new();
        for sec in self.sections_named(SYMBOLS_SECTION) {
            let size = self.elf.sections[sec].size;
            if size % SYMBOL_SIZE != 0 {
                return Err(invalid(format!(
                    "{what} is corrupt: section {SYMBOLS_SECTION} is {size} bytes, not a multiple of {SYMBOL_SIZE}"
                )));
            }
            if size / SYMBOL_SIZE > MAX_ENTRIES {
                return Err(invalid(format!(
                    "{what} has more than {MAX_ENTRIES} SUTURE_SYMBOL entries"
                )));
            }
            let mut at = 0;
            while at < size {
                let alias = match self.read_ptr(sec, at, "a SUTURE_SYMBOL alias")? {
                    Some(r) => self.read_str(&r, "a SUTURE_SYMBOL alias")?,
                    None => {
                        return Err(invalid(format!(
                            "{what} has a SUTURE_SYMBOL entry without an alias"
                        )))
                    }
                };
                let object = match self.read_ptr(sec, at + 8, "a SUTURE_SYMBOL object")? {
                    Some(r) => Some(self.read_str(&r, "a SUTURE_SYMBOL object")?),
                    None => None,
                };
                let name = match self.read_ptr(sec, at + 16, "a SUTURE_SYMBOL name")? {
                    Some(r) => self.read_str(&r, "a SUTURE_SYMBOL name")?,
                    None => {
                        return Err(invalid(format!(
                            "{what}: SUTURE_SYMBOL `{alias}` has no symbol name"
                        )))
                    }
                };
                let sympos = self.read_u64(sec, at + 24)?;
                if alias.is_empty() || name.is_empty() {
                    return Err(invalid(format!(
                        "{what} has a SUTURE_SYMBOL entry with an empty alias or name"
                    )));
                }
                if out.iter().any(|a| a.alias == alias) {
                    return Err(invalid(format!(
                        "{what} declares SUTURE_SYMBOL `{alias}` twice"
                    )));
                }
                out.push(SymbolAlias {
                    alias,
                    object,
                    name,
                    sympos,
                });
                at += SYMBOL_SIZE;
            }
        }
        Ok(out)
    }

    /// A pointer to code (new_func, callbacks): must point into an
    /// executable section of the patch, or to an undefined symbol.
    fn code_ptr(
        &self,
        sec: usize,
        off: u64,
        label: &str,
        field: &str,
    ) -> Result<Option<SymRef>, Error> {
        let r = self.read_ptr(sec, off, field)?;
        if let Some(SymRef::Section { index, offset }) = &r {
            let s = &self.elf.sections[*index];
            if s.flags & u64::from(elf::SHF_EXECINSTR) == 0 || *offset >= s.size {
                return Err(invalid(format!(
                    "{}: the {field} of {label} does not point to code (it points into {}+{offset:#x})",
                    self.what(),
                    s.name
                )));
            }
        }
        Ok(r)
    }

    /// Check that an array pointer targets readable data of the patch.
    fn array_start(&self, r: &SymRef, field: &str) -> Result<(usize, u64), Error> {
        match r {
            SymRef::Section { index, offset } => Ok((*index, *offset)),
            SymRef::Undefined { name, .. } => Err(invalid(format!(
                "{}: {field} points to the undefined symbol `{name}`; descriptor arrays must be defined in the patch",
                self.what()
            ))),
        }
    }

    /// Offset of entry `i` of an array at `base` in `sec`, checked to lie
    /// within the section.
    fn entry(&self, sec: usize, base: u64, i: u64, size: u64, field: &str) -> Result<u64, Error> {
        let at = i
            .checked_mul(size)
            .and_then(|o| o.checked_add(base))
            .filter(|&at| at.checked_add(size).is_some());
        match at {
            Some(at) if at + size <= self.elf.sections[sec].size => Ok(at),
            _ => Err(invalid(format!(
                "{}: {field} runs past the end of section {} (missing terminator entry?)",
                self.what(),
                self.sec_name(sec)
            ))),
        }
    }

    fn read_bytes<const N: usize>(&self, sec: usize, off: u64) -> Result<[u8; N], Error> {
        let s = &self.elf.sections[sec];
        let end = off.checked_add(N as u64);
        if end.is_none_or(|e| e > s.size) {
            return Err(invalid(format!(
                "{} is corrupt: a read at {}+{off:#x} is past the end of the section",
                self.what(),
                s.name
            )));
        }
        let Some(data) = self.elf.section_data(sec) else {
            // NOBITS (or NULL): zeros.
            return Ok([0; N]);
        };
        let start = off as usize;
        let mut out = [0; N];
        out.copy_from_slice(&data[start..start + N]);
        Ok(out)
    }

    fn read_u64(&self, sec: usize, off: u64) -> Result<u64, Error> {
        self.reject_reloc(sec, off, 8)?;
        Ok(u64::from_le_bytes(self.read_bytes(sec, off)?))
    }

    fn read_u32(&self, sec: usize, off: u64) -> Result<u32, Error> {
        self.reject_reloc(sec, off, 4)?;
        Ok(u32::from_le_bytes(self.read_bytes(sec, off)?))
    }

    /// A plain integer field must not be relocated.
    fn reject_reloc(&self, sec: usize, off: u64, len: u64) -> Result<(), Error> {
        for o in off..off.saturating_add(len) {
            if self.rel_at.contains_key(&(sec, o)) {
                return Err(invalid(format!(
                    "{} is corrupt: the integer field at {}+{off:#x} has a relocation",
                    self.what(),
                    self.sec_name(sec)
                )));
            }
        }
        Ok(())
    }

    /// Read a pointer field through its relocation. `None` is NULL.
    fn read_ptr(&self, sec: usize, off: u64, field: &str) -> Result<Option<SymRef>, Error> {
        let what = self.what();
        let raw = u64::from_le_bytes(self.read_bytes(sec, off)?);
        let Some(&ri) = self.rel_at.get(&(sec, off)) else {
            if raw == 0 {
                return Ok(None);
            }
            return Err(invalid(format!(
                "{what}: {field} at {}+{off:#x} holds a fixed address instead of a pointer into the patch (no relocation)",
                self.sec_name(sec)
            )));
        };
        if ri == usize::MAX {
            return Err(invalid(format!(
                "{what} is corrupt: two relocations apply to {field} at {}+{off:#x}",
                self.sec_name(sec)
            )));
        }
        let r = &self.elf.relocs[sec][ri];
        if r.r_type != elf::R_X86_64_64 {
            return Err(invalid(format!(
                "{what} is corrupt: {field} at {}+{off:#x} has relocation {} instead of R_X86_64_64",
                self.sec_name(sec),
                crate::elf::reloc_name(r.r_type)
            )));
        }
        let sym = &self.elf.symbols[r.sym];
        match sym.place {
            SymPlace::Undefined if r.sym == 0 => {
                if r.addend == 0 {
                    Ok(None)
                } else {
                    Err(invalid(format!(
                        "{what}: {field} at {}+{off:#x} holds a fixed address instead of a pointer into the patch",
                        self.sec_name(sec)
                    )))
                }
            }
            SymPlace::Undefined => Ok(Some(SymRef::Undefined {
                name: sym.name.clone(),
                addend: r.addend,
            })),
            SymPlace::Section(index) => {
                let offset = sym.value.checked_add_signed(r.addend).ok_or_else(|| {
                    invalid(format!(
                        "{what} is corrupt: {field} at {}+{off:#x} points outside its target section",
                        self.sec_name(sec)
                    ))
                })?;
                if offset > self.elf.sections[index].size {
                    return Err(invalid(format!(
                        "{what} is corrupt: {field} points past the end of section {}",
                        self.sec_name(index)
                    )));
                }
                Ok(Some(SymRef::Section { index, offset }))
            }
            SymPlace::Absolute | SymPlace::Common => Err(invalid(format!(
                "{what}: {field} points to {} symbol `{}`, which suture cannot place; build with -fno-common",
                if sym.place == SymPlace::Common {
                    "the common"
                } else {
                    "the absolute"
                },
                sym.name
            ))),
        }
    }

    /// Read a NUL-terminated UTF-8 string from the patch.
    fn read_str(&self, r: &SymRef, field: &str) -> Result<String, Error> {
        let what = self.what();
        let (sec, off) = match r {
            SymRef::Section { index, offset } => (*index, *offset),
            SymRef::Undefined { name, .. } => {
                return Err(invalid(format!(
                    "{what}: {field} points to the undefined symbol `{name}` instead of a string in the patch"
                )))
            }
        };
        let s = &self.elf.sections[sec];
        let bytes: &[u8] = match self.elf.section_data(sec) {
            Some(d) => d.get(off as usize..).unwrap_or(&[]),
            None => {
                // NOBITS: an empty string if in range.
                if off < s.size {
                    &[0]
                } else {
                    &[]
                }
            }
        };
        let window = &bytes[..bytes.len().min(MAX_STRING + 1)];
        let Some(nul) = window.iter().position(|&b| b == 0) else {
            return Err(invalid(if window.len() > MAX_STRING {
                format!("{what}: {field} is longer than {MAX_STRING} bytes")
            } else {
                format!(
                    "{what} is corrupt: {field} is not NUL-terminated within section {}",
                    s.name
                )
            }));
        };
        String::from_utf8(window[..nul].to_vec())
            .map_err(|_| invalid(format!("{what}: {field} is not valid UTF-8")))
    }
}

/// Validate a build-id string: hex digits (either case, optional `0x`
/// prefix not allowed), an even number of them. Returns it lowercased.
fn parse_build_id(s: &str) -> Option<String> {
    if s.is_empty() || s.len() % 2 != 0 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some(s.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::parse_build_id;

    #[test]
    fn build_id_validation() {
        assert_eq!(parse_build_id("ABcd01").as_deref(), Some("abcd01"));
        assert_eq!(parse_build_id("abc"), None);
        assert_eq!(parse_build_id(""), None);
        assert_eq!(parse_build_id("zz"), None);
        assert_eq!(parse_build_id("0x12"), None);
    }
}
