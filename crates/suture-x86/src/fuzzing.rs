//! Per-input logic of the fuzz targets (`fuzz/fuzz_targets/x86_*.rs`) and
//! the relocation checker shared with the property tests.
//!
//! Not part of the crate's API: the fuzz targets, the corpus replay tests
//! (`tests/fuzz_corpus.rs`) and the property tests
//! (`tests/relocation_props.rs`) call the same functions, so whatever the
//! fuzzer finds is replayed by `cargo test`.
//!
//! Every function here panics when it finds a bug (a panic inside the
//! planner, or a relocated copy that does not behave as the original).

use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, Instruction, OpKind, Register};

use crate::dispatch::{self, DispatchParams, DISPATCH_MAX_LEN, TABLE_BITS, TOMBSTONE_BIT};
use crate::{call_return_points, plan_site, Memory, PlanError, ResumeMap, SitePlan, JMP_REL32_LEN};

/// Bytes of an `x86_plan` input before the function body.
pub const PLAN_HEADER: usize = 16;

/// Little-endian `u64` from up to 8 bytes at `off` (missing bytes are 0).
fn le64(data: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(s) = data.get(off..) {
        let n = s.len().min(8);
        b[..n].copy_from_slice(&s[..n]);
    }
    u64::from_le_bytes(b)
}

/// The whole fuzz input, mapped so that the function body lies at its address.
struct InputMem<'a> {
    base: u64,
    bytes: &'a [u8],
}

impl Memory for InputMem<'_> {
    fn read(&self, addr: u64, len: usize) -> Option<Vec<u8>> {
        let start = usize::try_from(addr.wrapping_sub(self.base)).ok()?;
        let end = start.checked_add(len)?;
        self.bytes.get(start..end).map(<[u8]>::to_vec)
    }
}

/// One `x86_plan` input: bytes 0..8 the function's address, 8..16 a signed
/// distance to the relocation address, the rest the function body. The
/// whole input is readable memory (for jump tables) placed so that the body
/// lies at the function's address.
///
/// Plans a site; on success relocates the original instructions to the
/// given address and to a near one and checks each copy with
/// [`check_relocation`], checks [`SitePlan::jump_bytes`] and
/// [`call_return_points`]. Errors must format without panicking.
pub fn fuzz_plan(data: &[u8]) {
    let func = le64(data, 0);
    let delta = le64(data, 8);
    let body = data.get(PLAN_HEADER..).unwrap_or(&[]);
    let mem = InputMem {
        base: func.wrapping_sub(PLAN_HEADER as u64),
        bytes: data,
    };
    let plan = match plan_site(func, body, &mem) {
        Ok(plan) => plan,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    check_plan(&plan, func, body);
    // The given distance, the same distance truncated to 32 bits (mostly in
    // range), and a page away.
    let near = func.wrapping_add(delta as i32 as i64 as u64);
    for at in [func.wrapping_add(delta), near, func.wrapping_add(0x1000)] {
        relocate_and_check(&plan, at);
        match plan.jump_bytes(at) {
            Ok(j) => check_jump(&plan, &j, at),
            Err(e) => {
                assert!(
                    !crate::in_rel32_range(plan.site_addr.wrapping_add(5), at),
                    "jump_bytes refused a reachable target: {e}"
                );
            }
        }
    }
}

/// Invariants of a successful plan of `code` at `func`.
pub fn check_plan(p: &SitePlan, func: u64, code: &[u8]) {
    let off = p.site_offset();
    assert_eq!(p.func_addr, func);
    assert_eq!(
        off,
        if code.starts_with(&crate::ENDBR64) {
            4
        } else {
            0
        }
    );
    assert_eq!(p.site_addr, func.wrapping_add(off as u64));
    assert!(p.len >= JMP_REL32_LEN, "site of {} bytes", p.len);
    assert_eq!(p.original, code[off..off + p.len]);
    assert_eq!(p.func_size(), code.len());
    let lens: usize = p.instructions().iter().map(Instruction::len).sum();
    assert_eq!(lens, p.len, "instructions do not cover the site");
    let mut ip = p.site_addr;
    for ins in p.instructions() {
        assert_eq!(ins.ip(), ip, "instructions not contiguous");
        ip = ins.next_ip();
    }
    assert_eq!(ip, p.resume_addr());
}

/// Relocates `p`'s instructions to `at` and checks the copy with
/// [`check_relocation`]. A RIP-relative target reported out of range must
/// be; the block encoder may refuse what it cannot encode.
pub fn relocate_and_check(p: &SitePlan, at: u64) {
    match p.relocated_original_map(at) {
        Ok((code, map)) => {
            if let Err(e) = check_relocation(p, at, &code, &map) {
                panic!(
                    "relocation of {:02x?} (site {:#x}) to {at:#x} is wrong: {e}\ncopy: {code:02x?}",
                    p.original, p.site_addr
                );
            }
            let end = at.wrapping_add(code.len() as u64);
            for r in call_return_points(&code, at) {
                assert!(
                    r.wrapping_sub(at) <= end.wrapping_sub(at),
                    "return point {r:#x} outside the copy"
                );
            }
        }
        Err(PlanError::RipRelativeOutOfRange { target, .. }) => {
            let end = at.wrapping_add(p.max_relocated_len() as u64);
            assert!(
                !crate::in_rel32_range(at, target) || !crate::in_rel32_range(end, target),
                "{target:#x} reported out of range of {at:#x}"
            );
        }
        // iced cannot encode the copy (e.g. an xbegin whose fallback is out
        // of rel32 range, which has no long form).
        Err(PlanError::Relocation { .. }) => {}
        Err(e) => panic!("unexpected relocation error: {e:?}"),
    }
}

/// Checks that `j` (from [`SitePlan::jump_bytes`]) is a `jmp rel32` from the
/// site to `to`, padded with int3 to the site's length.
pub fn check_jump(p: &SitePlan, j: &[u8], to: u64) {
    assert_eq!(j.len(), p.len);
    let ins = Decoder::with_ip(64, j, p.site_addr, DecoderOptions::NONE).decode();
    assert_eq!(ins.code(), Code::Jmp_rel32_64);
    assert_eq!(ins.near_branch_target(), to);
    assert!(j[JMP_REL32_LEN..].iter().all(|&b| b == 0xCC));
}

/// Decodes relocated code at fixed addresses.
struct Copy<'a> {
    at: u64,
    code: &'a [u8],
    /// Lowest address of an 8-byte pointer the code jumps or calls through.
    data_start: u64,
}

impl Copy<'_> {
    fn end(&self) -> u64 {
        self.at.wrapping_add(self.code.len() as u64)
    }

    /// The instruction at `ip` (inside the code, before any pointer).
    fn decode(&self, ip: u64) -> Result<Instruction, String> {
        let off = ip.wrapping_sub(self.at);
        if off >= self.code.len() as u64 {
            return Err(format!(
                "expected an instruction at {ip:#x}, past the copy's end"
            ));
        }
        let ins =
            Decoder::with_ip(64, &self.code[off as usize..], ip, DecoderOptions::NONE).decode();
        if ins.is_invalid() {
            return Err(format!("bytes at {ip:#x} do not decode"));
        }
        Ok(ins)
    }

    /// Runs `check` at `ip`; if that fails and `ip` holds a one-byte `nop`
    /// (0x90), tries again after it, and so on. The block encoder pads a
    /// rewritten branch with nops up to the size it reserved; extra nops
    /// change nothing. Returns where `check` succeeded and what it returned.
    fn skipping_nops(
        &mut self,
        mut ip: u64,
        mut check: impl FnMut(&mut Self, u64) -> Result<u64, String>,
    ) -> Result<(u64, u64), String> {
        // A failed attempt must not leave its pointers behind.
        let data_start = self.data_start;
        let first = match check(self, ip) {
            Ok(next) => return Ok((ip, next)),
            Err(e) => e,
        };
        self.data_start = data_start;
        loop {
            let off = ip.wrapping_sub(self.at) as usize;
            if self.code.get(off) != Some(&0x90) {
                return Err(first);
            }
            ip = ip.wrapping_add(1);
            if let Ok(next) = check(self, ip) {
                return Ok((ip, next));
            }
            self.data_start = data_start;
        }
    }

    /// The 8-byte pointer at `addr` inside the copy; remembers it as data.
    fn pointer(&mut self, addr: u64) -> Result<u64, String> {
        let off = addr.wrapping_sub(self.at);
        if off
            .checked_add(8)
            .is_none_or(|e| e > self.code.len() as u64)
            || addr % 8 != 0
        {
            return Err(format!(
                "pointer at {addr:#x} is not an aligned slot inside the copy"
            ));
        }
        self.data_start = self.data_start.min(addr);
        let off = off as usize;
        Ok(u64::from_le_bytes(
            self.code[off..off + 8].try_into().unwrap(),
        ))
    }

    /// The target of `ins` if it is `jmp`/`call` through a pointer of the
    /// copy (`ff 25`/`ff 15` with a RIP-relative operand).
    fn through_pointer(&mut self, ins: &Instruction, code: Code) -> Result<Option<u64>, String> {
        if ins.code() != code
            || !ins.is_ip_rel_memory_operand()
            || ins.memory_base() != Register::RIP
        {
            return Ok(None);
        }
        self.pointer(ins.ip_rel_memory_address()).map(Some)
    }

    /// Accepts, at `ip`, a jump to `target`: `jmp rel8/rel32 target` or
    /// `jmp qword [rip+p]` with `p` in the copy holding `target`. Returns the
    /// address after it.
    fn expect_jmp(&mut self, ip: u64, target: u64) -> Result<u64, String> {
        let ins = self.decode(ip)?;
        if ins.code().is_jmp_short_or_near() && ins.near_branch_target() == target {
            return Ok(ins.next_ip());
        }
        if self.through_pointer(&ins, Code::Jmp_rm64)? == Some(target) {
            return Ok(ins.next_ip());
        }
        Err(format!(
            "expected a jump to {target:#x} at {ip:#x}, found {ins} ({:?})",
            ins.code()
        ))
    }
}

/// Where an original branch must go in the copy: a branch to the site's
/// first instruction stays inside the copy (its start), anything else keeps
/// its absolute target.
fn relocated_target(p: &SitePlan, at: u64, target: u64) -> Result<u64, String> {
    if target == p.site_addr {
        return Ok(at);
    }
    if p.pc_inside_site(target) {
        return Err(format!(
            "the plan kept a branch to {target:#x}, inside the site"
        ));
    }
    Ok(target)
}

/// Copy of `ins` with what relocation may change set to fixed values:
/// address, length, displacement size, and the RIP/EIP-relative base and
/// displacement (compared separately as an absolute address).
fn normalized(ins: &Instruction) -> Instruction {
    let mut n = *ins;
    n.set_ip(0);
    n.set_len(0);
    n.set_memory_displ_size(0);
    if ins.is_ip_rel_memory_operand() {
        n.set_memory_base(Register::RIP);
        n.set_memory_displacement64(0);
    }
    n
}

/// Checks that `code`, the relocated copy of `p`'s instructions placed at
/// `at` (with `map` from [`SitePlan::relocated_original_map`]), behaves as
/// the original: decoding both, each original instruction must be found in
/// order, either
///
/// * unchanged except for its encoding (displacement size, redundant
///   prefixes), with any RIP-relative operand (EIP-relative ones may become
///   RIP-relative) resolving to the same absolute address; or, for a
///   relative branch, one of the rewrites iced's block encoder documents:
/// * `jmp`/`call`/`jcc` in short or near form to the same target;
/// * a `jmp`/`call` through an 8-byte pointer of the copy holding the target;
/// * `jcc` as `j!cc` over a `jmp` through a pointer holding the target;
/// * `loop*`/`jrcxz`/`jecxz` as `loop L1; jmp short L2; L1: jmp target; L2:`;
/// * `xbegin` in its rel16 or rel32 form;
///
/// where a branch to the site's first instruction goes to the copy's start
/// and any other target is the same absolute address. One-byte `nop`s may
/// come between them (iced pads rewritten branches to their reserved size). After the last one
/// comes a jump back to [`SitePlan::resume_addr`], then only int3 padding
/// and the pointers. The map must give each instruction's place in the copy.
pub fn check_relocation(p: &SitePlan, at: u64, code: &[u8], map: &ResumeMap) -> Result<(), String> {
    if code.len() > p.max_relocated_len() {
        return Err(format!(
            "{} bytes, more than max_relocated_len {}",
            code.len(),
            p.max_relocated_len()
        ));
    }
    let mut c = Copy {
        at,
        code,
        data_start: at.wrapping_add(code.len() as u64),
    };
    let mut ip = at;
    let mut starts = Vec::new();
    for orig in p.instructions() {
        let (start, next) = c
            .skipping_nops(ip, |c, ip| check_one(p, c, orig, ip))
            .map_err(|e| format!("original {orig} at {:#x}: {e}", orig.ip()))?;
        starts.push((orig.ip(), ip, start));
        ip = next;
    }
    let (_, code_end) = c
        .skipping_nops(ip, |c, ip| c.expect_jmp(ip, p.resume_addr()))
        .map_err(|e| format!("jump back: {e}"))?;

    // Everything after the code: int3 up to the first pointer, and pointers.
    let rel = |a: u64| a.wrapping_sub(at);
    if rel(code_end) > rel(c.data_start) {
        return Err(format!(
            "a pointer at {:#x} overlaps the code (ends at {code_end:#x})",
            c.data_start
        ));
    }
    let pad = &code[rel(code_end) as usize..rel(c.data_start) as usize];
    if pad.iter().any(|&b| b != 0xCC) || pad.len() >= 8 {
        return Err(format!("unexpected bytes after the code: {pad:02x?}"));
    }
    if rel(c.data_start) != rel(c.end()) && (rel(c.end()) - rel(c.data_start)) % 8 != 0 {
        return Err("the pointer area is not a whole number of pointers".into());
    }

    // A thread may be moved to any of the nops before an instruction's copy.
    for &(orig, new) in map {
        let ok = starts
            .iter()
            .any(|&(o, from, start)| o == orig && rel(from) <= rel(new) && rel(new) <= rel(start));
        if !ok {
            return Err(format!(
                "the map sends {orig:#x} to {new:#x}, not the start of that instruction's copy"
            ));
        }
    }
    Ok(())
}

/// Checks the copy of `orig` at `ip`; returns the address after it.
fn check_one(p: &SitePlan, c: &mut Copy<'_>, orig: &Instruction, ip: u64) -> Result<u64, String> {
    let ins = c.decode(ip)?;
    let oc = orig.code();
    let is_branch = (0..orig.op_count()).any(|i| {
        matches!(
            orig.op_kind(i),
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
        )
    });
    if !is_branch {
        if normalized(&ins) != normalized(orig) {
            return Err(format!("copied as {ins} ({:?})", ins.code()));
        }
        if orig.is_ip_rel_memory_operand() {
            let (want, got) = (orig.ip_rel_memory_address(), ins.ip_rel_memory_address());
            if !ins.is_ip_rel_memory_operand() || got != want {
                return Err(format!("copy {ins} addresses {got:#x}, not {want:#x}"));
            }
        }
        return Ok(ins.next_ip());
    }

    let target = relocated_target(p, c.at, orig.near_branch_target())?;
    let wrong = |ins: &Instruction| {
        format!(
            "copied as {ins} ({:?}), not a branch to {target:#x}",
            ins.code()
        )
    };
    if oc.is_jmp_short_or_near() {
        return c.expect_jmp(ip, target);
    }
    if oc.is_call_near() {
        if ins.code().is_call_near() && ins.near_branch_target() == target {
            return Ok(ins.next_ip());
        }
        if c.through_pointer(&ins, Code::Call_rm64)? == Some(target) {
            return Ok(ins.next_ip());
        }
        return Err(wrong(&ins));
    }
    if oc.is_jcc_short_or_near() {
        if ins.code().is_jcc_short_or_near() && ins.code().as_short_branch() == oc.as_short_branch()
        {
            if ins.near_branch_target() == target {
                return Ok(ins.next_ip());
            }
            return Err(wrong(&ins));
        }
        // j!cc short over `jmp [rip+p]`.
        if ins.code() == oc.negate_condition_code().as_short_branch() {
            let after = c.expect_jmp(ins.next_ip(), target)?;
            if ins.near_branch_target() != after {
                return Err(format!(
                    "the inverted {ins} does not skip the jump (to {after:#x})"
                ));
            }
            return Ok(after);
        }
        return Err(wrong(&ins));
    }
    if oc.is_loop() || oc.is_loopcc() || oc.is_jcx_short() {
        if ins.code() != oc {
            return Err(wrong(&ins));
        }
        if ins.near_branch_target() == target {
            return Ok(ins.next_ip());
        }
        // loop L1; jmp short L2; L1: jmp target; L2:
        let skip = c.decode(ins.next_ip())?;
        if skip.code() != Code::Jmp_rel8_64 || ins.near_branch_target() != skip.next_ip() {
            return Err(format!(
                "{ins} is not followed by a short jmp to its own target"
            ));
        }
        let after = c.expect_jmp(skip.next_ip(), target)?;
        if skip.near_branch_target() != after {
            return Err(format!("{skip} does not skip the far jump (to {after:#x})"));
        }
        return Ok(after);
    }
    if matches!(oc, Code::Xbegin_rel16 | Code::Xbegin_rel32) {
        if matches!(ins.code(), Code::Xbegin_rel16 | Code::Xbegin_rel32)
            && ins.near_branch_target() == target
        {
            return Ok(ins.next_ip());
        }
        return Err(wrong(&ins));
    }
    Err(format!("unknown kind of branch {oc:?}"))
}

/// One `x86_dispatch` input: the parameters of a dispatch stub and a
/// pending table with operations on it.
///
/// Builds the stub (must fit [`DISPATCH_MAX_LEN`], end with its literals and
/// decode up to them) and runs insert/find/remove on a small table, checking
/// that they agree with each other.
pub fn fuzz_dispatch(data: &[u8]) {
    let p = DispatchParams {
        at: le64(data, 0),
        table: le64(data, 8),
        bits: (le64(data, 16) & 0xFF) as u32 % 20,
        target: le64(data, 24),
        initial: le64(data, 32),
    };
    match dispatch::dispatch_stub(&p) {
        Ok(stub) => {
            assert!(stub.bytes.len() <= DISPATCH_MAX_LEN);
            assert_eq!(stub.at(), p.at);
            assert!(stub.contains(stub.trap_end));
            // Literals: target, initial, the trap switch (on).
            let lit = stub.bytes.len() - 24;
            assert_eq!(le64(&stub.bytes, lit), p.target);
            assert_eq!(le64(&stub.bytes, lit + 8), p.initial);
            assert_eq!(le64(&stub.bytes, lit + 16), 1);
            assert_eq!(stub.trap_switch, p.at.wrapping_add(lit as u64 + 16));
            // Every instruction up to the literals decodes and has a depth.
            let mut dec = Decoder::with_ip(64, &stub.bytes[..lit], p.at, DecoderOptions::NONE);
            while dec.can_decode() {
                let ins = dec.decode();
                if ins.code() == Code::Int3 {
                    continue;
                }
                assert!(
                    !ins.is_invalid(),
                    "stub does not decode: {:02x?}",
                    stub.bytes
                );
                let depth = stub
                    .pushed_words(ins.ip())
                    .expect("instruction without depth");
                assert!(depth <= 3);
                if ins.flow_control() == FlowControl::IndirectBranch {
                    assert_eq!(depth, 0, "{ins} leaves words on the stack");
                }
            }
        }
        Err(e) => {
            assert!(
                !TABLE_BITS.contains(&p.bits)
                    || p.table == 0
                    || p.table % 8 != 0
                    || matches!(e, dispatch::DispatchError::Assemble { .. }),
                "{e}"
            );
            let _ = e.to_string();
        }
    }

    // A table of 2^4 slots, filled through insertions and removals (so only
    // states the helpers can reach), then operations.
    let bits = 4;
    let rest = data.get(40..).unwrap_or(&[]);
    let mut slots = vec![0u64; 16];
    for i in 0..16 {
        let v = le64(rest, i * 8) & 0x3F;
        dispatch::table_insert(&mut slots, bits, v & !TOMBSTONE_BIT);
        if v & TOMBSTONE_BIT != 0 {
            dispatch::table_remove(&mut slots, bits, v & !TOMBSTONE_BIT);
        }
    }
    for op in rest.get(128..).unwrap_or(&[]).chunks(9) {
        let tp = le64(op, 1) & 0xFFF;
        match op[0] % 3 {
            0 => {
                let ok = dispatch::table_insert(&mut slots, bits, tp);
                let valid = tp != 0 && tp & TOMBSTONE_BIT == 0;
                assert!(!ok || valid);
                assert_eq!(dispatch::table_contains(&slots, bits, tp), ok);
            }
            1 => {
                let found = dispatch::table_find(&slots, bits, tp);
                let removed = dispatch::table_remove(&mut slots, bits, tp);
                assert_eq!(found, removed);
                if let Some(i) = removed {
                    assert_eq!(slots[i], tp | TOMBSTONE_BIT);
                    assert!(!dispatch::table_contains(&slots, bits, tp));
                }
            }
            _ => {
                if let Some(i) = dispatch::table_find(&slots, bits, tp) {
                    assert_eq!(slots[i], tp);
                }
            }
        }
    }
}
