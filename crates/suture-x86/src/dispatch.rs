//! Per-thread dispatch stub used during a live-patch transition.
//!
//! While a transition is in progress a patched function's site jumps to a
//! dispatch stub instead of to one fixed address. The stub sends every thread
//! that has not switched yet ("pending") to `initial` and every other thread
//! to `target`.
//!
//! # The pending table
//!
//! A thread is identified by its thread pointer `tp` (the value at `fs:0`,
//! which is the thread's `fs` base with glibc and musl). The pending threads
//! are kept in an open-addressing hash set that suture maps into the target
//! and updates from outside with ordinary memory writes:
//!
//! * `1 << bits` slots of `u64` at `table` (8-byte aligned), `bits` in
//!   [`TABLE_BITS`];
//! * slot `0`: empty, ends a probe;
//! * slot `tp`: the thread with that thread pointer is pending;
//! * slot `tp | TOMBSTONE_BIT`: a removed entry (a tombstone). Thread pointers
//!   are at least 16-byte aligned, so a tombstone never equals a live entry;
//!   it does not end a probe. Removing an entry therefore only needs a
//!   one-byte (atomic) write of the slot's lowest byte;
//! * a probe starts at [`table_index`] and goes on linearly
//!   (`i = (i + 1) & mask`), visiting each slot at most once: a table
//!   without empty slots costs one pass, never an endless loop.
//!
//! [`table_insert`], [`table_find`], [`table_remove`] and [`table_contains`]
//! implement exactly the probe the stub does.
//!
//! # The stub
//!
//! Entered by a jump at a function's entry. It saves what it uses on the
//! stack (below the return address; nothing above `rsp` is touched) and
//! clobbers only `r11` and the flags, like the SysV ABI allows at a call.
//!
//! 1. Fast path: hash `fs:0`, and if its home slot is empty, restore `rax`
//!    and jump to `target` (to `initial` while the quarantine is on, see
//!    [`DispatchStub::quarantine`]).
//! 2. Otherwise probe the chain. Not found: as in 1.
//! 3. Found: if the stub's trap switch (a literal byte, see
//!    [`DispatchStub::trap_switch`]) is off, `initial` at once. Otherwise the
//!    trap, a `getpid` system call. suture's transition worker
//!    (tracing with `PTRACE_SYSCALL`) recognises a thread at its
//!    syscall-entry stop by `rip == trap_end`, inspects its stack (see
//!    [`DispatchStub::pushed_words`]) and may remove it from the table.
//!    Without a tracer the call is harmless.
//! 4. Probe again: not found: `target`, found: `initial`.
//!
//! `target` and `initial` are reached through `jmp qword ptr [rip+disp]`
//! with 8-byte literals at the end of the stub, so they may be anywhere.

use std::ops::RangeInclusive;

use iced_x86::code_asm::*;
use iced_x86::{BlockEncoderOptions, FlowControl, IcedError};

/// Upper bound of a dispatch stub's length.
pub const DISPATCH_MAX_LEN: usize = 256;
/// Allowed values of `bits` (the table has `1 << bits` slots).
pub const TABLE_BITS: RangeInclusive<u32> = 4..=16;
/// Set in a slot to remove its entry (a tombstone).
pub const TOMBSTONE_BIT: u64 = 1;
/// Multiplier of [`table_index`] (odd; 2^64 divided by the golden ratio).
///
/// A full 64-bit constant costs one `mov r64, imm64` more than a
/// sign-extended imm32, but spreads thread pointers that differ only in
/// high bits (thread stacks are megabytes apart) over the whole table.
pub const HASH_MULTIPLIER: u64 = 0x9E37_79B9_7F4A_7C15;
/// The system call used as the trap (`getpid`).
pub const TRAP_SYSCALL: u32 = 39;

/// Where and for what a dispatch stub is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DispatchParams {
    /// Address the stub will be written at.
    pub at: u64,
    /// Address of the pending table (8-byte aligned).
    pub table: u64,
    /// The table has `1 << bits` slots; `bits` in [`TABLE_BITS`].
    pub bits: u32,
    /// Where threads that are not pending go.
    pub target: u64,
    /// Where pending threads go.
    pub initial: u64,
}

/// Why a dispatch stub cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DispatchError {
    #[error("a pending table has 2^{} to 2^{} slots, not 2^{bits}", TABLE_BITS.start(), TABLE_BITS.end())]
    Bits { bits: u32 },
    #[error("the pending table address {table:#x} is not a non-null 8-byte aligned address")]
    TableAddress { table: u64 },
    #[error("cannot assemble the dispatch stub at {at:#x}: {reason}")]
    Assemble { at: u64, reason: String },
}

/// A dispatch stub assembled for one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchStub {
    /// The machine code (instructions, then the 8-byte literals).
    pub bytes: Vec<u8>,
    /// Address just after the trap's `syscall` instruction (rip at the syscall-entry stop).
    pub trap_end: u64,
    /// Address of the trap switch, a byte in the stub's literals: 1 (as
    /// built) makes a pending thread take the trap, 0 sends it straight to
    /// `initial`. The trap is only worth its system call while a tracer
    /// waits for it (suture's transition worker turns it on).
    pub trap_switch: u64,
    /// Address of the quarantine, the byte after the trap switch: 0 (as
    /// built) sends a thread that is not in the table to `target`, 1 to
    /// `initial` like a pending thread. suture turns it on while it writes
    /// jumps to the stub without stopping the process and fills the table
    /// meanwhile, so that a thread it has not seen yet keeps running the
    /// code it ran before.
    pub quarantine: u64,
    at: u64,
    /// (offset, words pushed before the instruction runs) per instruction, by offset.
    depths: Vec<(u32, u8)>,
}

impl DispatchStub {
    /// For a thread stopped with program counter `pc` inside the stub: how
    /// many 8-byte words the stub has pushed at that point, i.e. the return
    /// address into the caller is at `rsp + 8*n`.
    ///
    /// `None` if `pc` is not the start of one of the stub's instructions
    /// (outside the stub, in the middle of an instruction, or in the
    /// literals); a stopped thread is never there.
    pub fn pushed_words(&self, pc: u64) -> Option<usize> {
        let off = u32::try_from(pc.wrapping_sub(self.at)).ok()?;
        let i = self.depths.binary_search_by_key(&off, |&(o, _)| o).ok()?;
        Some(self.depths[i].1.into())
    }

    /// Whether `pc` lies in the stub's bytes (code or literals).
    pub fn contains(&self, pc: u64) -> bool {
        pc.wrapping_sub(self.at) < self.bytes.len() as u64
    }

    /// The address the stub was built for.
    pub fn at(&self) -> u64 {
        self.at
    }
}

/// Home slot of thread pointer `tp` in a table of `1 << bits` slots:
/// `(tp * HASH_MULTIPLIER) >> (64 - bits)`, exactly what the stub computes.
///
/// # Panics
///
/// If `bits` is not in [`TABLE_BITS`].
pub fn table_index(tp: u64, bits: u32) -> usize {
    assert!(TABLE_BITS.contains(&bits), "table bits {bits} out of range");
    (tp.wrapping_mul(HASH_MULTIPLIER) >> (64 - bits)) as usize
}

/// Where the stub's probe for `tp` ends.
enum Probe {
    Found(usize),
    /// An empty slot ends the chain; the first tombstone on the way, if any.
    Empty {
        slot: usize,
        tombstone: Option<usize>,
    },
    /// Every slot was visited.
    Full {
        tombstone: Option<usize>,
    },
}

fn probe(slots: &[u64], bits: u32, tp: u64) -> Probe {
    assert_eq!(slots.len(), 1 << bits, "a table of 2^{bits} slots");
    let mask = slots.len() - 1;
    let mut i = table_index(tp, bits);
    let mut tombstone = None;
    for _ in 0..slots.len() {
        match slots[i] {
            s if s == tp => return Probe::Found(i),
            0 => return Probe::Empty { slot: i, tombstone },
            s if s & TOMBSTONE_BIT != 0 => {
                tombstone.get_or_insert(i);
            }
            _ => {}
        }
        i = (i + 1) & mask;
    }
    Probe::Full { tombstone }
}

/// Whether `tp` is a possible thread pointer (non-zero, tombstone bit clear).
fn valid_tp(tp: u64) -> bool {
    tp != 0 && tp & TOMBSTONE_BIT == 0
}

/// Index of the slot holding `tp`, if the stub would find it pending.
///
/// # Panics
///
/// If `bits` is not in [`TABLE_BITS`] or `slots.len() != 1 << bits`.
pub fn table_find(slots: &[u64], bits: u32, tp: u64) -> Option<usize> {
    match probe(slots, bits, tp) {
        Probe::Found(i) if valid_tp(tp) => Some(i),
        _ => None,
    }
}

/// Whether the stub would find `tp` pending.
///
/// # Panics
///
/// As [`table_find`].
pub fn table_contains(slots: &[u64], bits: u32, tp: u64) -> bool {
    table_find(slots, bits, tp).is_some()
}

/// Marks `tp` pending: writes it into the first tombstone or empty slot of
/// its chain (nothing if already there). Returns whether `tp` is in the
/// table afterwards: `false` if the table is full or `tp` is 0 or has
/// [`TOMBSTONE_BIT`] set.
///
/// # Panics
///
/// As [`table_find`].
pub fn table_insert(slots: &mut [u64], bits: u32, tp: u64) -> bool {
    if !valid_tp(tp) {
        return false;
    }
    let free = match probe(slots, bits, tp) {
        Probe::Found(_) => return true,
        Probe::Empty { slot, tombstone } => tombstone.unwrap_or(slot),
        Probe::Full {
            tombstone: Some(slot),
        } => slot,
        Probe::Full { tombstone: None } => return false,
    };
    slots[free] = tp;
    true
}

/// Removes `tp` by setting [`TOMBSTONE_BIT`] in its slot; returns the slot
/// index (in the target, the byte to write is `table + 8 * index`, the
/// slot's lowest byte).
///
/// # Panics
///
/// As [`table_find`].
pub fn table_remove(slots: &mut [u64], bits: u32, tp: u64) -> Option<usize> {
    let i = table_find(slots, bits, tp)?;
    slots[i] |= TOMBSTONE_BIT;
    Some(i)
}

/// Builds the dispatch stub for `p`.
///
/// Layout (`[n]` = words pushed before the instruction; `N = 1 << bits`):
///
/// ```text
/// [0] push rax                     ; fast path
/// [1] mov rax, HASH_MULTIPLIER
/// [1] imul rax, fs:[0]
/// [1] shr rax, 64 - bits
/// [1] mov r11, table
/// [1] cmp qword [r11 + rax*8], 0
/// [1] jne occupied
/// [1] miss: cmp byte [rip + quarantine], 0; jne quarantined
/// [1] pop rax
/// [0] jmp [rip + target]
/// [1] quarantined: pop rax
/// [0] jmp [rip + initial]
/// [1] occupied: push rcx; push rdx
/// [3] mov rcx, fs:[0]; mov edx, N
/// [3] probe (found: trap, empty: miss3); when exhausted: miss3
/// [3] miss3: pop rdx; pop rcx; jmp miss
/// [3] trap: mov eax, 39; syscall
/// [3] trap_end: mov rcx, fs:[0]; rehash into rax; mov r11, table; mov edx, N
/// [3] probe (found: pending, empty: miss3); jmp miss3
/// [3] pending: pop rdx; pop rcx; pop rax; jmp [rip + initial]
///     align 8 (int3); target; initial; trap switch, quarantine (bytes)
/// ```
///
/// where a probe is
/// `cmp rcx, [r11+rax*8]; je found; cmp qword [r11+rax*8], 0; je empty;
/// inc eax; and eax, N-1; dec edx; jne probe`.
pub fn dispatch_stub(p: &DispatchParams) -> Result<DispatchStub, DispatchError> {
    if !TABLE_BITS.contains(&p.bits) {
        return Err(DispatchError::Bits { bits: p.bits });
    }
    if p.table == 0 || p.table % 8 != 0 {
        return Err(DispatchError::TableAddress { table: p.table });
    }
    let err = |reason: String| DispatchError::Assemble { at: p.at, reason };
    // The literals' offset is only known after assembling; the padding that
    // aligns them does not change the code before it.
    let first = assemble(p, 0).map_err(err)?;
    let pad = first.literals.wrapping_neg() % 8;
    let stub = assemble(p, pad as usize).map_err(err)?.stub;
    if stub.bytes.len() > DISPATCH_MAX_LEN {
        return Err(err(format!(
            "the stub is {} bytes, more than {DISPATCH_MAX_LEN}",
            stub.bytes.len()
        )));
    }
    Ok(stub)
}

/// A code assembler that records, per instruction, how many words are
/// pushed before it runs (derived from each instruction's stack effect).
struct Builder {
    a: CodeAssembler,
    depth: i32,
    depths: Vec<i32>,
}

impl Builder {
    /// Emits one instruction (or data) through `f`.
    fn ins(
        &mut self,
        f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
    ) -> Result<(), IcedError> {
        let n = self.a.instructions().len();
        f(&mut self.a)?;
        for ins in &self.a.instructions()[n..] {
            self.depths.push(self.depth);
            self.depth -= ins.stack_pointer_increment() / 8;
        }
        Ok(())
    }

    /// Binds `label` to the next instruction, entered with `depth` words pushed.
    fn label(&mut self, label: &mut CodeLabel, depth: i32) -> Result<(), IcedError> {
        let falls_through = self.a.instructions().last().is_some_and(|i| {
            !matches!(
                i.flow_control(),
                FlowControl::UnconditionalBranch | FlowControl::IndirectBranch
            )
        });
        debug_assert!(!falls_through || self.depth == depth, "depth mismatch");
        self.depth = depth;
        self.a.set_label(label)
    }

    /// The table probe: rcx = tp, rax = index, r11 = table, edx = slots left.
    fn probe(&mut self, mask: u32, found: CodeLabel, empty: CodeLabel) -> Result<(), IcedError> {
        let mut top = self.a.create_label();
        let depth = self.depth;
        self.label(&mut top, depth)?;
        self.ins(|a| a.cmp(rcx, qword_ptr(r11 + rax * 8)))?;
        self.ins(|a| a.je(found))?;
        self.ins(|a| a.cmp(qword_ptr(r11 + rax * 8), 0))?;
        self.ins(|a| a.je(empty))?;
        self.ins(|a| a.inc(eax))?;
        self.ins(|a| a.and(eax, mask))?;
        self.ins(|a| a.dec(edx))?;
        self.ins(|a| a.jne(top))
    }

    /// rax = home index of rcx (the thread pointer), r11 = table.
    fn hash(&mut self, p: &DispatchParams) -> Result<(), IcedError> {
        self.ins(|a| a.mov(rax, HASH_MULTIPLIER))?;
        self.ins(|a| a.imul_2(rax, rcx))?;
        self.ins(|a| a.shr(rax, 64 - p.bits))?;
        self.ins(|a| a.mov(r11, p.table))
    }
}

struct Assembled {
    stub: DispatchStub,
    /// Address of the first literal.
    literals: u64,
}

/// Labels and counts [`emit`] hands back to [`assemble`].
struct Emitted {
    trap_end: CodeLabel,
    target_lit: CodeLabel,
    switch_lit: CodeLabel,
    /// Number of instructions before the padding and literals.
    code_instrs: usize,
}

fn assemble(p: &DispatchParams, pad: usize) -> Result<Assembled, String> {
    let mut b = Builder {
        a: CodeAssembler::new(64).map_err(|e| e.to_string())?,
        depth: 0,
        depths: Vec::new(),
    };
    let e = emit(&mut b, p, pad).map_err(|e| e.to_string())?;
    let result =
        b.a.assemble_options(p.at, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
            .map_err(|e| e.to_string())?;
    let offsets = &result.inner.new_instruction_offsets;
    let mut depths = Vec::with_capacity(e.code_instrs);
    for (&off, &depth) in offsets.iter().zip(&b.depths).take(e.code_instrs) {
        let depth = u8::try_from(depth).map_err(|_| "negative stack depth".to_string())?;
        if off == u32::MAX {
            return Err("an instruction was rewritten".into());
        }
        depths.push((off, depth));
    }
    depths.sort_unstable();
    let label_ip = |l: &CodeLabel| result.label_ip(l).map_err(|e| e.to_string());
    Ok(Assembled {
        literals: label_ip(&e.target_lit)?,
        stub: DispatchStub {
            trap_end: label_ip(&e.trap_end)?,
            trap_switch: label_ip(&e.switch_lit)?,
            quarantine: label_ip(&e.switch_lit)? + 1,
            bytes: result.inner.code_buffer.clone(),
            at: p.at,
            depths,
        },
    })
}

/// Emits the stub's instructions, `pad` int3 bytes and the literals.
fn emit(b: &mut Builder, p: &DispatchParams, pad: usize) -> Result<Emitted, IcedError> {
    let slots = 1u32 << p.bits;
    let mask = slots - 1;
    let tp = || qword_ptr(0u64).fs();
    let [mut miss, mut occupied, mut miss3, mut trap, mut trap_end, mut pending] =
        std::array::from_fn(|_| b.a.create_label());
    let [mut target_lit, mut initial_lit, mut switch_lit, mut quarantine_lit, mut quarantined] =
        std::array::from_fn(|_| b.a.create_label());

    // Fast path: home slot empty.
    b.ins(|a| a.push(rax))?;
    b.ins(|a| a.mov(rax, HASH_MULTIPLIER))?;
    b.ins(|a| a.imul_2(rax, tp()))?;
    b.ins(|a| a.shr(rax, 64 - p.bits))?;
    b.ins(|a| a.mov(r11, p.table))?;
    b.ins(|a| a.cmp(qword_ptr(r11 + rax * 8), 0))?;
    b.ins(|a| a.jne(occupied))?;
    b.label(&mut miss, 1)?;
    b.ins(|a| a.cmp(byte_ptr(quarantine_lit), 0))?;
    b.ins(|a| a.jne(quarantined))?;
    b.ins(|a| a.pop(rax))?;
    b.ins(|a| a.jmp(qword_ptr(target_lit)))?;
    // Quarantine on: a thread not in the table runs `initial` too.
    b.label(&mut quarantined, 1)?;
    b.ins(|a| a.pop(rax))?;
    b.ins(|a| a.jmp(qword_ptr(initial_lit)))?;

    // Walk the chain from the home slot (rax, r11 still set).
    b.label(&mut occupied, 1)?;
    b.ins(|a| a.push(rcx))?;
    b.ins(|a| a.push(rdx))?;
    b.ins(|a| a.mov(rcx, tp()))?;
    b.ins(|a| a.mov(edx, slots))?;
    b.probe(mask, trap, miss3)?;
    b.label(&mut miss3, 3)?;
    b.ins(|a| a.pop(rdx))?;
    b.ins(|a| a.pop(rcx))?;
    b.ins(|a| a.jmp(miss))?;

    // Pending: with the switch off, straight to `initial`; else trap
    // (clobbers rax, rcx, r11, all saved or scratch), look again.
    b.label(&mut trap, 3)?;
    b.ins(|a| a.cmp(byte_ptr(switch_lit), 0))?;
    b.ins(|a| a.je(pending))?;
    b.ins(|a| a.mov(eax, TRAP_SYSCALL))?;
    b.ins(|a| a.syscall())?;
    b.label(&mut trap_end, 3)?;
    b.ins(|a| a.mov(rcx, tp()))?;
    b.hash(p)?;
    b.ins(|a| a.mov(edx, slots))?;
    b.probe(mask, pending, miss3)?;
    b.ins(|a| a.jmp(miss3))?;
    b.label(&mut pending, 3)?;
    b.ins(|a| a.pop(rdx))?;
    b.ins(|a| a.pop(rcx))?;
    b.ins(|a| a.pop(rax))?;
    b.ins(|a| a.jmp(qword_ptr(initial_lit)))?;

    let code_instrs = b.depths.len();
    if pad > 0 {
        b.ins(|a| a.db(&[0xCC; 8][..pad]))?;
    }
    b.label(&mut target_lit, 0)?;
    b.ins(|a| a.dq(&[p.target]))?;
    b.label(&mut initial_lit, 0)?;
    b.ins(|a| a.dq(&[p.initial]))?;
    // One literal word: the trap switch (1), the quarantine (0), padding.
    b.label(&mut switch_lit, 0)?;
    b.ins(|a| a.db(&[1]))?;
    b.label(&mut quarantine_lit, 0)?;
    b.ins(|a| a.db(&[0; 7]))?;

    Ok(Emitted {
        trap_end,
        target_lit,
        switch_lit,
        code_instrs,
    })
}
