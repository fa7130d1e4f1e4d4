//! `suture demo`: the whole job on a bundled service, start to finish.
//!
//! It compiles a small multi-threaded shop (demo/service.c) and its fix
//! (demo/fix.c) with the system `cc`, starts the shop, shows a request
//! exploiting its bug, patches the running shop, shows the fix working and
//! `status`, disables the patch, shows the original behaviour again, and
//! stops the shop.

use crate::{build, format};
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

const SERVICE_C: &str = include_str!("../demo/service.c");
const FIX_C: &str = include_str!("../demo/fix.c");

/// The service process, killed and reaped when dropped.
struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn request(port: u16, line: &str) -> Result<String> {
    let mut c =
        TcpStream::connect(("127.0.0.1", port)).context("connecting to the demo service")?;
    c.write_all(format!("{line}\n").as_bytes())?;
    let mut out = String::new();
    c.read_to_string(&mut out)?;
    Ok(out.trim_end().to_string())
}

fn show(port: u16, lines: &[&str]) -> Result<()> {
    for l in lines {
        println!("    > {l:<10} < {}", request(port, l)?);
    }
    Ok(())
}

pub fn run() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("suture-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let _cleanup = Cleanup(dir.clone());
    let svc_c = dir.join("service.c");
    let fix_c = dir.join("fix.c");
    std::fs::write(&svc_c, SERVICE_C)?;
    std::fs::write(&fix_c, FIX_C)?;
    let svc = dir.join("shop");
    println!("== building the demo shop service and its fix with cc");
    let st = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(["-O2", "-g", "-pthread", "-o"])
        .arg(&svc)
        .arg(&svc_c)
        .status()
        .context("cannot run cc; install a C compiler")?;
    if !st.success() {
        bail!("cc failed to build the demo service");
    }
    let fix_o = build::build(&fix_c, Some(&dir.join("fix.o")), &[])?;

    let mut child = Command::new(&svc)
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .context("starting the demo service")?;
    let stdout = child.stdout.take().expect("piped");
    let service = Service(child);
    let mut port = String::new();
    BufReader::new(stdout).read_line(&mut port)?;
    let port: u16 = port
        .trim()
        .parse()
        .context("the demo service did not start")?;
    let pid = service.0.id() as i32;
    println!("== shop running: pid {pid}, 4 worker threads, 127.0.0.1:{port}");
    show(port, &["buy 2", "buy -5"])?;
    println!("   'buy -5' pays the customer: that is the bug.");

    println!("\n== suture apply {pid} fix.o");
    let r = suture_engine::apply(pid, &fix_o)?;
    print!("{}", format::apply(&r));
    println!("\n== suture status {pid}");
    print!("{}", format::status(&suture_engine::status(pid)?));
    println!("\n== the same requests to the same running process");
    show(port, &["buy 2", "buy -5"])?;

    println!("\n== suture disable {pid} {}", r.patch);
    print!(
        "{}",
        format::disable(&suture_engine::disable(pid, &r.patch)?)
    );
    show(port, &["buy 2", "buy -5"])?;
    println!("   the original code runs again, byte for byte.");
    drop(service);
    println!("\n== shop stopped; demo complete");
    Ok(())
}

struct Cleanup(std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
