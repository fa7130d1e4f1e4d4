//! Resolving the names a patch uses to addresses in the target, in the
//! order `include/suture.h` documents: SUTURE_SYMBOL aliases, then the
//! patched objects' own symbols (static ones included), then the exports of
//! every loaded object.

use crate::objects::{LoadedObject, Objects};
use crate::Error;
use std::collections::BTreeMap;
use suture_elf::{LookupError, SymKind, SymbolAlias};

pub struct Resolver<'a> {
    objects: &'a Objects,
    /// The objects the patch names, in patch order.
    patched: Vec<&'a LoadedObject>,
    aliases: BTreeMap<&'a str, &'a SymbolAlias>,
    ifuncs: std::cell::RefCell<Vec<(String, u64)>>,
}

fn elf_err(e: LookupError, obj: &LoadedObject) -> Error {
    Error::Symbol(format!("{e} (in {})", obj.path))
}

impl<'a> Resolver<'a> {
    pub fn new(
        objects: &'a Objects,
        patched: Vec<&'a LoadedObject>,
        aliases: &'a [SymbolAlias],
    ) -> Self {
        Resolver {
            objects,
            patched,
            aliases: aliases.iter().map(|a| (a.alias.as_str(), a)).collect(),
            ifuncs: Default::default(),
        }
    }

    /// Absolute address of `name` in the target.
    pub fn resolve(&self, name: &str) -> Result<u64, Error> {
        if let Some(a) = self.aliases.get(name) {
            let obj = self.objects.find(a.object.as_deref())?;
            let (file, bias) = obj.elf()?;
            let sym = file
                .lookup(&a.name, a.sympos)
                .map_err(|e| elf_err(e, obj))?;
            return Ok(self.address(&sym.name, sym.kind, bias + sym.vaddr));
        }
        let mut suggestions = Vec::new();
        for obj in &self.patched {
            let (file, bias) = obj.elf()?;
            match file.lookup(name, 0) {
                Ok(sym) => return Ok(self.address(name, sym.kind, bias + sym.vaddr)),
                Err(LookupError::NotFound { suggestions: s, .. }) => suggestions.extend(s),
                Err(e) => return Err(elf_err(e, obj)),
            }
        }
        for obj in &self.objects.list {
            let Ok((file, bias)) = obj.elf() else {
                continue;
            };
            if let Some(sym) = file.lookup_export(name) {
                return Ok(self.address(name, sym.kind, bias + sym.vaddr));
            }
        }
        suggestions.sort();
        suggestions.dedup();
        suggestions.truncate(5);
        Err(Error::Symbol(if suggestions.is_empty() {
            format!("symbol '{name}' used by the patch is defined in none of the patched objects and exported by no loaded object")
        } else {
            format!(
                "symbol '{name}' used by the patch is not defined in the patched objects or exported by any loaded object; close names: {}",
                suggestions.join(", ")
            )
        }))
    }

    /// An IFUNC's address is its resolver's: remember it, the engine asks
    /// the resolver in the target which implementation it uses.
    fn address(&self, name: &str, kind: SymKind, addr: u64) -> u64 {
        if kind == SymKind::Ifunc {
            self.ifuncs.borrow_mut().push((name.to_string(), addr));
        }
        addr
    }

    /// IFUNC symbols met so far: (name, resolver address).
    pub fn ifuncs(&self) -> Vec<(String, u64)> {
        self.ifuncs.borrow().clone()
    }
}
