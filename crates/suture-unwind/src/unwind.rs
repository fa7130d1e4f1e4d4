//! Walking one stopped thread's stack, frame by frame: framehop recovers
//! each caller, our own reading of the same CFI row must agree, and every
//! frame must be covered by CFI (or described by the caller) for the walk
//! to count as complete.

use std::sync::Arc;

use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64};
use framehop::{FrameAddress, Unwinder as _};

use crate::cfi::{BpRule, CfaBase, Context, Row};
use crate::module::{self, FramehopModule, Module};
use crate::Error;

/// The most frames an unwind walks before giving up.
pub const MAX_FRAMES: usize = 1024;

/// The registers unwinding starts from (a stopped thread's `rip`, `rsp`, `rbp`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Regs {
    pub pc: u64,
    pub sp: u64,
    pub bp: u64,
}

/// How the caller classifies a frame of code it generated itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Special {
    /// Ordinary code: use CFI.
    None,
    /// A stub that pushed `n` words and set up no frame: the return address
    /// is at sp + 8n, the caller's sp is sp + 8n + 8, rbp is unchanged.
    Pushed(usize),
    /// Unwind this frame as if its lookup address were this one (e.g. a
    /// relocated copy of a function's first instructions: map an address
    /// inside a copied instruction to the same instruction of the original).
    As(u64),
    /// This code can never be unwound reliably; the text says why.
    Unreliable(&'static str),
}

/// One frame found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    /// As found: frame 0 the thread's pc, later frames return addresses.
    pub pc: u64,
    /// The address that names the frame's current instruction: `pc` for
    /// frame 0, `pc - 1` (inside the call instruction) for return addresses.
    /// Use it, not `pc`, to ask which function a frame is in.
    pub lookup: u64,
    /// The stack pointer in this frame.
    pub sp: u64,
}

/// Whether an unwind reached the thread's outermost frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every frame was found, down to the outermost one.
    Complete,
    /// The walk stopped before certainly reaching the outermost frame;
    /// the sentence says why, with the address.
    Unreliable(String),
}

/// The result of unwinding one thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unwind {
    /// The frames found, innermost first; when unreliable, the frames up to
    /// and including the one that could not be unwound.
    pub frames: Vec<Frame>,
    pub outcome: Outcome,
}

impl Unwind {
    pub fn is_complete(&self) -> bool {
        self.outcome == Outcome::Complete
    }
}

/// The code of one target process, for unwinding its threads.
pub struct Unwinder {
    /// Sorted by start address, disjoint.
    modules: Vec<Module>,
    framehop: UnwinderX86_64<Arc<[u8]>>,
}

impl Default for Unwinder {
    fn default() -> Self {
        Self::new()
    }
}

/// The state of the walk at one frame.
#[derive(Clone, Copy)]
struct State {
    pc: u64,
    sp: u64,
    /// `None` once rbp cannot be recovered.
    bp: Option<u64>,
    is_return: bool,
}

enum Next {
    Outermost,
    Caller(State),
}

/// `base + offset`, `None` on overflow.
fn add(base: u64, offset: i64) -> Option<u64> {
    base.checked_add_signed(offset)
}

impl Unwinder {
    pub fn new() -> Self {
        Unwinder {
            modules: Vec::new(),
            framehop: UnwinderX86_64::new(),
        }
    }

    /// Adds an ELF object mapped in the target: its file bytes, its load
    /// bias (run-time minus link-time address) and the run-time ranges its
    /// executable segments occupy. Reads `.eh_frame` (and `.eh_frame_hdr`).
    pub fn add_object(
        &mut self,
        name: &str,
        elf_bytes: &[u8],
        bias: u64,
        exec_ranges: &[(u64, u64)],
    ) -> Result<(), Error> {
        let (m, fh) = module::from_elf(name, elf_bytes, bias, exec_ranges)?;
        self.insert(m, fh)
    }

    /// Adds generated code at `code` (start, end) with its own `.eh_frame`:
    /// the bytes as they lie in target memory at `eh_frame_addr` (already
    /// relocated, the 4-byte zero terminator included).
    pub fn add_code(
        &mut self,
        name: &str,
        code: (u64, u64),
        eh_frame: Vec<u8>,
        eh_frame_addr: u64,
    ) -> Result<(), Error> {
        let (m, fh) = module::from_code(name, code, eh_frame, eh_frame_addr)?;
        self.insert(m, fh)
    }

    fn insert(&mut self, m: Module, fh: FramehopModule) -> Result<(), Error> {
        let span = m.span();
        if let Some(other) = self
            .modules
            .iter()
            .find(|o| o.span().start < span.end && span.start < o.span().end)
        {
            return Err(Error {
                name: m.name,
                what: format!(
                    "its code {:#x}..{:#x} overlaps {}",
                    span.start, span.end, other.name
                ),
            });
        }
        let at = self
            .modules
            .partition_point(|o| o.span().start < span.start);
        self.modules.insert(at, m);
        self.framehop.add_module(fh);
        Ok(())
    }

    fn module_at(&self, addr: u64) -> Option<&Module> {
        let i = self.modules.partition_point(|m| m.span().start <= addr);
        let m = self.modules.get(i.checked_sub(1)?)?;
        m.contains(addr).then_some(m)
    }

    /// `0x...` followed by the module and the address its CFI states.
    fn describe(&self, addr: u64) -> String {
        match self.module_at(addr) {
            Some(m) => format!("{addr:#x} ({}+{:#x})", m.name, addr.wrapping_sub(m.bias)),
            None => format!("{addr:#x}"),
        }
    }

    /// Unwinds one stopped thread. `read` reads one u64 of target memory
    /// (`None`: unreadable). `special` is asked about every frame's lookup
    /// address (see [`Frame::lookup`]) before its CFI is used.
    pub fn unwind(
        &self,
        regs: Regs,
        read: &mut dyn FnMut(u64) -> Option<u64>,
        special: &dyn Fn(u64) -> Special,
    ) -> Unwind {
        let mut frames = Vec::new();
        let mut cache = CacheX86_64::new();
        let mut ctx = Context::new();
        let mut cur = State {
            pc: regs.pc,
            sp: regs.sp,
            bp: Some(regs.bp),
            is_return: false,
        };
        loop {
            if frames.len() == MAX_FRAMES {
                let why = format!(
                    "the stack has more than {MAX_FRAMES} frames (the last one found at {:#x})",
                    cur.pc
                );
                return Unwind {
                    frames,
                    outcome: Outcome::Unreliable(why),
                };
            }
            let lookup = if cur.is_return {
                cur.pc.wrapping_sub(1)
            } else {
                cur.pc
            };
            frames.push(Frame {
                pc: cur.pc,
                lookup,
                sp: cur.sp,
            });
            let i = frames.len() - 1;
            let step = match special(lookup) {
                Special::None => self.cfi_step(i, lookup, &cur, read, &mut cache, &mut ctx),
                Special::As(addr) => self
                    .cfi_step(i, addr, &cur, read, &mut cache, &mut ctx)
                    .map_err(|why| format!("{why} (unwinding {lookup:#x} as {addr:#x})")),
                Special::Pushed(n) => pushed_step(i, n, &cur, read),
                Special::Unreliable(why) => Err(format!("frame {i} at {lookup:#x}: {why}")),
            };
            let outcome = match step {
                Ok(Next::Caller(next)) if next.sp > cur.sp => {
                    cur = next;
                    continue;
                }
                Ok(Next::Caller(next)) => {
                    Outcome::Unreliable(self.not_increasing(i, lookup, cur.sp, next.sp))
                }
                Ok(Next::Outermost) => Outcome::Complete,
                Err(why) => Outcome::Unreliable(why),
            };
            return Unwind { frames, outcome };
        }
    }

    fn not_increasing(&self, i: usize, addr: u64, sp: u64, caller_sp: u64) -> String {
        format!(
            "the stack pointer does not increase from frame {i} at {} (sp {sp:#x}) to its caller (sp {caller_sp:#x})",
            self.describe(addr)
        )
    }

    /// Recovers the caller of frame `i` from the CFI at `addr`, checking that
    /// framehop finds the same caller.
    fn cfi_step(
        &self,
        i: usize,
        addr: u64,
        cur: &State,
        read: &mut dyn FnMut(u64) -> Option<u64>,
        cache: &mut CacheX86_64,
        ctx: &mut Context,
    ) -> Result<Next, String> {
        let at = || self.describe(addr);
        let Some(m) = self.module_at(addr) else {
            return Err(format!(
                "frame {i} at {addr:#x} lies in no known module (anonymous executable memory, such as JIT code)"
            ));
        };
        let stated = addr.wrapping_sub(m.bias);
        let fde = m
            .cfi
            .fde_at(stated)
            .ok_or_else(|| format!("frame {i} at {} has no CFI", at()))?;
        if fde.signal {
            return Err(format!(
                "frame {i} at {} is a signal frame (a signal return trampoline): the interrupted code beneath it cannot be unwound reliably",
                at()
            ));
        }
        let row = m
            .cfi
            .row_at(&fde, stated, ctx)
            .map_err(|why| format!("frame {i} at {}: {why}", at()))?;
        let Row::Step {
            base,
            offset,
            ra: ra_offset,
            bp: bp_rule,
        } = row
        else {
            return Ok(Next::Outermost);
        };
        let overflow = || format!("frame {i} at {}: its CFA overflows", at());
        let base = match base {
            CfaBase::Sp => cur.sp,
            CfaBase::Bp => cur.bp.ok_or_else(|| {
                format!(
                    "frame {i} at {}: its CFA is computed from rbp, which could not be recovered",
                    at()
                )
            })?,
        };
        let cfa = add(base, offset).ok_or_else(overflow)?;
        if cfa <= cur.sp {
            return Err(self.not_increasing(i, addr, cur.sp, cfa));
        }
        let ra_at = add(cfa, ra_offset).ok_or_else(overflow)?;
        let ra = read(ra_at).ok_or_else(|| {
            format!(
                "frame {i} at {}: the stack is unreadable at {ra_at:#x}",
                at()
            )
        })?;
        let bp = match bp_rule {
            BpRule::Same => cur.bp,
            BpRule::At(n) => add(cfa, n).and_then(&mut *read),
            BpRule::ValOffset(n) => add(cfa, n),
            BpRule::Unknown => None,
        };
        self.check_framehop(i, addr, cur, (ra, cfa, bp), read, cache)?;
        if ra == 0 {
            // A zero return address, read where the CFI says it is: nothing
            // to return to (the ABI's other outermost-frame marker).
            return Ok(Next::Outermost);
        }
        Ok(Next::Caller(State {
            pc: ra,
            sp: cfa,
            bp,
            is_return: true,
        }))
    }

    /// framehop must recover the same return address and sp (and rbp, when
    /// known) as our reading of the CFI: it silently falls back to frame
    /// pointers where its own CFI evaluation fails.
    fn check_framehop(
        &self,
        i: usize,
        addr: u64,
        cur: &State,
        (ra, cfa, bp): (u64, u64, Option<u64>),
        read: &mut dyn FnMut(u64) -> Option<u64>,
        cache: &mut CacheX86_64,
    ) -> Result<(), String> {
        let address = if cur.is_return {
            // addr + 1 > 0: never null.
            FrameAddress::from_return_address(addr.wrapping_add(1))
        } else {
            Some(FrameAddress::from_instruction_pointer(addr))
        };
        let Some(address) = address else {
            return Err(format!("frame {i} at {addr:#x} has no return address"));
        };
        let mut regs = UnwindRegsX86_64::new(addr, cur.sp, cur.bp.unwrap_or(0));
        let mut read_stack = |a: u64| read(a).ok_or(());
        let got = self
            .framehop
            .unwind_frame(address, &mut regs, cache, &mut read_stack);
        let agrees = match got {
            Ok(Some(r)) => r == ra && regs.sp() == cfa && bp.is_none_or(|bp| regs.bp() == bp),
            Ok(None) => ra == 0,
            Err(e) => {
                return Err(format!(
                    "frame {i} at {}: framehop cannot unwind it ({e})",
                    self.describe(addr)
                ))
            }
        };
        if agrees {
            Ok(())
        } else {
            Err(format!(
                "frame {i} at {}: framehop and the CFI disagree on its caller (return address {ra:#x}, sp {cfa:#x} by the CFI; {:#x}, {:#x} by framehop)",
                self.describe(addr),
                got.ok().flatten().unwrap_or(0),
                regs.sp()
            ))
        }
    }
}

/// The caller of a stub that pushed `n` words (see [`Special::Pushed`]).
fn pushed_step(
    i: usize,
    n: usize,
    cur: &State,
    read: &mut dyn FnMut(u64) -> Option<u64>,
) -> Result<Next, String> {
    let at = (n as u64)
        .checked_mul(8)
        .and_then(|o| cur.sp.checked_add(o))
        .filter(|a| a.checked_add(8).is_some())
        .ok_or_else(|| format!("frame {i} at {:#x}: its stub's frame overflows", cur.pc))?;
    let ra = read(at).ok_or_else(|| {
        format!(
            "frame {i} at {:#x}: the stack is unreadable at {at:#x}",
            cur.pc
        )
    })?;
    if ra == 0 {
        return Err(format!(
            "frame {i} at {:#x}: its stub's return address is zero",
            cur.pc
        ));
    }
    Ok(Next::Caller(State {
        pc: ra,
        sp: at + 8,
        bp: cur.bp,
        is_return: true,
    }))
}
