//! The runtime's own C tests (runtime/test/run.sh): the shadow-variable API
//! as the kernel's selftest uses it, and 8 threads allocating, looking up
//! and freeing concurrently (also under ThreadSanitizer and
//! AddressSanitizer when the compiler has them).

use std::path::Path;
use std::process::Command;

#[test]
fn runtime_c_tests_pass() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../runtime/test/run.sh");
    let out = Command::new("bash")
        .arg(&script)
        .env("STRESS_SECONDS", "1")
        .output()
        .expect("run runtime/test/run.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "runtime tests failed:\n{text}");
    assert!(text.contains("all runtime tests passed"), "{text}");
}
