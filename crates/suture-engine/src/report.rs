//! What operations report: plain data, serialised as the CLI's JSON and
//! formatted by it as text.

use serde::Serialize;
use suture_model::{Code, Model, SiteMode};

use crate::record::Record;

#[derive(Debug, Serialize)]
pub struct FuncStatus {
    pub name: String,
    /// Shown as the kernel does: 0 as 1.
    pub sympos: u64,
    pub nop: bool,
    pub patched: bool,
    pub transition: bool,
    pub old_addr: String,
    pub new_addr: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ObjectStatus {
    pub name: Option<String>,
    pub path: String,
    pub build_id: Option<String>,
    pub patched: bool,
    pub funcs: Vec<FuncStatus>,
}

#[derive(Debug, Serialize)]
pub struct PatchStatus {
    pub name: String,
    pub enabled: bool,
    pub transition: bool,
    pub replace: bool,
    pub forced: bool,
    pub stack_order: usize,
    pub objects: Vec<ObjectStatus>,
    pub states: Vec<StateStatus>,
}

#[derive(Debug, Serialize)]
pub struct StateStatus {
    pub id: u64,
    pub version: u32,
}

#[derive(Debug, Serialize)]
pub struct TransitionStatus {
    pub patch: String,
    pub target: String,
    pub pending: Vec<PendingThread>,
}

#[derive(Debug, Serialize)]
pub struct PendingThread {
    pub tid: i32,
    pub name: String,
    pub frames: Vec<String>,
}

/// One patched function as the site sees it.
#[derive(Debug, Serialize)]
pub struct SiteStatus {
    pub function: String,
    pub address: String,
    /// "jump" to new code, "original", or "dispatch" during a transition.
    pub mode: String,
    pub target: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub pid: i32,
    pub patches: Vec<PatchStatus>,
    pub transition: Option<TransitionStatus>,
    pub sites: Vec<SiteStatus>,
}

fn hex(a: u64) -> String {
    format!("{a:#x}")
}

fn code(c: Code) -> Option<String> {
    match c {
        Code::Original => None,
        Code::New(a) => Some(hex(a)),
    }
}

impl StatusReport {
    pub fn from_record(pid: i32, rec: &Record) -> Self {
        let m: &Model = &rec.model;
        let transition = m.transition();
        let patches = m
            .patches()
            .iter()
            .enumerate()
            .map(|(i, p)| PatchStatus {
                name: p.name.clone(),
                enabled: p.enabled,
                transition: transition.is_some_and(|t| t.patch == p.name),
                replace: p.replace,
                forced: p.forced,
                stack_order: i + 1,
                objects: p
                    .objects
                    .iter()
                    .map(|o| ObjectStatus {
                        name: o.name.clone(),
                        path: o.path.clone(),
                        build_id: o.build_id.clone(),
                        patched: o.patched,
                        funcs: o
                            .funcs
                            .iter()
                            .map(|f| FuncStatus {
                                name: f.old_name.clone(),
                                sympos: f.old_sympos.max(1),
                                nop: f.nop,
                                patched: f.patched,
                                transition: f.transition,
                                old_addr: hex(f.old_addr),
                                new_addr: code(f.code()),
                            })
                            .collect(),
                    })
                    .collect(),
                states: p
                    .states
                    .iter()
                    .map(|s| StateStatus {
                        id: s.id,
                        version: s.version,
                    })
                    .collect(),
            })
            .collect();
        let sites = rec
            .sites
            .values()
            .map(|s| {
                let (mode, target) = match m.site_mode(s.func_addr) {
                    SiteMode::Original => ("original", None),
                    SiteMode::Jump(c) => ("jump", code(c)),
                    SiteMode::Dispatch { patched, .. } => ("dispatch", code(patched)),
                };
                SiteStatus {
                    function: s.name.clone(),
                    address: hex(s.func_addr),
                    mode: mode.into(),
                    target,
                }
            })
            .collect();
        StatusReport {
            pid,
            patches,
            transition: transition.map(|t| TransitionStatus {
                patch: t.patch.clone(),
                target: format!("{:?}", t.target).to_lowercase(),
                pending: t
                    .pending
                    .iter()
                    .map(|tid| PendingThread {
                        tid: *tid,
                        name: String::new(),
                        frames: vec![],
                    })
                    .collect(),
            }),
            sites,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct FuncChange {
    pub object: Option<String>,
    pub name: String,
    pub sympos: u64,
    pub old_addr: String,
    pub new_addr: String,
    pub site: String,
}

#[derive(Debug, Serialize)]
pub struct ApplyReport {
    pub pid: i32,
    pub patch: String,
    pub replace: bool,
    pub image: String,
    pub image_size: u64,
    pub funcs: Vec<FuncChange>,
    /// Patches the new one replaced (atomic replace).
    pub replaced: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct DisableReport {
    pub pid: i32,
    pub patch: String,
    /// Functions whose original bytes are back.
    pub restored: Vec<String>,
    /// Memory released now, and memory kept because a thread may still use it.
    pub freed_bytes: u64,
    pub deferred_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct CheckItem {
    pub check: String,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub pid: i32,
    pub patch: String,
    pub checks: Vec<CheckItem>,
}

#[derive(Debug, Serialize)]
pub struct ProcessEntry {
    pub pid: i32,
    pub command: String,
    pub patches: Vec<String>,
    pub error: Option<String>,
}
