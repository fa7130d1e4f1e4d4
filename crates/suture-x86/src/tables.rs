//! Recognition of compiler-generated jump tables (`switch`).
//!
//! Two shapes are recognised by tracking a few abstract register values
//! along the linear instruction stream:
//!
//! * PIC (GCC/Clang `-fPIC`/`-fPIE`):
//!   `lea rX, [rip+T]` … `movsxd rY, dword [rX + rZ*4]` … `add rY, rX` … `jmp rY`;
//!   entries are `int32` offsets relative to `T`.
//! * non-PIC: `jmp qword [rZ*8 + T]`, or `mov rY, qword [rZ*8 + T]` … `jmp rY`;
//!   entries are absolute 8-byte addresses.
//!
//! Register moves propagate values; any other write to a register forgets
//! it. Values are not reset at labels, so a `lea` hoisted out of a loop is
//! still seen; a stale match only leads to reading a few bogus entries, which
//! in the worst case refuses a patch.

use std::collections::HashMap;

use iced_x86::{
    Instruction, InstructionInfoFactory, MemorySize, Mnemonic, OpAccess, OpKind, Register,
};

use crate::Memory;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum TableKind {
    /// int32 entries, target = base + entry.
    Rel32 { base: u64 },
    /// u64 entries holding absolute addresses.
    Abs64,
}

/// A jump table used by the indirect `jmp` at `jmp_ip`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct JumpTable {
    pub jmp_ip: u64,
    /// Address of entry 0.
    pub table: u64,
    pub kind: TableKind,
}

/// Abstract value of a register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Val {
    /// A RIP-relative address taken with `lea`.
    Addr(u64),
    /// A sign-extended int32 loaded from `table[idx]` (movsxd).
    RelEntry { table: u64 },
    /// `RelEntry` plus the base address: a jump target.
    RelTarget { table: u64, base: u64 },
    /// An 8-byte absolute entry loaded from `table[idx]`.
    AbsEntry { table: u64 },
}

fn full(r: Register) -> Register {
    r.full_register()
}

/// Memory operand `[base + index*scale + disp]` without segment override and without RIP.
fn sib(ins: &Instruction) -> Option<(Register, Register, u32, u64)> {
    if ins.is_ip_rel_memory_operand() || ins.memory_index() == Register::None {
        return None;
    }
    match ins.segment_prefix() {
        Register::None | Register::DS => {}
        _ => return None,
    }
    Some((
        ins.memory_base(),
        ins.memory_index(),
        ins.memory_index_scale(),
        ins.memory_displacement64(),
    ))
}

fn is_gpr64(ins: &Instruction, op: u32) -> Option<Register> {
    if ins.op_kind(op) != OpKind::Register {
        return None;
    }
    let r = ins.op_register(op);
    r.is_gpr64().then_some(r)
}

/// Scans the function's instructions for jump tables.
pub(crate) fn find_jump_tables(instrs: &[Instruction]) -> Vec<JumpTable> {
    let mut regs: HashMap<Register, Val> = HashMap::new();
    let mut info = InstructionInfoFactory::new();
    let mut found: Vec<JumpTable> = Vec::new();
    let push = |t: JumpTable, found: &mut Vec<JumpTable>| {
        if !found.contains(&t) {
            found.push(t);
        }
    };

    for ins in instrs {
        // The value (if any) the destination register gets from this instruction.
        let mut new_val: Option<(Register, Val)> = None;
        match ins.mnemonic() {
            Mnemonic::Lea if ins.is_ip_rel_memory_operand() => {
                if let Some(dst) = is_gpr64(ins, 0) {
                    new_val = Some((dst, Val::Addr(ins.ip_rel_memory_address())));
                }
            }
            Mnemonic::Movsxd if ins.op_count() == 2 && ins.op_kind(1) == OpKind::Memory => {
                if let (Some(dst), Some((base, _, 4, disp))) = (is_gpr64(ins, 0), sib(ins)) {
                    if ins.memory_size() == MemorySize::Int32 {
                        if let Some(Val::Addr(t)) = regs.get(&full(base)) {
                            let table = t.wrapping_add(disp);
                            new_val = Some((dst, Val::RelEntry { table }));
                        }
                    }
                }
            }
            Mnemonic::Add if ins.op_count() == 2 => {
                if let (Some(dst), Some(src)) = (is_gpr64(ins, 0), is_gpr64(ins, 1)) {
                    let v = match (regs.get(&dst), regs.get(&src)) {
                        (Some(Val::RelEntry { table }), Some(Val::Addr(base)))
                        | (Some(Val::Addr(base)), Some(Val::RelEntry { table })) => {
                            Some(Val::RelTarget {
                                table: *table,
                                base: *base,
                            })
                        }
                        _ => None,
                    };
                    new_val = v.map(|v| (dst, v));
                }
            }
            Mnemonic::Mov if ins.op_count() == 2 => {
                if let Some(dst) = is_gpr64(ins, 0) {
                    if let Some(src) = is_gpr64(ins, 1) {
                        new_val = regs.get(&src).map(|v| (dst, *v));
                    } else if ins.op_kind(1) == OpKind::Memory
                        && ins.memory_size() == MemorySize::UInt64
                    {
                        if let Some((Register::None, _, 8, disp)) = sib(ins) {
                            new_val = Some((dst, Val::AbsEntry { table: disp }));
                        }
                    }
                }
            }
            Mnemonic::Jmp if ins.op_count() == 1 => match ins.op_kind(0) {
                OpKind::Register => {
                    let v = regs.get(&full(ins.op_register(0))).copied();
                    match v {
                        Some(Val::RelTarget { table, base }) => push(
                            JumpTable {
                                jmp_ip: ins.ip(),
                                table,
                                kind: TableKind::Rel32 { base },
                            },
                            &mut found,
                        ),
                        Some(Val::AbsEntry { table }) => push(
                            JumpTable {
                                jmp_ip: ins.ip(),
                                table,
                                kind: TableKind::Abs64,
                            },
                            &mut found,
                        ),
                        _ => {}
                    }
                }
                OpKind::Memory
                    if ins.memory_size() == MemorySize::QwordOffset
                        || ins.memory_size() == MemorySize::UInt64 =>
                {
                    if let Some((Register::None, _, 8, disp)) = sib(ins) {
                        push(
                            JumpTable {
                                jmp_ip: ins.ip(),
                                table: disp,
                                kind: TableKind::Abs64,
                            },
                            &mut found,
                        );
                    }
                }
                _ => {}
            },
            _ => {}
        }

        // Forget everything this instruction writes, then record the new value.
        for used in info.info(ins).used_registers() {
            if matches!(
                used.access(),
                OpAccess::Write
                    | OpAccess::CondWrite
                    | OpAccess::ReadWrite
                    | OpAccess::ReadCondWrite
            ) {
                regs.remove(&full(used.register()));
            }
        }
        if let Some((dst, v)) = new_val {
            regs.insert(full(dst), v);
        }
    }
    found
}

/// What to do after looking at one table entry.
pub(crate) enum Visit {
    Continue,
    Stop,
    Found(usize, u64),
}

/// Calls `visit(index, target)` for each entry until it stops, an entry is
/// unreadable, or `cap` entries were seen. Returns the first `Found`.
pub(crate) fn read_entries(
    table: &JumpTable,
    mem: &dyn Memory,
    cap: usize,
    mut visit: impl FnMut(usize, u64) -> Visit,
) -> Option<(usize, u64)> {
    let entry_size: usize = match table.kind {
        TableKind::Rel32 { .. } => 4,
        TableKind::Abs64 => 8,
    };
    // Read in chunks; if a chunk is unreadable (e.g. it crosses the end of a
    // mapping), fall back to single entries for it.
    const CHUNK: usize = 64;
    let mut index = 0;
    while index < cap {
        let n = CHUNK.min(cap - index);
        let addr = table.table.wrapping_add((index * entry_size) as u64);
        let chunk = match mem.read(addr, n * entry_size) {
            Some(bytes) if bytes.len() >= n * entry_size => bytes,
            _ => {
                let mut bytes = Vec::new();
                for k in 0..n {
                    let a = addr.wrapping_add((k * entry_size) as u64);
                    match mem.read(a, entry_size) {
                        Some(b) if b.len() >= entry_size => {
                            bytes.extend_from_slice(&b[..entry_size])
                        }
                        _ => break,
                    }
                }
                bytes
            }
        };
        let got = chunk.len() / entry_size;
        for k in 0..got {
            let raw = &chunk[k * entry_size..(k + 1) * entry_size];
            let target = match table.kind {
                TableKind::Rel32 { base } => {
                    let off = i32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
                    base.wrapping_add(off as i64 as u64)
                }
                TableKind::Abs64 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(raw);
                    u64::from_le_bytes(b)
                }
            };
            match visit(index + k, target) {
                Visit::Continue => {}
                Visit::Stop => return None,
                Visit::Found(i, t) => return Some((i, t)),
            }
        }
        if got < n {
            return None;
        }
        index += n;
    }
    None
}
