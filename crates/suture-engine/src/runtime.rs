//! suture's runtime in the target: the shadow-variable functions
//! (`runtime/shadow.c`) that patches call. It is loaded by suture's own
//! loader (like a patch image, linked against the target's libc) the first
//! time a patch needs it, once per process, and released when no listed
//! patch uses it any more.

use crate::memory::{self, page_up};
use crate::objects::Objects;
use crate::record::PatchMemory;
use crate::resolve::Resolver;
use crate::Error;
use std::collections::BTreeMap;
use suture_elf::PatchFile;
use suture_process::{Hijack, Process};

/// The compiled runtime (see build.rs).
const OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/suture_runtime.o"));

/// The functions the runtime provides to patches.
pub const EXPORTS: &[&str] = &[
    "suture_get_state",
    "suture_get_prev_state",
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
    /// The state table suture keeps up to date (`runtime/state.c`).
    #[serde(default)]
    pub state_table: u64,
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
    let prots = memory::image_protections(&layout.regions());
    let base = memory::create_mapping(h, NAME, size, None, memory::PROT_RX, false, &prots)?;
    let loaded = (|| {
        let image = layout
            .link(base, &mut |n: &str| {
                symbols
                    .get(n)
                    .copied()
                    .ok_or_else(|| suture_elf::ResolveFailure::new(format!("unresolved {n}")))
            })
            .map_err(Error::Link)?;
        memory::install_image(proc, &image, base)?;
        let mut exports = BTreeMap::new();
        for name in EXPORTS {
            let r = lib
                .global(name)
                .ok_or_else(|| Error::Other(format!("suture's runtime lacks {name}")))?;
            exports.insert(name.to_string(), image.address_of(&r).map_err(Error::Link)?);
        }
        let table = lib
            .global("suture_state_table")
            .ok_or_else(|| Error::Other("suture's runtime lacks its state table".into()))?;
        let state_table = image.address_of(&table).map_err(Error::Link)?;
        Ok(Loaded {
            state_table,
            memory: memory::image_memory(&image, base, size, "(suture runtime)".into()),
            exports,
        })
    })();
    if loaded.is_err() {
        let _ = h.munmap(base, size);
    }
    loaded
}

/// Slots of the runtime's state table (`SUTURE_STATE_SLOTS`).
const STATE_SLOTS: usize = 64;

/// Write the state table for `model`: per state id, the newest listed
/// patch's state (the patch in transition included) and, during a
/// transition, the state of the newest patch before it that has the id.
pub fn write_states(proc: &Process, rt: &Loaded, model: &suture_model::Model) -> Result<(), Error> {
    let patches = model.patches();
    let transition_at = model
        .transition()
        .and_then(|t| patches.iter().position(|p| p.name == t.patch));
    let mut ids: Vec<u64> = patches
        .iter()
        .flat_map(|p| p.states.iter().map(|s| s.id))
        .collect();
    ids.sort();
    ids.dedup();
    let newest = |upto: usize, id: u64| {
        patches[..upto]
            .iter()
            .rev()
            .find_map(|p| p.state(id))
            .map(|s| s.desc_addr)
            .unwrap_or(0)
    };
    let mut bytes = vec![0u8; STATE_SLOTS * 24];
    for (i, id) in ids.iter().take(STATE_SLOTS).enumerate() {
        let cur = newest(patches.len(), *id);
        let prev = transition_at.map(|t| newest(t, *id)).unwrap_or(0);
        let slot = &mut bytes[i * 24..i * 24 + 24];
        slot[..8].copy_from_slice(&id.to_le_bytes());
        slot[8..16].copy_from_slice(&cur.to_le_bytes());
        slot[16..24].copy_from_slice(&prev.to_le_bytes());
    }
    proc.write_mem(rt.state_table, &bytes)?;
    Ok(())
}
