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
request; output tokens/s = N * gen_len / that time. The two sides alternate for --rounds rounds
(the server stays up and idle while `ferrum bench` runs); the table gives medians and ranges.

  bench_triton_gpu.py --tritonserver BIN --backend-dir DIR --ferrum BIN --work DIR \
                      [--shape tinyllama] [--device cuda] [--batch-sizes 1,16,64] [--json FILE]
"""

import argparse
import http.client
import json
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import median

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


class Served:
    """tritonserver serving the checkpoint as model `bench`, same limits as `ferrum bench`."""

    def __init__(self, args, model, batch_sizes, kv_tokens, vocab, work):
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
        self.args, self.vocab = args, vocab
        self.rng = random.Random(7)
        http, grpc, metrics = free_port(), free_port(), free_port()
        self.log_path = Path(args.log)
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([
            args.tritonserver, "--model-repository", str(repo), "--backend-directory", args.backend_dir,
            "--model-control-mode", "explicit", "--load-model", "bench",
            # One HTTP thread per request in flight, so the server never queues them.
            "--http-address", "127.0.0.1", "--http-port", str(http),
            "--http-thread-count", str(max(8, max(batch_sizes))),
            "--grpc-address", "127.0.0.1", "--grpc-port", str(grpc),
            "--metrics-address", "127.0.0.1", "--metrics-port", str(metrics), "--allow-gpu-metrics", "false",
        ], stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{http}/v2/models/bench/generate"
        deadline = time.time() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/models/bench/ready", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("tritonserver not ready after 300 s")
            time.sleep(0.5)
        post(self.url, self.body(min(16, args.prompt_len), min(4, args.gen_len)))  # warm-up, as ferrum bench

    def body(self, n_prompt, n_gen):
        ids = [self.rng.randrange(3, self.vocab) for _ in range(n_prompt)]
        return {"input_ids": ids, "input_lengths": [len(ids)], "request_output_len": n_gen, "ignore_eos": True}

    def run(self, b):
        """Output tokens/s of b requests sent at once, each thread opening its connection and
        encoding its body inside the timed interval (a Python client's own cost included)."""
        bodies = [self.body(self.args.prompt_len, self.args.gen_len) for _ in range(b)]
        with ThreadPoolExecutor(b) as pool:
            t0 = time.perf_counter()
            outs = list(pool.map(lambda x: post(self.url, x), bodies))
            total_s = time.perf_counter() - t0
        return self.check(b, outs) / total_s

    def run_preconnected(self, b):
        """Output tokens/s of b requests sent at once over b connections opened, with the bodies
        encoded, before the clock starts (as a load generator with a connection pool sends
        them): one thread writes every request, then b threads read the responses. Also the
        spread of the sends: ms from the start to the last request written."""
        parsed = urllib.parse.urlsplit(self.url)
        bodies = [json.dumps(self.body(self.args.prompt_len, self.args.gen_len)).encode() for _ in range(b)]
        conns = [http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=600) for _ in range(b)]
        for c in conns:
            c.connect()

        def read(c):
            r = c.getresponse()
            raw = r.read()
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {raw.decode(errors='replace')}")
            return json.loads(raw)

        try:
            with ThreadPoolExecutor(b) as pool:
                t0 = time.perf_counter()
                for c, body in zip(conns, bodies):
                    c.request("POST", parsed.path, body=body, headers={"Content-Type": "application/json"})
                sent_ms = (time.perf_counter() - t0) * 1e3
                outs = list(pool.map(read, conns))
                total_s = time.perf_counter() - t0
        finally:
            for c in conns:
                c.close()
        return self.check(b, outs) / total_s, sent_ms

    def check(self, b, outs):
        num_tokens = sum(len(flat(o["output_ids"])) for o in outs)
        if num_tokens != b * self.args.gen_len:
            raise RuntimeError(f"batch {b}: {num_tokens} output tokens, expected {b * self.args.gen_len}")
        return num_tokens

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


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
    ap.add_argument("--rounds", type=int, default=3)
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
    # Rounds alternate the two sides (the server stays up, idle while `ferrum bench` runs), so a
    # drift of the machine hits both alike.
    direct = {b: [] for b in batch_sizes}
    served = {b: [] for b in batch_sizes}
    pooled = {b: [] for b in batch_sizes}
    spread = {b: [] for b in batch_sizes}
    device = None
    server = Served(args, model, batch_sizes, kv_tokens, vocab, work)
    try:
        for r in range(args.rounds):
            d = ferrum_bench(args, model, batch_sizes, kv_tokens)
            device = d[batch_sizes[0]]["device"]
            for b in batch_sizes:
                direct[b].append(d[b]["output_tokens_per_s"])
                served[b].append(server.run(b))
                tok_s, spread_ms = server.run_preconnected(b)
                pooled[b].append(tok_s)
                spread[b].append(spread_ms)
            print(f"round {r}: direct {[round(direct[b][-1], 1) for b in batch_sizes]} "
                  f"triton {[round(served[b][-1], 1) for b in batch_sizes]} "
                  f"triton preconnected {[round(pooled[b][-1], 1) for b in batch_sizes]} output tok/s "
                  f"(sends spread over {[round(spread[b][-1], 1) for b in batch_sizes]} ms)", flush=True)
    finally:
        server.close()

    print(f"\n{args.shape} random weights, {args.dtype}, {device}, prompt {args.prompt_len} + gen {args.gen_len}, "
          f"{args.rounds} rounds: output tok/s median (min-max)")
    print("triton: a connection per request opened by its thread after the clock starts; "
          "preconnected: connections open and bodies encoded before it")
    print(f"{'batch':>6} {'direct':>24} {'triton':>24} {'triton/direct':>14} {'preconnected':>24} {'pre/direct':>11}")
    rows = []
    for b in batch_sizes:
        d, t, p = sorted(direct[b]), sorted(served[b]), sorted(pooled[b])
        ratio = median(t) / median(d)
        ratio_p = median(p) / median(d)
        rows.append({"batch_size": b, "direct_output_tokens_per_s": direct[b],
                     "triton_output_tokens_per_s": served[b], "triton_over_direct_median": ratio,
                     "triton_preconnected_output_tokens_per_s": pooled[b],
                     "triton_preconnected_send_spread_ms": spread[b],
                     "triton_preconnected_over_direct_median": ratio_p})
        print(f"{b:>6} {median(d):>9.1f} ({d[0]:>6.0f}-{d[-1]:>6.0f}) {median(t):>9.1f} ({t[0]:>6.0f}-{t[-1]:>6.0f}) "
              f"{ratio:>13.1%} {median(p):>9.1f} ({p[0]:>6.0f}-{p[-1]:>6.0f}) {ratio_p:>10.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": args.shape, "dtype": args.dtype, "device": device,
                                               "prompt_len": args.prompt_len, "gen_len": args.gen_len,
                                               "weight_bytes": weight_bytes, "rounds": args.rounds,
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
