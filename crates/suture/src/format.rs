//! Text and JSON output of the commands.

use anyhow::Result;
use serde::Serialize;
use std::fmt::Write;
use suture_engine::report::{CheckReport, DisableReport, ForceReport, FrameStatus, Held};
use suture_engine::{ApplyReport, ProcessEntry, StatusReport};

/// Print `r` as JSON or through its text formatter. A reader that went
/// away (`suture status PID | head`) is not an error: the operation itself
/// is done.
pub fn print<T: Serialize + ?Sized>(json: bool, r: &T, text: fn(&T) -> String) -> Result<()> {
    let out = if json {
        serde_json::to_string_pretty(r)? + "\n"
    } else {
        text(r)
    };
    let mut stdout = std::io::stdout().lock();
    match std::io::Write::write_all(&mut stdout, out.as_bytes())
        .and_then(|()| std::io::Write::flush(&mut stdout))
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

pub fn apply(r: &ApplyReport) -> String {
    let mut s = format!(
        "applied patch '{}' to process {}: {} function(s) redirected; code at {} ({} bytes)\n",
        r.patch,
        r.pid,
        r.funcs.len(),
        r.image,
        r.image_size
    );
    for f in &r.funcs {
        let _ = writeln!(
            s,
            "  {}{} {} -> {}",
            f.object
                .as_deref()
                .map(|o| format!("{o}:"))
                .unwrap_or_default(),
            f.name,
            f.old_addr,
            f.new_addr
        );
    }
    if !r.replaced.is_empty() {
        let _ = writeln!(s, "  replaced: {}", r.replaced.join(", "));
    }
    for c in &r.callbacks {
        let _ = writeln!(s, "  callback {c}");
    }
    held(&mut s, &r.held);
    s
}

/// What the command's stops cost the target, in one line.
fn held(s: &mut String, h: &Held) {
    fn dur(us: u64) -> String {
        if us >= 10_000 {
            format!("{:.0} ms", us as f64 / 1000.0)
        } else if us >= 1000 {
            format!("{:.1} ms", us as f64 / 1000.0)
        } else {
            format!("{us} µs")
        }
    }
    let mut parts = Vec::new();
    if h.whole_stops > 0 {
        parts.push(format!(
            "all {} thread(s) at once {}x (each at most {}, all stopped together at most {})",
            h.whole_threads,
            h.whole_stops,
            dur(h.whole_held_us),
            dur(h.whole_all_us)
        ));
    }
    if h.check_stops > 0 {
        parts.push(format!(
            "single threads to look at them {}x (each at most {})",
            h.check_stops,
            dur(h.check_held_us)
        ));
    }
    if h.borrow_stops > 0 {
        parts.push(format!(
            "one thread borrowed for system calls {}x (each at most {})",
            h.borrow_stops,
            dur(h.borrow_held_us)
        ));
    }
    if !parts.is_empty() {
        let _ = writeln!(s, "  target held: {}", parts.join("; "));
    }
}

pub fn disable(r: &DisableReport) -> String {
    if r.reversed {
        return format!(
            "reversing the transition of patch '{}' in process {}: threads already back count as done\n",
            r.patch, r.pid
        );
    }
    let mut s = format!("disabled patch '{}' in process {}", r.patch, r.pid);
    if !r.restored.is_empty() {
        let _ = write!(s, "; original code restored: {}", r.restored.join(", "));
    }
    let _ = write!(s, "; {} bytes freed", r.freed_bytes);
    if r.deferred_bytes > 0 {
        let _ = write!(
            s,
            ", {} bytes kept until no thread can still be using them",
            r.deferred_bytes
        );
    }
    s.push('\n');
    for c in &r.callbacks {
        let _ = writeln!(s, "  callback {c}");
    }
    held(&mut s, &r.held);
    s
}

pub fn status(r: &StatusReport) -> String {
    let mut s = String::new();
    if r.patches.is_empty() {
        let _ = writeln!(s, "process {}: no patches", r.pid);
    } else {
        let _ = writeln!(s, "process {}: {} patch(es)", r.pid, r.patches.len());
    }
    for p in &r.patches {
        let _ = writeln!(
            s,
            "  {}. {}  enabled={} transition={} replace={}{}",
            p.stack_order,
            p.name,
            yes(p.enabled),
            yes(p.transition),
            yes(p.replace),
            if p.forced { " forced=yes" } else { "" }
        );
        for st in &p.states {
            let _ = writeln!(s, "     state id={} version={}", st.id, st.version);
        }
        for o in &p.objects {
            let _ = writeln!(
                s,
                "     object {} ({}, build-id {})  patched={}",
                o.name.as_deref().unwrap_or("[main program]"),
                o.path,
                o.build_id.as_deref().unwrap_or("none"),
                yes(o.patched)
            );
            for f in &o.funcs {
                let _ = writeln!(
                    s,
                    "       {},{}  patched={} transition={} nop={}  {} -> {}",
                    f.name,
                    f.sympos,
                    yes(f.patched),
                    yes(f.transition),
                    yes(f.nop),
                    f.old_addr,
                    f.new_addr.as_deref().unwrap_or("original")
                );
            }
        }
    }
    match &r.transition {
        None => s.push_str("  transition: none\n"),
        Some(t) => {
            let _ = writeln!(
                s,
                "  transition: '{}' to {}{}: {}/{} thread(s) switched, {} pending",
                t.patch,
                t.target,
                if t.reversed { " (reversed)" } else { "" },
                t.switched,
                t.threads,
                t.pending.len()
            );
            match t.worker {
                Some(w) => {
                    let _ = writeln!(s, "    worker: pid {w}, retrying every second");
                }
                None => {
                    let _ = writeln!(
                        s,
                        "    worker: none running (`suture wait {}` starts one)",
                        r.pid
                    );
                }
            }
            s.push_str(&crate::transition::pending_text(&t.pending));
            if !t.unexamined.is_empty() {
                let _ = writeln!(
                    s,
                    "    not examined yet: {}",
                    t.unexamined
                        .iter()
                        .map(|t| t.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            // Every thread's state, unless there are too many to read.
            if t.thread_states.len() <= 64 {
                for th in &t.thread_states {
                    let _ = writeln!(s, "    thread {}: {}", th.tid, th.state);
                }
            }
        }
    }
    s
}

/// One stack frame: `function+0xoff (file:line) [object]`.
pub fn frame(f: &FrameStatus) -> String {
    let mut s = match (&f.function, f.offset) {
        (Some(n), Some(o)) => format!("{n}+{o:#x}"),
        (Some(n), None) => n.clone(),
        _ => f.address.clone(),
    };
    if let (Some(file), Some(line)) = (&f.file, f.line) {
        let _ = write!(s, " ({file}:{line})");
    }
    if let Some(o) = &f.object {
        let _ = write!(s, " [{o}]");
    }
    if f.function.is_some() {
        let _ = write!(s, " at {}", f.address);
    }
    s
}

pub fn force(r: &ForceReport) -> String {
    let mut s = format!(
        "forced the transition of patch '{}' in process {} to {}: {} thread(s) switched without a stack check\n",
        r.patch,
        r.pid,
        r.target,
        r.switched.len()
    );
    let _ = writeln!(
        s,
        "  WARNING: consistency was overridden; patches marked forced (their code is never freed): {}",
        r.forced.join(", ")
    );
    s
}

pub fn list(r: &Vec<ProcessEntry>) -> String {
    let mut s = String::new();
    if r.is_empty() {
        s.push_str("no process carries suture patches\n");
    }
    for p in r {
        match &p.error {
            Some(e) => {
                let _ = writeln!(s, "{} {}: {}", p.pid, p.command, e);
            }
            None => {
                let _ = writeln!(s, "{} {}: {}", p.pid, p.command, p.patches.join(", "));
            }
        }
    }
    s
}

pub fn check(r: &CheckReport) -> String {
    let mut s = format!(
        "patch '{}' can be applied to process {} (nothing was changed):\n",
        r.patch, r.pid
    );
    for c in &r.checks {
        let _ = writeln!(s, "  ok  {:<10} {}", c.check, c.detail);
    }
    s
}
