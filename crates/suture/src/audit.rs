//! The audit log: every change suture makes to a process, or tries to (who,
//! what patch with its SHA-256, which process, the result), as one JSON
//! line in a file (`SUTURE_AUDIT_LOG`, default
//! `/var/log/suture/audit.jsonl`) and one line in the system log
//! (authpriv). Failing to write the log is reported, never fatal.

use serde::Serialize;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Serialize)]
struct Entry<'a> {
    /// Seconds since the epoch.
    time: u64,
    uid: u32,
    operation: &'a str,
    pid: i32,
    /// The target's command name and executable.
    command: String,
    exe: String,
    patch: Option<&'a str>,
    patch_file: Option<String>,
    sha256: Option<String>,
    result: &'a str,
    error: Option<String>,
}

fn log_path() -> PathBuf {
    std::env::var_os("SUTURE_AUDIT_LOG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/log/suture/audit.jsonl"))
}

fn sha256(path: &Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    Some(
        Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}

/// Record one operation and its outcome.
pub fn record<T>(
    operation: &str,
    pid: i32,
    patch: Option<&str>,
    file: Option<&Path>,
    outcome: &anyhow::Result<T>,
) {
    let time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let read = |f: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/{f}"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let entry = Entry {
        time,
        // SAFETY: getuid has no preconditions and cannot fail.
        uid: unsafe { libc::getuid() },
        operation,
        pid,
        command: read("comm"),
        exe: std::fs::read_link(format!("/proc/{pid}/exe"))
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        patch,
        patch_file: file.map(|f| {
            std::fs::canonicalize(f)
                .unwrap_or_else(|_| f.to_path_buf())
                .display()
                .to_string()
        }),
        sha256: file.and_then(sha256),
        result: if outcome.is_ok() { "ok" } else { "error" },
        error: outcome.as_ref().err().map(|e| format!("{e:#}")),
    };
    let line = serde_json::to_string(&entry).expect("entry serialises");
    let path = log_path();
    let written = (|| {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        writeln!(f, "{line}")
    })();
    if let Err(e) = written {
        eprintln!(
            "suture: warning: cannot write the audit log {}: {e}",
            path.display()
        );
    }
    syslog(&line);
}

fn syslog(line: &str) {
    let Ok(msg) = std::ffi::CString::new(line.replace('\0', " ")) else {
        return;
    };
    // SAFETY: the format and message are valid NUL-terminated strings that
    // outlive the calls; openlog keeps the static ident pointer.
    unsafe {
        libc::openlog(c"suture".as_ptr(), libc::LOG_PID, libc::LOG_AUTHPRIV);
        libc::syslog(libc::LOG_NOTICE, c"%s".as_ptr(), msg.as_ptr());
        libc::closelog();
    }
}
