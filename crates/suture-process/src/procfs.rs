//! Small parsers for the `/proc` files this crate reads.
//!
//! Everything here is pure string handling or a plain file read: no ptrace.

use std::fs;
use std::io;
use std::path::Path;

use crate::{Error, Mapping, Result, Tid};

/// The fields of `/proc/PID/stat` (or `/proc/PID/task/TID/stat`) this crate uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stat {
    /// Field 3: R, S, D, T, t, Z, X, ...
    pub state: char,
    /// Field 4.
    pub ppid: i32,
    /// Field 22, in clock ticks since boot.
    pub start_time: u64,
    /// Fields 14 and 15 (user and system time), in clock ticks.
    pub cpu_ticks: u64,
}

impl Stat {
    /// Dead (zombie) or being torn down.
    pub fn is_dead(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Parses the text of a `stat` file. The command name (field 2) is in
/// parentheses and may itself contain spaces and parentheses, so the fields
/// are counted from the last `)`.
pub(crate) fn parse_stat(text: &str) -> Option<Stat> {
    let close = text.rfind(')')?;
    // f[0] is field 3 (state); field N is f[N - 3].
    let f: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let field = |n: usize| f.get(n - 3).copied();
    let num = |n: usize| field(n)?.parse::<u64>().ok();
    Some(Stat {
        state: field(3)?.chars().next()?,
        ppid: field(4)?.parse().ok()?,
        start_time: num(22)?,
        cpu_ticks: num(14)? + num(15)?,
    })
}

/// Reads and parses a stat file. `Ok(None)` when the file does not exist
/// (the process or thread is gone).
pub(crate) fn read_stat(path: &Path) -> Result<Option<Stat>> {
    match fs::read_to_string(path) {
        Ok(text) => parse_stat(&text).map(Some).ok_or_else(|| Error::Io {
            context: format!("parsing {}", path.display()),
            source: io::Error::new(io::ErrorKind::InvalidData, "unexpected format"),
        }),
        Err(e) if is_gone(&e) => Ok(None),
        Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
    }
}

/// `true` for the errors reading a `/proc/PID/...` file gives once the
/// process or thread has gone away.
pub(crate) fn is_gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH)
}

/// Value of a `Key:\tvalue` line of a `status` file.
pub(crate) fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k == key).then(|| v.trim())
    })
}

/// The process (thread group) thread `tid` belongs to, from `/proc/TID/status`.
pub(crate) fn tgid_of(tid: Tid) -> Option<i32> {
    let status = fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status_field(&status, "Tgid")?.parse().ok()
}

/// First number of a `status` field (e.g. the real uid of `Uid:`), or all of them.
pub(crate) fn status_numbers(status: &str, key: &str) -> Vec<u64> {
    status_field(status, key)
        .map(|v| {
            v.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Parses one line of `/proc/PID/maps`:
/// `start-end perms offset dev inode [path]`. The path may contain spaces
/// and starts after the run of blanks that follows the inode.
pub(crate) fn parse_maps_line(line: &str) -> Option<Mapping> {
    let mut rest = line;
    let mut next_field = || -> Option<&str> {
        let trimmed = rest.trim_start_matches([' ', '\t']);
        let end = trimmed.find([' ', '\t']).unwrap_or(trimmed.len());
        let (field, tail) = trimmed.split_at(end);
        rest = tail;
        (!field.is_empty()).then_some(field)
    };
    let range = next_field()?;
    let perms = next_field()?.to_string();
    let offset = u64::from_str_radix(next_field()?, 16).ok()?;
    let dev = next_field()?.to_string();
    let inode = next_field()?.parse().ok()?;
    let (start, end) = range.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let path = rest.trim_start_matches([' ', '\t']);
    let path = (!path.is_empty()).then(|| path.to_string());
    Some(Mapping {
        start,
        end,
        perms,
        offset,
        dev,
        inode,
        path,
    })
}

/// Parses the whole text of `/proc/PID/maps`, skipping lines it does not understand.
pub(crate) fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines().filter_map(parse_maps_line).collect()
}

/// Thread ids listed in a `task` directory, sorted.
pub(crate) fn list_tasks(dir: &Path) -> io::Result<Vec<Tid>> {
    let mut tids: Vec<Tid> = fs::read_dir(dir)?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable();
    Ok(tids)
}

/// Whether bit `cap` is set in a `CapEff:` style hexadecimal mask.
pub(crate) fn has_capability(status: &str, field: &str, cap: u32) -> bool {
    status_field(status, field)
        .and_then(|v| u64::from_str_radix(v, 16).ok())
        .is_some_and(|mask| mask & (1u64 << cap) != 0)
}

/// The user pc in the text of `/proc/PID/task/TID/syscall`: its last field
/// (`NR args... sp pc`, or `-1 sp pc` when asleep outside a system call).
/// `None` for `running` (the kernel shows registers only of a thread that
/// is asleep) or an unexpected format.
pub(crate) fn syscall_pc(text: &str) -> Option<u64> {
    let f: Vec<&str> = text.split_whitespace().collect();
    let nr = f.first()?.parse::<i64>().ok()?;
    if f.len() != if nr < 0 { 3 } else { 9 } {
        return None;
    }
    u64::from_str_radix(f.last()?.strip_prefix("0x")?, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_comm() {
        let text = "1234 (a) b (c) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 3 0 98765 1000 100 18446744073709551615";
        let s = parse_stat(text).unwrap();
        assert_eq!(s.state, 'S');
        assert_eq!(s.ppid, 1);
        assert_eq!(s.start_time, 98765);
    }

    #[test]
    fn stat_own_process_matches_field_22() {
        let text = fs::read_to_string("/proc/self/stat").unwrap();
        let s = parse_stat(&text).unwrap();
        let field22: u64 = text[text.rfind(')').unwrap() + 2..]
            .split(' ')
            .nth(19)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(s.start_time, field22);
        assert_eq!(s.ppid, std::os::unix::process::parent_id() as i32);
    }

    #[test]
    fn maps_lines() {
        let m = parse_maps_line(
            "55d0c8a00000-55d0c8a02000 r-xp 00001000 fd:01 1234567                    /usr/bin/my prog (deleted)",
        )
        .unwrap();
        assert_eq!(m.start, 0x55d0c8a00000);
        assert_eq!(m.end, 0x55d0c8a02000);
        assert_eq!(m.perms, "r-xp");
        assert_eq!(m.offset, 0x1000);
        assert_eq!(m.dev, "fd:01");
        assert_eq!(m.inode, 1234567);
        assert_eq!(m.path.as_deref(), Some("/usr/bin/my prog (deleted)"));
        assert!(m.readable() && m.executable() && !m.writable());

        let anon = parse_maps_line("7f0000000000-7f0000001000 rw-p 00000000 00:00 0 ").unwrap();
        assert_eq!(anon.path, None);
        let vdso = parse_maps_line(
            "7ffd1000-7ffd3000 r-xp 00000000 00:00 0                          [vdso]",
        )
        .unwrap();
        assert_eq!(vdso.path.as_deref(), Some("[vdso]"));
        assert!(parse_maps_line("garbage").is_none());
    }

    #[test]
    fn syscall_pc_of_each_form() {
        assert_eq!(syscall_pc("running\n"), None);
        assert_eq!(syscall_pc("-1 0x7ffd1000 0x401136\n"), Some(0x401136));
        assert_eq!(
            syscall_pc("230 0x1 0x0 0x7ffc 0x0 0x0 0x0 0x7ffd2000 0x7f00deadbeef\n"),
            Some(0x7f00_dead_beef)
        );
        assert_eq!(syscall_pc("230 0x1 0x401136\n"), None);
        assert_eq!(syscall_pc(""), None);
    }

    #[test]
    fn status_helpers() {
        let st =
            "Name:\tcat\nTracerPid:\t42\nUid:\t1000\t1000\t1000\t1000\nCapEff:\t0000000000080000\n";
        assert_eq!(status_field(st, "TracerPid"), Some("42"));
        assert_eq!(status_numbers(st, "Uid"), vec![1000, 1000, 1000, 1000]);
        assert!(has_capability(st, "CapEff", 19));
        assert!(!has_capability(st, "CapEff", 18));
    }
}
