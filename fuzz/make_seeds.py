#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets (fuzz/seeds/<target>/) and their dictionaries
(fuzz/dict/<target>.dict) from the repository's own fixtures. Python 3 standard library only;
deterministic, so rerunning it after a fixture changes gives a reviewable diff.

The seeds are small on purpose (a few KB each): libFuzzer mutates short inputs much faster, so
fixture checkpoints are rebuilt with the same metadata, tensor names and dtypes but tiny tensors.

  gguf         each tests/fixtures/gguf/*.gguf's metadata (architecture keys) with one small tensor
               of every GGML type tests/fixtures/gguf_quant_blocks.json has a block of; the
               SentencePiece and GPT-2 tokenizer fixtures as GGUF tokenizer metadata; a v2 file
               and one with general.alignment 64
  safetensors  tests/fixtures/tiny_safetensors as is; the headers of the tiny HF and FP8
               checkpoints (names, dtypes, __metadata__) with [2, 4] / [4] tensors; one tensor of
               every dtype
  config       model_repository/*/config.pbtxt as the JSON Triton hands the backend (model_path
               pointed at the harness's stand-in file), plus one setting every parameter key
  request      Triton generate-endpoint bodies and KServe v2 infer bodies: the e2e tests' good
               and bad requests, the vLLM sampling_parameters contract, the token interface

Run: python3 fuzz/make_seeds.py   (ci/fuzz.sh fuzzes from them; tests/fuzz_corpus.rs replays them)
"""

import json
import re
import shutil
import struct
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "tests" / "fixtures"
OUT = REPO / "fuzz" / "seeds"
DICT = REPO / "fuzz" / "dict"

# ---- GGUF ---------------------------------------------------------------------------------------

GGUF_MAGIC = b"GGUF"
# gguf_type ids of the GGUF spec.
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f",
          BOOL: "<?", U64: "<Q", I64: "<q", F64: "<d"}
JSON_TYPES = {"u8": U8, "i8": I8, "u16": U16, "i16": I16, "u32": U32, "i32": I32, "f32": F32,
              "bool": BOOL, "string": STRING, "u64": U64, "i64": I64, "f64": F64}


def gguf_string(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def gguf_value(ty, v, item_type=None):
    if ty == STRING:
        return gguf_string(v)
    if ty == ARRAY:
        return struct.pack("<IQ", item_type, len(v)) + b"".join(gguf_value(item_type, x) for x in v)
    return struct.pack(SCALAR[ty], v)


def gguf_kv(key, ty, v, item_type=None):
    return gguf_string(key) + struct.pack("<I", ty) + gguf_value(ty, v, item_type)


def skip_value(buf, pos, ty):
    if ty == STRING:
        (n,) = struct.unpack_from("<Q", buf, pos)
        return pos + 8 + n
    if ty == ARRAY:
        item, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        for _ in range(count):
            pos = skip_value(buf, pos, item)
        return pos
    return pos + struct.calcsize(SCALAR[ty])


def gguf_metadata(path):
    """(version, number of key-values, their raw bytes) of a GGUF file."""
    buf = path.read_bytes()
    assert buf[:4] == GGUF_MAGIC, path
    version, _, num_kv = struct.unpack_from("<IQQ", buf, 4)
    pos = start = 24
    for _ in range(num_kv):
        (n,) = struct.unpack_from("<Q", buf, pos)
        pos += 8 + n
        (ty,) = struct.unpack_from("<I", buf, pos)
        pos = skip_value(buf, pos + 4, ty)
    return version, num_kv, buf[start:pos]


def quant_blocks():
    """[(type name, ggml type id, elements per block, one block's bytes)]."""
    d = json.loads((FIX / "gguf_quant_blocks.json").read_text())
    out = []
    for t in d["types"]:
        raw = bytes.fromhex(t["bytes"])
        num_elems = len(bytes.fromhex(t["values_f32le"])) // 4
        out.append((t["type"], t["id"], num_elems, raw))
    return out


def gguf_file(num_kv, kv_bytes, tensors, version=3, alignment=32):
    """tensors: [(name, shape in PyTorch order, ggml type id, data)]."""
    out = GGUF_MAGIC + struct.pack("<IQQ", version, len(tensors), num_kv) + kv_bytes
    offset, offsets = 0, []
    for name, shape, ty, data in tensors:
        out += gguf_string(name) + struct.pack("<I", len(shape))
        out += b"".join(struct.pack("<Q", d) for d in reversed(shape))
        out += struct.pack("<IQ", ty, offset)
        offsets.append(offset)
        offset = -(-(offset + len(data)) // alignment) * alignment
    out += b"\0" * (-len(out) % alignment)
    data_start = len(out)
    for (_, _, _, data), off in zip(tensors, offsets):
        out += b"\0" * (data_start + off - len(out)) + data
    return out


def every_type_tensors(names):
    """One [2, n] tensor per GGML type with a fixture block (two blocks each), named from
    `names` (a fixture's tensor names) so name lookups in the harness find them."""
    tensors = []
    for i, (type_name, ty, num_elems, block) in enumerate(quant_blocks()):
        name = names[i] if i < len(names) else f"fuzz.{type_name.lower()}.weight"
        if num_elems >= 32:
            tensors.append((name, [2, num_elems], ty, block * 2))
        else:  # F32/F16/BF16 blocks hold 16 values: [2, 8].
            tensors.append((name, [2, num_elems // 2], ty, block))
    return tensors


def gguf_tensor_names(path):
    buf = path.read_bytes()
    _, num_tensors, num_kv = struct.unpack_from("<IQQ", buf, 4)
    pos = 24 + len(gguf_metadata(path)[2])
    names = []
    for _ in range(num_tensors):
        (n,) = struct.unpack_from("<Q", buf, pos)
        names.append(buf[pos + 8:pos + 8 + n].decode())
        (num_dims,) = struct.unpack_from("<I", buf, pos + 8 + n)
        pos += 8 + n + 4 + 8 * num_dims + 4 + 8
    return names


def json_metadata(meta):
    """GGUF key-value bytes from the tokenizer fixtures' JSON form ({key: {type, value}})."""
    kv = b""
    for key, e in meta.items():
        if e["type"] == "array":
            kv += gguf_kv(key, ARRAY, e["value"], JSON_TYPES[e["item_type"]])
        else:
            kv += gguf_kv(key, JSON_TYPES[e["type"]], e["value"])
    return len(meta), kv


def gpt2_tokenizer_metadata():
    d = FIX / "tokenizer" / "gpt2_slow"
    vocab = json.loads((d / "vocab.json").read_text())
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m for m in (d / "merges.txt").read_text().splitlines() if m and not m.startswith("#")]
    meta = {
        "general.architecture": {"type": "string", "value": "gpt2"},
        "tokenizer.ggml.model": {"type": "string", "value": "gpt2"},
        "tokenizer.ggml.pre": {"type": "string", "value": "gpt-2"},
        "tokenizer.ggml.tokens": {"type": "array", "item_type": "string", "value": tokens},
        "tokenizer.ggml.token_type": {"type": "array", "item_type": "i32", "value": [1] * len(tokens)},
        "tokenizer.ggml.merges": {"type": "array", "item_type": "string", "value": merges},
        "tokenizer.ggml.bos_token_id": {"type": "u32", "value": 0},
        "tokenizer.ggml.eos_token_id": {"type": "u32", "value": 0},
    }
    return json_metadata(meta)


def gguf_seeds():
    seeds = {}
    for path in sorted((FIX / "gguf").glob("*.gguf")):
        _, num_kv, kv = gguf_metadata(path)
        seeds[path.stem] = gguf_file(num_kv, kv, every_type_tensors(gguf_tensor_names(path)))
    _, num_kv, kv = gguf_metadata(FIX / "gguf" / "gpt2.gguf")
    seeds["gpt2_v2"] = gguf_file(num_kv, kv, every_type_tensors([])[:4], version=2)
    kv64 = kv + gguf_kv("general.alignment", U32, 64)
    seeds["gpt2_align64"] = gguf_file(num_kv + 1, kv64, every_type_tensors([])[:4], alignment=64)
    spm = json.loads((FIX / "tokenizer" / "spm_metadata.json").read_text())
    num_kv, kv = json_metadata(spm)
    seeds["spm_tokenizer"] = gguf_file(num_kv, kv, every_type_tensors([])[:1])
    num_kv, kv = gpt2_tokenizer_metadata()
    seeds["gpt2_tokenizer"] = gguf_file(num_kv, kv, every_type_tensors([])[:1])
    return seeds


# ---- safetensors --------------------------------------------------------------------------------

ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8,
            "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def safetensors_file(tensors, metadata=None):
    """tensors: [(name, dtype, shape)]; data is a ramp of bytes."""
    header, data = {}, b""
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape in tensors:
        n = ST_SIZES.get(dtype, 1)
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + n]}
        data += bytes((len(data) + i) * 37 % 251 for i in range(n))
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def shrunk(path):
    """The checkpoint at `path` with its names, dtypes and metadata, every tensor [2, 4] or [4]."""
    buf = path.read_bytes()
    (n,) = struct.unpack_from("<Q", buf, 0)
    header = json.loads(buf[8:8 + n])
    meta = header.pop("__metadata__", None)
    tensors = [(k, v["dtype"], [2, 4] if len(v["shape"]) >= 2 else [4] if v["shape"] else [])
               for k, v in header.items()]
    return safetensors_file(tensors, meta)


def safetensors_seeds():
    seeds = {}
    for path in sorted((FIX / "tiny_safetensors").rglob("*.safetensors")):
        seeds[f"tiny_{path.parent.name}_{path.stem}"] = path.read_bytes()
    for group, name in [("models", "gpt2"), ("models", "llama_gqa_llama3"), ("models", "falcon_mq"),
                        ("fp8", "llama_fp8_block"), ("fp8", "llama_ct_channel_dynamic"),
                        ("fp8", "llama_ct_tensor_static")]:
        seeds[f"{group}_{name}"] = shrunk(FIX / group / name / "model.safetensors")
    seeds["every_dtype"] = safetensors_file(
        [(f"t.{d.lower()}", d, [2, 4]) for d in ST_SIZES] + [("scalar", "F32", [])],
        {"format": "pt"})
    return seeds


# ---- config -------------------------------------------------------------------------------------


def pbtxt_to_json(text):
    """A protobuf text-format message as JSON (the subset config.pbtxt files use): repeated
    fields become lists, as in the JSON Triton hands a backend."""
    text = re.sub(r"#[^\n]*", "", text)
    toks = re.findall(r'"(?:[^"\\]|\\.)*"|[{}\[\]:,]|[^\s{}\[\]:,"]+', text)
    pos = 0

    def value():
        nonlocal pos
        t = toks[pos]
        pos += 1
        if t == "{":
            return message("}")
        if t == "[":
            items = []
            while toks[pos] != "]":
                items.append(value())
                if toks[pos] == ",":
                    pos += 1
            pos += 1
            return items
        if t.startswith('"'):
            return json.loads(t)
        if t in ("true", "false"):
            return t == "true"
        try:
            return int(t)
        except ValueError:
            return t  # enum names (KIND_CPU)

    def message(end):
        nonlocal pos
        out = {}
        while pos < len(toks) and toks[pos] != end:
            key = toks[pos]
            pos += 1
            if toks[pos] == ":":
                pos += 1
            v = value()
            repeated = key in ("input", "output", "instance_group", "parameters")
            if repeated and not isinstance(v, list):
                v = [v]
            out[key] = out.get(key, []) + v if repeated else v
            if pos < len(toks) and toks[pos] == ",":
                pos += 1
        pos += 1
        return out

    msg = message(None)
    # Triton's JSON form of a `map<string, ModelParameter>`: {key: {string_value}}.
    if "parameters" in msg:
        msg["parameters"] = {p["key"]: p["value"] for p in msg["parameters"]}
    return msg


def config_seeds():
    seeds = {}
    for path in sorted((REPO / "model_repository").glob("*/config.pbtxt")):
        cfg = pbtxt_to_json(path.read_text())
        cfg["name"] = path.parent.name
        if "model_path" in cfg.get("parameters", {}):
            cfg["parameters"]["model_path"] = {"string_value": "model.gguf"}
        seeds[path.parent.name] = json.dumps(cfg, indent=1).encode()
    every = {
        "model_path": "model.gguf", "tokenizer_path": "tokenizer", "device": "cpu",
        "gpu_device_ids": "", "weight_format": "q8", "dtype": "auto", "quantization": "auto",
        "max_num_seqs": "8", "max_queue_size": "16", "max_num_batched_tokens": "512",
        "max_tokens_in_paged_kv_cache": "4096", "kv_cache_free_gpu_mem_fraction": "0.5",
        "block_size": "16", "max_model_len": "1024", "enable_chunked_context": "true",
        "batch_scheduler_policy": "guaranteed_no_evict", "enable_kv_cache_reuse": "yes",
        "cuda_graph_mode": "false", "cuda_warmup": "0", "exclude_input_in_output": "true",
        "apply_chat_template": "false", "ignored_request_parameters": "x-request-id,user",
        "default_max_tokens": "64", "default_temperature": "0.7", "default_top_k": "40",
        "default_top_p": "0.9", "default_min_p": "0.05", "default_repetition_penalty": "1.1",
    }
    assert sorted(every) == sorted(parameter_keys()), "a PARAMETER_KEYS key has no seed value"
    seeds["every_key"] = json.dumps({
        "name": "every_key", "backend": "ferrum", "max_batch_size": 8,
        "model_transaction_policy": {"decoupled": True},
        "parameters": {k: {"string_value": v} for k, v in every.items()},
    }, indent=1).encode()
    seeds["cuda_tp"] = json.dumps({
        "backend": "ferrum", "input": [], "output": [],
        "parameters": {"device": {"string_value": "cuda:1"},
                       "gpu_device_ids": {"string_value": "1,2"},
                       "dtype": {"string_value": "bfloat16"},
                       "quantization": {"string_value": "fp8"}},
    }).encode()
    return seeds


def parameter_keys():
    src = (REPO / "src" / "config.rs").read_text()
    body = re.search(r"PARAMETER_KEYS: &\[&str\] = &\[(.*?)\];", src, re.S).group(1)
    return re.findall(r'"([^"]+)"', body)


# ---- requests -----------------------------------------------------------------------------------

PROMPT = "The capital of France is"


def request_seeds():
    sp = lambda **kw: json.dumps(kw)  # noqa: E731
    generate = {
        "text": {"text_input": PROMPT, "max_tokens": 8},
        "stream": {"text_input": PROMPT, "max_tokens": 4, "stream": True, "temperature": 0.7,
                   "top_k": 40, "top_p": 0.9, "seed": 7, "stop_words": ["."]},
        "vllm": {"text_input": PROMPT, "stream": False, "exclude_input_in_output": True,
                 "sampling_parameters": sp(max_tokens=5, temperature=0, top_k=-1, top_p=1,
                                           seed=3, stop=["\n", "."], stop_token_ids=[2],
                                           logprobs=2, ignore_eos=False, min_tokens=1,
                                           presence_penalty=0.5, frequency_penalty=-0.5,
                                           repetition_penalty=1.1, min_p=0.05, n=1)},
        "vllm_params": {"text_input": PROMPT, "parameters": {"max_tokens": 3}},
        "trtllm": {"text_input": PROMPT, "max_tokens": 16, "stop_words": ["\n"], "top_p": 0.95,
                   "temperature": 0.2, "seed": 11, "presence_penalty": 0.1,
                   "frequency_penalty": 0.1, "return_log_probs": True},
        "chat": {"text_input": "Hi!", "apply_chat_template": True, "max_tokens": 4,
                 "min_tokens": 2, "ignore_eos": True, "end_id": 2, "pad_id": 0},
        "bad_missing_text": {"max_tokens": 4},
        "bad_empty": {"text_input": "", "max_tokens": 4},
        "bad_max_tokens": {"text_input": PROMPT, "max_tokens": 100000},
        "bad_top_p": {"text_input": PROMPT, "max_tokens": 4, "top_p": 1.5},
        "bad_beam": {"text_input": PROMPT, "max_tokens": 4, "beam_width": 2},
        "bad_sp_key": {"text_input": PROMPT, "sampling_parameters": sp(max_tokns=3)},
        "bad_sp_json": {"text_input": PROMPT, "sampling_parameters": "{not json"},
        "banned_words": {"text_input": PROMPT, "max_tokens": 4, "bad_words": ["x"]},
        "bad_misspelt": {"text_input": PROMPT, "max_token": 3},
        "bad_unknown": {"text_input": PROMPT, "max_tokens": 3, "frobnicate": 1,
                        "triton_enable_empty_final_response": True},
    }
    seeds = {f"generate_{k}": json.dumps(v).encode() for k, v in generate.items()}
    infer = {
        "tokens": {"model": {"max_batch_size": 8, "decoupled": True}, "inputs": [
            {"name": "input_ids", "datatype": "INT32", "shape": [1, 5], "data": [5, 6, 7, 8, 9]},
            {"name": "input_lengths", "datatype": "INT32", "shape": [1, 1], "data": [5]},
            {"name": "request_output_len", "datatype": "INT32", "shape": [1, 1], "data": [6]},
            {"name": "streaming", "datatype": "BOOL", "shape": [1, 1], "data": [True]},
            {"name": "random_seed", "datatype": "UINT64", "shape": [1, 1], "data": [42]},
            {"name": "runtime_top_k", "datatype": "INT32", "shape": [1, 1], "data": [5]},
            {"name": "runtime_top_p", "datatype": "FP32", "shape": [1, 1], "data": [0.5]},
            {"name": "stop_words_list", "datatype": "INT32", "shape": [1, 2, 3],
             "data": [7, 8, 9, 1, 3, -1]},
            {"name": "bad_words_list", "datatype": "INT32", "shape": [1, 2, 0], "data": []},
            {"name": "end_id", "datatype": "INT32", "shape": [1, 1], "data": [2]},
        ]},
        "bad_no_tokenizer": {"model": {"tokenizer": False}, "text_input": PROMPT},
        "text_unbatched": {"model": {"max_batch_size": 0, "max_model_len": 64}, "inputs": [
            {"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [PROMPT]},
            {"name": "sampling_parameters", "datatype": "BYTES", "shape": [1],
             "data": [sp(max_tokens=5, stop="x")]},
        ], "parameters": {"max_tokens": 4, "temperature": 0.5, "ignore_eos": False}},
        "raw_bytes": {"inputs": [
            {"name": "text_input", "datatype": "BYTES", "shape": [1, 1],
             "raw": "0500000068656c6c6f"},
            {"name": "temperature", "datatype": "FP64", "shape": [1, 1],
             "raw": "000000000000e03f"},
            {"name": "min_length", "datatype": "INT64", "shape": [1, 1], "data": [1]},
        ]},
    }
    seeds.update({f"infer_{k}": json.dumps(v).encode() for k, v in infer.items()})
    return seeds


# ---- dictionaries -------------------------------------------------------------------------------


def literals(path):
    """Every short identifier-like string literal of a Rust source file (tests left out)."""
    code = path.read_text().split("#[cfg(test)]")[0]
    return sorted(set(re.findall(r'"([A-Za-z_][A-Za-z0-9_.:-]{1,40})"', code)))


def write_dict(name, words):
    lines = [f'"{w}"' for w in sorted(set(words))]
    (DICT / f"{name}.dict").write_text("\n".join(lines) + "\n")


def main():
    for target, seeds in [("gguf", gguf_seeds()), ("safetensors", safetensors_seeds()),
                          ("config", config_seeds()), ("request", request_seeds())]:
        out = OUT / target
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for name, data in seeds.items():
            (out / name).write_bytes(data)
        print(f"{target}: {len(seeds)} seeds, {sum(map(len, seeds.values()))} bytes")
    DICT.mkdir(exist_ok=True)
    write_dict("config", literals(REPO / "src" / "config.rs") + literals(REPO / "src" / "engine" / "options.rs"))
    write_dict("request", literals(REPO / "src" / "backend" / "parse" / "fields.rs")
               + ["BYTES", "INT32", "INT64", "UINT64", "FP32", "FP64", "BOOL", "FP16", "BF16",
                  "inputs", "parameters", "datatype", "shape", "data", "raw", "model",
                  "max_batch_size", "decoupled", "tokenizer"])
    gguf_keys = [w for f in sorted((REPO / "src" / "model" / "arch").glob("*.rs"))
                 for w in literals(f)] + literals(REPO / "src" / "tokenizer" / "gguf_vocab.rs")
    write_dict("gguf", gguf_keys + ["GGUF", "general.alignment", "general.architecture"])
    write_dict("safetensors", list(ST_SIZES) + ["__metadata__", "dtype", "shape", "data_offsets"])


if __name__ == "__main__":
    main()
