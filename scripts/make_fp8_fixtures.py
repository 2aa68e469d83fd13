#!/usr/bin/env python3
"""Generate ferrum's FP8 checkpoint fixtures: tests/fixtures/fp8/<name>/.

Owns tests/fixtures/fp8/ and tests/fixtures/golden/fp8_*.json. Takes tiny checkpoints of
tests/fixtures/models/ and writes, for each FP8 format ferrum detects, a tiny pre-quantized
checkpoint laid out as its producer writes it (config keys, tensor names, scale shapes and
dtypes), plus the *dequantized twins*: ordinary F32 checkpoints holding exactly the values ferrum
must dequantize to (`e4m3(code) * scale`, one f32 rounding). tests/fp8_checkpoints.rs loads each
FP8 checkpoint and its twin on the CPU engine and requires identical logits and greedy tokens, and
matches each against the twin's transformers golden.

Fixtures are `<base>_<kind>` (FIXTURES below), twins `<base>_twin_<granularity>`:
- base `llama` (models/llama_gqa_llama3, hidden 72, intermediate 100): every kind
  (ct_tensor_static, ct_channel_dynamic, modelopt_kv, fp8_dynamic, fp8_block, fbgemm);
- base `falcon` (models/falcon_new): ct_channel_dynamic, on Falcon's fused query_key_value;
- base `llama16` (models/llama_aligned16: hidden 64, 4 q heads and 2 kv heads of 16, intermediate
  128): ct_channel_dynamic, modelopt_kv (per-tensor, static input scales, KV scales) and fbgemm.
  Every linear's input and output features are multiples of 16, so the GPU runs these as real
  FP8 products (tests/cuda_fp8.rs); the other bases' linears are dequantized there.

numpy only (without --goldens); it never downloads anything. Deterministic: rerunning it
rewrites the same bytes.

Quantization, as each producer does it:
- scales are amax / 448 (per tensor, per output row, or per block tile), in f32;
- E4M3 encoding rounds to nearest, ties to even, saturating at +-448 (the same codec as
  src/ops/fp8.rs, built here from its 127 positive codes);
- per-tensor and per-channel scales are rounded to bf16-representable values before the codes are
  computed (compressed-tensors stores them in bf16; the f32-scale producers then hold the same
  values), so the formats with the same granularity share one twin. Block scales stay f32.
- every unquantized tensor (embeddings, norms, lm_head, the ignored linear) is stored in BF16 in the
  FP8 checkpoints, as real ones are; the twins hold the same values in F32.

Hugging Face goldens of the twins: `--goldens` loads each twin with transformers (float32, eager;
scripts/make_fixtures.py's load_reference and make_case, so the same format and checks) and
writes tests/fixtures/golden/fp8_<twin>.json for the prompts of the base model's golden, with a
top-level `note` naming the FP8 fixtures it stands for. It needs the environment of
scripts/make_fixtures.py (torch 2.15 and transformers 5.24, CPU; any venv with them, e.g. one
made by `python3.11 -m venv /work/hf-venv && /work/hf-venv/bin/pip install torch==2.15.0
transformers==5.24.0 numpy==1.26.4`, kept outside the repository). Its base model must exist
first: `scripts/make_fixtures.py --only llama_aligned16`. Reruns on one machine give the same
bytes; another CPU may move the last of the 6 significant digits of a logprob.

Usage:
    .venv/bin/python scripts/make_fp8_fixtures.py                    # tests/fixtures/fp8/
    /work/hf-venv/bin/python scripts/make_fp8_fixtures.py --goldens  # also golden/fp8_<twin>.json
"""
import argparse
import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "tests" / "fixtures" / "models"
OUT = ROOT / "tests" / "fixtures" / "fp8"
GOLDEN_DIR = ROOT / "tests" / "fixtures" / "golden"
E4M3_MAX = np.float32(448.0)

# ---------------------------------------------------------------- safetensors (numpy)

DTYPES = {"F32": (np.float32, 4), "BF16": (np.uint16, 2), "F16": (np.float16, 2), "F8_E4M3": (np.uint8, 1)}


def read_safetensors(path: Path) -> dict:
    """name -> float32 array (F32, F16, BF16 only)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        a, b = e["data_offsets"]
        buf = data[a:b]
        if e["dtype"] == "F32":
            arr = np.frombuffer(buf, dtype="<f4")
        elif e["dtype"] == "F16":
            arr = np.frombuffer(buf, dtype="<f2").astype(np.float32)
        elif e["dtype"] == "BF16":
            arr = (np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            raise SystemExit(f"{path}: {name}: unsupported dtype {e['dtype']}")
        out[name] = arr.reshape(e["shape"]).astype(np.float32)
    return out


def write_safetensors(path: Path, tensors: dict) -> None:
    """tensors: name -> (dtype name, array already in that storage type: u16 bf16 bits, u8 codes)."""
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        dtype, arr = tensors[name]
        np_type, _ = DTYPES[dtype]
        b = np.ascontiguousarray(arr.astype(np_type)).astype(np.dtype(np_type).newbyteorder("<")).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(b)]}
        chunks.append(b)
        offset += len(b)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(chunks))


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """f32 -> bf16 bits, round to nearest even (no NaNs here)."""
    x = np.asarray(x, dtype=np.float32)
    u = np.atleast_1d(x).view(np.uint32).astype(np.uint32)
    u = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return u.astype(np.uint16).reshape(x.shape)


def bf16_round(x) -> np.ndarray:
    bits = np.atleast_1d(to_bf16_bits(x)).astype(np.uint32) << np.uint32(16)
    return bits.view(np.float32).reshape(np.shape(x))


# ---------------------------------------------------------------- E4M3


def e4m3_value(code: int) -> float:
    s = -1.0 if code & 0x80 else 1.0
    e, m = (code >> 3) & 0xF, code & 7
    if e == 0xF and m == 7:
        return float("nan")
    return s * (m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))


# Positive finite codes 0x00..0x7E have increasing values.
POS_VALUES = np.array([e4m3_value(c) for c in range(0x7F)], dtype=np.float32)
DECODE = np.array([e4m3_value(c) for c in range(256)], dtype=np.float32)


def e4m3_encode(x: np.ndarray) -> np.ndarray:
    """Nearest E4M3 code, ties to the even code (even mantissa), saturating to +-448."""
    x = np.asarray(x, dtype=np.float32)
    a = np.minimum(np.abs(x), E4M3_MAX)
    hi = np.clip(np.searchsorted(POS_VALUES, a, side="left"), 0, 0x7E)
    lo = np.clip(hi - 1, 0, 0x7E)
    d_lo, d_hi = a - POS_VALUES[lo], POS_VALUES[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    code = np.where(pick_hi, hi, lo).astype(np.uint8)
    return code | np.where(np.signbit(x), 0x80, 0).astype(np.uint8)


def e4m3_decode(codes: np.ndarray) -> np.ndarray:
    return DECODE[codes]


def self_check() -> None:
    """The codec round-trips every finite code and rounds ties to even (as src/ops/fp8.rs)."""
    finite = [c for c in range(256) if not np.isnan(DECODE[c])]
    back = e4m3_encode(DECODE[finite])
    assert all(DECODE[b] == DECODE[c] for b, c in zip(back, finite))
    assert e4m3_encode(np.float32(1.0625)) == 0x38 and e4m3_encode(np.float32(1.1875)) == 0x3A
    assert e4m3_encode(np.float32(15.5)) == 0x58 and e4m3_encode(np.float32(1e6)) == 0x7E
    assert e4m3_encode(np.float32(-1e6)) == 0xFE and e4m3_encode(np.float32(2.0**-11)) == 0


# ---------------------------------------------------------------- quantization


def quantize(w: np.ndarray, granularity, round_scale_bf16: bool):
    """(codes [out, in] u8, scales f32 in the producer's shape-free form, dequantized f32 [out, in])."""
    w = w.astype(np.float32)
    rows, cols = w.shape
    if granularity == "tensor":
        amax = np.abs(w).max()
        scale = np.float32(amax) / E4M3_MAX
        scale = bf16_round(scale) if round_scale_bf16 else np.float32(scale)
        scale_full = np.full((rows, cols), scale, dtype=np.float32)
        scales = np.array(scale, dtype=np.float32)
    elif granularity == "channel":
        amax = np.abs(w).max(axis=1)
        scales = (amax.astype(np.float32) / E4M3_MAX).astype(np.float32)
        scales = bf16_round(scales) if round_scale_bf16 else scales
        scale_full = np.repeat(scales[:, None], cols, axis=1)
    else:
        br, bc = granularity
        gr, gc = -(-rows // br), -(-cols // bc)
        scales = np.zeros((gr, gc), dtype=np.float32)
        for i in range(gr):
            for j in range(gc):
                tile = w[i * br : (i + 1) * br, j * bc : (j + 1) * bc]
                scales[i, j] = np.float32(np.abs(tile).max()) / E4M3_MAX
        scale_full = np.repeat(np.repeat(scales, br, axis=0), bc, axis=1)[:rows, :cols]
    assert (scale_full > 0).all()
    codes = e4m3_encode((w / scale_full).astype(np.float32))
    deq = (e4m3_decode(codes) * scale_full).astype(np.float32)
    return codes, scales, deq


# ---------------------------------------------------------------- formats

BLOCK = (24, 32)  # q/k/v rows (72, 24, 24) are whole tiles; 100 and 72 columns leave ragged edges


def llama_linears(names):
    return [n for n in names if n.endswith("_proj.weight")]


def falcon_linears(names):
    return [n for n in names if n.endswith(("query_key_value.weight", "dense.weight", "h_to_4h.weight", "4h_to_h.weight"))]


BASES = {
    "llama": {
        "model": "llama_gqa_llama3",
        "linears": llama_linears,
        "ignored": ["lm_head", "model.layers.0.mlp.down_proj"],
        "kv": ("self_attn.k_proj", "self_attn.v_proj"),
    },
    # Every linear a multiple of 16 (hidden 64, q 4 x 16, k/v 2 x 16, intermediate 128): the GPU
    # runs these checkpoints' linears as real FP8 products instead of dequantizing them.
    "llama16": {
        "model": "llama_aligned16",
        "linears": llama_linears,
        "ignored": ["lm_head", "model.layers.0.mlp.down_proj"],
        "kv": ("self_attn.k_proj", "self_attn.v_proj"),
    },
    "falcon": {
        "model": "falcon_new",
        "linears": falcon_linears,
        "ignored": ["lm_head", "transformer.h.0.mlp.dense_4h_to_h"],
        "kv": None,
    },
}


def ct_config(strategy, acts, ignore, block=None, kv=False):
    weights = {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False,
               "group_size": None, "block_structure": list(block) if block else None, "observer": "minmax"}
    qc = {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts,
                                        "output_activations": None}},
          "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None}
    if kv:
        qc["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
    return qc


# kind -> (granularity, description). A fixture is `<base>_<kind>`; its twin `<base>_twin_<granularity>`.
KINDS = {
    "ct_tensor_static": ("tensor", "compressed-tensors FP8: per-tensor BF16 weight_scale [1], static BF16 input_scale [1], kv_cache_scheme with k_proj/v_proj.output_scale, plain-name ignore list"),
    "ct_channel_dynamic": ("channel", "compressed-tensors FP8_DYNAMIC: per-channel BF16 weight_scale [out, 1], dynamic per-token activations (no input_scale), `re:` regex in ignore"),
    "modelopt_kv": ("tensor", "ModelOpt FP8: hf_quant_config.json, scalar F32 weight_scale and input_scale, kv_cache_quant_algo FP8 with k_proj.k_scale / v_proj.v_scale, glob in exclude_modules"),
    "fp8_dynamic": ("tensor", "quant_method fp8, activation_scheme dynamic: scalar F32 weight_scale, ignored_layers"),
    "fp8_block": ("block", f"quant_method fp8 with weight_block_size {list(BLOCK)}: F32 weight_scale_inv tiles, ragged edge tiles; fused qkv keeps blocks, gate|up (100 rows) is dequantized"),
    "fbgemm": ("channel", "fbgemm_fp8: per-row F32 weight_scale [out, 1], modules_to_not_convert"),
}

# (base, kind) of every fixture written. falcon's compressed-tensors per-channel checkpoint
# exercises the fused query_key_value ([kv_groups, q + k + v, head_dim] rows re-ordered with their
# scales); the llama16 ones are the formats the GPU test runs as real FP8 products (per-channel
# dynamic, per-tensor static with KV scales, per-row fbgemm).
FIXTURES = [
    ("llama", "ct_tensor_static"),
    ("llama", "ct_channel_dynamic"),
    ("llama", "modelopt_kv"),
    ("llama", "fp8_dynamic"),
    ("llama", "fp8_block"),
    ("llama", "fbgemm"),
    ("falcon", "ct_channel_dynamic"),
    ("llama16", "ct_channel_dynamic"),
    ("llama16", "modelopt_kv"),
    ("llama16", "fbgemm"),
]


def make_format(base_key: str, kind: str, tensors: dict, config: dict, seed_name: str):
    """(files {name: (dtype, array)}, config.json dict, extra files {name: json}, dequantized twin weights)."""
    base = BASES[base_key]
    ignored = set(n + ".weight" for n in base["ignored"])
    linears = [n for n in base["linears"](tensors) if n not in ignored]
    granularity_name = KINDS[kind][0]
    gran = {"tensor": "tensor", "channel": "channel", "block": BLOCK}[granularity_name]
    compressed = kind.startswith("ct_")
    scale_dtype = "BF16" if compressed else "F32"
    static_acts = kind in ("ct_tensor_static", "modelopt_kv")
    rng = np.random.default_rng(sum(map(ord, seed_name)))
    files, twin = {}, {}
    for n, w in tensors.items():
        if n in linears:
            continue
        v = bf16_round(w)
        files[n] = ("BF16", to_bf16_bits(w))
        twin[n] = v
    for n in linears:
        module = n.removesuffix(".weight")
        codes, scales, deq = quantize(tensors[n], gran, round_scale_bf16=gran != BLOCK)
        files[n] = ("F8_E4M3", codes)
        twin[n] = deq
        store = (lambda a: ("BF16", to_bf16_bits(a))) if scale_dtype == "BF16" else (lambda a: ("F32", a))
        if gran == "tensor":
            shape = (1,) if compressed else ()
            files[module + ".weight_scale"] = store(scales.reshape(shape))
        elif gran == "channel":
            files[module + ".weight_scale"] = store(scales.reshape(-1, 1))
        else:
            files[module + ".weight_scale_inv"] = ("F32", scales)
        if static_acts:
            # A calibrated activation amax / 448 (any positive value: the CPU engine ignores it).
            act = np.float32(rng.uniform(2.0, 6.0)) / E4M3_MAX
            files[module + ".input_scale"] = store(np.array(act, dtype=np.float32).reshape((1,) if scale_dtype == "BF16" else ()))
    extra = {}
    qc = None
    ign = base["ignored"]
    if kind == "ct_tensor_static":
        acts = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
        qc = ct_config("tensor", acts, ign, kv=True)
    elif kind == "ct_channel_dynamic":
        acts = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True, "symmetric": True}
        regex = "re:.*" + ign[1].split(".", 1)[1].replace(".", r"\.") + "$"
        qc = ct_config("channel", acts, [ign[0], regex])
    elif kind == "modelopt_kv":
        extra["hf_quant_config.json"] = {
            "producer": {"name": "modelopt", "version": "0.19.0"},
            "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8",
                             "exclude_modules": [ign[0], "*" + ign[1].split(".", 1)[1]]},
        }
    elif kind == "fp8_dynamic":
        qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": ign}
    elif kind == "fp8_block":
        qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
              "weight_block_size": list(BLOCK), "ignored_layers": ign}
    elif kind == "fbgemm":
        qc = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": ign}
    if base["kv"] and static_acts:
        k_mod, v_mod = base["kv"]
        for i in range(config["num_hidden_layers"]):
            k, v = (np.float32(rng.uniform(0.05, 0.2)) for _ in range(2))
            pre = f"model.layers.{i}."
            if kind == "modelopt_kv":
                files[pre + k_mod + ".k_scale"] = ("F32", np.array(k, dtype=np.float32))
                files[pre + v_mod + ".v_scale"] = ("F32", np.array(v, dtype=np.float32))
            else:
                files[pre + k_mod + ".output_scale"] = ("BF16", to_bf16_bits(np.array([k])))
                files[pre + v_mod + ".output_scale"] = ("BF16", to_bf16_bits(np.array([v])))
    cfg = dict(config)
    cfg["dtype"] = "bfloat16"
    if qc is not None:
        cfg["quantization_config"] = qc
    return files, cfg, extra, twin


def write_dir(d: Path, base_dir: Path, cfg: dict, files: dict, extra: dict) -> None:
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    shutil.copy(base_dir / "generation_config.json", d / "generation_config.json")
    for fname, obj in extra.items():
        (d / fname).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    write_safetensors(d / "model.safetensors", files)


def make_all() -> dict:
    """Writes every fixture and twin; returns {twin name: (base model dir, [its FP8 fixtures])}."""
    self_check()
    OUT.mkdir(parents=True, exist_ok=True)
    twins = {}
    for base_key, kind in FIXTURES:
        name = f"{base_key}_{kind}"
        gran = KINDS[kind][0]
        base_dir = MODELS / BASES[base_key]["model"]
        config = json.loads((base_dir / "config.json").read_text())
        tensors = read_safetensors(base_dir / "model.safetensors")
        files, cfg, extra, twin = make_format(base_key, kind, tensors, config, seed_name=name)
        write_dir(OUT / name, base_dir, cfg, files, extra)
        tname = f"{base_key}_twin_{gran}"
        if tname in twins:
            prev = twins[tname][0]
            same = prev.keys() == twin.keys() and all(np.array_equal(prev[k], twin[k]) for k in twin)
            if not same:
                raise SystemExit(f"{name}: dequantized weights differ from the other {tname} formats")
            twins[tname][2].append(name)
        else:
            tcfg = dict(config)
            tcfg["dtype"] = "float32"  # stored F32, whatever the base's dtype
            twins[tname] = (twin, base_dir, [name])
            write_dir(OUT / tname, base_dir, tcfg, {k: ("F32", v) for k, v in twin.items()}, {})
        print(f"{name}: twin {tname}, {(OUT / name / 'model.safetensors').stat().st_size} bytes")
    return {t: (v[1], v[2]) for t, v in twins.items()}


def make_goldens(twins: dict, threads: int) -> None:
    """HF goldens of each twin (float32, eager), for the prompts of the base model's golden.

    Same computation and format as scripts/make_fixtures.py (its load_reference and make_case:
    greedy by full recomputation, cross-checked against generate() with a KV cache); the
    prompts are not redrawn, so the smallest top1 - top2 logit gap is printed, not enforced.
    """
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError:
        raise SystemExit("--goldens needs torch and transformers (scripts/make_fixtures.py's environment)")
    sys.path.insert(0, str(ROOT / "scripts"))
    import make_fixtures as mf

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    for tname, (base_dir, fixtures) in twins.items():
        base_golden = json.loads((GOLDEN_DIR / f"{base_dir.name}.json").read_text())
        model = mf.load_reference(OUT / tname, {})
        cases, margins = [], []
        for c in base_golden["cases"]:
            case, step_logits = mf.make_case(model, c["prompt_ids"], c["max_new_tokens"])
            cases.append(case)
            margins.append(mf.min_margin(step_logits))
        obj = {
            "model": f"fp8/{tname}",
            "source_dtype": "float32",
            "vocab_size": model.config.vocab_size,
            "note": f"transformers on fp8/{tname}, the dequantized weights of "
            + ", ".join(f"fp8/{f}" for f in fixtures)
            + f"; prompts of golden/{base_dir.name}.json",
            "cases": cases,
        }
        mf.write_json(GOLDEN_DIR / f"fp8_{tname}.json", obj)
        print(f"  smallest greedy margin per case: {', '.join(f'{m:.3f}' for m in margins)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--goldens", action="store_true", help="also write HF goldens of the twins (needs transformers)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for --goldens")
    args = ap.parse_args()
    twins = make_all()
    if args.goldens:
        make_goldens(twins, args.threads)


if __name__ == "__main__":
    main()
