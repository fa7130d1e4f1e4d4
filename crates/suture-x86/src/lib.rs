//! Patch-site planner for x86-64 live patching.
//!
//! Live patching redirects a function by overwriting its first instructions
//! with a 5-byte `jmp rel32` to the replacement. Before that is safe we must
//! know that:
//!
//! * the overwritten bytes are whole instructions inside the function,
//! * nothing in the function branches (directly or through a jump table we
//!   can recognise) into the middle of the overwritten bytes, because those
//!   bytes no longer hold the original instructions afterwards,
//! * no `call` is followed by further overwritten instructions (a thread
//!   sitting in the callee would return into the middle of the jump),
//! * the overwritten instructions can be copied elsewhere
//!   ([`SitePlan::relocated_original`]) so that the original behaviour stays
//!   callable (a "trampoline").
//!
//! [`plan_site`] checks all of this on the function's bytes and returns a
//! [`SitePlan`]. The crate does no I/O: target memory (only needed for jump
//! tables) is read through the [`Memory`] trait.
//!
//! What this crate cannot see, and the caller has to handle: threads whose
//! program counter is currently inside the overwritten bytes (see
//! [`SitePlan::pc_inside_site`]), branches from *other* functions (for
//! example GCC's `foo.cold` parts) into the overwritten bytes, and unwinding
//! through the relocated copy (it has no CFI).

use std::fmt::Write as _;

use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, Decoder, DecoderError, DecoderOptions, FlowControl,
    Instruction, InstructionBlock, Mnemonic,
};

pub mod dispatch;
#[doc(hidden)]
pub mod fuzzing;
mod tables;
pub mod trap;

pub use dispatch::{
    dispatch_stub, table_contains, table_find, table_index, table_insert, table_remove,
    DispatchError, DispatchParams, DispatchStub, DISPATCH_MAX_LEN, TOMBSTONE_BIT,
};

/// Length of a `jmp rel32` instruction.
pub const JMP_REL32_LEN: usize = 5;
/// Length of the absolute jump produced by [`jmp_abs`].
pub const JMP_ABS_LEN: usize = 14;
/// The `endbr64` instruction (Intel CET landing pad). It is left in place.
pub const ENDBR64: [u8; 4] = [0xF3, 0x0F, 0x1E, 0xFA];
/// At most this many entries are read from one jump table.
pub const MAX_JUMP_TABLE_ENTRIES: usize = 4096;

/// Reads target memory (used to read jump tables). Returns `None` if unreadable.
pub trait Memory {
    fn read(&self, addr: u64, len: usize) -> Option<Vec<u8>>;
}

/// A [`Memory`] with nothing readable: jump tables are then not followed.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoMemory;

impl Memory for NoMemory {
    fn read(&self, _addr: u64, _len: usize) -> Option<Vec<u8>> {
        None
    }
}

/// Why a function cannot be patched (or a relocation/jump cannot be built).
///
/// Offsets (`+0x..`) are relative to the function's start address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// Not enough whole instructions inside the function to hold a `jmp rel32`.
    #[error(
        "function is {size} bytes long; a patch site needs {JMP_REL32_LEN} bytes{}{}",
        if *.endbr { " after the 4-byte endbr64" } else { "" },
        match .spill_at {
            Some(off) => format!(
                ", but the instruction at +{off:#x} that would complete them runs past the end of the function"
            ),
            None => String::new(),
        }
    )]
    TooSmall {
        size: usize,
        endbr: bool,
        /// Offset of the instruction that would run past the end, if that was the problem.
        spill_at: Option<usize>,
    },

    /// Bytes that do not decode as an x86-64 instruction.
    #[error(
        "cannot decode the bytes at +{offset:#x} ({bytes}) as an x86-64 instruction{}",
        if *.overwritten {
            ", and they would be overwritten by the jump"
        } else {
            ", so jumps into the patch site cannot be ruled out"
        }
    )]
    Undecodable {
        offset: usize,
        /// Hex dump of up to 15 bytes starting at `offset`.
        bytes: String,
        overwritten: bool,
    },

    /// The last instruction of the function does not fit inside the symbol size.
    #[error(
        "the instruction at +{offset:#x} runs past the end of the function ({size} bytes), so the symbol size looks wrong and jumps into the patch site cannot be ruled out"
    )]
    Truncated { offset: usize, size: usize },

    /// A direct branch (jmp, jcc, loop, jrcxz, call, xbegin) targets the middle of the site.
    #[error(
        "the instruction at +{from:#x} ({mnemonic}) jumps to +{target:#x}, inside the {len} bytes the jump would overwrite (+{site:#x}..+{end:#x})",
        end = .site + .len
    )]
    BranchIntoSite {
        from: usize,
        mnemonic: String,
        target: usize,
        site: usize,
        len: usize,
    },

    /// A recognised jump table has an entry pointing into the middle of the site.
    #[error(
        "entry {index} of the jump table at {table:#x} (used by the jmp at +{jmp:#x}) points to +{target:#x}, inside the {len} bytes the jump would overwrite (+{site:#x}..+{end:#x})",
        end = .site + .len
    )]
    JumpTableIntoSite {
        jmp: usize,
        table: u64,
        index: usize,
        target: usize,
        site: usize,
        len: usize,
    },

    /// An instruction takes the address of (or accesses) a byte inside the site,
    /// e.g. a computed-goto label.
    #[error(
        "the instruction at +{from:#x} ({mnemonic}) refers to the address +{target:#x}, inside the {len} bytes the jump would overwrite (+{site:#x}..+{end:#x})",
        end = .site + .len
    )]
    AddressIntoSite {
        from: usize,
        mnemonic: String,
        target: usize,
        site: usize,
        len: usize,
    },

    /// A `call` is not the last overwritten instruction.
    #[error(
        "the {mnemonic} at +{offset:#x} would be overwritten but is not the last overwritten instruction (the site ends at +{end:#x}); a thread inside the callee would return into the middle of the jump"
    )]
    CallNotLast {
        offset: usize,
        mnemonic: String,
        end: usize,
    },

    /// An unconditional jump/ret/ud2 is followed by more overwritten instructions.
    #[error(
        "the {mnemonic} at +{offset:#x} ends the straight-line code before the {JMP_REL32_LEN} bytes the jump needs are covered; the overwritten bytes after it (up to +{end:#x}) are reachable only through jumps the planner cannot see"
    )]
    FlowEndsEarly {
        offset: usize,
        mnemonic: String,
        end: usize,
    },

    /// The site contains an `int3`, most likely a debugger's breakpoint.
    #[error(
        "the byte at +{offset:#x} is an int3 (0xCC), probably a debugger breakpoint; refusing to overwrite it (remove the breakpoint first)"
    )]
    Int3InSite { offset: usize },

    /// A RIP-relative operand would be out of reach from the relocation address.
    #[error(
        "the instruction at +{offset:#x} ({mnemonic}) addresses {target:#x} relative to RIP, which is more than ±2 GiB away from the relocation address {at:#x}"
    )]
    RipRelativeOutOfRange {
        offset: usize,
        mnemonic: String,
        target: u64,
        at: u64,
    },

    /// The instruction block could not be re-encoded at the new address.
    #[error(
        "cannot relocate the overwritten instructions (+{site:#x}..+{end:#x}) to {at:#x}: {reason}",
        end = .site + .len
    )]
    Relocation {
        site: usize,
        len: usize,
        at: u64,
        reason: String,
    },

    /// A `jmp rel32` cannot reach its target.
    #[error("a jmp rel32 at {from:#x} cannot reach {to:#x}: the target is more than ±2 GiB away")]
    JumpOutOfRange { from: u64, to: u64 },
}

/// The result of [`plan_site`]: where the jump goes and what it replaces.
#[derive(Debug, Clone)]
pub struct SitePlan {
    pub func_addr: u64,
    /// Where the jump is written: func_addr, or func_addr+4 when the function starts with endbr64 (F3 0F 1E FA), which stays in place.
    pub site_addr: u64,
    /// Bytes overwritten at site_addr: whole instructions, >= 5.
    pub len: usize,
    /// The original bytes at site_addr..site_addr+len.
    pub original: Vec<u8>,
    /// The overwritten instructions, decoded at their original addresses.
    instrs: Vec<Instruction>,
    /// Symbol size of the function.
    func_size: usize,
}

/// Hex dump like `f3 0f 1e fa`.
fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 3);
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 {
            s.push(' ');
        }
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Lower-case mnemonic for messages, e.g. `jne`.
fn mnemonic_name(ins: &Instruction) -> String {
    format!("{:?}", ins.mnemonic()).to_lowercase()
}

/// Instructions after which execution never falls through to the next one.
fn ends_flow(ins: &Instruction) -> bool {
    matches!(
        ins.flow_control(),
        FlowControl::UnconditionalBranch
            | FlowControl::IndirectBranch
            | FlowControl::Return
            | FlowControl::Exception
    ) || ins.mnemonic() == Mnemonic::Hlt
}

/// Result of a linear sweep over the whole function.
struct Sweep {
    instrs: Vec<Instruction>,
    /// First offset that did not decode, and whether it was because the bytes ran out.
    stop: Option<(usize, bool)>,
}

fn sweep(func_addr: u64, code: &[u8]) -> Sweep {
    let mut decoder = Decoder::with_ip(64, code, func_addr, DecoderOptions::NONE);
    let mut instrs = Vec::new();
    let mut ins = Instruction::default();
    while decoder.can_decode() {
        let pos = decoder.position();
        decoder.decode_out(&mut ins);
        if ins.is_invalid() {
            // The decoder also reports "no more bytes" for some invalid
            // opcodes at the very end; retry with padding to tell them apart.
            let truncated = decoder.last_error() == DecoderError::NoMoreBytes && {
                let mut padded = code[pos..].to_vec();
                padded.resize(padded.len() + 15, 0);
                let ip = func_addr.wrapping_add(pos as u64);
                !Decoder::with_ip(64, &padded, ip, DecoderOptions::NONE)
                    .decode()
                    .is_invalid()
            };
            return Sweep {
                instrs,
                stop: Some((pos, truncated)),
            };
        }
        instrs.push(ins);
    }
    Sweep { instrs, stop: None }
}

/// Decides where and how a function can be patched.
///
/// `code` = the function's bytes as currently in memory, starting at func_addr, `code.len()` = the symbol size (the whole function).
///
/// The whole function is decoded linearly (compilers do not put data in
/// x86-64 `.text`); anything that does not decode is refused because it would
/// hide branches. `mem` is only used to read jump tables.
pub fn plan_site(func_addr: u64, code: &[u8], mem: &dyn Memory) -> Result<SitePlan, PlanError> {
    let size = code.len();
    let endbr = code.starts_with(&ENDBR64);
    let site_off = if endbr { ENDBR64.len() } else { 0 };
    if size < site_off + JMP_REL32_LEN {
        return Err(PlanError::TooSmall {
            size,
            endbr,
            spill_at: None,
        });
    }
    let site_addr = func_addr.wrapping_add(site_off as u64);
    let undecodable = |offset: usize, overwritten: bool| PlanError::Undecodable {
        offset,
        bytes: hex(&code[offset..size.min(offset + 15)]),
        overwritten,
    };

    let Sweep { instrs, stop } = sweep(func_addr, code);
    let offset_of = |ins: &Instruction| ins.ip().wrapping_sub(func_addr) as usize;

    // Pick whole instructions from the site until 5 bytes are covered.
    let first = instrs.iter().position(|i| offset_of(i) >= site_off);
    let mut covered: Vec<Instruction> = Vec::new();
    let mut end = site_off;
    let mut next = first.unwrap_or(instrs.len());
    while end < site_off + JMP_REL32_LEN {
        match instrs.get(next) {
            Some(ins) => {
                covered.push(*ins);
                end += ins.len();
                next += 1;
            }
            None => {
                return Err(match stop {
                    Some((off, true)) => PlanError::TooSmall {
                        size,
                        endbr,
                        spill_at: Some(off),
                    },
                    Some((off, false)) => undecodable(off, true),
                    // Cannot happen (the sweep covers all of `code`), but never panic.
                    None => PlanError::TooSmall {
                        size,
                        endbr,
                        spill_at: None,
                    },
                });
            }
        }
    }
    let len = end - site_off;

    // Checks on the overwritten instructions themselves.
    let last = covered.len() - 1;
    for (k, ins) in covered.iter().enumerate() {
        let offset = offset_of(ins);
        if ins.code() == Code::Int3 {
            return Err(PlanError::Int3InSite { offset });
        }
        if k == last {
            break;
        }
        if ins.mnemonic() == Mnemonic::Call {
            return Err(PlanError::CallNotLast {
                offset,
                mnemonic: mnemonic_name(ins),
                end,
            });
        }
        // Code after an unconditional jump is only reachable by branches. Those
        // inside the function are checked below, but others (e.g. `.cold`
        // parts) are invisible, so only alignment padding may follow.
        if ends_flow(ins)
            && !covered[k + 1..]
                .iter()
                .all(|i| i.mnemonic() == Mnemonic::Nop)
        {
            return Err(PlanError::FlowEndsEarly {
                offset,
                mnemonic: mnemonic_name(ins),
                end,
            });
        }
    }

    // Scan the whole function for references into the middle of the site.
    let strictly_inside = |t: u64| {
        let d = t.wrapping_sub(site_addr);
        d > 0 && d < len as u64
    };
    let off_of_addr = |t: u64| t.wrapping_sub(func_addr) as usize;
    for ins in &instrs {
        if let Some(target) = branch_target(ins) {
            if strictly_inside(target) {
                return Err(PlanError::BranchIntoSite {
                    from: offset_of(ins),
                    mnemonic: mnemonic_name(ins),
                    target: off_of_addr(target),
                    site: site_off,
                    len,
                });
            }
            continue;
        }
        if let Some(target) = referenced_address(ins, site_addr, len) {
            return Err(PlanError::AddressIntoSite {
                from: offset_of(ins),
                mnemonic: mnemonic_name(ins),
                target: off_of_addr(target),
                site: site_off,
                len,
            });
        }
    }

    // Jump tables.
    let in_function = |t: u64| t.wrapping_sub(func_addr) < size as u64;
    for table in tables::find_jump_tables(&instrs) {
        let hit = tables::read_entries(&table, mem, MAX_JUMP_TABLE_ENTRIES, |index, target| {
            if !in_function(target) {
                return tables::Visit::Stop;
            }
            if strictly_inside(target) {
                return tables::Visit::Found(index, target);
            }
            tables::Visit::Continue
        });
        if let Some((index, target)) = hit {
            return Err(PlanError::JumpTableIntoSite {
                jmp: off_of_addr(table.jmp_ip),
                table: table.table,
                index,
                target: off_of_addr(target),
                site: site_off,
                len,
            });
        }
    }

    // A part of the function we could not decode may hide branches.
    match stop {
        Some((offset, true)) => return Err(PlanError::Truncated { offset, size }),
        Some((offset, false)) => return Err(undecodable(offset, false)),
        None => {}
    }

    Ok(SitePlan {
        func_addr,
        site_addr,
        len,
        original: code[site_off..end].to_vec(),
        instrs: covered,
        func_size: size,
    })
}

/// Whether `copy` (decoded elsewhere) is the same instruction as `orig`: same
/// operation, operands and prefixes, and the same absolute address for an
/// IP-relative operand (an EIP-relative one may have become RIP-relative);
/// the encoding may differ (length, displacement size).
fn same_instruction(orig: &Instruction, copy: &Instruction) -> bool {
    let norm = |i: &Instruction| {
        let mut n = *i;
        n.set_ip(0);
        n.set_len(0);
        n.set_memory_displ_size(0);
        if i.is_ip_rel_memory_operand() {
            n.set_memory_base(iced_x86::Register::RIP);
            n.set_memory_displacement64(0);
        }
        n
    };
    norm(orig) == norm(copy)
        && orig.is_ip_rel_memory_operand() == copy.is_ip_rel_memory_operand()
        && (!orig.is_ip_rel_memory_operand()
            || orig.ip_rel_memory_address() == copy.ip_rel_memory_address())
}

/// Target of a direct near branch (jmp/jcc/loop/jrcxz/call/xbegin), if any.
fn branch_target(ins: &Instruction) -> Option<u64> {
    use iced_x86::OpKind;
    (0..ins.op_count()).find_map(|i| match ins.op_kind(i) {
        OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
            Some(ins.near_branch_target())
        }
        _ => None,
    })
}

/// An address inside the site that `ins` takes (`lea`, immediate) or
/// accesses (memory operand), if any. Taking the site's start address is
/// fine (it is the function's address); any access to its bytes is not.
fn referenced_address(ins: &Instruction, site_addr: u64, len: usize) -> Option<u64> {
    use iced_x86::OpKind;
    let lea = ins.mnemonic() == Mnemonic::Lea;
    let hits = |t: u64, allow_start: bool| {
        let d = t.wrapping_sub(site_addr);
        d < len as u64 && (d > 0 || !allow_start)
    };
    for i in 0..ins.op_count() {
        match ins.op_kind(i) {
            OpKind::Memory => {
                let absolute = ins.is_ip_rel_memory_operand()
                    || (ins.memory_base() == iced_x86::Register::None
                        && ins.memory_index() == iced_x86::Register::None);
                if !absolute {
                    continue;
                }
                let t = if ins.is_ip_rel_memory_operand() {
                    ins.ip_rel_memory_address()
                } else {
                    ins.memory_displacement64()
                };
                if hits(t, lea || ins.mnemonic() == Mnemonic::Nop) {
                    return Some(t);
                }
            }
            OpKind::Immediate32to64 | OpKind::Immediate64 | OpKind::Immediate32 => {
                let t = ins.immediate(i);
                if hits(t, true) {
                    return Some(t);
                }
            }
            _ => {}
        }
    }
    None
}

impl SitePlan {
    /// Offset of the site inside the function (0, or 4 after endbr64).
    pub fn site_offset(&self) -> usize {
        (self.site_addr.wrapping_sub(self.func_addr)) as usize
    }

    /// Whether the function starts with endbr64 (kept in place).
    pub fn has_endbr(&self) -> bool {
        self.site_offset() == ENDBR64.len()
    }

    /// Symbol size of the planned function.
    pub fn func_size(&self) -> usize {
        self.func_size
    }

    /// First address after the overwritten bytes; the relocated copy jumps back here.
    pub fn resume_addr(&self) -> u64 {
        self.site_addr.wrapping_add(self.len as u64)
    }

    /// Whether a thread stopped at `pc` would resume in the middle of the
    /// overwritten bytes (strictly after `site_addr`, before the end). Such a
    /// thread must be moved or waited for before the jump is written.
    pub fn pc_inside_site(&self, pc: u64) -> bool {
        let d = pc.wrapping_sub(self.site_addr);
        d > 0 && d < self.len as u64
    }

    /// The decoded overwritten instructions (at their original addresses).
    pub fn instructions(&self) -> &[Instruction] {
        &self.instrs
    }

    /// Machine code placed at address `at` that behaves like the overwritten instructions and then continues at site_addr+len (ends with a jmp back). RIP-relative operands and relative branches fixed up (iced BlockEncoder). Error if something can't be reached from `at` (±2 GiB).
    ///
    /// Branches and the jump back that are out of rel32 range are turned into
    /// absolute jumps through an 8-byte pointer stored after the code; only
    /// RIP-relative memory operands must be in range. A branch to the site's
    /// own first instruction stays inside the copy; a RIP-relative operand
    /// keeps its absolute address, even the site's (taking the function's
    /// address). Every copied instruction is decoded again and compared
    /// with the original; one the encoder does not reproduce faithfully is
    /// a [`PlanError::Relocation`].
    pub fn relocated_original(&self, at: u64) -> Result<Vec<u8>, PlanError> {
        self.relocated_original_map(at).map(|(code, _)| code)
    }

    /// [`SitePlan::relocated_original`], plus where each overwritten
    /// instruction landed: `(original address, address in the copy)`. A
    /// thread stopped between two overwritten instructions can be moved to
    /// the same point of the copy, which behaves the same from there on.
    pub fn relocated_original_map(&self, at: u64) -> Result<(Vec<u8>, ResumeMap), PlanError> {
        let max = self.max_relocated_len();
        let reloc_err = |reason: String| PlanError::Relocation {
            site: self.site_offset(),
            len: self.len,
            at,
            reason,
        };
        // Each copied instruction lands somewhere in [at, at + max]; check
        // both ends of that interval.
        for ins in &self.instrs {
            if ins.is_ip_rel_memory_operand() {
                let target = ins.ip_rel_memory_address();
                if !in_rel32_range(at, target)
                    || !in_rel32_range(at.wrapping_add(max as u64), target)
                {
                    return Err(PlanError::RipRelativeOutOfRange {
                        offset: ins.ip().wrapping_sub(self.func_addr) as usize,
                        mnemonic: mnemonic_name(ins),
                        target,
                        at,
                    });
                }
            }
        }
        let mut block = self.instrs.clone();
        let mut back = Instruction::with_branch(Code::Jmp_rel32_64, self.resume_addr())
            .map_err(|e| reloc_err(e.to_string()))?;
        back.set_ip(self.jmp_back_ip());
        block.push(back);
        let result = BlockEncoder::encode(
            64,
            InstructionBlock::new(&block, at),
            BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS
                | BlockEncoderOptions::RETURN_CONSTANT_OFFSETS,
        )
        .map_err(|e| reloc_err(e.to_string()))?;
        let mut code = result.code_buffer;
        // The block encoder treats a RIP-relative operand that points at a
        // copied instruction like a branch to it and points it at the copy.
        // Only the site's first instruction can be such a target (plan_site
        // refuses references to the rest), by an instruction that takes the
        // function's address (`lea rdi, [rip+func]`): that address must stay
        // the function's, so the displacement is set back to it.
        for (k, ins) in self.instrs.iter().enumerate() {
            if !ins.is_ip_rel_memory_operand() {
                continue;
            }
            let target = ins.ip_rel_memory_address();
            if !block.iter().any(|i| i.ip() == target) {
                continue;
            }
            let fixed = (|| {
                let off = *result.new_instruction_offsets.get(k)?;
                let co = result.constant_offsets.get(k)?;
                if off == u32::MAX || !co.has_displacement() || co.displacement_size() != 4 {
                    return None;
                }
                let start = off as usize;
                let len = Decoder::with_ip(64, code.get(start..)?, 0, DecoderOptions::NONE)
                    .decode()
                    .len();
                let next = at.wrapping_add((start + len) as u64);
                let disp = rel32(next, target)?.to_le_bytes();
                let d = start + co.displacement_offset();
                code.get_mut(d..d + 4)?.copy_from_slice(&disp);
                Some(())
            })();
            if fixed.is_none() {
                return Err(reloc_err(format!(
                    "cannot keep the RIP-relative operand of the instruction at {:#x} pointing at {target:#x}",
                    ins.ip()
                )));
            }
        }
        // Check the encoder's work: every copied instruction that is not a
        // branch (those are rebuilt from their target) must decode as the
        // original did. iced 1.22 drops the REX prefix of 3DNow!
        // instructions, so `pfadd mm0, [r8]` would become `pfadd mm0, [rax]`.
        for (k, ins) in self.instrs.iter().enumerate() {
            let off = result.new_instruction_offsets.get(k).copied();
            if branch_target(ins).is_some() || off == Some(u32::MAX) {
                continue;
            }
            let copy = off.and_then(|off| {
                let ip = at.wrapping_add(u64::from(off));
                let bytes = code.get(off as usize..)?;
                Some(Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE).decode())
            });
            match copy {
                Some(copy) if same_instruction(ins, &copy) => {}
                copy => {
                    return Err(reloc_err(format!(
                        "the instruction at +{:#x} ({ins}) is not re-encoded faithfully{}",
                        ins.ip().wrapping_sub(self.func_addr),
                        match copy {
                            Some(c) => format!(" (it became {c})"),
                            None => String::new(),
                        }
                    )))
                }
            }
        }
        if code.len() > max {
            return Err(reloc_err(format!(
                "the relocated code is {} bytes, more than the {max} bytes reserved",
                code.len()
            )));
        }
        let map = self
            .instrs
            .iter()
            .zip(&result.new_instruction_offsets)
            .filter(|(_, off)| **off != u32::MAX)
            .map(|(ins, off)| (ins.ip(), at.wrapping_add(u64::from(*off))))
            .collect();
        Ok((code, map))
    }

    /// A made-up original address for the appended jump back. The block
    /// encoder maps branch targets to block instructions by original
    /// address, so this must not be the address of a copied instruction, the
    /// target of a copied branch, or `resume_addr` (that would make the jump
    /// back a jump to itself). Addresses strictly inside the site are never
    /// branch targets (`plan_site` refuses those), so try them first.
    fn jmp_back_ip(&self) -> u64 {
        let taken = |a: u64| {
            a == 0
                || a == self.resume_addr()
                || self.instrs.iter().any(|i| {
                    i.ip() == a
                        || branch_target(i) == Some(a)
                        || (i.is_ip_rel_memory_operand() && i.ip_rel_memory_address() == a)
                })
        };
        (1..self.len as u64)
            .map(|d| self.site_addr.wrapping_add(d))
            .chain((1..).map(|d: u64| self.site_addr.wrapping_sub(d)))
            .find(|&a| !taken(a))
            .unwrap_or(1)
    }

    /// Upper bound of relocated_original's length (so the caller can reserve space before knowing `at`).
    ///
    /// Per instruction the block encoder needs at most the longest form of a
    /// rewritten branch (`jrcxz`/`loop` become three instructions with an
    /// absolute jump) plus an 8-byte pointer, and up to 7 bytes align the
    /// pointers.
    pub fn max_relocated_len(&self) -> usize {
        const PER_INSTR: usize = 15 + 2 + 2 + 6 + 8;
        (self.instrs.len() + 1) * PER_INSTR + 7
    }

    /// The 5..len bytes to write at site_addr: `jmp rel32` to `to`, padded with int3 (0xCC) up to `len`. Err if out of rel32 range.
    pub fn jump_bytes(&self, to: u64) -> Result<Vec<u8>, PlanError> {
        let jmp = jmp_rel32(self.site_addr, to).ok_or(PlanError::JumpOutOfRange {
            from: self.site_addr,
            to,
        })?;
        let mut bytes = jmp.to_vec();
        bytes.resize(self.len.max(JMP_REL32_LEN), 0xCC);
        Ok(bytes)
    }
}

/// `(original address, address in the relocated copy)` per overwritten
/// instruction.
pub type ResumeMap = Vec<(u64, u64)>;

/// Return addresses of the calls in relocated code placed at `at` (as
/// `SitePlan::relocated_original` made it), up to its first unconditional
/// jump: a thread returning there is inside the copied function entry, at
/// the point equivalent to the end of the overwritten bytes.
pub fn call_return_points(code: &[u8], at: u64) -> Vec<u64> {
    let mut dec = iced_x86::Decoder::with_ip(64, code, at, iced_x86::DecoderOptions::NONE);
    let mut out = Vec::new();
    while dec.can_decode() {
        let ins = dec.decode();
        if ins.is_invalid() {
            break;
        }
        match ins.flow_control() {
            iced_x86::FlowControl::Call | iced_x86::FlowControl::IndirectCall => {
                out.push(ins.next_ip())
            }
            iced_x86::FlowControl::UnconditionalBranch | iced_x86::FlowControl::IndirectBranch => {
                break
            }
            _ => {}
        }
    }
    out
}

/// The direct calls (`call rel32`, opcode `E8` without prefixes) in one
/// function's code placed at `at` whose destination is in `targets`:
/// `(address of the call, destination)`. The code is decoded linearly from
/// the function's start, so `code` must be exactly one function (data or
/// padding after an unconditional branch could otherwise be misread).
/// Decoding stops at the first invalid instruction.
pub fn direct_calls_to(
    code: &[u8],
    at: u64,
    targets: &std::collections::BTreeSet<u64>,
) -> Vec<(u64, u64)> {
    let mut dec = iced_x86::Decoder::with_ip(64, code, at, iced_x86::DecoderOptions::NONE);
    let mut out = Vec::new();
    while dec.can_decode() {
        let pos = dec.position();
        let ins = dec.decode();
        if ins.is_invalid() {
            break;
        }
        let plain_call = ins.len() == CALL_REL32_LEN
            && code[pos] == 0xE8
            && ins.flow_control() == iced_x86::FlowControl::Call;
        if plain_call && targets.contains(&ins.near_branch_target()) {
            out.push((ins.ip(), ins.near_branch_target()));
        }
    }
    out
}

/// Length of `call rel32`.
pub const CALL_REL32_LEN: usize = 5;

/// `call rel32` placed at `from` calling `to`, or `None` if out of range.
pub fn call_rel32(from: u64, to: u64) -> Option<[u8; 5]> {
    let rel = rel32(from.wrapping_add(CALL_REL32_LEN as u64), to)?;
    let d = rel.to_le_bytes();
    Some([0xE8, d[0], d[1], d[2], d[3]])
}

/// `jmp rel32` placed at `from` jumping to `to`, or `None` if out of range.
pub fn jmp_rel32(from: u64, to: u64) -> Option<[u8; 5]> {
    let rel = rel32(from.wrapping_add(JMP_REL32_LEN as u64), to)?;
    let d = rel.to_le_bytes();
    Some([0xE9, d[0], d[1], d[2], d[3]])
}

/// 14-byte absolute jump usable anywhere: `jmp qword ptr [rip+0]` followed by the 8-byte address.
pub fn jmp_abs(to: u64) -> [u8; 14] {
    let mut out = [0u8; JMP_ABS_LEN];
    out[..6].copy_from_slice(&[0xFF, 0x25, 0, 0, 0, 0]);
    out[6..].copy_from_slice(&to.to_le_bytes());
    out
}

/// Whether `to` is reachable by a rel32 displacement from an instruction ending at `from_end`.
pub fn in_rel32_range(from_end: u64, to: u64) -> bool {
    rel32(from_end, to).is_some()
}

/// The rel32 displacement from `from_end` to `to` (addresses wrap like RIP does).
fn rel32(from_end: u64, to: u64) -> Option<i32> {
    i32::try_from(to.wrapping_sub(from_end) as i64).ok()
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_c;
