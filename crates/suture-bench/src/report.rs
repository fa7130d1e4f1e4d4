//! Output of the cost-per-call benchmark: terminal, JSON, Markdown, SVG.
#![allow(clippy::needless_range_loop)]

use crate::calls::{MODES, MODE_TITLES};
use crate::util::{machine, stats, Result};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::Path;

pub const TARGET_AFTER_NS: f64 = 0.15;
pub const TARGET_DURING_NS: f64 = 10.0;

pub struct Calls {
    pub opts_rounds: usize,
    pub opts_batches: usize,
    pub opts_calls: u64,
    /// per mode, per round: median ns/call of the round's batches
    pub triv: Vec<Vec<f64>>,
    pub slow: Vec<Vec<f64>>,
    /// per round: the references triv_jmp1, triv_jmp2 (unpatched mode)
    pub jmps: Vec<Vec<f64>>,
    /// per mode, per round: median over batches of (triv - triv_body), (slow50 - slow50_twin)
    pub triv_pair: Vec<Vec<f64>>,
    pub slow_pair: Vec<Vec<f64>>,
    /// per mode, per round: median over batches of (triv by pointer - triv_body by pointer)
    pub ptr_pair: Vec<Vec<f64>>,
    /// per round: median over batches of (triv_jmp1 - triv_body), (triv_jmp2 - triv_body)
    pub jmp_pair: Vec<Vec<f64>>,
    pub insn: Vec<Option<(f64, f64)>>,
    /// triv's first 8 bytes in each mode (last round)
    pub bytes: Vec<String>,
    /// triv's site mode in `suture status` in each mode (last round)
    pub sites: Vec<String>,
    pub raw: Vec<Value>,
    pub callgrind: Value,
    /// per mode, per round: "TRIV SLOW" instructions of one call by
    /// single-stepping (or "error: ...")
    pub steps: Vec<Vec<String>>,
}

/// Figures for one function in one mode.
#[derive(Clone, Copy)]
pub struct Fig {
    pub med: f64,
    pub min: f64,
    pub max: f64,
    /// median over rounds of (this mode - unpatched) in the same round
    pub added: f64,
    pub added_min: f64,
    pub added_max: f64,
    pub ratio: f64,
}

fn figs(per_mode: &[Vec<f64>]) -> Vec<Fig> {
    let base = stats(&per_mode[0]).0;
    per_mode
        .iter()
        .map(|v| {
            let (med, min, max) = stats(v);
            let d: Vec<f64> = v.iter().zip(&per_mode[0]).map(|(a, b)| a - b).collect();
            let (added, added_min, added_max) = stats(&d);
            Fig {
                med,
                min,
                max,
                added,
                added_min,
                added_max,
                ratio: med / base,
            }
        })
        .collect()
}

/// Paired added cost: per round, (mode's difference to its twin) - (the
/// unpatched mode's difference to its twin); median, min, max over rounds.
fn paired(per_mode: &[Vec<f64>]) -> Vec<(f64, f64, f64)> {
    per_mode
        .iter()
        .map(|v| {
            stats(
                &v.iter()
                    .zip(&per_mode[0])
                    .map(|(a, b)| a - b)
                    .collect::<Vec<_>>(),
            )
        })
        .collect()
}

/// The paired added cost after the transition (median over rounds).
fn tp_after_missing(triv_pair: &[Vec<f64>]) -> f64 {
    paired(triv_pair)[2].0
}

fn fig_json(f: &Fig) -> Value {
    json!({ "median_ns": f.med, "min_ns": f.min, "max_ns": f.max, "ratio_to_unpatched": f.ratio,
            "added_ns_median": f.added, "added_ns_min": f.added_min, "added_ns_max": f.added_max })
}

/// The distinct values of a mode's per-round step counts, joined.
fn distinct(v: &[String]) -> String {
    let mut d: Vec<&String> = Vec::new();
    for x in v {
        if !d.contains(&x) {
            d.push(x);
        }
    }
    d.iter().map(|x| x.as_str()).collect::<Vec<_>>().join(" | ")
}

/// (triv, slow50) instructions of one call, when every round agrees.
fn step_pair(v: &[String]) -> Option<(u64, u64)> {
    let d = distinct(v);
    let mut it = d.split(' ');
    let a = it.next()?.parse().ok()?;
    let b = it.next()?.parse().ok()?;
    it.next().is_none().then_some((a, b))
}

struct Target {
    name: &'static str,
    figure: String,
    met: bool,
}

impl Calls {
    fn targets(&self) -> Vec<Target> {
        let t = figs(&self.triv);
        let bytes_same = self.bytes[3] == self.bytes[0];
        let tp = paired(&self.triv_pair);
        let sp = paired(&self.slow_pair);
        let pp = paired(&self.ptr_pair);
        let (j1, _, _) = stats(&self.jmp_pair[0]);
        let (j2, _, _) = stats(&self.jmp_pair[1]);
        vec![
            Target {
                name: "after a transition: at most 0.15 ns added to a trivial call (a direct call, which suture rewrites to call the new code)",
                figure: format!(
                    "{:+.3} ns paired with the never-patched twin (rounds {:+.3} .. {:+.3}); {:+.3} ns unpaired (rounds {:+.3} .. {:+.3})",
                    tp[2].0, tp[2].1, tp[2].2, t[2].added, t[2].added_min, t[2].added_max
                ),
                met: tp[2].0 <= TARGET_AFTER_NS,
            },
            Target {
                name: "after a transition: at most 0.15 ns added to a trivial call made through a function pointer (it reaches the entry's one `jmp`)",
                figure: format!(
                    "{:+.3} ns paired with `triv_body` called through a pointer (rounds {:+.3} .. {:+.3}); one `jmp` compiled into the target adds {:+.3} ns",
                    pp[2].0, pp[2].1, pp[2].2, j1
                ),
                met: pp[2].0 <= TARGET_AFTER_NS,
            },
            Target {
                name: "after a transition: clearly below a two-jump redirect through padding",
                figure: format!(
                    "direct call {:+.3} ns, through a pointer {:+.3} ns, vs {:+.3} ns for two direct jumps compiled into the target ({:+.3} ns for one), paired in the same batches",
                    tp[2].0, pp[2].0, j2, j1
                ),
                met: tp[2].0 < j2 && pp[2].0 < j2,
            },
            Target {
                name: "after nop removal: no difference (the original bytes)",
                figure: format!(
                    "entry bytes {} the original ({}); instructions per call (triv slow50) {} vs {} unpatched; triv {:+.3} ns, slow50 {:+.3} ns (paired; noise)",
                    if bytes_same { "identical to" } else { "DIFFER from" },
                    self.bytes[3],
                    distinct(&self.steps[3]),
                    distinct(&self.steps[0]),
                    tp[3].0,
                    sp[3].0
                ),
                met: bytes_same
                    && self.sites[3] == "none"
                    && step_pair(&self.steps[3]).is_some()
                    && step_pair(&self.steps[3]) == step_pair(&self.steps[0]),
            },
            Target {
                name: "during a transition: at most 10 ns added per call",
                figure: format!(
                    "triv {:+.3} ns (rounds {:+.3} .. {:+.3}), slow50 {:+.3} ns (rounds {:+.3} .. {:+.3}), paired",
                    tp[1].0, tp[1].1, tp[1].2, sp[1].0, sp[1].1, sp[1].2
                ),
                met: tp[1].0 <= TARGET_DURING_NS && sp[1].0 <= TARGET_DURING_NS,
            },
        ]
    }

    /// The references: triv through one and two compiled jumps, against
    /// unpatched triv in the same round.
    fn ref_figs(&self) -> Vec<Fig> {
        let f1 = figs(&[self.triv[0].clone(), self.jmps[0].clone()]);
        let f2 = figs(&[self.triv[0].clone(), self.jmps[1].clone()]);
        vec![f1[1], f2[1]]
    }

    pub fn print(&self) {
        let t = figs(&self.triv);
        let s = figs(&self.slow);
        println!(
            "cost per call: {} rounds, each the median of {} batches ({} calls of triv, {} of slow50)",
            self.opts_rounds,
            self.opts_batches,
            self.opts_calls,
            self.opts_calls / 25
        );
        let tp = paired(&self.triv_pair);
        let sp = paired(&self.slow_pair);
        let pp = paired(&self.ptr_pair);
        println!(
            "{:<54} {:>36} {:>36} {:>12}",
            "mode",
            "triv ns (added, paired added, ratio)",
            "slow50 ns (added, paired added, ratio)",
            "by pointer"
        );
        for i in 0..4 {
            println!(
                "{:<54} {:>8.3} ({:+.3}, {:+.3}, {:.3}x) {:>8.2} ({:+.2}, {:+.2}, {:.3}x) {:+.3}",
                MODE_TITLES[i],
                t[i].med,
                t[i].added,
                tp[i].0,
                t[i].ratio,
                s[i].med,
                s[i].added,
                sp[i].0,
                s[i].ratio,
                pp[i].0
            );
        }
        let j = self.ref_figs();
        for (k, name) in [
            "reference: triv via one jmp (compiled)",
            "reference: triv via two jumps (compiled)",
        ]
        .iter()
        .enumerate()
        {
            println!(
                "{:<54} {:>8.3} ({:+.3}, {:+.3}, {:.3}x)",
                name,
                j[k].med,
                j[k].added,
                stats(&self.jmp_pair[k]).0,
                j[k].ratio
            );
        }
        for tg in self.targets() {
            println!(
                "target: {} -> {} [{}]",
                tg.name,
                tg.figure,
                if tg.met { "met" } else { "MISSED" }
            );
        }
        for i in 0..4 {
            println!(
                "instructions of one call (triv slow50), single-stepped: {}: {}",
                MODES[i],
                distinct(&self.steps[i])
            );
        }
        println!("callgrind: {}", self.callgrind);
    }

    pub fn write(&self, root: &Path) -> Result<()> {
        let (cpu, cores, kernel) = machine();
        let t = figs(&self.triv);
        let s = figs(&self.slow);
        let tp = paired(&self.triv_pair);
        let sp = paired(&self.slow_pair);
        let pp = paired(&self.ptr_pair);
        let mut modes = serde_json::Map::new();
        for i in 0..4 {
            modes.insert(
                MODES[i].into(),
                json!({ "title": MODE_TITLES[i], "triv": fig_json(&t[i]), "slow50": fig_json(&s[i]),
                        "triv_round_medians_ns": self.triv[i], "slow50_round_medians_ns": self.slow[i],
                        "insn_per_call_perf": self.insn[i].map(|(a, b)| vec![a, b]),
                        "insn_per_call_singlestep_rounds": self.steps[i],
                        "insn_per_call_singlestep": step_pair(&self.steps[i]).map(|(a, b)| json!({ "triv": a, "slow50": b })),
                        "triv_entry_bytes": self.bytes[i], "triv_site_mode": self.sites[i],
                        "triv_minus_twin_round_medians_ns": self.triv_pair[i],
                        "slow50_minus_twin_round_medians_ns": self.slow_pair[i],
                        "triv_added_paired_ns": { "median": tp[i].0, "min": tp[i].1, "max": tp[i].2 },
                        "slow50_added_paired_ns": { "median": sp[i].0, "min": sp[i].1, "max": sp[i].2 },
                        "triv_by_pointer_minus_twin_round_medians_ns": self.ptr_pair[i],
                        "triv_by_pointer_added_paired_ns": { "median": pp[i].0, "min": pp[i].1, "max": pp[i].2 } }),
            );
        }
        let j = self.ref_figs();
        modes.insert(
            "reference_triv_one_jmp".into(),
            json!({ "title": "triv_body reached through one compiled jmp (never patched)", "triv": fig_json(&j[0]),
                    "triv_round_medians_ns": self.jmps[0], "minus_triv_body_round_medians_ns": self.jmp_pair[0] }),
        );
        modes.insert(
            "reference_triv_two_jumps".into(),
            json!({ "title": "triv_body reached through a short jmp then a jmp rel32 (padding-redirect shape)",
                    "triv": fig_json(&j[1]), "triv_round_medians_ns": self.jmps[1], "minus_triv_body_round_medians_ns": self.jmp_pair[1] }),
        );
        let targets: Vec<Value> = self
            .targets()
            .iter()
            .map(|x| json!({ "target": x.name, "figure": x.figure, "met": x.met }))
            .collect();
        let calls = json!({
            "command": "cargo run --release -p suture-bench -- calls",
            "rounds": self.opts_rounds, "batches_per_round": self.opts_batches,
            "triv_calls_per_batch": self.opts_calls, "slow50_calls_per_batch": self.opts_calls / 25,
            "modes": modes, "targets": targets, "callgrind": self.callgrind, "raw_rounds": self.raw,
        });
        // Only this benchmark's sections of BENCHMARKS.json / BENCHMARKS.md.
        let md = self.markdown(&t, &s, &cpu, cores, &kernel);
        let body = md.find("## Cost per call").map(|i| &md[i..]).unwrap_or(&md);
        crate::out::write(
            root,
            "calls",
            calls,
            "## Cost per call",
            body,
            &[("benchmarks-calls.svg", self.svg(&t, &s))],
        )?;
        Ok(())
    }

    fn markdown(&self, t: &[Fig], s: &[Fig], cpu: &str, cores: usize, kernel: &str) -> String {
        let mut m = String::new();
        let _ = writeln!(m, "# suture benchmarks\n");
        let _ = writeln!(
            m,
            "Generated by the benchmark command itself (do not edit by hand):\n"
        );
        let _ = writeln!(
            m,
            "```sh\ncargo run --release -p suture-bench -- calls   # as root (ptrace)\n```\n"
        );
        let _ = writeln!(
            m,
            "Machine: {cpu}, {cores} cores, Linux {kernel}. The machine is shared and noisy: every figure is \
             a median over rounds, with the spread (min..max of the rounds), and every mode is measured side \
             by side in the same run and the same process. Raw figures: `BENCHMARKS.json`.\n"
        );
        let _ = writeln!(m, "## Cost per call\n");
        let _ = writeln!(
            m,
            "A C target (`crates/suture-bench/c/target.c`, `cc -O2`) times its own calls with `clock_gettime` \
             around batches: `triv` (`long triv(long x) {{ return x + 1; }}`, 5 bytes, a dependent chain of calls) and `slow50` (about 50 ns of \
             dependent multiplies). The patch (`c/patch_same.c`) replaces them with identical code, so only \
             the redirection is measured. Each of the {} rounds goes through the four modes in order: \
             unpatched; `suture apply --no-wait` while a thread sits blocked in `holder()` (patched too), so \
             the transition stays open and the measuring thread, once switched, runs through the per-thread \
             dispatch stub; after the transition (the entry jumps to the new code, and the measuring loop's \
             direct call was rewritten by suture to call the new code itself); after a `.replace` patch that \
             changes another function (`c/patch_replace.c`) removed the nops (the entry bytes are checked \
             against the original); then the replace patch is disabled. A round's figure is the median of \
             {} batches of {} calls (triv) or {} calls (slow50); the loop's own cost is included. Each batch \
             also calls `triv` through a function pointer (a caller suture cannot rewrite, which reaches the \
             entry and its jump), paired with `triv_body` called the same way.\n",
            self.opts_rounds,
            self.opts_batches,
            self.opts_calls,
            self.opts_calls / 25
        );
        let _ = writeln!(
            m,
            "| mode | triv ns/call (min..max) | added ns | added ns, paired (min..max) | ratio | slow50 ns/call (min..max) | added ns | added ns, paired (min..max) | ratio | triv through a pointer: added ns, paired (min..max) | triv entry bytes | triv site |"
        );
        let _ = writeln!(m, "|---|---|---|---|---|---|---|---|---|---|---|---|");
        let tp = paired(&self.triv_pair);
        let sp = paired(&self.slow_pair);
        let pp = paired(&self.ptr_pair);
        for i in 0..4 {
            let _ = writeln!(
                m,
                "| {} | {:.3} ({:.3}..{:.3}) | {:+.3} | {:+.3} ({:+.3}..{:+.3}) | {:.3} | {:.2} ({:.2}..{:.2}) | {:+.2} | {:+.2} ({:+.2}..{:+.2}) | {:.3} | {:+.3} ({:+.3}..{:+.3}) | `{}` | {} |",
                MODE_TITLES[i],
                t[i].med,
                t[i].min,
                t[i].max,
                t[i].added,
                tp[i].0,
                tp[i].1,
                tp[i].2,
                t[i].ratio,
                s[i].med,
                s[i].min,
                s[i].max,
                s[i].added,
                sp[i].0,
                sp[i].1,
                sp[i].2,
                s[i].ratio,
                pp[i].0,
                pp[i].1,
                pp[i].2,
                self.bytes[i],
                self.sites[i]
            );
        }
        let j = self.ref_figs();
        for (k, name) in [
            "reference: `triv_body` via one compiled `jmp`",
            "reference: `triv_body` via two jumps (short `jmp`, then `jmp rel32`)",
        ]
        .iter()
        .enumerate()
        {
            let _ = writeln!(
                m,
                "| {name} | {:.3} ({:.3}..{:.3}) | {:+.3} | {:+.3} | {:.3} | | | | | | | |",
                j[k].med,
                j[k].min,
                j[k].max,
                j[k].added,
                stats(&self.jmp_pair[k]).0,
                j[k].ratio
            );
        }
        let _ = writeln!(
            m,
            "\n\"added\" is the median over rounds of (mode − unpatched) measured in the same round. \"paired\" \
             removes the drift between the modes (which run one after the other): each batch also times a \
             never-patched twin with the same body (`triv_body`, `slow50_twin`), a round's figure is the median \
             over batches of (function − twin), and the added cost is that figure minus the unpatched mode's, \
             in the same round; the targets are judged on it. For the references, \"paired\" is (reference − \
             `triv_body`) in the same batches. The two \
             reference rows are functions compiled into the target and never patched (`triv_jmp1`, `triv_jmp2`), \
             timed in the unpatched mode of each round: what one and two taken direct jumps cost on this \
             machine in the same loop.\n"
        );
        let _ = writeln!(m, "![cost per call by mode](benchmarks-calls.svg)\n");
        let _ = writeln!(m, "### Targets\n\n| target | figure | met |\n|---|---|---|");
        let targets = self.targets();
        for tg in &targets {
            let _ = writeln!(
                m,
                "| {} | {} | {} |",
                tg.name,
                tg.figure,
                if tg.met { "yes" } else { "**no**" }
            );
        }
        let (j1, _, _) = stats(&self.jmp_pair[0]);
        let direct = tp_after_missing(&self.triv_pair);
        let by_pointer = paired(&self.ptr_pair)[2].0;
        let _ = writeln!(
            m,
            "\nAfter a transition suture rewrites every direct `call` of the patched function in its object \
             to call the new code (the loop here: {direct:+.3} ns, and the single-stepped count is that of the \
             new code alone), and points them back at the entry whenever the function changes again (a \
             transition starts, a patch is disabled, a nop is removed). A call it cannot rewrite (through a \
             pointer, from another object through the PLT) reaches the entry's one direct `jmp`: \
             {by_pointer:+.3} ns here, where one `jmp` compiled into the target and never patched adds {j1:+.3} \
             ns in the same batches. {}",
            if targets[1].met {
                "Both are within the 0.15 ns target."
            } else {
                "That is one taken direct jump in a chain of dependent calls (about one cycle on this \
                 machine), above the 0.15 ns target; closing it for calls through pointers would need no \
                 jump at all on their path, i.e. rewriting the stored function pointers, which suture cannot \
                 find reliably from outside the process."
            }
        );
        if !targets[0].met {
            let _ = writeln!(
                m,
                "\nThe 0.15 ns target for a direct call is missed by {:.3} ns in this run.",
                direct - TARGET_AFTER_NS
            );
        }
        let _ = writeln!(
            m,
            "\nDuring a transition a switched thread runs the dispatch stub at each call: {} more instructions \
             (the `fs:0` lookup in the pending table, past its tombstone, then the jump to the new code), \
             a few ns on a trivial call and hidden in the latency chain of the 50 ns one. A pending thread \
             instead takes the stub's trap (a system call, then its stack check by the worker) once, at its \
             first call, and is switched there.\n",
            match (step_pair(&self.steps[1]), step_pair(&self.steps[0])) {
                (Some((d, _)), Some((u, _))) => (d as i64 - u as i64).to_string(),
                _ => "(not counted)".to_string(),
            }
        );
        let _ = writeln!(m, "\n### Instruction counts\n");
        let _ = writeln!(
            m,
            "Exact instructions of one call, from the function's entry to its return (the `ret` included, \
             the `call` not), counted by single-stepping the target's `step` thread with ptrace in each mode \
             of every round (values that differ between rounds are separated by `|`):\n"
        );
        let _ = writeln!(m, "| mode | triv | slow50 |\n|---|---|---|");
        for i in 0..4 {
            let d = distinct(&self.steps[i]);
            let (a, b) = match step_pair(&self.steps[i]) {
                Some((a, b)) => (a.to_string(), b.to_string()),
                None => (d.clone(), d),
            };
            let _ = writeln!(m, "| {} | {a} | {b} |", MODE_TITLES[i]);
        }
        let _ = writeln!(m);
        match self.insn[0] {
            Some(_) => {
                let _ = writeln!(m, "User-space instructions per loop iteration (`perf_event_open`, in the target):\n");
                for i in 0..4 {
                    if let Some((a, b)) = self.insn[i] {
                        let _ = writeln!(m, "- {}: triv {a:.3}, slow50 {b:.3}", MODE_TITLES[i]);
                    }
                }
            }
            None => {
                let _ = writeln!(
                    m,
                    "Hardware counters are not available to the target here (`perf_event_open` fails: a VM \
                     without a virtual PMU): the exact counts are the single-stepped ones above, cross-checked by callgrind below.\n"
                );
            }
        }
        let cg = &self.callgrind;
        if let Some(ti) = cg["triv_insn_per_call"].as_f64() {
            let _ = writeln!(
                m,
                "callgrind (`valgrind --tool=callgrind`, {} calls, {}): triv {:.3} and slow50 {:.3} instructions \
                 per call (their self cost over the call count); the loops around them {:.3} and {:.3} per \
                 iteration (call and loop included). Single-stepping gives {} for the unpatched mode.\n",
                cg["calls"],
                cg["modes"].as_str().unwrap_or("?"),
                ti,
                cg["slow50_insn_per_call"].as_f64().unwrap_or(f64::NAN),
                cg["triv_loop_insn_per_iteration"].as_f64().unwrap_or(f64::NAN),
                cg["slow50_loop_insn_per_iteration"].as_f64().unwrap_or(f64::NAN),
                distinct(&self.steps[0]),
            );
            if cg["modes"] == "unpatched only" {
                let _ = writeln!(
                m,
                "The patched modes cannot be measured under valgrind: suture attaches to the valgrind process, \
                 whose `/proc/PID/exe` and main object are the tool (`callgrind-amd64-linux`), not the target \
                 (the target's ELF is mapped by valgrind's own loader), so `suture apply` finds no `triv` \
                 (`{}`). Even with the symbol found, the guest never executes its own code bytes (valgrind runs \
                 translations of them), its threads' registers and `fs` base seen through ptrace are \
                 valgrind's, not the guest's, so neither the stack check nor the dispatch stub's `fs:0` lookup \
                 would hold. The exact counts for the patched modes come from single-stepping (above).\n",
                {
                    let e = cg["suture_apply_under_valgrind"].as_str().unwrap_or("?").trim();
                    e.rsplit_once("): ").map(|(_, m)| m).unwrap_or(e).replace('|', "\\|")
                }
            );
            }
        } else {
            let _ = writeln!(m, "callgrind (`valgrind --tool=callgrind`): `{}`\n", cg);
        }
        m
    }

    fn svg(&self, t: &[Fig], s: &[Fig]) -> String {
        let (w, h) = (760.0, 360.0);
        let mut o = String::new();
        let _ = writeln!(
            o,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">"
        );
        let _ = writeln!(o, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
        let _ = writeln!(
            o,
            "<text x=\"{}\" y=\"20\" text-anchor=\"middle\" font-size=\"15\">Cost per call by mode (median of rounds, whiskers: min..max)</text>",
            w / 2.0
        );
        let colors = ["#4e79a7", "#e15759", "#59a14f", "#f28e2b"];
        for (p, (name, f)) in [("triv", t), ("slow50", s)].iter().enumerate() {
            let x0 = 60.0 + p as f64 * 370.0;
            let (pw, top, bottom) = (300.0, 50.0, 290.0);
            let ymax = f.iter().map(|x| x.max).fold(0.0f64, f64::max) * 1.15;
            let y = |v: f64| bottom - (v / ymax) * (bottom - top);
            let _ = writeln!(o, "<text x=\"{}\" y=\"42\" text-anchor=\"middle\" font-size=\"13\">{name} (ns/call)</text>", x0 + pw / 2.0);
            let _ = writeln!(
                o,
                "<line x1=\"{x0}\" y1=\"{bottom}\" x2=\"{}\" y2=\"{bottom}\" stroke=\"black\"/>",
                x0 + pw
            );
            let _ = writeln!(
                o,
                "<line x1=\"{x0}\" y1=\"{top}\" x2=\"{x0}\" y2=\"{bottom}\" stroke=\"black\"/>"
            );
            for k in 0..=4 {
                let v = ymax * k as f64 / 4.0;
                let _ = writeln!(
                    o,
                    "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"10\">{:.2}</text>",
                    x0 - 4.0,
                    y(v) + 3.0,
                    v
                );
            }
            let bw = pw / 4.0;
            for i in 0..4 {
                let bx = x0 + i as f64 * bw + 8.0;
                let _ = writeln!(
                    o,
                    "<rect x=\"{bx:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"/>",
                    y(f[i].med),
                    bw - 16.0,
                    bottom - y(f[i].med),
                    colors[i]
                );
                let cx = bx + (bw - 16.0) / 2.0;
                let _ = writeln!(
                    o,
                    "<line x1=\"{cx:.1}\" y1=\"{:.1}\" x2=\"{cx:.1}\" y2=\"{:.1}\" stroke=\"black\"/>",
                    y(f[i].min),
                    y(f[i].max)
                );
                let _ = writeln!(
                    o,
                    "<text x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\">{:.2}</text>",
                    y(f[i].max) - 4.0,
                    f[i].med
                );
                let label = ["unpatched", "during", "after", "nop removed"][i];
                let _ = writeln!(
                    o,
                    "<text x=\"{cx:.1}\" y=\"{}\" text-anchor=\"middle\" font-size=\"11\">{label}</text>",
                    bottom + 16.0
                );
                let _ = writeln!(
                    o,
                    "<text x=\"{cx:.1}\" y=\"{}\" text-anchor=\"middle\" font-size=\"10\">{:.3}x</text>",
                    bottom + 30.0,
                    f[i].ratio
                );
            }
        }
        let _ = writeln!(
            o,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"10\">during: switched thread through the dispatch stub; after: one jmp; nop removed: original bytes back. Ratio to unpatched below each bar.</text>",
            w / 2.0,
            h - 12.0
        );
        let _ = writeln!(o, "</svg>");
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paired_is_per_round_difference_to_unpatched() {
        let v = vec![
            vec![0.1, 0.2, 0.0],
            vec![0.5, 0.4, 0.3],
            vec![0.1, 0.2, 0.0],
        ];
        let p = paired(&v);
        assert_eq!(p[0], (0.0, 0.0, 0.0));
        assert!((p[1].0 - 0.3).abs() < 1e-12 && (p[1].1 - 0.2).abs() < 1e-12);
        assert_eq!(p[2].0, 0.0);
    }

    #[test]
    fn step_counts_agree_only_when_every_round_does() {
        assert_eq!(step_pair(&["2 205".into(), "2 205".into()]), Some((2, 205)));
        assert_eq!(step_pair(&["2 205".into(), "3 205".into()]), None);
        assert_eq!(step_pair(&["error: x".into()]), None);
        assert_eq!(distinct(&["a".into(), "b".into(), "a".into()]), "a | b");
    }
}
