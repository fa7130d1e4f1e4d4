//! The objects (main program and shared objects) a process maps, read from
//! `/proc/PID/maps` and their ELF files, parsed on demand.

use crate::Error;
use std::cell::OnceCell;
use std::path::Path;
use std::sync::Arc;
use suture_elf::ObjectFile;
use suture_process::{Mapping, Process};

/// One ELF file mapped by the target.
pub struct LoadedObject {
    pub path: String,
    /// Lowest and highest address of its mappings.
    pub start: u64,
    pub end: u64,
    /// Address of its first mapping, and that mapping's file offset.
    first: (u64, u64),
    first_end: u64,
    pub is_main: bool,
    /// Its executable mappings, `[start, end)`.
    pub exec_ranges: Vec<(u64, u64)>,
    pid: i32,
    bytes: OnceCell<Result<Arc<Vec<u8>>, String>>,
    parsed: OnceCell<Result<(ObjectFile, u64), String>>,
}

impl LoadedObject {
    pub fn basename(&self) -> &str {
        Path::new(&self.path)
            .file_name()
            .and_then(|s| s.to_str())
            .unwrap_or(&self.path)
    }

    /// The file's bytes, read once.
    pub fn bytes(&self) -> Result<Arc<Vec<u8>>, Error> {
        let r = self.bytes.get_or_init(|| {
            // map_files opens exactly the file mapped, even across mount
            // namespaces or after the path was replaced on disk.
            let via = format!(
                "/proc/{}/map_files/{:x}-{:x}",
                self.pid, self.first.0, self.first_end
            );
            std::fs::read(&via)
                .or_else(|_| std::fs::read(format!("/proc/{}/root{}", self.pid, self.path)))
                .or_else(|_| std::fs::read(&self.path))
                .map(Arc::new)
                .map_err(|e| format!("cannot read {}: {e}", self.path))
        });
        r.clone().map_err(Error::Object)
    }

    /// The parsed file and its load bias.
    pub fn elf(&self) -> Result<(&ObjectFile, u64), Error> {
        let r = self.parsed.get_or_init(|| {
            let bytes = self.bytes().map_err(|e| e.to_string())?;
            let file = ObjectFile::parse(&bytes).map_err(|e| format!("{}: {e}", self.path))?;
            let bias = file
                .load_bias(self.first.0, self.first.1)
                .ok_or_else(|| format!("cannot compute the load address of {}", self.path))?;
            Ok((file, bias))
        });
        match r {
            Ok((f, b)) => Ok((f, *b)),
            Err(e) => Err(Error::Object(e.clone())),
        }
    }

    fn new(pid: i32, path: String, m: &Mapping, is_main: bool) -> Self {
        LoadedObject {
            path,
            start: m.start,
            end: m.end,
            first: (m.start, m.offset),
            is_main,
            exec_ranges: Vec::new(),
            pid,
            bytes: OnceCell::new(),
            parsed: OnceCell::new(),
            first_end: m.end,
        }
    }
}

/// Every ELF object the target maps, in address order.
pub struct Objects {
    pub list: Vec<LoadedObject>,
    /// The process they belong to.
    pid: i32,
    /// Where the kernel mapped the vDSO (`clock_gettime` and friends).
    vdso: Option<(u64, u64)>,
}

/// The vDSO as the unwinder needs it: its ELF image, read from the
/// target's memory (it has no file), its load bias and its range.
pub struct Vdso {
    pub image: Vec<u8>,
    pub bias: u64,
    pub range: (u64, u64),
}

fn is_file_path(p: &str) -> bool {
    p.starts_with('/') && !p.starts_with("/memfd:") && !p.starts_with("/dev/")
}

impl Objects {
    pub fn discover(proc: &Process, maps: &[Mapping]) -> Result<Objects, Error> {
        let exe = proc.exe().ok().map(|p| {
            let s = p.to_string_lossy().to_string();
            s.trim_end_matches(" (deleted)").to_string()
        });
        let mut list: Vec<LoadedObject> = Vec::new();
        let mut vdso = None;
        for m in maps {
            let Some(path) = m.path.as_deref() else {
                continue;
            };
            if path == "[vdso]" {
                vdso = Some((m.start, m.end));
            }
            if !is_file_path(path) || m.inode == 0 {
                continue;
            }
            if let Some(o) = list.iter_mut().find(|o| o.path == path) {
                o.start = o.start.min(m.start);
                o.end = o.end.max(m.end);
                if m.executable() {
                    o.exec_ranges.push((m.start, m.end));
                }
                continue;
            }
            // Only files that are mapped from offset 0 are loaded objects.
            if m.offset != 0 {
                continue;
            }
            let is_main = exe.as_deref() == Some(path.trim_end_matches(" (deleted)"));
            let mut o = LoadedObject::new(proc.pid(), path.to_string(), m, is_main);
            if m.executable() {
                o.exec_ranges.push((m.start, m.end));
            }
            list.push(o);
        }
        // A process that exits loses its mappings and its executable link
        // first: say that, not that its program is missing.
        if !list.iter().any(|o| o.is_main) && !proc.is_alive() {
            return Err(suture_process::Error::Exited { pid: proc.pid() }.into());
        }
        // Data files mapped from offset 0 (locale archives...) are weeded
        // out lazily: their ELF parse fails and they never match a name.
        Ok(Objects {
            list,
            pid: proc.pid(),
            vdso,
        })
    }

    /// The vDSO's image, if the process has one and it parses: a thread
    /// reading the clock is inside it.
    pub fn vdso(&self, proc: &Process) -> Option<Vdso> {
        let (start, end) = self.vdso?;
        let image = proc.read_mem(start, (end - start) as usize).ok()?;
        let bias = ObjectFile::parse(&image).ok()?.load_bias(start, 0)?;
        Some(Vdso {
            image,
            bias,
            range: (start, end),
        })
    }

    pub fn main(&self) -> Result<&LoadedObject, Error> {
        self.list.iter().find(|o| o.is_main).ok_or_else(|| {
            Error::Object(format!(
                "cannot find the main program's mapping in process {} (is it exiting?)",
                self.pid
            ))
        })
    }

    /// The object a patch names: `None` is the main program; otherwise a
    /// soname, a file name or a full path.
    pub fn find(&self, name: Option<&str>) -> Result<&LoadedObject, Error> {
        let Some(name) = name else {
            return self.main();
        };
        if let Some(o) = self
            .list
            .iter()
            .find(|o| o.path == name || o.basename() == name)
        {
            return Ok(o);
        }
        for o in &self.list {
            if let Ok((f, _)) = o.elf() {
                if f.soname().as_deref() == Some(name) {
                    return Ok(o);
                }
            }
        }
        let loaded: Vec<&str> = self
            .list
            .iter()
            .filter(|o| !o.is_main && o.elf().is_ok())
            .map(|o| o.basename())
            .collect();
        Err(Error::ObjectNotMapped {
            name: name.to_string(),
            loaded: loaded.join(", "),
        })
    }

    /// The object whose mappings cover `addr`.
    pub fn containing(&self, addr: u64) -> Option<&LoadedObject> {
        self.list.iter().find(|o| addr >= o.start && addr < o.end)
    }
}
