//! Unwinding synthetic stacks through generated code with a hand-built
//! `.eh_frame` (no process needed): the caller's `Special` classifications,
//! each reason for an unreliable unwind, and corrupt stacks.

use std::collections::HashMap;

use gimli::write::{
    Address, CallFrameInstruction as I, CommonInformationEntry, EhFrame, EndianVec, Expression,
    FrameDescriptionEntry, FrameTable,
};
use gimli::{Encoding, Format, LittleEndian, X86_64};
use suture_unwind::{Outcome, Regs, Special, Unwind, Unwinder, MAX_FRAMES};

const CODE: (u64, u64) = (0x10000, 0x11000);
const EH_FRAME: u64 = 0x20000;
/// CFI: RA undefined (the outermost function).
const START: u64 = 0x10000;
/// CFA = rsp + 8 throughout.
const LEAF: u64 = 0x10040;
/// push rbp (1 byte); mov rsp, rbp (3 bytes): then CFA = rbp + 16.
const BODY: u64 = 0x10080;
/// sub $16, rsp (4 bytes): then CFA = rsp + 24.
const ORIG: u64 = 0x10100;
/// CFA by a DWARF expression.
const EXPR: u64 = 0x10140;
/// A signal trampoline (CIE augmentation `S`).
const SIG: u64 = 0x10180;
/// 0x101c0..0x10200: no FDE.
const GAP: u64 = 0x101c0;
/// A CIE that gives no rule for the return address.
const NORA: u64 = 0x10200;

/// CFA = rsp + 12: framehop's fast path rounds it to rsp + 8.
const ODD: u64 = 0x10240;
/// rbp explicitly undefined.
const NOBP: u64 = 0x10280;

/// Generated code outside any module.
const STUB: u64 = 0x50000;
const TRAMP: u64 = 0x60000;
const SP: u64 = 0x7000_0000;

fn eh_frame() -> Vec<u8> {
    let encoding = Encoding {
        format: Format::Dwarf32,
        version: 1,
        address_size: 8,
    };
    let cie = |ra_rule: bool, signal: bool| {
        let mut c = CommonInformationEntry::new(encoding, 1, -8, X86_64::RA);
        c.add_instruction(I::Cfa(X86_64::RSP, 8));
        if ra_rule {
            c.add_instruction(I::Offset(X86_64::RA, -8));
        }
        c.signal_trampoline = signal;
        c
    };
    let mut table = FrameTable::default();
    let normal = table.add_cie(cie(true, false));
    let signal = table.add_cie(cie(true, true));
    let no_ra = table.add_cie(cie(false, false));
    let fde = |start: u64, insns: Vec<(u32, I)>| {
        let mut f = FrameDescriptionEntry::new(Address::Constant(start), 0x40);
        for (at, i) in insns {
            f.add_instruction(at, i);
        }
        f
    };
    table.add_fde(normal, fde(START, vec![(0, I::Undefined(X86_64::RA))]));
    table.add_fde(normal, fde(LEAF, vec![]));
    table.add_fde(
        normal,
        fde(
            BODY,
            vec![
                (1, I::CfaOffset(16)),
                (1, I::Offset(X86_64::RBP, -16)),
                (4, I::CfaRegister(X86_64::RBP)),
            ],
        ),
    );
    table.add_fde(normal, fde(ORIG, vec![(4, I::CfaOffset(24))]));
    let mut deref = Expression::new();
    deref.op_breg(X86_64::RSP, 8);
    deref.op_deref();
    table.add_fde(normal, fde(EXPR, vec![(0, I::CfaExpression(deref))]));
    table.add_fde(signal, fde(SIG, vec![]));
    table.add_fde(no_ra, fde(NORA, vec![]));
    table.add_fde(normal, fde(ODD, vec![(0, I::CfaOffset(12))]));
    table.add_fde(normal, fde(NOBP, vec![(0, I::Undefined(X86_64::RBP))]));
    let mut out = EhFrame(EndianVec::new(LittleEndian));
    table.write_eh_frame(&mut out).unwrap();
    let mut bytes = out.0.into_vec();
    bytes.extend_from_slice(&[0; 4]);
    bytes
}

fn unwinder() -> Unwinder {
    let mut u = Unwinder::new();
    u.add_code("gen", CODE, eh_frame(), EH_FRAME).unwrap();
    u
}

fn none(_: u64) -> Special {
    Special::None
}

fn run(
    u: &Unwinder,
    regs: Regs,
    mem: &HashMap<u64, u64>,
    special: &dyn Fn(u64) -> Special,
) -> Unwind {
    u.unwind(regs, &mut |a| mem.get(&a).copied(), special)
}

fn regs(pc: u64, sp: u64, bp: u64) -> Regs {
    Regs { pc, sp, bp }
}

fn why(u: &Unwind) -> &str {
    match &u.outcome {
        Outcome::Unreliable(w) => w,
        Outcome::Complete => panic!("expected an unreliable unwind: {u:#x?}"),
    }
}

fn pcs(u: &Unwind) -> Vec<u64> {
    u.frames.iter().map(|f| f.pc).collect()
}

#[test]
fn pushed_stub_then_cfi_down_to_the_outermost_frame() {
    let u = unwinder();
    // The stub pushed 2 words; its caller is ORIG after the `sub` (CFA = sp + 24).
    let mem = HashMap::from([(SP + 16, ORIG + 0x21), (SP + 24 + 16, START + 0x11)]);
    let special = |a: u64| {
        if a == STUB {
            Special::Pushed(2)
        } else {
            Special::None
        }
    };
    let r = run(&u, regs(STUB, SP, 0x1234), &mem, &special);
    assert_eq!(r.outcome, Outcome::Complete, "{r:#x?}");
    assert_eq!(pcs(&r), [STUB, ORIG + 0x21, START + 0x11]);
    let sps: Vec<u64> = r.frames.iter().map(|f| f.sp).collect();
    assert_eq!(sps, [SP, SP + 24, SP + 48]);
    let lookups: Vec<u64> = r.frames.iter().map(|f| f.lookup).collect();
    assert_eq!(lookups, [STUB, ORIG + 0x20, START + 0x10]);
    // Without the classification the stub is unknown code.
    let r = run(&u, regs(STUB, SP, 0), &mem, &none);
    assert!(why(&r).contains("no known module"), "{}", why(&r));
}

#[test]
fn as_maps_a_relocated_copy_to_the_original() {
    let u = unwinder();
    // LEAF returns into a relocated copy of ORIG's first instructions, at
    // the instruction that corresponds to ORIG + 8.
    let mem = HashMap::from([(SP, TRAMP + 9), (SP + 8 + 16, START + 0x11)]);
    let special = |a: u64| {
        if (TRAMP..TRAMP + 0x10).contains(&a) {
            Special::As(ORIG + (a - TRAMP))
        } else {
            Special::None
        }
    };
    let r = run(&u, regs(LEAF + 4, SP, 0), &mem, &special);
    assert_eq!(r.outcome, Outcome::Complete, "{r:#x?}");
    assert_eq!(pcs(&r), [LEAF + 4, TRAMP + 9, START + 0x11]);
    assert_eq!(r.frames[1].lookup, TRAMP + 8);
    assert_eq!(r.frames[2].sp, SP + 8 + 24);

    let r = run(&u, regs(LEAF + 4, SP, 0), &mem, &none);
    assert_eq!(r.frames.len(), 2);
    assert!(
        why(&r).starts_with("frame 1 at 0x60008 lies in no known module"),
        "{}",
        why(&r)
    );
}

#[test]
fn special_unreliable_stops_the_walk() {
    let u = unwinder();
    let mem = HashMap::from([(SP, STUB + 1)]);
    let special = |a: u64| {
        if a == STUB {
            Special::Unreliable("inside a dispatch stub")
        } else {
            Special::None
        }
    };
    let r = run(&u, regs(LEAF, SP, 0), &mem, &special);
    assert_eq!(why(&r), "frame 1 at 0x50000: inside a dispatch stub");
    assert_eq!(pcs(&r), [LEAF, STUB + 1]);
}

#[test]
fn frame_pointer_based_cfa() {
    let u = unwinder();
    let bp = SP + 0x40;
    let mem = HashMap::from([(bp, 0x5555), (bp + 8, START + 1)]);
    let r = run(&u, regs(BODY + 0x10, SP, bp), &mem, &none);
    assert_eq!(r.outcome, Outcome::Complete, "{r:#x?}");
    assert_eq!(pcs(&r), [BODY + 0x10, START + 1]);
    assert_eq!(r.frames[1].sp, bp + 16);
}

#[test]
fn zero_return_address_ends_the_stack() {
    let u = unwinder();
    let mem = HashMap::from([(SP, 0)]);
    let r = run(&u, regs(LEAF + 2, SP, 0), &mem, &none);
    assert_eq!(r.outcome, Outcome::Complete);
    assert_eq!(pcs(&r), [LEAF + 2]);
}

#[test]
fn outermost_frame_at_frame_zero() {
    let u = unwinder();
    let r = run(&u, regs(START, SP, 0), &HashMap::new(), &none);
    assert_eq!(r.outcome, Outcome::Complete);
    assert_eq!(r.frames.len(), 1);
}

#[test]
fn each_reason_for_an_unreliable_unwind() {
    let u = unwinder();
    let empty = HashMap::new();
    let case = |pc: u64, bp: u64, mem: &HashMap<u64, u64>| {
        why(&run(&u, regs(pc, SP, bp), mem, &none)).to_string()
    };

    assert!(case(SIG + 3, 0, &empty).contains("signal frame"));
    assert!(case(EXPR, 0, &empty).contains("DWARF expression"));
    assert_eq!(
        case(GAP + 1, 0, &empty),
        "frame 0 at 0x101c1 (gen+0x101c1) has no CFI"
    );
    assert!(case(NORA, 0, &empty).contains("no rule for the return address"));
    assert!(case(LEAF, 0, &empty).contains("unreadable at 0x70000000"));
    assert!(case(0, 0, &empty).contains("no known module"));
    // CFA = rbp + 16 below the stack pointer.
    let low = HashMap::from([(SP - 0x100 + 8, START + 1), (SP - 0x100, 0)]);
    let w = case(BODY + 0x10, SP - 0x100, &low);
    assert!(w.contains("stack pointer does not increase"), "{w}");
    // framehop and our reading of the CFI must agree.
    let w = case(
        ODD,
        0,
        &HashMap::from([(SP + 4, START + 1), (SP, START + 1)]),
    );
    assert!(w.contains("framehop and the CFI disagree"), "{w}");
    // A CFA computed from an rbp that a callee's CFI lost.
    let w = case(NOBP, SP, &HashMap::from([(SP, BODY + 0x11)]));
    assert!(
        w.contains("frame 1") && w.contains("rbp, which could not be recovered"),
        "{w}"
    );
    // A return address into nowhere.
    let w = case(LEAF, 0, &HashMap::from([(SP, 0xdead_beef)]));
    assert!(
        w.starts_with("frame 1 at 0xdeadbeee lies in no known module"),
        "{w}"
    );
}

#[test]
fn too_many_frames() {
    let u = unwinder();
    // Every word returns into LEAF again: an endless chain.
    let r = u.unwind(regs(LEAF + 4, SP, 0), &mut |_| Some(LEAF + 5), &none);
    assert_eq!(r.frames.len(), MAX_FRAMES);
    assert!(why(&r).contains("more than 1024 frames"), "{}", why(&r));
}

#[test]
fn pushed_overflow_is_unreliable() {
    let u = unwinder();
    let r = u.unwind(regs(STUB, u64::MAX - 8, 0), &mut |_| Some(1), &|_| {
        Special::Pushed(usize::MAX)
    });
    assert!(why(&r).contains("overflows"), "{}", why(&r));
}

/// xorshift64*: deterministic pseudo-random numbers.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn check_invariants(r: &Unwind) {
    assert!(!r.frames.is_empty() && r.frames.len() <= MAX_FRAMES);
    assert!(r.frames.windows(2).all(|w| w[0].sp < w[1].sp), "{r:#x?}");
}

#[test]
fn random_stacks_are_unreliable_and_never_panic() {
    let u = unwinder();
    let starts = [LEAF, BODY, ORIG, EXPR, SIG, GAP, NORA];
    for seed in 1..3000u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let pc = match rng.below(3) {
            0 => rng.next(),
            _ => starts[rng.below(starts.len() as u64) as usize] + rng.below(0x40),
        };
        let (sp, bp) = (rng.next(), rng.next());
        let mut mem_rng = Rng(rng.next() | 1);
        let r = u.unwind(
            regs(pc, sp, bp),
            &mut |_| (mem_rng.below(8) != 0).then(|| mem_rng.next()),
            &none,
        );
        check_invariants(&r);
        assert!(!r.is_complete(), "seed {seed}: {r:#x?}");
    }
}

#[test]
fn plausible_garbage_never_panics() {
    // Stack words that are often code addresses, stack addresses or zero:
    // whatever the outcome, the walk stays consistent.
    let u = unwinder();
    let mut complete = 0;
    for seed in 1..3000u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let sp = SP + rng.below(0x1000) * 8;
        let pc = CODE.0 + rng.below(0x240);
        let mut mem_rng = Rng(rng.next() | 1);
        let mut read = |a: u64| match mem_rng.below(6) {
            0 => Some(CODE.0 + mem_rng.below(0x240)),
            1 => Some(a.wrapping_add(mem_rng.below(64) * 8)),
            2 => Some(0),
            3 => None,
            _ => Some(mem_rng.next()),
        };
        let special = |a: u64| match a % 7 {
            0 => Special::Pushed((a % 5) as usize),
            1 => Special::As(a ^ 0x30),
            _ => Special::None,
        };
        let r = u.unwind(regs(pc, sp, rng.next()), &mut read, &special);
        check_invariants(&r);
        complete += usize::from(r.is_complete());
    }
    assert!(
        complete > 0,
        "some walks should reach START or a zero return address"
    );
}

#[test]
fn bad_modules_are_refused() {
    let mut u = unwinder();
    // Overlapping code.
    assert!(u
        .add_code("again", (0x10800, 0x12000), eh_frame(), EH_FRAME)
        .is_err());
    // FDEs outside the code they come with.
    assert!(u
        .add_code("small", (0x30000, 0x30010), eh_frame(), EH_FRAME)
        .is_err());
    // Not ELF; no ranges.
    assert!(u
        .add_object("junk", b"not an elf file", 0, &[(0x90000, 0x91000)])
        .is_err());
    let me = std::fs::read("/proc/self/exe").unwrap();
    assert!(u.add_object("me", &me, 0, &[]).is_err());
    // Corrupt .eh_frame.
    let mut bad = eh_frame();
    bad[4..8].copy_from_slice(&[0xff; 4]);
    bad.truncate(bad.len() - 20);
    let e = u
        .add_code("bad", (0x40000, 0x41000), bad, 0x42000)
        .unwrap_err();
    assert!(e.to_string().starts_with("bad: malformed .eh_frame"), "{e}");
}

#[test]
fn unwinder_can_be_shared_between_threads() {
    fn shared<T: Send + Sync>(_: &T) {}
    shared(&unwinder());
}
