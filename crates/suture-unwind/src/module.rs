//! The code the unwinder knows: ELF objects mapped in the target and
//! generated code with its own `.eh_frame`. Each becomes a [`Module`] (our
//! CFI index) and a framehop module over the same bytes.

use std::ops::Range;
use std::sync::Arc;

use framehop::ExplicitModuleSectionInfo;
use gimli::BaseAddresses;
use object::{Architecture, Object, ObjectSection};

use crate::cfi::Cfi;
use crate::Error;

/// The framehop side of a module.
pub(crate) type FramehopModule = framehop::Module<Arc<[u8]>>;

/// One module: where its code runs and its CFI.
pub(crate) struct Module {
    pub name: String,
    /// Run-time ranges of its code, sorted, non-empty, disjoint.
    pub ranges: Vec<(u64, u64)>,
    /// Run-time address minus the address its CFI states.
    pub bias: u64,
    pub cfi: Cfi,
}

impl Module {
    pub fn contains(&self, addr: u64) -> bool {
        self.ranges.iter().any(|&(s, e)| s <= addr && addr < e)
    }

    /// Lowest and highest run-time address of its code.
    pub fn span(&self) -> Range<u64> {
        self.ranges[0].0..self.ranges[self.ranges.len() - 1].1
    }
}

fn invalid(name: &str, what: impl Into<String>) -> Error {
    Error {
        name: name.to_string(),
        what: what.into(),
    }
}

/// Sorted, merged, validated copy of `ranges`.
fn check_ranges(name: &str, ranges: &[(u64, u64)]) -> Result<Vec<(u64, u64)>, Error> {
    let mut sorted = ranges.to_vec();
    sorted.sort_unstable();
    if sorted.is_empty() {
        return Err(invalid(name, "no executable range given"));
    }
    if let Some(&(s, e)) = sorted.iter().find(|&&(s, e)| s >= e) {
        return Err(invalid(name, format!("empty range {s:#x}..{e:#x}")));
    }
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(sorted.len());
    for (s, e) in sorted {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    Ok(merged)
}

/// An ELF object mapped with load bias `bias`, its code at `exec_ranges`.
pub(crate) fn from_elf(
    name: &str,
    bytes: &[u8],
    bias: u64,
    exec_ranges: &[(u64, u64)],
) -> Result<(Module, FramehopModule), Error> {
    let ranges = check_ranges(name, exec_ranges)?;
    let file = object::File::parse(bytes).map_err(|e| invalid(name, format!("not ELF: {e}")))?;
    if file.format() != object::BinaryFormat::Elf || file.architecture() != Architecture::X86_64 {
        return Err(invalid(name, "not an x86_64 ELF object"));
    }
    let range = |s: &object::Section<'_, '_>| s.address()..s.address().saturating_add(s.size());
    let data = |s: &object::Section<'_, '_>| -> Result<Arc<[u8]>, Error> {
        s.data()
            .map(Arc::from)
            .map_err(|e| invalid(name, format!("cannot read its {:?}: {e}", s.name())))
    };
    let text = file.section_by_name(".text").map(|s| range(&s));
    let got = file.section_by_name(".got").map(|s| range(&s));
    let (eh_frame, eh_range) = match file.section_by_name(".eh_frame") {
        Some(s) => (data(&s)?, range(&s)),
        // No CFI at all: every frame in it will be reported as such.
        None => (Arc::from(&[][..]), 0..0),
    };
    let hdr = match file.section_by_name(".eh_frame_hdr") {
        Some(s) => Some((data(&s)?, range(&s))),
        None => None,
    };
    let bases = BaseAddresses::default()
        .set_eh_frame(eh_range.start)
        .set_eh_frame_hdr(hdr.as_ref().map_or(0, |h| h.1.start))
        .set_text(text.as_ref().map_or(0, |t| t.start))
        .set_got(got.as_ref().map_or(0, |g| g.start));
    let cfi = Cfi::parse(eh_frame.clone(), bases).map_err(|e| invalid(name, e))?;
    let module = Module {
        name: name.to_string(),
        ranges,
        bias,
        cfi,
    };
    let span = module.span();
    let info = ExplicitModuleSectionInfo {
        base_svma: span.start.wrapping_sub(bias),
        text_svma: text,
        text: None,
        stubs_svma: None,
        stub_helper_svma: None,
        got_svma: got,
        unwind_info: None,
        eh_frame_svma: Some(eh_range),
        eh_frame: Some(eh_frame),
        eh_frame_hdr_svma: hdr.as_ref().map(|h| h.1.clone()),
        eh_frame_hdr: hdr.map(|h| h.0),
        debug_frame: None,
        text_segment_svma: None,
        text_segment: None,
    };
    let fh = framehop::Module::new(name.to_string(), span.clone(), span.start, info);
    Ok((module, fh))
}

/// Generated code at `code` whose relocated `.eh_frame` lies at `eh_frame_addr`.
pub(crate) fn from_code(
    name: &str,
    code: (u64, u64),
    eh_frame: Vec<u8>,
    eh_frame_addr: u64,
) -> Result<(Module, FramehopModule), Error> {
    let ranges = check_ranges(name, &[code])?;
    let eh_end = eh_frame_addr
        .checked_add(eh_frame.len() as u64)
        .ok_or_else(|| invalid(name, "its .eh_frame wraps around the address space"))?;
    let eh_frame: Arc<[u8]> = Arc::from(eh_frame);
    let bases = BaseAddresses::default()
        .set_eh_frame(eh_frame_addr)
        .set_text(code.0);
    let cfi = Cfi::parse(eh_frame.clone(), bases).map_err(|e| invalid(name, e))?;
    if let Some(f) = cfi
        .fdes()
        .iter()
        .find(|f| f.start < code.0 || f.end > code.1)
    {
        return Err(invalid(
            name,
            format!(
                "its .eh_frame describes {:#x}..{:#x}, outside its code {:#x}..{:#x}",
                f.start, f.end, code.0, code.1
            ),
        ));
    }
    let module = Module {
        name: name.to_string(),
        ranges,
        bias: 0,
        cfi,
    };
    let info = ExplicitModuleSectionInfo {
        base_svma: code.0,
        text_svma: Some(code.0..code.1),
        text: None,
        stubs_svma: None,
        stub_helper_svma: None,
        got_svma: None,
        unwind_info: None,
        eh_frame_svma: Some(eh_frame_addr..eh_end),
        eh_frame: Some(eh_frame),
        eh_frame_hdr_svma: None,
        eh_frame_hdr: None,
        debug_frame: None,
        text_segment_svma: None,
        text_segment: None,
    };
    let fh = framehop::Module::new(name.to_string(), code.0..code.1, code.0, info);
    Ok((module, fh))
}
