//! Dispatch stubs: the pure table helpers, the stub's structure (decoded and
//! simulated) and the stub itself, mapped into this process and executed.

use std::arch::asm;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::c_void;
use std::sync::{Barrier, OnceLock};

use iced_x86::{
    Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, Mnemonic, OpAccess,
    OpKind,
};
use proptest::prelude::*;
use suture_x86::dispatch::*;

// ---------------------------------------------------------------------------
// Executable memory and thread pointers

extern "C" {
    fn mmap(addr: *mut c_void, len: usize, prot: i32, flags: i32, fd: i32, off: i64)
        -> *mut c_void;
    fn mprotect(addr: *mut c_void, len: usize, prot: i32) -> i32;
    fn munmap(addr: *mut c_void, len: usize) -> i32;
}

const PROT_READ: i32 = 1;
const PROT_WRITE: i32 = 2;
const PROT_EXEC: i32 = 4;
const MAP_PRIVATE: i32 = 2;
const MAP_ANONYMOUS: i32 = 0x20;
const PAGE: usize = 4096;

/// One anonymous page: written while RW, executed after [`Exec::seal`].
struct Exec {
    base: *mut u8,
}

// The mapping is only written before it is sealed (through `&mut self`).
unsafe impl Send for Exec {}
unsafe impl Sync for Exec {}

impl Exec {
    fn new() -> Self {
        // SAFETY: a fresh anonymous private mapping; no existing memory is affected.
        let p = unsafe {
            mmap(
                std::ptr::null_mut(),
                PAGE,
                PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(p as isize != -1, "mmap failed");
        Exec { base: p.cast() }
    }

    fn addr(&self) -> u64 {
        self.base as u64
    }

    fn write(&mut self, off: usize, bytes: &[u8]) {
        assert!(off + bytes.len() <= PAGE);
        // SAFETY: in bounds of our RW page (checked above), not yet executable.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(off), bytes.len()) }
    }

    fn seal(&mut self) {
        // SAFETY: changes the protection of our own page only.
        let r = unsafe { mprotect(self.base.cast(), PAGE, PROT_READ | PROT_EXEC) };
        assert_eq!(r, 0, "mprotect failed");
    }
}

impl Drop for Exec {
    fn drop(&mut self) {
        // SAFETY: our own mapping; no function pointer into it outlives `self`.
        unsafe { munmap(self.base.cast(), PAGE) };
    }
}

/// The calling thread's thread pointer, as the stub reads it.
fn thread_pointer() -> u64 {
    let tp: u64;
    // SAFETY: fs:0 holds the TCB's self pointer on x86-64 Linux (glibc, musl).
    unsafe {
        asm!("mov {}, qword ptr fs:[0]", out(reg) tp, options(nostack, readonly, preserves_flags));
    }
    tp
}

// ---------------------------------------------------------------------------
// Targets and a stub harness

type Fn6 = extern "C" fn(u64, u64, u64, u64, u64, u64) -> u64;

fn mix(tag: u64, args: [u64; 6]) -> u64 {
    let h = args.iter().zip(1u64..).fold(0, |h: u64, (&x, k)| {
        h.rotate_left(9) ^ x.wrapping_mul(2 * k + 1)
    });
    (tag << 56) | (h >> 8)
}

const TARGET_TAG: u64 = 0x7A;
const INITIAL_TAG: u64 = 0x1E;

extern "C" fn target_fn(a: u64, b: u64, c: u64, d: u64, e: u64, f: u64) -> u64 {
    mix(TARGET_TAG, [a, b, c, d, e, f])
}

extern "C" fn initial_fn(a: u64, b: u64, c: u64, d: u64, e: u64, f: u64) -> u64 {
    mix(INITIAL_TAG, [a, b, c, d, e, f])
}

/// A stub for `slots` (owned, never changed after building) jumping to
/// [`target_fn`] / [`initial_fn`].
struct Harness {
    exec: Exec,
    bits: u32,
    quarantine: bool,
    slots: Vec<u64>,
}

impl Harness {
    fn new(bits: u32, slots: Vec<u64>) -> Self {
        Self::with_switch(bits, slots, true)
    }

    /// A stub with its trap switch on (as built) or off.
    fn with_switch(bits: u32, slots: Vec<u64>, trap: bool) -> Self {
        Self::with_bytes(bits, slots, trap, false)
    }

    /// A stub with its trap switch and quarantine as given.
    fn with_bytes(bits: u32, slots: Vec<u64>, trap: bool, quarantine: bool) -> Self {
        assert_eq!(slots.len(), 1 << bits);
        let mut exec = Exec::new();
        let stub = dispatch_stub(&DispatchParams {
            at: exec.addr(),
            table: slots.as_ptr() as u64,
            bits,
            target: target_fn as *const () as u64,
            initial: initial_fn as *const () as u64,
        })
        .unwrap();
        let mut bytes = stub.bytes.clone();
        if !trap {
            bytes[(stub.trap_switch - stub.at()) as usize] = 0;
        }
        assert_eq!(
            bytes[(stub.quarantine - stub.at()) as usize],
            0,
            "built off"
        );
        if quarantine {
            bytes[(stub.quarantine - stub.at()) as usize] = 1;
        }
        exec.write(0, &bytes);
        exec.seal();
        Harness {
            exec,
            bits,
            quarantine,
            slots,
        }
    }

    fn with_tps(bits: u32, tps: &[u64]) -> Self {
        let mut slots = vec![0; 1 << bits];
        for &tp in tps {
            assert!(table_insert(&mut slots, bits, tp));
        }
        Self::new(bits, slots)
    }

    /// Calls the stub; returns which function ran (after checking the value).
    fn call(&self, args: [u64; 6]) -> &'static str {
        // SAFETY: the page holds a complete stub (sealed RX) whose exits are
        // `extern "C"` functions of this signature; it reads only fs:0 and
        // `self.slots`, alive and unchanged for the harness's lifetime.
        let f: Fn6 = unsafe { std::mem::transmute(self.exec.base) };
        let [a, b, c, d, e, g] = args;
        let r = f(a, b, c, d, e, g);
        let expected = self.expected(thread_pointer());
        let tag = if expected == "initial" {
            INITIAL_TAG
        } else {
            TARGET_TAG
        };
        assert_eq!(r, mix(tag, args), "wrong value (expected {expected})");
        expected
    }

    /// What the stub should do for `tp`, from the pure helpers.
    fn expected(&self, tp: u64) -> &'static str {
        if self.quarantine || table_contains(&self.slots, self.bits, tp) {
            "initial"
        } else {
            "target"
        }
    }
}

const ARGS: [u64; 6] = [
    0x0123_4567_89AB_CDEF,
    0xFEDC_BA98_7654_3210,
    3,
    u64::MAX,
    0x8000_0000_0000_0000,
    42,
];

/// Thread pointer-like values (16-aligned) other than `tp` with home slot `home`.
fn colliding(tp: u64, bits: u32, home: usize) -> impl Iterator<Item = u64> {
    (1u64..)
        .map(|i| 0x7F00_0000_0000 + 16 * i)
        .filter(move |&x| x != tp && table_index(x, bits) == home)
}

// ---------------------------------------------------------------------------
// Pure table helpers

#[test]
fn table_helpers() {
    let bits = 4;
    let mut s = vec![0; 16];
    let tp = 0x7F12_3456_7000;
    assert!(!table_contains(&s, bits, tp));
    assert!(table_insert(&mut s, bits, tp));
    assert!(table_insert(&mut s, bits, tp), "second insert is a no-op");
    assert_eq!(s.iter().filter(|&&x| x != 0).count(), 1);
    let home = table_index(tp, bits);
    assert_eq!(table_find(&s, bits, tp), Some(home));
    assert_eq!(table_remove(&mut s, bits, tp), Some(home));
    assert_eq!(s[home], tp | TOMBSTONE_BIT);
    assert!(!table_contains(&s, bits, tp));
    assert_eq!(table_remove(&mut s, bits, tp), None);
    // A later key of the same chain goes past the tombstone...
    let other = colliding(tp, bits, home).next().unwrap();
    s[(home + 1) % 16] = other;
    assert_eq!(table_find(&s, bits, other), Some((home + 1) % 16));
    // ...and a new insert reuses it.
    assert!(table_insert(&mut s, bits, tp));
    assert_eq!(s[home], tp);

    // Invalid thread pointers are refused.
    assert!(!table_insert(&mut s, bits, 0));
    assert!(!table_insert(&mut s, bits, 0x1001));
    assert!(!table_contains(&s, bits, tp | 1));

    // Full: all 16 fit, the 17th does not; lookups of absent keys end.
    let mut s = vec![0; 16];
    let keys: Vec<u64> = (1..=17).map(|i| i * 0x10_0000).collect();
    for &k in &keys[..16] {
        assert!(table_insert(&mut s, bits, k));
    }
    assert!(!table_insert(&mut s, bits, keys[16]));
    assert!(keys[..16].iter().all(|&k| table_contains(&s, bits, k)));
    assert!(!table_contains(&s, bits, keys[16]));
    // With a tombstone the 17th takes its slot.
    let slot = table_remove(&mut s, bits, keys[3]).unwrap();
    assert!(table_insert(&mut s, bits, keys[16]));
    assert_eq!(s[slot], keys[16]);
}

#[test]
fn table_index_range_and_spread() {
    for bits in 4..=16 {
        for tp in [0, 16, 0x7FFF_FFFF_F000, u64::MAX - 15] {
            assert!(table_index(tp, bits) < 1 << bits);
        }
    }
    // Thread pointers a thread stack apart (8 MiB + guard page) spread well.
    let bits = 8;
    let mut s = vec![0; 256];
    let tps: Vec<u64> = (0..128).map(|i| 0x7F00_0000_0640 - i * 0x80_1000).collect();
    for &tp in &tps {
        assert!(table_insert(&mut s, bits, tp));
    }
    let homes: BTreeSet<usize> = tps.iter().map(|&tp| table_index(tp, bits)).collect();
    assert!(homes.len() > 96, "only {} distinct home slots", homes.len());
}

#[test]
#[should_panic(expected = "out of range")]
fn table_index_rejects_bits() {
    let _ = table_index(16, 17);
}

#[test]
fn rejects_bad_params() {
    let p = DispatchParams {
        at: 0x1000,
        table: 0x2000,
        bits: 4,
        target: 0x3000,
        initial: 0x4000,
    };
    for bits in [0, 3, 17, 64] {
        let e = dispatch_stub(&DispatchParams { bits, ..p }).unwrap_err();
        assert_eq!(e, DispatchError::Bits { bits });
    }
    for table in [0, 0x2004, 0x2001] {
        let e = dispatch_stub(&DispatchParams { table, ..p }).unwrap_err();
        assert_eq!(e, DispatchError::TableAddress { table });
    }
    assert!(dispatch_stub(&p).is_ok());
}

// ---------------------------------------------------------------------------
// Structure: decode the stub and simulate its stack along every path

/// What a flow-following decode of a stub finds.
#[derive(Debug, Default)]
struct Flow {
    /// Every reachable instruction, by address, with the words pushed before it.
    depth: BTreeMap<u64, usize>,
    instrs: BTreeMap<u64, Instruction>,
    /// End addresses of `syscall` instructions.
    syscall_ends: BTreeSet<u64>,
    /// Literal values of the indirect jumps taken before / after a syscall.
    exits_before_trap: BTreeSet<u64>,
    exits_after_trap: BTreeSet<u64>,
}

fn simulate(stub: &DispatchStub) -> Flow {
    let at = stub.at();
    let mut flow = Flow::default();
    let mut seen = BTreeSet::new();
    let mut work = vec![(at, 0usize, false)];
    let literal = |addr: u64| {
        let off = (addr - at) as usize;
        u64::from_le_bytes(stub.bytes[off..off + 8].try_into().unwrap())
    };
    while let Some((pc, depth, trapped)) = work.pop() {
        if let Some(&d) = flow.depth.get(&pc) {
            assert_eq!(d, depth, "{pc:#x} reached with different stack depths");
        }
        if !seen.insert((pc, trapped)) {
            continue;
        }
        assert!(stub.contains(pc), "flow leaves the stub at {pc:#x}");
        let off = (pc - at) as usize;
        let ins = Decoder::with_ip(64, &stub.bytes[off..], pc, DecoderOptions::NONE).decode();
        assert!(!ins.is_invalid(), "undecodable at {pc:#x}");
        flow.depth.insert(pc, depth);
        flow.instrs.insert(pc, ins);
        let after = depth as i64 - i64::from(ins.stack_pointer_increment() / 8);
        assert!(after >= 0, "pops more than it pushed at {pc:#x}");
        let after = after as usize;
        let next = ins.next_ip();
        if ins.mnemonic() == Mnemonic::Syscall {
            flow.syscall_ends.insert(next);
            work.push((next, after, true));
            continue;
        }
        match ins.flow_control() {
            FlowControl::Next => work.push((next, after, trapped)),
            FlowControl::ConditionalBranch => {
                work.push((next, after, trapped));
                work.push((ins.near_branch_target(), after, trapped));
            }
            FlowControl::UnconditionalBranch => {
                work.push((ins.near_branch_target(), after, trapped))
            }
            FlowControl::IndirectBranch => {
                assert!(ins.is_ip_rel_memory_operand(), "indirect jump at {pc:#x}");
                assert_eq!(after, 0, "exit at {pc:#x} with words still pushed");
                let value = literal(ins.ip_rel_memory_address());
                if trapped {
                    flow.exits_after_trap.insert(value);
                } else {
                    flow.exits_before_trap.insert(value);
                }
            }
            fc => panic!("unexpected {fc:?} at {pc:#x}"),
        }
    }
    flow
}

/// Structural checks valid for every stub.
fn check_structure(p: &DispatchParams, stub: &DispatchStub) -> Flow {
    let flow = simulate(stub);
    assert!(stub.bytes.len() <= DISPATCH_MAX_LEN);
    assert_eq!(stub.at(), p.at);
    // Before the trap: `target`, or `initial` when the trap switch is off.
    assert_eq!(
        flow.exits_before_trap,
        BTreeSet::from([p.target, p.initial])
    );
    assert_eq!(flow.exits_after_trap, BTreeSet::from([p.target, p.initial]));
    assert_eq!(flow.syscall_ends, BTreeSet::from([stub.trap_end]));
    assert_eq!(
        flow.depth.get(&stub.trap_end),
        stub.pushed_words(stub.trap_end).as_ref()
    );

    // pushed_words: exact at every instruction boundary, None elsewhere.
    for pc in p.at.wrapping_sub(2)..p.at + stub.bytes.len() as u64 + 2 {
        assert_eq!(
            stub.pushed_words(pc),
            flow.depth.get(&pc).copied(),
            "pc {pc:#x}"
        );
        let inside = pc >= p.at && pc < p.at + stub.bytes.len() as u64;
        assert_eq!(stub.contains(pc), inside, "pc {pc:#x}");
    }

    let mut info = InstructionInfoFactory::new();
    let mut imm = BTreeSet::new();
    for ins in flow.instrs.values() {
        // The only memory writes are pushes (below the return address).
        let writes = info
            .info(ins)
            .used_memory()
            .iter()
            .any(|m| !matches!(m.access(), OpAccess::Read | OpAccess::NoMemAccess));
        assert!(
            !writes || ins.mnemonic() == Mnemonic::Push,
            "{ins} writes memory"
        );
        // Registers written: only saved ones, r11 and rsp.
        for r in info.info(ins).used_registers() {
            if !matches!(
                r.access(),
                OpAccess::Read | OpAccess::CondRead | OpAccess::None
            ) {
                let full = r.register().full_register();
                assert!(
                    matches!(
                        full,
                        iced_x86::Register::RAX
                            | iced_x86::Register::RCX
                            | iced_x86::Register::RDX
                            | iced_x86::Register::R11
                            | iced_x86::Register::RSP
                    ),
                    "{ins} writes {full:?}"
                );
            }
        }
        if (0..ins.op_count()).any(|i| ins.op_kind(i) == OpKind::Immediate64) {
            imm.insert(ins.immediate64());
        }
    }
    assert!(imm.contains(&p.table), "table address not loaded");
    flow
}

fn params(at: u64, bits: u32) -> DispatchParams {
    DispatchParams {
        at,
        table: 0x5555_0000_1000,
        bits,
        target: 0x7F11_2222_3333,
        initial: 0x7F44_5555_6666,
    }
}

#[test]
fn structure_every_bits_and_alignment() {
    for bits in TABLE_BITS {
        for at in 0x40_1000..0x40_1008 {
            let p = params(at, bits);
            let stub = dispatch_stub(&p).unwrap();
            check_structure(&p, &stub);
            // The literals are 8-byte aligned in the target.
            assert_eq!((at + stub.bytes.len() as u64) % 8, 0);
        }
    }
}

#[test]
fn depths_at_key_points() {
    let p = params(0x40_1000, 8);
    let stub = dispatch_stub(&p).unwrap();
    assert_eq!(stub.pushed_words(p.at), Some(0));
    assert_eq!(stub.pushed_words(p.at + 1), Some(1), "after push rax");
    assert_eq!(stub.pushed_words(stub.trap_end), Some(3));
    assert_eq!(&stub.bytes[..1], &[0x50], "starts with push rax");
    let syscall = (stub.trap_end - p.at) as usize - 2;
    assert_eq!(&stub.bytes[syscall..syscall + 2], &[0x0F, 0x05]);
}

proptest! {
    #[test]
    fn any_addresses(
        at in 0x1000u64..(1 << 47) - 0x1000,
        table in (1u64..1 << 44).prop_map(|t| t * 8),
        bits in TABLE_BITS,
        target in any::<u64>(),
        initial in any::<u64>(),
    ) {
        let p = DispatchParams { at, table, bits, target, initial };
        let stub = dispatch_stub(&p).unwrap();
        let flow = check_structure(&p, &stub);
        // Everything up to the literals decodes as the reachable instructions.
        let code_end = flow.instrs.values().map(Instruction::next_ip).max().unwrap();
        let linear: Vec<u64> = Decoder::with_ip(
            64,
            &stub.bytes[..(code_end - at) as usize],
            at,
            DecoderOptions::NONE,
        )
        .into_iter()
        .map(|i| i.ip())
        .collect();
        prop_assert_eq!(linear, flow.instrs.keys().copied().collect::<Vec<_>>());
        // Then int3 padding, and the three literals (target, initial, the
        // trap switch).
        prop_assert!(stub.bytes[(code_end - at) as usize..stub.bytes.len() - 24]
            .iter()
            .all(|&b| b == 0xCC));
        prop_assert_eq!(stub.trap_switch, at + stub.bytes.len() as u64 - 8);
    }
}

// ---------------------------------------------------------------------------
// Execution

#[test]
fn absent_present_tombstoned() {
    let tp = thread_pointer();
    assert!(tp != 0 && tp % 16 == 0, "thread pointer {tp:#x}");
    for bits in [4, 5, 8, 12, 16] {
        let empty = Harness::with_tps(bits, &[]);
        assert_eq!(empty.call(ARGS), "target");

        let present = Harness::with_tps(bits, &[tp]);
        assert_eq!(present.call(ARGS), "initial");
        assert_eq!(present.call([1, 2, 3, 4, 5, 6]), "initial");

        let mut slots = present.slots.clone();
        table_remove(&mut slots, bits, tp).unwrap();
        let removed = Harness::new(bits, slots);
        assert_eq!(removed.call(ARGS), "target");

        // Other threads' entries only.
        let others: Vec<u64> = (1..=5).map(|i| tp.wrapping_add(i * 0x80_1000)).collect();
        assert_eq!(Harness::with_tps(bits, &others).call(ARGS), "target");
    }
}

#[test]
fn trap_switch_off_sends_pending_threads_to_initial_without_the_trap() {
    let tp = thread_pointer();
    for bits in [4, 12] {
        let mut slots = vec![0; 1 << bits];
        assert!(table_insert(&mut slots, bits, tp));
        let quiet = Harness::with_switch(bits, slots.clone(), false);
        assert_eq!(quiet.call(ARGS), "initial");
        assert_eq!(quiet.call([1, 2, 3, 4, 5, 6]), "initial");
        table_remove(&mut slots, bits, tp).unwrap();
        assert_eq!(
            Harness::with_switch(bits, slots, false).call(ARGS),
            "target"
        );
    }
}

#[test]
fn quarantine_sends_threads_not_in_the_table_to_initial() {
    let tp = thread_pointer();
    for bits in [4, 12] {
        // Empty home slot (fast path) and a chain without us.
        let empty = vec![0; 1 << bits];
        let q = Harness::with_bytes(bits, empty.clone(), false, true);
        assert_eq!(q.call(ARGS), "initial");
        assert_eq!(
            Harness::with_bytes(bits, empty, false, false).call(ARGS),
            "target"
        );
        let home = table_index(tp, bits);
        let mut slots = vec![0; 1 << bits];
        slots[home] = colliding(tp, bits, home).next().unwrap();
        assert_eq!(
            Harness::with_bytes(bits, slots.clone(), false, true).call(ARGS),
            "initial"
        );
        assert_eq!(
            Harness::with_bytes(bits, slots.clone(), false, false).call(ARGS),
            "target"
        );
        // A thread in the table is pending either way.
        assert!(table_insert(&mut slots, bits, tp));
        assert_eq!(
            Harness::with_bytes(bits, slots, false, true).call(ARGS),
            "initial"
        );
    }
}

#[test]
fn probe_past_entries_and_tombstones() {
    let tp = thread_pointer();
    for bits in [4, 16] {
        let n = 1usize << bits;
        let home = table_index(tp, bits);
        let fakes: Vec<u64> = colliding(tp, bits, home).take(4).collect();
        let mut slots = vec![0; n];
        slots[home] = fakes[0];
        slots[(home + 1) % n] = fakes[1] | TOMBSTONE_BIT;
        slots[(home + 2) % n] = fakes[2];
        slots[(home + 3) % n] = tp | TOMBSTONE_BIT; // an old removal of tp itself
        slots[(home + 4) % n] = fakes[3] | TOMBSTONE_BIT;
        slots[(home + 5) % n] = tp;
        assert_eq!(table_find(&slots, bits, tp), Some((home + 5) % n));
        let h = Harness::new(bits, slots.clone());
        assert_eq!(h.call(ARGS), "initial");
        // The colliding entries are found too (by the helpers the stub mirrors).
        assert_eq!(table_find(&slots, bits, fakes[2]), Some((home + 2) % n));

        // Tombstone tp: the probe goes on to the empty slot after it.
        table_remove(&mut slots, bits, tp).unwrap();
        assert_eq!(Harness::new(bits, slots.clone()).call(ARGS), "target");

        // An empty slot before tp ends the probe: tp is unreachable.
        slots[(home + 5) % n] = tp;
        slots[(home + 2) % n] = 0;
        assert_eq!(Harness::new(bits, slots).call(ARGS), "target");
    }
}

#[test]
fn full_table_wraps_around() {
    let tp = thread_pointer();
    // A table size where tp's home is not slot 0, so the chain wraps.
    let bits = TABLE_BITS
        .clone()
        .take(4)
        .find(|&b| table_index(tp, b) != 0)
        .unwrap();
    let n = 1usize << bits;
    let home = table_index(tp, bits);
    let filler = |i: usize| (0x10_0000 + 16 * i as u64) | (i as u64 & 1);
    let full: Vec<u64> = (0..n).map(filler).collect();

    // tp in the very last slot of its probe (home - 1, after wrapping).
    let mut slots = full.clone();
    slots[(home + n - 1) % n] = tp;
    assert_eq!(Harness::new(bits, slots.clone()).call(ARGS), "initial");
    // Removed: every slot is probed once and the stub gives up.
    slots[(home + n - 1) % n] |= TOMBSTONE_BIT;
    assert_eq!(Harness::new(bits, slots).call(ARGS), "target");
    // Full of other entries and tombstones: terminates, not pending.
    assert_eq!(Harness::new(bits, full).call(ARGS), "target");
    // All tombstones.
    assert_eq!(Harness::new(bits, vec![tp | 1; n]).call(ARGS), "target");

    // A partial chain running off the end of the table.
    let mut slots = vec![0; n];
    for k in 0..(n - home) + 2 {
        slots[(home + k) % n] = filler(k);
    }
    slots[(home + (n - home) + 2) % n] = tp;
    assert_eq!(table_find(&slots, bits, tp), Some(2));
    assert_eq!(Harness::new(bits, slots).call(ARGS), "initial");
}

#[test]
fn several_threads() {
    const THREADS: usize = 8;
    for bits in [4, 16] {
        let barrier = Barrier::new(THREADS + 1);
        let tps: Vec<OnceLock<u64>> = (0..THREADS).map(|_| OnceLock::new()).collect();
        let harness: OnceLock<Harness> = OnceLock::new();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..THREADS)
                .map(|i| {
                    let (barrier, tps, harness) = (&barrier, &tps, &harness);
                    s.spawn(move || {
                        tps[i].set(thread_pointer()).unwrap();
                        barrier.wait();
                        barrier.wait();
                        let h = harness.get().unwrap();
                        let mut seen = BTreeSet::new();
                        for k in 0..2000u64 {
                            seen.insert(h.call([k, i as u64, k * 7, !k, 5, k ^ 0xFF]));
                        }
                        seen
                    })
                })
                .collect();
            barrier.wait();
            let pending: Vec<u64> = tps.iter().step_by(2).map(|t| *t.get().unwrap()).collect();
            assert!(harness.set(Harness::with_tps(bits, &pending)).is_ok());
            barrier.wait();
            for (i, h) in handles.into_iter().enumerate() {
                let seen = h.join().unwrap();
                let want = if i % 2 == 0 { "initial" } else { "target" };
                assert_eq!(seen, BTreeSet::from([want]), "thread {i}, bits {bits}");
            }
        });
    }
}

/// Registers as seen at the entry of the function the stub jumped to.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Regs {
    rax: u64,
    rbx: u64,
    rcx: u64,
    rdx: u64,
    rsi: u64,
    rdi: u64,
    rbp: u64,
    r8: u64,
    r9: u64,
    r10: u64,
    r12: u64,
    r13: u64,
    r14: u64,
    r15: u64,
    rsp: u64,
    ret: u64,
}

const SNAP_WORDS: usize = 16;

/// Code storing every register into `buf` (through r11, which the stub may
/// clobber), then returning `tag` in rax.
fn snapshot_fn(at: u64, buf: u64, tag: u32) -> Vec<u8> {
    use iced_x86::code_asm::*;
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(r11, buf).unwrap();
    let regs = [
        rax, rbx, rcx, rdx, rsi, rdi, rbp, r8, r9, r10, r12, r13, r14, r15, rsp,
    ];
    for (i, r) in regs.into_iter().enumerate() {
        a.mov(qword_ptr(r11 + 8 * i as i32), r).unwrap();
    }
    a.mov(rax, qword_ptr(rsp)).unwrap();
    a.mov(qword_ptr(r11 + 8 * 15), rax).unwrap();
    a.mov(eax, tag).unwrap();
    a.ret().unwrap();
    a.assemble(at).unwrap()
}

/// Calls a stub built for `slots` from inline asm with every register set,
/// targets being [`snapshot_fn`]s; returns (value returned, registers at the
/// target's entry, expected registers).
fn call_with_registers(bits: u32, slots: &[u64]) -> (u64, Regs, Regs) {
    let mut buf = vec![0u64; SNAP_WORDS];
    let mut exec = Exec::new();
    let base = exec.addr();
    let bufp = buf.as_mut_ptr() as u64;
    let (target, initial) = (base + 0x400, base + 0x600);
    exec.write(0x400, &snapshot_fn(target, bufp, 1));
    exec.write(0x600, &snapshot_fn(initial, bufp, 2));
    let p = DispatchParams {
        at: base,
        table: slots.as_ptr() as u64,
        bits,
        target,
        initial,
    };
    exec.write(0, &dispatch_stub(&p).unwrap().bytes);
    exec.seal();

    let mut want = Regs {
        rax: 0x0A0A_0000_0000_0001,
        rbx: 0x0B0B_0000_0000_0002,
        rcx: 0x0C0C_0000_0000_0003,
        rdx: 0x0D0D_0000_0000_0004,
        rsi: 0x0E0E_0000_0000_0005,
        rdi: 0x0F0F_0000_0000_0006,
        rbp: 0x1010_0000_0000_0007,
        r8: 0x0808_0000_0000_0008,
        r9: 0x0909_0000_0000_0009,
        r10: 0x1A1A_0000_0000_000A,
        r12: 0x1C1C_0000_0000_000C,
        r13: 0x1D1D_0000_0000_000D,
        r14: 0x1E1E_0000_0000_000E,
        r15: 0x1F1F_0000_0000_000F,
        ..Regs::default()
    };
    let (ret, rsp_after, ra, r12, r13, r14, r15): (u64, u64, u64, u64, u64, u64, u64);
    // SAFETY: calls the stub like a function (stack aligned as asm! guarantees
    // without `nostack`, then two pushes). rbx and rbp are saved and restored
    // around the call; every other register is an operand. The targets only
    // write `buf` (alive) and r11/rax, and return normally.
    unsafe {
        asm!(
            "push rbx",
            "push rbp",
            "mov rbx, {rbx}",
            "mov rbp, {rbp}",
            "call r11",
            "2:",
            "lea rdx, [rip + 2b]",
            "mov rcx, rsp",
            "pop rbp",
            "pop rbx",
            rbx = const 0x0B0B_0000_0000_0002u64,
            rbp = const 0x1010_0000_0000_0007u64,
            in("r11") base,
            inout("rax") want.rax => ret,
            inout("rcx") want.rcx => rsp_after,
            inout("rdx") want.rdx => ra,
            inout("rsi") want.rsi => _,
            inout("rdi") want.rdi => _,
            inout("r8") want.r8 => _,
            inout("r9") want.r9 => _,
            inout("r10") want.r10 => _,
            inout("r12") want.r12 => r12,
            inout("r13") want.r13 => r13,
            inout("r14") want.r14 => r14,
            inout("r15") want.r15 => r15,
            clobber_abi("C"),
        );
    }
    assert_eq!(
        [r12, r13, r14, r15],
        [want.r12, want.r13, want.r14, want.r15]
    );
    want.rsp = rsp_after - 8;
    want.ret = ra;
    // SAFETY: `buf` is alive; the target wrote it through a raw address.
    let w: Vec<u64> = (0..SNAP_WORDS)
        .map(|i| unsafe { std::ptr::read_volatile(buf.as_ptr().add(i)) })
        .collect();
    let got = Regs {
        rax: w[0],
        rbx: w[1],
        rcx: w[2],
        rdx: w[3],
        rsi: w[4],
        rdi: w[5],
        rbp: w[6],
        r8: w[7],
        r9: w[8],
        r10: w[9],
        r12: w[10],
        r13: w[11],
        r14: w[12],
        r15: w[13],
        rsp: w[14],
        ret: w[15],
    };
    drop(buf);
    (ret, got, want)
}

#[test]
fn registers_survive_every_path() {
    let tp = thread_pointer();
    let bits = 6;
    let n = 1usize << bits;
    let home = table_index(tp, bits);
    let fake = colliding(tp, bits, home).next().unwrap();

    let empty = vec![0; n];
    let mut pending = vec![0; n];
    table_insert(&mut pending, bits, tp);
    let mut collision = vec![0; n];
    collision[home] = fake;
    let mut pending_second = collision.clone();
    pending_second[(home + 1) % n] = tp;
    let mut switched = pending.clone();
    table_remove(&mut switched, bits, tp);

    for (name, slots, tag) in [
        ("fast path", &empty, 1),
        ("collision, not pending", &collision, 1),
        ("own tombstone", &switched, 1),
        ("pending", &pending, 2),
        ("pending after a collision", &pending_second, 2),
    ] {
        let (ret, got, want) = call_with_registers(bits, slots);
        assert_eq!(ret, tag, "{name}: wrong function");
        assert_eq!(got.rax, want.rax, "{name}: rax");
        assert_eq!(got.r10, want.r10, "{name}: r10");
        assert_eq!(got, want, "{name}");
    }
}
