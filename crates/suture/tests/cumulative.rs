//! Cumulative patches (issue 4): atomic replace with nops, nops removed at
//! completion (the seed), nothing left behind, reversal, on real processes.

mod common;
use common::consist::*;
use common::*;
use serde_json::Value;

/// (name, address, size) of every function of `consist` a patch here
/// changes, from the program's symbol table and the target's load address.
fn functions(t: &Consist) -> Vec<(String, u64, u64)> {
    let path = fixture("consist");
    let syms = nm(&path);
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", t.t.pid)).unwrap();
    let canon = std::fs::canonicalize(&path).unwrap();
    let base = maps
        .lines()
        .find(|l| l.ends_with(canon.to_str().unwrap()))
        .map(|l| u64::from_str_radix(l.split('-').next().unwrap(), 16).unwrap())
        .unwrap();
    ["fa", "fh", "reader_fn"]
        .iter()
        .map(|n| {
            let (_, a, s) = syms.iter().find(|(m, _, _)| m == n).unwrap().clone();
            (n.to_string(), base + a, s)
        })
        .collect()
}

/// Whether each function's bytes in the target equal the file's.
fn original(t: &Consist) -> Vec<(String, bool)> {
    let path = fixture("consist");
    functions(t)
        .into_iter()
        .map(|(n, a, s)| {
            let live = read_mem(t.t.pid, a, s as usize);
            let file = file_bytes(t.t.pid, &path, a, s as usize);
            (n, live == file)
        })
        .collect()
}

fn names(st: &Value) -> Vec<String> {
    st["patches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect()
}

/// P1 (g = reader_fn, f = fa) with the reader released once, then P2 (h = fh).
fn p1_p2(t: &mut Consist) {
    let pid = t.pid();
    // The reader is blocked in the original g: let it through once.
    ok(&["apply", &pid, &f("p1.o"), "--no-wait"]);
    t.t.ask("w");
    status_until(&pid, "p1's transition", no_transition);
    ok(&["apply", &pid, &f("p2.o"), "--timeout", "60"]);
    let q = t.until("p1 and p2 in effect", |q| {
        q.zero.iter().all(|v| *v == 2)
            && q.fa.iter().all(|v| *v == 3)
            && q.fh.iter().all(|v| *v == 201)
    });
    assert_eq!(q.reader_count, 1);
}

#[test]
fn a_replace_patch_takes_over_and_its_nops_go_away() {
    let mut t = Consist::start(&[]);
    let pid = t.pid();
    p1_p2(&mut t);
    // The reader now sleeps inside P1's g.

    ok(&["apply", &pid, &f("p3.o"), "--no-wait"]);
    // During the transition P3 carries nops for g and h.
    let st = json(&["status", &pid, "--json"]);
    let p3 = st["patches"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "p3")
        .unwrap()
        .clone();
    let nops: Vec<&str> = p3["objects"][0]["funcs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["nop"] == true)
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(nops.len(), 2, "{p3:#}");
    assert!(
        nops.contains(&"reader_fn") && nops.contains(&"fh"),
        "{p3:#}"
    );

    // Switched threads run the original g and h and P3's f; the reader
    // still sleeps in P1's g and keeps the transition open.
    t.until("switched threads on p3", |q| {
        q.zero.iter().all(|v| *v == 1)
            && q.fa.iter().all(|v| *v == 4)
            && q.fh.iter().all(|v| *v == 101)
    });
    let reader = t.tid("reader");
    let st = status_until(&pid, "only the reader pending", |st| {
        pending_tids(st) == vec![reader]
    });
    assert!(
        st["transition"]["pending"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("patch p1"),
        "{st:#}"
    );
    // It finishes P1's g (result 2), then the transition completes.
    t.t.ask("w");
    let q = t.until("the reader's result", |q| q.reader_count == 2);
    assert_eq!(q.reader_last, 2, "the sleeping thread kept running P1's g");
    let st = status_until(&pid, "the replace to complete", no_transition);

    // Only P3 is left, without nops; g and h are the file's bytes again.
    assert_eq!(names(&st), vec!["p3"]);
    let funcs = st["patches"][0]["objects"][0]["funcs"].as_array().unwrap();
    assert_eq!(funcs.len(), 1, "{st:#}");
    assert_eq!(funcs[0]["name"], "fa");
    let orig = original(&t);
    assert_eq!(
        orig,
        vec![
            ("fa".to_string(), false),
            ("fh".to_string(), true),
            ("reader_fn".to_string(), true)
        ]
    );
    let sites: Vec<&str> = st["sites"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["function"].as_str().unwrap())
        .collect();
    assert_eq!(sites, vec!["fa"], "no suture code left on g and h");
    t.t.ask("w");
    let q = t.until("the reader's next result", |q| q.reader_count == 3);
    assert_eq!(q.reader_last, 1, "g runs its original code");

    // Non-replace patches stack on the replace patch.
    ok(&["apply", &pid, &f("p2.o"), "--timeout", "60"]);
    t.until("p2 on top of p3", |q| q.fh.iter().all(|v| *v == 201));
    assert_eq!(names(&json(&["status", &pid, "--json"])), vec!["p3", "p2"]);
    ok(&["disable", &pid, "p2", "--timeout", "60"]);

    // Disabling the replace patch returns every function to its original.
    ok(&["disable", &pid, "p3", "--timeout", "60"]);
    assert!(
        original(&t).iter().all(|(_, same)| *same),
        "{:?}",
        original(&t)
    );
    t.until("everything original", |q| {
        q.zero.iter().all(|v| *v == 1)
            && q.fa.iter().all(|v| *v == 2)
            && q.fh.iter().all(|v| *v == 101)
    });
    assert!(t.t.alive());
}

#[test]
fn reversing_a_replace_leaves_the_replaced_patches_in_effect() {
    let mut t = Consist::start(&[]);
    let pid = t.pid();
    p1_p2(&mut t);
    ok(&["apply", &pid, &f("p3.o"), "--no-wait"]);
    let out = ok(&["disable", &pid, "p3", "--timeout", "60"]);
    assert!(out.contains("revers"), "{out}");
    let st = status_until(&pid, "the reversal to complete", no_transition);
    assert_eq!(names(&st), vec!["p1", "p2"]);
    for p in st["patches"].as_array().unwrap() {
        assert_eq!(p["enabled"], true);
    }
    t.until("p1 and p2 in effect again", |q| {
        q.zero.iter().all(|v| *v == 2)
            && q.fa.iter().all(|v| *v == 3)
            && q.fh.iter().all(|v| *v == 201)
    });
}

/// suture's mappings in the target: (count, resident bytes). The record's
/// store (`/memfd:suture-state`, fixed size) counts in the number but not
/// in the bytes: its resident pages follow the largest record ever written
/// (a transition's record with memory whose release waits is larger for a
/// while), not what is in use.
fn suture_memory(pid: i32) -> (usize, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut count = 0;
    let mut rss = 0;
    let mut ours = false;
    for l in smaps.lines() {
        let first = l.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            ours = l.contains("/memfd:suture");
            count += ours as usize;
            ours &= !l.contains("/memfd:suture-state");
        } else if let Some(v) = l.strip_prefix("Rss:").filter(|_| ours) {
            rss += v
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap()
                * 1024;
        }
    }
    (count, rss)
}

#[test]
fn two_hundred_replace_cycles_keep_memory_flat() {
    let mut t = Consist::start(&[]);
    let pid = t.pid();
    let mut samples = Vec::new();
    for i in 0..200 {
        // A stacked patch, then a new replace patch that takes over from
        // everything (with a nop for h, removed at completion).
        if i % 4 == 0 {
            ok(&["apply", &pid, &f("p2.o"), "--timeout", "60"]);
        }
        let name = if i % 2 == 0 { "ra.o" } else { "rb.o" };
        ok(&["apply", &pid, &f(name), "--timeout", "60"]);
        samples.push(suture_memory(t.t.pid));
    }
    let q = t.until("the last replace in effect", |q| {
        q.fa.iter().all(|v| *v == 4) && q.fh.iter().all(|v| *v == 101)
    });
    assert_eq!(q.mixed, 0);
    // Flat: the least footprint is the same early and late (anything
    // leaked would raise it), and memory whose release had to wait (a
    // thread was still near it) is bounded and released by a later command.
    let early = samples[20..70].iter().copied().min().unwrap();
    let late = samples[150..].iter().copied().min().unwrap();
    let worst = samples[20..].iter().copied().max().unwrap();
    eprintln!("suture mappings/resident bytes: early {early:?} late {late:?} worst {worst:?}");
    assert_eq!(early, late, "{samples:?}");
    assert!(worst.0 <= early.0 + 8, "{samples:?}");
    let st = json(&["status", &pid, "--json"]);
    assert_eq!(names(&st), vec!["rb"], "the last of the 200 (odd) is rb");
    assert!(t.t.alive());
}

#[test]
fn a_target_with_memory_deny_write_execute_is_patched() {
    // PR_SET_MDWE forbids giving memory execute permission it did not have:
    // suture maps its code read+execute from the start and writes it
    // through /proc/PID/mem, so the patch goes in anyway.
    // (The target exits at once if the prctl fails: it is in force.)
    let mut t = Consist::start(&["mdwe"]);
    let pid = t.pid();
    ok(&["apply", &pid, &f("p2.o"), "--timeout", "60"]);
    t.until("p2 in effect", |q| q.fh.iter().all(|v| *v == 201));
    ok(&["disable", &pid, "p2", "--timeout", "60"]);
    t.until("the original fh", |q| q.fh.iter().all(|v| *v == 101));
    assert!(t.t.alive());
}
