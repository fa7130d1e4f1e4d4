//! Helpers shared by the integration tests: compile C with `cc` into a
//! temporary directory.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub use suture_elf::PATCH_CFLAGS;

pub fn include_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../include")
}

pub struct Cc {
    pub dir: tempfile::TempDir,
}

impl Cc {
    pub fn new() -> Cc {
        Cc {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write(&self, name: &str, src: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, src).expect("write source");
        p
    }

    /// Run `cc` in the temp dir with `args`; panics with cc's output on failure.
    pub fn cc(&self, args: &[&str]) {
        self.run("cc", args);
    }

    pub fn run(&self, prog: &str, args: &[&str]) {
        let out = Command::new(prog)
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
        assert!(
            out.status.success(),
            "{prog} {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).expect("read output")
    }

    /// Compile `src` as a patch with the standard flags plus `extra`.
    pub fn patch_with(&self, stem: &str, src: &str, extra: &[&str]) -> Vec<u8> {
        let c = format!("{stem}.c");
        let o = format!("{stem}.o");
        self.write(&c, src);
        let inc = include_dir();
        let inc = format!("-I{}", inc.display());
        let mut args: Vec<&str> = PATCH_CFLAGS.to_vec();
        args.extend_from_slice(extra);
        args.extend_from_slice(&[&inc, &c, "-o", &o]);
        self.cc(&args);
        self.read(&o)
    }

    pub fn patch(&self, stem: &str, src: &str) -> Vec<u8> {
        self.patch_with(stem, src, &[])
    }
}

/// A small valid patch used by several tests.
pub const SIMPLE_PATCH: &str = r#"
#include <suture.h>
#include <stdio.h>
extern int counter;
extern int counter2;
SUTURE_SYMBOL(counter2, NULL, "counter", 2);
static int fixed_parse(const char *s) { counter++; counter2++; return snprintf(0, 0, "%s", s); }
int other(int x) { return x + 1; }
static int pre(struct suture_object *o) { (void)o; return 0; }
static struct suture_func funcs[] = {
	{ .old_name = "parse", .new_func = fixed_parse },
	{ .old_name = "helper", .new_func = other, .old_sympos = 2 },
	{ }
};
static int statedata;
static struct suture_state states[] = { { .id = 7, .version = 2, .data = &statedata }, { } };
static struct suture_object objs[] = {
	{ .name = NULL, .funcs = funcs, .callbacks = { .pre_patch = pre } },
	{ }
};
SUTURE_PATCH(simple) = { .name = "simple", .objs = objs, .states = states };
"#;
