#!/usr/bin/env bash
# Side-by-side CPU comparison on one machine and one GGUF, interleaved rounds, one JSON line per
# run (tagged "build" and "round"): ferrum (this tree's release build) at batch 1, 4, 16 with
# 64 + 64 tokens and a 256-token prefill; llama.cpp (llama-cpp-python built with
# CMAKE_ARGS=-DGGML_NATIVE=ON, timed by its own perf counters, scripts/bench_llamacpp.py) with the
# same prompts; Hugging Face transformers when torch is importable; and a baseline ferrum binary
# when BASE_BIN is set (an A/B of two builds in the same run).
# Usage: [BASE_BIN=path] scripts/bench_cpu_compare.sh [PYTHON_WITH_LLAMA_CPP] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-python3}"
ROUNDS="${2:-3}"
GGUF="${FERRUM_SMOLLM2_GGUF:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
THREADS="${THREADS:-$(nproc)}"
cargo build --release --quiet --bin ferrum
echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD) $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)" >&2
tag() { sed "s/^{/{\"build\": \"$1\", \"round\": $2, /"; }
for round in $(seq "$ROUNDS"); do
  builds=(new)
  [ -n "${BASE_BIN:-}" ] && builds=(base new)
  for b in "${builds[@]}"; do
    bin=target/release/ferrum
    [ "$b" = base ] && bin="$BASE_BIN"
    "$bin" bench --model "$GGUF" --prompt-len 64 --gen-len 64 --batch-size 1,4,16 --threads "$THREADS" --json 2>/dev/null | tag "$b" "$round"
    "$bin" bench --model "$GGUF" --prompt-len 256 --gen-len 8 --batch-size 1 --threads "$THREADS" --json 2>/dev/null | tag "$b" "$round"
  done
  for p in "64 --gen-len 64" "256 --gen-len 8"; do
    # shellcheck disable=SC2086
    "$PY" scripts/bench_llamacpp.py --gguf "$GGUF" --prompt-len $p --n-threads "$THREADS" | tag llama.cpp "$round"
  done
  if "$PY" -c "import torch, transformers" 2>/dev/null; then
    "$PY" scripts/bench_transformers.py --gguf "$GGUF" --prompt-len 64 --gen-len 64 --threads "$THREADS" | tag transformers "$round"
  fi
done
