#!/usr/bin/env python3
"""Decode-speed baseline: Hugging Face transformers on CPU, batch 1, greedy.

Owns only its measurement; must never be used as a correctness reference
(that is scripts/make_fixtures.py). Loads the GGUF dequantized to float32 with
eager attention, warms up, then times one prefill forward over the prompt and
a manual loop of single-token forwards reusing past_key_values. Prints one
JSON line:
    {"engine": "transformers", "decode_tokens_per_s", "ms_per_token", "prefill_ms", ...}
`ms_per_token` / `decode_tokens_per_s` cover the gen-len decode forwards only
(the first generated token comes from the prefill and is not counted).

The prompt is prompt-len pseudo-random token ids (seeded; the same ids as
scripts/bench_llamacpp.py), so no tokenizer is involved.
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import default_gguf, load_gguf_float32  # noqa: E402

PROMPT_SEED = 1234
FIRST_PROMPT_ID = 3  # skip the special tokens at the start of the vocab
NUM_WARMUP_DECODE = 4


def bench_prompt_ids(prompt_len: int, vocab_size: int) -> list[int]:
    rng = random.Random(PROMPT_SEED)
    return [rng.randrange(FIRST_PROMPT_ID, vocab_size) for _ in range(prompt_len)]


def cache_kwarg(model) -> str:
    """Name of the KV-cache argument: `cache` in recent transformers, else `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.inference_mode()
def run_once(model, prompt_ids: list[int], gen_len: int):
    """Returns (prefill seconds, decode seconds, generated ids)."""
    cache_arg = cache_kwarg(model)
    t0 = time.perf_counter()
    # logits_to_keep=1: only the last position's logits, like generate() and llama.cpp.
    out = model(torch.tensor([prompt_ids]), use_cache=True, logits_to_keep=1)
    next_id = int(torch.argmax(out.logits[0, -1]))
    t1 = time.perf_counter()
    cache = output_cache(out)
    generated = [next_id]
    for _ in range(gen_len):
        out = model(torch.tensor([[next_id]]), use_cache=True, **{cache_arg: cache})
        cache = output_cache(out)
        next_id = int(torch.argmax(out.logits[0, -1]))
        generated.append(next_id)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, generated


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF model (default: SmolLM2 from models/)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.prompt_len < 1 or args.gen_len < 1:
        parser.error("--prompt-len and --gen-len must be >= 1")

    torch.set_num_threads(args.threads)
    gguf = args.gguf or default_gguf()
    if not gguf.exists():
        parser.error(f"{gguf} not found: run ci/fetch_models.sh")
    model = load_gguf_float32(gguf.resolve())
    prompt_ids = bench_prompt_ids(args.prompt_len, model.config.vocab_size)

    run_once(model, prompt_ids, min(NUM_WARMUP_DECODE, args.gen_len))  # warm-up
    prefill_s, decode_s, _ = run_once(model, prompt_ids, args.gen_len)

    print(
        json.dumps(
            {
                "engine": "transformers",
                "model": gguf.name,
                "dtype": "float32",
                "prompt_len": args.prompt_len,
                "gen_len": args.gen_len,
                "threads": args.threads,
                "decode_tokens_per_s": round(args.gen_len / decode_s, 3),
                "ms_per_token": round(1000.0 * decode_s / args.gen_len, 3),
                "prefill_ms": round(1000.0 * prefill_s, 3),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
