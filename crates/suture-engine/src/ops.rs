//! The operations. Each one: open the process, take its lock, read the
//! record, do every check and all symbol work without touching the target,
//! then change the target in steps that each leave it consistent.
//!
//! Enable and disable are immediate in this version: every thread switches
//! at once (the model's transition is started and completed in one step).

use crate::lock;
use crate::memory::{self, page_up, SLOT_DISPATCH, SLOT_STUB};
use crate::objects::{LoadedObject, Objects};
use crate::record::{PatchMemory, Record, Region, Site, SlotUse};
use crate::report::*;
use crate::resolve::Resolver;
use crate::store;
use crate::transition::{self, Mirror};
use crate::worker;
use crate::write::{write_code, write_code_with, CodeWrite};
use crate::Error;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;
use suture_elf::{Layout, PatchDesc, PatchFile, SymKind};
use suture_model::{
    CallbackKind, Code, Completion, DisableKind, Func, Model, Object, Patch, SiteMode, State,
};
use suture_process::Process;
use suture_x86::{in_rel32_range, jmp_abs, jmp_rel32, SitePlan};

const HIJACK_TIMEOUT: Duration = Duration::from_secs(3);
const LOCK_WAIT: Duration = Duration::from_secs(30);
/// Checks for retired memory after an operation.
const GC_ATTEMPTS: u32 = 8;

/// Test-only: `SUTURE_TEST_PAUSE=POINT:PATH` makes the operation stop at
/// POINT, create `PATH.reached` and wait (at most a minute) for `PATH.go`,
/// so tests can act on the target at an exact step (e.g. kill it). Points:
/// `loaded` (the patch image is written), `int3s` (a transition start's
/// `int3`s are in place, before the record that describes it is stored).
pub(crate) fn test_pause(point: &str) {
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

/// What a command means to do with a process, which decides how it treats
/// a transition's worker holding the lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Intent<'a> {
    /// Start something new: refused as busy while a transition runs
    /// (`requested` names what was asked for).
    Change { requested: &'a str },
    /// Act on the transition itself (reverse, force, resume): the worker is
    /// asked to stop and the command takes over.
    TakeOver,
}

/// An opened, locked target and its record.
pub(crate) struct Session {
    pub(crate) proc: Process,
    _lock: lock::TargetLock,
    pub(crate) store: Option<u64>,
    pub(crate) rec: Record,
}

/// The record of a process, read without the lock (for reports).
pub(crate) fn read_record(proc: &Process) -> Result<Record, Error> {
    let Some(base) = store::find_store(&proc.maps()?) else {
        return Ok(Record::new());
    };
    // A writer may flip slots under us twice in a row; read again.
    let mut last = None;
    for _ in 0..5 {
        match store::read(proc, base) {
            Ok(r) => return Ok(r),
            Err(e @ Error::CorruptState(_)) => last = Some(e),
            Err(e) => return Err(e),
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Err(last.expect("loop ran"))
}

impl Session {
    pub(crate) fn open(pid: i32, intent: Intent<'_>) -> Result<Session, Error> {
        let proc = Process::open(pid)?;
        proc.check_permission()?;
        let lock = match lock::try_lock(&proc)? {
            Some(l) => l,
            None => {
                // Held: by a transition's worker, or by another command.
                let rec = read_record(&proc)?;
                let worker = rec
                    .transition
                    .as_ref()
                    .and_then(|t| t.worker.clone())
                    .filter(|w| worker::alive(w, pid));
                match (worker, rec.model.transition(), intent) {
                    (Some(w), _, Intent::TakeOver) => {
                        worker::stop(&w)?;
                        lock::lock(&proc, LOCK_WAIT)?
                    }
                    (Some(_), Some(t), Intent::Change { requested }) => {
                        return Err(suture_model::ModelError::Busy {
                            transition: t.patch.clone(),
                            requested: requested.to_string(),
                        }
                        .into())
                    }
                    _ => lock::lock(&proc, LOCK_WAIT)?,
                }
            }
        };
        // Only now: a worker that just let go may still have been attached.
        proc.check_traceable()?;
        let store = store::find_store(&proc.maps()?);
        let rec = match store {
            Some(base) => store::read(&proc, base)?,
            None => Record::new(),
        };
        // A live write a killed suture left half done is finished first.
        crate::live::repair(&proc, &rec)?;
        let mut s = Session {
            proc,
            _lock: lock,
            store,
            rec,
        };
        if s.rec.transition.as_ref().is_some_and(|t| t.quarantine) {
            transition::lift_quarantine(&s.proc, &mut s.rec)?;
            s.save()?;
        }
        Ok(s)
    }

    /// Write the record, creating the store if this is the first one.
    pub(crate) fn save(&mut self) -> Result<(), Error> {
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
    /// Direct calls to the function in its object.
    callers: Vec<crate::record::Caller>,
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
    /// The patch calls suture's runtime (loaded on first use).
    uses_runtime: bool,
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
            desc_addr: 0,
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
                    callers: Vec::new(),
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
    // Direct calls to the new sites' functions, rewritten to call the new
    // code once the transition completes.
    let exclude: Vec<(u64, u64)> = ranges.iter().map(|&(a, b, _)| (a, b)).collect();
    for obj in &patched_objs {
        let funcs: BTreeSet<u64> = new_sites
            .iter()
            .filter(|n| n.object == (obj.start, obj.end))
            .map(|n| n.func_addr)
            .collect();
        let found = crate::callers::find(&s.proc, obj, &funcs, &exclude)?;
        for n in new_sites
            .iter_mut()
            .filter(|n| funcs.contains(&n.func_addr))
        {
            n.callers = crate::callers::records(n.func_addr, &found);
            if !n.callers.is_empty() {
                checks.push(CheckItem {
                    check: "callers".into(),
                    detail: format!(
                        "{}: {} direct call(s) in {} will call the new code once the transition completes",
                        n.name,
                        n.callers.len(),
                        obj.path
                    ),
                });
            }
        }
    }
    s.rec.model.check_enable(&patch)?;
    let layout = file.layout().map_err(Error::Link)?;
    let resolver = Resolver::new(&objects, patched_objs.clone(), &desc.symbols);
    let mut symbols = BTreeMap::new();
    let uses_runtime = crate::runtime::needed(&layout.undefined_symbols());
    for name in layout.undefined_symbols() {
        // suture's runtime: its address is known once it is loaded.
        if crate::runtime::EXPORTS.contains(&name.as_str()) {
            let a = s
                .rec
                .runtime
                .as_ref()
                .and_then(|r| r.exports.get(&name))
                .copied();
            symbols.insert(name, a.unwrap_or(0));
            continue;
        }
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
        uses_runtime,
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
    // Permission first: it is the more fundamental answer.
    Process::open(pid)?.check_permission()?;
    let name = read_patch(path)?.descriptor().name.clone();
    let s = Session::open(pid, Intent::Change { requested: &name })?;
    let p = prepare(&s, path)?;
    // Linking at a plausible address checks relocations too.
    let base = p.near.1.next_multiple_of(memory::PAGE);
    // Runtime functions not loaded yet: any address in reach will do.
    let symbols: BTreeMap<String, u64> = p
        .symbols
        .iter()
        .map(|(n, a)| (n.clone(), if *a == 0 { base } else { *a }))
        .collect();
    link(&p.layout, base, &symbols)?;
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

/// Stores `loaded` (the record as this command found it) with the handler
/// of live writes that [`crate::live::Readiness::complete`] just mapped or
/// registered, unless the stored record knew it already: from here on a
/// suture killed after placing `int3`s leaves a record that names the
/// handler and its undo log, so the next command can finish or withdraw
/// them ([`crate::live::repair`]). Nothing else of this command's changes
/// is stored yet.
fn store_new_trap(s: &Session, loaded: &Record) -> Result<(), Error> {
    let key = |r: &Record| r.trap.as_ref().map(|t| (t.region.clone(), t.barrier));
    if key(&s.rec) == key(loaded) {
        return Ok(());
    }
    let Some(base) = s.store else {
        return Ok(());
    };
    let mut r = loaded.clone();
    r.trap = s.rec.trap.clone();
    store::write(&s.proc, base, &r)
}

/// Memory mapped during an apply, released again if the apply fails.
#[derive(Default)]
struct Undo {
    regions: Vec<Region>,
    new_arenas: usize,
    /// The record's spare pending table, taken for the transition.
    spare_table: Option<Region>,
}

/// Load and enable a patch.
pub fn apply(pid: i32, path: &Path) -> Result<ApplyReport, Error> {
    Held::take();
    // Permission first: it is the more fundamental answer.
    Process::open(pid)?.check_permission()?;
    let name = read_patch(path)?.descriptor().name.clone();
    let mut s = Session::open(pid, Intent::Change { requested: &name })?;
    let p = prepare(&s, path)?;
    let mut undo = Undo::default();
    let arenas_before = s.rec.arenas.len();
    let result = apply_prepared(&mut s, p, &path.display().to_string(), &mut undo);
    if result.is_err() {
        // Put the target back as it was: nothing of ours is referenced yet.
        s.rec.arenas.truncate(arenas_before);
        if let Some(t) = undo.spare_table.take() {
            s.rec.spare_table = Some(t);
        }
        // The record of the patch may have been stored just before a write
        // that then failed (and was undone): store the old one again.
        if s.store.is_some() {
            let _ = s.save();
        }
        if !undo.regions.is_empty() || undo.new_arenas > 0 {
            if let Ok(mut h) = s.proc.hijack(HIJACK_TIMEOUT) {
                for r in &undo.regions {
                    let _ = h.munmap(r.addr, r.len);
                }
                let _ = h.release();
            }
        }
    }
    result.map(|r| ApplyReport {
        held: Held::take(),
        ..r
    })
}

fn apply_prepared(
    s: &mut Session,
    p: Prepared,
    path: &str,
    undo: &mut Undo,
) -> Result<ApplyReport, Error> {
    let loaded = s.rec.clone();
    let Prepared {
        layout,
        desc,
        mut patch,
        new_sites,
        mut symbols,
        near,
        checks: _,
        uses_runtime,
    } = p;
    let maps = s.proc.maps()?;
    // Checked before a thread is borrowed: it reads `/proc` for every thread.
    let readiness = if transition::immediate() {
        crate::live::Readiness::Unsuitable
    } else {
        crate::live::readiness(&s.proc, &s.rec)?
    };
    let mut h = s.proc.hijack(HIJACK_TIMEOUT)?;
    if s.store.is_none() {
        s.store = Some(store::create(&mut h)?);
    }
    // suture's runtime, once per process, before the first patch using it.
    let mut new_runtime = None;
    if uses_runtime {
        let loaded = match &s.rec.runtime {
            Some(r) => r.clone(),
            None => {
                let objects = Objects::discover(&s.proc, &maps)?;
                let r = crate::runtime::load(&mut h, &s.proc, &objects)?;
                undo.regions.push(r.memory.image.clone());
                new_runtime = Some(r.clone());
                r
            }
        };
        for (name, addr) in &loaded.exports {
            if let Some(v) = symbols.get_mut(name) {
                *v = *addr;
            }
        }
    }

    // Patch image near the first patched object when possible.
    let size = page_up(layout.size());
    let name = format!("suture-patch:{}", desc.name);
    // Test-only: SUTURE_TEST_FAR_IMAGE places the image wherever the kernel
    // likes, to exercise the out-of-reach paths (PLT stubs, site stubs).
    let prots = memory::image_protections(&layout.regions());
    let near_base = if std::env::var_os("SUTURE_TEST_FAR_IMAGE").is_some() {
        None
    } else {
        memory::map_regions_near(&mut h, &maps, &name, size, near, memory::PROT_RX, &prots)?
    };
    let base = match near_base {
        Some(a) => a,
        None => memory::create_mapping(&mut h, &name, size, None, memory::PROT_RX, false, &prots)?,
    };
    undo.regions.push(Region {
        addr: base,
        len: size,
    });

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
    let table = if transition::immediate() {
        None
    } else {
        let t = transition::new_table(&mut h, &mut s.rec, s.proc.threads()?.len())?;
        if t.reused {
            undo.spare_table = Some(t.region.clone());
        } else {
            undo.regions.push(t.region.clone());
        }
        Some((t.region, t.bits))
    };
    // Ready for live writes while the thread is borrowed anyway.
    let live = readiness.complete(&s.proc, &mut s.rec, Some(&mut h))?;
    store_new_trap(s, &loaded)?;
    // The borrowed thread goes back to its work before the image is linked
    // and written (from outside, through /proc/PID/mem).
    h.release()?;
    let image = link(&layout, base, &symbols)?;
    memory::install_image(&s.proc, &image, base)?;

    // Trampolines: the relocated first instructions of each function.
    let mut new_site_records = Vec::new();
    for (ns, slot) in new_sites.iter().zip(&slots) {
        let (code, resume_map) =
            ns.plan
                .relocated_original_map(*slot)
                .map_err(|e| Error::Site {
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
            resume_map,
            callers: ns.callers.clone(),
        });
    }

    // New function and callback addresses.
    let mut extents = Vec::new();
    for (mo, od) in patch.objects.iter_mut().zip(&desc.objects) {
        for (f, fd) in mo.funcs.iter_mut().zip(&od.funcs) {
            f.new_addr = image.address_of(&fd.new_func).map_err(Error::Link)?;
            extents.extend(image.extent_of(&fd.new_func));
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
        mo.desc_addr = image.address_of(&od.desc).map_err(Error::Link)?;
    }
    for (st, sd) in patch.states.iter_mut().zip(&desc.states) {
        st.desc_addr = image.address_of(&sd.desc).map_err(Error::Link)?;
    }

    test_pause("loaded");
    // kernel: klp_pre_patch_callback, object by object; a failure cancels
    // the enable, and objects whose pre-patch ran get their post-unpatch.
    // The states as the new patch's callbacks must see them: its own, and
    // the previous holder's (kernel: klp_get_state / klp_get_prev_state).
    let runtime = new_runtime.clone().or_else(|| s.rec.runtime.clone());
    if let Some(rt) = &runtime {
        let mut m = s.rec.model.clone();
        m.begin_enable(patch.clone(), &[])?;
        crate::runtime::write_states(&s.proc, rt, &m)?;
    }
    let pre = pre_patch(s, &patch);
    if let (Err(_), Some(rt)) = (&pre, &runtime) {
        let _ = crate::runtime::write_states(&s.proc, rt, &s.rec.model);
    }
    let mut callback_log = pre?;
    let memory = PatchMemory {
        funcs: extents,
        uses_runtime,
        ..memory::image_memory(&image, base, size, path.to_string())
    };
    let mut model = s.rec.model.clone();
    let before = model.site_modes();
    let threads = s.proc.threads()?;
    model.begin_enable(patch.clone(), &threads)?;
    let mut sites = s.rec.sites.clone();
    for r in new_site_records {
        sites.insert(r.func_addr, r);
    }
    let mut completion = None;
    match table {
        None => {
            // Test-only immediate mode: every thread at once.
            transition::switch_every_thread(&mut model);
            let c = model.complete()?;
            let after = model.site_modes();
            let writes = site_writes(&s.proc, &mut sites, &before, &after)?;
            write_code(&s.proc, &writes)?;
            s.rec.sites = sites;
            completion = Some(c);
        }
        Some(table) => {
            s.rec.sites = sites;
            let after = model.site_modes();
            let proc = &s.proc;
            let jumps = jumps_for(proc, &before, &after);
            // The record as it is once the jumps are written, stored in
            // the target just before them (in the same stop): a suture
            // killed during or after the write leaves a record that knows
            // the patch and its transition.
            let base = s.store.expect("created with the first hijack above");
            let (name, mem, rt) = (desc.name.clone(), memory.clone(), new_runtime.clone());
            let mut save = |r: &Record, m: &Model| {
                let mut r = r.clone();
                r.patches.insert(name.clone(), mem.clone());
                if let Some(rt) = &rt {
                    r.runtime = Some(rt.clone());
                }
                r.model = m.clone();
                store::write(proc, base, &r)
            };
            if let Err(e) = transition::begin(
                proc,
                &mut s.rec,
                &mut model,
                table,
                &*jumps,
                &|_| true,
                now(),
                &mut save,
                live.as_ref(),
            ) {
                s.rec.sites.retain(|a, _| before.contains_key(a));
                return Err(e);
            }
        }
    }

    // Committed: the jumps are in place. Record it.
    undo.regions.clear();
    undo.new_arenas = 0;
    s.rec.patches.insert(desc.name.clone(), memory);
    if let Some(r) = new_runtime {
        s.rec.runtime = Some(r);
    }
    s.rec.model = model;
    if let Some(c) = &completion {
        retire_removed(s, &c.removed);
    }
    // Record the committed state before anything else can fail.
    s.save()?;
    let (replaced, pending) = match completion {
        Some(c) => {
            callback_log.extend(run_callbacks(s, &c));
            publish_states(s);
            collect_garbage(s, GC_ATTEMPTS)?;
            s.save()?;
            (c.removed.iter().map(|p| p.name.clone()).collect(), 0)
        }
        None => match settle(s)? {
            Settled::Complete(f) => (
                {
                    callback_log.extend(f.callbacks);
                    f.completion
                        .removed
                        .iter()
                        .map(|p| p.name.clone())
                        .collect()
                },
                0,
            ),
            Settled::Pending(n) => (Vec::new(), n),
        },
    };

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
        replaced,
        pending,
        callbacks: callback_log,
        held: Held::default(),
    })
}

fn object_label(name: &Option<String>) -> String {
    match name {
        Some(n) => format!("object {n}"),
        None => "object [main program]".to_string(),
    }
}

fn kind_name(k: CallbackKind) -> &'static str {
    match k {
        CallbackKind::PrePatch => "pre-patch",
        CallbackKind::PostPatch => "post-patch",
        CallbackKind::PreUnpatch => "pre-unpatch",
        CallbackKind::PostUnpatch => "post-unpatch",
    }
}

/// A callback runner for the session's process.
fn with_runner<T>(
    s: &Session,
    f: impl FnOnce(&crate::callbacks::Runner<'_>) -> T,
) -> Result<T, Error> {
    let objects = Objects::discover(&s.proc, &s.proc.maps()?)?;
    let checker = crate::check::Checker::new(&s.proc, &objects, &s.rec)?;
    Ok(f(&crate::callbacks::Runner::new(
        &s.proc, &checker, &objects,
    )))
}

/// Run `patch`'s pre-patch callbacks in object order. On the first failure
/// (non-zero, or the callback could not run) the post-unpatch callbacks of
/// the objects whose pre-patch succeeded run, and the enable is refused.
fn pre_patch(s: &Session, patch: &Patch) -> Result<Vec<String>, Error> {
    let has_any = patch.objects.iter().any(|o| !o.callbacks.is_empty());
    if !has_any {
        return Ok(Vec::new());
    }
    with_runner(s, |r| {
        let mut log = Vec::new();
        let mut done: Vec<&Object> = Vec::new();
        for o in &patch.objects {
            let Some((_, addr)) = o
                .callbacks
                .iter()
                .find(|(k, _)| *k == CallbackKind::PrePatch)
            else {
                done.push(o);
                continue;
            };
            let label = object_label(&o.name);
            let result = r.call(
                &format!("pre-patch callback of {label}"),
                *addr,
                o.desc_addr,
            );
            let failed = match result {
                Ok(v) => (v as u32 as i32 != 0).then(|| format!("it returned {}", v as u32 as i32)),
                Err(e) => Some(e.to_string()),
            };
            if let Some(why) = failed {
                // kernel order: object by object, as klp_cancel_transition.
                for d in &done {
                    if let Some((_, a)) = d
                        .callbacks
                        .iter()
                        .find(|(k, _)| *k == CallbackKind::PostUnpatch)
                    {
                        let _ = r.call("post-unpatch callback", *a, d.desc_addr);
                    }
                }
                return Err(Error::Other(format!(
                    "pre-patch callback failed for {label} of patch '{}' ({why}); the patch was not applied",
                    patch.name
                )));
            }
            log.push(format!("pre-patch {label}: ok"));
            done.push(o);
        }
        Ok(log)
    })?
}

/// Run the pre-unpatch callbacks of patch `name` (they cannot fail).
fn pre_unpatch(s: &Session, name: &str) -> Result<Vec<String>, Error> {
    let Some(p) = s.rec.model.patch(name) else {
        return Ok(Vec::new());
    };
    let list: Vec<(String, u64, u64)> = p
        .objects
        .iter()
        .filter_map(|o| {
            let (_, a) = o
                .callbacks
                .iter()
                .find(|(k, _)| *k == CallbackKind::PreUnpatch)?;
            Some((object_label(&o.name), *a, o.desc_addr))
        })
        .collect();
    if list.is_empty() {
        return Ok(Vec::new());
    }
    with_runner(s, |r| {
        list.iter()
            .map(|(label, a, arg)| {
                match r.call(&format!("pre-unpatch callback of {label}"), *a, *arg) {
                    Ok(_) => format!("pre-unpatch {label}: ok"),
                    Err(e) => format!("pre-unpatch {label}: FAILED: {e}"),
                }
            })
            .collect()
    })
}

/// Make the runtime's state table match the record's model (after a
/// completion: no previous states any more).
fn publish_states(s: &mut Session) {
    if let Some(rt) = &s.rec.runtime {
        let _ = crate::runtime::write_states(&s.proc, rt, &s.rec.model);
    }
}

/// Run a completion's callbacks (post-patch or post-unpatch), in order.
/// Their failures cannot undo the completed transition: they are reported.
fn run_callbacks(s: &mut Session, c: &Completion) -> Vec<String> {
    if c.callbacks.is_empty() {
        return Vec::new();
    }
    let args: Vec<(String, String, u64, u64)> = c
        .callbacks
        .iter()
        .map(|(patch, obj, kind, addr)| {
            let arg = s
                .rec
                .model
                .patch(patch)
                .into_iter()
                .chain(c.removed.iter())
                .flat_map(|p| p.objects.iter())
                .find(|o| &o.name == obj && o.callbacks.iter().any(|(_, a)| a == addr))
                .map(|o| o.desc_addr)
                .unwrap_or(0);
            (kind_name(*kind).to_string(), object_label(obj), *addr, arg)
        })
        .collect();
    match with_runner(s, |r| {
        args.iter()
            .map(|(kind, label, a, arg)| {
                match r.call(&format!("{kind} callback of {label}"), *a, *arg) {
                    Ok(_) => format!("{kind} {label}: ok"),
                    Err(e) => format!("{kind} {label}: FAILED: {e}"),
                }
            })
            .collect()
    }) {
        Ok(v) => v,
        Err(e) => vec![format!("callbacks not run: {e}")],
    }
}

/// The bytes every changed site needs, given the site modes before and after.
/// Sites that end with no entry get their original bytes back and leave `sites`.
fn site_writes(
    proc: &Process,
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
            SiteMode::Jump(Code::Original) => jump_to(proc, site, site.slot)?,
            SiteMode::Jump(Code::New(to)) => jump_to(proc, site, to)?,
            // The stub is in the site's own slot, always in rel32 reach.
            SiteMode::Dispatch { .. } => jump_to(proc, site, site.slot + SLOT_DISPATCH)?,
        };
        // A thread meeting the int3 of a live write goes where the new
        // bytes lead: the jump's destination, or for the original bytes
        // their relocated copy (the trampoline at the start of the slot).
        let dest = match mode {
            SiteMode::Original => site.slot,
            _ => jump_destination(site.site_addr, &bytes)
                .ok_or_else(|| Error::CorruptState(format!("no jump built for {a:#x}")))?,
        };
        if bytes != site.current {
            writes.push(CodeWrite {
                addr: site.site_addr,
                bytes: bytes.clone(),
                old: site.current.clone(),
                guard_len: site.overwritten_len() as u64,
                redirect: site.resume_map.clone(),
                trap: Some((dest, suture_x86::trap::KIND_JUMP)),
            });
            site.current = bytes;
        }
        writes.extend(crate::callers::writes(site, mode));
    }
    Ok(writes)
}

/// Where the `jmp rel32` at the start of `bytes` (placed at `at`) goes.
fn jump_destination(at: u64, bytes: &[u8]) -> Option<u64> {
    match bytes {
        [0xE9, d @ ..] if d.len() >= 4 => {
            let rel = i32::from_le_bytes(d[..4].try_into().ok()?);
            Some((at + 5).wrapping_add(rel as i64 as u64))
        }
        _ => None,
    }
}

/// The site writes of a transition's start, for [`transition::begin`].
fn jumps_for<'a>(
    proc: &'a Process,
    before: &'a BTreeMap<u64, SiteMode>,
    after: &'a BTreeMap<u64, SiteMode>,
) -> Box<transition::SiteWrites<'a>> {
    Box::new(move |sites: &BTreeMap<u64, Site>| {
        let mut sites = sites.clone();
        let w = site_writes(proc, &mut sites, before, after)?;
        Ok((w, sites))
    })
}

/// A jump from the site to `to`: direct when in rel32 reach, else through
/// the site's absolute-jump stub (written now; the site is not live yet).
fn jump_to(proc: &Process, site: &Site, to: u64) -> Result<Vec<u8>, Error> {
    let len = site.overwritten_len();
    let mut bytes = match jmp_rel32(site.site_addr, to) {
        Some(j) => j.to_vec(),
        None => {
            let stub = site.slot + SLOT_STUB;
            proc.write_mem(stub, &jmp_abs(to))?;
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
    // The runtime goes with the last patch that uses it (a forced patch's
    // code may still call it: then it stays).
    let used = s
        .rec
        .patches
        .values()
        .chain(&s.rec.kept_forced)
        .any(|m| m.uses_runtime);
    if !used {
        if let Some(r) = s.rec.runtime.take() {
            s.rec.retired.push(r.memory);
        }
    }
}

/// Release retired memory (patch images, site slots) that no thread can
/// still be executing or returning into, and arenas left empty. Checks
/// again a few times, since a thread usually leaves old code within
/// microseconds. Returns (freed, kept) bytes.
fn collect_garbage(s: &mut Session, attempts: u32) -> Result<(u64, u64), Error> {
    let mut freed = 0;
    // Precise where stacks unwind reliably: the unwinder knows every object
    // and every patch image still mapped (retired ones included).
    let mut checker = None;
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
        if s.rec.retired.is_empty() && slots.is_empty() && s.rec.retired_regions.is_empty() {
            break;
        }
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(attempt as u64));
        }
        if checker.is_none() {
            let objects = Objects::discover(&s.proc, &s.proc.maps()?)?;
            checker = crate::check::Checker::new(&s.proc, &objects, &s.rec).ok();
        }
        // Executing or returning into a patch means an address in its text.
        let mut regions: Vec<Region> = s.rec.retired.iter().map(|m| m.text.clone()).collect();
        regions.extend(slots.iter().map(|a| Region {
            addr: *a,
            len: memory::SLOT_SIZE,
        }));
        // A pending table stays while a thread may be inside a dispatch
        // stub (which reads it) or holds a pointer into it.
        let tables = s.rec.retired_regions.clone();
        // Every slot still mapped counts, retired ones included: a thread
        // may still be inside the dispatch stub of a site just removed.
        let stubs: Vec<Region> = s
            .rec
            .arenas
            .iter()
            .flat_map(|a| a.used.keys().map(|i| a.slot_addr(*i)).collect::<Vec<_>>())
            .map(|slot| Region {
                addr: slot + SLOT_DISPATCH,
                len: memory::SLOT_SIZE - SLOT_DISPATCH,
            })
            .collect();
        regions.extend(tables.iter().cloned());
        regions.extend(stubs.iter().cloned());
        let free = crate::write::unused_regions(&s.proc, &regions, checker.as_ref())?;
        let n = s.rec.retired.len();
        let (images, rest) = free.split_at(n);
        let (slot_free, rest) = rest.split_at(slots.len());
        let (table_free, stub_free) = rest.split_at(tables.len());
        let no_stub_busy = stub_free.iter().all(|f| *f);
        let mut unmap = Vec::new();
        let mut keep_tables = Vec::new();
        for (r, free) in tables.into_iter().zip(table_free) {
            if *free && no_stub_busy {
                // One is kept for the next transition (`new_table`).
                match s.rec.spare_table {
                    None => s.rec.spare_table = Some(r),
                    Some(_) => unmap.push(r),
                }
            } else {
                keep_tables.push(r);
            }
        }
        s.rec.retired_regions = keep_tables;
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

/// Seconds since the epoch.
fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A completed transition, as the engine saw it.
pub(crate) struct Finished {
    pub(crate) completion: Completion,
    /// Functions whose original bytes are back.
    pub(crate) restored: Vec<String>,
    /// What the completion's callbacks did.
    pub(crate) callbacks: Vec<String>,
}

/// Where a transition stands after the command's own first pass.
enum Settled {
    Complete(Finished),
    /// Threads still pending; a worker goes on.
    Pending(usize),
}

/// First pass over a transition just begun or reversed: check every thread
/// once, complete if all switched, else hand over to a worker.
fn settle(s: &mut Session) -> Result<Settled, Error> {
    let swept = (|| {
        let Session { proc, rec, .. } = &mut *s;
        let mut tracer = proc.tracer();
        let mut d = transition::Driver::new(proc, rec)?;
        d.reconcile(&mut tracer, false)?;
        d.sweep(&mut tracer, false)
    })();
    s.save()?;
    // If this pass failed, the worker tries again.
    if swept.is_ok() && s.rec.model.pending().is_empty() {
        if let Some(c) = finish(s, false)? {
            return Ok(Settled::Complete(c));
        }
    }
    worker::spawn(&s.proc)?;
    Ok(Settled::Pending(s.rec.model.pending().len()))
}

/// Complete the transition once no thread is pending (kernel:
/// `klp_complete_transition`): in one stop, make sure no thread still runs
/// as pending (a new thread reusing a pending thread's pointer; with
/// `forced` they are switched too), then write every site's final jump (or
/// original bytes). `None` if a pending thread turned up.
pub(crate) fn finish(s: &mut Session, forced: bool) -> Result<Option<Finished>, Error> {
    let t = s
        .rec
        .transition
        .clone()
        .ok_or(suture_model::ModelError::NoTransition)?;
    let mirror = Mirror::read(&s.proc, &t)?;
    let mut model = s.rec.model.clone();
    let before = model.site_modes();
    let completion = model.complete()?;
    let after = model.site_modes();
    let mut sites = s.rec.sites.clone();
    let writes = site_writes(&s.proc, &mut sites, &before, &after)?;
    let mut orphans: Vec<(i32, u64)> = Vec::new();
    let loaded = s.rec.clone();
    let live = crate::live::prepare(&s.proc, &mut s.rec)?;
    store_new_trap(s, &loaded)?;
    let live_done = match live.filter(|_| crate::live::suits(&writes)) {
        Some(l) if crate::live::set_table(&s.proc, &l, &writes)? => {
            orphans = finish_live(&s.proc, &t, &mirror, forced, &writes)?;
            if !forced && !orphans.is_empty() {
                Some(false)
            } else {
                if let Err(e) = crate::live::complete(&s.proc, &writes, false) {
                    crate::live::undo(&s.proc, &writes);
                    return Err(e);
                }
                Some(true)
            }
        }
        _ => None,
    };
    let mut make = |stopped: &suture_process::StoppedProcess<'_>| {
        orphans = stopped
            .threads()
            .into_iter()
            .filter_map(|tid| {
                let tp = stopped.regs(tid)?.fs_base;
                mirror.contains(tp).then_some((tid, tp))
            })
            .collect();
        if !forced && !orphans.is_empty() {
            return Ok(None);
        }
        Ok(Some(writes.clone()))
    };
    let committed = match live_done {
        Some(done) => done,
        None => write_code_with(&s.proc, &mut make)?,
    };
    if !committed {
        let tr = s.rec.transition.as_mut().expect("checked");
        for (tid, tp) in orphans {
            s.rec.model.add_pending_thread(tid);
            tr.tps.insert(tid, tp);
        }
        s.save()?;
        return Ok(None);
    }
    // Committed. Removed sites, patches and the pending table are retired
    // and freed once no thread can be in them.
    let gone = commit_sites(s, sites, &after, model);
    s.rec.transition = None;
    s.rec.retired_regions.push(t.table);
    // kernel: klp_post_patch_callback / klp_post_unpatch_callback, while
    // the code of a removed patch is still mapped.
    let callbacks = run_callbacks(s, &completion);
    publish_states(s);
    retire_removed(s, &completion.removed);
    s.save()?;
    collect_garbage(s, GC_ATTEMPTS)?;
    s.save()?;
    Ok(Some(Finished {
        completion,
        restored: gone.into_iter().map(|x| x.name).collect(),
        callbacks,
    }))
}

/// The completion's `int3`s written while every thread is traced (see
/// `live.rs`): threads the record does not know are looked at first, and
/// one whose thread pointer the table still holds (a new thread reusing a
/// pending thread's) is an orphan: unless `forced`, nothing is written and
/// the orphans are returned. A thread born meanwhile whose pointer the
/// table holds is switched before its first instruction.
fn finish_live(
    proc: &Process,
    t: &crate::record::TransitionRecord,
    mirror: &Mirror,
    forced: bool,
    writes: &[CodeWrite],
) -> Result<Vec<(i32, u64)>, Error> {
    let switch = |tp: u64| -> Result<(), Error> {
        if let Some(i) = mirror.index_of(tp) {
            let low = (mirror.slots[i] as u8) | suture_x86::dispatch::TOMBSTONE_BIT as u8;
            proc.write_mem(t.table.addr + 8 * i as u64, &[low])?;
        }
        Ok(())
    };
    let r = crate::live::Window::run(proc, |tracer| {
        let mut born =
            |_: &mut suture_process::Tracer<'_>, _: i32, regs: &libc::user_regs_struct| {
                switch(regs.fs_base)
            };
        let mut orphans = Vec::new();
        let unknown: Vec<i32> = tracer
            .traced()
            .into_iter()
            .filter(|tid| !t.tps.contains_key(tid))
            .collect();
        crate::live::look_at_each(
            tracer,
            &unknown,
            crate::live::LetGo::Resume,
            1,
            None,
            &mut |_, tid, regs| {
                if mirror.contains(regs.fs_base) {
                    orphans.push((tid, regs.fs_base));
                }
                Ok(())
            },
            &mut born,
        )?;
        if !forced && !orphans.is_empty() {
            return Ok(orphans);
        }
        crate::live::place_int3(proc, writes)?;
        // From here every call of a changing site goes to its final code.
        crate::live::drain(tracer, &mut |_, _, _| Ok(()))?;
        Ok(orphans)
    });
    if r.is_err() {
        crate::live::withdraw_int3(proc, writes);
    }
    r
}

/// Record the sites and model of a completed transition. Sites whose stack
/// emptied have their original bytes back; their slots are retired (freed
/// once no thread can be in them). Returns those sites.
fn commit_sites(
    s: &mut Session,
    mut sites: BTreeMap<u64, Site>,
    after: &BTreeMap<u64, SiteMode>,
    model: Model,
) -> Vec<Site> {
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
    gone
}

/// Which intent a command about patch `name` has: acting on the patch in
/// transition takes the transition over.
fn intent_for(pid: i32, name: &str) -> Result<Intent<'_>, Error> {
    let proc = Process::open(pid)?;
    let rec = read_record(&proc)?;
    Ok(match rec.model.transition() {
        Some(t) if t.patch == name => Intent::TakeOver,
        _ => Intent::Change { requested: name },
    })
}

/// Disable a patch (or reverse its transition if it is in one).
pub fn disable(pid: i32, name: &str) -> Result<DisableReport, Error> {
    Held::take();
    disable_inner(pid, name).map(|r| DisableReport {
        held: Held::take(),
        ..r
    })
}

fn disable_inner(pid: i32, name: &str) -> Result<DisableReport, Error> {
    let mut s = Session::open(pid, intent_for(pid, name)?)?;
    if s.store.is_none() {
        return Err(Error::NoState(pid));
    }
    let mut model = s.rec.model.clone();
    let before = model.site_modes();
    let threads = s.proc.threads()?;
    let kind = model.begin_disable(name, &threads)?;
    let reversed = kind == DisableKind::Reversed;
    if transition::immediate() {
        if kind == DisableKind::Started {
            pre_unpatch(&s, name)?;
        }
        transition::switch_every_thread(&mut model);
        let completion = model.complete()?;
        let after = model.site_modes();
        let mut sites = s.rec.sites.clone();
        let writes = site_writes(&s.proc, &mut sites, &before, &after)?;
        write_code(&s.proc, &writes)?;
        s.rec.transition = None;
        // Reuse finish's bookkeeping by replaying it on a completed model.
        return commit_immediate(s, model, sites, after, completion, name, reversed);
    }
    // kernel: klp_pre_unpatch_callback before the transition starts (not
    // at a reversal, where no callback runs).
    if let Some(rt) = &s.rec.runtime {
        crate::runtime::write_states(&s.proc, rt, &model)?;
    }
    let mut callback_log = Vec::new();
    if kind == DisableKind::Started {
        callback_log = pre_unpatch(&s, name)?;
    }
    // A reversal rewrites stubs threads are running: the whole-process
    // stop, so no live writes.
    let mut reused_table = false;
    let (table, pending, started, live): (_, Box<dyn Fn(u64) -> bool>, _, _) = match kind {
        DisableKind::Started => {
            let readiness = crate::live::readiness(&s.proc, &s.rec)?;
            let loaded = s.rec.clone();
            let mut h = s.proc.hijack(HIJACK_TIMEOUT)?;
            let t = transition::new_table(&mut h, &mut s.rec, threads.len());
            let live = match t {
                Ok(_) => readiness.complete(&s.proc, &mut s.rec, Some(&mut h)),
                Err(_) => Ok(None),
            };
            h.release()?;
            store_new_trap(&s, &loaded)?;
            let t = t?;
            reused_table = t.reused;
            ((t.region, t.bits), Box::new(|_| true), now(), live?)
        }
        DisableKind::Reversed => {
            // Threads still in the old start state are done; the others
            // (not in the table) become the pending ones.
            let t = s.rec.transition.clone().ok_or_else(|| {
                Error::CorruptState("the model is in transition but the record has no table".into())
            })?;
            let old = Mirror::read(&s.proc, &t)?;
            (
                (t.table.clone(), t.bits),
                Box::new(move |tp| !old.contains(tp)),
                t.started,
                None,
            )
        }
    };
    let after = model.site_modes();
    let fresh_table = (kind == DisableKind::Started).then(|| table.0.clone());
    {
        let proc = &s.proc;
        let jumps = jumps_for(proc, &before, &after);
        if let Err(e) = transition::begin(
            proc,
            &mut s.rec,
            &mut model,
            table,
            &*jumps,
            &*pending,
            started,
            &mut |_, _| Ok(()),
            live.as_ref(),
        ) {
            if reused_table {
                // Still the spare in the record stored before this command.
                s.rec.spare_table = fresh_table;
            } else if let Some(r) = fresh_table {
                if let Ok(mut h) = s.proc.hijack(HIJACK_TIMEOUT) {
                    let _ = h.munmap(r.addr, r.len);
                    let _ = h.release();
                }
            }
            return Err(e);
        }
    }
    let target = model
        .transition()
        .map(|t| format!("{:?}", t.target).to_lowercase())
        .unwrap_or_default();
    s.rec.model = model;
    s.save()?;
    let (restored, pending) = match settle(&mut s)? {
        Settled::Complete(c) => {
            callback_log.extend(c.callbacks);
            (c.restored, 0)
        }
        Settled::Pending(n) => (Vec::new(), n),
    };
    let kept: u64 = s.rec.retired.iter().map(|m| m.image.len).sum();
    Ok(DisableReport {
        pid,
        patch: name.to_string(),
        reversed,
        target,
        restored,
        freed_bytes: 0,
        deferred_bytes: kept,
        pending,
        callbacks: callback_log,
        held: Held::default(),
    })
}

/// The bookkeeping after an immediate (test-only) disable.
fn commit_immediate(
    mut s: Session,
    model: Model,
    sites: BTreeMap<u64, Site>,
    after: BTreeMap<u64, SiteMode>,
    completion: Completion,
    name: &str,
    reversed: bool,
) -> Result<DisableReport, Error> {
    let gone = commit_sites(&mut s, sites, &after, model);
    let callbacks = run_callbacks(&mut s, &completion);
    publish_states(&mut s);
    retire_removed(&mut s, &completion.removed);
    s.save()?;
    let (freed, kept) = collect_garbage(&mut s, GC_ATTEMPTS)?;
    s.save()?;
    Ok(DisableReport {
        pid: s.proc.pid(),
        patch: name.to_string(),
        reversed,
        target: "unpatched".into(),
        restored: gone.iter().map(|x| x.name.clone()).collect(),
        freed_bytes: freed,
        deferred_bytes: kept,
        pending: 0,
        callbacks,
        held: Held::default(),
    })
}

/// Switch every pending thread of the transition now, knowingly breaking
/// the consistency model (kernel: `klp_force_transition`).
pub fn force(pid: i32) -> Result<ForceReport, Error> {
    let mut s = Session::open(pid, Intent::TakeOver)?;
    let Some(t) = s.rec.model.transition().cloned() else {
        return Err(Error::Other(format!(
            "process {pid} has no transition in progress; nothing to force"
        )));
    };
    let switched = s.rec.model.force()?;
    let forced: Vec<String> = s
        .rec
        .model
        .patches()
        .iter()
        .map(|p| p.name.clone())
        .collect();
    s.save()?;
    if finish(&mut s, true)?.is_none() {
        return Err(Error::Other(
            "internal error: a forced completion was declined".into(),
        ));
    }
    Ok(ForceReport {
        pid,
        patch: t.patch,
        target: format!("{:?}", t.target).to_lowercase(),
        switched,
        forced,
    })
}

/// Wait (at most `timeout`) until the transition of `patch` is over or a
/// worker has taken it over: from then on its pending threads are watched.
/// False on timeout.
pub fn worker_ready(pid: i32, patch: &str, timeout: Duration) -> Result<bool, Error> {
    let proc = Process::open(pid)?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let rec = read_record(&proc)?;
        let over = rec.model.transition().is_none_or(|t| t.patch != patch);
        let watched = rec
            .transition
            .as_ref()
            .and_then(|t| t.worker.as_ref())
            .is_some_and(|w| worker::alive(w, pid));
        if over || watched {
            return Ok(true);
        }
        if std::time::Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// How waiting for a transition ended.
pub enum WaitEnd {
    /// The transition of `patch` is over; `present`: the patch is listed.
    Complete { present: bool },
    /// Still pending at the deadline; the report says who and where.
    TimedOut(Box<StatusReport>),
}

/// Wait for the transition of `patch` to finish, calling `progress` with
/// (switched, total) threads as it goes. A transition whose worker is gone
/// (killed, or a forked child's) gets a new one.
/// How long [`wait`] waits without a timeout for the worker that completed
/// a transition to finish its cleanup.
const CLEANUP_WAIT: Duration = Duration::from_secs(10);

pub fn wait(
    pid: i32,
    patch: &str,
    timeout: Option<Duration>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<WaitEnd, Error> {
    let proc = Process::open(pid)?;
    let deadline = timeout.map(|t| std::time::Instant::now() + t);
    let mut workerless = 0u32;
    loop {
        let rec = read_record(&proc)?;
        let in_transition = rec.model.transition().is_some_and(|t| t.patch == patch);
        if !in_transition {
            // The worker that completed it goes on with the callbacks and
            // frees the memory no thread needs any more, under the lock:
            // done when the lock is free (a command that returns now
            // finds the patch unloaded).
            let lock = lock::lock(
                &proc,
                deadline.map_or(CLEANUP_WAIT, |d| {
                    d.saturating_duration_since(std::time::Instant::now())
                }),
            );
            match lock {
                Ok(_) | Err(Error::Locked { .. }) => {}
                Err(e) => return Err(e),
            }
            let rec = read_record(&proc)?;
            return Ok(WaitEnd::Complete {
                present: rec.model.patch(patch).is_some(),
            });
        }
        if let Some(t) = &rec.transition {
            let pending = rec.model.pending().len();
            let total = t.tps.len().max(pending);
            progress(total - pending, total);
            let has_worker = t.worker.as_ref().is_some_and(|w| worker::alive(w, pid));
            if has_worker {
                workerless = 0;
            } else {
                workerless += 1;
                // The first polls may precede the new worker's start.
                if workerless >= 40 {
                    if let Some(l) = lock::try_lock(&proc)? {
                        drop(l);
                        worker::spawn(&proc)?;
                    }
                    workerless = 0;
                }
            }
        }
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            return Ok(WaitEnd::TimedOut(Box::new(status(pid)?)));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The model and sites of a process, as recorded in it.
pub fn status(pid: i32) -> Result<StatusReport, Error> {
    let proc = Process::open(pid)?;
    let rec = read_record(&proc)?;
    let mut report = StatusReport::from_record(pid, &rec);
    if let Some(t) = report.transition.as_mut() {
        // A child forked during a transition inherits the record of its
        // parent: threads of the parent are not ours, nor is the worker.
        let live: BTreeSet<i32> = proc.threads()?.into_iter().collect();
        t.pending.retain(|p| live.contains(&p.tid));
        t.thread_states.retain(|p| live.contains(&p.tid));
        let tracked: BTreeSet<i32> = t.thread_states.iter().map(|p| p.tid).collect();
        t.unexamined = live.difference(&tracked).copied().collect();
        t.threads = t.thread_states.len();
        t.switched = t.threads.saturating_sub(t.pending.len());
        let w = rec.transition.as_ref().and_then(|x| x.worker.as_ref());
        t.worker = w.filter(|w| worker::alive(w, pid)).map(|w| w.pid);
        let objects = Objects::discover(&proc, &proc.maps()?)?;
        let names = crate::frames::Namer::new(&objects, &rec);
        for p in &mut t.pending {
            p.name = proc.thread_name(p.tid).unwrap_or_default();
            for (i, f) in p.frames.iter_mut().enumerate() {
                let pc = u64::from_str_radix(f.address.trim_start_matches("0x"), 16).unwrap_or(0);
                *f = names.describe(pc, i > 0);
            }
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
