#!/usr/bin/env python3
"""Dumps Hugging Face transformers' intermediates of one prefill under the names `ferrum generate
--dump-intermediates` uses (step000/embedding.npy, layerNN.attn_norm.npy, qkv, attention,
attn_out, mlp_norm, mlp, final_norm, lm_head), for a layer-by-layer comparison with
scripts/compare_dumps.py. Llama-family checkpoints (llama, mistral, qwen2: the module names
below); run where torch and transformers are installed (the GPU machine).

    python3 scripts/hf_dump.py --model DIR --prompt-ids 5,6,7 --out /tmp/dump-hf
    ferrum generate --model DIR --prompt-ids 5,6,7 --max-tokens 1 --dump-intermediates /tmp/dump-ferrum
    python3 scripts/compare_dumps.py /tmp/dump-hf /tmp/dump-ferrum

ferrum's `qkv` tap is q | k | v after the projection (before rotary); `rotary_kv_write` (after
rotary) has no transformers counterpart here.
"""
import argparse
import os
import struct

import torch
from transformers import AutoModelForCausalLM


def write_npy(path, t):
    t = t.detach().float().cpu().reshape(-1, t.shape[-1]).contiguous()
    rows, cols = t.shape
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}"
    pad = (10 + len(header) + 1 + 63) // 64 * 64 - (10 + len(header) + 1)
    header = header + " " * pad + "\n"
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode())
        f.write(t.numpy().astype("<f4").tobytes())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-ids", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a = ap.parse_args()
    ids = torch.tensor([[int(x) for x in a.prompt_ids.split(",")]])
    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=getattr(torch, a.dtype))
    model.eval()
    out = os.path.join(a.out, "step000")
    os.makedirs(out, exist_ok=True)
    inner = model.model
    hooks = []
    qkv_parts = {}

    def save(name):
        def hook(_m, _inp, output):
            write_npy(os.path.join(out, name + ".npy"), output[0] if isinstance(output, tuple) else output)
        return hook

    def save_input(name):
        def hook(_m, inp):
            write_npy(os.path.join(out, name + ".npy"), inp[0])
        return hook

    hooks.append(inner.embed_tokens.register_forward_hook(save("embedding")))
    for i, layer in enumerate(inner.layers):
        p = f"layer{i:02d}."
        attn = layer.self_attn
        hooks.append(layer.input_layernorm.register_forward_hook(save(p + "attn_norm")))

        def part(i, k):
            def hook(_m, _inp, output):
                qkv_parts.setdefault(i, {})[k] = output
                if len(qkv_parts[i]) == 3:
                    d = qkv_parts.pop(i)
                    write_npy(os.path.join(out, f"layer{i:02d}.qkv.npy"), torch.cat([d["q"], d["k"], d["v"]], dim=-1))
            return hook
        hooks.append(attn.q_proj.register_forward_hook(part(i, "q")))
        hooks.append(attn.k_proj.register_forward_hook(part(i, "k")))
        hooks.append(attn.v_proj.register_forward_hook(part(i, "v")))
        hooks.append(attn.o_proj.register_forward_pre_hook(save_input(p + "attention")))
        hooks.append(attn.o_proj.register_forward_hook(save(p + "attn_out")))
        hooks.append(layer.post_attention_layernorm.register_forward_hook(save(p + "mlp_norm")))
        hooks.append(layer.mlp.register_forward_hook(save(p + "mlp")))
    hooks.append(inner.norm.register_forward_hook(save("final_norm")))
    with torch.no_grad():
        logits = model(ids).logits
    write_npy(os.path.join(out, "lm_head.npy"), logits[:, -1:, :])
    for h in hooks:
        h.remove()
    print(f"wrote {len(os.listdir(out))} tensors to {out}")


if __name__ == "__main__":
    main()
