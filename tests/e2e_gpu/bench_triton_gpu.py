#!/usr/bin/env python3
"""Serving overhead on the GPU: output tokens/s of the engine alone (`ferrum bench`) against the
same engine behind tritonserver (HTTP `generate`, N requests sent at once), same checkpoint,
dtype, lengths, batch sizes and KV capacity, on the same machine in the same run (issue 6's
target: through tritonserver >= 95% of the direct engine's tokens/s).

Random weights cannot be served (`ferrum bench --preset` makes them in memory), so this writes a
random Llama checkpoint (config.json + model.safetensors, bf16) with torch first. Shapes:
`tinyllama` (1.1B: 22 layers, hidden 2048, GQA 32/4 heads; 2.2 GB, default), `llama2-7b`
(13.5 GB: slow to write), or `tiny` (for a dry run on the CPU).

Both sides count the same way: the wall time from submitting N requests of `prompt_len` random
prompt tokens and `gen_len` output tokens (ignore_eos) to the last token, after one warm-up
request; output tokens/s = N * gen_len / that time. `ferrum bench` runs before and after the
server, and the server side twice per batch size (mean reported), so the table shows the
run-to-run noise too.

  bench_triton_gpu.py --tritonserver BIN --backend-dir DIR --ferrum BIN --work DIR \
                      [--shape tinyllama] [--device cuda] [--batch-sizes 1,16,64] [--json FILE]
"""

import argparse
import json
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROUNDS = 2  # Triton runs per batch size (the mean is reported)
SHAPES = {
    # name: (num_layers, hidden, intermediate, num_heads, num_kv_heads, vocab)
    "tiny": (2, 64, 128, 4, 2, 512),
    "tinyllama": (22, 2048, 5632, 32, 4, 32000),
    "llama2-7b": (32, 4096, 11008, 32, 32, 32000),
}


def write_checkpoint(path, shape, max_len):
    """A random Llama checkpoint in bf16 (matrices ~ N(0, 0.02), norms 1)."""
    import torch
    from safetensors.torch import save_file

    num_layers, hidden, inter, num_heads, num_kv_heads, vocab = SHAPES[shape]
    head_dim = hidden // num_heads
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)

    def mat(rows, cols):
        return (torch.randn(rows, cols, generator=gen, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()

    def ones(n):
        return torch.ones(n, dtype=torch.bfloat16)

    tensors = {"model.embed_tokens.weight": mat(vocab, hidden), "model.norm.weight": ones(hidden),
               "lm_head.weight": mat(vocab, hidden)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = ones(hidden)
        tensors[p + "post_attention_layernorm.weight"] = ones(hidden)
        tensors[p + "self_attn.q_proj.weight"] = mat(num_heads * head_dim, hidden)
        tensors[p + "self_attn.k_proj.weight"] = mat(num_kv_heads * head_dim, hidden)
        tensors[p + "self_attn.v_proj.weight"] = mat(num_kv_heads * head_dim, hidden)
        tensors[p + "self_attn.o_proj.weight"] = mat(hidden, num_heads * head_dim)
        tensors[p + "mlp.gate_proj.weight"] = mat(inter, hidden)
        tensors[p + "mlp.up_proj.weight"] = mat(inter, hidden)
        tensors[p + "mlp.down_proj.weight"] = mat(hidden, inter)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads, "vocab_size": vocab, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": max_len, "hidden_act": "silu",
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
    }
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return sum(t.numel() for t in tensors.values()) * 2, vocab


def ferrum_bench(args, model, batch_sizes, kv_tokens):
    cmd = [args.ferrum, "bench", "--model", str(model), "--device", args.device, "--dtype", args.dtype,
           "--prompt-len", str(args.prompt_len), "--gen-len", str(args.gen_len),
           "--batch-size", ",".join(map(str, batch_sizes)), "--max-num-seqs", str(max(batch_sizes)),
           "--max-tokens-in-paged-kv-cache", str(kv_tokens), "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"ferrum bench failed ({res.returncode}): {res.stderr[-2000:]}")
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    return {r["batch_size"]: r for r in rows}


def flat(value):
    """output_ids arrive as nested lists: all ints in order."""
    return [i for v in value for i in flat(v)] if isinstance(value, list) else [value]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"HTTP {e.code}: {e.read().decode(errors='replace')}") from None


def triton_bench(args, model, batch_sizes, kv_tokens, vocab, work):
    repo = work / "repo"
    (repo / "bench" / "1").mkdir(parents=True, exist_ok=True)
    need = args.prompt_len + args.gen_len
    (repo / "bench" / "config.pbtxt").write_text(f"""backend: "ferrum"
max_batch_size: {max(batch_sizes)}
model_transaction_policy {{ decoupled: true }}
parameters [
  {{ key: "model_path", value: {{ string_value: "{model}" }} }},
  {{ key: "device", value: {{ string_value: "{args.device}" }} }},
  {{ key: "dtype", value: {{ string_value: "{args.dtype}" }} }},
  {{ key: "max_num_seqs", value: {{ string_value: "{max(batch_sizes)}" }} }},
  {{ key: "max_model_len", value: {{ string_value: "{need}" }} }},
  {{ key: "max_tokens_in_paged_kv_cache", value: {{ string_value: "{kv_tokens}" }} }},
  {{ key: "exclude_input_in_output", value: {{ string_value: "true" }} }}
]
""")
    http, grpc, metrics = free_port(), free_port(), free_port()
    log_path = Path(args.log)
    log = open(log_path, "w")
    proc = subprocess.Popen([
        args.tritonserver, "--model-repository", str(repo), "--backend-directory", args.backend_dir,
        "--model-control-mode", "explicit", "--load-model", "bench",
        "--http-address", "127.0.0.1", "--http-port", str(http), "--http-thread-count", str(max(8, max(batch_sizes))),
        "--grpc-address", "127.0.0.1", "--grpc-port", str(grpc),
        "--metrics-address", "127.0.0.1", "--metrics-port", str(metrics), "--allow-gpu-metrics", "false",
    ], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http}/v2/models/bench/generate"
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/models/bench/ready", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("tritonserver not ready after 300 s")
            time.sleep(0.5)
        rng = random.Random(7)

        def body(n_prompt, n_gen):
            ids = [rng.randrange(3, vocab) for _ in range(n_prompt)]
            return {"input_ids": ids, "input_lengths": [len(ids)], "request_output_len": n_gen, "ignore_eos": True}

        post(url, body(min(16, args.prompt_len), min(4, args.gen_len)))  # warm-up, as ferrum bench
        results = {}
        for b in batch_sizes:
            runs = []
            for _ in range(ROUNDS):
                bodies = [body(args.prompt_len, args.gen_len) for _ in range(b)]
                with ThreadPoolExecutor(b) as pool:
                    t0 = time.perf_counter()
                    outs = list(pool.map(lambda x: post(url, x), bodies))
                    total_s = time.perf_counter() - t0
                num_tokens = sum(len(flat(o["output_ids"])) for o in outs)
                if num_tokens != b * args.gen_len:
                    raise RuntimeError(f"batch {b}: {num_tokens} output tokens, expected {b * args.gen_len}")
                runs.append(num_tokens / total_s)
            results[b] = {"batch_size": b, "output_tokens_per_s_runs": runs,
                          "output_tokens_per_s": sum(runs) / len(runs)}
        return results
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tritonserver", required=True)
    ap.add_argument("--backend-dir", required=True)
    ap.add_argument("--ferrum", required=True)
    ap.add_argument("--work", required=True, help="scratch folder (the checkpoint goes here)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--batch-sizes", default="1,16,64")
    ap.add_argument("--log", default="tritonserver_bench.log")
    ap.add_argument("--json", help="write the results as JSON here")
    args = ap.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    work = Path(args.work).resolve()
    model = work / f"llama-{args.shape}"
    need = args.prompt_len + args.gen_len
    # As `ferrum bench` sizes it: every request's prompt + output, rounded up a block.
    kv_tokens = max(batch_sizes) * (need + 16)

    t0 = time.time()
    weight_bytes, vocab = write_checkpoint(model, args.shape, need)
    print(f"checkpoint {args.shape}: {weight_bytes / 1e9:.2f} GB bf16 written in {time.time() - t0:.1f} s", flush=True)
    direct1 = ferrum_bench(args, model, batch_sizes, kv_tokens)
    print(f"ferrum bench (before): {json.dumps(direct1)}", flush=True)
    served = triton_bench(args, model, batch_sizes, kv_tokens, vocab, work)
    print(f"tritonserver: {json.dumps(served)}", flush=True)
    direct2 = ferrum_bench(args, model, batch_sizes, kv_tokens)
    print(f"ferrum bench (after): {json.dumps(direct2)}", flush=True)

    device = direct1[batch_sizes[0]]["device"]
    print(f"\n{args.shape} random weights, {args.dtype}, {device}, prompt {args.prompt_len} + gen {args.gen_len}")
    print(f"{'batch':>6} {'direct tok/s':>22} {'triton tok/s':>13} {'triton/direct':>14}")
    rows = []
    for b in batch_sizes:
        d = [direct1[b]["output_tokens_per_s"], direct2[b]["output_tokens_per_s"]]
        t = served[b]["output_tokens_per_s"]
        ratio = t / (sum(d) / 2)
        rows.append({"batch_size": b, "direct_output_tokens_per_s": d, "triton_output_tokens_per_s": t,
                     "triton_over_direct_mean": ratio})
        print(f"{b:>6} {d[0]:>10.1f} / {d[1]:>9.1f} {t:>13.1f} {ratio:>13.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": args.shape, "dtype": args.dtype, "device": device,
                                               "prompt_len": args.prompt_len, "gen_len": args.gen_len,
                                               "weight_bytes": weight_bytes, "rows": rows,
                                               "direct_before": direct1, "direct_after": direct2}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
