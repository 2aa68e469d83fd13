#!/usr/bin/env python3
"""Generate ferrum's FP8 checkpoint fixtures: tests/fixtures/fp8/<name>/.

Owns tests/fixtures/fp8/. Takes tiny F32 checkpoints of tests/fixtures/models/ and writes, for each
FP8 format ferrum detects, a tiny pre-quantized checkpoint laid out as its producer writes it
(config keys, tensor names, scale shapes and dtypes), plus the *dequantized twins*: ordinary F32
checkpoints holding exactly the values ferrum must dequantize to (`e4m3(code) * scale`, one f32
rounding). tests/fp8_checkpoints.rs loads each FP8 checkpoint and its twin on the CPU engine and
requires identical logits and greedy tokens.

numpy only; it never downloads anything and needs no torch. Deterministic: rerunning it rewrites
the same bytes.

Quantization, as each producer does it:
- scales are amax / 448 (per tensor, per output row, or per block tile), in f32;
- E4M3 encoding rounds to nearest, ties to even, saturating at +-448 (the same codec as
  src/ops/fp8.rs, built here from its 127 positive codes);
- per-tensor and per-channel scales are rounded to bf16-representable values before the codes are
  computed (compressed-tensors stores them in bf16; the f32-scale producers then hold the same
  values), so the formats with the same granularity share one twin. Block scales stay f32.
- every unquantized tensor (embeddings, norms, lm_head, the ignored linear) is stored in BF16 in the
  FP8 checkpoints, as real ones are; the twins hold the same values in F32.

Hugging Face goldens for the twins: `--goldens` loads each twin with transformers (float32, eager)
and writes tests/fixtures/golden/fp8_<twin>.json in the format of scripts/make_fixtures.py, for
the prompts of the base model's golden. Run it where torch and transformers are installed (the GPU
machine); it is not needed by the Rust tests, which compare against the twins.

Usage:
    .venv/bin/python scripts/make_fp8_fixtures.py            # writes tests/fixtures/fp8/
    python scripts/make_fp8_fixtures.py --goldens            # also the HF goldens (transformers)
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


# name -> (base, twin, granularity, description). Each entry's `make` adds config keys and scales.
FORMATS = {
    "llama_ct_tensor_static": ("llama", "tensor", "compressed-tensors FP8: per-tensor BF16 weight_scale [1], static BF16 input_scale [1], kv_cache_scheme with k_proj/v_proj.output_scale, plain-name ignore list"),
    "llama_ct_channel_dynamic": ("llama", "channel", "compressed-tensors FP8_DYNAMIC: per-channel BF16 weight_scale [out, 1], dynamic per-token activations (no input_scale), `re:` regex in ignore"),
    "llama_modelopt_kv": ("llama", "tensor", "ModelOpt FP8: hf_quant_config.json, scalar F32 weight_scale and input_scale, kv_cache_quant_algo FP8 with k_proj.k_scale / v_proj.v_scale, glob in exclude_modules"),
    "llama_fp8_dynamic": ("llama", "tensor", "quant_method fp8, activation_scheme dynamic: scalar F32 weight_scale, ignored_layers"),
    "llama_fp8_block": ("llama", "block", f"quant_method fp8 with weight_block_size {list(BLOCK)}: F32 weight_scale_inv tiles, ragged edge tiles; fused qkv keeps blocks, gate|up (100 rows) is dequantized"),
    "llama_fbgemm": ("llama", "channel", "fbgemm_fp8: per-row F32 weight_scale [out, 1], modules_to_not_convert"),
    "falcon_ct_channel_dynamic": ("falcon", "channel", "compressed-tensors per-channel on Falcon's fused query_key_value ([kv_groups, q + k + v, head_dim] rows re-ordered with their scales)"),
}


def make_format(name: str, base_key: str, granularity_name: str, tensors: dict, config: dict):
    """(files {name: (dtype, array)}, config.json dict, extra files {name: json}, dequantized twin weights)."""
    base = BASES[base_key]
    ignored = set(n + ".weight" for n in base["ignored"])
    linears = [n for n in base["linears"](tensors) if n not in ignored]
    gran = {"tensor": "tensor", "channel": "channel", "block": BLOCK}[granularity_name]
    scale_dtype = "BF16" if name.startswith(("llama_ct", "falcon_ct")) else "F32"
    rng = np.random.default_rng(sum(map(ord, name)))
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
            shape = (1,) if name.startswith("llama_ct") else ()
            files[module + ".weight_scale"] = store(scales.reshape(shape))
        elif gran == "channel":
            files[module + ".weight_scale"] = store(scales.reshape(-1, 1))
        else:
            files[module + ".weight_scale_inv"] = ("F32", scales)
        if name in ("llama_ct_tensor_static", "llama_modelopt_kv"):
            # A calibrated activation amax / 448 (any positive value: the CPU engine ignores it).
            act = np.float32(rng.uniform(2.0, 6.0)) / E4M3_MAX
            files[module + ".input_scale"] = store(np.array(act, dtype=np.float32).reshape((1,) if scale_dtype == "BF16" else ()))
    extra = {}
    qc = None
    ign = base["ignored"]
    if name == "llama_ct_tensor_static":
        acts = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
        qc = ct_config("tensor", acts, ign, kv=True)
    elif name in ("llama_ct_channel_dynamic", "falcon_ct_channel_dynamic"):
        acts = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True, "symmetric": True}
        regex = "re:.*" + ign[1].split(".", 1)[1].replace(".", r"\.") + "$"
        qc = ct_config("channel", acts, [ign[0], regex])
    elif name == "llama_modelopt_kv":
        extra["hf_quant_config.json"] = {
            "producer": {"name": "modelopt", "version": "0.19.0"},
            "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8",
                             "exclude_modules": [ign[0], "*" + ign[1].split(".", 1)[1]]},
        }
    elif name == "llama_fp8_dynamic":
        qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": ign}
    elif name == "llama_fp8_block":
        qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
              "weight_block_size": list(BLOCK), "ignored_layers": ign}
    elif name == "llama_fbgemm":
        qc = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": ign}
    if base["kv"] and name in ("llama_ct_tensor_static", "llama_modelopt_kv"):
        k_mod, v_mod = base["kv"]
        for i in range(config["num_hidden_layers"]):
            k, v = (np.float32(rng.uniform(0.05, 0.2)) for _ in range(2))
            pre = f"model.layers.{i}."
            if name == "llama_modelopt_kv":
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


def twin_name(name: str, base_key: str, granularity: str) -> str:
    return f"{BASES[base_key]['model'].split('_')[0]}_twin_{granularity}"


def make_all() -> dict:
    self_check()
    OUT.mkdir(parents=True, exist_ok=True)
    twins = {}
    for name, (base_key, gran, _desc) in FORMATS.items():
        base_dir = MODELS / BASES[base_key]["model"]
        config = json.loads((base_dir / "config.json").read_text())
        tensors = read_safetensors(base_dir / "model.safetensors")
        files, cfg, extra, twin = make_format(name, base_key, gran, tensors, config)
        write_dir(OUT / name, base_dir, cfg, files, extra)
        tname = twin_name(name, base_key, gran)
        if tname in twins:
            prev = twins[tname][0]
            same = prev.keys() == twin.keys() and all(np.array_equal(prev[k], twin[k]) for k in twin)
            if not same:
                raise SystemExit(f"{name}: dequantized weights differ from the other {tname} formats")
        else:
            tcfg = dict(config)
            twins[tname] = (twin, tcfg, base_dir)
            write_dir(OUT / tname, base_dir, tcfg, {k: ("F32", v) for k, v in twin.items()}, {})
        print(f"{name}: twin {tname}, {(OUT / name / 'model.safetensors').stat().st_size} bytes")
    return {t: v[2] for t, v in twins.items()}


def make_goldens(twins: dict) -> None:
    """HF goldens of each twin (float32, eager), prompts of the base model's golden."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise SystemExit("--goldens needs torch and transformers (run it on the GPU machine)")
    sys.path.insert(0, str(ROOT / "scripts"))
    import make_fixtures as mf

    for tname, base_dir in twins.items():
        base_golden = json.loads((GOLDEN_DIR / f"{base_dir.name}.json").read_text())
        model = mf.load_reference(OUT / tname, {})
        cases = [mf.make_case(model, c["prompt_ids"], c["max_new_tokens"])[0] for c in base_golden["cases"]]
        obj = {"model": f"fp8/{tname}", "source_dtype": "float32", "vocab_size": base_golden["vocab_size"],
               "cases": cases}
        (GOLDEN_DIR / f"fp8_{tname}.json").write_text(json.dumps(obj, separators=(",", ":")) + "\n")
        print(f"golden/fp8_{tname}.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--goldens", action="store_true", help="also write HF goldens of the twins (needs transformers)")
    args = ap.parse_args()
    twins = make_all()
    if args.goldens:
        make_goldens(twins)


if __name__ == "__main__":
    main()
