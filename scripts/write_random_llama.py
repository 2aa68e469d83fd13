#!/usr/bin/env python3
"""Writes a random-weight Llama checkpoint folder (config.json + sharded safetensors, bf16) at a
real shape, for load-time and host-memory measurements on the GPU machine (torch is there; no
model hub is needed). Values ~N(0, 0.02); norms are ones.

    python3 scripts/write_random_llama.py --shape llama2-7b --out /tmp/llama2-7b-random
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file

SHAPES = {
    # hidden, layers, heads, kv heads, intermediate, vocab, rope theta
    "llama2-7b": (4096, 32, 32, 32, 11008, 32000, 10000.0),
    "llama3-8b": (4096, 32, 32, 8, 14336, 128256, 500000.0),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    h, n_layers, n_heads, n_kv, inter, vocab, theta = SHAPES[a.shape]
    hd = h // n_heads
    os.makedirs(a.out, exist_ok=True)
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
        "num_hidden_layers": n_layers, "num_attention_heads": n_heads, "num_key_value_heads": n_kv,
        "intermediate_size": inter, "vocab_size": vocab, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": theta, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    }
    json.dump(cfg, open(os.path.join(a.out, "config.json"), "w"), indent=1)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    weight_map = {}

    def save(name, tensors):
        save_file(tensors, os.path.join(a.out, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    save("model-embed.safetensors", {
        "model.embed_tokens.weight": rnd(vocab, h),
        "lm_head.weight": rnd(vocab, h),
        "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
    })
    for i in range(n_layers):
        p = f"model.layers.{i}."
        save(f"model-layer{i:03d}.safetensors", {
            p + "self_attn.q_proj.weight": rnd(n_heads * hd, h),
            p + "self_attn.k_proj.weight": rnd(n_kv * hd, h),
            p + "self_attn.v_proj.weight": rnd(n_kv * hd, h),
            p + "self_attn.o_proj.weight": rnd(h, n_heads * hd),
            p + "mlp.gate_proj.weight": rnd(inter, h),
            p + "mlp.up_proj.weight": rnd(inter, h),
            p + "mlp.down_proj.weight": rnd(h, inter),
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        })
    json.dump({"metadata": {}, "weight_map": weight_map},
              open(os.path.join(a.out, "model.safetensors.index.json"), "w"))
    print(f"wrote {a.shape} to {a.out}")


if __name__ == "__main__":
    main()
