#!/usr/bin/env bash
# Serving overhead: requests through tritonserver (aiperf, streaming generate_stream) against the
# engine's own `ferrum bench`, same model, weight format and lengths, on the same machine, runs
# interleaved. Needs a server started by `ci/serve.sh` (default model repository: SmolLM2 with
# f32 weights) and aiperf (`pip install aiperf`) plus a tokenizer folder for its token counting
# (e.g. the SmolLM2 tokenizer saved by transformers: tokenizer.json + tokenizer_config.json).
# Usage: scripts/bench_triton.sh AIPERF_BIN TOKENIZER_DIR [HTTP_PORT] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
AIPERF="$1"; TOK="$2"; PORT="${3:-8000}"; ROUNDS="${4:-2}"
GGUF="${FERRUM_SMOLLM2_GGUF:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
ISL=64; OSL=64
OUT="${OUT_DIR:-build/bench_triton}"
mkdir -p "$OUT"
cargo build --release --quiet --bin ferrum
echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD) $(nproc) cores" >&2
template='{"text_input": {{ text|tojson }}, "max_tokens": {{ max_tokens }}, "stream": true, "ignore_eos": true}'
extra=$(python3 -c 'import json,sys; print(json.dumps({"payload_template": sys.argv[1], "response_field": "text_output"}))' "$template")
for round in $(seq "$ROUNDS"); do
  for c in 1 16; do
    target/release/ferrum bench --model "$GGUF" --weight-format f32 --prompt-len $ISL --gen-len $OSL --batch-size $c --json
    dir="$OUT/aiperf-c$c-r$round"
    rm -rf "$dir"
    "$AIPERF" profile --model-names smollm2 --url "http://127.0.0.1:$PORT" --endpoint-type template \
      --custom-endpoint /v2/models/smollm2/generate_stream --streaming --tokenizer "$TOK" \
      --synthetic-input-tokens-mean $ISL --synthetic-input-tokens-stddev 0 \
      --output-tokens-mean $OSL --output-tokens-stddev 0 --concurrency $c \
      --request-count $((c * 3)) --warmup-request-count $c --extra-inputs "$extra" \
      --artifact-dir "$dir" > "$dir.log" 2>&1
    python3 - "$dir/profile_export_aiperf.json" "$c" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(json.dumps({"engine": "triton+aiperf", "concurrency": int(sys.argv[2]),
                  "output_tokens_per_s": d["output_token_throughput"]["avg"],
                  "ttft_ms": d["time_to_first_token"]["avg"],
                  "inter_token_latency_ms": d["inter_token_latency"]["avg"],
                  "errors": d.get("error_summary")}))
PY
  done
done
