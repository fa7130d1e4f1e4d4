//! Shared low-level ELF reading: header checks and an owned view of a
//! relocatable object (sections, symbols, relocations).

use object::elf;
use object::read::elf::{FileHeader, Rela, SectionHeader, Sym};
use object::LittleEndian as LE;

use crate::error::{invalid, Error};

pub(crate) type Header = elf::FileHeader64<LE>;

/// Human name of an ELF machine, for error messages.
fn machine_name(m: u16) -> String {
    match m {
        elf::EM_386 => "i386".into(),
        elf::EM_X86_64 => "x86_64".into(),
        elf::EM_AARCH64 => "aarch64".into(),
        elf::EM_ARM => "arm".into(),
        elf::EM_RISCV => "riscv".into(),
        elf::EM_PPC => "powerpc".into(),
        elf::EM_PPC64 => "powerpc64".into(),
        elf::EM_S390 => "s390".into(),
        elf::EM_MIPS => "mips".into(),
        elf::EM_SPARCV9 => "sparc64".into(),
        elf::EM_LOONGARCH => "loongarch".into(),
        other => format!("machine {other}"),
    }
}

/// Check the ELF identification and machine, returning `e_type`.
/// `what` names the file in messages ("patch `fix`").
pub(crate) fn check_ident(bytes: &[u8], what: &str) -> Result<u16, Error> {
    if bytes.len() < 4 || bytes[..4] != elf::ELFMAG {
        return Err(invalid(format!("{what} is not an ELF file")));
    }
    if bytes.len() < 64 {
        return Err(invalid(format!(
            "{what} is truncated: its ELF header is incomplete"
        )));
    }
    let ident_machine = u16::from_le_bytes([bytes[18], bytes[19]]);
    match bytes[4] {
        elf::ELFCLASS64 => {}
        elf::ELFCLASS32 => {
            let m = u16::from_le_bytes([bytes[18], bytes[19]]);
            let m = if bytes[5] == elf::ELFDATA2MSB {
                u16::from_be_bytes([bytes[18], bytes[19]])
            } else {
                m
            };
            return Err(invalid(format!(
                "{what} is a 32-bit {} object; suture needs x86_64",
                machine_name(m)
            )));
        }
        c => return Err(invalid(format!("{what} has an invalid ELF class ({c})"))),
    }
    match bytes[5] {
        elf::ELFDATA2LSB => {}
        elf::ELFDATA2MSB => {
            let m = u16::from_be_bytes([bytes[18], bytes[19]]);
            return Err(invalid(format!(
                "{what} is a big-endian {} object; suture needs x86_64",
                machine_name(m)
            )));
        }
        d => {
            return Err(invalid(format!(
                "{what} has an invalid ELF data encoding ({d})"
            )))
        }
    }
    if ident_machine != elf::EM_X86_64 {
        return Err(invalid(format!(
            "{what} is an {} object; suture needs x86_64",
            machine_name(ident_machine)
        )));
    }
    Ok(u16::from_le_bytes([bytes[16], bytes[17]]))
}

/// Where a symbol is defined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SymPlace {
    Undefined,
    Absolute,
    Common,
    Section(usize),
}

#[derive(Clone, Debug)]
pub(crate) struct RSection {
    pub name: String,
    pub sh_type: u32,
    pub flags: u64,
    /// Normalised alignment (>= 1, a power of two).
    pub align: u64,
    pub size: u64,
    /// File offset of the contents (meaningless for NOBITS).
    pub offset: u64,
}

impl RSection {
    pub fn is_alloc(&self) -> bool {
        self.flags & u64::from(elf::SHF_ALLOC) != 0
    }
    pub fn is_nobits(&self) -> bool {
        self.sh_type == elf::SHT_NOBITS
    }
}

#[derive(Clone, Debug)]
pub(crate) struct RSymbol {
    pub name: String,
    pub place: SymPlace,
    pub value: u64,
    pub size: u64,
    pub st_type: u8,
    pub bind: u8,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Reloc {
    pub offset: u64,
    pub r_type: u32,
    pub sym: usize,
    pub addend: i64,
}

/// An owned, validated view of a relocatable object.
pub(crate) struct RelObject {
    pub bytes: Vec<u8>,
    /// How to name the file in messages ("patch `fix`").
    pub what: String,
    pub sections: Vec<RSection>,
    pub symbols: Vec<RSymbol>,
    /// Relocations (RELA) by target section index.
    pub relocs: Vec<Vec<Reloc>>,
}

impl std::fmt::Debug for RelObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelObject")
            .field("what", &self.what)
            .field("len", &self.bytes.len())
            .field("sections", &self.sections.len())
            .field("symbols", &self.symbols.len())
            .finish_non_exhaustive()
    }
}

fn corrupt(what: &str, detail: impl std::fmt::Display) -> Error {
    invalid(format!("{what} is corrupt: {detail}"))
}

impl RelObject {
    /// Parse a relocatable object. The identification must have been
    /// checked with [`check_ident`] (64-bit little-endian x86_64).
    pub fn parse(bytes: Vec<u8>, what: String) -> Result<RelObject, Error> {
        let endian = LE;
        let data = &bytes[..];
        let header = Header::parse(data).map_err(|e| corrupt(&what, e))?;
        let table = header
            .sections(endian, data)
            .map_err(|e| corrupt(&what, e))?;
        if table.is_empty() {
            return Err(corrupt(&what, "it has no section headers"));
        }
        let mut sections = Vec::with_capacity(table.len());
        for (_, sh) in table.enumerate() {
            let name = table
                .section_name(endian, sh)
                .map_err(|e| corrupt(&what, e))?;
            let name = String::from_utf8_lossy(name).into_owned();
            let sh_type = sh.sh_type(endian);
            let size = sh.sh_size(endian);
            let offset = sh.sh_offset(endian);
            let raw_align = sh.sh_addralign(endian);
            let align = if raw_align <= 1 { 1 } else { raw_align };
            if !align.is_power_of_two() {
                return Err(corrupt(
                    &what,
                    format!("section {name} has alignment {raw_align}, not a power of two"),
                ));
            }
            if sh_type != elf::SHT_NOBITS && sh_type != elf::SHT_NULL {
                let end = offset.checked_add(size);
                if end.is_none_or(|end| end > data.len() as u64) {
                    return Err(corrupt(
                        &what,
                        format!("section {name} extends past the end of the file"),
                    ));
                }
            }
            sections.push(RSection {
                name,
                sh_type,
                flags: sh.sh_flags(endian),
                align,
                size,
                offset,
            });
        }

        // The symbol table.
        let symtab_indices: Vec<usize> = table
            .enumerate()
            .filter(|(_, sh)| sh.sh_type(endian) == elf::SHT_SYMTAB)
            .map(|(i, _)| i.0)
            .collect();
        if symtab_indices.len() > 1 {
            return Err(corrupt(&what, "it has more than one symbol table"));
        }
        let mut symbols = Vec::new();
        let symtab_index = symtab_indices.first().copied();
        if let Some(index) = symtab_index {
            let symtab = table
                .symbol_table_by_index(endian, data, object::SectionIndex(index))
                .map_err(|e| corrupt(&what, e))?;
            symbols.reserve(symtab.len());
            for (si, sym) in symtab.enumerate() {
                let name = symtab
                    .symbol_name(endian, sym)
                    .map_err(|e| corrupt(&what, e))?;
                let name = String::from_utf8_lossy(name).into_owned();
                let place = match sym.st_shndx(endian) {
                    elf::SHN_UNDEF => SymPlace::Undefined,
                    elf::SHN_ABS => SymPlace::Absolute,
                    elf::SHN_COMMON => SymPlace::Common,
                    elf::SHN_XINDEX => match symtab
                        .symbol_section(endian, sym, si)
                        .map_err(|e| corrupt(&what, e))?
                    {
                        Some(s) => SymPlace::Section(s.0),
                        None => SymPlace::Undefined,
                    },
                    s if s < elf::SHN_LORESERVE => SymPlace::Section(usize::from(s)),
                    s => {
                        return Err(corrupt(
                            &what,
                            format!("symbol `{name}` has unsupported section index {s:#x}"),
                        ))
                    }
                };
                if let SymPlace::Section(s) = place {
                    if s >= sections.len() {
                        return Err(corrupt(
                            &what,
                            format!("symbol `{name}` refers to section {s}, which does not exist"),
                        ));
                    }
                }
                symbols.push(RSymbol {
                    name,
                    place,
                    value: sym.st_value(endian),
                    size: sym.st_size(endian),
                    st_type: sym.st_type(),
                    bind: sym.st_bind(),
                });
            }
        }

        // Relocations.
        let mut relocs = vec![Vec::new(); sections.len()];
        for (i, sh) in table.enumerate() {
            let sh_type = sh.sh_type(endian);
            let name = &sections[i.0].name;
            if sh_type == elf::SHT_REL || sh_type == elf::SHT_CREL {
                return Err(Error::Unsupported(format!(
                    "{what} has {} relocations in {name}; suture handles only RELA, as x86_64 compilers emit",
                    if sh_type == elf::SHT_REL { "REL" } else { "CREL" }
                )));
            }
            let Some((rela, link)) = sh.rela(endian, data).map_err(|e| corrupt(&what, e))? else {
                continue;
            };
            let target = sh.sh_info(endian) as usize;
            if target == 0 || target >= sections.len() {
                return Err(corrupt(
                    &what,
                    format!("relocation section {name} applies to section {target}, which does not exist"),
                ));
            }
            if rela.is_empty() {
                continue;
            }
            if Some(link.0) != symtab_index {
                return Err(corrupt(
                    &what,
                    format!("relocation section {name} does not use the symbol table"),
                ));
            }
            for r in rela {
                let sym = r.r_sym(endian, false) as usize;
                if sym >= symbols.len() {
                    return Err(corrupt(
                        &what,
                        format!(
                            "a relocation in {name} refers to symbol {sym}, but there are only {}",
                            symbols.len()
                        ),
                    ));
                }
                relocs[target].push(Reloc {
                    offset: r.r_offset(endian),
                    r_type: r.r_type(endian, false),
                    sym,
                    addend: r.r_addend(endian),
                });
            }
        }

        Ok(RelObject {
            bytes,
            what,
            sections,
            symbols,
            relocs,
        })
    }

    /// The file contents of a section; `None` for NOBITS (all zeros).
    pub fn section_data(&self, index: usize) -> Option<&[u8]> {
        let s = self.sections.get(index)?;
        if s.is_nobits() || s.sh_type == elf::SHT_NULL {
            return None;
        }
        // Bounds were validated at parse time.
        let start = usize::try_from(s.offset).ok()?;
        let len = usize::try_from(s.size).ok()?;
        self.bytes.get(start..start.checked_add(len)?)
    }

    /// A printable name for a relocation's symbol (section name for
    /// section symbols).
    pub fn symbol_display(&self, sym: usize) -> String {
        let Some(s) = self.symbols.get(sym) else {
            return format!("symbol #{sym}");
        };
        if s.st_type == elf::STT_SECTION || s.name.is_empty() {
            if let SymPlace::Section(i) = s.place {
                return self.sections[i].name.clone();
            }
        }
        s.name.clone()
    }
}

/// Name of an x86_64 relocation type, for messages.
pub(crate) fn reloc_name(t: u32) -> String {
    let n = match t {
        elf::R_X86_64_NONE => "R_X86_64_NONE",
        elf::R_X86_64_64 => "R_X86_64_64",
        elf::R_X86_64_PC32 => "R_X86_64_PC32",
        elf::R_X86_64_GOT32 => "R_X86_64_GOT32",
        elf::R_X86_64_PLT32 => "R_X86_64_PLT32",
        elf::R_X86_64_COPY => "R_X86_64_COPY",
        elf::R_X86_64_GLOB_DAT => "R_X86_64_GLOB_DAT",
        elf::R_X86_64_JUMP_SLOT => "R_X86_64_JUMP_SLOT",
        elf::R_X86_64_RELATIVE => "R_X86_64_RELATIVE",
        elf::R_X86_64_GOTPCREL => "R_X86_64_GOTPCREL",
        elf::R_X86_64_32 => "R_X86_64_32",
        elf::R_X86_64_32S => "R_X86_64_32S",
        elf::R_X86_64_16 => "R_X86_64_16",
        elf::R_X86_64_PC16 => "R_X86_64_PC16",
        elf::R_X86_64_8 => "R_X86_64_8",
        elf::R_X86_64_PC8 => "R_X86_64_PC8",
        elf::R_X86_64_DTPMOD64 => "R_X86_64_DTPMOD64",
        elf::R_X86_64_DTPOFF64 => "R_X86_64_DTPOFF64",
        elf::R_X86_64_TPOFF64 => "R_X86_64_TPOFF64",
        elf::R_X86_64_TLSGD => "R_X86_64_TLSGD",
        elf::R_X86_64_TLSLD => "R_X86_64_TLSLD",
        elf::R_X86_64_DTPOFF32 => "R_X86_64_DTPOFF32",
        elf::R_X86_64_GOTTPOFF => "R_X86_64_GOTTPOFF",
        elf::R_X86_64_TPOFF32 => "R_X86_64_TPOFF32",
        elf::R_X86_64_PC64 => "R_X86_64_PC64",
        elf::R_X86_64_GOTOFF64 => "R_X86_64_GOTOFF64",
        elf::R_X86_64_GOTPC32 => "R_X86_64_GOTPC32",
        elf::R_X86_64_GOT64 => "R_X86_64_GOT64",
        elf::R_X86_64_GOTPCREL64 => "R_X86_64_GOTPCREL64",
        elf::R_X86_64_GOTPC64 => "R_X86_64_GOTPC64",
        elf::R_X86_64_GOTPLT64 => "R_X86_64_GOTPLT64",
        elf::R_X86_64_PLTOFF64 => "R_X86_64_PLTOFF64",
        elf::R_X86_64_SIZE32 => "R_X86_64_SIZE32",
        elf::R_X86_64_SIZE64 => "R_X86_64_SIZE64",
        elf::R_X86_64_GOTPC32_TLSDESC => "R_X86_64_GOTPC32_TLSDESC",
        elf::R_X86_64_TLSDESC_CALL => "R_X86_64_TLSDESC_CALL",
        elf::R_X86_64_TLSDESC => "R_X86_64_TLSDESC",
        elf::R_X86_64_IRELATIVE => "R_X86_64_IRELATIVE",
        elf::R_X86_64_GOTPCRELX => "R_X86_64_GOTPCRELX",
        elf::R_X86_64_REX_GOTPCRELX => "R_X86_64_REX_GOTPCRELX",
        _ => return format!("relocation type {t}"),
    };
    n.to_string()
}
