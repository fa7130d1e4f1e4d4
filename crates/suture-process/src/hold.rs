//! What suture's stops cost the target: how long threads were held.
//!
//! Every [`crate::StoppedProcess`], [`crate::Hijack`] and
//! [`crate::Tracer`] stop adds to a tally kept per tracer thread, which a
//! command reads with [`take_hold_stats`] to report what it imposed on the
//! target ("the whole process was stopped at once for X µs").

use std::cell::Cell;
use std::time::Duration;

/// The stops made by one tracer thread since the last [`take_hold_stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HoldStats {
    /// Whole-process stops ([`crate::Process::stop_all`]).
    pub whole_stops: u32,
    /// The most threads one whole-process stop held.
    pub whole_threads: usize,
    /// Longest time from the first thread of a whole-process stop asked to
    /// stop until the last one was released: what that stop cost the
    /// thread that waited longest.
    pub whole_held: Duration,
    /// Longest time every thread of the process was stopped at once (from
    /// the last thread stopping until the first was released).
    pub whole_all: Duration,
    /// Stops of a single thread, each while the others ran, from the
    /// interrupt to the release: to be looked at (its stack check, its
    /// thread pointer, its program counter), and the longest.
    pub check_stops: u64,
    pub check_held: Duration,
    /// The same for a thread borrowed to run system calls (or a function)
    /// for suture.
    pub borrow_stops: u64,
    pub borrow_held: Duration,
}

/// Why a single thread was held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ThreadHold {
    /// Stopped to be looked at ([`crate::Tracer`]).
    Checked,
    /// Borrowed to run system calls ([`crate::Hijack`]).
    Borrowed,
}

thread_local! {
    static STATS: Cell<HoldStats> = Cell::new(HoldStats::default());
}

/// The tally since the last call (and a fresh one started).
pub fn take_hold_stats() -> HoldStats {
    STATS.with(|s| s.take())
}

/// `SUTURE_DEBUG_HOLDS=1`: every stop is also logged on stderr (what kind,
/// how long), to see where a command's pauses come from.
fn debug(what: std::fmt::Arguments<'_>) {
    debug_log(format_args!("hold: {what}"));
}

/// With `SUTURE_DEBUG_HOLDS=1`: `what` on stderr, after the time of
/// `CLOCK_MONOTONIC` in ms (to line it up with what a benchmark saw).
pub fn debug_log(what: std::fmt::Arguments<'_>) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("SUTURE_DEBUG_HOLDS").is_some_and(|v| v == "1")) {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes only the timespec we pass.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let now = ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6;
        eprintln!("{now:.3} suture: {what}");
    }
}

/// Adds a tally taken on another thread (e.g. one that traced threads
/// for a while) to this thread's.
pub fn add_hold_stats(o: HoldStats) {
    STATS.with(|s| {
        let mut v = s.get();
        v.whole_stops += o.whole_stops;
        v.whole_threads = v.whole_threads.max(o.whole_threads);
        v.whole_held = v.whole_held.max(o.whole_held);
        v.whole_all = v.whole_all.max(o.whole_all);
        v.check_stops += o.check_stops;
        v.check_held = v.check_held.max(o.check_held);
        v.borrow_stops += o.borrow_stops;
        v.borrow_held = v.borrow_held.max(o.borrow_held);
        s.set(v);
    });
}

pub(crate) fn record_whole(threads: usize, held: Duration, all: Duration) {
    debug(format_args!(
        "whole process, {threads} threads: longest wait {held:?}, all stopped {all:?}"
    ));
    STATS.with(|s| {
        let mut v = s.get();
        v.whole_stops += 1;
        v.whole_threads = v.whole_threads.max(threads);
        v.whole_held = v.whole_held.max(held);
        v.whole_all = v.whole_all.max(all);
        s.set(v);
    });
}

pub(crate) fn record_thread(kind: ThreadHold, tid: i32, held: Duration) {
    let what = match kind {
        ThreadHold::Checked => "checked",
        ThreadHold::Borrowed => "borrowed",
    };
    debug(format_args!("{what} thread {tid}: {held:?}"));
    STATS.with(|s| {
        let mut v = s.get();
        match kind {
            ThreadHold::Checked => {
                v.check_stops += 1;
                v.check_held = v.check_held.max(held);
            }
            ThreadHold::Borrowed => {
                v.borrow_stops += 1;
                v.borrow_held = v.borrow_held.max(held);
            }
        }
        s.set(v);
    });
}
