//! Bad input: one clear sentence, exit status 1, the target unchanged and
//! still running.

mod common;
use common::*;
use std::process::{Command, Stdio};

fn f(name: &str) -> String {
    fixture(name).to_str().unwrap().to_string()
}

/// Run `args` (with the target's pid as the second word) expecting failure,
/// and check the target kept running with its code and results unchanged.
fn refused(t: &mut Target, args: &[&str]) -> String {
    let a = t.addr("compute_static");
    let g = t.addr("compute_global");
    let before = (read_mem(t.pid, a, 8), read_mem(t.pid, g, 16));
    let maps_before = suture_maps(t.pid);
    let e = fails(args);
    assert_eq!(e.trim_end().lines().count(), 1, "one sentence: {e}");
    assert!(t.alive());
    assert_eq!((read_mem(t.pid, a, 8), read_mem(t.pid, g, 16)), before);
    assert_eq!(suture_maps(t.pid), maps_before, "suture memory left behind");
    let r = t.fresh_results();
    assert!(r.iter().all(|x| (x.1, x.2, x.3) == (2, 101, 1001)), "{r:?}");
    e
}

fn suture_maps(pid: i32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("/memfd:suture-") && !l.contains("/memfd:suture-state"))
        .map(String::from)
        .collect()
}

#[test]
fn no_such_process() {
    let e = fails(&["apply", "999999999", &f("static.o")]);
    assert!(e.contains("999999999"), "{e}");
    let e = fails(&["status", "999999999"]);
    assert!(
        e.contains("no process") || e.contains("No such") || e.contains("not exist"),
        "{e}"
    );
}

#[test]
fn usage_errors_exit_2() {
    let out = suture(&["apply"]);
    assert_eq!(out.status.code(), Some(2));
    let out = suture(&["apply", "notapid", "x.o"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn corrupt_and_foreign_patch_files() {
    let mut t = Target::standard("target");
    let p = t.pid.to_string();
    let e = refused(&mut t, &["apply", &p, &f("garbage.o")]);
    assert!(e.contains("garbage.o"), "{e}");
    let e = refused(&mut t, &["apply", &p, &f("nodesc.o")]);
    assert!(e.contains("SUTURE_PATCH"), "{e}");
    let e = refused(&mut t, &["apply", &p, "/nonexistent/patch.o"]);
    assert!(e.contains("/nonexistent/patch.o"), "{e}");
    // The same object marked as aarch64.
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(fixture("static.o")).unwrap();
    bytes[18] = 183;
    bytes[19] = 0;
    let arm = dir.path().join("arm.o");
    std::fs::write(&arm, bytes).unwrap();
    let e = refused(&mut t, &["apply", &p, arm.to_str().unwrap()]);
    assert!(
        e.to_lowercase().contains("aarch64") || e.contains("x86_64"),
        "{e}"
    );
    // A shared object is not a patch.
    let e = refused(&mut t, &["apply", &p, &f("libfixture.so")]);
    assert!(e.contains("relocatable"), "{e}");
}

#[test]
fn missing_symbol_suggests_close_names() {
    let mut t = Target::standard("target");
    let p = t.pid.to_string();
    let e = refused(&mut t, &["apply", &p, &f("missing.o")]);
    assert!(e.contains("compute_statik"), "{e}");
    assert!(e.contains("compute_static"), "suggestion missing: {e}");
}

#[test]
fn ambiguous_local_symbol_lists_candidates() {
    let mut t = Target::standard("target");
    let p = t.pid.to_string();
    let e = refused(&mut t, &["apply", &p, &f("dup0.o")]);
    assert!(e.contains("dup"), "{e}");
    assert!(
        e.contains('1') && e.contains('2'),
        "candidates with sympos: {e}"
    );
}

#[test]
fn object_not_mapped() {
    let mut t = Target::standard("target");
    let p = t.pid.to_string();
    let e = refused(&mut t, &["apply", &p, &f("noobj.o")]);
    assert!(e.contains("libnotloaded.so.3"), "{e}");
}

#[test]
fn build_id_mismatch() {
    let mut t = Target::standard("target");
    let p = t.pid.to_string();
    let e = refused(&mut t, &["apply", &p, &f("buildid.o")]);
    assert!(e.contains("build-id"), "{e}");
    assert!(e.contains("0123456789abcdef"), "{e}");
}

#[test]
fn already_applied_name() {
    let mut t = Target::standard("target");
    let p = t.pid.to_string();
    ok(&["apply", &p, &f("global.o")]);
    let g = t.addr("compute_global");
    let before = read_mem(t.pid, g, 16);
    let e = fails(&["apply", &p, &f("global.o")]);
    assert!(e.contains("already applied"), "{e}");
    assert_eq!(read_mem(t.pid, g, 16), before);
    ok(&["disable", &p, "global"]);
    let e = fails(&["disable", &p, "global"]);
    assert!(e.contains("global"), "{e}");
}

#[test]
fn function_too_small_or_with_branch_into_site() {
    let mut t = Target::start("tiny", &[]);
    let p = t.pid.to_string();
    let e = fails(&["apply", &p, &f("tiny.o")]);
    assert!(e.contains("tiny") && e.contains("bytes"), "{e}");
    let e = fails(&["apply", &p, &f("loopy.o")]);
    assert!(e.contains("loopy"), "{e}");
    assert!(t.alive());
}

#[test]
fn another_tracer_is_named() {
    let mut t = Target::standard("target");
    let p = t.pid.to_string();
    let mut strace = Command::new("strace")
        .args(["-f", "-o", "/dev/null", "-p", &p])
        .stderr(Stdio::piped())
        .spawn()
        .expect("strace");
    // Wait until strace is attached (TracerPid is set).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let st = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap();
        if st
            .lines()
            .any(|l| l.starts_with("TracerPid:") && l.trim_end() != "TracerPid:\t0")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "strace did not attach"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let e = fails(&["apply", &p, &f("static.o")]);
    let _ = strace.kill();
    let _ = strace.wait();
    assert!(e.contains("strace") || e.contains("traced"), "{e}");
    assert!(t.alive());
}

#[test]
fn target_that_exits_is_reported() {
    let t = Target::standard("target");
    let p = t.pid.to_string();
    // Kill the target, then ask for an apply on the dead (zombie/reaped) pid.
    let pid = t.pid;
    drop(t);
    let e = fails(&["apply", &pid.to_string(), &f("static.o")]);
    assert!(e.contains(&p), "{e}");
}

/// Runs `suture apply` paused after the patch is loaded, does `between`,
/// lets it continue, and returns its output.
fn apply_paused(t: &Target, between: impl FnOnce()) -> std::process::Output {
    apply_paused_at(t, "loaded", |_| between())
}

/// Runs `suture apply` paused at `point` (`SUTURE_TEST_PAUSE`), does
/// `between` (given the command, e.g. to kill it), lets it continue, and
/// returns its output.
fn apply_paused_at(
    t: &Target,
    point: &str,
    between: impl FnOnce(&mut std::process::Child),
) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("pause");
    let mut child = Command::new(SUTURE)
        .args(["apply", &t.pid.to_string(), &f("static.o")])
        .env("SUTURE_TEST_PAUSE", format!("{point}:{}", flag.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let reached = flag.with_extension("reached");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !reached.exists() {
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            panic!("suture never reached the pause at {point}");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    between(&mut child);
    std::fs::write(flag.with_extension("go"), "").unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn target_exiting_during_apply_is_a_clear_error() {
    let mut t = Target::standard("target");
    let pid = t.pid;
    let out = apply_paused(&t, || {
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    });
    assert_eq!(out.status.code(), Some(1));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("exited") || e.contains("no process"), "{e}");
    assert!(!t.alive());
}

#[test]
fn paused_apply_completes_when_target_lives() {
    let mut t = Target::standard("target");
    let out = apply_paused(&t, || {});
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = t.fresh_results();
    assert!(r.iter().all(|x| x.1 == 44), "{r:?}");
}

#[test]
fn unprivileged_user_gets_a_reason() {
    // The test runs as root; run suture as `nobody` against a root target.
    let mut t = Target::standard("target");
    let dir = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.path().join("suture");
    std::fs::copy(SUTURE, &bin).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .args(["apply", &t.pid.to_string(), "/nonexistent.o"])
        .output()
        .expect("setpriv");
    assert_eq!(out.status.code(), Some(1));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("not allowed to trace"), "{e}");
    assert!(
        e.contains("uid 65534") && e.contains("root"),
        "says why and what to do: {e}"
    );
    assert!(t.alive());
}

#[test]
fn every_change_is_audited_with_who_what_and_the_result() {
    let mut t = Target::standard("target");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let run = |args: &[&str]| {
        Command::new(SUTURE)
            .args(args)
            .env("SUTURE_AUDIT_LOG", &log)
            .output()
            .unwrap()
    };
    let pid = t.pid.to_string();
    let patch = fixture("static.o");
    assert!(run(&["apply", &pid, patch.to_str().unwrap()])
        .status
        .success());
    assert!(run(&["disable", &pid, "static"]).status.success());
    let missing = fixture("missing.o");
    assert_eq!(
        run(&["apply", &pid, missing.to_str().unwrap()])
            .status
            .code(),
        Some(1)
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[0]["operation"], "apply");
    assert_eq!(lines[0]["result"], "ok");
    assert_eq!(lines[0]["pid"], t.pid);
    assert_eq!(lines[0]["uid"], 0);
    assert_eq!(lines[0]["sha256"].as_str().unwrap().len(), 64);
    assert!(lines[0]["exe"].as_str().unwrap().ends_with("/target"));
    assert_eq!(lines[1]["operation"], "disable");
    assert_eq!(lines[2]["result"], "error");
    assert!(
        lines[2]["error"].as_str().unwrap().contains("symbol"),
        "{:?}",
        lines[2]
    );
    assert!(t.alive());
}

#[test]
fn patch_files_others_could_have_written_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let mut t = Target::standard("target");
    let pid = t.pid.to_string();
    let dir = tempfile::tempdir().unwrap();
    let patch = dir.path().join("static.o");
    std::fs::copy(fixture("static.o"), &patch).unwrap();
    let p = patch.to_str().unwrap();
    // World-writable file.
    std::fs::set_permissions(&patch, std::fs::Permissions::from_mode(0o666)).unwrap();
    let e = fails(&["apply", &pid, p]);
    assert!(e.contains("writable by group or others"), "{e}");
    assert!(e.contains("--allow-untrusted"), "{e}");
    let e = fails(&["check", &pid, p]);
    assert!(e.contains("writable by group or others"), "{e}");
    // Group-writable directory (not sticky).
    std::fs::set_permissions(&patch, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o775)).unwrap();
    let e = fails(&["apply", &pid, p]);
    assert!(e.contains(dir.path().to_str().unwrap()), "{e}");
    let st = json(&["status", &pid, "--json"]);
    assert!(st["patches"].as_array().unwrap().is_empty());
    // The operator may override; a safe file needs nothing.
    ok(&["apply", &pid, p, "--allow-untrusted"]);
    ok(&["disable", &pid, "static"]);
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    ok(&["apply", &pid, p]);
    assert!(t.alive());
}

#[test]
fn require_signed_accepts_only_patches_signed_with_a_known_key() {
    let mut t = Target::standard("target");
    let pid = t.pid.to_string();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let patch = dir.path().join("static.o");
    std::fs::copy(fixture("static.o"), &patch).unwrap();
    let p = patch.to_str().unwrap();
    let k = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    ok(&["keygen", &k("trusted")]);
    ok(&["keygen", &k("other")]);
    std::fs::rename(dir.path().join("trusted.pub"), keys.join("trusted.pub")).unwrap();
    let run = |args: &[&str]| {
        Command::new(SUTURE)
            .args(args)
            .env("SUTURE_KEYS_DIR", &keys)
            .output()
            .unwrap()
    };
    let refused = |args: &[&str], what: &str| {
        let out = run(args);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(e.contains(what), "{e}");
    };
    refused(&["apply", &pid, p, "--require-signed"], "has no signature");
    ok(&["sign", &k("other.key"), p]);
    refused(
        &["apply", &pid, p, "--require-signed"],
        "verifies with none",
    );
    ok(&["sign", &k("trusted.key"), p]);
    assert!(run(&["apply", &pid, p, "--require-signed"])
        .status
        .success());
    assert!(run(&["disable", &pid, "static"]).status.success());
    // A changed signature (or file) no longer verifies.
    let sig = format!("{p}.sig");
    let mut text = std::fs::read_to_string(&sig).unwrap();
    let flipped = if text.starts_with('0') { "1" } else { "0" };
    text.replace_range(0..1, flipped);
    std::fs::write(&sig, text).unwrap();
    refused(
        &["apply", &pid, p, "--require-signed"],
        "verifies with none",
    );
    let st = json(&["status", &pid, "--json"]);
    assert!(st["patches"].as_array().unwrap().is_empty());
    assert!(t.alive());
}

#[test]
fn int3s_left_by_a_suture_killed_at_its_first_live_write_are_withdrawn() {
    // A fresh process: before this fix the stored record did not yet know
    // the handler mapped for live writes, so nothing could withdraw them.
    let mut t = Target::standard("target");
    let a = t.addr("compute_static");
    let before = read_mem(t.pid, a, 8);
    apply_paused_at(&t, "int3s", |child| {
        assert_eq!(
            read_mem(t.pid, a, 1),
            [0xCC],
            "the entry's int3 is in place"
        );
        child.kill().unwrap();
    });
    // The target runs on through the handler meanwhile.
    let unchanged = |t: &mut Target| {
        let r = t.fresh_results();
        assert!(r.iter().all(|x| (x.1, x.2, x.3) == (2, 101, 1001)), "{r:?}");
    };
    unchanged(&mut t);
    // The next command finds the int3s and withdraws them (before this
    // fix it could not: the apply then refused the int3 in the entry).
    let pid = t.pid.to_string();
    ok(&["apply", &pid, &f("static.o")]);
    ok(&["disable", &pid, "static"]);
    assert_eq!(read_mem(t.pid, a, 8), before);
    unchanged(&mut t);
    assert!(t.alive());
}
