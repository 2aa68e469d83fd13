#!/usr/bin/env python3
"""Decode-speed baseline: llama.cpp (llama-cpp-python) on CPU, batch 1, greedy.

Owns only its measurement; never a correctness reference. Runs the GGUF as
llama.cpp does (quantized weights, its own kernels): after a warm-up, times
the prefill (`eval` of the whole prompt) and a decode loop of single-token
`eval` with a numpy argmax, by llama.cpp's own perf counters (the wall time of
the loop is reported beside them). Prints one JSON line:
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


def greedy_next(llm) -> int:
    """Argmax of the logits of the last evaluated position (numpy; no llama-cpp-python sampler)."""
    import numpy as np

    # Without logits_all, llama-cpp-python keeps no scores: read llama.cpp's logits buffer (the
    # last position of the last decode call).
    logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
    return int(np.argmax(logits))


def run_once(llm, prompt_ids: list[int], gen_len: int):
    """Returns (prefill seconds, decode seconds, generated ids, llama.cpp's perf counters).

    Only `Llama.eval` runs the model (llama_decode); the next id is the argmax of its logits, so
    llama-cpp-python's Python sampling chain (several times slower than the model at this size)
    is not timed. The perf counters are llama.cpp's own (llama_perf_context): prompt eval and
    token eval milliseconds and counts, reset before each run.
    """
    import llama_cpp

    llm.reset()
    ctx = llm._ctx.ctx
    llama_cpp.llama_perf_context_reset(ctx)
    t0 = time.perf_counter()
    llm.eval(prompt_ids)
    next_id = greedy_next(llm)
    t1 = time.perf_counter()
    generated = [next_id]
    for _ in range(gen_len):
        llm.eval([next_id])
        next_id = greedy_next(llm)
        generated.append(next_id)
    t2 = time.perf_counter()
    perf = llama_cpp.llama_perf_context(ctx)
    counters = {
        "prompt_eval_ms": perf.t_p_eval_ms,
        "n_prompt_eval": perf.n_p_eval,
        "eval_ms": perf.t_eval_ms,
        "n_eval": perf.n_eval,
    }
    return t1 - t0, t2 - t1, generated, counters


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
    prefill_s, decode_s, _, perf = run_once(llm, prompt_ids, args.gen_len)
    # llama.cpp's own timing of its decode calls (what the comparison uses); wall time of the loop
    # (incl. the numpy argmax and Python overhead) is reported beside it.
    eval_s = perf["eval_ms"] / 1000.0
    n_eval = max(perf["n_eval"], 1)

    print(
        json.dumps(
            {
                "engine": "llama.cpp",
                "model": gguf.name,
                "dtype": "gguf",
                "prompt_len": args.prompt_len,
                "gen_len": args.gen_len,
                "threads": n_threads,
                "decode_tokens_per_s": round(n_eval / eval_s, 3),
                "ms_per_token": round(1000.0 * eval_s / n_eval, 3),
                "prefill_ms": round(perf["prompt_eval_ms"], 3),
                "prefill_tokens_per_s": round(perf["n_prompt_eval"] / (perf["prompt_eval_ms"] / 1000.0), 3),
                "n_eval": perf["n_eval"],
                "n_prompt_eval": perf["n_prompt_eval"],
                "wall_decode_tokens_per_s": round(args.gen_len / decode_s, 3),
                "wall_prefill_ms": round(1000.0 * prefill_s, 3),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
