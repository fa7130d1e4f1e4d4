//! Running at a raised priority only while target threads wait for us.
//!
//! Held threads (a whole-process stop, a borrowed thread, a thread stopped
//! for its check) make no progress until suture lets them go, so suture
//! should not then compete for the CPU with the rest of the target. The
//! rest of suture's work (reading ELF files, linking, building unwind
//! tables) runs at the priority it was started with, so it never takes CPU
//! time from a service that is still serving. [`set_hold_priority`] turns
//! this on; each hold takes a [`Boost`] guard, and the priority drops back
//! when the last guard of the thread is dropped.

use std::cell::Cell;
use std::sync::atomic::{AtomicI32, Ordering};

/// The nice value while holding threads; `i32::MIN`: off.
static HOLD_NICE: AtomicI32 = AtomicI32::new(i32::MIN);

thread_local! {
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    static BASE: Cell<i32> = const { Cell::new(0) };
}

/// Run at nice value `nice` while any target thread is held (best effort:
/// without the right to raise the priority nothing changes).
pub fn set_hold_priority(nice: i32) {
    HOLD_NICE.store(nice.clamp(-20, 19), Ordering::Relaxed);
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
                set_nice_of_this_thread(BASE.with(|b| b.get()));
            }
        });
    }
}
