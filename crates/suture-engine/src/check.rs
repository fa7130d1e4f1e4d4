//! Whether one stopped thread may switch: its stack is unwound and every
//! frame is compared with the code the transition replaces (kernel:
//! `klp_check_stack`). Anything the unwinder is not sure about counts as
//! "not yet".

use crate::objects::Objects;
use crate::record::{Blocker, Record};
use crate::Error;
use suture_model::Code;
use suture_process::{read_stack, Process};
use suture_unwind::{Outcome, Regs, Special, Unwinder};
use suture_x86::dispatch::{dispatch_stub, DispatchParams, DispatchStub};

use crate::memory::{SLOT_DISPATCH, SLOT_STUB};

/// How much of a thread's stack is read at once; words beyond it are read
/// one by one.
const STACK_CHUNK: usize = 32 * 1024;

/// The verdict on one thread.
#[derive(Debug)]
pub enum Verdict {
    /// No frame lies in replaced code and the unwind was complete.
    Switch,
    /// The thread must stay pending.
    Wait(Blocker),
}

/// Code a transition replaces, by address range.
struct Replaced {
    /// (start, end, what) sorted by start.
    ranges: Vec<(u64, u64, String)>,
}

impl Replaced {
    fn find(&self, pc: u64) -> Option<&str> {
        self.ranges
            .iter()
            .find(|(s, e, _)| pc >= *s && pc < *e)
            .map(|(_, _, w)| w.as_str())
    }
}

/// Everything needed to check threads of one transition.
pub struct Checker {
    unwinder: Unwinder,
    replaced: Replaced,
    /// Dispatch stubs by address.
    stubs: Vec<DispatchStub>,
    /// Trampolines and absolute-jump stubs: [slot, slot + SLOT_DISPATCH).
    entries: Vec<(u64, u64)>,
    /// Lookup address of a return into a trampoline (after its relocated
    /// call) -> the equivalent lookup address in the original function.
    returns: Vec<(u64, u64)>,
}

impl Checker {
    /// Build the unwinder for the process's objects and loaded patches, and
    /// the list of code the record's transition replaces.
    pub fn new(proc: &Process, objects: &Objects, rec: &Record) -> Result<Checker, Error> {
        let mut unwinder = Unwinder::new();
        for o in &objects.list {
            let Ok(bytes) = o.bytes() else { continue };
            let Ok((_, bias)) = o.elf() else { continue };
            let _ = unwinder.add_object(&o.path, &bytes, bias, &o.exec_ranges);
        }
        if let Some(v) = objects.vdso(proc) {
            let _ = unwinder.add_object("[vdso]", &v.image, v.bias, &[v.range]);
        }
        for (name, m) in rec
            .patches
            .iter()
            .map(|(n, m)| (n.as_str(), m))
            .chain(
                rec.retired
                    .iter()
                    .chain(&rec.kept_forced)
                    .map(|m| ("retired patch", m)),
            )
            .chain(rec.runtime.iter().map(|r| ("suture runtime", &r.memory)))
        {
            if let Some((addr, len)) = m.eh_frame {
                if let Ok(eh) = proc.read_mem(addr, len as usize) {
                    let _ = unwinder.add_code(name, (m.text.addr, m.text.end()), eh, addr);
                }
            }
        }
        let mut ranges = Vec::new();
        for (old_addr, code) in rec.model.replaced_code() {
            let Some(site) = rec.sites.get(&old_addr) else {
                continue;
            };
            match code {
                Code::Original => {
                    let what = format!("the original {}", site.name);
                    ranges.push((
                        site.func_addr,
                        site.func_addr + site.func_size.max(1),
                        what.clone(),
                    ));
                    ranges.push((site.slot, site.slot + SLOT_STUB, what));
                }
                Code::New(a) => {
                    let end = rec
                        .patches
                        .values()
                        .flat_map(|m| m.funcs.iter())
                        .find(|(s, _)| *s == a)
                        .map(|(_, e)| *e)
                        .unwrap_or(a + 1);
                    let owner = rec
                        .model
                        .patches()
                        .iter()
                        .find(|p| p.funcs().any(|f| f.new_addr == a))
                        .map(|p| p.name.clone())
                        .unwrap_or_default();
                    ranges.push((a, end, format!("{} of patch {owner}", site.name)));
                }
            }
        }
        ranges.sort();
        let mut stubs = Vec::new();
        if let Some(t) = &rec.transition {
            for s in t.stubs.values() {
                stubs.push(regenerate_stub(t.table.addr, t.bits, s)?);
            }
        }
        let entries = rec
            .sites
            .values()
            .map(|s| (s.slot, s.slot + SLOT_DISPATCH))
            .collect();
        // A call that was the last overwritten instruction returns into the
        // trampoline: that is the same point as the end of the overwritten
        // bytes in the original function.
        let mut returns = Vec::new();
        for site in rec.sites.values() {
            if let Ok(code) = proc.read_mem(site.slot, SLOT_STUB as usize) {
                let orig_end = site.site_addr + site.original.len() as u64;
                for r in suture_x86::call_return_points(&code, site.slot) {
                    returns.push((r - 1, orig_end - 1));
                }
            }
        }
        Ok(Checker {
            unwinder,
            replaced: Replaced { ranges },
            stubs,
            entries,
            returns,
        })
    }

    /// Whether `pc` is just after a dispatch trap's `syscall` instruction.
    pub fn is_trap(&self, pc: u64) -> bool {
        self.stubs.iter().any(|s| s.trap_end == pc)
    }

    /// How the unwinder should treat suture's own code at `pc` (a frame's
    /// lookup address).
    fn special(&self, pc: u64) -> Special {
        if let Some(s) = self.stubs.iter().find(|s| s.contains(pc)) {
            // At the trap the stub looks the thread up again before it
            // jumps anywhere; anywhere else it may have decided already.
            return match (pc == s.trap_end, s.pushed_words(pc)) {
                (true, Some(n)) => Special::Pushed(n),
                _ => Special::Unreliable("inside suture's dispatch code"),
            };
        }
        if let Some((_, orig)) = self.returns.iter().find(|(r, _)| *r == pc) {
            return Special::As(*orig);
        }
        if self.entries.iter().any(|(a, b)| pc >= *a && pc < *b) {
            return Special::Unreliable("inside the relocated entry of a patched function");
        }
        Special::None
    }

    /// Unwind one stopped thread of `proc` from `regs`, with `special`
    /// describing code the unwinder has no CFI for.
    pub fn unwind(
        &self,
        proc: &Process,
        regs: &Regs,
        special: &dyn Fn(u64) -> Special,
    ) -> suture_unwind::Unwind {
        // One read of the top of the stack serves nearly every unwind; near
        // the end of the stack mapping, read only what it holds.
        let chunk = proc
            .read_mem(regs.sp, STACK_CHUNK)
            .map(|b| (regs.sp, b))
            .or_else(|_| read_stack(proc, regs.sp, STACK_CHUNK))
            .ok();
        let mut read = |addr: u64| -> Option<u64> {
            if let Some((start, bytes)) = &chunk {
                if addr >= *start && addr + 8 <= start + bytes.len() as u64 {
                    let o = (addr - start) as usize;
                    return Some(u64::from_le_bytes(bytes[o..o + 8].try_into().ok()?));
                }
            }
            let b = proc.read_mem(addr, 8).ok()?;
            Some(u64::from_le_bytes(b.try_into().ok()?))
        };
        self.unwinder.unwind(*regs, &mut read, special)
    }

    /// Check one stopped thread with registers `regs`.
    pub fn check(&self, proc: &Process, regs: &libc::user_regs_struct) -> Verdict {
        let unwind = self.unwind(
            proc,
            &Regs {
                pc: regs.rip,
                sp: regs.rsp,
                bp: regs.rbp,
            },
            &|pc| self.special(pc),
        );
        let frames: Vec<u64> = unwind.frames.iter().map(|f| f.pc).collect();
        for f in &unwind.frames {
            // A return into a trampoline is in the original function.
            let lookup = self
                .returns
                .iter()
                .find(|(r, _)| *r == f.lookup)
                .map_or(f.lookup, |(_, o)| *o);
            if let Some(what) = self.replaced.find(lookup).or(self.replaced.find(f.lookup)) {
                return Verdict::Wait(Blocker {
                    reason: format!("in {what}"),
                    frames,
                });
            }
        }
        match unwind.outcome {
            Outcome::Complete => Verdict::Switch,
            Outcome::Unreliable(why) => Verdict::Wait(Blocker {
                reason: format!("its stack cannot be read reliably: {why}"),
                frames,
            }),
        }
    }
}

/// The stub a [`crate::record::StubRecord`] describes, byte for byte.
pub fn regenerate_stub(
    table: u64,
    bits: u32,
    s: &crate::record::StubRecord,
) -> Result<DispatchStub, Error> {
    dispatch_stub(&DispatchParams {
        at: s.addr,
        table,
        bits,
        target: s.target,
        initial: s.initial,
    })
    .map_err(|e| Error::Other(format!("cannot build a dispatch stub: {e}")))
}
