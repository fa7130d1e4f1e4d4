//! The `SIGTRAP` handler that makes code writes safe without stopping the
//! whole process.
//!
//! suture changes code that other threads may be executing the way the
//! kernel's `text_poke_bp` does: an `int3` on the first byte, then the
//! other bytes, then the first byte. A thread that reaches the `int3`
//! meanwhile takes a `SIGTRAP`; this handler, installed in the target,
//! sends it where the finished instruction would have: for a jump, to its
//! destination; for a call, it pushes the return address and goes to the
//! callee. The handler lives in the target so that it works even if suture
//! dies in the middle of a write: the target keeps running (a signal per
//! call at that site) until the next `suture` command finishes the write.
//!
//! Handler logic, for `SIGTRAP` from an `int3` (`si_code == SI_KERNEL`):
//!
//! 1. the byte before the interrupted `rip` is no longer `0xCC`: suture
//!    finished the write after the trap; go back one byte and execute the
//!    finished instruction;
//! 2. else, its address is in the table: emulate the entry (jump or call);
//! 3. else (an `int3` that is not suture's, or a `SIGTRAP` sent by
//!    someone): the signal's default disposition is restored and the
//!    signal raised again, so the process ends exactly as it would have
//!    without suture.
//!
//! # Layout
//!
//! One mapping: the handler code at [`TrapLayout::handler`] (with its own
//! `rt_sigreturn` restorer), the entry count at [`TrapLayout::count`] and
//! `capacity` entries of three `u64` after it: the `int3` address, the
//! destination, and the kind ([`KIND_JUMP`] or [`KIND_CALL`]). suture
//! writes entries before it writes any `int3`, and rewrites them only when
//! no `int3` of its own is left in the code.

use iced_x86::code_asm::*;

/// An entry whose `int3` replaces the first byte of a jump.
pub const KIND_JUMP: u64 = 0;
/// An entry whose `int3` replaces the first byte of a `call rel32`.
pub const KIND_CALL: u64 = 1;
/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 24;
/// Where the table starts, from the handler's address.
const TABLE_OFFSET: u64 = 0x100;

/// `ucontext_t` offsets (x86_64): `uc_mcontext.gregs[REG_RSP]`,
/// `gregs[REG_RIP]`.
const UC_RSP: u64 = 40 + 15 * 8;
const UC_RIP: u64 = 40 + 16 * 8;
/// `siginfo_t.si_code`.
const SI_CODE: u64 = 8;
/// `si_code` of a `SIGTRAP` raised by an `int3`.
const SI_KERNEL: u32 = 0x80;
const SIGTRAP: u32 = 5;
/// x86_64 system call numbers the handler makes.
const SYS_RT_SIGACTION: u32 = 13;
const SYS_RT_SIGRETURN: u32 = 15;
const SYS_GETPID: u32 = 39;
const SYS_GETTID: u32 = 186;
const SYS_TGKILL: u32 = 234;

/// Where the pieces of the handler mapping are, for a handler placed at
/// `handler`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrapLayout {
    /// The handler's entry (`sa_handler`).
    pub handler: u64,
    /// The restorer (`sa_restorer`): `rt_sigreturn`.
    pub restorer: u64,
    /// The entry count (`u64`); the entries follow it.
    pub count: u64,
    /// How many entries fit.
    pub capacity: u64,
}

impl TrapLayout {
    /// The layout for a handler at `handler` with room for `capacity`
    /// entries.
    pub fn new(handler: u64, capacity: u64) -> TrapLayout {
        TrapLayout {
            handler,
            restorer: 0,
            count: handler + TABLE_OFFSET,
            capacity,
        }
    }

    /// Bytes from the handler to the end of the table.
    pub fn size(&self) -> u64 {
        Self::size_for(self.capacity)
    }

    /// Bytes a handler with room for `capacity` entries needs.
    pub fn size_for(capacity: u64) -> u64 {
        TABLE_OFFSET + 8 + capacity * ENTRY_SIZE
    }

    /// Address of entry `i`.
    pub fn entry(&self, i: u64) -> u64 {
        self.count + 8 + i * ENTRY_SIZE
    }

    /// The bytes of the table (count, then the entries) for `entries`
    /// (`(int3 address, destination, kind)`); `None` if they do not fit.
    pub fn table_bytes(&self, entries: &[(u64, u64, u64)]) -> Option<Vec<u8>> {
        if entries.len() as u64 > self.capacity {
            return None;
        }
        let mut out = (entries.len() as u64).to_le_bytes().to_vec();
        for &(at, dest, kind) in entries {
            out.extend(at.to_le_bytes());
            out.extend(dest.to_le_bytes());
            out.extend(kind.to_le_bytes());
        }
        Some(out)
    }
}

/// The handler's machine code for a handler placed at `at` with room for
/// `capacity` entries, and its layout (with the restorer's address).
pub fn trap_handler(at: u64, capacity: u64) -> Result<(Vec<u8>, TrapLayout), String> {
    let mut layout = TrapLayout::new(at, capacity);
    let mut a = CodeAssembler::new(64).map_err(|e| e.to_string())?;
    let e = |e: iced_x86::IcedError| e.to_string();
    let [mut finished, mut search, mut found, mut jump, mut foreign, mut restorer] =
        std::array::from_fn(|_| a.create_label());
    // rdi = signal, rsi = siginfo, rdx = ucontext. Everything may be
    // clobbered: rt_sigreturn restores the interrupted registers.
    a.cmp(dword_ptr(rsi + SI_CODE), SI_KERNEL).map_err(e)?;
    a.jne(foreign).map_err(e)?;
    a.mov(rax, qword_ptr(rdx + UC_RIP)).map_err(e)?;
    a.dec(rax).map_err(e)?;
    // 1. The int3 is gone: run the finished instruction.
    a.cmp(byte_ptr(rax), 0xCC).map_err(e)?;
    a.jne(finished).map_err(e)?;
    // 2. Look it up.
    a.mov(rcx, layout.count).map_err(e)?;
    a.mov(r8, qword_ptr(rcx)).map_err(e)?;
    a.add(rcx, 8).map_err(e)?;
    a.set_label(&mut search).map_err(e)?;
    a.test(r8, r8).map_err(e)?;
    a.je(foreign).map_err(e)?;
    a.cmp(qword_ptr(rcx), rax).map_err(e)?;
    a.je(found).map_err(e)?;
    a.add(rcx, ENTRY_SIZE as i32).map_err(e)?;
    a.dec(r8).map_err(e)?;
    a.jmp(search).map_err(e)?;
    a.set_label(&mut found).map_err(e)?;
    a.mov(r9, qword_ptr(rcx + 8)).map_err(e)?;
    a.cmp(qword_ptr(rcx + 16), KIND_JUMP as i32).map_err(e)?;
    a.je(jump).map_err(e)?;
    // A call: push the return address (after the 5-byte call).
    a.mov(r10, qword_ptr(rdx + UC_RSP)).map_err(e)?;
    a.sub(r10, 8).map_err(e)?;
    a.add(rax, 5).map_err(e)?;
    a.mov(qword_ptr(r10), rax).map_err(e)?;
    a.mov(qword_ptr(rdx + UC_RSP), r10).map_err(e)?;
    a.set_label(&mut jump).map_err(e)?;
    a.mov(qword_ptr(rdx + UC_RIP), r9).map_err(e)?;
    a.ret().map_err(e)?;
    a.set_label(&mut finished).map_err(e)?;
    a.mov(qword_ptr(rdx + UC_RIP), rax).map_err(e)?;
    a.ret().map_err(e)?;
    // 3. Not ours: default disposition back (a zeroed kernel sigaction
    // below the stack pointer), then raise it again for this thread.
    a.set_label(&mut foreign).map_err(e)?;
    a.sub(rsp, 64).map_err(e)?;
    a.xor(eax, eax).map_err(e)?;
    for off in [0, 8, 16, 24] {
        a.mov(qword_ptr(rsp + off), rax).map_err(e)?;
    }
    a.mov(eax, SYS_RT_SIGACTION).map_err(e)?;
    a.mov(edi, SIGTRAP).map_err(e)?;
    a.mov(rsi, rsp).map_err(e)?;
    a.xor(edx, edx).map_err(e)?;
    a.mov(r10d, 8u32).map_err(e)?;
    a.syscall().map_err(e)?;
    a.add(rsp, 64).map_err(e)?;
    a.mov(eax, SYS_GETPID).map_err(e)?;
    a.syscall().map_err(e)?;
    a.mov(r12d, eax).map_err(e)?;
    a.mov(eax, SYS_GETTID).map_err(e)?;
    a.syscall().map_err(e)?;
    a.mov(esi, eax).map_err(e)?;
    a.mov(edi, r12d).map_err(e)?;
    a.mov(edx, SIGTRAP).map_err(e)?;
    a.mov(eax, SYS_TGKILL).map_err(e)?;
    a.syscall().map_err(e)?;
    a.ret().map_err(e)?;
    a.set_label(&mut restorer).map_err(e)?;
    a.mov(eax, SYS_RT_SIGRETURN).map_err(e)?;
    a.syscall().map_err(e)?;
    let r = a
        .assemble_options(
            at,
            iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
        )
        .map_err(e)?;
    layout.restorer = r.label_ip(&restorer).map_err(e)?;
    let code = r.inner.code_buffer;
    if code.len() as u64 > TABLE_OFFSET {
        return Err(format!(
            "the trap handler is {} bytes, more than {TABLE_OFFSET}",
            code.len()
        ));
    }
    Ok((code, layout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handler_fits_and_ends_with_its_restorer() {
        let (code, l) = trap_handler(0x7000_0000_0000, 4096).unwrap();
        assert!(code.len() as u64 <= TABLE_OFFSET);
        let off = (l.restorer - l.handler) as usize;
        // mov eax, 15; syscall
        assert_eq!(&code[off..], &[0xB8, 15, 0, 0, 0, 0x0F, 0x05]);
        assert_eq!(l.count, l.handler + TABLE_OFFSET);
        assert_eq!(l.entry(2), l.count + 8 + 48);
        assert_eq!(l.size(), TABLE_OFFSET + 8 + 4096 * ENTRY_SIZE);
    }

    #[test]
    fn table_bytes_lays_out_count_and_entries() {
        let l = TrapLayout::new(0x1000, 2);
        let b = l
            .table_bytes(&[(1, 2, KIND_JUMP), (3, 4, KIND_CALL)])
            .unwrap();
        let words: Vec<u64> = b
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(words, [2, 1, 2, 0, 3, 4, 1]);
        assert!(l.table_bytes(&[(0, 0, 0); 3]).is_none());
    }
}
