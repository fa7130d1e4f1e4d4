//! Names for code addresses in reports: a function of a loaded object
//! (with file:line when the object has debug information), a patch's new
//! function, or suture's own site code.

use crate::memory::{SLOT_DISPATCH, SLOT_STUB};
use crate::objects::Objects;
use crate::record::Record;
use crate::report::FrameStatus;

pub struct Namer<'a> {
    objects: &'a Objects,
    rec: &'a Record,
}

impl<'a> Namer<'a> {
    pub fn new(objects: &'a Objects, rec: &'a Record) -> Self {
        Namer { objects, rec }
    }

    /// Describe `pc`; `is_return` for return addresses (looked up at the
    /// call instruction, one byte before).
    pub fn describe(&self, pc: u64, is_return: bool) -> FrameStatus {
        let lookup = if is_return { pc.wrapping_sub(1) } else { pc };
        let mut f = FrameStatus {
            address: format!("{pc:#x}"),
            function: None,
            offset: None,
            object: None,
            file: None,
            line: None,
        };
        for site in self.rec.sites.values() {
            let what = if lookup >= site.slot && lookup < site.slot + SLOT_STUB {
                "relocated entry"
            } else if lookup >= site.slot + SLOT_STUB && lookup < site.slot + SLOT_DISPATCH {
                "jump stub"
            } else if lookup >= site.slot + SLOT_DISPATCH
                && lookup < site.slot + crate::memory::SLOT_SIZE
            {
                "dispatch stub"
            } else {
                continue;
            };
            f.function = Some(format!("{} ({what}, suture)", site.name));
            f.offset = Some(pc - site.slot);
            f.object = Some("suture site code".into());
            return f;
        }
        for (name, m) in &self.rec.patches {
            if !m.text.contains(lookup) {
                continue;
            }
            f.object = Some(format!("patch {name}"));
            let func = m
                .funcs
                .iter()
                .find(|(s, e)| lookup >= *s && lookup < *e)
                .and_then(|(s, _)| {
                    let p = self.rec.model.patch(name)?;
                    let func = p.funcs().find(|x| x.new_addr == *s)?;
                    Some((func.old_name.clone(), *s))
                });
            if let Some((n, start)) = func {
                f.function = Some(format!("{n} (new)"));
                f.offset = Some(pc - start);
            }
            return f;
        }
        if let Some(o) = self.objects.containing(lookup) {
            f.object = Some(o.path.clone());
            if let Ok((elf, bias)) = o.elf() {
                if let Some((sym, off)) = elf.symbol_at(lookup - bias) {
                    f.function = Some(sym.name.clone());
                    f.offset = Some(off + (pc - lookup));
                }
                if let Ok(bytes) = o.bytes() {
                    if let Some((file, line)) = suture_unwind::file_line(&bytes, lookup - bias) {
                        f.file = Some(file);
                        f.line = Some(line);
                    }
                }
            }
        }
        f
    }
}
