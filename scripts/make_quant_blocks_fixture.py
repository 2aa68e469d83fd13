#!/usr/bin/env python3
"""Writes tests/fixtures/gguf_quant_blocks.json: for every GGML type the loader dequantizes, two
random blocks (hex) and their values as dequantized by the Python `gguf` package
(gguf.quants.dequantize), as f32 bit patterns (hex, little-endian). An independent check of the
block layouts, K-quant scale packing included.

Usage: scripts/make_quant_blocks_fixture.py [out.json]
"""
import importlib.metadata
import json
import os
import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
out_path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "tests", "fixtures", "gguf_quant_blocks.json")

# Byte offsets of the f16 scale fields in each block (random bytes there could be inf/NaN).
F16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}
rng = np.random.default_rng(1234)
types = []
for ty in [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
           T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]:  # gguf-py has no Q8_K dequantization
    block_size, type_size = GGML_QUANT_SIZES[ty]
    num_blocks = 2 if block_size > 1 else 16
    raw = rng.integers(0, 256, size=(num_blocks, type_size), dtype=np.uint8)
    for off in F16_FIELDS.get(ty, []):
        raw[:, off:off + 2] = (rng.standard_normal(num_blocks) * 0.05).astype(np.float16).view(np.uint8).reshape(-1, 2)
    if ty == T.Q8_K:
        raw[:, 0:4] = (rng.standard_normal(num_blocks) * 0.01).astype(np.float32).view(np.uint8).reshape(-1, 4)
    if ty in (T.F32, T.F16, T.BF16):
        vals = rng.standard_normal(num_blocks).astype(np.float32)
        if ty == T.F32:
            raw = vals.view(np.uint8).reshape(num_blocks, 4)
        elif ty == T.F16:
            raw = vals.astype(np.float16).view(np.uint8).reshape(num_blocks, 2)
        else:
            raw = (vals.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(num_blocks, 2)
    values = dequantize(raw.reshape(-1), ty).astype(np.float32).reshape(-1)
    assert values.size == num_blocks * block_size
    types.append({"type": ty.name, "id": int(ty), "bytes": raw.tobytes().hex(),
                  "values_f32le": values.astype("<f4").tobytes().hex()})

with open(out_path, "w") as f:
    json.dump({"generator": f"scripts/make_quant_blocks_fixture.py, gguf-py {importlib.metadata.version('gguf')}",
               "types": types}, f, indent=1)
    f.write("\n")
print(f"wrote {out_path}")
