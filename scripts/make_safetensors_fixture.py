#!/usr/bin/env python3
"""Writes tests/fixtures/tiny_safetensors/: a small checkpoint saved by the reference `safetensors`
package (torch), single-file and sharded with an index, plus expected.json holding every tensor's
values as float32 (after the stored dtype's rounding). Used by tests/loader_safetensors.rs.

Usage: scripts/make_safetensors_fixture.py [out_dir]
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "tests", "fixtures", "tiny_safetensors")
os.makedirs(os.path.join(out, "single"), exist_ok=True)
os.makedirs(os.path.join(out, "sharded"), exist_ok=True)

g = torch.Generator().manual_seed(0)
tensors = {
    "model.embed_tokens.weight": torch.randn(8, 4, generator=g).to(torch.bfloat16),
    "model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4, generator=g).to(torch.float16),
    "model.layers.0.self_attn.q_proj.bias": torch.randn(4, generator=g),
    "model.norm.weight": torch.randn(4, generator=g),
    "model.position_ids": torch.arange(6, dtype=torch.int64),
}
save_file(tensors, os.path.join(out, "single", "model.safetensors"), metadata={"format": "pt"})

shards = {
    "model-00001-of-00002.safetensors": ["model.embed_tokens.weight", "model.norm.weight"],
    "model-00002-of-00002.safetensors": ["model.layers.0.self_attn.q_proj.weight",
                                         "model.layers.0.self_attn.q_proj.bias"],
}
weight_map = {}
for file, names in shards.items():
    save_file({n: tensors[n] for n in names}, os.path.join(out, "sharded", file), metadata={"format": "pt"})
    weight_map.update({n: file for n in names})
with open(os.path.join(out, "sharded", "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f, indent=1)

expected = {n: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                "values": [float(v) for v in t.float().reshape(-1)]}
            for n, t in tensors.items() if t.is_floating_point()}
with open(os.path.join(out, "expected.json"), "w") as f:
    json.dump(expected, f, indent=1)
    f.write("\n")
print(f"wrote {out}")
