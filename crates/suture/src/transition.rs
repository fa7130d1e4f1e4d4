//! Waiting for a transition after `apply` or `disable`: a progress line on a
//! terminal, the outcome in text or JSON, exit status 3 on timeout.

use crate::format;
use anyhow::{bail, Result};
use serde::Serialize;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::time::Duration;
use suture_engine::report::PendingThread;
use suture_engine::{StatusReport, WaitEnd};

/// The transition was still pending when the wait ran out (exit status 3).
#[derive(Debug)]
pub struct TimedOut(pub String);

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TimedOut {}

/// A command's report plus where its transition stands.
#[derive(Serialize)]
struct WithTransition<'a, T: Serialize> {
    #[serde(flatten)]
    report: &'a T,
    /// "complete", "in progress" (with --no-wait) or "timed out".
    transition: &'static str,
    /// Threads still pending when the command returned.
    waiting: &'a [PendingThread],
}

fn progress_printer(name: &str) -> impl FnMut(usize, usize) + '_ {
    let tty = std::io::stderr().is_terminal();
    let mut last = None;
    move |done, total| {
        if tty && last != Some((done, total)) {
            last = Some((done, total));
            eprint!("\r  transition of '{name}': {done}/{total} threads switched ");
            let _ = std::io::stderr().flush();
        }
    }
}

/// Explain the threads a transition still waits for.
pub fn pending_text(t: &[PendingThread]) -> String {
    let mut s = String::new();
    for p in t {
        let _ = writeln!(
            s,
            "    thread {} ({}): {}",
            p.tid,
            p.name,
            if p.reason.is_empty() {
                "not checked yet"
            } else {
                &p.reason
            }
        );
        for f in p.frames.iter().take(8) {
            let _ = writeln!(s, "      {}", format::frame(f));
        }
    }
    s
}

fn waiting_of(st: &StatusReport) -> Vec<PendingThread> {
    st.transition
        .as_ref()
        .map(|t| {
            t.pending
                .iter()
                .map(|p| PendingThread {
                    tid: p.tid,
                    name: p.name.clone(),
                    reason: p.reason.clone(),
                    frames: p.frames.clone(),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Print the report of `apply`/`disable` once its transition is complete,
/// has timed out, or (with --no-wait) has started. `want_present`: whether
/// the patch should be listed once the transition is over.
#[allow(clippy::too_many_arguments)]
pub fn finish_command<T: Serialize>(
    pid: i32,
    name: &str,
    pending: usize,
    wait: crate::WaitArgs,
    json: bool,
    report: T,
    text: fn(&T) -> String,
    want_present: bool,
) -> Result<()> {
    let print = |state: &'static str, waiting: &[PendingThread], extra: &str| -> Result<()> {
        if json {
            let w = WithTransition {
                report: &report,
                transition: state,
                waiting,
            };
            println!("{}", serde_json::to_string_pretty(&w)?);
        } else {
            print!("{}{extra}", text(&report));
        }
        Ok(())
    };
    if pending == 0 {
        return print("complete", &[], "");
    }
    if wait.no_wait {
        // Return once the worker watches the pending threads.
        if !suture_engine::worker_ready(pid, name, Duration::from_secs(10))? {
            eprintln!(
                "suture: warning: the transition worker has not started yet; `suture wait {pid}` starts one"
            );
        }
        let st = suture_engine::status(pid)?;
        let waiting = waiting_of(&st);
        let extra = format!(
            "  transition in progress: {pending} thread(s) pending; a worker completes it (`suture status {pid}` shows it)\n"
        );
        return print("in progress", &waiting, &extra);
    }
    let mut progress = progress_printer(name);
    let end = suture_engine::wait(
        pid,
        name,
        Some(Duration::from_secs_f64(wait.timeout.max(0.0))),
        &mut progress,
    )?;
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
    match end {
        WaitEnd::Complete { present } if present == want_present => print("complete", &[], ""),
        WaitEnd::Complete { .. } => bail!(
            "the transition of patch '{name}' was reversed by another command before it completed; `suture status {pid}` shows the result"
        ),
        WaitEnd::TimedOut(st) => {
            let waiting = waiting_of(&st);
            let extra = format!(
                "  transition still in progress after {}s, waiting for {} thread(s):\n{}",
                wait.timeout,
                waiting.len(),
                pending_text(&waiting)
            );
            print("timed out", &waiting, &extra)?;
            Err(TimedOut(format!(
                "timed out waiting for the transition of patch '{name}' in process {pid}; it goes on in the background (`suture status {pid}`; `suture force {pid}` overrides consistency)"
            ))
            .into())
        }
    }
}

/// `suture wait PID`.
pub fn wait_command(pid: i32, timeout: f64, json: bool) -> Result<()> {
    let st = suture_engine::status(pid)?;
    let Some(t) = &st.transition else {
        if json {
            println!("{{\"pid\": {pid}, \"transition\": null}}");
        } else {
            println!("process {pid}: no transition in progress");
        }
        return Ok(());
    };
    let name = t.patch.clone();
    let mut progress = progress_printer(&name);
    let end = suture_engine::wait(
        pid,
        &name,
        Some(Duration::from_secs_f64(timeout.max(0.0))),
        &mut progress,
    )?;
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
    match end {
        WaitEnd::Complete { .. } => {
            let st = suture_engine::status(pid)?;
            format::print(json, &st, format::status)
        }
        WaitEnd::TimedOut(st) => {
            format::print(json, &*st, format::status)?;
            Err(TimedOut(format!(
                "timed out waiting for the transition of patch '{name}' in process {pid}; it goes on in the background"
            ))
            .into())
        }
    }
}
