#!/usr/bin/env bash
# Coverage-guided fuzzing of ferrum's parsers (docs/fuzzing.md): every cargo-fuzz target in fuzz/
# runs SECONDS_PER_TARGET seconds (default 60), one after the other, under `nice -n 19`, on the
# stable toolchain (`cargo fuzz -s none`: no sanitizer, so no -Z flag; debug assertions on, so an
# integer overflow is a crash too). Each starts from its seeds (fuzz/seeds/<target>, written by
# fuzz/make_seeds.py), the committed corpus (fuzz/corpus/<target>) and what earlier runs here
# found (fuzz/work/<target>, not committed). Exits non-zero on the first crash, timeout or
# out-of-memory, naming the input libFuzzer saved under fuzz/artifacts/<target>/.
#
#   ci/fuzz.sh [SECONDS_PER_TARGET] [--merge] [TARGET...]
#
# --merge: afterwards, fold what the run found into fuzz/corpus/<target>, minimized (libFuzzer's
# -set_cover_merge=1 on edges, hit counters off: a small set of inputs reaching every edge the
# seeds do not, which keeps the committed corpus to a few MB); the inputs that once crashed a
# parser (fuzz/corpus/<target>/crash-*) are always kept.
# A per-target summary (time, executions, coverage, corpus) is printed and kept in
# fuzz/work/summary.txt. Installs cargo-fuzz from crates.io when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
seconds=60
merge=0
targets=()
for arg in "$@"; do
  case "$arg" in
    --merge) merge=1 ;;
    ''|*[!0-9]*) targets+=("$arg") ;;
    *) seconds="$arg" ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(gguf safetensors config request)

if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  echo "installing cargo-fuzz $CARGO_FUZZ_VERSION (crates.io)"
  cargo install --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi

# The flags every command below passes to cargo fuzz: no sanitizer (stable), debug assertions.
fuzz_flags=(--fuzz-dir fuzz -s none -a)
echo "== building the fuzz targets (instrumented release build, fuzz/target)"
nice -n 19 cargo fuzz build "${fuzz_flags[@]}"

# Largest input libFuzzer makes, per target: a few times the largest seed.
max_len() {
  case "$1" in
    gguf) echo 32768 ;;
    safetensors) echo 16384 ;;
    *) echo 8192 ;;
  esac
}

mkdir -p fuzz/work
for t in "${targets[@]}"; do
  [ -d "fuzz/seeds/$t" ] || { echo "error: no fuzz target '$t' (fuzz/seeds/$t is missing)" >&2; exit 2; }
  mkdir -p "fuzz/work/$t" "fuzz/corpus/$t"
  log="fuzz/work/$t.log"
  echo "== fuzzing $t for ${seconds}s (log: $log)"
  start=$(date +%s)
  status=0
  nice -n 19 cargo fuzz run "${fuzz_flags[@]}" "$t" "fuzz/work/$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
    -max_total_time="$seconds" -max_len="$(max_len "$t")" -dict="fuzz/dict/$t.dict" \
    -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1 || status=$?
  elapsed=$(( $(date +%s) - start ))
  if [ "$status" -ne 0 ]; then
    # The panic and where libFuzzer saved the input (cargo-fuzz also dumps the input's bytes).
    grep -E -A4 'panicked at|ERROR: libFuzzer|Test unit written' "$log" | grep -v '^ *at ' | head -n 30 >&2
    echo "error: fuzz target $t failed (exit $status) after ${elapsed}s; the input is under fuzz/artifacts/$t/" >&2
    exit 1
  fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  final=$(grep -E '^#[0-9]+.*(DONE|pulse|NEW|REDUCE).*cov:' "$log" | tail -n 1 |
    sed -E 's/.*(cov: [0-9]+) (ft: [0-9]+) (corp: [0-9]+\/[0-9]+[a-zA-Z]*).*/\1 \2 \3/')
  line="$t: ${elapsed}s, ${execs:-?} executions, $final, 0 crashes"
  echo "$line" | tee -a fuzz/work/summary.txt
  if [ "$merge" = 1 ]; then
    # Seeds first in the output folder, so only inputs adding coverage beyond them are kept; then
    # the seeds are taken out again (they live in fuzz/seeds).
    merged="fuzz/work/$t.merged"
    rm -rf "$merged" && mkdir -p "$merged"
    cp "fuzz/seeds/$t"/* "$merged/"
    nice -n 19 cargo fuzz run "${fuzz_flags[@]}" "$t" "$merged" "fuzz/corpus/$t" "fuzz/work/$t" -- \
      -set_cover_merge=1 -use_counters=0 -max_len="$(max_len "$t")" -timeout=10 -rss_limit_mb=2048 \
      >"fuzz/work/$t.merge.log" 2>&1
    for s in "fuzz/seeds/$t"/*; do rm -f "$merged/$(basename "$s")"; done
    # Inputs that once crashed a parser (crash-*) stay, whatever coverage they add now.
    find "fuzz/corpus/$t" -maxdepth 1 -name 'crash-*' -exec cp {} "$merged/" \;
    rm -rf "fuzz/corpus/$t" && mv "$merged" "fuzz/corpus/$t"
    echo "$t: corpus merged: $(ls "fuzz/corpus/$t" | wc -l) inputs, $(du -sh --apparent-size "fuzz/corpus/$t" | cut -f1)"
  fi
done
