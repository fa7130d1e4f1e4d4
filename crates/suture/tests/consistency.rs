//! The per-thread consistency model on real processes (issue 3): blocked
//! threads keep a transition open, threads switch one by one, the worker
//! completes transitions with no command running, reverse, force, busy,
//! timeout, new threads and fork.

mod common;
use common::consist::*;
use common::*;
use std::time::{Duration, Instant};

#[test]
fn a_blocked_thread_keeps_the_transition_open_until_it_leaves_the_old_function() {
    let mut t = Consist::start(&[]);
    let pid = t.pid();
    let reader = t.tid("reader");
    let out = ok(&["apply", &pid, &f("reader.o"), "--no-wait"]);
    assert!(out.contains("in progress"), "{out}");

    // Soon only the thread blocked in the old reader_fn is pending (the
    // others may be caught inside reader_fn by the first look; they switch
    // at their next call), and status says where it is, down to the line.
    let st = status_until(&pid, "only the reader pending", |st| {
        pending_tids(st) == vec![reader]
    });
    assert_eq!(st["transition"]["patch"], "reader");
    assert_eq!(st["transition"]["target"], "patched");
    let p = &st["transition"]["pending"][0];
    assert!(p["reason"].as_str().unwrap().contains("reader_fn"), "{p:#}");
    let frames = p["frames"].as_array().unwrap();
    assert!(
        frames.iter().any(|f| f["function"] == "reader_fn"
            && f["file"].as_str().is_some_and(|x| x.ends_with("consist.c"))
            && f["line"].as_u64().is_some()),
        "{p:#}"
    );
    assert!(st["transition"]["worker"].as_i64().is_some(), "{st:#}");
    let text = ok(&["status", &pid]);
    assert!(text.contains(&format!("thread {reader}")), "{text}");

    // Every other thread switched and runs the new function.
    t.until("zero threads on the new code", |q| {
        q.zero.iter().all(|v| *v == 2)
    });
    assert_eq!(t.q().reader_count, 0);

    // The reader finishes the old function (result 1) ...
    t.t.ask("w");
    let q = t.until("the reader's first result", |q| q.reader_count == 1);
    assert_eq!(q.reader_last, 1);
    // ... is switched at its next call, and the worker completes the
    // transition with no suture command running.
    status_until(&pid, "the transition to complete", no_transition);
    t.t.ask("w");
    let q = t.until("the reader's second result", |q| q.reader_count == 2);
    assert_eq!(q.reader_last, 2, "the reader's next call ran the new code");
    let st = json(&["status", &pid, "--json"]);
    assert_eq!(st["patches"][0]["name"], "reader");
    assert!(t.t.alive());
}

/// Apply and disable the a/b patch `n` times (stopping early once a mixed
/// result shows in immediate mode); returns the mixed-result count.
fn cycles(pid: &str, n: usize, env_immediate: bool, t: &mut Consist) -> i64 {
    let ab = f("ab.o");
    for _ in 0..n {
        for args in [
            ["apply", pid, &ab, "--timeout", "60"],
            ["disable", pid, "ab", "--timeout", "60"],
        ] {
            let mut cmd = std::process::Command::new(SUTURE);
            cmd.args(args);
            if env_immediate {
                cmd.env("SUTURE_TEST_IMMEDIATE", "1");
            }
            let out = cmd.output().unwrap();
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let q = t.q();
        if env_immediate && q.mixed > 0 {
            return q.mixed;
        }
    }
    t.q().mixed
}

#[test]
fn threads_never_mix_old_and_new_code_under_load() {
    let mut t = Consist::start(&[]);
    let pid = t.pid();
    let before = t.q();
    let mixed = cycles(&pid, 50, false, &mut t);
    let after = t.q();
    assert_eq!(mixed, 0, "a thread ran old a with new b (or the reverse)");
    assert!(after.pairs > before.pairs);
    assert!(t.t.alive());
}

#[test]
fn the_consistency_test_catches_mixing_when_the_rule_is_off() {
    // Same load, with every thread switched at once (test-only setting):
    // the check above must be able to fail.
    let mut t = Consist::start(&[]);
    let pid = t.pid();
    let mixed = cycles(&pid, 500, true, &mut t);
    assert!(mixed > 0, "no mixed result in 500 immediate cycles");
}

#[test]
fn a_thread_in_code_without_unwind_information_stays_pending_until_forced() {
    let mut t = Consist::start(&["spin"]);
    let pid = t.pid();
    let spin = t.tid("spin");
    t.t.ask("w"); // let the reader run: only the spinner should block
    let out = suture(&["apply", &pid, &f("reader.o"), "--timeout", "2"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains(&format!("thread {spin}")), "{stdout}");
    assert!(stderr.contains("timed out"), "{stderr}");
    // Still pending, for the reason that it cannot be unwound.
    let st = json(&["status", &pid, "--json"]);
    let p = st["transition"]["pending"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["tid"] == spin)
        .unwrap_or_else(|| panic!("spinner not pending: {st:#}"))
        .clone();
    assert!(p["reason"].as_str().unwrap().contains("reliabl"), "{p:#}");

    // force: everyone switches now, the patch is marked forced.
    let out = ok(&["force", &pid]);
    assert!(out.contains("consistency was overridden"), "{out}");
    let st = json(&["status", &pid, "--json"]);
    assert!(no_transition(&st), "{st:#}");
    assert_eq!(st["patches"][0]["forced"], true);
    t.until("zero threads on the new code", |q| {
        q.zero.iter().all(|v| *v == 2)
    });
    // Forced patches can still be disabled (the spinner blocks it again).
    let out = ok(&["disable", &pid, "reader", "--no-wait"]);
    assert!(out.contains("in progress"), "{out}");
    ok(&["force", &pid]);
    t.until("zero threads on the old code", |q| {
        q.zero.iter().all(|v| *v == 1)
    });
    assert!(t.t.alive());
}

#[test]
fn busy_and_reverse() {
    let mut t = Consist::start(&["spin"]);
    let pid = t.pid();
    let reader = t.tid("reader");
    // The spinner keeps the enable open; the reader leaves the old code and
    // then blocks inside the new one.
    ok(&["apply", &pid, &f("reader.o"), "--no-wait"]);
    t.t.ask("w");
    t.until("the reader in the new code", |q| q.reader_count == 1);
    status_until(&pid, "the reader to switch", |st| {
        !pending_tids(st).contains(&reader)
    });

    // One transition at a time.
    let err = fails(&["apply", &pid, &f("reader2.o")]);
    assert!(err.contains("reader"), "{err}");
    assert!(err.contains("transition"), "{err}");

    // Disabling the patch in transition reverses it: the threads already
    // back (the spinner, never switched) are done; the reader, inside the
    // new reader_fn, now keeps the reversal open.
    let out = ok(&["disable", &pid, "reader", "--no-wait"]);
    assert!(out.contains("revers"), "{out}");
    let st = status_until(&pid, "only the reader pending", |st| {
        pending_tids(st) == vec![reader]
    });
    assert_eq!(st["transition"]["target"], "unpatched", "{st:#}");
    assert_eq!(st["transition"]["reversed"], true);
    assert!(
        st["transition"]["pending"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("reader_fn"),
        "{st:#}"
    );
    t.t.ask("w");
    let q = t.until("the reader's second result", |q| q.reader_count == 2);
    assert_eq!(q.reader_last, 2);
    let st = status_until(&pid, "the reversal to complete", no_transition);
    assert!(st["patches"].as_array().unwrap().is_empty(), "{st:#}");
    t.until("zero threads on the old code", |q| {
        q.zero.iter().all(|v| *v == 1)
    });
}

#[test]
fn a_thread_created_during_a_transition_starts_in_the_target_state() {
    let mut t = Consist::start(&[]);
    let pid = t.pid();
    let reader = t.tid("reader");
    ok(&["apply", &pid, &f("reader.o"), "--no-wait"]);
    let line = t.t.ask("t");
    let spawned: i64 = line.trim().strip_prefix("ok ").unwrap().parse().unwrap();
    let q = t.until("the new thread's first result", |q| q.spawned != -1);
    assert_eq!(q.spawned, 2, "a new thread runs the target's code");
    let st = status_until(&pid, "only the reader pending", |st| {
        pending_tids(st) == vec![reader]
    });
    assert!(!pending_tids(&st).contains(&spawned));
    t.t.ask("w");
    status_until(&pid, "the transition to complete", no_transition);
}

#[test]
fn a_child_forked_during_a_transition_is_consistent_and_completes() {
    let mut t = Consist::start(&[]);
    let pid = t.pid();
    ok(&["apply", &pid, &f("reader.o"), "--no-wait"]);
    let line = t.t.ask("f");
    let child: i32 = line.trim().strip_prefix("child ").unwrap().parse().unwrap();
    let _guard = KillOnDrop(child);
    let q = t.until("the child's first result", |q| q.child != -1);
    assert_eq!(
        q.child, 2,
        "the forking thread had switched: so has the child"
    );

    // The child carries the transition but not the parent's threads or
    // worker; `suture status` reads it, `suture wait` completes it.
    let cs = child.to_string();
    let st = json(&["status", &cs, "--json"]);
    assert_eq!(st["transition"]["patch"], "reader", "{st:#}");
    assert!(st["transition"]["worker"].is_null(), "{st:#}");
    assert!(pending_tids(&st).is_empty(), "{st:#}");
    assert_eq!(st["transition"]["unexamined"], serde_json::json!([child]));
    ok(&["wait", &cs, "--timeout", "60"]);
    let st = json(&["status", &cs, "--json"]);
    assert!(no_transition(&st), "{st:#}");
    assert_eq!(st["patches"][0]["name"], "reader");
    assert_eq!(t.q().child, 2);

    // The parent's own transition is unaffected.
    let st = json(&["status", &pid, "--json"]);
    assert_eq!(st["transition"]["patch"], "reader");
    t.t.ask("w");
    status_until(&pid, "the parent's transition to complete", no_transition);
}

#[test]
fn a_thread_stopped_inside_the_overwritten_bytes_is_moved_not_waited_for() {
    // The reader blocks in read() at raw_read+4: strictly inside the five
    // bytes the jump replaces. suture moves it to the same instruction of
    // the relocated copy instead of waiting (it would wait forever).
    let mut t = Target::start("parked", &[]);
    let pid = t.pid.to_string();
    let q = |t: &mut Target| t.ask("q").trim().to_string();
    assert_eq!(q(&mut t), "reads=0 last=0");
    ok(&["apply", &pid, &f("parked.o"), "--no-wait"]);
    // Its read, restarted in the copy, returns the byte as the original.
    t.ask("w");
    let deadline = Instant::now() + Duration::from_secs(60);
    while q(&mut t) != "reads=1 last=1" {
        assert!(Instant::now() < deadline, "{}", q(&mut t));
        std::thread::sleep(Duration::from_millis(10));
    }
    // Its next call runs the new code, once the transition is done.
    status_until(&pid, "the transition to complete", no_transition);
    t.ask("w");
    while q(&mut t) != "reads=2 last=101" {
        assert!(Instant::now() < deadline, "{}", q(&mut t));
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(t.alive());
}
