//! Compiles suture's runtime (runtime/: shadow variables, states) into a
//! relocatable object that the engine embeds and loads into targets with
//! its own loader, built with exactly the flags patches are built with.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let src = repo.join("runtime/runtime.c");
    for f in ["shadow.c", "state.c"] {
        println!(
            "cargo:rerun-if-changed={}",
            repo.join("runtime").join(f).display()
        );
    }
    let include_dir = repo.join("include");
    println!("cargo:rerun-if-changed={}", src.display());
    println!(
        "cargo:rerun-if-changed={}",
        include_dir.join("suture_shadow.h").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        include_dir.join("suture.h").display()
    );
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("suture_runtime.o");
    let status = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(suture_elf::PATCH_CFLAGS)
        .arg("-I")
        .arg(&include_dir)
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .status()
        .expect("suture-engine's build needs a C compiler (cc) for its runtime");
    assert!(status.success(), "compiling {} failed", src.display());
}
