//! A thread inside the vDSO (reading the clock, as services do all the
//! time) has a stack the transition check can read: the vDSO's image,
//! read from the target's memory, gives its unwind tables.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use suture_engine::check::{Checker, Verdict};
use suture_engine::objects::Objects;
use suture_engine::record::Record;
use suture_process::Process;

/// The target, killed and reaped when dropped (also when the test fails).
struct Target(Child);

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start() -> (Target, i32) {
    let dir = std::env::temp_dir().join(format!("suture-engine-vdso-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("clock");
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c/clock.c");
    let st = Command::new("cc")
        .args(["-O2", "-g", "-pthread", "-o"])
        .arg(&exe)
        .arg(&src)
        .status()
        .unwrap();
    assert!(st.success(), "cc failed");
    let mut child = Command::new(&exe)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let target = Target(child);
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line).unwrap();
    let tid = line
        .strip_prefix("ready ")
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| panic!("target said {line:?}"));
    (target, tid)
}

#[test]
fn a_thread_reading_the_clock_in_the_vdso_has_a_reliable_stack() {
    let (target, tid) = start();
    let proc = Process::open(target.0.id() as i32).unwrap();
    let maps = proc.maps().unwrap();
    let vdso = maps
        .iter()
        .find(|m| m.path.as_deref() == Some("[vdso]"))
        .expect("the process maps a vDSO");
    let objects = Objects::discover(&proc, &maps).unwrap();
    let checker = Checker::new(&proc, &objects, &Record::new()).unwrap();
    let mut tracer = proc.tracer();
    // The thread spends most of its time inside clock_gettime; stop it
    // until it is caught there (bounded: each stop is a fresh chance).
    let mut caught = 0;
    for _ in 0..10_000 {
        let regs = tracer.stop(tid, Duration::from_secs(10)).unwrap();
        if vdso.contains(regs.rip) {
            match checker.check(&proc, &regs) {
                Verdict::Switch => caught += 1,
                Verdict::Wait(b) => panic!(
                    "a thread at {:#x} in the vDSO is not checkable: {}",
                    regs.rip, b.reason
                ),
            }
        }
        tracer.detach(tid).unwrap();
        if caught == 20 {
            break;
        }
    }
    assert_eq!(caught, 20, "the thread was never stopped inside the vDSO");
}
