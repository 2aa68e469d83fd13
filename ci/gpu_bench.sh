#!/usr/bin/env bash
# GPU benchmarks of the CUDA executor, built here and run on a GPU machine (which has no cargo).
#
#   ci/gpu_bench.sh [--dest DIR]      build the release `ferrum`, strip it and pack it with this
#                                     script into DIR (default: <repo>/.gpu-bench, git-ignored)
#   bash .gpu-bench/gpu_bench.sh run SUITE...   on the GPU machine: runs the suites, JSON lines in
#                                     $OUT/bench.jsonl, everything else in $OUT/bench.log
#
# Suites (random weights at real shapes, bf16, greedy, ignore_eos; see docs/benchmarks.md):
#   decode    Llama-2-7B 128/128 at batch 1, 16, 64; Llama-3-8B 128/128 at batch 1 and 256
#   profile   the same shapes, short, with FERRUM_CUDA_PROFILE=1 (per-op device time, graphs off)
#   long      Llama-3-8B offline throughput at 2048/128, 128/2048 and 2048/2048
#   prefill   2048-token prompts, one output token: TTFT and prefill TFLOP/s at batch 1 and 4
#   presets   gptj-6b, falcon-7b, mpt-7b, bloom-7b1, gpt3-6.7b: 128/128 at batch 1 and 64
#   ifb       Llama-3-8B in-flight vs static batching on a mixed-length workload, equal KV memory
#   prefix    Llama-3-8B 2048-token prompts sharing a 1536-token prefix, kv cache reuse off / on
#   batch     Llama-3-8B 128/128 offline with 256, 512 and 1024 requests at once
#   ifbchat   in-flight vs static on a chat-like mix (prompts 16..=512, outputs 16..=1024)
#   ifbchat-reuse  the same with prefix caching (preempted sequences resume from cached blocks)
#   final     Llama-2-7B 128/128 at batch 1 and 64 (the headline decode numbers)
#   ncu       Nsight Compute kernel tables of Llama-2-7B batch-1 decode (ci/ncu_summary.py)
#   fp8       quantization: fp8 against bf16 in the same call: Llama-2-7B batch-1 decode and
#             TTFT at 128, Llama-3-8B 128/128 with 512 requests, 2048-token prefill; the FP8
#             and bf16 GEMM peak at 8192^3 (torch._scaled_mm / torch.mm, when torch is there)
# DEADLINE=<s>: the presets suite skips the models it would start after that many seconds.
#
# With the device tool: pack into the main checkout, carry [".gpu-bench"], command
#   "bash .gpu-bench/gpu_bench.sh run decode profile"
set -euo pipefail

if [ "${1:-}" = "run" ]; then
  shift
  # A bench that fails or times out is logged; the remaining ones still run.
  set +e
  here=$(cd "$(dirname "$0")" && pwd)
  B="$here/ferrum"
  out=${OUT:-/tmp/ferrum-bench}
  mkdir -p "$out"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/card.txt"
  cat "$here/commit.txt" | tee -a "$out/card.txt"
  # One bench command: JSON lines to bench.jsonl, the rest (and the profile tables) to bench.log.
  b() {
    echo "== ferrum bench $*" | tee -a "$out/bench.log"
    local t0=$SECONDS
    timeout "${T:-400}" "$B" bench --device cuda "$@" 2> >(tee -a "$out/bench.log" >&2) |
      tee -a "$out/bench.jsonl"
    echo "   ($((SECONDS - t0)) s)" | tee -a "$out/bench.log"
  }
  for suite in "$@"; do
    case "$suite" in
    decode)
      b --preset llama2-7b --prompt-len 128 --gen-len 128 --batch-size 1,16,64 --json
      b --preset llama3-8b --prompt-len 128 --gen-len 128 --batch-size 1,256 --max-num-batched-tokens 8192 --json
      ;;
    profile)
      FERRUM_CUDA_PROFILE=1 b --preset llama2-7b --prompt-len 128 --gen-len 32 --batch-size 1 --json
      FERRUM_CUDA_PROFILE=1 b --preset llama3-8b --prompt-len 128 --gen-len 32 --batch-size 256 --max-num-batched-tokens 8192 --json
      ;;
    long)
      b --preset llama3-8b --prompt-len 2048 --gen-len 128 --batch-size 64 --max-num-batched-tokens 8192 --json
      b --preset llama3-8b --prompt-len 128 --gen-len 2048 --batch-size 256 --max-num-batched-tokens 8192 --json
      b --preset llama3-8b --prompt-len 2048 --gen-len 2048 --batch-size 128 --max-num-batched-tokens 8192 --json
      ;;
    prefill)
      b --preset llama2-7b --prompt-len 2048 --gen-len 1 --batch-size 1,4 --max-num-batched-tokens 8192 --json
      b --preset llama3-8b --prompt-len 2048 --gen-len 1 --batch-size 1,4 --max-num-batched-tokens 8192 --json
      ;;
    presets)
      for p in gptj-6b falcon-7b mpt-7b bloom-7b1 gpt3-6.7b; do
        if [ -n "${DEADLINE:-}" ] && [ "$SECONDS" -ge "$DEADLINE" ]; then
          echo "skipping preset $p: past DEADLINE=$DEADLINE s" | tee -a "$out/bench.log"
          continue
        fi
        b --preset "$p" --prompt-len 128 --gen-len 128 --batch-size 1,64 --json
      done
      ;;
    final)
      b --preset llama2-7b --prompt-len 128 --gen-len 128 --batch-size 1,64 --json
      ;;
    fp8)
      python3 "$here/gemm_peak.py" 2>&1 | tee -a "$out/bench.log" || true
      for q in fp8 auto; do
        b --preset llama2-7b --prompt-len 128 --gen-len 128 --batch-size 1 --quantization "$q" --json
      done
      b --preset llama2-7b --prompt-len 128 --gen-len 1 --batch-size 1 --quantization fp8 --json
      for q in fp8 auto; do
        b --preset llama3-8b --prompt-len 128 --gen-len 128 --batch-size 512 --max-num-batched-tokens 8192 --quantization "$q" --json
      done
      b --preset llama3-8b --prompt-len 2048 --gen-len 1 --batch-size 1,4 --max-num-batched-tokens 8192 --quantization fp8 --json
      ;;
    ncu)
      # Kernel durations at real clocks (ncu serializes kernels and flushes caches between
      # them, so latency-bound kernels read high): 520 consecutive kernels of eager decode steps
      # of Llama-2-7B at batch 1, then the gemv kernels with DRAM throughput, L1 hit rate,
      # registers and warps active.
      ncu=/usr/local/cuda/bin/ncu
      FERRUM_CUDA_GRAPHS=0 timeout "${T:-400}" "$ncu" --clock-control none --csv \
        --metrics gpu__time_duration.sum --launch-skip 3000 --launch-count 520 \
        "$B" bench --device cuda --preset llama2-7b --prompt-len 128 --gen-len 48 --json \
        >"$out/ncu_decode_b1.csv" 2>>"$out/bench.log"
      python3 "$here/ncu_summary.py" "$out/ncu_decode_b1.csv" | tee -a "$out/bench.log"
      FERRUM_CUDA_GRAPHS=0 timeout "${T:-400}" "$ncu" --clock-control none --csv \
        --kernel-name regex:gemv --launch-skip 400 --launch-count 16 \
        --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,l1tex__t_sector_hit_rate.pct,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active \
        "$B" bench --device cuda --preset llama2-7b --prompt-len 16 --gen-len 32 --json \
        >"$out/ncu_gemv.csv" 2>>"$out/bench.log"
      python3 "$here/ncu_summary.py" "$out/ncu_gemv.csv" | tee -a "$out/bench.log"
      ;;
    ifb)
      # 256 requests, prompts 32..=1024, outputs 16..=512 (~67k output tokens), B = 64, KV cache
      # for 64 sequences of 1536 tokens in both modes; 2 rounds of (static, in-flight).
      b --preset llama3-8b --workload mixed --num-requests 256 --batch-size 64 --rounds 2 --max-num-batched-tokens 8192 --json
      # The same KV memory, the in-flight mode free to run up to 256 sequences in it.
      b --preset llama3-8b --workload mixed --num-requests 256 --batch-size 64 --inflight-max-num-seqs 256 --rounds 2 --max-num-batched-tokens 8192 --json
      # ... admitting only what can run to its max_tokens in that memory (no preemption).
      b --preset llama3-8b --workload mixed --num-requests 256 --batch-size 64 --inflight-max-num-seqs 256 --batch-scheduler-policy guaranteed_no_evict --rounds 2 --max-num-batched-tokens 8192 --json
      # ... with prefix caching: a preempted sequence may resume from its own cached blocks.
      b --preset llama3-8b --workload mixed --num-requests 256 --batch-size 64 --inflight-max-num-seqs 256 --enable-kv-cache-reuse true --rounds 2 --max-num-batched-tokens 8192 --json
      ;;
    batch)
      # The 128/128 offline target at larger batches: GEMMs leave the weight-bound regime
      # (fewer tile waves lost), attention per token stays the same.
      b --preset llama3-8b --prompt-len 128 --gen-len 128 --batch-size 256,512,1024 --max-num-batched-tokens 8192 --json
      ;;
    ifbchat)
      # Output lengths varying most (as in chat traffic): static batching idles a slot from
      # its request's end to its group's longest; KV for 64 sequences of 1536 tokens in both.
      b --preset llama3-8b --workload mixed --num-requests 256 --min-prompt-len 16 --max-prompt-len 512 --min-gen-len 16 --max-gen-len 1024 --batch-size 64 --inflight-max-num-seqs 256 --rounds 1 --max-num-batched-tokens 8192 --json
      ;;
    ifbchat-reuse)
      # The same, a preempted sequence resuming from its own cached blocks (prefix caching).
      b --preset llama3-8b --workload mixed --num-requests 256 --min-prompt-len 16 --max-prompt-len 512 --min-gen-len 16 --max-gen-len 1024 --batch-size 64 --inflight-max-num-seqs 256 --enable-kv-cache-reuse true --rounds 1 --max-num-batched-tokens 8192 --json
      ;;
    prefix)
      for reuse in false true; do
        b --preset llama3-8b --prompt-len 2048 --shared-prefix-len 1536 --gen-len 64 --batch-size 1,32 --enable-kv-cache-reuse "$reuse" --max-num-batched-tokens 8192 --json
      done
      ;;
    *)
      echo "unknown suite $suite" >&2
      exit 2
      ;;
    esac
  done
  exit 0
fi

cd "$(dirname "$0")/.."
dest=".gpu-bench"
if [ "${1:-}" = "--dest" ]; then
  dest="$2"
fi
cargo build --release --bin ferrum
rm -rf "$dest"
mkdir -p "$dest"
strip -o "$dest/ferrum" target/release/ferrum
cp ci/gpu_bench.sh "$dest/gpu_bench.sh"
cp ci/ncu_summary.py "$dest/ncu_summary.py"
cp ci/gemm_peak.py "$dest/gemm_peak.py"
{
  git rev-parse --short HEAD
  git diff --quiet HEAD -- src kernels || echo "(with uncommitted changes to src/kernels)"
} >"$dest/commit.txt"
du -sh "$dest"
