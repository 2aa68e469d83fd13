#!/usr/bin/env python3
"""Convert three tiny HF fixtures to GGUF the way llama.cpp's convert_hf_to_gguf.py does.

Owns: tests/fixtures/gguf/{gpt2,gpt2_q8_0,bloom,mpt}.gguf and
tests/fixtures/golden/gpt2_q8_0.json. Reads the checkpoints written by
scripts/make_fixtures.py (tests/fixtures/models/{gpt2,bloom,mpt}); the F32
files hold exactly those weights, so they reuse the checkpoints' goldens
(golden/{gpt2,bloom,mpt}.json). Must never download anything.

Usage:
    scripts/make_gguf_arch_fixtures.py                 # write the files
    scripts/make_gguf_arch_fixtures.py --llama-cpp     # also run llama.cpp on them

Conversion rules (llama.cpp's GPT2Model / BloomModel / MPTModel converter
classes plus gguf-py's tensor_mapping.py), numpy shapes [rows, cols] =
PyTorch [out_features, in_features]; gguf-py writes the dims reversed (ne0 =
cols):
- gpt2: Conv1D weights ([in, out] in HF) transposed to [out, in]; names
  transformer.wte -> token_embd, wpe -> position_embd, h.N.ln_1 ->
  blk.N.attn_norm, attn.c_attn -> blk.N.attn_qkv (q|k|v concatenated rows,
  as in HF), attn.c_proj -> blk.N.attn_output, ln_2 -> blk.N.ffn_norm,
  mlp.c_fc -> blk.N.ffn_up, mlp.c_proj -> blk.N.ffn_down, ln_f -> output_norm;
  no output.weight (tied: llama.cpp falls back to token_embd).
- bloom: prefix `transformer.` stripped; query_key_value rows re-ordered from
  per-head interleaved [n_head, 3, head_dim] to q|k|v [3, n_head, head_dim]
  (weight and bias); word_embeddings_layernorm -> token_embd_norm; tied
  lm_head written as output.weight = a copy of token_embd (the converter does
  this when the checkpoint has no lm_head.weight).
- mpt: names mapped as is (Wqkv is already q|k|v); no biases (no_bias); no
  output.weight (tied).

Deviations from the converter, each because the converter's value would be
wrong for these configs (noted in tests/fixtures/gguf/README.md):
- gpt2 feed_forward_length: the converter writes 4 * n_embd; n_inner is 96,
  and llama.cpp checks ffn_up's shape against it, so 96 is written.
- gpt2 context_length: the converter reads `n_ctx`, which transformers 5
  no longer saves; n_positions (128) is written.
- tensors the converter would keep in F16 are F32 here (all F32 files; in
  gpt2_q8_0 the matrices whose rows are not a multiple of 32 stay F32).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

import gguf
from gguf import GGMLQuantizationType, LlamaFileType

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (same directory)

REPO = mf.REPO
GGUF_DIR = mf.FIXTURES / "gguf"
Q8_0_BLOCK = 32


def load_checkpoint(name: str):
    """(config.json dict, {hf_name: float32 numpy array}) of a tiny fixture."""
    from safetensors.torch import load_file

    model_dir = mf.MODELS_DIR / name
    hparams = json.loads((model_dir / "config.json").read_text())
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        for key, value in load_file(path).items():
            tensors[key] = value.float().numpy()
    return hparams, tensors


def map_name(arch: gguf.MODEL_ARCH, num_layers: int, hf_name: str) -> str:
    name_map = gguf.get_tensor_name_map(arch, num_layers)
    mapped = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise SystemExit(f"no GGUF name for {hf_name} ({arch.name})")
    return mapped


def convert_gpt2(hparams, tensors):
    """-> (metadata callable, [(gguf_name, array)])."""
    num_layers = hparams["n_layer"]
    out = []
    for hf_name, data in tensors.items():
        if hf_name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers, not weights
        if hf_name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            data = data.T.copy()  # Conv1D [in, out] -> [out, in]
        out.append((map_name(gguf.MODEL_ARCH.GPT2, num_layers, hf_name), data))

    def metadata(w: gguf.GGUFWriter) -> None:
        w.add_block_count(num_layers)
        w.add_context_length(hparams["n_positions"])
        w.add_embedding_length(hparams["n_embd"])
        w.add_feed_forward_length(hparams["n_inner"] or 4 * hparams["n_embd"])
        w.add_head_count(hparams["n_head"])
        w.add_layer_norm_eps(hparams["layer_norm_epsilon"])
        w.add_vocab_size(hparams["vocab_size"])

    return metadata, out


def bloom_qkv_to_concatenated(data: np.ndarray, num_heads: int) -> np.ndarray:
    """[n_head * 3 * head_dim, ...] per-head interleaved -> [3 * n_head * head_dim, ...] q|k|v."""
    head_dim = data.shape[0] // (3 * num_heads)
    per_head = data.reshape(num_heads, 3, head_dim, *data.shape[1:])
    return np.concatenate([per_head[:, part].reshape(num_heads * head_dim, *data.shape[1:]) for part in range(3)])


def convert_bloom(hparams, tensors):
    num_layers = hparams["n_layer"]
    num_heads = hparams["n_head"]
    n_embed = hparams["hidden_size"]
    out = []
    for hf_name, data in tensors.items():
        name = hf_name.removeprefix("transformer.")
        if name.endswith("self_attention.query_key_value.weight") or name.endswith(
            "self_attention.query_key_value.bias"
        ):
            data = bloom_qkv_to_concatenated(data, num_heads)
        out.append((map_name(gguf.MODEL_ARCH.BLOOM, num_layers, name), data))
        if name == "word_embeddings.weight" and not any(k in tensors for k in ("lm_head.weight", "output.weight")):
            out.append(("output.weight", data.copy()))

    def metadata(w: gguf.GGUFWriter) -> None:
        # The converter's context length is hparams.get("seq_length", n_embed):
        # transformers' BloomConfig has no seq_length, so it is n_embed (60).
        w.add_context_length(hparams.get("seq_length", n_embed))
        w.add_embedding_length(n_embed)
        w.add_feed_forward_length(4 * n_embed)
        w.add_block_count(num_layers)
        w.add_head_count(num_heads)
        w.add_head_count_kv(num_heads)
        w.add_layer_norm_eps(hparams["layer_norm_epsilon"])
        w.add_vocab_size(hparams["vocab_size"])

    return metadata, out


def convert_mpt(hparams, tensors):
    num_layers = hparams["n_layers"]
    attn = hparams["attn_config"]
    out = [(map_name(gguf.MODEL_ARCH.MPT, num_layers, k), v) for k, v in tensors.items()]

    def metadata(w: gguf.GGUFWriter) -> None:
        w.add_context_length(hparams["max_seq_len"])
        w.add_embedding_length(hparams["d_model"])
        w.add_block_count(num_layers)
        w.add_feed_forward_length(4 * hparams["d_model"])
        w.add_head_count(hparams["n_heads"])
        if kv_n_heads := attn.get("kv_n_heads"):
            w.add_head_count_kv(kv_n_heads)
        w.add_layer_norm_eps(1e-5)  # the converter hard-codes 1e-5 (== the config's here)
        if attn["clip_qkv"] is not None:
            w.add_clamp_kqv(attn["clip_qkv"])
        w.add_max_alibi_bias(attn["alibi_bias_max"] if attn["alibi"] else 0.0)
        w.add_vocab_size(hparams["vocab_size"])

    return metadata, out


CONVERTERS = {
    "gpt2": (gguf.MODEL_ARCH.GPT2, convert_gpt2),
    "bloom": (gguf.MODEL_ARCH.BLOOM, convert_bloom),
    "mpt": (gguf.MODEL_ARCH.MPT, convert_mpt),
}


def q8_0_eligible(gguf_name: str, data: np.ndarray) -> bool:
    """2-D weight matrices with rows a multiple of 32, except position_embd (kept F32 by llama.cpp)."""
    return (
        data.ndim == 2
        and gguf_name.endswith(".weight")
        and not gguf_name.startswith("position_embd")
        and data.shape[1] % Q8_0_BLOCK == 0
    )


def write_gguf(path: Path, arch: gguf.MODEL_ARCH, name: str, metadata, tensors, quantize_q8_0: bool) -> list:
    """Write one GGUF; returns [(gguf_name, type name, numpy shape)]."""
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(f"ferrum tiny {name}")
    metadata(writer)
    # The one tokenizer key: llama.cpp refuses a file without tokenizer.ggml.model;
    # "none" is its no-vocabulary type (token ids only, n_vocab from {arch}.vocab_size).
    writer.add_tokenizer_model("none")
    writer.add_file_type(LlamaFileType.MOSTLY_Q8_0 if quantize_q8_0 else LlamaFileType.ALL_F32)
    summary = []
    for gguf_name, data in tensors:
        data = np.ascontiguousarray(data, dtype=np.float32)
        if quantize_q8_0 and q8_0_eligible(gguf_name, data):
            qdata = gguf.quants.quantize(data, GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, qdata, raw_shape=qdata.shape, raw_dtype=GGMLQuantizationType.Q8_0)
            summary.append((gguf_name, "Q8_0", list(data.shape)))
        else:
            writer.add_tensor(gguf_name, data)
            summary.append((gguf_name, "F32", list(data.shape)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"  wrote {path.relative_to(REPO)} ({path.stat().st_size} bytes)")
    return summary


def check_roundtrip(path: Path, tensors, quantized: bool) -> None:
    """Read the file back with gguf-py: names, shapes and (dequantized) values."""
    reader = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    if set(by_name) != {n for n, _ in tensors}:
        raise SystemExit(f"{path}: tensor names differ on read-back")
    for gguf_name, data in tensors:
        t = by_name[gguf_name]
        shape = [int(d) for d in reversed(t.shape.tolist())]
        if shape != list(data.shape):
            raise SystemExit(f"{path}: {gguf_name} shape {shape} != {list(data.shape)}")
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        tol = np.abs(data).max() / 127 if t.tensor_type == GGMLQuantizationType.Q8_0 else 0.0
        if not quantized and t.tensor_type != GGMLQuantizationType.F32:
            raise SystemExit(f"{path}: {gguf_name} is {t.tensor_type.name}, expected F32")
        if np.abs(values - data).max() > tol:
            raise SystemExit(f"{path}: {gguf_name} values differ on read-back")


def dequantized_tensors(path: Path) -> dict[str, np.ndarray]:
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        shape = [int(d) for d in reversed(t.shape.tolist())]
        out[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
    return out


def make_gpt2_q8_0_golden(q8_path: Path) -> None:
    """golden/gpt2_q8_0.json: the gpt2 goldens' prompts through the dequantized Q8_0 weights."""
    ref = mf.load_reference(mf.MODELS_DIR / "gpt2", {"attn": "eager"})
    deq = dequantized_tensors(q8_path)
    replaced = []
    with torch.no_grad():
        for layer_idx in range(ref.config.n_layer):
            gguf_name = f"blk.{layer_idx}.ffn_down.weight"
            # HF Conv1D c_proj weight is [in, out] = GGUF [out, in] transposed.
            ref.transformer.h[layer_idx].mlp.c_proj.weight.copy_(torch.from_numpy(deq[gguf_name].T.copy()))
            replaced.append(gguf_name)
    f32_golden = json.loads((mf.GOLDEN_DIR / "gpt2.json").read_text())
    # Same prompt rules as every tiny golden (margin >= MIN_GREEDY_MARGIN,
    # varied greedy tokens), drawn for the dequantized model.
    gen = torch.Generator().manual_seed(1005 + 107)
    cases = []
    for prompt_len in mf.TINY_PROMPT_LENS:
        prompt_ids, margin = mf.pick_prompt(ref, f32_golden["vocab_size"], prompt_len, gen)
        case, _ = mf.make_case(ref, prompt_ids, mf.TINY_NEW_TOKENS)
        print(f"  q8_0 prompt_len {prompt_len:2d}: margin {margin:.3f}, {len(set(case['greedy_ids']))} distinct")
        cases.append(case)
    golden = {
        "model": "gpt2_q8_0",
        "source_dtype": "Q8_0",
        "gguf_file": "gpt2_q8_0.gguf",
        "vocab_size": f32_golden["vocab_size"],
        "note": (
            "tests/fixtures/models/gpt2 with " + ", ".join(replaced) + " replaced by their Q8_0 "
            "round trip (gguf-py quantize + dequantize); every other tensor is the F32 original."
        ),
        "cases": cases,
    }
    mf.write_json(mf.GOLDEN_DIR / "gpt2_q8_0.json", golden)


def _silent_log(level, text, user_data) -> None:
    del level, text, user_data


def _make_silent_log():
    import llama_cpp as lc

    return lc.llama_log_callback(_silent_log)


_LLAMA_LOG_SILENT = None


def llama_cpp_logits(path: Path, ids: list[int], vocab_size: int) -> np.ndarray:
    """Logits [len(ids), vocab] from llama.cpp (llama-cpp-python's C API), one batch, all positions."""
    import ctypes

    import llama_cpp as lc

    global _LLAMA_LOG_SILENT
    if _LLAMA_LOG_SILENT is None:
        _LLAMA_LOG_SILENT = _make_silent_log()  # kept alive: llama.cpp holds the pointer
    lc.llama_backend_init()
    lc.llama_log_set(_LLAMA_LOG_SILENT, ctypes.c_void_p())
    mparams = lc.llama_model_default_params()
    model = lc.llama_model_load_from_file(str(path).encode(), mparams)
    if not model:
        raise SystemExit(f"llama.cpp could not load {path}")
    cparams = lc.llama_context_default_params()
    cparams.n_ctx = 64
    cparams.n_batch = 64
    cparams.n_ubatch = 64
    cparams.n_threads = 2
    cparams.n_threads_batch = 2
    cparams.type_k = GGMLQuantizationType.F32  # default KV cache is F16
    cparams.type_v = GGMLQuantizationType.F32
    cparams.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED  # its CPU path rounds q to F16
    ctx = lc.llama_init_from_model(model, cparams)
    if not ctx:
        raise SystemExit(f"llama.cpp could not create a context for {path}")
    batch = lc.llama_batch_init(len(ids), 0, 1)
    batch.n_tokens = len(ids)
    for i, token_id in enumerate(ids):
        batch.token[i] = token_id
        batch.pos[i] = i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = 1
    if lc.llama_decode(ctx, batch) != 0:
        raise SystemExit(f"llama_decode failed on {path}")
    rows = []
    for i in range(len(ids)):
        ptr = lc.llama_get_logits_ith(ctx, i)
        rows.append(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(vocab_size,)).copy())
    lc.llama_batch_free(batch)
    lc.llama_free(ctx)
    lc.llama_model_free(model)
    return np.stack(rows)


def crosscheck_llama_cpp(path: Path, golden_path: Path, tolerance: float) -> None:
    """llama.cpp's logits along every golden path vs the golden greedy ids, top-5 and last_logits.

    Greedy ids must be equal; logits agree to ~5e-3 only, because ggml's CPU
    GELU is the tanh approximation read from an F16 lookup table (HF: the
    same approximation in float32 for gpt2/bloom, exact erf GELU for mpt) and
    its Q8_0 matmuls quantize the activations to 8 bits as well.
    """
    golden = json.loads(golden_path.read_text())
    worst_logprob, worst_last = 0.0, 0.0
    for case in golden["cases"]:
        ids = case["prompt_ids"] + case["greedy_ids"][:-1]
        logits = llama_cpp_logits(path, ids, golden["vocab_size"]).astype(np.float64)
        start = len(case["prompt_ids"]) - 1
        for step, top5 in enumerate(case["top5"]):
            row = logits[start + step]
            logprobs = row - np.log(np.exp(row - row.max()).sum()) - row.max()
            if int(np.argmax(row)) != case["greedy_ids"][step]:
                raise SystemExit(f"{path.name}: llama.cpp greedy differs at step {step} of {case['prompt_ids']}")
            for token_id, logprob in top5:
                worst_logprob = max(worst_logprob, abs(logprobs[token_id] - logprob))
        if "last_logits" in case:
            worst_last = max(worst_last, float(np.abs(logits[start] - np.array(case["last_logits"])).max()))
    print(f"  llama.cpp vs {golden_path.name}: greedy equal, max |top5 logprob diff| {worst_logprob:.2e}, "
          f"max |last_logits diff| {worst_last:.2e}")
    if worst_logprob > tolerance or worst_last > tolerance:
        raise SystemExit(f"{path.name}: llama.cpp differs from the golden")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp", action="store_true", help="cross-check the files with llama-cpp-python")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    GGUF_DIR.mkdir(parents=True, exist_ok=True)

    for name, (arch, convert) in CONVERTERS.items():
        print(f"[{name}.gguf]")
        hparams, hf_tensors = load_checkpoint(name)
        metadata, tensors = convert(hparams, hf_tensors)
        path = GGUF_DIR / f"{name}.gguf"
        summary = write_gguf(path, arch, name, metadata, tensors, quantize_q8_0=False)
        check_roundtrip(path, tensors, quantized=False)
        for gguf_name, type_name, shape in summary:
            print(f"    {gguf_name:28s} {type_name:5s} {shape}")
        if name == "gpt2":
            q8_path = GGUF_DIR / "gpt2_q8_0.gguf"
            summary = write_gguf(q8_path, arch, f"{name} q8_0", metadata, tensors, quantize_q8_0=True)
            check_roundtrip(q8_path, tensors, quantized=True)
            quantized = [n for n, t, _ in summary if t == "Q8_0"]
            if not quantized:
                raise SystemExit("gpt2_q8_0: no matrix has rows that are a multiple of 32")
            print(f"    Q8_0: {quantized}")
            make_gpt2_q8_0_golden(q8_path)

    if args.llama_cpp:
        for file_name, golden_name, tolerance in [
            ("gpt2.gguf", "gpt2.json", 1e-2),
            ("gpt2_q8_0.gguf", "gpt2_q8_0.json", 1e-1),
            ("bloom.gguf", "bloom.json", 1e-2),
            ("mpt.gguf", "mpt.json", 1e-2),
        ]:
            crosscheck_llama_cpp(GGUF_DIR / file_name, mf.GOLDEN_DIR / golden_name, tolerance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
