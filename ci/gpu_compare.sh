#!/usr/bin/env bash
# A/B performance check of two `ferrum` builds on the GPU machine, in one device call (the
# [design] rule: a refactor must not move decode or offline throughput by more than 2 %).
#
#   ci/gpu_compare.sh --base-bin PATH [--dest DIR]   pack PATH (the baseline build) and this
#                                     tree's release `ferrum` into DIR (default .gpu-cmp)
#   ci/gpu_compare.sh --base REF [--dest DIR]        build the baseline from git REF first (in a
#                                     temporary worktree with its own target dir)
#   bash .gpu-cmp/run.sh              on the GPU machine: each bench runs base, new, base, new
#                                     (interleaved, so drift hits both); JSON lines to
#                                     $OUT/compare.jsonl tagged with "build", a summary to stdout
#
# Benches (random weights, bf16, greedy): Llama-2-7B 128/128 decode at batch 1 and 64;
# Llama-3-8B 128/128 offline with 512 requests; then the load of a 7B-shape bf16 safetensors
# checkpoint written there (scripts/write_random_llama.py): wall time and peak host RSS per
# build (SKIP_LOAD=1 leaves it out, SKIP_BENCH=1 runs only it).
set -euo pipefail

if [ "${1:-}" = "run" ]; then
  here=$(cd "$(dirname "$0")" && pwd)
  out=${OUT:-/tmp/ferrum-compare}
  mkdir -p "$out"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/card.txt"
  cat "$here/builds.txt" | tee -a "$out/card.txt"
  benches=(
    "--preset llama2-7b --prompt-len 128 --gen-len 128 --batch-size 1,64"
    "--preset llama3-8b --prompt-len 128 --gen-len 128 --batch-size 512 --max-num-batched-tokens 8192"
  )
  # SKIP_BENCH=1 runs only the load check (so the two halves fit separate device calls).
  [ "${SKIP_BENCH:-0}" = 1 ] && benches=()
  for args in "${benches[@]}"; do
    for round in 1 2; do
      for build in base new; do
        echo "== $build round $round: ferrum bench --device cuda $args" | tee -a "$out/compare.log"
        # shellcheck disable=SC2086
        timeout 400 "$here/ferrum-$build" bench --device cuda $args --json 2>>"$out/compare.log" |
          python3 -c 'import json,sys
for l in sys.stdin:
    l=l.strip()
    if l.startswith("{"):
        d=json.loads(l); d["build"]=sys.argv[1]; d["round"]=int(sys.argv[2]); print(json.dumps(d))' "$build" "$round" |
          tee -a "$out/compare.jsonl"
      done
    done
  done
  # Loading a real-size bf16 safetensors checkpoint: seconds to ready and peak host RSS (the
  # [design] rule: the GPU load holds about one layer on the host, not a full f32 copy).
  if [ "${SKIP_LOAD:-0}" != 1 ] && python3 -c "import torch, safetensors" 2>/dev/null; then
    ckpt=/tmp/ferrum-llama2-7b-random
    [ -f "$ckpt/model.safetensors.index.json" ] ||
      python3 "$here/write_random_llama.py" --shape llama2-7b --out "$ckpt" | tee -a "$out/compare.log"
    for build in base new; do
      /usr/bin/time -v -o "$out/load-$build.time" timeout 400 "$here/ferrum-$build" bench --device cuda \
        --model "$ckpt" --prompt-len 16 --gen-len 2 --batch-size 1 --json >>"$out/load-$build.jsonl" 2>>"$out/compare.log"
      echo "load $build: $(grep -E 'Maximum resident|Elapsed \(wall' "$out/load-$build.time" | tr -s ' ' | tr '\n' ';')" |
        tee -a "$out/compare.log"
    done
  fi
  python3 - "$out/compare.jsonl" <<'PY'
import json, sys, collections
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
best = collections.defaultdict(dict)
for r in rows:
    key = (r.get("source"), r.get("batch_size"), r.get("prompt_len"), r.get("gen_len"))
    for metric in ("decode_tokens_per_s", "output_tokens_per_s"):
        v = r.get(metric)
        if v is not None:
            k = key + (metric,)
            best[k][r["build"]] = max(best[k].get(r["build"], 0.0), v)
print("best of 2 rounds: (source, batch, prompt, gen, metric): base, new, new/base")
for key, b in best.items():
    if "base" in b and "new" in b:
        print(f"{key}: {b['base']:.1f} {b['new']:.1f} {b['new'] / b['base']:.4f}")
PY
  exit 0
fi

cd "$(dirname "$0")/.."
dest=".gpu-cmp"
base_bin=""
base_ref=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dest) dest="$2"; shift 2 ;;
    --base-bin) base_bin="$2"; shift 2 ;;
    --base) base_ref="$2"; shift 2 ;;
    *) echo "usage: ci/gpu_compare.sh --base-bin PATH | --base REF [--dest DIR]" >&2; exit 2 ;;
  esac
done
if [ -n "$base_ref" ]; then
  wt=$(mktemp -d /tmp/ferrum-base.XXXXXX)
  git worktree add -q --detach "$wt" "$base_ref"
  (cd "$wt" && CARGO_TARGET_DIR="$wt/target" cargo build --release --locked --bin ferrum)
  base_bin="$wt/target/release/ferrum"
fi
[ -x "$base_bin" ] || { echo "no baseline binary (--base-bin PATH or --base REF)" >&2; exit 2; }
cargo build --release --locked --bin ferrum
rm -rf "$dest"
mkdir -p "$dest"
strip -o "$dest/ferrum-base" "$base_bin"
strip -o "$dest/ferrum-new" target/release/ferrum
cp "$0" "$dest/gpu_compare.sh"
cp scripts/write_random_llama.py "$dest/"
printf '#!/usr/bin/env bash\nexec bash "$(dirname "$0")/gpu_compare.sh" run\n' >"$dest/run.sh"
{
  echo "base: $base_ref $base_bin"
  echo "new: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src kernels || echo '+dirty')"
} >"$dest/builds.txt"
du -sh "$dest"
echo "device call: bash $dest/run.sh   (carry [\"$dest\"])"
