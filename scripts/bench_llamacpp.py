#!/usr/bin/env python3
"""Decode-speed baseline: llama.cpp (llama-cpp-python) on CPU, batch 1, greedy.

Owns only its measurement; never a correctness reference. Runs the GGUF as
llama.cpp does (quantized weights, its own kernels): after a warm-up, times
the prefill (`eval` of the whole prompt) and a decode loop of greedy `sample`
+ single-token `eval`. Prints one JSON line:
    {"engine": "llama.cpp", "decode_tokens_per_s", "ms_per_token", "prefill_ms", ...}
with the same conventions as scripts/bench_transformers.py (the first
generated token comes from the prefill; gen-len decode evals are timed) and
the same seeded prompt ids.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

PROMPT_SEED = 1234
FIRST_PROMPT_ID = 3  # skip the special tokens at the start of the vocab
NUM_WARMUP_DECODE = 4
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bench_prompt_ids(prompt_len: int, vocab_size: int) -> list[int]:
    rng = random.Random(PROMPT_SEED)
    return [rng.randrange(FIRST_PROMPT_ID, vocab_size) for _ in range(prompt_len)]


def default_gguf() -> Path:
    env = os.environ.get("FERRUM_SMOLLM2_GGUF")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "models" / DEFAULT_GGUF_NAME


def run_once(llm, prompt_ids: list[int], gen_len: int):
    """Returns (prefill seconds, decode seconds, generated ids)."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt_ids)
    next_id = llm.sample(temp=0.0)  # temp 0 = greedy sampler
    t1 = time.perf_counter()
    generated = [next_id]
    for _ in range(gen_len):
        llm.eval([next_id])
        next_id = llm.sample(temp=0.0)
        generated.append(next_id)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, generated


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF model (default: SmolLM2 from models/)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="alias of --n-threads")
    parser.add_argument("--n-threads", type=int, default=None, help="llama.cpp threads (default 2)")
    args = parser.parse_args()
    if args.prompt_len < 1 or args.gen_len < 1:
        parser.error("--prompt-len and --gen-len must be >= 1")
    if args.threads is not None and args.n_threads is not None and args.threads != args.n_threads:
        parser.error("--threads and --n-threads disagree")
    n_threads = args.n_threads or args.threads or 2

    from llama_cpp import Llama

    gguf = args.gguf or default_gguf()
    if not gguf.exists():
        parser.error(f"{gguf} not found: run ci/fetch_models.sh")
    n_ctx = args.prompt_len + args.gen_len + 8
    llm = Llama(
        model_path=str(gguf),
        n_ctx=n_ctx,
        n_batch=max(args.prompt_len, 8),  # the whole prompt in one decode call
        n_threads=n_threads,
        n_threads_batch=n_threads,
        verbose=False,
    )
    prompt_ids = bench_prompt_ids(args.prompt_len, llm.n_vocab())

    run_once(llm, prompt_ids, min(NUM_WARMUP_DECODE, args.gen_len))  # warm-up
    prefill_s, decode_s, _ = run_once(llm, prompt_ids, args.gen_len)

    print(
        json.dumps(
            {
                "engine": "llama.cpp",
                "model": gguf.name,
                "dtype": "gguf",
                "prompt_len": args.prompt_len,
                "gen_len": args.gen_len,
                "threads": n_threads,
                "decode_tokens_per_s": round(args.gen_len / decode_s, 3),
                "ms_per_token": round(1000.0 * decode_s / args.gen_len, 3),
                "prefill_ms": round(1000.0 * prefill_s, 3),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
