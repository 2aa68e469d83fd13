#!/usr/bin/env python3
"""Triton end-to-end smoke test of libtriton_ferrum.so on a GPU (issue 6), standard library only.

Starts a real tritonserver with the ferrum backend on a model repository whose models are tiny
random checkpoints of tests/fixtures/models (written by ci/gpu_triton.sh), then checks:

- every model loads, and its load log line says it runs on the expected device
  (`ferrum: model 'M' ready on cuda:0 (NVIDIA H100 ..., sm_90, f32)`);
- the greedy tokens of every golden prompt (tests/fixtures/golden/<fixture>.json, computed by
  Hugging Face transformers in float32), sent as `input_ids` to `/v2/models/M/generate`:
  float32 models must give exactly `greedy_ids`; bfloat16/float16 models must agree up to a
  first divergence, where our token must be in transformers' top-5 at that step (STYLE.md 14);
- a streaming request to `/v2/models/M/generate_stream` gives the same tokens, one or more per
  event;
- all golden prompts of all models, several copies each, sent at once give the same tokens as
  when sent alone (batch invariance under in-flight batching);
- unloading and reloading a model works and it serves the same tokens afterwards;
- the metrics endpoint exports the `nv_trt_llm_kv_cache_block_metrics` gauges of every model
  (max > 0, tokens_per > 0, used + free == max when idle).

Prints one line per check and a summary; exits 1 if any check failed (2 on a usage error).

  smoke_triton.py --tritonserver BIN --backend-dir DIR --model-repository DIR \
                  --fixtures tests/fixtures --expect-device cuda [--log FILE] [--json FILE]
"""

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

KV_FAMILY = "nv_trt_llm_kv_cache_block_metrics"
COPIES_PER_CASE = 4  # concurrent copies of every golden case in the batch-invariance check


class Checks:
    """Collects named pass/fail results and prints each as it is recorded."""

    def __init__(self):
        self.results = []

    def record(self, name, ok, detail=""):
        self.results.append({"check": name, "ok": bool(ok), "detail": detail})
        print(f"{'PASS' if ok else 'FAIL'}  {name}{'  ' + detail if detail else ''}", flush=True)
        return ok

    def run(self, name, fn):
        """Runs fn() -> detail string; an exception is a failure with its message."""
        try:
            return self.record(name, True, fn() or "")
        except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the run
            return self.record(name, False, f"{type(e).__name__}: {e}")

    @property
    def failed(self):
        return [r for r in self.results if not r["ok"]]


# ---- the model repository -------------------------------------------------------------------


def param(config, key):
    m = re.search(r'key:\s*"%s"\s*,\s*value:\s*\{\s*string_value:\s*"([^"]*)"' % re.escape(key), config)
    return m.group(1) if m else None


def read_models(repo, fixtures):
    """{model name: {fixture, device, dtype, golden}} for every ferrum model of the repository."""
    models = {}
    for cfg in sorted(Path(repo).glob("*/config.pbtxt")):
        text = cfg.read_text()
        if not re.search(r'backend:\s*"ferrum"', text):
            continue
        model_path = param(text, "model_path")
        if model_path is None:
            raise SystemExit(f"{cfg}: no model_path parameter")
        fixture = Path(model_path).name
        golden = Path(fixtures) / "golden" / f"{fixture}.json"
        if not golden.exists():
            raise SystemExit(f"{cfg}: no golden file {golden} for fixture '{fixture}'")
        models[cfg.parent.name] = {
            "fixture": fixture,
            "device": param(text, "device") or "auto",
            "dtype": param(text, "dtype") or "auto",
            "golden": json.loads(golden.read_text()),
        }
    if not models:
        raise SystemExit(f"no ferrum model in {repo}")
    return models


# ---- HTTP ----------------------------------------------------------------------------------


class Client:
    def __init__(self, http_port, metrics_port):
        self.url = f"http://127.0.0.1:{http_port}"
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"

    def _post(self, path, body, timeout=300):
        req = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        return urllib.request.urlopen(req, timeout=timeout)

    def status(self, path):
        try:
            return urllib.request.urlopen(self.url + path, timeout=5).status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return None

    def generate(self, model, body):
        try:
            with self._post(f"/v2/models/{model}/generate", body) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"generate {model}: HTTP {e.code}: {e.read().decode(errors='replace')}") from None

    def generate_stream(self, model, body):
        """The parsed `data:` events of one server-sent-events response."""
        events = []
        try:
            with self._post(f"/v2/models/{model}/generate_stream", body) as r:
                for raw in r:
                    line = raw.decode().strip()
                    if line.startswith("data:"):
                        events.append(json.loads(line[len("data:"):]))
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"generate_stream {model}: HTTP {e.code}: {e.read().decode(errors='replace')}") from None
        return events

    def repository(self, model, action):
        try:
            with self._post(f"/v2/repository/models/{model}/{action}", {}) as r:
                return r.status
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{action} {model}: HTTP {e.code}: {e.read().decode(errors='replace')}") from None

    def metrics(self):
        with urllib.request.urlopen(self.metrics_url, timeout=30) as r:
            return r.read().decode()


def flat_ints(value):
    """output_ids arrive as nested lists ([batch, beam, tokens] or flattened): all ints in order."""
    if isinstance(value, list):
        return [i for v in value for i in flat_ints(v)]
    return [int(value)]


def token_body(case, **extra):
    ids = case["prompt_ids"]
    return {
        "input_ids": ids,
        "input_lengths": [len(ids)],
        "request_output_len": len(case["greedy_ids"]),
        "ignore_eos": True,
        **extra,
    }


def generate_ids(client, model, case):
    out = client.generate(model, token_body(case))
    if "error" in out:
        raise RuntimeError(f"{model}: {out['error']}")
    return flat_ints(out["output_ids"])


def compare(got, case, exact):
    """None when `got` agrees with the golden case, else a message. exact: token equality;
    otherwise equal up to a first divergence where our token is in transformers' top-5."""
    want = case["greedy_ids"]
    if len(got) != len(want):
        return f"{len(got)} tokens, expected {len(want)}: {got}"
    for step, (g, w) in enumerate(zip(got, want)):
        if g == w:
            continue
        if exact:
            return f"step {step}: token {g}, expected {w} (got {got}, expected {want})"
        top5 = [t for t, _ in case["top5"][step]]
        if g in top5:
            return None
        return f"step {step}: token {g} not in transformers' top-5 {top5}"
    return None


def exact_dtype(dtype):
    return dtype in ("float32", "f32")


# ---- metrics -------------------------------------------------------------------------------


def metric_series(text, family):
    """{frozenset(labels): value} of one family in Prometheus text format."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+)\{([^}]*)\}\s+(\S+)$", line)
        if m and m.group(1) == family:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            out[frozenset(labels.items())] = float(m.group(3))
    return out


def kv_gauges(text, model):
    """{kv_cache_block_type: value} of one model's KV gauges."""
    gauges = {}
    for key, value in metric_series(text, KV_FAMILY).items():
        labels = dict(key)
        if labels.get("model") == model:
            gauges[labels.get("kv_cache_block_type")] = value
    return gauges


# ---- the server ----------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, models, log_path):
    http, grpc, metrics = free_port(), free_port(), free_port()
    cmd = [
        args.tritonserver,
        "--model-repository", str(Path(args.model_repository).resolve()),
        "--backend-directory", str(Path(args.backend_dir).resolve()),
        "--model-control-mode", "explicit",
        *[a for m in models for a in ("--load-model", m)],
        "--http-address", "127.0.0.1", "--http-port", str(http),
        "--grpc-address", "127.0.0.1", "--grpc-port", str(grpc),
        "--metrics-address", "127.0.0.1", "--metrics-port", str(metrics),
        "--allow-gpu-metrics", "false",
    ]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    return proc, log, Client(http, metrics)


def wait_ready(proc, client, models, timeout_s):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tritonserver exited with {proc.returncode} during start-up")
        if client.status("/v2/health/live") == 200 and all(
            client.status(f"/v2/models/{m}/ready") == 200 for m in models
        ):
            return
        time.sleep(0.5)
    not_ready = [m for m in models if client.status(f"/v2/models/{m}/ready") != 200]
    raise RuntimeError(f"not ready after {timeout_s} s: {not_ready}")


def ready_line(log_text, model):
    """The backend's load line of `model` (the last one, after a reload), or None."""
    lines = [l for l in log_text.splitlines() if f"ferrum: model '{model}' ready on " in l]
    return lines[-1] if lines else None


def device_of(line, model):
    m = re.search(r"ferrum: model '%s' ready on (\S+)" % re.escape(model), line)
    return m.group(1) if m else None


# ---- checks --------------------------------------------------------------------------------


def run_checks(args, checks, models, proc, client, log_path):
    start = time.time()
    if not checks.run("server ready", lambda: wait_ready(proc, client, models, args.ready_timeout)
                      or f"{len(models)} models in {time.time() - start:.1f} s"):
        return

    log_text = Path(log_path).read_text(errors="replace")
    for m, info in models.items():
        def on_device(m=m):
            line = ready_line(log_text, m)
            if line is None:
                raise RuntimeError("no 'ready on' line in the log")
            device = device_of(line, m)
            want = "cuda:" if args.expect_device == "cuda" else "cpu"
            if not device.startswith(want):
                raise RuntimeError(f"runs on '{device}', expected {args.expect_device}: {line.strip()}")
            return line[line.index("ferrum:"):].strip().rstrip('"')
        checks.run(f"{m}: device ({info['device']}, dtype {info['dtype']})", on_device)

    solo = {}  # (model, case index) -> tokens of a lone request
    for m, info in models.items():
        exact = exact_dtype(info["dtype"]) or args.expect_device == "cpu"
        cases = info["golden"]["cases"]

        def golden(m=m, cases=cases, exact=exact):
            mismatches = []
            for idx, case in enumerate(cases):
                got = generate_ids(client, m, case)
                solo[(m, idx)] = got
                msg = compare(got, case, exact)
                if msg:
                    mismatches.append(f"case {idx}: {msg}")
            if mismatches:
                raise RuntimeError("; ".join(mismatches))
            num_equal = sum(solo[(m, idx)] == case["greedy_ids"] for idx, case in enumerate(cases))
            how = "exact" if exact else f"top-5 rule, {num_equal}/{len(cases)} equal"
            return f"{len(cases)} prompts x {len(cases[0]['greedy_ids'])} tokens, {how}"
        checks.run(f"{m}: generate greedy == transformers ({info['fixture']})", golden)

        def stream(m=m, case=cases[-1]):
            events = client.generate_stream(m, token_body(case, streaming=True))
            errors = [e for e in events if "error" in e]
            if errors:
                raise RuntimeError(str(errors[0]))
            got = [t for e in events for t in flat_ints(e.get("output_ids", []))]
            want = solo.get((m, len(cases) - 1))
            if got != want:
                raise RuntimeError(f"streamed {got}, generate gave {want}")
            if len(events) < 2:
                raise RuntimeError(f"only {len(events)} event(s): not streamed")
            return f"{len(events)} events, {len(got)} tokens"
        checks.run(f"{m}: generate_stream == generate", stream)

    def concurrent():
        jobs = [(m, idx, case) for m, info in models.items()
                for idx, case in enumerate(info["golden"]["cases"]) for _ in range(COPIES_PER_CASE)]
        t0 = time.time()
        with ThreadPoolExecutor(len(jobs)) as pool:
            outs = list(pool.map(lambda j: generate_ids(client, j[0], j[2]), jobs))
        elapsed = time.time() - t0
        bad = [f"{m} case {idx}: {got} != solo {solo.get((m, idx))}"
               for (m, idx, _), got in zip(jobs, outs) if got != solo.get((m, idx))]
        if bad:
            raise RuntimeError(f"{len(bad)}/{len(jobs)} differ: " + "; ".join(bad[:4]))
        num_tokens = sum(len(o) for o in outs)
        return f"{len(jobs)} concurrent requests identical to solo ({num_tokens} tokens in {elapsed:.2f} s)"
    checks.run("concurrent requests == solo (batch invariance)", concurrent)

    reload_model = next(iter(models))

    def reload():
        client.repository(reload_model, "unload")
        deadline = time.time() + 60
        while client.status(f"/v2/models/{reload_model}/ready") == 200 and time.time() < deadline:
            time.sleep(0.2)
        if client.status(f"/v2/models/{reload_model}/ready") == 200:
            raise RuntimeError("still ready 60 s after unload")
        client.repository(reload_model, "load")
        if client.status(f"/v2/models/{reload_model}/ready") != 200:
            raise RuntimeError("not ready after load")
        case = models[reload_model]["golden"]["cases"][0]
        got = generate_ids(client, reload_model, case)
        if got != solo.get((reload_model, 0)):
            raise RuntimeError(f"after reload {got}, before {solo.get((reload_model, 0))}")
        line = ready_line(Path(log_path).read_text(errors="replace"), reload_model)
        return f"{reload_model} reloaded on {device_of(line, reload_model) if line else '?'}, same tokens"
    checks.run("unload + load", reload)

    def metrics():
        # The gauges are refreshed every 100 ms: let the last requests' blocks drain.
        deadline = time.time() + 5
        while True:
            text = client.metrics()
            gauges = {m: kv_gauges(text, m) for m in models}
            problems = []
            for m, g in gauges.items():
                missing = {"max", "used", "free", "tokens_per"} - set(g)
                if missing:
                    problems.append(f"{m}: no {sorted(missing)} series")
                elif not (g["max"] > 0 and g["tokens_per"] > 0 and g["used"] + g["free"] == g["max"]
                          and g["used"] == 0):
                    problems.append(f"{m}: {g}")
            if not problems:
                return "; ".join(f"{m} {int(g['max'])} blocks x {int(g['tokens_per'])} tokens"
                                 for m, g in gauges.items())
            if time.time() > deadline:
                raise RuntimeError("; ".join(problems))
            time.sleep(0.2)
    checks.run(f"metrics: {KV_FAMILY}", metrics)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tritonserver", required=True)
    ap.add_argument("--backend-dir", required=True, help="folder holding ferrum/libtriton_ferrum.so")
    ap.add_argument("--model-repository", required=True)
    ap.add_argument("--fixtures", required=True, help="tests/fixtures (golden/*.json)")
    ap.add_argument("--expect-device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--ready-timeout", type=float, default=300)
    ap.add_argument("--log", default="tritonserver.log", help="where the server log goes")
    ap.add_argument("--json", help="write the results as JSON here")
    args = ap.parse_args()

    models = read_models(args.model_repository, args.fixtures)
    checks = Checks()
    proc, log, client = start_server(args, models, args.log)
    try:
        run_checks(args, checks, models, proc, client, args.log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    if proc.returncode not in (0, -15):
        checks.record("server shut down cleanly", False, f"exit status {proc.returncode}")

    failed = checks.failed
    print(f"\n== triton smoke ({args.expect_device}): {len(checks.results) - len(failed)}/{len(checks.results)} "
          f"checks passed{'' if not failed else ', FAILED: ' + ', '.join(r['check'] for r in failed)}")
    if failed:
        print(f"-- last lines of {args.log}:")
        print("\n".join(Path(args.log).read_text(errors="replace").splitlines()[-40:]))
    if args.json:
        Path(args.json).write_text(json.dumps({"expect_device": args.expect_device, "checks": checks.results}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
