#!/usr/bin/env bash
# Side-by-side CPU decode comparison on one machine and one GGUF: ferrum vs Hugging Face
# transformers (float32, eager) vs llama.cpp (llama-cpp-python), batch 1, then ferrum at
# batch 1, 4, 16. Each engine runs ROUNDS times, interleaved; every run prints one JSON line.
# Usage: scripts/bench_cpu_compare.sh [PYTHON_WITH_TORCH_TRANSFORMERS_LLAMA_CPP] [ROUNDS]
# (transformers, torch, gguf and llama-cpp-python are needed only for this comparison.)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-python3}"
ROUNDS="${2:-2}"
GGUF="${FERRUM_SMOLLM2_GGUF:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
PROMPT=64
GEN=64
THREADS="${THREADS:-$(nproc)}"
cargo build --release --quiet --bin ferrum
echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD) $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)" >&2
for round in $(seq "$ROUNDS"); do
  "$PY" scripts/bench_llamacpp.py --gguf "$GGUF" --prompt-len $PROMPT --gen-len $GEN --n-threads "$THREADS"
  "$PY" scripts/bench_transformers.py --gguf "$GGUF" --prompt-len $PROMPT --gen-len $GEN --threads "$THREADS"
  target/release/ferrum bench --model "$GGUF" --prompt-len $PROMPT --gen-len $GEN --batch-size 1,4,16 --threads "$THREADS" --json
done
