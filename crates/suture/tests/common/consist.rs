//! The consistency target (tests/fixtures/consist.c) and polling helpers
//! shared by the transition and cumulative-patch tests.

use super::*;
use serde_json::Value;
use std::time::{Duration, Instant};

/// The consistency target (tests/fixtures/consist.c).
pub struct Consist {
    pub t: Target,
}

#[derive(Debug, Clone)]
pub struct Q {
    pub pairs: i64,
    pub mixed: i64,
    pub zero: Vec<i64>,
    pub fa: Vec<i64>,
    pub fh: Vec<i64>,
    pub reader_count: i64,
    pub reader_last: i64,
    pub spawned: i64,
    pub child: i64,
}

impl Consist {
    pub fn start(args: &[&str]) -> Consist {
        Consist {
            t: Target::start("consist", args),
        }
    }

    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Consist {
        Consist {
            t: Target::start_env("consist", args, env),
        }
    }

    pub fn pid(&self) -> String {
        self.t.pid.to_string()
    }

    pub fn q(&mut self) -> Q {
        let line = self.t.ask("q");
        let get = |k: &str| -> &str {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("no {k} in {line}"))
        };
        let (rc, rl) = get("reader").split_once(':').unwrap();
        let list =
            |k: &str| -> Vec<i64> { get(k).split(',').map(|v| v.parse().unwrap()).collect() };
        Q {
            pairs: get("pairs").parse().unwrap(),
            mixed: get("mixed").parse().unwrap(),
            zero: list("zero"),
            fa: list("fa"),
            fh: list("fh"),
            reader_count: rc.parse().unwrap(),
            reader_last: rl.parse().unwrap(),
            spawned: get("spawned").parse().unwrap(),
            child: get("child").parse().unwrap(),
        }
    }

    pub fn tid(&mut self, which: &str) -> i64 {
        let line = self.t.ask("s");
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{which}=")))
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Poll the target until `cond` holds (bounded: a minute).
    pub fn until(&mut self, what: &str, cond: impl Fn(&Q) -> bool) -> Q {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let q = self.q();
            if cond(&q) {
                return q;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {q:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Poll `suture status` until `cond` holds (bounded: a minute).
pub fn status_until(pid: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = json(&["status", pid, "--json"]);
        if cond(&st) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {st:#}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn pending_tids(st: &Value) -> Vec<i64> {
    st["transition"]["pending"]
        .as_array()
        .map(|a| a.iter().map(|p| p["tid"].as_i64().unwrap()).collect())
        .unwrap_or_default()
}

pub fn no_transition(st: &Value) -> bool {
    st["transition"].is_null()
}

/// A process killed on drop (a child forked by a target).
pub struct KillOnDrop(pub i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-9", &self.0.to_string()])
            .status();
    }
}

pub fn f(name: &str) -> String {
    fixture(name).to_str().unwrap().to_string()
}
