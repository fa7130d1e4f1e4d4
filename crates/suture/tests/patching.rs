//! End-to-end: patch real multi-threaded C processes with the `suture` CLI.

mod common;
use common::*;

const BASE: (i64, i64, i64) = (2, 101, 1001);

fn results(t: &mut Target) -> Vec<(i64, i64, i64)> {
    t.fresh_results()
        .into_iter()
        .map(|(_, s, g, l)| (s, g, l))
        .collect()
}

fn all(t: &mut Target, want: (i64, i64, i64)) {
    let r = results(t);
    assert!(
        r.iter().all(|x| *x == want),
        "expected {want:?} in every thread, got {r:?}"
    );
}

fn pid(t: &Target) -> String {
    t.pid.to_string()
}

fn f(name: &str) -> String {
    fixture(name).to_str().unwrap().to_string()
}

fn bytes_of(t: &mut Target, func: &str, len: usize) -> Vec<u8> {
    let a = t.addr(func);
    read_mem(t.pid, a, len)
}

#[test]
fn static_and_global_functions_in_a_pie_program() {
    let mut t = Target::standard("target");
    all(&mut t, BASE);
    let out = ok(&["apply", &pid(&t), &f("static.o")]);
    assert!(out.contains("applied patch 'static'"), "{out}");
    // The patch calls a static helper, reads a static variable, calls libc.
    all(&mut t, (44, 101, 1001));
    ok(&["apply", &pid(&t), &f("global.o")]);
    all(&mut t, (44, 201, 1001));

    let st = json(&["status", &pid(&t), "--json"]);
    assert_eq!(st["pid"], t.pid);
    let names: Vec<&str> = st["patches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["static", "global"],
        "the name defaults to the file stem"
    );
    let p0 = &st["patches"][0];
    assert_eq!(p0["enabled"], true);
    assert_eq!(p0["transition"], false);
    assert_eq!(p0["replace"], false);
    assert_eq!(p0["stack_order"], 1);
    assert_eq!(p0["objects"][0]["name"], serde_json::Value::Null);
    assert_eq!(p0["objects"][0]["patched"], true);
    assert!(p0["objects"][0]["build_id"].is_string());
    let func = &p0["objects"][0]["funcs"][0];
    assert_eq!(func["name"], "compute_static");
    assert_eq!(func["sympos"], 1);
    assert_eq!(func["nop"], false);
    assert_eq!(func["patched"], true);
    assert_eq!(func["transition"], false);
    assert_eq!(st["transition"], serde_json::Value::Null);

    let text = ok(&["status", &pid(&t)]);
    assert!(text.contains("compute_static,1"), "{text}");
    let list = ok(&["list", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert!(list
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["pid"] == t.pid && e["patches"].as_array().unwrap().len() == 2));

    ok(&["disable", &pid(&t), "static"]);
    all(&mut t, (2, 201, 1001));
    ok(&["disable", &pid(&t), "global"]);
    all(&mut t, BASE);
    let a = t.addr("compute_static");
    let bin = fixture("target");
    assert_eq!(read_mem(t.pid, a, 8), file_bytes(t.pid, &bin, a, 8));
    let st = json(&["status", &pid(&t), "--json"]);
    assert_eq!(st["patches"].as_array().unwrap().len(), 0);
}

/// The direct callers `status --json` lists for the site of `func`:
/// (call address, what it calls).
fn callers_of(t: &Target, func: &str) -> Vec<(u64, u64)> {
    let st = json(&["status", &pid(t), "--json"]);
    let hex = |v: &serde_json::Value| {
        u64::from_str_radix(v.as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
    };
    st["sites"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["function"] == func)
        .flat_map(|s| s["callers"].as_array().unwrap().clone())
        .map(|c| (hex(&c["address"]), hex(&c["calls"])))
        .collect()
}

/// The bytes of `call rel32` at `at` to `to`.
fn call_bytes(at: u64, to: u64) -> Vec<u8> {
    let rel = (to.wrapping_sub(at + 5) as i64 as i32).to_le_bytes();
    let mut v = vec![0xE8];
    v.extend(rel);
    v
}

#[test]
fn direct_callers_call_the_new_code_after_the_transition_and_are_restored() {
    let mut t = Target::standard("target");
    let entry = t.addr("compute_static");
    ok(&["apply", &pid(&t), &f("stack1.o")]);
    all(&mut t, (11, 101, 1001));
    // worker() calls compute_static directly: that call now calls the new
    // code, and the entry still jumps there for every other caller.
    let callers = callers_of(&t, "compute_static");
    assert!(!callers.is_empty(), "worker's call is found");
    let st = json(&["status", &pid(&t), "--json"]);
    let new = st["patches"][0]["objects"][0]["funcs"][0]["new_addr"]
        .as_str()
        .map(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).unwrap())
        .unwrap();
    for &(at, to) in &callers {
        assert_eq!(to, new, "caller at {at:#x}");
        assert_eq!(read_mem(t.pid, at, 5), call_bytes(at, new));
    }
    // Stacking: the callers follow the newest patch.
    ok(&["apply", &pid(&t), &f("stack2.o")]);
    all(&mut t, (21, 101, 1001));
    let newer = callers_of(&t, "compute_static");
    assert!(
        newer.iter().all(|&(_, to)| to != new && to != entry),
        "{newer:x?}"
    );
    for &(at, to) in &newer {
        assert_eq!(read_mem(t.pid, at, 5), call_bytes(at, to));
    }
    ok(&["disable", &pid(&t), "stack2"]);
    all(&mut t, (11, 101, 1001));
    assert_eq!(callers_of(&t, "compute_static"), callers);
    ok(&["disable", &pid(&t), "stack1"]);
    all(&mut t, BASE);
    // Every call is back to the entry: the original bytes.
    for &(at, _) in &callers {
        assert_eq!(read_mem(t.pid, at, 5), call_bytes(at, entry));
        assert_eq!(
            read_mem(t.pid, at, 5),
            file_bytes(t.pid, &fixture("target"), at, 5)
        );
    }
}

#[test]
fn non_pie_program() {
    let mut t = Target::standard("target-nopie");
    all(&mut t, BASE);
    ok(&["apply", &pid(&t), &f("static.o")]);
    ok(&["apply", &pid(&t), &f("global.o")]);
    all(&mut t, (44, 201, 1001));
    ok(&["disable", &pid(&t), "static"]);
    ok(&["disable", &pid(&t), "global"]);
    all(&mut t, BASE);
    let a = t.addr("compute_global");
    assert_eq!(
        read_mem(t.pid, a, 0x2f),
        file_bytes(t.pid, &fixture("target-nopie"), a, 0x2f)
    );
}

#[test]
fn stripped_program_uses_dynsym() {
    let mut t = Target::standard("target-stripped");
    ok(&["apply", &pid(&t), &f("global.o")]);
    all(&mut t, (2, 201, 1001));
    // Static symbols are gone with .symtab: a clear error, nothing changed.
    let before = bytes_of(&mut t, "compute_static", 8);
    let e = fails(&["apply", &pid(&t), &f("static.o")]);
    assert!(e.contains("compute_static"), "{e}");
    assert_eq!(bytes_of(&mut t, "compute_static", 8), before);
    ok(&["disable", &pid(&t), "global"]);
    all(&mut t, BASE);
}

#[test]
fn shared_library_loaded_with_dlopen() {
    let mut t = Target::standard("target");
    ok(&["apply", &pid(&t), &f("lib.o")]);
    all(&mut t, (2, 101, 2001));
    let st = json(&["status", &pid(&t), "--json"]);
    assert_eq!(st["patches"][0]["objects"][0]["name"], "libfixture.so");
    ok(&["disable", &pid(&t), "lib"]);
    all(&mut t, BASE);
}

#[test]
fn stacking_newest_wins_and_original_bytes_come_back() {
    let mut t = Target::standard("target");
    let a = t.addr("compute_static");
    let original = read_mem(t.pid, a, 8);
    assert_eq!(original, file_bytes(t.pid, &fixture("target"), a, 8));
    ok(&["apply", &pid(&t), &f("stack1.o")]);
    all(&mut t, (11, 101, 1001));
    ok(&["apply", &pid(&t), &f("stack2.o")]);
    all(&mut t, (21, 101, 1001));
    // Disabling the top one brings back the one below.
    ok(&["disable", &pid(&t), "stack2"]);
    all(&mut t, (11, 101, 1001));
    ok(&["apply", &pid(&t), &f("stack2.o")]);
    all(&mut t, (21, 101, 1001));
    // Disabling a lower one keeps the top in effect.
    ok(&["disable", &pid(&t), "stack1"]);
    all(&mut t, (21, 101, 1001));
    ok(&["disable", &pid(&t), "stack2"]);
    all(&mut t, BASE);
    assert_eq!(
        read_mem(t.pid, a, 8),
        original,
        "original bytes restored exactly"
    );
}

#[test]
fn hundred_apply_disable_cycles() {
    let mut t = Target::standard("target");
    for i in 0..100 {
        ok(&["apply", &pid(&t), &f("static.o")]);
        if i % 10 == 0 {
            all(&mut t, (44, 101, 1001));
        }
        ok(&["disable", &pid(&t), "static"]);
        let r = t.query();
        assert!(
            r.iter().all(|x| (x.1 == 2 || x.1 == 44) && x.2 == 101),
            "{r:?}"
        );
    }
    all(&mut t, BASE);
    assert!(t.alive());
    // Patch memory is released once no thread can be in it. The check is
    // conservative (any word of a live stack that points into the patch's
    // code keeps it), so a stale pointer may keep one image for a while,
    // but nothing accumulates over the cycles.
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", t.pid)).unwrap();
    let images: std::collections::BTreeSet<&str> = maps
        .lines()
        .filter(|l| l.contains("/memfd:suture-patch"))
        .filter_map(|l| l.split_whitespace().nth(4))
        .collect();
    assert!(images.len() <= 2, "patch images accumulate: {maps}");
}

#[test]
fn check_changes_nothing() {
    let mut t = Target::standard("target");
    let before = bytes_of(&mut t, "compute_static", 8);
    let maps_before = std::fs::read_to_string(format!("/proc/{}/maps", t.pid)).unwrap();
    let out = ok(&["check", &pid(&t), &f("static.o")]);
    assert!(out.contains("can be applied"), "{out}");
    assert!(out.contains("compute_static"), "{out}");
    let js = json(&["check", &pid(&t), &f("static.o"), "--json"]);
    assert_eq!(js["patch"], "static");
    assert_eq!(bytes_of(&mut t, "compute_static", 8), before);
    let maps_after = std::fs::read_to_string(format!("/proc/{}/maps", t.pid)).unwrap();
    assert!(
        !maps_after.contains("/memfd:suture-"),
        "check mapped memory"
    );
    assert_eq!(
        maps_before
            .lines()
            .filter(|l| !l.contains("[stack"))
            .count(),
        maps_after.lines().filter(|l| !l.contains("[stack")).count()
    );
    all(&mut t, BASE);
    // check also reports what apply would refuse.
    let e = fails(&["check", &pid(&t), &f("missing.o")]);
    assert!(e.contains("compute_statik"), "{e}");
}

#[test]
fn sympos_picks_one_of_two_static_functions() {
    let mut t = Target::standard("target");
    let e = fails(&["apply", &pid(&t), &f("dup0.o")]);
    assert!(e.contains("dup"), "{e}");
    assert!(e.contains("sympos"), "the error names how to choose: {e}");
    ok(&["apply", &pid(&t), &f("dup2.o")]);
    let st = json(&["status", &pid(&t), "--json"]);
    assert_eq!(st["patches"][0]["objects"][0]["funcs"][0]["sympos"], 2);
    all(&mut t, BASE);
    ok(&["disable", &pid(&t), "dup"]);
}

#[test]
fn patch_code_calls_libc_ifuncs() {
    let mut t = Target::standard("target");
    ok(&["apply", &pid(&t), &f("ifunc.o")]);
    all(&mut t, (2, 301, 1001));
    ok(&["disable", &pid(&t), "ifunc"]);
    all(&mut t, BASE);
}

#[test]
fn suture_symbol_alias_names_a_static_variable() {
    let mut t = Target::standard("target");
    ok(&["apply", &pid(&t), &f("alias.o")]);
    all(&mut t, (2, 421, 1001));
    ok(&["disable", &pid(&t), "alias"]);
    all(&mut t, BASE);
}

#[test]
fn patch_memory_ends_with_the_right_permissions() {
    let mut t = Target::standard("target");
    ok(&["apply", &pid(&t), &f("static.o")]);
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", t.pid)).unwrap();
    let ours: Vec<&str> = maps
        .lines()
        .filter(|l| l.contains("/memfd:suture-patch") || l.contains("/memfd:suture-sites"))
        .collect();
    assert!(
        ours.iter().any(|l| l.contains(" r-xp ")),
        "no executable patch code: {ours:?}"
    );
    for l in &ours {
        let perms = l.split_whitespace().nth(1).unwrap();
        assert!(
            !(perms.contains('w') && perms.contains('x')),
            "writable code: {l}"
        );
    }
    all(&mut t, (44, 101, 1001));
}

#[test]
fn demo_runs_start_to_finish() {
    let out = ok(&["demo"]);
    assert!(out.contains("charged -15 coins"), "the bug is shown: {out}");
    assert!(
        out.contains("error: invalid quantity"),
        "the fix is shown: {out}"
    );
    assert!(out.contains("original code restored"), "{out}");
    assert!(out.contains("demo complete"), "{out}");
}

#[test]
fn patch_out_of_rel32_reach_goes_through_stubs() {
    // The image lands far from the PIE program (the kernel's choice), so the
    // site jumps through its absolute stub and the patch reaches the
    // target's static helper and variable through its PLT and GOT.
    let mut t = Target::standard("target");
    let out = std::process::Command::new(SUTURE)
        .args(["apply", &pid(&t), &f("static.o"), "--json"])
        .env("SUTURE_TEST_FAR_IMAGE", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let image =
        u64::from_str_radix(r["image"].as_str().unwrap().trim_start_matches("0x"), 16).unwrap();
    let func = t.addr("compute_static");
    assert!(
        image.abs_diff(func) > 1 << 32,
        "image {image:#x} is near {func:#x}"
    );
    all(&mut t, (44, 101, 1001));
    ok(&["disable", &pid(&t), "static"]);
    all(&mut t, BASE);
    assert_eq!(
        read_mem(t.pid, func, 8),
        file_bytes(t.pid, &fixture("target"), func, 8)
    );
}

#[test]
fn endbr64_stays_in_place() {
    // Built with -fcf-protection: every function starts with endbr64, which
    // the site keeps so indirect calls still land on it.
    let mut t = Target::standard("target-cet");
    let a = t.addr("compute_global");
    let endbr = [0xf3, 0x0f, 0x1e, 0xfa];
    assert_eq!(read_mem(t.pid, a, 4), endbr);
    ok(&["apply", &pid(&t), &f("global.o")]);
    assert_eq!(read_mem(t.pid, a, 4), endbr);
    assert_eq!(
        read_mem(t.pid, a + 4, 1),
        [0xe9],
        "jmp rel32 right after endbr64"
    );
    all(&mut t, (2, 201, 1001));
    ok(&["disable", &pid(&t), "global"]);
    all(&mut t, BASE);
}

#[test]
fn apply_and_disable_report_how_long_they_held_the_target() {
    // Live writes (the default): no thread is ever stopped with the others.
    // (The check of the running threads may take its time on a loaded
    // machine: without this, past 100 ms it would give up for a stop.)
    let live = [("SUTURE_LIVE_CHECK_MS", "60000")];
    let mut t = Target::standard("target");
    let threads = std::fs::read_dir(format!("/proc/{}/task", t.pid))
        .unwrap()
        .count() as u64;
    let a: serde_json::Value = serde_json::from_str(&ok_env(
        &["apply", &pid(&t), &f("static.o"), "--json"],
        &live,
    ))
    .unwrap();
    let h = &a["held"];
    let n = |k: &str| {
        h[k].as_u64()
            .unwrap_or_else(|| panic!("held.{k} missing: {a}"))
    };
    assert_eq!(n("whole_stops"), 0, "{a}");
    // Every thread was stopped on its own: to be seen before the jumps
    // went live, and for its check.
    assert!(n("thread_stops") >= threads, "{a}");
    // Told apart: stops to look at a thread, and the thread borrowed for
    // the mappings (the patch's code, at least).
    assert!(n("check_stops") >= threads, "{a}");
    assert!(n("borrow_stops") >= 1, "{a}");
    assert_eq!(
        n("check_stops") + n("borrow_stops"),
        n("thread_stops"),
        "{a}"
    );
    assert!(
        n("check_held_us").max(n("borrow_held_us")) == n("thread_held_us"),
        "{a}"
    );
    all(&mut t, (44, 101, 1001));
    let text = ok_env(&["disable", &pid(&t), "static"], &live);
    assert!(
        !text.contains("target held: all") && text.contains("single threads to look at them"),
        "{text}"
    );
    all(&mut t, BASE);
    assert!(
        std::fs::read_to_string(format!("/proc/{}/maps", t.pid))
            .unwrap()
            .contains("suture-trap"),
        "the live writes' handler is mapped"
    );
}

#[test]
fn a_later_start_does_not_stop_a_sleeping_thread_whose_pointer_it_knows() {
    // `SUTURE_DEBUG_HOLDS=1` logs each stop of this command's own, and the
    // steps of its live writes: the stops that fill the pending table come
    // between the start's "prepare" and its first "sync" (the `int3`s).
    let env = [
        ("SUTURE_LIVE_CHECK_MS", "60000"),
        ("SUTURE_DEBUG_HOLDS", "1"),
    ];
    let table_stops = |err: &str| -> String {
        let from = err
            .find("live write: prepare")
            .unwrap_or_else(|| panic!("a live write:\n{err}"));
        let to = from
            + err[from..]
                .find("live write: sync")
                .unwrap_or_else(|| panic!("its int3s:\n{err}"));
        err[from..to].to_string()
    };
    // A thread that sleeps in read() for good (not the main thread, which
    // a command borrows to run system calls just before the table fills,
    // and which may not be back asleep yet).
    let lib = fixture("libfixture.so");
    let mut t = Target::start_env("target", &[lib.to_str().unwrap()], &[("SLEEPER", "1")]);
    let sleeper = std::fs::read_dir(format!("/proc/{}/task", t.pid))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .find(|tid| {
            std::fs::read_to_string(format!("/proc/{}/task/{tid}/comm", t.pid))
                .is_ok_and(|c| c.trim() == "sleeper")
        })
        .expect("the sleeper thread");
    let stopped = format!("hold: checked thread {sleeper}:");
    let (_, err) = ok_env_both(&["apply", &pid(&t), &f("static.o")], &env);
    assert!(
        table_stops(&err).contains(&stopped),
        "the first start stops it:\n{err}"
    );
    all(&mut t, (44, 101, 1001));
    let (_, err) = ok_env_both(&["disable", &pid(&t), "static"], &env);
    let stops = table_stops(&err);
    assert!(
        !stops.contains(&stopped) && stops.contains("hold: checked thread"),
        "a later start takes its pointer from the record (and stops the running threads):\n{err}"
    );
    all(&mut t, BASE);
}

/// With live writes turned off, and where an int3 could kill the target (a
/// thread blocks SIGTRAP), the jumps are written in one whole-process stop.
fn whole_stop_fallback(t: &mut Target, env: &[(&str, &str)]) {
    let threads = std::fs::read_dir(format!("/proc/{}/task", t.pid))
        .unwrap()
        .count() as u64;
    let a: serde_json::Value =
        serde_json::from_str(&ok_env(&["apply", &pid(t), &f("static.o"), "--json"], env)).unwrap();
    let h = &a["held"];
    let n = |k: &str| {
        h[k].as_u64()
            .unwrap_or_else(|| panic!("held.{k} missing: {a}"))
    };
    // The transition's start stops every thread at once, once.
    assert!(n("whole_stops") >= 1, "{a}");
    assert_eq!(n("whole_threads"), threads, "{a}");
    // All at once is a part of the longest wait in a whole stop.
    assert!(n("whole_all_us") <= n("whole_held_us"), "{a}");
    assert!(n("thread_stops") >= threads, "{a}");
    all(t, (44, 101, 1001));
    let text = ok_env(&["disable", &pid(t), "static"], env);
    assert!(
        text.contains("target held: all") && text.contains("single threads"),
        "{text}"
    );
    all(t, BASE);
}

#[test]
fn whole_process_stop_when_turned_off_and_when_a_thread_blocks_sigtrap() {
    let mut t = Target::standard("target");
    whole_stop_fallback(&mut t, &[("SUTURE_LIVE_WRITE", "0")]);
    let lib = fixture("libfixture.so");
    let mut t = Target::start_env(
        "target",
        &[lib.to_str().unwrap()],
        &[("BLOCK_SIGTRAP", "1")],
    );
    whole_stop_fallback(&mut t, &[]);
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", t.pid)).unwrap();
    assert!(!maps.contains("suture-trap"), "no handler installed");
}

#[test]
fn a_sigtrap_handler_the_program_installs_later_is_never_sent_our_int3s() {
    let live = [("SUTURE_LIVE_CHECK_MS", "60000")];
    let mut t = Target::standard("target");
    // Live: suture's handler goes in.
    ok_env(&["apply", &pid(&t), &f("static.o")], &live);
    ok_env(&["disable", &pid(&t), "static"], &live);
    assert_eq!(t.ask("t").trim(), "ok");
    // Now the program's own handler is installed: suture notices that it
    // is not its own and writes in a whole-process stop.
    whole_stop_fallback(&mut t, &live);
    assert_eq!(
        t.ask("T").trim(),
        "0",
        "the program's handler got none of our int3s"
    );
}
