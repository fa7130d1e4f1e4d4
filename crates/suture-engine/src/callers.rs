//! Direct call sites of patched functions.
//!
//! Outside a transition a patched function's entry jumps to its new code:
//! one `jmp` per call. A `call rel32` in the same object that calls the
//! function's entry can instead call the new code itself, which costs
//! nothing at all. So once a site's mode is a plain jump to new code, its
//! recorded callers are rewritten to call that code; whenever the site
//! changes again (a transition starts, the function is restored) they are
//! pointed back at the entry in the same write, before anything else
//! could tell the difference: a thread then reaches the entry's jump or
//! dispatch stub exactly as if the call had never been rewritten.
//!
//! Only the 4-byte displacement of a 5-byte `call` changes, with every
//! thread stopped (the code-write protocol of `write.rs`), so no thread can
//! be inside a changed instruction. Calls through pointers, the PLT or
//! other objects keep reaching the entry's jump.

use crate::objects::LoadedObject;
use crate::record::{Caller, Site};
use crate::write::CodeWrite;
use crate::Error;
use std::collections::{BTreeMap, BTreeSet};
use suture_model::{Code, SiteMode};
use suture_process::Process;
use suture_x86::{call_rel32, direct_calls_to, CALL_REL32_LEN};

/// The direct calls to `funcs` (function entry addresses) in `obj`'s
/// functions, by callee. Calls whose bytes overlap `exclude` (the bytes
/// patch sites overwrite) are left out. Functions are those of the object's
/// symbol table (only the exported ones for a stripped object).
pub fn find(
    proc: &Process,
    obj: &LoadedObject,
    funcs: &BTreeSet<u64>,
    exclude: &[(u64, u64)],
) -> Result<BTreeMap<u64, Vec<u64>>, Error> {
    let mut found: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    if funcs.is_empty() {
        return Ok(found);
    }
    let (elf, bias) = obj.elf()?;
    for seg in elf.segments().iter().filter(|s| s.executable()) {
        let start = bias.wrapping_add(seg.vaddr);
        let Ok(code) = proc.read_mem(start, seg.memsz as usize) else {
            // Not readable as mapped (e.g. partly unmapped): no callers
            // from it; the entry's jump still serves them.
            continue;
        };
        for f in elf.functions() {
            let Some(off) = f.vaddr.checked_sub(seg.vaddr) else {
                continue;
            };
            let Some(body) = off
                .checked_add(f.size)
                .and_then(|end| code.get(off as usize..end as usize))
            else {
                continue;
            };
            for (at, to) in direct_calls_to(body, start + off, funcs) {
                let end = at + CALL_REL32_LEN as u64;
                if exclude.iter().any(|&(a, b)| at < b && a < end) {
                    continue;
                }
                found.entry(to).or_default().push(at);
            }
        }
    }
    for v in found.values_mut() {
        // A function with several names is scanned once per name.
        v.sort_unstable();
        v.dedup();
    }
    Ok(found)
}

/// The writes that point `site`'s callers where its new `mode` wants them
/// (the new code for a plain jump to new code, else the entry), updating
/// the record of what each calls.
pub fn writes(site: &mut Site, mode: SiteMode) -> Vec<CodeWrite> {
    let new_code = match mode {
        SiteMode::Jump(Code::New(to)) => Some(to),
        _ => None,
    };
    let entry = site.func_addr;
    let mut out = Vec::new();
    for c in &mut site.callers {
        let to = new_code
            .filter(|&to| call_rel32(c.addr, to).is_some())
            .unwrap_or(entry);
        if to == c.to {
            continue;
        }
        let (Some(bytes), Some(old)) = (call_rel32(c.addr, to), call_rel32(c.addr, c.to)) else {
            continue;
        };
        out.push(CodeWrite {
            addr: c.addr,
            bytes: bytes.to_vec(),
            old: old.to_vec(),
            guard_len: CALL_REL32_LEN as u64,
            redirect: Vec::new(),
            trap: Some((to, suture_x86::trap::KIND_CALL)),
        });
        c.to = to;
    }
    out
}

/// Records for the callers found of a new site at `entry`.
pub fn records(entry: u64, found: &BTreeMap<u64, Vec<u64>>) -> Vec<Caller> {
    found
        .get(&entry)
        .map(|v| v.iter().map(|&addr| Caller { addr, to: entry }).collect())
        .unwrap_or_default()
}
