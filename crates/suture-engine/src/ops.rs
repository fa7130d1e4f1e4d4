//! The operations. Each one: open the process, take its lock, read the
//! record, do every check and all symbol work without touching the target,
//! then change the target in steps that each leave it consistent.
//!
//! Enable and disable are immediate in this version: every thread switches
//! at once (the model's transition is started and completed in one step).

use crate::lock;
use crate::memory::{self, page_up, SLOT_STUB};
use crate::objects::{LoadedObject, Objects};
use crate::record::{PatchMemory, Record, Region, Site, SlotUse};
use crate::report::*;
use crate::resolve::Resolver;
use crate::store;
use crate::write::{write_code, CodeWrite};
use crate::Error;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;
use suture_elf::{Layout, PatchDesc, PatchFile, SymKind};
use suture_model::{CallbackKind, Code, Func, Model, Object, Patch, SiteMode, State};
use suture_process::Process;
use suture_x86::{in_rel32_range, jmp_abs, jmp_rel32, SitePlan};

const HIJACK_TIMEOUT: Duration = Duration::from_secs(3);
const LOCK_WAIT: Duration = Duration::from_secs(30);
/// Checks for retired memory after an operation.
const GC_ATTEMPTS: u32 = 8;

/// Test-only: `SUTURE_TEST_PAUSE=POINT:PATH` makes the operation stop at
/// POINT, create `PATH.reached` and wait (at most a minute) for `PATH.go`,
/// so tests can act on the target at an exact step (e.g. kill it).
fn test_pause(point: &str) {
    let Ok(v) = std::env::var("SUTURE_TEST_PAUSE") else {
        return;
    };
    let Some((p, path)) = v.split_once(':') else {
        return;
    };
    if p != point {
        return;
    }
    let _ = std::fs::write(format!("{path}.reached"), "");
    let go = format!("{path}.go");
    for _ in 0..6000 {
        if Path::new(&go).exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Reads target memory for the site planner (jump tables).
struct TargetMemory<'a>(&'a Process);

impl suture_x86::Memory for TargetMemory<'_> {
    fn read(&self, addr: u64, len: usize) -> Option<Vec<u8>> {
        self.0.read_mem(addr, len).ok()
    }
}

/// An opened, locked target and its record.
struct Session {
    proc: Process,
    _lock: lock::TargetLock,
    store: Option<u64>,
    rec: Record,
}

impl Session {
    fn open(pid: i32) -> Result<Session, Error> {
        let proc = Process::open(pid)?;
        proc.check_traceable()?;
        let lock = lock::lock(&proc, LOCK_WAIT)?;
        let store = store::find_store(&proc.maps()?);
        let rec = match store {
            Some(base) => store::read(&proc, base)?,
            None => Record::new(),
        };
        Ok(Session {
            proc,
            _lock: lock,
            store,
            rec,
        })
    }

    /// Write the record, creating the store if this is the first one.
    fn save(&mut self) -> Result<(), Error> {
        let base = match self.store {
            Some(b) => b,
            None => {
                let mut h = self.proc.hijack(HIJACK_TIMEOUT)?;
                let b = store::create(&mut h)?;
                h.release()?;
                self.store = Some(b);
                b
            }
        };
        store::write(&self.proc, base, &self.rec)
    }
}

/// A new site to create for a function of the patch.
struct NewSite {
    name: String,
    func_addr: u64,
    func_size: u64,
    object: (u64, u64),
    plan: SitePlan,
}

/// Everything `apply` needs, computed without changing the target.
struct Prepared {
    layout: Layout,
    desc: PatchDesc,
    /// The model's patch; new function addresses are filled in after linking.
    patch: Patch,
    /// Sites to create for functions no earlier patch redirects.
    new_sites: Vec<NewSite>,
    symbols: BTreeMap<String, u64>,
    /// Where the image should go: near the first patched object.
    near: (u64, u64),
    checks: Vec<CheckItem>,
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("patch")
        .to_string()
}

fn read_patch(path: &Path) -> Result<PatchFile, Error> {
    let bytes = std::fs::read(path).map_err(|e| Error::PatchIo {
        path: path.display().to_string(),
        cause: e,
    })?;
    PatchFile::parse(bytes, &stem(path)).map_err(|e| Error::PatchFile {
        path: path.display().to_string(),
        cause: e,
    })
}

fn prepare(s: &Session, path: &Path) -> Result<Prepared, Error> {
    let file = read_patch(path)?;
    let desc = file.descriptor().clone();
    let mut checks = vec![CheckItem {
        check: "patch file".into(),
        detail: format!(
            "{}: patch '{}', {} object(s){}",
            path.display(),
            desc.name,
            desc.objects.len(),
            if desc.replace { ", replace" } else { "" }
        ),
    }];
    if let Some(t) = s.rec.model.transition() {
        return Err(suture_model::ModelError::Busy {
            transition: t.patch.clone(),
            requested: desc.name.clone(),
        }
        .into());
    }
    if s.rec.model.patch(&desc.name).is_some() {
        return Err(suture_model::ModelError::AlreadyApplied(desc.name.clone()).into());
    }
    let maps = s.proc.maps()?;
    let objects = Objects::discover(&s.proc, &maps)?;
    let mut patch = Patch::new(desc.name.clone(), desc.replace);
    patch.states = desc
        .states
        .iter()
        .map(|st| State {
            id: st.id,
            version: st.version,
        })
        .collect();
    let mut new_sites: Vec<NewSite> = Vec::new();
    let mut patched_objs: Vec<&LoadedObject> = Vec::new();
    for od in &desc.objects {
        let obj = objects.find(od.name.as_deref())?;
        let (elf, bias) = obj.elf()?;
        let build_id = elf.build_id();
        if let Some(want) = &od.build_id {
            let found = build_id.clone().unwrap_or_else(|| "no build-id".into());
            if !found.eq_ignore_ascii_case(want) {
                return Err(Error::BuildId {
                    object: obj.path.clone(),
                    expected: want.clone(),
                    found,
                });
            }
        }
        checks.push(CheckItem {
            check: "object".into(),
            detail: format!(
                "{} -> {} at {:#x} (build-id {})",
                od.name.as_deref().unwrap_or("main program"),
                obj.path,
                bias,
                build_id.as_deref().unwrap_or("none")
            ),
        });
        let mut mo = Object::new(od.name.clone(), obj.path.clone(), build_id);
        for fd in &od.funcs {
            let sym = elf
                .lookup(&fd.old_name, fd.old_sympos)
                .map_err(|e| Error::Symbol(format!("{e} (in {})", obj.path)))?;
            if !matches!(sym.kind, SymKind::Func | SymKind::Other) {
                return Err(Error::Symbol(format!(
                    "'{}' in {} is not a function ({:?}); only functions can be replaced",
                    fd.old_name, obj.path, sym.kind
                )));
            }
            let addr = bias + sym.vaddr;
            mo.funcs
                .push(Func::new(fd.old_name.clone(), fd.old_sympos, addr, 0));
            if !s.rec.sites.contains_key(&addr) && !new_sites.iter().any(|n| n.func_addr == addr) {
                let code = s.proc.read_mem(addr, sym.size as usize)?;
                let plan =
                    suture_x86::plan_site(addr, &code, &TargetMemory(&s.proc)).map_err(|e| {
                        Error::Site {
                            name: fd.old_name.clone(),
                            addr,
                            cause: e,
                        }
                    })?;
                checks.push(CheckItem {
                    check: "site".into(),
                    detail: format!(
                        "{} at {addr:#x} ({} bytes): jump at {:#x} over {} bytes",
                        fd.old_name, sym.size, plan.site_addr, plan.len
                    ),
                });
                new_sites.push(NewSite {
                    name: fd.old_name.clone(),
                    func_addr: addr,
                    func_size: sym.size,
                    object: (obj.start, obj.end),
                    plan,
                });
            } else {
                checks.push(CheckItem {
                    check: "site".into(),
                    detail: format!(
                        "{} at {addr:#x}: already a patch site (stacking)",
                        fd.old_name
                    ),
                });
            }
        }
        patch.objects.push(mo);
        patched_objs.push(obj);
    }
    // Two sites must not overlap (e.g. a symbol nested inside another).
    let mut ranges: Vec<(u64, u64, &str)> = s
        .rec
        .sites
        .values()
        .map(|x| {
            (
                x.site_addr,
                x.site_addr + x.overwritten_len() as u64,
                x.name.as_str(),
            )
        })
        .chain(new_sites.iter().map(|n| {
            (
                n.plan.site_addr,
                n.plan.site_addr + n.plan.len as u64,
                n.name.as_str(),
            )
        }))
        .collect();
    ranges.sort();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(Error::Other(format!(
                "the patch sites of '{}' and '{}' overlap; patch only one of them",
                w[0].2, w[1].2
            )));
        }
    }
    s.rec.model.check_enable(&patch)?;
    let layout = file.layout().map_err(Error::Link)?;
    let resolver = Resolver::new(&objects, patched_objs.clone(), &desc.symbols);
    let mut symbols = BTreeMap::new();
    for name in layout.undefined_symbols() {
        let a = resolver.resolve(&name)?;
        symbols.insert(name, a);
    }
    // IFUNCs (memcpy, strlen...): run each resolver in the target, which
    // only reads CPU features, to learn the implementation it uses.
    let ifuncs = resolver.ifuncs();
    if !ifuncs.is_empty() {
        let mut h = s.proc.hijack(HIJACK_TIMEOUT)?;
        for (name, res) in &ifuncs {
            let impl_addr = h.call(*res, &[]).map_err(|e| {
                Error::Symbol(format!(
                    "cannot resolve the IFUNC '{name}' in the target: {e}"
                ))
            })?;
            for v in symbols.values_mut() {
                if *v == *res {
                    *v = impl_addr;
                }
            }
        }
        h.release()?;
    }
    checks.push(CheckItem {
        check: "symbols".into(),
        detail: format!("{} external symbol(s) resolved", symbols.len()),
    });
    let near = patched_objs
        .first()
        .map(|o| (o.start, o.end))
        .unwrap_or((0, 0));
    Ok(Prepared {
        layout,
        desc,
        patch,
        new_sites,
        symbols,
        near,
        checks,
    })
}

/// Link the patch image at `base` with the names resolved by `prepare`.
fn link(
    layout: &Layout,
    base: u64,
    symbols: &BTreeMap<String, u64>,
) -> Result<suture_elf::LinkedImage, Error> {
    layout
        .link(base, &mut |n: &str| {
            symbols
                .get(n)
                .copied()
                .ok_or_else(|| suture_elf::ResolveFailure::new(format!("unresolved {n}")))
        })
        .map_err(Error::Link)
}

/// Run every check `apply` makes, changing nothing.
pub fn check(pid: i32, path: &Path) -> Result<CheckReport, Error> {
    let s = Session::open(pid)?;
    let p = prepare(&s, path)?;
    // Linking at a plausible address checks relocations too.
    let base = p.near.1.next_multiple_of(memory::PAGE);
    link(&p.layout, base, &p.symbols)?;
    let mut checks = p.checks;
    checks.push(CheckItem {
        check: "link".into(),
        detail: format!("{} bytes, relocations apply", p.layout.size()),
    });
    checks.push(CheckItem {
        check: "conflicts".into(),
        detail: "none: no transition in progress, name unused, states compatible".into(),
    });
    Ok(CheckReport {
        pid,
        patch: p.desc.name,
        checks,
    })
}

/// Memory mapped during an apply, released again if the apply fails.
#[derive(Default)]
struct Undo {
    regions: Vec<Region>,
    new_arenas: usize,
}

/// Load and enable a patch.
pub fn apply(pid: i32, path: &Path) -> Result<ApplyReport, Error> {
    let mut s = Session::open(pid)?;
    let p = prepare(&s, path)?;
    let mut undo = Undo::default();
    let arenas_before = s.rec.arenas.len();
    let result = apply_prepared(&mut s, p, &path.display().to_string(), &mut undo);
    if result.is_err() {
        // Put the target back as it was: nothing of ours is referenced yet.
        s.rec.arenas.truncate(arenas_before);
        if !undo.regions.is_empty() || undo.new_arenas > 0 {
            if let Ok(mut h) = s.proc.hijack(HIJACK_TIMEOUT) {
                for r in &undo.regions {
                    let _ = h.munmap(r.addr, r.len);
                }
                let _ = h.release();
            }
        }
    }
    result
}

fn apply_prepared(
    s: &mut Session,
    p: Prepared,
    path: &str,
    undo: &mut Undo,
) -> Result<ApplyReport, Error> {
    let Prepared {
        layout,
        desc,
        mut patch,
        new_sites,
        symbols,
        near,
        checks: _,
    } = p;
    let maps = s.proc.maps()?;
    let mut h = s.proc.hijack(HIJACK_TIMEOUT)?;
    if s.store.is_none() {
        s.store = Some(store::create(&mut h)?);
    }

    // Patch image near the first patched object when possible.
    let size = page_up(layout.size());
    let name = format!("suture-patch:{}", desc.name);
    // Test-only: SUTURE_TEST_FAR_IMAGE places the image wherever the kernel
    // likes, to exercise the out-of-reach paths (PLT stubs, site stubs).
    let near_base = if std::env::var_os("SUTURE_TEST_FAR_IMAGE").is_some() {
        None
    } else {
        memory::map_near(&mut h, &maps, &name, size, near, memory::PROT_RW)?
    };
    let base = match near_base {
        Some(a) => a,
        None => memory::create_named_mapping(&mut h, &name, size, None, memory::PROT_RW, false)?,
    };
    undo.regions.push(Region {
        addr: base,
        len: size,
    });
    let image = link(&layout, base, &symbols)?;
    s.proc.write_mem(base, &image.bytes)?;
    for r in &image.regions {
        let prot = (if r.prot.r { libc::PROT_READ } else { 0 })
            | (if r.prot.w { libc::PROT_WRITE } else { 0 })
            | (if r.prot.x { libc::PROT_EXEC } else { 0 });
        h.mprotect(base + r.offset, page_up(r.len), prot)?;
    }

    // Slots for the new sites, in arenas near their objects.
    let mut slots: Vec<u64> = Vec::new();
    for ns in &new_sites {
        let fits = |a: &crate::record::Arena| {
            in_rel32_range(ns.object.0, a.region.addr)
                && in_rel32_range(ns.object.1, a.region.end())
                && in_rel32_range(a.region.end(), ns.object.0)
                && in_rel32_range(a.region.addr, ns.object.1)
        };
        let idx = match s
            .rec
            .arenas
            .iter()
            .position(|a| fits(a) && a.free_slot().is_some())
        {
            Some(i) => i,
            None => {
                let maps = s.proc.maps()?;
                let arena = memory::new_arena(&mut h, &maps, ns.object)?;
                undo.regions.push(arena.region.clone());
                undo.new_arenas += 1;
                s.rec.arenas.push(arena);
                s.rec.arenas.len() - 1
            }
        };
        let arena = &mut s.rec.arenas[idx];
        let slot = arena.free_slot().expect("checked");
        arena.used.insert(slot, SlotUse::Site);
        slots.push(arena.slot_addr(slot));
    }
    h.release()?;

    // Trampolines: the relocated first instructions of each function.
    let mut new_site_records = Vec::new();
    for (ns, slot) in new_sites.iter().zip(&slots) {
        let code = ns.plan.relocated_original(*slot).map_err(|e| Error::Site {
            name: ns.name.clone(),
            addr: ns.func_addr,
            cause: e,
        })?;
        if code.len() as u64 > SLOT_STUB {
            return Err(Error::Other(format!(
                "the relocated entry of '{}' needs {} bytes, more than a slot holds",
                ns.name,
                code.len()
            )));
        }
        s.proc.write_mem(*slot, &code)?;
        new_site_records.push(Site {
            func_addr: ns.func_addr,
            func_size: ns.func_size,
            name: ns.name.clone(),
            site_addr: ns.plan.site_addr,
            original: ns.plan.original.clone(),
            slot: *slot,
            current: ns.plan.original.clone(),
        });
    }

    // New function and callback addresses.
    for (mo, od) in patch.objects.iter_mut().zip(&desc.objects) {
        for (f, fd) in mo.funcs.iter_mut().zip(&od.funcs) {
            f.new_addr = image.address_of(&fd.new_func).map_err(Error::Link)?;
        }
        let cbs = [
            (CallbackKind::PrePatch, &od.callbacks.pre_patch),
            (CallbackKind::PostPatch, &od.callbacks.post_patch),
            (CallbackKind::PreUnpatch, &od.callbacks.pre_unpatch),
            (CallbackKind::PostUnpatch, &od.callbacks.post_unpatch),
        ];
        for (k, r) in cbs {
            if let Some(r) = r {
                mo.callbacks
                    .push((k, image.address_of(r).map_err(Error::Link)?));
            }
        }
    }

    test_pause("loaded");
    // The model: enable, every thread switches at once, complete.
    let mut model = s.rec.model.clone();
    let before = model.site_modes();
    let threads = s.proc.threads()?;
    model.begin_enable(patch.clone(), &threads)?;
    switch_every_thread(&mut model);
    let completion = model.complete()?;
    let after = model.site_modes();

    let mut sites = s.rec.sites.clone();
    for r in new_site_records {
        sites.insert(r.func_addr, r);
    }
    let writes = site_writes(s, &mut sites, &before, &after)?;
    write_code(&s.proc, &writes, &[])?;

    // Committed: the jumps are in place. Record it.
    undo.regions.clear();
    undo.new_arenas = 0;
    let text = image.text_range();
    s.rec.patches.insert(
        desc.name.clone(),
        PatchMemory {
            image: Region {
                addr: base,
                len: size,
            },
            text: Region {
                addr: text.0,
                len: text.1 - text.0,
            },
            file: path.to_string(),
        },
    );
    s.rec.sites = sites;
    s.rec.model = model;
    retire_removed(s, &completion.removed);
    // Record the committed state before anything else can fail.
    s.save()?;
    collect_garbage(s, GC_ATTEMPTS)?;
    s.save()?;

    let funcs = s
        .rec
        .model
        .patch(&desc.name)
        .map(|p| {
            p.objects
                .iter()
                .flat_map(|o| {
                    o.funcs.iter().map(|f| FuncChange {
                        object: o.name.clone(),
                        name: f.old_name.clone(),
                        sympos: f.old_sympos.max(1),
                        old_addr: format!("{:#x}", f.old_addr),
                        new_addr: format!("{:#x}", f.new_addr),
                        site: s
                            .rec
                            .sites
                            .get(&f.old_addr)
                            .map(|x| format!("{:#x}", x.site_addr))
                            .unwrap_or_default(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(ApplyReport {
        pid: s.proc.pid(),
        patch: desc.name,
        replace: desc.replace,
        image: format!("{base:#x}"),
        image_size: size,
        funcs,
        replaced: completion.removed.iter().map(|p| p.name.clone()).collect(),
    })
}

/// The bytes every changed site needs, given the site modes before and after.
/// Sites that end with no entry get their original bytes back and leave `sites`.
fn site_writes(
    s: &Session,
    sites: &mut BTreeMap<u64, Site>,
    before: &BTreeMap<u64, SiteMode>,
    after: &BTreeMap<u64, SiteMode>,
) -> Result<Vec<CodeWrite>, Error> {
    let addrs: BTreeSet<u64> = before.keys().chain(after.keys()).copied().collect();
    let mut writes = Vec::new();
    for a in addrs {
        let mode = after.get(&a).copied().unwrap_or(SiteMode::Original);
        if before.get(&a) == Some(&mode) {
            continue;
        }
        let site = sites
            .get_mut(&a)
            .ok_or_else(|| Error::CorruptState(format!("no site recorded for {a:#x}")))?;
        let bytes = match mode {
            SiteMode::Original => site.original.clone(),
            SiteMode::Jump(Code::Original) => jump_to(s, site, site.slot)?,
            SiteMode::Jump(Code::New(to)) => jump_to(s, site, to)?,
            SiteMode::Dispatch { .. } => {
                return Err(Error::Other(
                    "internal error: a per-thread dispatch was requested but transitions are immediate in this version".into(),
                ))
            }
        };
        if bytes != site.current {
            writes.push(CodeWrite {
                addr: site.site_addr,
                bytes: bytes.clone(),
                old: site.current.clone(),
                guard_len: site.overwritten_len() as u64,
            });
            site.current = bytes;
        }
    }
    Ok(writes)
}

/// A jump from the site to `to`: direct when in rel32 reach, else through
/// the site's absolute-jump stub (written now; the site is not live yet).
fn jump_to(s: &Session, site: &Site, to: u64) -> Result<Vec<u8>, Error> {
    let len = site.overwritten_len();
    let mut bytes = match jmp_rel32(site.site_addr, to) {
        Some(j) => j.to_vec(),
        None => {
            let stub = site.slot + SLOT_STUB;
            s.proc.write_mem(stub, &jmp_abs(to))?;
            jmp_rel32(site.site_addr, stub)
                .ok_or_else(|| Error::Placement("the site stub is out of reach".into()))?
                .to_vec()
        }
    };
    bytes.resize(len, 0xcc);
    Ok(bytes)
}

/// Move the memory of patches that left the list to `retired` (forced
/// patches' code is kept for good: a thread may still run it).
fn retire_removed(s: &mut Session, removed: &[Patch]) {
    for p in removed {
        if let Some(m) = s.rec.patches.remove(&p.name) {
            if p.forced {
                s.rec.kept_forced.push(m);
            } else {
                s.rec.retired.push(m);
            }
        }
    }
}

/// Release retired memory (patch images, site slots) that no thread can
/// still be executing or returning into, and arenas left empty. Checks
/// again a few times, since a thread usually leaves old code within
/// microseconds. Returns (freed, kept) bytes.
fn collect_garbage(s: &mut Session, attempts: u32) -> Result<(u64, u64), Error> {
    let mut freed = 0;
    for attempt in 0..attempts {
        let slots: Vec<u64> = s
            .rec
            .arenas
            .iter()
            .flat_map(|a| {
                a.used
                    .iter()
                    .filter(|(_, u)| **u == SlotUse::Retired)
                    .map(|(i, _)| a.slot_addr(*i))
                    .collect::<Vec<_>>()
            })
            .collect();
        if s.rec.retired.is_empty() && slots.is_empty() {
            break;
        }
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(attempt as u64));
        }
        // Executing or returning into a patch means an address in its text.
        let mut regions: Vec<Region> = s.rec.retired.iter().map(|m| m.text.clone()).collect();
        regions.extend(slots.iter().map(|a| Region {
            addr: *a,
            len: memory::SLOT_SIZE,
        }));
        let outcome = write_code(&s.proc, &[], &regions)?;
        let n = s.rec.retired.len();
        let (images, slot_free) = outcome.free.split_at(n);
        let mut unmap = Vec::new();
        let mut keep = Vec::new();
        for (m, free) in std::mem::take(&mut s.rec.retired).into_iter().zip(images) {
            if *free {
                freed += m.image.len;
                unmap.push(m.image);
            } else {
                keep.push(m);
            }
        }
        s.rec.retired = keep;
        for (addr, free) in slots.iter().zip(slot_free) {
            if *free {
                if let Some((ai, si)) = s.rec.slot_owner(*addr) {
                    s.rec.arenas[ai].used.remove(&si);
                }
            }
        }
        unmap.extend(
            s.rec
                .arenas
                .iter()
                .filter(|a| a.used.is_empty())
                .map(|a| a.region.clone()),
        );
        s.rec.arenas.retain(|a| !a.used.is_empty());
        if !unmap.is_empty() {
            let mut h = s.proc.hijack(HIJACK_TIMEOUT)?;
            for r in &unmap {
                h.munmap(r.addr, r.len)?;
            }
            h.release()?;
        }
    }
    let kept = s.rec.retired.iter().map(|m| m.image.len).sum();
    Ok((freed, kept))
}

/// Disable a patch and unload it.
pub fn disable(pid: i32, name: &str) -> Result<DisableReport, Error> {
    let mut s = Session::open(pid)?;
    if s.store.is_none() {
        return Err(Error::NoState(pid));
    }
    let mut model = s.rec.model.clone();
    let before = model.site_modes();
    let threads = s.proc.threads()?;
    model.begin_disable(name, &threads)?;
    switch_every_thread(&mut model);
    let completion = model.complete()?;
    let after = model.site_modes();

    let mut sites = s.rec.sites.clone();
    let writes = site_writes(&s, &mut sites, &before, &after)?;
    write_code(&s.proc, &writes, &[])?;

    // Committed. Sites whose stack emptied have their original bytes back;
    // their slots, like the removed patches' memory, are retired and freed
    // once no thread can be in them.
    let gone: Vec<Site> = sites
        .values()
        .filter(|x| !after.contains_key(&x.func_addr))
        .cloned()
        .collect();
    for x in &gone {
        sites.remove(&x.func_addr);
        if let Some((ai, si)) = s.rec.slot_owner(x.slot) {
            s.rec.arenas[ai].used.insert(si, SlotUse::Retired);
        }
    }
    s.rec.sites = sites;
    s.rec.model = model;
    retire_removed(&mut s, &completion.removed);
    s.save()?;
    let (freed, kept) = collect_garbage(&mut s, GC_ATTEMPTS)?;
    s.save()?;
    Ok(DisableReport {
        pid,
        patch: name.to_string(),
        restored: gone.iter().map(|x| x.name.clone()).collect(),
        freed_bytes: freed,
        deferred_bytes: kept,
    })
}

/// The model and sites of a process, as recorded in it.
pub fn status(pid: i32) -> Result<StatusReport, Error> {
    let proc = Process::open(pid)?;
    let maps = proc.maps()?;
    let rec = match store::find_store(&maps) {
        Some(base) => store::read(&proc, base)?,
        None => Record::new(),
    };
    let mut report = StatusReport::from_record(pid, &rec);
    if let Some(t) = report.transition.as_mut() {
        for p in &mut t.pending {
            p.name = proc.thread_name(p.tid).unwrap_or_default();
        }
    }
    Ok(report)
}

/// Every process on the machine that carries suture patches.
pub fn list() -> Result<Vec<ProcessEntry>, Error> {
    let mut out = Vec::new();
    let dir =
        std::fs::read_dir("/proc").map_err(|e| Error::Other(format!("cannot read /proc: {e}")))?;
    let mut pids: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort();
    for pid in pids {
        let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
            continue;
        };
        if !maps.contains(&format!("/memfd:{}", store::STATE_NAME)) {
            continue;
        }
        let command = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap_or_default()
            .trim()
            .to_string();
        match status(pid) {
            Ok(r) => {
                if r.patches.is_empty() {
                    continue;
                }
                out.push(ProcessEntry {
                    pid,
                    command,
                    patches: r.patches.into_iter().map(|p| p.name).collect(),
                    error: None,
                })
            }
            Err(e) => out.push(ProcessEntry {
                pid,
                command,
                patches: vec![],
                error: Some(e.to_string()),
            }),
        }
    }
    Ok(out)
}

/// Immediate transitions: every pending thread switches at once.
fn switch_every_thread(model: &mut Model) {
    for t in model.pending() {
        model.switch_thread(t);
    }
}
