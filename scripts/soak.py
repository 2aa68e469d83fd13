#!/usr/bin/env python3
"""Soak test: many mixed requests through a real tritonserver serving libtriton_ferrum.so, then
checks that nothing was lost or leaked.

Starts tritonserver (PyPI nvidia-pytriton 0.7.0, Triton 2.51) on free loopback ports with a
temporary model repository of four models, fires --requests requests from --concurrency client
threads, waits for the engines to drain, and checks:

- every request that was not cancelled by its client got exactly one final outcome: an HTTP
  response (200 with text and a finish reason, or the expected 4xx error), an SSE stream ending
  in a final chunk or an error, or a gRPC stream whose responses end in exactly one
  `triton_final_response` (nothing after it);
- every bad input got its error, naming the field;
- after the drain, no request is left in any engine (`nv_trt_llm_request_metrics` active = 0)
  and no KV block is held (`nv_trt_llm_kv_cache_block_metrics` used = 0);
- the server's threads and open file descriptors after the run are those after warm-up (small
  slack for Triton's own pools), and its RSS grew by at most --rss-slack-mib after warm-up;
- the server is still live and ready, and its log holds no panic.

Request mix (seeded, so a run repeats): HTTP generate (text, decoupled and non-decoupled models,
the latter with prefix caching), HTTP generate_stream (SSE; some closed after the first chunk),
gRPC streaming (text, and token ids on tiny GPT-2 / BLOOM checkpoints; some cancelled after the
first response), and bad inputs (missing, out-of-range and misspelt fields, invalid UTF-8, a
prompt over the context) on both protocols.

Usage (from the repository, after `cargo build --release --lib` and ci/fetch_models.sh):
    .venv/bin/python scripts/soak.py --requests 10000 --concurrency 16 --json soak.json
ci/test.sh runs a short version (--requests 600). Exit status 0 when every check passes.
Loopback only; the server and its temporary repository are removed at the end.
"""

import argparse
import json
import os
import queue
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import requests
import tritonclient.grpc as grpcclient

REPO = Path(__file__).resolve().parents[1]
GGUF = Path(os.environ.get("FERRUM_SMOLLM2_GGUF", REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
FIXTURES = REPO / "tests" / "fixtures" / "models"
KV_FAMILY = "nv_trt_llm_kv_cache_block_metrics"
REQ_FAMILY = "nv_trt_llm_request_metrics"
TEXT_MODEL = "smollm2"  # decoupled, tensorrtllm shapes
TEXT_MODEL_NB = "smollm2_nb"  # not decoupled, vLLM shapes, prefix caching
# Served name -> tiny fixture checkpoint (token ids only: the fixtures have no tokenizer).
TOKEN_MODELS = {"gpt2_tiny": "gpt2", "bloom_tiny": "bloom"}
WORDS = "the of and a to in is you that it he was for on are as with his they at be this have from".split()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tritonserver():
    env = os.environ.get("TRITONSERVER")
    if env:
        return env
    import pytriton

    return str(Path(pytriton.__file__).parent / "tritonserver" / "bin" / "tritonserver")


def write_repo(root: Path) -> list:
    def model(name, text):
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(text)

    common = """  {{ key: "model_path", value: {{ string_value: "{path}" }} }},
  {{ key: "device", value: {{ string_value: "cpu" }} }},
  {{ key: "max_num_seqs", value: {{ string_value: "32" }} }},
  {{ key: "max_tokens_in_paged_kv_cache", value: {{ string_value: "{kv}" }} }},
  {{ key: "max_model_len", value: {{ string_value: "2048" }} }},
  {{ key: "exclude_input_in_output", value: {{ string_value: "true" }} }}"""
    model(TEXT_MODEL, f"""backend: "ferrum"
max_batch_size: 64
model_transaction_policy {{ decoupled: true }}
parameters [
{common.format(path=GGUF, kv=4096)}
]
""")
    model(TEXT_MODEL_NB, f"""backend: "ferrum"
max_batch_size: 0
parameters [
{common.format(path=GGUF, kv=4096)},
  {{ key: "enable_kv_cache_reuse", value: {{ string_value: "true" }} }}
]
""")
    for name, fixture in TOKEN_MODELS.items():
        model(name, f"""backend: "ferrum"
max_batch_size: 64
model_transaction_policy {{ decoupled: true }}
parameters [
{common.format(path=FIXTURES / fixture, kv=4096)},
  {{ key: "weight_format", value: {{ string_value: "f32" }} }}
]
""")
    return [TEXT_MODEL, TEXT_MODEL_NB, *TOKEN_MODELS]


class Server:
    def __init__(self, root: Path, models: list):
        lib = Path(os.environ.get("FERRUM_BACKEND_LIB", REPO / "target" / "release" / "libtriton_ferrum.so"))
        if not lib.exists():
            sys.exit(f"{lib} is missing: cargo build --release --lib")
        if not GGUF.exists():
            sys.exit(f"{GGUF} is missing: ci/fetch_models.sh")
        (root / "backends" / "ferrum").mkdir(parents=True)
        shutil.copy(lib, root / "backends" / "ferrum" / "libtriton_ferrum.so")
        self.models = models
        self.http, self.grpc, self.metrics_port = free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http}"
        self.grpc_url = f"127.0.0.1:{self.grpc}"
        self.log_path = root / "tritonserver.log"
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [
                tritonserver(),
                "--model-repository", str(root / "models"),
                "--backend-directory", str(root / "backends"),
                "--http-address", "127.0.0.1", "--http-port", str(self.http),
                "--grpc-address", "127.0.0.1", "--grpc-port", str(self.grpc),
                "--metrics-address", "127.0.0.1", "--metrics-port", str(self.metrics_port),
                "--allow-gpu-metrics", "false",
            ],
            stdout=self.log_file, stderr=subprocess.STDOUT, cwd=root,
            env={**os.environ, "MALLOC_ARENA_MAX": "2"},
        )
        deadline = time.time() + 300
        while not self.ready():
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                errors = [l for l in self.log().splitlines() if re.search(r"fail|error", l, re.I)]
                sys.exit("tritonserver did not start:\n" + "\n".join(errors[-20:]))
            time.sleep(0.5)

    def ready(self) -> bool:
        try:
            ok = requests.get(f"{self.url}/v2/health/live", timeout=5).status_code == 200
            for m in self.models:
                ok = ok and requests.get(f"{self.url}/v2/models/{m}/ready", timeout=5).status_code == 200
            return ok
        except requests.RequestException:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def proc_stats(self) -> dict:
        pid = self.proc.pid
        status = Path(f"/proc/{pid}/status").read_text()
        return {
            "threads": len(os.listdir(f"/proc/{pid}/task")),
            "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "rss_mib": int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024,
        }

    def metric(self, family: str, model: str, **labels) -> float:
        want = {"model": model, "version": "1", **labels}
        text = requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30).text
        for line in text.splitlines():
            m = re.match(r"^(\w+)\{([^}]*)\}\s+(\S+)$", line)
            if m and m.group(1) == family and dict(re.findall(r'(\w+)="([^"]*)"', m.group(2))) == want:
                return float(m.group(3))
        return float("nan")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log_file.close()


# ---- request kinds: each returns an outcome string; "ok..." or "expected_error" pass -------------


def prompt_text(rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))


def http_generate(srv, rng):
    model = rng.choice([TEXT_MODEL, TEXT_MODEL_NB])
    n = rng.randint(1, 12)
    r = requests.post(f"{srv.url}/v2/models/{model}/generate",
                      json={"text_input": prompt_text(rng), "max_tokens": n}, timeout=600)
    if r.status_code != 200:
        return f"http_generate: status {r.status_code}: {r.text[:200]}"
    out = r.json()
    if out.get("num_output_tokens", n) > n or "finish_reason" not in out or "text_output" not in out:
        return f"http_generate: bad response {out}"
    return "ok"


def http_stream(srv, rng, cancel):
    n = rng.randint(2, 16)
    r = requests.post(f"{srv.url}/v2/models/{TEXT_MODEL}/generate_stream",
                      json={"text_input": prompt_text(rng), "max_tokens": n, "stream": True},
                      stream=True, timeout=600)
    if r.status_code != 200:
        return f"http_stream: status {r.status_code}"
    chunks, finals = [], 0
    for line in r.iter_lines(decode_unicode=True):
        if not (line and line.startswith("data:")):
            continue
        c = json.loads(line[len("data:"):])
        chunks.append(c)
        if "error" in c:
            r.close()
            return f"http_stream: error chunk {c}"
        if "finish_reason" in c:
            finals += 1
        if cancel:
            r.close()  # the client goes away mid-stream: the server must abort the request
            return "ok_cancelled"
    if finals != 1 or "finish_reason" not in chunks[-1]:
        return f"http_stream: {finals} final chunks in {len(chunks)}"
    return "ok"


def vocab_size(fixture):
    return json.loads((FIXTURES / fixture / "config.json").read_text())["vocab_size"]


def grpc_inputs(tensors, batched):
    out = []
    for name, (dtype, value) in tensors.items():
        arr = np.array(value, dtype=np.object_ if dtype == "BYTES" else dtype)
        if batched:
            arr = arr.reshape((1,) + arr.shape)
        inp = grpcclient.InferInput(name, list(arr.shape),
                                    "BYTES" if dtype == "BYTES" else grpcclient.np_to_triton_dtype(arr.dtype))
        inp.set_data_from_numpy(arr)
        out.append(inp)
    return out


def grpc_stream(srv, model, inputs, cancel, expect_error=None):
    """One request on its own gRPC stream: exactly one final response, nothing after it."""
    responses = queue.Queue()
    client = grpcclient.InferenceServerClient(srv.grpc_url)
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer(model, inputs, enable_empty_final_response=True)
        while True:
            result, error = responses.get(timeout=600)
            if error is not None:
                if expect_error and all(n in str(error) for n in expect_error):
                    return "expected_error"
                return f"grpc {model}: error {error}"
            if expect_error:
                return f"grpc {model}: no error, expected {expect_error}"
            if cancel:
                client.stop_stream(cancel_requests=True)
                return "ok_cancelled"
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                break
        client.stop_stream()  # waits for the stream to end: anything after the final is queued
        if not responses.empty():
            return f"grpc {model}: {responses.qsize()} responses after the final one"
        return "ok"
    finally:
        client.close()


def grpc_text(srv, rng, cancel):
    inputs = grpc_inputs({"text_input": ("BYTES", [prompt_text(rng)]),
                          "max_tokens": ("int32", [rng.randint(2, 12)]),
                          "stream": ("bool", [True])}, batched=True)
    return grpc_stream(srv, TEXT_MODEL, inputs, cancel)


def grpc_tokens(srv, rng, cancel):
    model = rng.choice(sorted(TOKEN_MODELS))
    vocab = vocab_size(TOKEN_MODELS[model])
    ids = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 48))]
    inputs = grpc_inputs({"input_ids": ("int32", ids), "input_lengths": ("int32", [len(ids)]),
                          "request_output_len": ("int32", [rng.randint(1, 24)]),
                          "streaming": ("bool", [True])}, batched=True)
    return grpc_stream(srv, model, inputs, cancel)


# (body, needles): each must get a 400 naming the field.
BAD_HTTP = [
    ({"max_tokens": 4}, ["text_input"]),
    ({"text_input": "", "max_tokens": 4}, ["empty"]),
    ({"text_input": "hi", "max_tokens": 0}, ["max_tokens", "0"]),
    ({"text_input": "hi", "max_tokens": -5}, ["max_tokens", "-5"]),
    ({"text_input": "hi", "max_tokens": 100000}, ["max_tokens", "100000"]),
    ({"text_input": "hi", "max_tokens": 4, "top_p": 1.5}, ["top_p", "1.5"]),
    ({"text_input": "hi", "max_tokens": 4, "temperature": -1}, ["temperature", "-1"]),
    ({"text_input": "hi", "sampling_parameters": "{not json"}, ["sampling_parameters"]),
    ({"text_input": "hello " * 9000, "max_tokens": 4}, ["prompt", "context"]),
    ({"text_input": "hi", "max_token": 3}, ["max_token", "max_tokens"]),
]


def bad_input(srv, rng):
    if rng.random() < 0.7:
        body, needles = rng.choice(BAD_HTTP)
        model = rng.choice([TEXT_MODEL, TEXT_MODEL_NB])
        r = requests.post(f"{srv.url}/v2/models/{model}/generate", json=body, timeout=600)
        err = r.json().get("error", "") if r.headers.get("content-type", "").startswith("application/json") else r.text
        if r.status_code == 400 and all(n in err for n in needles):
            return "expected_error"
        return f"bad_http {body}: status {r.status_code}: {err[:200]}"
    # gRPC: invalid UTF-8, or token ids outside the vocabulary.
    if rng.random() < 0.5:
        inputs = grpc_inputs({"text_input": ("BYTES", [b"\xff\xfe bad"])}, batched=True)
        return grpc_stream(srv, TEXT_MODEL, inputs, False, expect_error=["text_input", "UTF-8"])
    model = rng.choice(sorted(TOKEN_MODELS))
    inputs = grpc_inputs({"input_ids": ("int32", [1, 2, 10**6]), "input_lengths": ("int32", [3]),
                          "request_output_len": ("int32", [4])}, batched=True)
    return grpc_stream(srv, model, inputs, False, expect_error=["1000000"])


KINDS = [  # (name, weight)
    ("http_generate", 25),
    ("http_stream", 20),
    ("grpc_text", 15),
    ("grpc_tokens", 25),
    ("bad_input", 15),
]


def one_request(srv, seed, cancel_rate):
    rng = random.Random(seed)
    kind = rng.choices([k for k, _ in KINDS], weights=[w for _, w in KINDS])[0]
    cancel = rng.random() < cancel_rate
    try:
        if kind == "http_generate":
            outcome = http_generate(srv, rng)
        elif kind == "http_stream":
            outcome = http_stream(srv, rng, cancel)
        elif kind == "grpc_text":
            outcome = grpc_text(srv, rng, cancel)
        elif kind == "grpc_tokens":
            outcome = grpc_tokens(srv, rng, cancel)
        else:
            outcome = bad_input(srv, rng)
    except Exception as e:  # a lost request (timeout) or a broken connection is a failure
        outcome = f"{kind}: exception {type(e).__name__}: {e}"
    return kind, outcome


def fill_kv(srv):
    """Touches every KV block of the text models once (the CPU engine's cache pages count in RSS
    from first use): max_num_seqs requests at once whose prompts and outputs fill the cache."""
    def one(model, i):
        words = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(110))
        requests.post(f"{srv.url}/v2/models/{model}/generate",
                      json={"text_input": words, "max_tokens": 16}, timeout=600)

    for model in (TEXT_MODEL, TEXT_MODEL_NB):
        threads = [threading.Thread(target=one, args=(model, i)) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def drain(srv, models, timeout=120):
    """Waits until no request is active in any engine; returns the final metric values."""
    deadline = time.time() + timeout
    while True:
        state = {m: {"active": srv.metric(REQ_FAMILY, m, request_type="active"),
                     "kv_used": srv.metric(KV_FAMILY, m, kv_cache_block_type="used")} for m in models}
        if all(s["active"] == 0 and s["kv_used"] == 0 for s in state.values()) or time.time() > deadline:
            return state
        time.sleep(0.5)


def run(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="ferrum-soak-"))
    models = write_repo(tmp / "models")
    srv = Server(tmp, models)
    try:
        fill_kv(srv)
        t0 = time.time()
        # Warm-up: every KV block and step buffer touched once (their pages count in RSS from
        # first use), the prefix cache filled; the process is measured after it, mid-run and at
        # the end.
        warm = max(args.concurrency * 8, args.requests // 5)
        mid = max(warm + 1, args.requests * 3 // 5)
        counts, failures = Counter(), []
        lock = threading.Lock()
        next_seed = iter(range(args.seed, args.seed + args.requests))
        measured = {}

        def worker():
            while True:
                with lock:
                    seed = next(next_seed, None)
                if seed is None:
                    return
                kind, outcome = one_request(srv, seed, args.cancel_rate)
                passed = outcome in ("ok", "ok_cancelled", "expected_error")
                with lock:
                    counts[(kind, outcome if passed else "FAILED")] += 1
                    if not passed:
                        failures.append(f"seed {seed}: {outcome}")
                    done = sum(counts.values())
                    if done == warm:
                        measured["after_warm_up"] = srv.proc_stats()
                    if done == mid:
                        measured["mid_run"] = srv.proc_stats()

        threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.time() - t0
        state = drain(srv, models)
        time.sleep(2)  # let Triton close the finished connections
        measured.setdefault("after_warm_up", srv.proc_stats())
        measured["end"] = srv.proc_stats()
        checks = {}
        checks["every request answered once"] = not failures
        checks["no request left in an engine"] = all(s["active"] == 0 for s in state.values())
        checks["no KV block held"] = all(s["kv_used"] == 0 for s in state.values())
        a, b = measured["after_warm_up"], measured["end"]
        checks["threads stable"] = b["threads"] <= a["threads"] + args.thread_slack
        checks["fds stable"] = b["fds"] <= a["fds"] + args.fd_slack
        checks["rss flat"] = b["rss_mib"] <= a["rss_mib"] + args.rss_slack_mib and b[
            "rss_mib"
        ] <= measured.get("mid_run", a)["rss_mib"] + args.rss_slack_mib / 2
        checks["server live and ready"] = srv.ready()
        checks["no panic in the log"] = "panic" not in srv.log().lower()
        return {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "seconds": round(elapsed, 1),
            "requests_per_s": round(args.requests / elapsed, 1),
            "outcomes": {f"{k}/{o}": n for (k, o), n in sorted(counts.items())},
            "engines_after_drain": state,
            "process": measured,
            "checks": checks,
            "failures": failures[:20],
            "num_failures": len(failures),
            "passed": all(checks.values()),
        }
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=10000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--cancel-rate", type=float, default=0.2,
                   help="fraction of streaming requests cancelled by their client mid-stream")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--thread-slack", type=int, default=4)
    p.add_argument("--fd-slack", type=int, default=16)
    p.add_argument("--rss-slack-mib", type=float, default=64.0)
    p.add_argument("--json", type=Path, help="also write the summary here")
    args = p.parse_args()
    summary = run(args)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    failed = [k for k, ok in summary["checks"].items() if not ok]
    print(f"soak: {'passed' if not failed else 'FAILED: ' + ', '.join(failed)}", file=sys.stderr)
    sys.exit(0 if not failed else 1)


if __name__ == "__main__":
    main()
