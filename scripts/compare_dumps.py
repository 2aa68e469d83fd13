#!/usr/bin/env python3
"""Compares two folders of named intermediates layer by layer: what `ferrum generate
--dump-intermediates DIR` writes (on the CPU or the GPU), or what scripts/hf_dump.py writes from
Hugging Face transformers. Prints, per step and tap, the max |a - b| and the max |a|, and the
first tap whose relative difference exceeds --tol (where a divergence starts).

    python3 scripts/compare_dumps.py /tmp/dump-cpu /tmp/dump-gpu [--tol 0.02]

Only the plain-Python standard library: .npy files of [rows, cols] little-endian f32.
"""
import argparse
import ast
import struct
import sys
from pathlib import Path


def read_npy(path: Path):
    b = path.read_bytes()
    if b[:6] != b"\x93NUMPY":
        raise ValueError(f"{path}: not a .npy file")
    hlen = struct.unpack("<H", b[8:10])[0]
    header = ast.literal_eval(b[10:10 + hlen].decode())
    if header["descr"] != "<f4" or header["fortran_order"]:
        raise ValueError(f"{path}: expected little-endian f32 in C order, got {header}")
    shape = header["shape"]
    n = 1
    for d in shape:
        n *= d
    data = struct.unpack(f"<{n}f", b[10 + hlen:10 + hlen + 4 * n])
    return shape, data


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--tol", type=float, default=0.02, help="relative max difference that counts as a divergence")
    args = ap.parse_args()
    a, b = Path(args.a), Path(args.b)
    first_bad = None
    compared = 0
    for fa in sorted(a.glob("step*/*.npy")):
        rel = fa.relative_to(a)
        fb = b / rel
        if not fb.exists():
            continue
        (sa, da), (sb, db) = read_npy(fa), read_npy(fb)
        if sa != sb:
            # Hugging Face dumps hold every row of the final norm / logits; ferrum only the
            # sampling rows: compare the last rows.
            rows = min(sa[0], sb[0])
            cols = sa[1]
            if sa[1] != sb[1]:
                print(f"{rel}: shapes {sa} vs {sb}: not comparable")
                continue
            da, db = da[-rows * cols:], db[-rows * cols:]
        diff = max((abs(x - y) for x, y in zip(da, db)), default=0.0)
        scale = max((abs(x) for x in da), default=0.0)
        rel_diff = diff / max(scale, 1e-12)
        compared += 1
        flag = ""
        if rel_diff > args.tol and first_bad is None:
            first_bad = rel
            flag = "   <-- first divergence"
        print(f"{str(rel):<40} max|diff| {diff:10.3e}  max|a| {scale:10.3e}  rel {rel_diff:8.2e}{flag}")
    if compared == 0:
        sys.exit(f"no common .npy files under {a} and {b}")
    print(f"{compared} tensors compared; " + (f"first divergence at {first_bad}" if first_bad else "no divergence above the tolerance"))
    sys.exit(1 if first_bad else 0)


if __name__ == "__main__":
    main()
