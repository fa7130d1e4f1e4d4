//! The `.eh_frame` of one module, parsed with gimli: a sorted index of its
//! FDEs (which one covers an address, is it a signal trampoline) and the CFI
//! row at an address reduced to the few rules the unwinder evaluates.
//!
//! Addresses here are the ones the `.eh_frame` itself states (link-time
//! addresses for an ELF file, run-time addresses for relocated code).

use std::sync::Arc;

use gimli::{
    BaseAddresses, CfaRule, CieOrFde, EhFrame, EhFrameOffset, EndianSlice, LittleEndian, Register,
    RegisterRule, UnwindContext, UnwindSection, X86_64,
};

type Section<'a> = EhFrame<EndianSlice<'a, LittleEndian>>;

/// A scratch context for evaluating CFI rows; reuse one per unwind.
pub(crate) type Context = UnwindContext<usize>;

/// One FDE: the code range it describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Fde {
    pub start: u64,
    /// Exclusive.
    pub end: u64,
    /// Its CIE has the `S` augmentation (a signal return trampoline such as
    /// glibc's `__restore_rt`).
    pub signal: bool,
    offset: usize,
}

/// Which register the CFA is computed from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CfaBase {
    Sp,
    Bp,
}

/// How the caller's rbp is recovered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BpRule {
    /// Unchanged (callee-saved and not saved, or explicitly same value).
    Same,
    /// Saved at CFA + offset.
    At(i64),
    /// Equal to CFA + offset.
    ValOffset(i64),
    /// Not recoverable by this unwinder.
    Unknown,
}

/// The CFI row at one address, reduced to what the unwinder evaluates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Row {
    /// The return address is explicitly undefined (`DW_CFA_undefined` of the
    /// return-address column): this is the thread's outermost frame.
    Outermost,
    /// CFA = base + offset; return address at CFA + `ra`; rbp per `bp`.
    Step {
        base: CfaBase,
        offset: i64,
        ra: i64,
        bp: BpRule,
    },
}

/// The parsed `.eh_frame` of one module.
pub(crate) struct Cfi {
    data: Arc<[u8]>,
    bases: BaseAddresses,
    /// Sorted by start; empty FDEs left out.
    fdes: Vec<Fde>,
}

fn section(data: &[u8]) -> Section<'_> {
    let mut s = EhFrame::new(data, LittleEndian);
    s.set_address_size(8);
    s
}

impl Cfi {
    /// Parses every entry of `data` (an `.eh_frame` section whose start lies
    /// at `bases.eh_frame.section`). A malformed entry fails the whole
    /// section: a module whose CFI cannot be read is better not trusted.
    pub fn parse(data: Arc<[u8]>, bases: BaseAddresses) -> Result<Cfi, String> {
        let eh = section(&data);
        let mut fdes = Vec::new();
        let mut entries = eh.entries(&bases);
        loop {
            let entry = entries
                .next()
                .map_err(|e| format!("malformed .eh_frame: {e}"))?;
            let Some(entry) = entry else { break };
            let CieOrFde::Fde(partial) = entry else {
                continue;
            };
            let fde = partial
                .parse(Section::cie_from_offset)
                .map_err(|e| format!("malformed .eh_frame FDE: {e}"))?;
            if fde.len() == 0 {
                continue;
            }
            let end = fde
                .initial_address()
                .checked_add(fde.len())
                .ok_or_else(|| "an .eh_frame FDE wraps around the address space".to_string())?;
            fdes.push(Fde {
                start: fde.initial_address(),
                end,
                signal: fde.is_signal_trampoline(),
                offset: fde.offset(),
            });
        }
        fdes.sort_by_key(|f| (f.start, f.end));
        Ok(Cfi { data, bases, fdes })
    }

    /// The FDEs, sorted by start address.
    pub fn fdes(&self) -> &[Fde] {
        &self.fdes
    }

    /// The FDE covering `addr`: the one starting last at or before it, if
    /// it reaches `addr` (the rule `.eh_frame_hdr` lookups follow too).
    pub fn fde_at(&self, addr: u64) -> Option<Fde> {
        let i = self.fdes.partition_point(|f| f.start <= addr);
        let fde = *self.fdes.get(i.checked_sub(1)?)?;
        (addr < fde.end).then_some(fde)
    }

    /// The row of `fde` at `addr`, or why the unwinder cannot use it.
    pub fn row_at(&self, fde: &Fde, addr: u64, ctx: &mut Context) -> Result<Row, String> {
        let eh = section(&self.data);
        let parsed = eh
            .fde_from_offset(
                &self.bases,
                EhFrameOffset(fde.offset),
                Section::cie_from_offset,
            )
            .map_err(|e| format!("its FDE cannot be parsed ({e})"))?;
        let cie = parsed.cie();
        let ra_reg = cie.return_address_register();
        if ra_reg != X86_64::RA {
            return Err(format!(
                "its CIE names register {} as the return address",
                ra_reg.0
            ));
        }
        let row = parsed
            .unwind_info_for_address(&eh, &self.bases, ctx, addr)
            .map_err(|e| format!("its CFI cannot be evaluated ({e})"))?;
        let ra = match row.register(ra_reg) {
            // gimli keeps an explicit DW_CFA_undefined apart from a register
            // the CFI never mentions (None).
            Some(RegisterRule::Undefined) => return Ok(Row::Outermost),
            Some(RegisterRule::Offset(n)) => n,
            None => return Err("its CFI gives no rule for the return address".into()),
            Some(other) => {
                return Err(format!(
                    "its CFI recovers the return address by an unsupported rule ({other:?})"
                ))
            }
        };
        let (base, offset) = match *row.cfa() {
            CfaRule::RegisterAndOffset { register, offset } => match register {
                X86_64::RSP => (CfaBase::Sp, offset),
                X86_64::RBP => (CfaBase::Bp, offset),
                Register(r) => {
                    return Err(format!(
                        "its CFI computes the CFA from DWARF register {r}, which the unwinder does not track"
                    ))
                }
            },
            CfaRule::Expression(_) => {
                return Err("its CFI computes the CFA with a DWARF expression".into())
            }
        };
        let bp = match row.register(X86_64::RBP) {
            None | Some(RegisterRule::SameValue) => BpRule::Same,
            Some(RegisterRule::Offset(n)) => BpRule::At(n),
            Some(RegisterRule::ValOffset(n)) => BpRule::ValOffset(n),
            Some(_) => BpRule::Unknown,
        };
        Ok(Row::Step {
            base,
            offset,
            ra,
            bp,
        })
    }
}
