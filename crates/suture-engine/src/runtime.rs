//! suture's runtime in the target: the shadow-variable functions
//! (`runtime/shadow.c`) that patches call. It is loaded by suture's own
//! loader (like a patch image, linked against the target's libc) the first
//! time a patch needs it, once per process, and released when no listed
//! patch uses it any more.

use crate::memory::{self, page_up};
use crate::objects::Objects;
use crate::record::{PatchMemory, Region};
use crate::resolve::Resolver;
use crate::Error;
use std::collections::BTreeMap;
use suture_elf::PatchFile;
use suture_process::{Hijack, Process};

/// The compiled runtime (see build.rs).
const OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/suture_runtime.o"));

/// The functions the runtime provides to patches.
pub const EXPORTS: &[&str] = &[
    "suture_shadow_get",
    "suture_shadow_alloc",
    "suture_shadow_get_or_alloc",
    "suture_shadow_free",
    "suture_shadow_free_all",
];

/// memfd name of the runtime's mapping.
pub const NAME: &str = "suture-runtime";

/// Whether a patch needing `undefined` symbols uses the runtime.
pub fn needed(undefined: &[String]) -> bool {
    undefined.iter().any(|n| EXPORTS.contains(&n.as_str()))
}

/// The runtime as loaded in one process.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Loaded {
    pub memory: PatchMemory,
    /// Export name -> address.
    pub exports: BTreeMap<String, u64>,
}

/// Map, link and load the runtime on the borrowed thread.
pub fn load(h: &mut Hijack<'_>, proc: &Process, objects: &Objects) -> Result<Loaded, Error> {
    let lib = PatchFile::parse_library(OBJECT.to_vec(), NAME)
        .map_err(|e| Error::Other(format!("suture's runtime is unusable: {e}")))?;
    let layout = lib.layout().map_err(Error::Link)?;
    let resolver = Resolver::new(objects, Vec::new(), &[]);
    let mut symbols = BTreeMap::new();
    for name in layout.undefined_symbols() {
        let a = resolver.resolve(&name)?;
        symbols.insert(name, a);
    }
    let size = page_up(layout.size());
    let base = memory::create_named_mapping(h, NAME, size, None, memory::PROT_RW, false)?;
    let loaded = (|| {
        let image = layout
            .link(base, &mut |n: &str| {
                symbols
                    .get(n)
                    .copied()
                    .ok_or_else(|| suture_elf::ResolveFailure::new(format!("unresolved {n}")))
            })
            .map_err(Error::Link)?;
        proc.write_mem(base, &image.bytes)?;
        for r in &image.regions {
            let prot = (if r.prot.r { libc::PROT_READ } else { 0 })
                | (if r.prot.w { libc::PROT_WRITE } else { 0 })
                | (if r.prot.x { libc::PROT_EXEC } else { 0 });
            h.mprotect(base + r.offset, page_up(r.len), prot)?;
        }
        let mut exports = BTreeMap::new();
        for name in EXPORTS {
            let r = lib
                .global(name)
                .ok_or_else(|| Error::Other(format!("suture's runtime lacks {name}")))?;
            exports.insert(name.to_string(), image.address_of(&r).map_err(Error::Link)?);
        }
        let text = image.text_range();
        Ok(Loaded {
            memory: PatchMemory {
                image: Region {
                    addr: base,
                    len: size,
                },
                text: Region {
                    addr: text.0,
                    len: text.1 - text.0,
                },
                file: "(suture runtime)".into(),
                funcs: Vec::new(),
                eh_frame: image.eh_frame(),
                uses_runtime: false,
            },
            exports,
        })
    })();
    if loaded.is_err() {
        let _ = h.munmap(base, size);
    }
    loaded
}
