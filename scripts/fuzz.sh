#!/usr/bin/env bash
# Runs each fuzz target of fuzz/ for SECONDS (default 60), one after the
# other, and prints per target: runs, crashes, corpus size.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Targets (fuzz/fuzz_targets/): patch_parse, elf_symbols, x86_plan,
# x86_dispatch; all of them when none is named.
#
# Works on a stable toolchain: cargo-fuzz (installed with `cargo install` if
# missing) runs with RUSTC_BOOTSTRAP=1 and `--sanitizer none`, so no
# nightly-only sanitizer is needed; libFuzzer itself is built by
# libfuzzer-sys with the system C++ compiler.
#
# Each target starts from the saved corpus fuzz/corpus/TARGET (read only)
# and writes what it finds to fuzz/corpus-work/TARGET (not committed).
# Failing inputs land in fuzz/artifacts/TARGET/. To keep one: minimise it
# (`cargo fuzz tmin ...`, the command is printed on failure), fix the bug and
# copy the input to fuzz/regressions/TARGET/, which `cargo test` replays
# (crates/suture-elf/tests/fuzz_corpus.rs, crates/suture-x86/tests/fuzz_corpus.rs).
#
# Environment: FUZZ_JOBS (default 1) parallel fuzzing processes per target;
# CARGO_TARGET_DIR as usual (default fuzz/target).
set -uo pipefail

secs="${1:-60}"
shift || true
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root/fuzz"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(patch_parse elf_symbols x86_plan x86_dispatch)
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz || exit 1
fi

export RUSTC_BOOTSTRAP=1
# -a: debug assertions and overflow checks on, as in `cargo test`, so an
# arithmetic overflow is a failure too.
flags=(--sanitizer none -O -a)
jobs="${FUZZ_JOBS:-1}"
par=()
if [ "$jobs" -gt 1 ]; then
    par=(-jobs="$jobs" -workers="$jobs")
fi
status=0
summary=()
for t in "${targets[@]}"; do
    mkdir -p "corpus-work/$t" "artifacts/$t" "corpus/$t"
    before=$(find "artifacts/$t" -type f | wc -l)
    log="$(mktemp)"
    echo "== $t: ${secs}s" >&2
    # libFuzzer stops at the first failure; the artifact count says whether
    # there was one.
    cargo fuzz run "${flags[@]}" "$t" "corpus-work/$t" "corpus/$t" -- \
        -max_total_time="$secs" -print_final_stats=1 "${par[@]}" >"$log" 2>&1
    if grep -q "^error: could not compile" "$log"; then
        tail -30 "$log" >&2
        exit 1
    fi
    runs=$(cat "$log" fuzz-*.log 2>/dev/null | grep '^stat::number_of_executed_units' |
        awk '{s += $2} END {print s + 0}')
    rm -f fuzz-*.log
    crashes=$(($(find "artifacts/$t" -type f | wc -l) - before))
    corpus=$(find "corpus-work/$t" "corpus/$t" -type f | wc -l)
    if [ "$crashes" -gt 0 ]; then
        status=1
        grep -m1 -A3 'panicked at' "$log" >&2 || true
        ls -t "artifacts/$t" | head -n "$crashes" | sed "s|^|  fuzz/artifacts/$t/|" >&2
    fi
    summary+=("$(printf '%-13s %6ss %12s runs %3s crashes %6s corpus files' \
        "$t" "$secs" "$runs" "$crashes" "$corpus")")
    rm -f "$log"
done
printf '%s\n' "${summary[@]}"
exit "$status"
