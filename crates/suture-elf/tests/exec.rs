//! Link a patch into this test process's memory and run it: the strongest
//! check that relocations, GOT slots and PLT stubs are right.

mod common;

use std::ffi::{c_char, c_int, CStr};
use std::sync::atomic::{AtomicI32, Ordering};

use common::Cc;
use suture_elf::{PatchFile, ResolveFailure};

static COUNTER: AtomicI32 = AtomicI32::new(0);
/// The tests share COUNTER: run the linked code one test at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

extern "C" fn add_one(x: c_int) -> c_int {
    x + 1
}

extern "C" fn stack_chk_fail() {
    std::process::abort();
}

const SRC: &str = r#"
#include <suture.h>
#include <stdio.h>
extern int counter;
extern int add_one(int);
static const char fmt[] = "v=%d";
static int calls;
static int entry(char *buf, int x) {
	counter += x;
	calls++;
	return snprintf(buf, 32, fmt, add_one(x)) + 100 * calls;
}
static struct suture_func funcs[] = { { .old_name = "orig", .new_func = entry }, { } };
static struct suture_object objs[] = { { .funcs = funcs }, { } };
SUTURE_PATCH(run) = { .objs = objs };
"#;

fn run(extra: &[&str]) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cc = Cc::new();
    let patch = PatchFile::parse(cc.patch_with("run", SRC, extra), "run").unwrap();
    let layout = patch.layout().unwrap();
    let size = layout.size() as usize;
    // SAFETY: plain anonymous mapping, unmapped at the end.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(mem, libc::MAP_FAILED);
    let base = mem as u64;
    let mut resolve = |name: &str| -> Result<u64, ResolveFailure> {
        Ok(match name {
            "counter" => COUNTER.as_ptr() as u64,
            "add_one" => add_one as *const () as u64,
            "snprintf" => libc::snprintf as *const () as u64,
            "__stack_chk_fail" => stack_chk_fail as *const () as u64,
            _ => return Err(format!("unknown `{name}`").into()),
        })
    };
    let img = layout.link(base, &mut resolve).unwrap();
    // SAFETY: `mem` is `size` writable bytes; regions lie within it.
    unsafe {
        std::ptr::copy_nonoverlapping(img.bytes.as_ptr(), mem as *mut u8, size);
        for r in &img.regions {
            let mut prot = 0;
            if r.prot.r {
                prot |= libc::PROT_READ;
            }
            if r.prot.w {
                prot |= libc::PROT_WRITE;
            }
            if r.prot.x {
                prot |= libc::PROT_EXEC;
            }
            let p = (mem as *mut u8).add(r.offset as usize) as *mut libc::c_void;
            assert_eq!(libc::mprotect(p, r.len as usize, prot), 0);
        }
    }
    let entry = img
        .address_of(&patch.descriptor().objects[0].funcs[0].new_func)
        .unwrap();
    // SAFETY: `entry` is the linked `int entry(char *, int)`.
    let f: extern "C" fn(*mut c_char, c_int) -> c_int = unsafe { std::mem::transmute(entry) };
    let before = COUNTER.load(Ordering::SeqCst);
    let mut buf = [0 as c_char; 32];
    assert_eq!(f(buf.as_mut_ptr(), 41), 4 + 100);
    assert_eq!(f(buf.as_mut_ptr(), 41), 4 + 200);
    // SAFETY: snprintf NUL-terminated it.
    let s = unsafe { CStr::from_ptr(buf.as_ptr()) };
    assert_eq!(s.to_str().unwrap(), "v=42");
    assert_eq!(COUNTER.load(Ordering::SeqCst), before + 82);
    // SAFETY: unmapping our own mapping.
    unsafe { libc::munmap(mem, size) };
}

#[test]
fn run_linked_patch_pic() {
    run(&[]);
}

#[test]
fn run_linked_patch_large_model() {
    run(&["-mcmodel=large"]);
}

#[test]
fn run_linked_patch_no_plt() {
    run(&["-fno-plt"]);
}

#[test]
fn run_linked_patch_other_flags() {
    run(&["-O0"]);
    run(&["-Os", "-fno-function-sections", "-fno-data-sections"]);
    run(&["-g", "-fstack-protector-all", "-fcf-protection=full"]);
}
