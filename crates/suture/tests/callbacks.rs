//! Callbacks run inside the target, in the kernel's order (issue 5, part):
//! each callback appends "PATCH KIND OBJECT" to a log the test reads.

mod common;
use common::consist::*;
use common::*;

struct Logged {
    t: Consist,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn start(args: &[&str]) -> Logged {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("callbacks.log");
    let t = Consist::start_env(args, &[("SUTURE_CB_LOG", log.to_str().unwrap())]);
    Logged { t, log, _dir: dir }
}

impl Logged {
    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }
}

fn v(lines: &[&str]) -> Vec<String> {
    lines.iter().map(|s| s.to_string()).collect()
}

/// Apply `patch` (which changes reader_fn) and let the blocked reader
/// through once so the transition completes.
fn apply_through_reader(l: &mut Logged, patch: &str) {
    let pid = l.t.pid();
    ok(&["apply", &pid, &f(patch), "--no-wait"]);
    l.t.t.ask("w");
    status_until(&pid, "the transition to complete", no_transition);
}

#[test]
fn callbacks_run_in_order_around_enable_and_disable() {
    let mut l = start(&[]);
    let pid = l.t.pid();
    apply_through_reader(&mut l, "cb.o");
    assert_eq!(l.lines(), v(&["cb pre_patch main", "cb post_patch main"]));
    // The reader now sleeps in the new reader_fn: disabling waits for it.
    ok(&["disable", &pid, "cb", "--no-wait"]);
    assert_eq!(l.lines().len(), 3, "pre_unpatch runs before the transition");
    l.t.t.ask("w");
    status_until(&pid, "the disable to complete", no_transition);
    assert_eq!(
        l.lines(),
        v(&[
            "cb pre_patch main",
            "cb post_patch main",
            "cb pre_unpatch main",
            "cb post_unpatch main"
        ])
    );
}

#[test]
fn a_failing_pre_patch_cancels_the_enable() {
    let l = start(&[]);
    let pid = l.t.pid();
    let err = fails(&["apply", &pid, &f("cbfail.o")]);
    assert!(
        err.contains("pre-patch callback failed for object [main program]"),
        "{err}"
    );
    // The only object failed: no post-unpatch; nothing left behind.
    assert_eq!(l.lines(), v(&["cbfail pre_patch main"]));
    let st = json(&["status", &pid, "--json"]);
    assert!(st["patches"].as_array().unwrap().is_empty(), "{st:#}");
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(!maps.contains("suture-patch"), "{maps}");
}

#[test]
fn a_reversed_enable_runs_only_post_unpatch() {
    let l = start(&[]);
    let pid = l.t.pid();
    // The reader blocked in the old reader_fn keeps the enable open.
    ok(&["apply", &pid, &f("cb.o"), "--no-wait"]);
    let out = ok(&["disable", &pid, "cb", "--timeout", "60"]);
    assert!(out.contains("revers"), "{out}");
    status_until(&pid, "the reversal to complete", no_transition);
    assert_eq!(l.lines(), v(&["cb pre_patch main", "cb post_unpatch main"]));
}

#[test]
fn two_patches_keep_their_callbacks_and_a_replaced_patch_runs_none() {
    let mut l = start(&[]);
    let pid = l.t.pid();
    apply_through_reader(&mut l, "cb.o");
    ok(&["apply", &pid, &f("cb2.o"), "--timeout", "60"]);
    assert_eq!(
        l.lines(),
        v(&[
            "cb pre_patch main",
            "cb post_patch main",
            "cb2 pre_patch main",
            "cb2 post_patch main"
        ])
    );
    // cbr replaces both: only its own callbacks run, never cb's or cb2's.
    ok(&["apply", &pid, &f("cbr.o"), "--no-wait"]);
    l.t.t.ask("w"); // the reader leaves cb's reader_fn
    status_until(&pid, "the replace to complete", no_transition);
    assert_eq!(
        l.lines()[4..],
        v(&["cbr pre_patch main", "cbr post_patch main"])[..]
    );
    let st = json(&["status", &pid, "--json"]);
    assert_eq!(st["patches"].as_array().unwrap().len(), 1);
}

#[test]
fn callbacks_using_malloc_and_stdio_complete_while_threads_allocate() {
    // 25 cycles of the four callbacks: 100 callback runs, each calling
    // malloc, snprintf, fopen, fprintf and free while four threads
    // allocate and free as fast as they can.
    let l = start(&["alloc"]);
    let pid = l.t.pid();
    for _ in 0..25 {
        ok(&["apply", &pid, &f("cb2.o"), "--timeout", "60"]);
        ok(&["disable", &pid, "cb2", "--timeout", "60"]);
    }
    let lines = l.lines();
    assert_eq!(lines.len(), 100, "{lines:?}");
    for c in lines.chunks(4) {
        assert_eq!(
            c,
            v(&[
                "cb2 pre_patch main",
                "cb2 post_patch main",
                "cb2 pre_unpatch main",
                "cb2 post_unpatch main"
            ])
        );
    }
}

#[test]
fn shadow_variables_work_inside_the_target_and_their_code_comes_and_goes() {
    let mut l = start(&[]);
    let pid = l.t.pid();
    let maps = || std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(!maps().contains("suture-runtime"));
    ok(&["apply", &pid, &f("shadow.o"), "--timeout", "60"]);
    // Loaded with the first patch that uses it.
    assert!(maps().contains("/memfd:suture-runtime"), "{}", maps());
    assert_eq!(l.lines(), v(&["shadow api ok"]));
    // Three threads count their calls in one shadow variable at once.
    l.t.until("the new fa", |q| q.fa.iter().all(|x| *x == 7));
    ok(&["disable", &pid, "shadow", "--timeout", "60"]);
    assert_eq!(
        l.lines(),
        v(&["shadow api ok", "shadow calls counted", "shadow freed 1"])
    );
    // Released with the last patch that used it.
    assert!(!maps().contains("suture-runtime"), "{}", maps());
}

#[test]
fn states_are_taken_over_by_cumulative_patches_and_older_versions_refused() {
    let mut l = start(&[]);
    let pid = l.t.pid();
    ok(&["apply", &pid, &f("st1.o"), "--timeout", "60"]);
    ok(&["apply", &pid, &f("st2.o"), "--timeout", "60"]);
    ok(&["apply", &pid, &f("st3.o"), "--timeout", "60"]);
    l.t.until("st3's fa", |q| q.fa.iter().all(|x| *x == 13));
    let st = json(&["status", &pid, "--json"]);
    assert_eq!(
        st["patches"][0]["states"],
        serde_json::json!([{"id": 1, "version": 2}])
    );
    // A patch carrying an older version of the state is refused.
    let err = fails(&["apply", &pid, &f("st0.o")]);
    assert!(
        err.contains("is not compatible with the already installed patches"),
        "{err}"
    );
    ok(&["disable", &pid, "st3", "--timeout", "60"]);
    assert_eq!(
        l.lines(),
        v(&[
            "st1 allocated: st1 data",
            "st1 post_patch: st1 data",
            "st2 took over: st1 data",
            "st2 post_patch: st1 data",
            "st3 took over: st1 data",
            "st3 post_patch: st1 data",
            "st3 freed: st1 data",
        ])
    );
}

#[test]
fn callbacks_of_a_shared_library_object() {
    let lib = fixture("libfixture.so");
    let arg = format!("lib={}", lib.display());
    let l = start(&[&arg]);
    let pid = l.t.pid();
    ok(&["apply", &pid, &f("cblib.o"), "--timeout", "60"]);
    ok(&["disable", &pid, "cblib", "--timeout", "60"]);
    assert_eq!(
        l.lines(),
        v(&[
            "cblib pre_patch libfixture.so",
            "cblib post_patch libfixture.so",
            "cblib pre_unpatch libfixture.so",
            "cblib post_unpatch libfixture.so"
        ])
    );
}

#[test]
fn a_callback_that_never_returns_fails_the_enable_cleanly() {
    let mut l = start(&[]);
    let pid = l.t.pid();
    let err = fails(&["apply", &pid, &f("cbhang.o")]);
    assert!(err.contains("pre-patch callback failed"), "{err}");
    assert!(err.contains("did not complete"), "{err}");
    // Nothing changed, and every thread still runs.
    let st = json(&["status", &pid, "--json"]);
    assert!(st["patches"].as_array().unwrap().is_empty(), "{st:#}");
    let before = l.t.q();
    l.t.t.ask("w");
    let q = l.t.until("the reader to run", |q| {
        q.reader_count == before.reader_count + 1
    });
    assert_eq!(q.reader_last, 1);
    l.t.until("the others to run", |q| q.pairs > before.pairs);
    assert!(l.t.t.alive());
}

/// The pending tables mapped in the target (their address ranges).
fn tables(pid: &str) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("suture-threads"))
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect()
}

#[test]
fn a_finished_transitions_table_serves_the_next_and_survives_a_failed_enable() {
    let mut l = start(&[]);
    let pid = l.t.pid();
    apply_through_reader(&mut l, "cb.o");
    // Proved unused once the transition finished, and kept as the spare.
    let spare = tables(&pid);
    assert_eq!(spare.len(), 1, "{spare:?}");
    // An enable that fails after taking it gives it back.
    let err = fails(&["apply", &pid, &f("cbfail.o")]);
    assert!(err.contains("pre-patch callback failed"), "{err}");
    assert_eq!(tables(&pid), spare);
    // The next transition uses it: no table is mapped for it.
    ok(&["disable", &pid, "cb", "--no-wait"]);
    assert_eq!(tables(&pid), spare);
    l.t.t.ask("w");
    status_until(&pid, "the disable to complete", no_transition);
    assert_eq!(tables(&pid), spare);
    apply_through_reader(&mut l, "cb.o");
    assert_eq!(tables(&pid), spare);
}
