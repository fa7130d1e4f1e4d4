//! Naming code addresses for reports: function and offset from the ELF
//! symbol table (suture-elf), file and line from DWARF (addr2line) when the
//! object has debug information.

use std::borrow::Cow;
use std::sync::Arc;

use addr2line::Context;
use gimli::{EndianArcSlice, LittleEndian};
use object::{Object, ObjectSection};
use suture_elf::ObjectFile;

use crate::Error;

type Reader = EndianArcSlice<LittleEndian>;

/// A named code address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Symbol {
    /// The containing function, demangled (Rust or C++) when mangled.
    pub name: String,
    /// The address's offset into that function.
    pub offset: u64,
    /// Source file and line, when the object has DWARF line information.
    pub file_line: Option<(String, u32)>,
}

/// One object's symbols and debug information, parsed once.
pub struct Symbolizer {
    symbols: ObjectFile,
    dwarf: Option<Context<Reader>>,
}

impl Symbolizer {
    /// Parses an executable or shared object (or its separate debug file).
    pub fn new(elf_bytes: &[u8]) -> Result<Symbolizer, Error> {
        let symbols = ObjectFile::parse(elf_bytes).map_err(|e| Error {
            name: "the object".into(),
            what: e.to_string(),
        })?;
        Ok(Symbolizer {
            symbols,
            dwarf: load_dwarf(elf_bytes),
        })
    }

    /// Names link-time address `file_addr` (run-time address minus the load
    /// bias; for a return address, pass the address of the call: minus 1).
    pub fn symbolize(&self, file_addr: u64) -> Option<Symbol> {
        let (sym, offset) = self.symbols.symbol_at(file_addr)?;
        let name = addr2line::demangle_auto(Cow::Borrowed(sym.name.as_str()), None).into_owned();
        let file_line = self.dwarf.as_ref().and_then(|ctx| location(ctx, file_addr));
        Some(Symbol {
            name,
            offset,
            file_line,
        })
    }
}

/// [`Symbolizer::symbolize`] for one address, parsing the object each call.
pub fn symbolize(elf_bytes: &[u8], file_addr: u64) -> Option<Symbol> {
    Symbolizer::new(elf_bytes).ok()?.symbolize(file_addr)
}

/// Source file and line of link-time address `file_addr` from the object's
/// DWARF, parsing the object each call (no symbol table needed).
pub fn file_line(elf_bytes: &[u8], file_addr: u64) -> Option<(String, u32)> {
    location(&load_dwarf(elf_bytes)?, file_addr)
}

fn location(ctx: &Context<Reader>, file_addr: u64) -> Option<(String, u32)> {
    let loc = ctx.find_location(file_addr).ok()??;
    Some((loc.file?.to_string(), loc.line?))
}

/// The DWARF of the object, if it has line information that can be read
/// (compressed debug sections are not).
fn load_dwarf(bytes: &[u8]) -> Option<Context<Reader>> {
    let file = object::File::parse(bytes).ok()?;
    file.section_by_name(".debug_line")?;
    let mut unreadable = false;
    let dwarf = gimli::Dwarf::load(|id| -> Result<Reader, gimli::Error> {
        let data = match file.section_by_name(id.name()) {
            Some(s) => s.uncompressed_data().unwrap_or_else(|_| {
                unreadable = true;
                Cow::Borrowed(&[][..])
            }),
            None => Cow::Borrowed(&[][..]),
        };
        Ok(EndianArcSlice::new(Arc::from(&*data), LittleEndian))
    })
    .ok()?;
    if unreadable {
        return None;
    }
    Context::from_dwarf(dwarf).ok()
}
