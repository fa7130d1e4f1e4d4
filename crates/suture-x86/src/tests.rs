//! Unit tests with functions built by iced's code assembler.

use super::*;
use iced_x86::code_asm::*;
use iced_x86::{IcedError, MemoryOperand, Register};

pub(crate) const FUNC: u64 = 0x40_1000;

/// Memory made of a few (address, bytes) regions.
#[derive(Default, Clone, Debug)]
pub(crate) struct FakeMem(pub Vec<(u64, Vec<u8>)>);

impl Memory for FakeMem {
    fn read(&self, addr: u64, len: usize) -> Option<Vec<u8>> {
        self.0.iter().find_map(|(base, data)| {
            let start = addr.checked_sub(*base)? as usize;
            let end = start.checked_add(len)?;
            data.get(start..end).map(<[u8]>::to_vec)
        })
    }
}

pub(crate) fn asm(ip: u64, f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a).unwrap();
    a.assemble(ip).unwrap()
}

/// `mnemonic(s)` of an instruction with a RIP-relative memory operand at `target`.
fn rip_rel(code: Code, reg: Register, target: u64) -> Instruction {
    Instruction::with2(
        code,
        reg,
        MemoryOperand::with_base_displ(Register::RIP, target as i64),
    )
    .unwrap()
}

pub(crate) fn decode_all(ip: u64, bytes: &[u8]) -> Vec<Instruction> {
    Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE)
        .into_iter()
        .collect()
}

fn plan(code: &[u8]) -> Result<SitePlan, PlanError> {
    plan_site(FUNC, code, &NoMemory)
}

#[test]
fn plain_function() {
    let code = asm(FUNC, |a| {
        a.push(rbp)?;
        a.mov(rbp, rsp)?;
        a.sub(rsp, 0x10)?;
        a.mov(eax, 42)?;
        a.leave()?;
        a.ret()
    });
    let p = plan(&code).unwrap();
    assert_eq!(p.func_addr, FUNC);
    assert_eq!(p.site_addr, FUNC);
    assert!(!p.has_endbr());
    // push rbp (1) + mov rbp,rsp (3) + sub rsp,0x10 (4)
    assert_eq!(p.len, 8);
    assert_eq!(p.original, code[..8]);
    assert_eq!(p.instructions().len(), 3);
    assert_eq!(p.resume_addr(), FUNC + 8);
    assert!(!p.pc_inside_site(FUNC));
    assert!(p.pc_inside_site(FUNC + 1));
    assert!(p.pc_inside_site(FUNC + 7));
    assert!(!p.pc_inside_site(FUNC + 8));

    let to = FUNC + 0x10_0000;
    let jb = p.jump_bytes(to).unwrap();
    assert_eq!(jb.len(), 8);
    assert_eq!(&jb[5..], &[0xCC; 3]);
    let j = decode_all(FUNC, &jb[..5]);
    assert_eq!(j[0].code(), Code::Jmp_rel32_64);
    assert_eq!(j[0].near_branch_target(), to);

    let at = FUNC + 0x20_0000;
    let reloc = p.relocated_original(at).unwrap();
    assert!(reloc.len() <= p.max_relocated_len());
    assert_eq!(&reloc[..8], &code[..8]);
    let r = decode_all(at, &reloc);
    let codes: Vec<Code> = r.iter().map(Instruction::code).collect();
    assert_eq!(
        codes,
        [
            Code::Push_r64,
            Code::Mov_rm64_r64,
            Code::Sub_rm64_imm8,
            Code::Jmp_rel32_64
        ]
    );
    assert_eq!(r[3].near_branch_target(), FUNC + 8);
}

#[test]
fn endbr64_function() {
    let code = asm(FUNC, |a| {
        a.endbr64()?;
        a.xor(eax, eax)?;
        a.test(edi, edi)?;
        a.mov(ecx, 7)?;
        a.ret()
    });
    let p = plan(&code).unwrap();
    assert!(p.has_endbr());
    assert_eq!(p.site_offset(), 4);
    assert_eq!(p.site_addr, FUNC + 4);
    // xor (2) + test (2) + mov ecx, imm32 (5)
    assert_eq!(p.len, 9);
    assert_eq!(p.original, code[4..13]);
    let reloc = p.relocated_original(FUNC - 0x1000).unwrap();
    let r = decode_all(FUNC - 0x1000, &reloc);
    assert_eq!(r.last().unwrap().near_branch_target(), FUNC + 13);
    // endbr64 itself is not copied.
    assert!(r.iter().all(|i| i.code() != Code::Endbr64));
}

#[test]
fn too_small_functions() {
    // xor eax,eax; ret
    let code = asm(FUNC, |a| {
        a.xor(eax, eax)?;
        a.ret()
    });
    let e = plan(&code).unwrap_err();
    assert_eq!(
        e,
        PlanError::TooSmall {
            size: 3,
            endbr: false,
            spill_at: None
        }
    );
    assert_eq!(
        e.to_string(),
        "function is 3 bytes long; a patch site needs 5 bytes"
    );

    // endbr64; xor eax,eax; nop; ret  -> 4 bytes after endbr64
    let code = asm(FUNC, |a| {
        a.endbr64()?;
        a.xor(eax, eax)?;
        a.nop()?;
        a.ret()
    });
    let e = plan(&code).unwrap_err();
    assert_eq!(
        e.to_string(),
        "function is 8 bytes long; a patch site needs 5 bytes after the 4-byte endbr64"
    );

    // ret; mov eax, 1 cut after 5 bytes: the mov would spill past the end.
    let code = asm(FUNC, |a| {
        a.ret()?;
        a.mov(eax, 1)
    });
    let e = plan(&code[..5]).unwrap_err();
    assert_eq!(
        e,
        PlanError::TooSmall {
            size: 5,
            endbr: false,
            spill_at: Some(1)
        }
    );
    assert!(e.to_string().contains("instruction at +0x1"), "{e}");

    assert!(matches!(
        plan(&[]),
        Err(PlanError::TooSmall { size: 0, .. })
    ));
    assert!(matches!(
        plan(&ENDBR64),
        Err(PlanError::TooSmall {
            size: 4,
            endbr: true,
            ..
        })
    ));
}

#[test]
fn exactly_five_bytes() {
    let code = asm(FUNC, |a| a.jmp(0x50_0000u64));
    assert_eq!(code.len(), 5);
    let p = plan(&code).unwrap();
    assert_eq!(p.len, 5);
    assert_eq!(p.jump_bytes(FUNC + 100).unwrap().len(), 5);
    let at = FUNC + 0x3000;
    let r = decode_all(at, &p.relocated_original(at).unwrap());
    assert_eq!(r[0].near_branch_target(), 0x50_0000);
}

#[test]
fn loop_at_site_start_stays_inside_copy() {
    // L: dec ecx; jnz L; mov eax, 1; ret
    // The branch targets the site start itself (not strictly inside); after
    // patching only the relocated copy contains it, and the copy must loop
    // within itself.
    let code = asm(FUNC, |a| {
        let mut l = a.create_label();
        a.set_label(&mut l)?;
        a.dec(ecx)?;
        a.jnz(l)?;
        a.mov(eax, 1)?;
        a.ret()
    });
    let p = plan(&code).unwrap();
    assert_eq!(p.len, 9);
    let at = FUNC + 0x8000;
    let r = decode_all(at, &p.relocated_original(at).unwrap());
    let jne = r.iter().find(|i| i.mnemonic() == Mnemonic::Jne).unwrap();
    assert_eq!(jne.near_branch_target(), at);
    assert_eq!(r.last().unwrap().near_branch_target(), FUNC + 9);
}

#[test]
fn loop_into_site_rejected() {
    // push rbx; L: dec ecx; jnz L  -> jnz targets +0x1
    let code = asm(FUNC, |a| {
        let mut l = a.create_label();
        a.push(rbx)?;
        a.set_label(&mut l)?;
        a.dec(ecx)?;
        a.jnz(l)?;
        a.pop(rbx)?;
        a.ret()
    });
    let e = plan(&code).unwrap_err();
    assert_eq!(
        e.to_string(),
        "the instruction at +0x3 (jne) jumps to +0x1, inside the 5 bytes the jump would overwrite (+0x0..+0x5)"
    );
}

#[test]
fn branch_back_from_later_rejected() {
    // push rbx; push rbp; push r12 (+0x0..+0x4), then a loop body starting
    // at +0x4 whose closing jne jumps back to +0x4, inside the site +0x0..+0x5.
    let code = asm(FUNC, |a| {
        let mut l = a.create_label();
        a.push(rbx)?;
        a.push(rbp)?;
        a.push(r12)?; // 2 bytes: +0x2..+0x4
        a.set_label(&mut l)?;
        a.nop()?; // +0x4: loop head
        a.mov(eax, 1)?;
        a.mov(ecx, 2)?;
        a.mov(edx, 3)?;
        a.add(eax, ecx)?;
        a.add(eax, edx)?;
        a.dec(edi)?;
        a.jne(l)?;
        a.pop(r12)?;
        a.pop(rbp)?;
        a.pop(rbx)?;
        a.ret()
    });
    let e = plan(&code).unwrap_err();
    match &e {
        PlanError::BranchIntoSite {
            mnemonic,
            target,
            site,
            len,
            ..
        } => {
            assert_eq!(mnemonic, "jne");
            assert_eq!(*target, 4);
            assert_eq!((*site, *len), (0, 5));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        e.to_string().contains("jumps to +0x4, inside the 5 bytes"),
        "{e}"
    );

    // The same loop back to the site start (+0x0) is fine.
    let code = asm(FUNC, |a| {
        let mut l = a.create_label();
        a.set_label(&mut l)?;
        a.mov(eax, 1)?;
        a.mov(ecx, 2)?;
        a.dec(edi)?;
        a.jne(l)?;
        a.ret()
    });
    plan(&code).unwrap();
}

#[test]
fn branch_to_site_end_allowed() {
    // test edi,edi; je short +X to right after the site
    let code = asm(FUNC, |a| {
        let mut l = a.create_label();
        a.test(edi, edi)?; // 2
        a.je(l)?; // 2
        a.inc(eax)?; // 2
        a.set_label(&mut l)?;
        a.ret()
    });
    let p = plan(&code).unwrap();
    assert_eq!(p.len, 6);
    let at = FUNC + 0x9_0000;
    let r = decode_all(at, &p.relocated_original(at).unwrap());
    let je = r.iter().find(|i| i.mnemonic() == Mnemonic::Je).unwrap();
    // Targets either the relocated jump back or the original address directly.
    let t = je.near_branch_target();
    let back = r.last().unwrap();
    assert!(t == FUNC + 6 || t == back.ip(), "{t:#x}");
    assert_eq!(back.near_branch_target(), FUNC + 6);
}

#[test]
fn rip_relative_relocated() {
    const FUNC: u64 = 0x5555_0000_1000;
    let data = FUNC + 0x20_0040;
    let mut code = Vec::new();
    let mut enc = iced_x86::Encoder::new(64);
    let mut ip = FUNC;
    for ins in [
        rip_rel(Code::Mov_r32_rm32, Register::EAX, data),
        rip_rel(Code::Lea_r64_m, Register::RDX, data + 8),
        Instruction::with(Code::Retnq),
    ] {
        let n = enc.encode(&ins, ip).unwrap();
        ip += n as u64;
    }
    code.extend(enc.take_buffer());
    let p = plan_site(FUNC, &code, &NoMemory).unwrap();
    assert_eq!(p.len, 6); // mov eax, [rip+x] is 6 bytes
    for at in [FUNC + 0x7000_0000, FUNC - 0x7000_0000, FUNC + 0x10] {
        let reloc = p.relocated_original(at).unwrap();
        let r = decode_all(at, &reloc);
        assert_eq!(r[0].code(), Code::Mov_r32_rm32);
        assert!(r[0].is_ip_rel_memory_operand());
        assert_eq!(r[0].ip_rel_memory_address(), data);
        assert_eq!(r[1].near_branch_target(), FUNC + 6);
    }
    // 3 GiB away: the data is out of reach.
    let at = FUNC + 0xC000_0000;
    let e = p.relocated_original(at).unwrap_err();
    assert_eq!(
        e,
        PlanError::RipRelativeOutOfRange {
            offset: 0,
            mnemonic: "mov".into(),
            target: data,
            at
        }
    );
    assert!(e.to_string().contains("more than ±2 GiB"), "{e}");
}

/// Regression (found by the fuzz checker): the block encoder pointed a
/// RIP-relative operand that takes the site's own address at the copy, so
/// `f: lea rdi, [rip+f]; jmp register` registered the trampoline (the old
/// code) instead of `f`.
#[test]
fn own_address_survives_relocation() {
    const FUNC: u64 = 0x5555_0000_1000;
    let code = asm(FUNC, |a| {
        a.add_instruction(rip_rel(Code::Lea_r64_m, Register::RDI, FUNC))?;
        a.add_instruction(rip_rel(Code::Lea_r64_m, Register::RSI, FUNC))?;
        a.jmp(FUNC + 0x100)
    });
    let p = plan_site(FUNC, &code, &NoMemory).unwrap();
    assert_eq!(p.len, 7);
    // A branch back to the site start in the same copy still stays inside.
    let looping = asm(FUNC, |a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.dec(ecx)?;
        a.jne(top)?;
        a.add_instruction(rip_rel(Code::Lea_r64_m, Register::RDI, FUNC))?;
        a.ret()
    });
    let q = plan_site(FUNC, &looping, &NoMemory).unwrap();
    assert_eq!(q.instructions().len(), 3);
    for at in [FUNC + 0x7000_0000, FUNC - 0x7000_0000, FUNC + 0x10] {
        let r = decode_all(at, &p.relocated_original(at).unwrap());
        assert_eq!(r[0].code(), Code::Lea_r64_m);
        assert_eq!(r[0].ip_rel_memory_address(), FUNC);
        assert_eq!(r[1].near_branch_target(), FUNC + 7);

        let r = decode_all(at, &q.relocated_original(at).unwrap());
        assert_eq!(r[1].near_branch_target(), at);
        assert_eq!(r[2].code(), Code::Lea_r64_m);
        assert_eq!(r[2].ip_rel_memory_address(), FUNC);
    }
}

/// Regression (found by the relocation property test in a debug build):
/// the resume map added the copy's offsets to `at` without wrapping, an
/// overflow panic for a copy at the very top of the address space.
#[test]
fn resume_map_wraps_at_top_of_address_space() {
    const TOP: u64 = 0xffff_ffff_ffff_f000;
    let code = asm(TOP, |a| {
        a.push(rbp)?;
        a.mov(rbp, rsp)?;
        a.sub(rsp, 0x10)?;
        a.ret()
    });
    let p = plan_site(TOP, &code, &NoMemory).unwrap();
    let at = u64::MAX - 1;
    let (reloc, map) = p.relocated_original_map(at).unwrap();
    assert_eq!(map, vec![(TOP, at), (TOP + 1, u64::MAX), (TOP + 4, 2)]);
    let r = decode_all(at, &reloc);
    assert_eq!(r[0].code(), Code::Push_r64);
}

/// Regression (found by fuzzing x86_plan): iced's encoder drops the REX
/// prefix of 3DNow! instructions, so the copy of `pfadd mm0, [r8]` read
/// `[rax]`. The relocation now checks every copied instruction and refuses.
#[test]
fn unfaithful_reencoding_refused() {
    let code = [0x41, 0x0f, 0x0f, 0x00, 0x9e, 0xc3]; // pfadd mm0, [r8]; ret
    let p = plan(&code).unwrap();
    assert_eq!(p.len, 5);
    let e = p.relocated_original(FUNC + 0x1000).unwrap_err();
    assert!(matches!(e, PlanError::Relocation { .. }), "{e:?}");
    assert!(e.to_string().contains("not re-encoded faithfully"), "{e}");
    // The same instruction without REX copies fine.
    let code = [0x0f, 0x0f, 0x00, 0x9e, 0x90, 0xc3];
    let p = plan(&code).unwrap();
    let r = decode_all(FUNC + 0x1000, &p.relocated_original(FUNC + 0x1000).unwrap());
    assert_eq!(r[0].memory_base(), Register::RAX);
}

#[test]
fn short_jcc_becomes_near_jcc() {
    // test edi,edi; je short L (L far into the function); ...
    let code = asm(FUNC, |a| {
        let mut l = a.create_label();
        a.test(edi, edi)?; // 2
        a.je(l)?; // 2, short
        a.mov(eax, 1)?; // 5
        a.ret()?;
        a.set_label(&mut l)?;
        a.xor(eax, eax)?;
        a.ret()
    });
    assert_eq!(code[2], 0x74, "expected a short je");
    let target = FUNC + 10;
    let p = plan(&code).unwrap();
    assert_eq!(p.len, 9);
    let at = FUNC + 0x40_0000;
    let reloc = p.relocated_original(at).unwrap();
    let r = decode_all(at, &reloc);
    assert_eq!(r[1].code(), Code::Je_rel32_64);
    assert_eq!(r[1].near_branch_target(), target);
    assert_eq!(r[3].near_branch_target(), FUNC + 9);

    // Far away (beyond rel32): still correct, through absolute jumps.
    let at = FUNC + 0x1_0000_0000;
    let reloc = p.relocated_original(at).unwrap();
    assert!(reloc.len() <= p.max_relocated_len());
    let r = decode_all(at, &reloc);
    // jne short skip; jmp [rip+x] -> the pointer holds the target.
    assert_eq!(r[1].code(), Code::Jne_rel8_64);
    assert_eq!(r[2].code(), Code::Jmp_rm64);
    let slot = (r[2].ip_rel_memory_address() - at) as usize;
    let ptr = u64::from_le_bytes(reloc[slot..slot + 8].try_into().unwrap());
    assert_eq!(ptr, target);
}

#[test]
fn loop_and_jrcxz_relocate_far() {
    let code = asm(FUNC, |a| {
        let mut l = a.create_label();
        a.jrcxz(l)?; // 2
        a.loop_(l)?; // 2
        a.nop()?; // 1
        a.set_label(&mut l)?;
        a.ret()
    });
    let p = plan(&code).unwrap();
    assert_eq!(p.len, 5);
    for at in [FUNC + 0x1000, FUNC + 0x2_0000_0000] {
        let reloc = p.relocated_original(at).unwrap();
        assert!(
            reloc.len() <= p.max_relocated_len(),
            "{} > {}",
            reloc.len(),
            p.max_relocated_len()
        );
    }
}

/// A PIC `switch`: cmp edi,N; ja default; lea rdx,[rip+T]; movsxd rax,[rdx+rdi*4]; add rax,rdx; jmp rax
fn pic_switch(table: u64, pad_first: bool) -> (Vec<u8>, Vec<u64>) {
    let mut case_addrs = Vec::new();
    let code = asm(FUNC, |a| {
        let mut default = a.create_label();
        if pad_first {
            a.push(rbx)?;
        }
        a.cmp(edi, 3)?;
        a.ja(default)?;
        a.add_instruction(rip_rel(Code::Lea_r64_m, Register::RDX, table))?;
        a.movsxd(rax, dword_ptr(rdx + rdi * 4))?;
        a.add(rax, rdx)?;
        a.jmp(rax)?;
        for k in 0..4 {
            a.mov(eax, k)?;
            a.ret()?;
        }
        a.set_label(&mut default)?;
        a.xor(eax, eax)?;
        a.ret()
    });
    // Cases are the "mov eax, k; ret" blocks (6 bytes each) before the 3-byte default.
    let first_case = FUNC + code.len() as u64 - 3 - 4 * 6;
    for k in 0..4 {
        case_addrs.push(first_case + 6 * k);
    }
    (code, case_addrs)
}

fn rel_table(table: u64, targets: &[u64]) -> Vec<u8> {
    targets
        .iter()
        .flat_map(|t| (t.wrapping_sub(table) as i64 as i32).to_le_bytes())
        .collect()
}

#[test]
fn pic_jump_table() {
    let table = 0x60_2000;
    let (code, cases) = pic_switch(table, false);
    let instrs = sweep(FUNC, &code).instrs;
    let found = tables::find_jump_tables(&instrs);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].table, table);

    // All entries point to the cases: fine.
    let mem = FakeMem(vec![(table, rel_table(table, &cases))]);
    let p = plan_site(FUNC, &code, &mem).unwrap();
    assert_eq!(p.len, 5); // cmp edi,3 (3) + ja short (2)

    // Entry 2 points to +0x2, inside the site.
    let bad = [cases[0], cases[1], FUNC + 2, cases[3]];
    let mem = FakeMem(vec![(table, rel_table(table, &bad))]);
    let e = plan_site(FUNC, &code, &mem).unwrap_err();
    assert!(
        matches!(e, PlanError::JumpTableIntoSite { index: 2, target: 2, table: t, .. } if t == table),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .starts_with("entry 2 of the jump table at 0x602000"),
        "{e}"
    );

    // Reading stops at the first entry outside the function.
    let stop = [cases[0], 0x1234_5678, FUNC + 2];
    let mem = FakeMem(vec![(table, rel_table(table, &stop))]);
    plan_site(FUNC, &code, &mem).unwrap();

    // Unreadable table: nothing to check.
    plan_site(FUNC, &code, &NoMemory).unwrap();

    // A table too short for a 64-entry chunk read is still read entry by entry.
    let mem = FakeMem(vec![(table, rel_table(table, &bad[..3]))]);
    assert!(plan_site(FUNC, &code, &mem).is_err());
}

#[test]
fn abs_jump_table() {
    let table: u64 = 0x60_3000;
    let code = asm(FUNC, |a| {
        let mut default = a.create_label();
        a.cmp(edi, 2)?;
        a.ja(default)?;
        a.jmp(qword_ptr(rdi * 8 + 0x60_3000i32))?;
        a.mov(eax, 1)?;
        a.ret()?;
        a.mov(eax, 2)?;
        a.ret()?;
        a.set_label(&mut default)?;
        a.xor(eax, eax)?;
        a.ret()
    });
    let found = tables::find_jump_tables(&sweep(FUNC, &code).instrs);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].table, table);
    let entries = |t: &[u64]| t.iter().flat_map(|a| a.to_le_bytes()).collect::<Vec<u8>>();
    let case1 = FUNC + 12;
    let mem = FakeMem(vec![(table, entries(&[case1, case1 + 6]))]);
    plan_site(FUNC, &code, &mem).unwrap();
    let mem = FakeMem(vec![(table, entries(&[case1, FUNC + 3]))]);
    let e = plan_site(FUNC, &code, &mem).unwrap_err();
    assert!(
        matches!(
            e,
            PlanError::JumpTableIntoSite {
                index: 1,
                target: 3,
                ..
            }
        ),
        "{e:?}"
    );

    // mov rax, [rdi*8 + T]; jmp rax
    let code = asm(FUNC, |a| {
        a.cmp(edi, 2)?;
        a.mov(rax, qword_ptr(rdi * 8 + 0x60_3000i32))?;
        a.jmp(rax)?;
        a.ret()
    });
    let found = tables::find_jump_tables(&sweep(FUNC, &code).instrs);
    assert_eq!(found.len(), 1, "{found:?}");
    let mem = FakeMem(vec![(table, entries(&[FUNC + 1]))]);
    assert!(matches!(
        plan_site(FUNC, &code, &mem),
        Err(PlanError::JumpTableIntoSite { .. })
    ));
}

#[test]
fn clobbered_table_register_is_forgotten() {
    let code = asm(FUNC, |a| {
        a.add_instruction(rip_rel(Code::Lea_r64_m, Register::RDX, 0x60_2000))?;
        a.mov(edx, 5)?; // clobbers rdx
        a.movsxd(rax, dword_ptr(rdx + rdi * 4))?;
        a.add(rax, rdx)?;
        a.jmp(rax)
    });
    assert!(tables::find_jump_tables(&sweep(FUNC, &code).instrs).is_empty());
}

#[test]
fn call_in_middle_rejected() {
    let code = asm(FUNC, |a| {
        a.call(rax)?; // 2 bytes
        a.mov(eax, 1)?;
        a.ret()
    });
    let e = plan(&code).unwrap_err();
    assert_eq!(
        e,
        PlanError::CallNotLast {
            offset: 0,
            mnemonic: "call".into(),
            end: 7
        }
    );
    assert!(e.to_string().contains("return into the middle"), "{e}");
}

#[test]
fn call_as_last_instruction_accepted() {
    let callee = 0x50_0000u64;
    let code = asm(FUNC, |a| {
        a.sub(rsp, 8)?; // 4
        a.call(callee)?; // 5
        a.add(rsp, 8)?;
        a.ret()
    });
    let p = plan(&code).unwrap();
    assert_eq!(p.len, 9);
    let at = FUNC + 0x1_0000;
    let r = decode_all(at, &p.relocated_original(at).unwrap());
    assert_eq!(r[1].code(), Code::Call_rel32_64);
    assert_eq!(r[1].near_branch_target(), callee);
    assert_eq!(r[2].near_branch_target(), FUNC + 9);
    // Each overwritten instruction maps to its copy (where a thread stopped
    // between them is moved).
    let (_, map) = p.relocated_original_map(at).unwrap();
    assert_eq!(map, vec![(FUNC, r[0].ip()), (FUNC + 4, r[1].ip())]);
    // A thread returning from that call lands right after it in the copy.
    let reloc = p.relocated_original(at).unwrap();
    assert_eq!(crate::call_return_points(&reloc, at), vec![r[1].next_ip()]);
    // Code without calls has none.
    let no_call = plan(&asm(FUNC, |a| {
        a.push(rbp)?;
        a.mov(rbp, rsp)?;
        a.push(rbx)?;
        a.ret()
    }))
    .unwrap();
    assert!(crate::call_return_points(&no_call.relocated_original(at).unwrap(), at).is_empty());
}

#[test]
fn flow_end_before_five_bytes() {
    // jmp short over something: the bytes after it are only reachable by jumps.
    let code = asm(FUNC, |a| {
        let mut l = a.create_label();
        a.jmp(l)?;
        a.push(rbx)?;
        a.push(rbp)?;
        a.push(r12)?;
        a.set_label(&mut l)?;
        a.ret()
    });
    let e = plan(&code).unwrap_err();
    assert!(
        matches!(e, PlanError::FlowEndsEarly { offset: 0, .. }),
        "{e:?}"
    );
    assert!(e.to_string().starts_with("the jmp at +0x0 ends"), "{e}");

    // ... unless only padding follows.
    let mut code = asm(FUNC, |a| a.jmp(FUNC + 0x20));
    code.extend_from_slice(&[0x0F, 0x1F, 0x40, 0x00]); // nop dword [rax+0]
    code.resize(0x30, 0x90);
    let p = plan(&code).unwrap();
    assert_eq!(p.len, 6);
}

#[test]
fn int3_in_site_rejected() {
    let code = asm(FUNC, |a| {
        a.push(rbp)?;
        a.int3()?;
        a.mov(rbp, rsp)?;
        a.ret()
    });
    let e = plan(&code).unwrap_err();
    assert_eq!(e, PlanError::Int3InSite { offset: 1 });
    assert!(e.to_string().contains("int3 (0xCC)"), "{e}");
    // An int3 later in the function is not our business.
    let code = asm(FUNC, |a| {
        a.mov(eax, 1)?;
        a.ret()?;
        a.int3()
    });
    plan(&code).unwrap();
}

#[test]
fn undecodable_bytes() {
    // 0x06 (push es) is invalid in 64-bit mode.
    let e = plan(&[0x06, 0x90, 0x90, 0x90, 0x90, 0xC3]).unwrap_err();
    assert_eq!(
        e,
        PlanError::Undecodable {
            offset: 0,
            bytes: "06 90 90 90 90 c3".into(),
            overwritten: true
        }
    );
    assert_eq!(
        e.to_string(),
        "cannot decode the bytes at +0x0 (06 90 90 90 90 c3) as an x86-64 instruction, and they would be overwritten by the jump"
    );
    let e = plan(&[0xB8, 1, 0, 0, 0, 0xC3, 0x06, 0x90, 0xC3]).unwrap_err();
    assert!(
        matches!(
            e,
            PlanError::Undecodable {
                offset: 6,
                overwritten: false,
                ..
            }
        ),
        "{e:?}"
    );
    // An invalid opcode as the very last byte is undecodable, not truncated.
    let e = plan(&[0xB8, 1, 0, 0, 0, 0xC3, 0x06]).unwrap_err();
    assert!(
        matches!(
            e,
            PlanError::Undecodable {
                offset: 6,
                overwritten: false,
                ..
            }
        ),
        "{e:?}"
    );
    // Last instruction cut off by the symbol size.
    let e = plan(&[0xB8, 1, 0, 0, 0, 0xC3, 0xB8, 1]).unwrap_err();
    assert_eq!(e, PlanError::Truncated { offset: 6, size: 8 });
}

#[test]
fn address_of_site_byte_rejected() {
    // Computed goto: lea rax, [rip + func+2]
    let code = asm(FUNC, |a| {
        a.mov(eax, 1)?;
        a.mov(ecx, 2)?;
        a.add_instruction(rip_rel(Code::Lea_r64_m, Register::RAX, FUNC + 2))?;
        a.jmp(rax)
    });
    let e = plan(&code).unwrap_err();
    assert!(
        matches!(
            e,
            PlanError::AddressIntoSite {
                from: 10,
                target: 2,
                ..
            }
        ),
        "{e:?}"
    );
    // Taking the function's own address is fine.
    let code = asm(FUNC, |a| {
        a.mov(eax, 1)?;
        a.add_instruction(rip_rel(Code::Lea_r64_m, Register::RAX, FUNC))?;
        a.ret()
    });
    plan(&code).unwrap();
}

#[test]
fn jump_helpers() {
    assert_eq!(jmp_rel32(0x1000, 0x1005), Some([0xE9, 0, 0, 0, 0]));
    assert_eq!(
        jmp_rel32(0x1000, 0x1000),
        Some([0xE9, 0xFB, 0xFF, 0xFF, 0xFF])
    );
    let from = 0x1_0000_0000u64;
    assert!(jmp_rel32(from, from + 5 + i32::MAX as u64).is_some());
    assert!(jmp_rel32(from, from + 5 + i32::MAX as u64 + 1).is_none());
    assert!(jmp_rel32(from, from + 5 - 0x8000_0000).is_some());
    assert!(jmp_rel32(from, from + 4 - 0x8000_0000).is_none());
    // Wrap-around behaves like the CPU.
    assert!(in_rel32_range(0x10, u64::MAX - 0x10));
    assert!(!in_rel32_range(0, 1 << 40));

    let target = 0x7f12_3456_789a;
    let bytes = jmp_abs(target);
    assert_eq!(bytes.len(), JMP_ABS_LEN);
    let r = decode_all(0x1000, &bytes[..6]);
    assert_eq!(r[0].code(), Code::Jmp_rm64);
    assert_eq!(r[0].ip_rel_memory_address(), 0x1006);
    assert_eq!(u64::from_le_bytes(bytes[6..].try_into().unwrap()), target);

    let code = asm(FUNC, |a| {
        a.mov(eax, 1)?;
        a.ret()
    });
    let p = plan(&code).unwrap();
    let e = p.jump_bytes(FUNC + (1 << 33)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "a jmp rel32 at 0x401000 cannot reach 0x200401000: the target is more than ±2 GiB away"
    );
}

/// Property tests: no panics on arbitrary input, and relocated copies keep
/// every control-flow and memory target of the originals.
mod prop {
    use super::*;
    use iced_x86::{BlockEncoderOptions, OpKind};
    use proptest::prelude::*;

    /// What a sequence of instructions refers to, in a form that survives relocation.
    #[derive(Debug, Default, PartialEq, Eq)]
    struct Effects {
        /// Branch targets outside the code itself (sorted).
        external: Vec<u64>,
        /// RIP-relative / absolute memory operand addresses (sorted).
        memory: Vec<u64>,
        /// Codes of the non-branch instructions, in order.
        codes: Vec<Code>,
    }

    fn original_effects(p: &SitePlan) -> (Effects, usize) {
        let mut e = Effects::default();
        let mut internal = 0;
        for ins in p.instructions() {
            match branch_target(ins) {
                Some(t) if t == p.site_addr => internal += 1,
                Some(t) => e.external.push(t),
                None => {
                    if ins.is_ip_rel_memory_operand() {
                        e.memory.push(ins.ip_rel_memory_address());
                    }
                    e.codes.push(ins.code());
                }
            }
        }
        e.external.push(p.resume_addr());
        e.external.sort_unstable();
        e.memory.sort_unstable();
        (e, internal)
    }

    /// Decodes a relocated copy. `jmp/call qword [rip+x]` whose pointer lies in
    /// the copy's own data area count as branches to the stored address;
    /// decoding stops where that data area begins.
    fn relocated_effects(at: u64, code: &[u8]) -> (Effects, usize) {
        let mut e = Effects::default();
        let mut internal = 0;
        let end = at + code.len() as u64;
        let mut data_start = end;
        let mut decoder = Decoder::with_ip(64, code, at, DecoderOptions::NONE);
        let mut ins = Instruction::default();
        while decoder.can_decode() && decoder.ip() < data_start {
            decoder.decode_out(&mut ins);
            assert!(
                !ins.is_invalid(),
                "relocated code does not decode: {code:02x?}"
            );
            if let Some(t) = branch_target(&ins) {
                if (at..end).contains(&t) {
                    if t == at {
                        internal += 1;
                    }
                } else {
                    e.external.push(t);
                }
                continue;
            }
            if ins.code() == Code::Int3 {
                // Alignment padding before the pointers (int3 is never copied).
                continue;
            }
            if ins.is_ip_rel_memory_operand() {
                let m = ins.ip_rel_memory_address();
                if (at..end).contains(&m)
                    && matches!(ins.mnemonic(), Mnemonic::Jmp | Mnemonic::Call)
                {
                    data_start = data_start.min(m & !7);
                    let off = (m - at) as usize;
                    let ptr = u64::from_le_bytes(code[off..off + 8].try_into().unwrap());
                    e.external.push(ptr);
                    continue;
                }
                e.memory.push(m);
            }
            e.codes.push(ins.code());
        }
        e.external.sort_unstable();
        e.memory.sort_unstable();
        (e, internal)
    }

    /// Checks a successful plan's invariants and its relocation at `at`.
    fn check_plan(p: &SitePlan, func: u64, code: &[u8], at: u64) {
        let off = p.site_offset();
        assert_eq!(off, if code.starts_with(&ENDBR64) { 4 } else { 0 });
        assert!(p.len >= JMP_REL32_LEN);
        assert_eq!(p.func_addr, func);
        assert_eq!(p.original, code[off..off + p.len]);
        assert_eq!(
            p.instructions().iter().map(Instruction::len).sum::<usize>(),
            p.len
        );
        if let Ok(j) = p.jump_bytes(p.site_addr.wrapping_add(0x1000)) {
            assert_eq!(j.len(), p.len);
            assert_eq!(j[0], 0xE9);
        }
        match p.relocated_original(at) {
            Ok(reloc) => {
                assert!(reloc.len() <= p.max_relocated_len());
                let (want, want_internal) = original_effects(p);
                let (got, got_internal) = relocated_effects(at, &reloc);
                assert_eq!(got, want, "at {at:#x}: {reloc:02x?}");
                assert!(got_internal >= want_internal);
            }
            Err(PlanError::RipRelativeOutOfRange { .. } | PlanError::Relocation { .. }) => {}
            Err(e) => panic!("unexpected relocation error {e:?}"),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_bytes_never_panic(
            body in proptest::collection::vec(any::<u8>(), 0..80),
            endbr in any::<bool>(),
            func in prop_oneof![Just(FUNC), any::<u64>()],
            table in proptest::collection::vec(any::<u8>(), 0..256),
            delta in -0x4000_0000i64..0x4000_0000,
        ) {
            let mut code = if endbr { ENDBR64.to_vec() } else { Vec::new() };
            code.extend_from_slice(&body);
            let mem = FakeMem(vec![(func, code.clone()), (func.wrapping_add(0x1000), table)]);
            if let Ok(p) = plan_site(func, &code, &mem) {
                check_plan(&p, func, &code, func.wrapping_add(delta as u64));
                // Far away: must not panic either.
                let _ = p.relocated_original(func.wrapping_add(0x8_0000_0000));
            }
        }
    }

    #[derive(Debug, Clone, Copy)]
    enum Op {
        Nop,
        PushRbx,
        MovImm(u32),
        LoadRip(i32),
        LeaRip(i32),
        Jcc(usize),
        Jmp(usize),
        Loop(usize),
        Jrcxz(usize),
        CallFar(i32),
        CallReg,
        Ret,
        DecEcx,
        Int3,
        TestEdi,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            Just(Op::Nop),
            Just(Op::PushRbx),
            any::<u32>().prop_map(Op::MovImm),
            any::<i32>().prop_map(Op::LoadRip),
            (-0x10_0000i32..0x10_0000).prop_map(Op::LoadRip),
            (-0x10_0000i32..0x10_0000).prop_map(Op::LeaRip),
            (0usize..64).prop_map(Op::Jcc),
            (0usize..64).prop_map(Op::Jcc),
            (0usize..64).prop_map(Op::Jmp),
            (0usize..64).prop_map(Op::Loop),
            (0usize..64).prop_map(Op::Jrcxz),
            any::<i32>().prop_map(Op::CallFar),
            Just(Op::CallReg),
            Just(Op::Ret),
            Just(Op::DecEcx),
            Just(Op::Int3),
            Just(Op::TestEdi),
        ]
    }

    /// Assembles `ops` at `func`; branch operands are instruction indices.
    /// Returns the code, each instruction's address and each branch's (source index, target address).
    /// Code, label addresses, and (instruction, target) of each branch.
    type Built = (Vec<u8>, Vec<u64>, Vec<(usize, u64)>);

    /// None when iced cannot report a label's address (it lengthened the
    /// labelled branch): such generated cases are skipped.
    fn build(func: u64, ops: &[Op], short: bool) -> Option<Built> {
        let n = ops.len();
        let mut a = CodeAssembler::new(64).unwrap();
        a.set_prefer_short_branch(short);
        let mut labels: Vec<CodeLabel> = (0..n).map(|_| a.create_label()).collect();
        let mut branches = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            a.set_label(&mut labels[i]).unwrap();
            let r = match *op {
                Op::Nop => a.nop(),
                Op::PushRbx => a.push(rbx),
                Op::MovImm(v) => a.mov(eax, v),
                Op::LoadRip(d) => a.add_instruction(rip_rel(
                    Code::Mov_r32_rm32,
                    Register::EAX,
                    func.wrapping_add(d as i64 as u64),
                )),
                Op::LeaRip(d) => a.add_instruction(rip_rel(
                    Code::Lea_r64_m,
                    Register::RDX,
                    func.wrapping_add(d as i64 as u64),
                )),
                Op::Jcc(k) | Op::Jmp(k) | Op::Loop(k) | Op::Jrcxz(k) => {
                    let l = labels[k % n];
                    branches.push((i, k % n));
                    match *op {
                        Op::Jcc(_) => a.jne(l),
                        Op::Jmp(_) => a.jmp(l),
                        Op::Loop(_) => a.loop_(l),
                        _ => a.jrcxz(l),
                    }
                }
                Op::CallFar(d) => a.call(func.wrapping_add(d as i64 as u64) & !0xF),
                Op::CallReg => a.call(rax),
                Op::Ret => a.ret(),
                Op::DecEcx => a.dec(ecx),
                Op::Int3 => a.int3(),
                Op::TestEdi => a.test(edi, edi),
            };
            r.unwrap();
        }
        let res = a
            .assemble_options(func, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
            .unwrap();
        let ips: Vec<u64> = labels
            .iter()
            .map(|l| res.label_ip(l).ok())
            .collect::<Option<_>>()?;
        let branches = branches.into_iter().map(|(i, k)| (i, ips[k])).collect();
        Some((res.inner.code_buffer, ips, branches))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn generated_functions(
            ops in proptest::collection::vec(op(), 1..40),
            short in any::<bool>(),
            endbr in any::<bool>(),
            delta in -0x4000_0000i64..0x4000_0000,
        ) {
            let func = 0x5555_5555_0000u64;
            let mut all = ops.clone();
            if endbr {
                // Shift branch indices by one for the endbr64 in front.
                all = std::iter::once(Op::Nop).chain(ops.iter().map(|o| match *o {
                    Op::Jcc(k) => Op::Jcc(k % ops.len() + 1),
                    Op::Jmp(k) => Op::Jmp(k % ops.len() + 1),
                    Op::Loop(k) => Op::Loop(k % ops.len() + 1),
                    Op::Jrcxz(k) => Op::Jrcxz(k % ops.len() + 1),
                    o => o,
                })).collect();
            }
            if endbr {
                // Assemble with the leading 1-byte nop at func+3, then swap
                // it for endbr64 at func: everything else keeps its address.
                let built = build(func + 3, &all, short);
                prop_assume!(built.is_some());
                let (c, ips, branches) = built.unwrap();
                let code: Vec<u8> = ENDBR64.iter().chain(&c[1..]).copied().collect();
                return check_generated(func, &code, &ips[1..], &branches, delta);
            }
            let built = build(func, &all, short);
            prop_assume!(built.is_some());
            let (code, ips, branches) = built.unwrap();
            check_generated(func, &code, &ips, &branches, delta)?;
        }
    }

    fn check_generated(
        func: u64,
        code: &[u8],
        ips: &[u64],
        branches: &[(usize, u64)],
        delta: i64,
    ) -> Result<(), TestCaseError> {
        let site_off = if code.starts_with(&ENDBR64) { 4 } else { 0 };
        let site = func + site_off as u64;
        match plan_site(func, code, &NoMemory) {
            Ok(p) => {
                let inside = |t: u64| t > site && t < site + p.len as u64;
                for (_, t) in branches {
                    prop_assert!(!inside(*t), "branch to {t:#x} inside accepted site");
                }
                // The site ends on an instruction boundary of the generator.
                prop_assert!(
                    ips.contains(&(site + p.len as u64)) || site_off + p.len == code.len()
                );
                for (k, ins) in p.instructions().iter().enumerate() {
                    prop_assert!(ins.code() != Code::Int3);
                    if k + 1 < p.instructions().len() {
                        prop_assert!(ins.mnemonic() != Mnemonic::Call);
                    }
                }
                check_plan(&p, func, code, func.wrapping_add(delta as u64));
                check_plan(&p, func, code, func.wrapping_add(0x10_0000_0000));
            }
            Err(PlanError::BranchIntoSite { target, len, .. }) => {
                let t = func + target as u64;
                prop_assert!(t > site && t < site + len as u64);
                prop_assert!(branches.iter().any(|(_, b)| *b == t));
            }
            Err(PlanError::Undecodable { .. } | PlanError::Truncated { .. }) => {
                prop_assert!(false, "generated code must decode");
            }
            Err(_) => {}
        }
        Ok(())
    }

    #[test]
    fn op_kind_sanity() {
        // branch_target() sees all near-branch operand kinds used above.
        let code = asm(FUNC, |a| {
            let mut l = a.create_label();
            a.set_label(&mut l)?;
            a.loop_(l)?;
            a.jrcxz(l)?;
            a.xbegin(l)
        });
        for ins in decode_all(FUNC, &code) {
            assert_eq!(ins.op_kind(ins.op_count() - 1), OpKind::NearBranch64);
            assert_eq!(branch_target(&ins), Some(FUNC));
        }
    }
}

#[test]
fn direct_calls_to_finds_only_plain_rel32_calls_to_the_targets() {
    let at = 0x1000u64;
    let f = 0x2000u64;
    let g = 0x3000u64;
    let mut code = Vec::new();
    // push rbp
    code.push(0x55);
    // call f (at 0x1001)
    code.extend(call_rel32(at + 1, f).unwrap());
    // call g (at 0x1006): not a target
    code.extend(call_rel32(at + 6, g).unwrap());
    // mov eax, 0x000020e8 (an E8 byte inside another instruction)
    code.extend([0xB8, 0xE8, 0x20, 0x00, 0x00]);
    // call qword ptr [rip+0] (indirect)
    code.extend([0xFF, 0x15, 0, 0, 0, 0]);
    // jmp f (a tail call is not a call site)
    code.extend(jmp_rel32(at + code.len() as u64, f).unwrap());
    // call f again (at 0x101d)
    let second = at + code.len() as u64;
    code.extend(call_rel32(second, f).unwrap());
    code.push(0xC3);
    let targets: std::collections::BTreeSet<u64> = [f].into();
    assert_eq!(
        direct_calls_to(&code, at, &targets),
        vec![(at + 1, f), (second, f)]
    );
    // Decoding stops at an invalid instruction.
    let mut bad = vec![0x06];
    bad.extend(call_rel32(at + 1, f).unwrap());
    assert!(direct_calls_to(&bad, at, &targets).is_empty());
}

#[test]
fn call_rel32_encodes_and_refuses_out_of_range() {
    assert_eq!(call_rel32(0x1000, 0x1005), Some([0xE8, 0, 0, 0, 0]));
    assert_eq!(
        call_rel32(0x1000, 0x1000),
        Some([0xE8, 0xFB, 0xFF, 0xFF, 0xFF])
    );
    assert_eq!(call_rel32(0x1000, 0x1_0000_1000), None);
}
