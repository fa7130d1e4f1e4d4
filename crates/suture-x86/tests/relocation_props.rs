//! Property tests: a relocated copy of a patch site behaves as the original.
//!
//! Function bodies are sequences of real instructions: any instruction iced
//! decodes from random bytes, plus the kinds relocation has to rewrite
//! (relative branches of every form, RIP- and EIP-relative operands, some
//! followed by an immediate, VEX and EVEX ones) aimed at the interesting
//! addresses around the site: its start, inside it, its end, and far away.
//! The site is planned at address A, its instructions relocated to address
//! B, and `suture_x86::fuzzing::check_relocation` decodes the original and
//! the copy and checks that they are equivalent (see its documentation for
//! the rewrites it accepts), that the copy jumps back to the resume address
//! and that the resume map points at the copies.

use iced_x86::{Decoder, DecoderOptions, Instruction, OpKind};
use proptest::prelude::*;
use suture_x86::fuzzing::{check_plan, check_relocation, fuzz_plan, PLAN_HEADER};
use suture_x86::{plan_site, NoMemory, PlanError, ENDBR64};

/// Where a branch or a RIP-relative operand points.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// Function start + k (the site, its inside, its end, a bit further).
    Near(i64),
    /// A raw displacement: anywhere in rel8/rel16/rel32 range.
    Raw(i32),
}

/// One instruction of a generated body.
#[derive(Debug, Clone)]
enum Piece {
    /// The first instruction iced decodes from these bytes.
    Decoded([u8; 15]),
    /// jcc (condition 0..16), short or near.
    Jcc(u8, bool, Target),
    /// jmp, short or near.
    Jmp(bool, Target),
    CallRel(Target),
    /// loop/loope/loopne/jrcxz (0..4), optionally with a 0x67 prefix (ecx).
    LoopLike(u8, bool, Target),
    /// xbegin rel32 or (with 0x66) rel16.
    Xbegin(bool, Target),
    /// An instruction with a RIP-relative operand (index into RIP_FORMS),
    /// optionally with a 0x67 prefix (EIP-relative).
    RipRel(usize, bool, Target),
    /// A one-byte instruction that ends nothing (nop, push, pop, cld...).
    Short(u8),
}

/// (bytes before the disp32, bytes after it) of RIP-relative instructions.
const RIP_FORMS: &[(&[u8], &[u8])] = &[
    (&[0x8b, 0x05], &[]),                         // mov eax, [rip+d]
    (&[0x48, 0x8d, 0x3d], &[]),                   // lea rdi, [rip+d]
    (&[0x80, 0x3d], &[0x01]),                     // cmp byte [rip+d], 1
    (&[0xc7, 0x05], &[0x78, 0x56, 0x34, 0x12]),   // mov dword [rip+d], imm32
    (&[0x66, 0x81, 0x05], &[0x34, 0x12]),         // add word [rip+d], imm16
    (&[0xc5, 0xfe, 0x6f, 0x05], &[]),             // vmovdqu ymm0, [rip+d]
    (&[0x62, 0xf1, 0x7c, 0x48, 0x10, 0x05], &[]), // vmovups zmm0, [rip+d]
    (&[0x0f, 0x18, 0x0d], &[]),                   // prefetcht0 [rip+d]
    (&[0xf0, 0x48, 0x0f, 0xb1, 0x0d], &[]),       // lock cmpxchg [rip+d], rcx
    (&[0xff, 0x15], &[]),                         // call [rip+d]
    (&[0xff, 0x25], &[]),                         // jmp [rip+d]
    (&[0x0f, 0x1f, 0x05], &[]),                   // nop dword [rip+d]
    (&[0x2e, 0x48, 0x8b, 0x05], &[]),             // cs mov rax, [rip+d]
];

const SHORT: &[u8] = &[0x90, 0x50, 0x53, 0x55, 0x5b, 0x5d, 0xfc, 0xf8, 0x99, 0x98];

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        3 => (-16i64..48).prop_map(Target::Near),
        1 => any::<i32>().prop_map(Target::Raw),
        1 => any::<i8>().prop_map(|d| Target::Raw(d.into())),
    ]
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        4 => any::<[u8; 15]>().prop_map(Piece::Decoded),
        2 => (0u8..16, any::<bool>(), target()).prop_map(|(c, s, t)| Piece::Jcc(c, s, t)),
        1 => (any::<bool>(), target()).prop_map(|(s, t)| Piece::Jmp(s, t)),
        1 => target().prop_map(Piece::CallRel),
        1 => (0u8..4, any::<bool>(), target()).prop_map(|(k, e, t)| Piece::LoopLike(k, e, t)),
        1 => (any::<bool>(), target()).prop_map(|(s, t)| Piece::Xbegin(s, t)),
        3 => (0..RIP_FORMS.len(), prop::bool::weighted(0.15), target())
            .prop_map(|(f, e, t)| Piece::RipRel(f, e, t)),
        2 => (0..SHORT.len()).prop_map(|i| Piece::Short(SHORT[i])),
    ]
}

/// The displacement of `width` bytes that makes an instruction ending at
/// `next` point at `t` (None if out of range: the piece is dropped).
fn disp(func: u64, next: u64, t: Target, width: usize) -> Option<Vec<u8>> {
    let d = match t {
        Target::Near(k) => func.wrapping_add(k as u64).wrapping_sub(next) as i64,
        Target::Raw(d) => d.into(),
    };
    Some(match width {
        1 => i8::try_from(d).ok()?.to_le_bytes().to_vec(),
        2 => i16::try_from(d).ok()?.to_le_bytes().to_vec(),
        _ => i32::try_from(d).ok()?.to_le_bytes().to_vec(),
    })
}

/// Encodes `p` at `ip` (the body is built at `func`).
fn encode(func: u64, ip: u64, p: &Piece) -> Option<Vec<u8>> {
    let with = |head: &[u8], width: usize, tail: &[u8], t: Target| {
        let next = ip + (head.len() + width + tail.len()) as u64;
        let mut v = head.to_vec();
        v.extend(disp(func, next, t, width)?);
        v.extend_from_slice(tail);
        Some(v)
    };
    match *p {
        Piece::Decoded(bytes) => {
            let ins = Decoder::with_ip(64, &bytes, ip, DecoderOptions::NONE).decode();
            (!ins.is_invalid()).then(|| bytes[..ins.len()].to_vec())
        }
        Piece::Jcc(c, true, t) => with(&[0x70 | c], 1, &[], t),
        Piece::Jcc(c, false, t) => with(&[0x0f, 0x80 | c], 4, &[], t),
        Piece::Jmp(true, t) => with(&[0xeb], 1, &[], t),
        Piece::Jmp(false, t) => with(&[0xe9], 4, &[], t),
        Piece::CallRel(t) => with(&[0xe8], 4, &[], t),
        Piece::LoopLike(k, false, t) => with(&[0xe0 + k], 1, &[], t),
        Piece::LoopLike(k, true, t) => with(&[0x67, 0xe0 + k], 1, &[], t),
        Piece::Xbegin(false, t) => with(&[0xc7, 0xf8], 4, &[], t),
        Piece::Xbegin(true, t) => with(&[0x66, 0xc7, 0xf8], 2, &[], t),
        Piece::RipRel(f, eip, t) => {
            let (head, tail) = RIP_FORMS[f];
            let mut h = if eip { vec![0x67] } else { Vec::new() };
            h.extend_from_slice(head);
            with(&h, 4, tail, t)
        }
        Piece::Short(b) => Some(vec![b]),
    }
}

/// The body: optional endbr64, the pieces that encode, then `ret`.
fn build(func: u64, endbr: bool, pieces: &[Piece]) -> Vec<u8> {
    let mut code = if endbr { ENDBR64.to_vec() } else { Vec::new() };
    for p in pieces {
        if let Some(b) = encode(func, func + code.len() as u64, p) {
            code.extend(b);
        }
    }
    code.push(0xc3);
    code
}

fn func_addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0x40_1000u64),
        Just(0x7f12_3456_7000u64),
        (0x1000u64..0x7fff_ffff_0000).prop_map(|a| a & !0xF),
        Just(0xffff_ffff_ffff_ff00u64),
    ]
}

fn distance() -> impl Strategy<Value = i64> {
    prop_oneof![
        (-0x1000i64..0x1000),
        (-0x7fff_0000i64..0x7fff_0000),
        Just(0x1_0000_0000i64),
        Just(-0x8_0000_0000i64),
        any::<i64>(),
    ]
}

/// Plans `code` at `func` and checks the copy at `func + delta` (when the
/// relocation can be made at all).
fn check(func: u64, code: &[u8], delta: i64) -> Result<bool, TestCaseError> {
    let p = match plan_site(func, code, &NoMemory) {
        Ok(p) => p,
        Err(_) => return Ok(false),
    };
    check_plan(&p, func, code);
    // No decoded branch of the function targets the inside of the site.
    let mut dec = Decoder::with_ip(64, code, func, DecoderOptions::NONE);
    let mut ins = Instruction::default();
    while dec.can_decode() {
        dec.decode_out(&mut ins);
        let near = (0..ins.op_count()).any(|i| {
            matches!(
                ins.op_kind(i),
                OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
            )
        });
        prop_assert!(
            !near || !p.pc_inside_site(ins.near_branch_target()),
            "{ins} branches into the accepted site"
        );
    }
    let at = func.wrapping_add(delta as u64);
    match p.relocated_original_map(at) {
        Ok((copy, map)) => {
            if let Err(e) = check_relocation(&p, at, &copy, &map) {
                return Err(TestCaseError::fail(format!(
                    "site {:02x?} at {:#x} relocated to {at:#x}: {e}\ncopy {copy:02x?}",
                    p.original, p.site_addr
                )));
            }
            Ok(true)
        }
        Err(PlanError::RipRelativeOutOfRange { .. } | PlanError::Relocation { .. }) => Ok(false),
        Err(e) => Err(TestCaseError::fail(format!("unexpected error {e:?}"))),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn relocated_copy_is_equivalent(
        func in func_addr(),
        endbr in prop::bool::weighted(0.25),
        pieces in prop::collection::vec(piece(), 1..12),
        delta in distance(),
    ) {
        let code = build(func, endbr, &pieces);
        check(func, &code, delta)?;
    }

    /// Raw bytes (with the fuzz target's header: function address, distance).
    #[test]
    fn raw_bytes_relocate_correctly(data in prop::collection::vec(any::<u8>(), 0..PLAN_HEADER + 48)) {
        fuzz_plan(&data);
    }
}

/// The generator is useful: most generated bodies can be patched and
/// relocated, so the property above checks real copies.
#[test]
fn generator_mostly_relocates() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strat = (
        func_addr(),
        prop::collection::vec(piece(), 1..12),
        -0x1000i64..0x1000,
    );
    let mut relocated = 0;
    for _ in 0..500 {
        let (func, pieces, delta) = strat.new_tree(&mut runner).unwrap().current();
        if check(func, &build(func, false, &pieces), delta).unwrap() {
            relocated += 1;
        }
    }
    assert!(relocated > 100, "only {relocated} of 500 bodies relocated");
}
