//! Symbols of the target's objects: executables and shared objects on disk.
//!
//! Addresses here are link-time virtual addresses (`st_value`); add the
//! object's load bias ([`ObjectFile::load_bias`]) for run-time addresses.

use std::collections::HashMap;
use std::fmt;

use object::elf;
use object::read::elf::{Dyn, FileHeader, NoteIterator, ProgramHeader, SectionHeader, Sym};
use object::LittleEndian as LE;

use crate::elf::{check_ident, Header};
use crate::error::{invalid, Error};

const WHAT: &str = "the object";
/// How many entries `symbol_at` looks back for a containing function.
const CONTAINING_LOOKBACK: usize = 64;

/// What a symbol is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SymKind {
    Func,
    Object,
    /// `STT_GNU_IFUNC`: the address is the resolver's, not the function's.
    Ifunc,
    Other,
}

/// A defined symbol of an object.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Symbol {
    pub name: String,
    /// Link-time address (add the load bias for the run-time address).
    pub vaddr: u64,
    pub size: u64,
    pub kind: SymKind,
    pub local: bool,
    /// 1-based position among the candidates of [`ObjectFile::lookup`] with
    /// this name; 0 if the symbol is not such a candidate.
    pub sympos: u64,
}

/// A `PT_LOAD` segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Segment {
    pub vaddr: u64,
    pub memsz: u64,
    pub offset: u64,
    pub filesz: u64,
    /// `p_flags`: `PF_X` (1), `PF_W` (2), `PF_R` (4).
    pub flags: u32,
}

impl Segment {
    pub fn readable(&self) -> bool {
        self.flags & elf::PF_R != 0
    }
    pub fn writable(&self) -> bool {
        self.flags & elf::PF_W != 0
    }
    pub fn executable(&self) -> bool {
        self.flags & elf::PF_X != 0
    }
}

/// Why [`ObjectFile::lookup`] failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    #[error("{}", not_found_msg(name, suggestions))]
    NotFound {
        name: String,
        /// Up to 5 close names (by edit distance).
        suggestions: Vec<String>,
    },
    #[error("{}", ambiguous_msg(name, candidates))]
    Ambiguous {
        name: String,
        candidates: Vec<Symbol>,
    },
    #[error("sympos {sympos} for `{name}` is out of range: there {}", count_msg(*count))]
    SymposOutOfRange {
        name: String,
        sympos: u64,
        count: u64,
    },
}

fn count_msg(count: u64) -> String {
    if count == 1 {
        "is only 1 symbol with that name".into()
    } else {
        format!("are only {count} symbols with that name")
    }
}

fn not_found_msg(name: &str, suggestions: &[String]) -> String {
    if suggestions.is_empty() {
        format!("no symbol `{name}` found")
    } else {
        let list: Vec<String> = suggestions.iter().map(|s| format!("`{s}`")).collect();
        format!(
            "no symbol `{name}` found (did you mean {}?)",
            list.join(", ")
        )
    }
}

fn ambiguous_msg(name: &str, candidates: &[Symbol]) -> String {
    let list: Vec<String> = candidates
        .iter()
        .map(|c| {
            format!(
                "sympos {}: {:#x} {}",
                c.sympos,
                c.vaddr,
                if c.local { "local" } else { "global" }
            )
        })
        .collect();
    format!(
        "`{name}` is ambiguous: {} symbols have that name ({}); set .old_sympos (or SUTURE_SYMBOL's sympos) to pick one",
        candidates.len(),
        list.join(", ")
    )
}

/// An exported (`.dynsym`) definition.
#[derive(Clone, Debug)]
struct Export {
    sym: Symbol,
    /// Its version is hidden (`name@VER`, not `name@@VER`).
    hidden: bool,
}

/// A parsed executable or shared object (owns what it needs, not the bytes).
#[derive(Clone, Debug)]
pub struct ObjectFile {
    e_type: u16,
    build_id: Option<String>,
    soname: Option<String>,
    has_symtab: bool,
    segments: Vec<Segment>,
    /// Lookup candidates, in table order (`.symtab`, or `.dynsym` if none).
    symbols: Vec<Symbol>,
    by_name: HashMap<String, Vec<usize>>,
    /// Indices of FUNC/IFUNC symbols with a size, sorted by (vaddr, global last).
    by_addr: Vec<usize>,
    exports: HashMap<String, Vec<Export>>,
}

fn sym_kind(t: u8) -> Option<SymKind> {
    match t {
        elf::STT_FUNC => Some(SymKind::Func),
        elf::STT_OBJECT => Some(SymKind::Object),
        elf::STT_GNU_IFUNC => Some(SymKind::Ifunc),
        elf::STT_NOTYPE => Some(SymKind::Other),
        _ => None,
    }
}

fn corrupt(detail: impl fmt::Display) -> Error {
    invalid(format!("{WHAT} is corrupt: {detail}"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn build_id_from_notes(mut notes: NoteIterator<'_, elf::FileHeader64<LE>>) -> Option<String> {
    while let Ok(Some(note)) = notes.next() {
        if note.name() == elf::ELF_NOTE_GNU
            && note.n_type(LE) == elf::NT_GNU_BUILD_ID
            && !note.desc().is_empty()
        {
            return Some(hex(note.desc()));
        }
    }
    None
}

impl ObjectFile {
    /// Parse an x86_64 executable (`ET_EXEC`) or shared object / PIE (`ET_DYN`).
    pub fn parse(bytes: &[u8]) -> Result<ObjectFile, Error> {
        let e_type = check_ident(bytes, WHAT)?;
        if e_type != elf::ET_EXEC && e_type != elf::ET_DYN {
            let kind = match e_type {
                elf::ET_REL => "a relocatable object (.o)",
                elf::ET_CORE => "a core dump",
                _ => "of an unknown type",
            };
            return Err(invalid(format!(
                "{WHAT} is {kind}, not an executable or shared object"
            )));
        }
        let endian = LE;
        let header = Header::parse(bytes).map_err(corrupt)?;
        let phdrs = header.program_headers(endian, bytes).map_err(corrupt)?;
        let table = header.sections(endian, bytes).map_err(corrupt)?;

        let segments: Vec<Segment> = phdrs
            .iter()
            .filter(|p| p.p_type(endian) == elf::PT_LOAD)
            .map(|p| Segment {
                vaddr: p.p_vaddr(endian),
                memsz: p.p_memsz(endian),
                offset: p.p_offset(endian),
                filesz: p.p_filesz(endian),
                flags: p.p_flags(endian),
            })
            .collect();

        // Build id: note sections, else PT_NOTE segments.
        let mut build_id = None;
        for sh in table.iter() {
            if let Ok(Some(notes)) = sh.notes(endian, bytes) {
                build_id = build_id_from_notes(notes);
                if build_id.is_some() {
                    break;
                }
            }
        }
        if build_id.is_none() {
            for ph in phdrs {
                if let Ok(Some(notes)) = ph.notes(endian, bytes) {
                    build_id = build_id_from_notes(notes);
                    if build_id.is_some() {
                        break;
                    }
                }
            }
        }

        // DT_SONAME.
        let mut soname = None;
        for sh in table.iter() {
            let Ok(Some((dynamic, link))) = sh.dynamic(endian, bytes) else {
                continue;
            };
            let Ok(strings) = table.strings(endian, bytes, link) else {
                continue;
            };
            for d in dynamic {
                let tag = d.d_tag(endian);
                if tag == elf::DT_NULL {
                    break;
                }
                if tag == elf::DT_SONAME {
                    if let Ok(s) = strings.get(d.d_val(endian) as u32) {
                        soname = Some(String::from_utf8_lossy(s).into_owned());
                    }
                }
            }
        }

        let symtab = table
            .symbols(endian, bytes, elf::SHT_SYMTAB)
            .map_err(corrupt)?;
        let dynsym = table
            .symbols(endian, bytes, elf::SHT_DYNSYM)
            .map_err(corrupt)?;
        let has_symtab = !symtab.is_empty();

        // Lookup candidates.
        let lookup_table = if has_symtab { &symtab } else { &dynsym };
        let mut symbols = Vec::new();
        let mut by_name: HashMap<String, Vec<usize>> = HashMap::new();
        for sym in lookup_table.iter() {
            let shndx = sym.st_shndx(endian);
            if shndx == elf::SHN_UNDEF || shndx == elf::SHN_ABS || shndx == elf::SHN_COMMON {
                continue;
            }
            let Some(kind) = sym_kind(sym.st_type()) else {
                continue;
            };
            let Ok(name) = lookup_table.symbol_name(endian, sym) else {
                continue;
            };
            if name.is_empty() {
                continue;
            }
            let name = String::from_utf8_lossy(name).into_owned();
            let list = by_name.entry(name.clone()).or_default();
            let index = symbols.len();
            list.push(index);
            symbols.push(Symbol {
                name,
                vaddr: sym.st_value(endian),
                size: sym.st_size(endian),
                kind,
                local: sym.st_bind() == elf::STB_LOCAL,
                sympos: list.len() as u64,
            });
        }
        let mut by_addr: Vec<usize> = (0..symbols.len())
            .filter(|&i| {
                let s = &symbols[i];
                matches!(s.kind, SymKind::Func | SymKind::Ifunc) && s.size > 0
            })
            .collect();
        by_addr.sort_by_key(|&i| (symbols[i].vaddr, !symbols[i].local, i));

        // Exports from .dynsym with their version visibility.
        let versym = table
            .iter()
            .find_map(|sh| sh.gnu_versym(endian, bytes).ok().flatten())
            .map(|(v, _)| v);
        let mut exports: HashMap<String, Vec<Export>> = HashMap::new();
        for (i, sym) in dynsym.enumerate() {
            let shndx = sym.st_shndx(endian);
            if shndx == elf::SHN_UNDEF || shndx == elf::SHN_ABS || shndx == elf::SHN_COMMON {
                continue;
            }
            if !matches!(
                sym.st_bind(),
                elf::STB_GLOBAL | elf::STB_WEAK | elf::STB_GNU_UNIQUE
            ) {
                continue;
            }
            let Some(kind) = sym_kind(sym.st_type()) else {
                continue;
            };
            let ver = versym
                .and_then(|v| v.get(i.0))
                .map(|v| v.0.get(endian))
                .unwrap_or(elf::VER_NDX_GLOBAL);
            if ver & elf::VERSYM_VERSION == elf::VER_NDX_LOCAL {
                continue;
            }
            let Ok(name) = dynsym.symbol_name(endian, sym) else {
                continue;
            };
            if name.is_empty() {
                continue;
            }
            let name = String::from_utf8_lossy(name).into_owned();
            let vaddr = sym.st_value(endian);
            let sympos = by_name
                .get(&name)
                .and_then(|l| l.iter().find(|&&c| symbols[c].vaddr == vaddr))
                .map(|&c| symbols[c].sympos)
                .unwrap_or(0);
            exports.entry(name.clone()).or_default().push(Export {
                sym: Symbol {
                    name,
                    vaddr,
                    size: sym.st_size(endian),
                    kind,
                    local: false,
                    sympos,
                },
                hidden: ver & elf::VERSYM_HIDDEN != 0,
            });
        }

        Ok(ObjectFile {
            e_type,
            build_id,
            soname,
            has_symtab,
            segments,
            symbols,
            by_name,
            by_addr,
            exports,
        })
    }

    /// Lowercase hex of the `NT_GNU_BUILD_ID` note.
    pub fn build_id(&self) -> Option<String> {
        self.build_id.clone()
    }

    /// `DT_SONAME`, for shared objects that have one.
    pub fn soname(&self) -> Option<String> {
        self.soname.clone()
    }

    /// `ET_EXEC`: a non-PIE executable, loaded at its link-time addresses
    /// (load bias 0).
    pub fn is_exec(&self) -> bool {
        self.e_type == elf::ET_EXEC
    }

    /// Whether the object has a `.symtab` (is not stripped).
    pub fn has_symtab(&self) -> bool {
        self.has_symtab
    }

    /// The `PT_LOAD` segments, in program header order.
    pub fn segments(&self) -> Vec<Segment> {
        self.segments.clone()
    }

    /// The load bias (run-time address − link-time address), given one
    /// mapping of the file: it starts at `map_start` and maps file offset
    /// `map_offset` (as in `/proc/PID/maps`). `None` if no segment maps
    /// that offset. Prefer the file's first mapping (offset 0): when two
    /// segments share a file page, a mapping of that page is taken to belong
    /// to the first of them.
    pub fn load_bias(&self, map_start: u64, map_offset: u64) -> Option<u64> {
        const PAGE: u64 = 4096;
        let page_down = |v: u64| v & !(PAGE - 1);
        let usable = |s: &&Segment| s.filesz > 0 && (s.vaddr.wrapping_sub(s.offset)) % PAGE == 0;
        // A mapping usually starts where a segment's first page does; a
        // mapping split by mprotect (RELRO) starts inside a segment.
        let seg = self
            .segments
            .iter()
            .filter(usable)
            .find(|s| page_down(s.offset) == map_offset)
            .or_else(|| {
                self.segments.iter().filter(usable).find(|s| {
                    page_down(s.offset) <= map_offset
                        && s.offset
                            .checked_add(s.filesz)
                            .is_some_and(|e| map_offset < e)
                })
            })?;
        // The link-time address that file offset `map_offset` maps to.
        let vaddr = seg.vaddr.wrapping_sub(seg.offset).wrapping_add(map_offset);
        Some(map_start.wrapping_sub(vaddr))
    }

    /// Find the `sympos`-th symbol called `name` (0: it must be unique).
    /// Candidates are the defined FUNC/OBJECT/IFUNC/NOTYPE symbols of
    /// `.symtab` (locals included), or of `.dynsym` when there is no
    /// `.symtab`, in table order.
    pub fn lookup(&self, name: &str, sympos: u64) -> Result<Symbol, LookupError> {
        let Some(cands) = self.by_name.get(name) else {
            return Err(LookupError::NotFound {
                name: name.to_string(),
                suggestions: self.suggestions(name),
            });
        };
        let count = cands.len() as u64;
        match sympos {
            0 if count == 1 => Ok(self.symbols[cands[0]].clone()),
            0 => Err(LookupError::Ambiguous {
                name: name.to_string(),
                candidates: cands.iter().map(|&i| self.symbols[i].clone()).collect(),
            }),
            n if n <= count => Ok(self.symbols[cands[(n - 1) as usize]].clone()),
            n => Err(LookupError::SymposOutOfRange {
                name: name.to_string(),
                sympos: n,
                count,
            }),
        }
    }

    /// The exported definition of `name` in `.dynsym` (GLOBAL, WEAK or
    /// UNIQUE), as the dynamic linker would bind an unversioned reference:
    /// the default version (`name@@VER`) rather than hidden ones.
    pub fn lookup_export(&self, name: &str) -> Option<Symbol> {
        let list = self.exports.get(name)?;
        list.iter()
            .find(|e| !e.hidden)
            .or_else(|| list.first())
            .map(|e| e.sym.clone())
    }

    /// The functions with a size (FUNC symbols, locals included), by
    /// address; a function with several names appears once per name.
    pub fn functions(&self) -> impl Iterator<Item = &Symbol> {
        self.by_addr
            .iter()
            .map(|&i| &self.symbols[i])
            .filter(|s| s.kind == SymKind::Func)
    }

    /// The function containing link-time address `vaddr`, and the offset of
    /// `vaddr` in it. Globals are preferred over locals at the same address.
    pub fn symbol_at(&self, vaddr: u64) -> Option<(Symbol, u64)> {
        let end = self
            .by_addr
            .partition_point(|&i| self.symbols[i].vaddr <= vaddr);
        self.by_addr[..end]
            .iter()
            .rev()
            .take(CONTAINING_LOOKBACK)
            .map(|&i| &self.symbols[i])
            .find(|s| vaddr - s.vaddr < s.size)
            .map(|s| (s.clone(), vaddr - s.vaddr))
    }

    /// Up to 5 FUNC/OBJECT/IFUNC names close to `name` by edit distance.
    fn suggestions(&self, name: &str) -> Vec<String> {
        let max = (name.chars().count() / 3).max(2);
        let mut scored: Vec<(usize, &str)> = self
            .by_name
            .iter()
            .filter(|(_, idx)| {
                idx.iter().any(|&i| {
                    matches!(
                        self.symbols[i].kind,
                        SymKind::Func | SymKind::Object | SymKind::Ifunc
                    )
                })
            })
            .filter_map(|(n, _)| {
                let d = edit_distance(name, n, max)?;
                Some((d, n.as_str()))
            })
            .collect();
        scored.sort();
        scored
            .into_iter()
            .take(5)
            .map(|(_, n)| n.to_string())
            .collect()
    }
}

/// Levenshtein distance between `a` and `b`, or `None` if above `max`.
fn edit_distance(a: &str, b: &str, max: usize) -> Option<usize> {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    if a.len().abs_diff(b.len()) > max {
        return None;
    }
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        let mut row_min = cur[0];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
            row_min = row_min.min(cur[j + 1]);
        }
        if row_min > max {
            return None;
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    let d = prev[b.len()];
    (d <= max).then_some(d)
}

#[cfg(test)]
mod tests {
    use super::edit_distance;

    #[test]
    fn distances() {
        assert_eq!(edit_distance("helper", "helpr", 2), Some(1));
        assert_eq!(edit_distance("abc", "abc", 2), Some(0));
        assert_eq!(edit_distance("kitten", "sitting", 3), Some(3));
        assert_eq!(edit_distance("kitten", "sitting", 2), None);
        assert_eq!(edit_distance("a", "abcdef", 2), None);
    }
}
