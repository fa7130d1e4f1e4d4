//! Running at a raised priority only while target threads wait for us.
//!
//! Held threads (a whole-process stop, a borrowed thread, a thread stopped
//! for its check) make no progress until suture lets them go, so suture
//! should not then compete for the CPU with the rest of the target. The
//! rest of suture's work (reading ELF files, linking, building unwind
//! tables) runs at the priority it was started with, so it never takes CPU
//! time from a service that is still serving. [`set_hold_priority`] turns
//! this on; each hold takes a [`Boost`] guard, and the priority drops back
//! when the last guard of the thread is dropped. [`keep_hold_priority`]
//! keeps that priority outside holds too, for every thread of suture, from
//! any moment on (a command learns only while it already works that the
//! CPUs are kept busy).

use std::cell::Cell;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;

/// The nice value while holding threads; `i32::MIN`: off.
static HOLD_NICE: AtomicI32 = AtomicI32::new(i32::MIN);
/// The nice value outside holds once [`keep_hold_priority`] was called;
/// `i32::MIN`: each thread's own, as it was when its hold began.
static BASE_NICE: AtomicI32 = AtomicI32::new(i32::MIN);
/// Serializes priority changes, so that a hold ending while
/// [`keep_hold_priority`] runs cannot put back the old priority after it.
static CHANGING: Mutex<()> = Mutex::new(());

thread_local! {
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    static BASE: Cell<i32> = const { Cell::new(0) };
}

/// Run at nice value `nice` while any target thread is held (best effort:
/// without the right to raise the priority nothing changes).
pub fn set_hold_priority(nice: i32) {
    HOLD_NICE.store(nice.clamp(-20, 19), Ordering::Relaxed);
}

/// From now on run every thread of suture at the hold priority outside
/// holds as well (nothing if [`set_hold_priority`] was not called). Threads
/// created later inherit it from their creator.
pub fn keep_hold_priority() {
    let nice = HOLD_NICE.load(Ordering::Relaxed);
    if nice == i32::MIN {
        return;
    }
    let _g = CHANGING.lock().unwrap_or_else(|e| e.into_inner());
    BASE_NICE.store(nice, Ordering::Relaxed);
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    for tid in tasks
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
    {
        // SAFETY: setpriority on a thread of our own process; no memory is
        // involved (a thread that has just exited gives ESRCH, ignored).
        unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) };
    }
}

fn nice_of_this_thread() -> i32 {
    // SAFETY: getpriority reads our own thread's nice value; errno is
    // cleared first because -1 is a valid result.
    unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, 0)
    }
}

fn set_nice_of_this_thread(nice: i32) {
    // SAFETY: setpriority on the calling thread (PRIO_PROCESS with 0 is the
    // calling thread on Linux); no memory is involved.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
}

/// Held while target threads wait for this thread of suture.
pub(crate) struct Boost(());

impl Boost {
    pub(crate) fn new() -> Boost {
        let nice = HOLD_NICE.load(Ordering::Relaxed);
        DEPTH.with(|d| {
            if d.get() == 0 && nice != i32::MIN {
                let _g = CHANGING.lock().unwrap_or_else(|e| e.into_inner());
                let base = nice_of_this_thread();
                BASE.with(|b| b.set(base));
                if nice < base {
                    set_nice_of_this_thread(nice);
                }
            }
            d.set(d.get() + 1);
        });
        Boost(())
    }
}

impl Drop for Boost {
    fn drop(&mut self) {
        DEPTH.with(|d| {
            let n = d.get().saturating_sub(1);
            d.set(n);
            if n == 0 && HOLD_NICE.load(Ordering::Relaxed) != i32::MIN {
                let _g = CHANGING.lock().unwrap_or_else(|e| e.into_inner());
                let base = match BASE_NICE.load(Ordering::Relaxed) {
                    i32::MIN => BASE.with(|b| b.get()),
                    n => n,
                };
                set_nice_of_this_thread(base);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nice_of(tid: i32) -> i32 {
        // SAFETY: getpriority reads a thread's nice value; errno is cleared
        // first because -1 is a valid result.
        unsafe {
            *libc::__errno_location() = 0;
            libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t)
        }
    }

    /// Needs the right to raise the priority (root, as the tests run).
    #[test]
    fn kept_hold_priority_reaches_every_thread_and_outlasts_a_hold() {
        let before = nice_of_this_thread();
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || {
            // SAFETY: gettid has no arguments and cannot fail.
            tx.send(unsafe { libc::gettid() }).unwrap();
            let _ = done_rx.recv();
        });
        let other_tid = rx.recv().unwrap();
        let hold = before - 3;
        set_hold_priority(hold);
        {
            let _b = Boost::new();
            assert_eq!(nice_of_this_thread(), hold, "raised while holding");
            assert_eq!(nice_of(other_tid), before, "only the holding thread");
            keep_hold_priority();
            assert_eq!(nice_of(other_tid), hold, "every thread, at once");
        }
        assert_eq!(
            nice_of_this_thread(),
            hold,
            "the hold ended at the kept priority"
        );
        done_tx.send(()).unwrap();
        other.join().unwrap();
    }
}
