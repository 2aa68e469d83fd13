"""End-to-end fixtures: one real tritonserver (PyPI nvidia-pytriton 0.7.0 = Triton 2.51) serving
libtriton_ferrum.so on free loopback ports, with a temporary model repository:

- ``smollm2``: the shipped model_repository/smollm2 config (decoupled, max_batch_size 64 =
  tensorrtllm_backend's batched tensor shapes), with ``model_path`` made absolute;
- ``smollm2_nb``: non-decoupled, max_batch_size 0 (vLLM backend shapes), with prefix caching
  (``enable_kv_cache_reuse``) on, so its answers are checked against ``smollm2``'s (off);
- ``bad_missing`` / ``bad_corrupt``: model folders with a missing / corrupt weight file (not loaded
  at startup; tests load them and expect a clear failure);
- ``smollm2_busy``: decoupled, 2 seats (``max_num_seqs``) and 2 places behind them
  (``max_queue_size``), and ``smollm2_busy_nb``: not decoupled, one seat and no place behind it,
  for the overload tests (not loaded at startup: test_overload.py loads and unloads them).

The server runs with ``--model-control-mode=explicit`` so tests can unload and reload models.

``contracts_server`` (started only by tests/e2e/test_openai_contracts.py) serves SmolLM2 three
times, once per request contract, each with the default ``exclude_input_in_output``:

- ``trtllm``: decoupled, max_batch_size 64 (the shapes of the OpenAI frontend's TensorRT-LLM
  requests);
- ``vllm``: decoupled, max_batch_size 0 (the vLLM backend's shapes);
- ``llmapi``: the shipped model_repository/smollm2-llmapi config (TensorRT-LLM's llmapi tensors,
  declared in the config).

``panic_server`` is a second server (started only by the tests that ask for it) serving the
shipped ``smollm2`` config with ``FERRUM_INJECT_PANIC_TOKEN=PANIC_TOKEN``: its engine panics in
the step that schedules a prompt holding that token id.

Env: TRITONSERVER (binary), FERRUM_BACKEND_LIB (default target/release/libtriton_ferrum.so),
FERRUM_CLI (default target/release/ferrum), FERRUM_SMOLLM2_GGUF (default models/...gguf).
"""

import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf() -> Path:
    p = Path(os.environ.get("FERRUM_SMOLLM2_GGUF", REPO / "models" / GGUF_NAME))
    if not p.exists():
        pytest.fail(f"{p} is missing: run ci/fetch_models.sh (or set FERRUM_SMOLLM2_GGUF)")
    return p.resolve()


def _tritonserver() -> str:
    env = os.environ.get("TRITONSERVER")
    if env:
        return env
    try:
        import pytriton  # noqa: F401

        p = Path(pytriton.__file__).parent / "tritonserver" / "bin" / "tritonserver"
        if p.exists():
            return str(p)
    except ImportError:
        pass
    pytest.fail("tritonserver not found: install nvidia-pytriton==0.7.0 (ci/serve.sh does) or set TRITONSERVER")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Served model name -> tiny fixture checkpoint of that architecture (golden/<fixture>.json).
TINY_ARCH_MODELS = {"gpt2_tiny": "gpt2", "falcon_tiny": "falcon_new", "bloom_tiny": "bloom"}


def _write_model(repo: Path, name: str, config: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(config)


class Server:
    def __init__(self, proc, http_port, grpc_port, metrics_port, log_path, repo, ready_models):
        self.proc = proc
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.metrics_port = metrics_port
        self.url = f"http://127.0.0.1:{http_port}"
        self.grpc_url = f"127.0.0.1:{grpc_port}"
        self.log_path = log_path
        self.repo = repo
        self.ready_models = ready_models

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def healthy(self) -> bool:
        """Live, and every model of `ready_models` ready. (`/v2/health/ready` is not used: with
        strict readiness a failed load of a broken test model makes the whole server "not
        ready".)"""
        try:
            ok = requests.get(f"{self.url}/v2/health/live", timeout=5).status_code == 200
            for m in self.ready_models:
                ok = ok and requests.get(f"{self.url}/v2/models/{m}/ready", timeout=5).status_code == 200
            return ok
        except requests.RequestException:
            return False

    def generate(self, model: str, body: dict, timeout: float = 300) -> requests.Response:
        return requests.post(f"{self.url}/v2/models/{model}/generate", json=body, timeout=timeout)

    def generate_stream(self, model: str, body: dict, timeout: float = 300) -> list:
        """All SSE chunks of a generate_stream call, parsed."""
        import json

        r = requests.post(f"{self.url}/v2/models/{model}/generate_stream", json=body, stream=True, timeout=timeout)
        chunks = []
        for line in r.iter_lines(decode_unicode=True):
            if line and line.startswith("data:"):
                chunks.append(json.loads(line[len("data:"):]))
        return chunks

    def load(self, model: str) -> requests.Response:
        return requests.post(f"{self.url}/v2/repository/models/{model}/load", timeout=300)

    def unload(self, model: str) -> requests.Response:
        return requests.post(f"{self.url}/v2/repository/models/{model}/unload", timeout=300)

    def stats(self, model: str) -> dict:
        r = requests.get(f"{self.url}/v2/models/{model}/stats", timeout=30)
        r.raise_for_status()
        return r.json()["model_stats"][0]

    def metrics(self) -> str:
        return requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30).text

    def pid_threads(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/task"))

    def pid_rss_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))


def _shipped_smollm2_config(name: str = "smollm2") -> str:
    """model_repository/<name>/config.pbtxt (a SmolLM2 example) with ``model_path`` made
    absolute."""
    gguf = _gguf()
    shipped = (REPO / "model_repository" / name / "config.pbtxt").read_text()
    shipped = re.sub(r'"\.\./\.\./\.\./models/[^"]+"', f'"{gguf}"', shipped)
    assert str(gguf) in shipped, "the shipped config must reference the GGUF through model_path"
    return shipped


@contextlib.contextmanager
def _serve(root: Path, repo: Path, load: list, ready: list, env: dict = None):
    """Runs tritonserver on free loopback ports over the model repository `repo` (under `root`)
    with the ferrum library installed as a backend, loading the models `load`; yields a `Server`
    once the models `ready` are ready, stops the server on exit. `env` adds variables."""
    binary = _tritonserver()
    lib = Path(os.environ.get("FERRUM_BACKEND_LIB", REPO / "target" / "release" / "libtriton_ferrum.so"))
    if not lib.exists():
        pytest.fail(f"{lib} is missing: build it with `cargo build --release --lib`")
    backends = root / "backends"
    (backends / "ferrum").mkdir(parents=True)
    shutil.copy(lib, backends / "ferrum" / "libtriton_ferrum.so")

    http, grpc, metrics = _free_port(), _free_port(), _free_port()
    log_path = root / "tritonserver.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [
            binary,
            "--model-repository", str(repo),
            "--backend-directory", str(backends),
            "--model-control-mode", "explicit",
            *[arg for name in load for arg in ("--load-model", name)],
            "--http-address", "127.0.0.1", "--http-port", str(http),
            "--grpc-address", "127.0.0.1", "--grpc-port", str(grpc),
            "--metrics-address", "127.0.0.1", "--metrics-port", str(metrics),
            "--allow-gpu-metrics", "false",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=root,
        # glibc keeps freed memory in per-thread arenas; Triton loads models on changing threads,
        # so with the default (8 x cores arenas) each reload can park a model's worth of freed
        # pages in a new arena. Two arenas make the reload test's RSS bound meaningful
        # (docs/configuration.md recommends the same for servers that reload models often).
        env={**os.environ, "MALLOC_ARENA_MAX": "2", **(env or {})},
    )
    srv = Server(proc, http, grpc, metrics, log_path, repo, ready)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"tritonserver exited with {proc.returncode}:\n{srv.log()[-4000:]}")
            if srv.healthy():
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"tritonserver did not become ready:\n{srv.log()[-4000:]}")
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    gguf = _gguf()
    root = tmp_path_factory.mktemp("triton")
    repo = root / "models"
    _write_model(repo, "smollm2", _shipped_smollm2_config())
    _write_model(
        repo,
        "smollm2_nb",
        f"""backend: "ferrum"
max_batch_size: 0
parameters [
  {{ key: "model_path", value: {{ string_value: "{gguf}" }} }},
  {{ key: "device", value: {{ string_value: "cpu" }} }},
  {{ key: "weight_format", value: {{ string_value: "f32" }} }},
  {{ key: "max_tokens_in_paged_kv_cache", value: {{ string_value: "16384" }} }},
  {{ key: "enable_kv_cache_reuse", value: {{ string_value: "true" }} }},
  {{ key: "default_max_tokens", value: {{ string_value: "8" }} }},
  {{ key: "exclude_input_in_output", value: {{ string_value: "true" }} }}
]
""",
    )
    # Tiny random checkpoints of other architectures (tests/fixtures/models), served the way the
    # shipped example configs are: decoupled, tensorrtllm shapes, f32 weights.
    for name, fixture in TINY_ARCH_MODELS.items():
        _write_model(
            repo,
            name,
            f"""backend: "ferrum"
max_batch_size: 64
model_transaction_policy {{ decoupled: true }}
parameters [
  {{ key: "model_path", value: {{ string_value: "{REPO / 'tests' / 'fixtures' / 'models' / fixture}" }} }},
  {{ key: "device", value: {{ string_value: "cpu" }} }},
  {{ key: "weight_format", value: {{ string_value: "f32" }} }},
  {{ key: "max_tokens_in_paged_kv_cache", value: {{ string_value: "4096" }} }},
  {{ key: "exclude_input_in_output", value: {{ string_value: "true" }} }}
]
""",
        )
    _write_model(repo, BUSY_MODEL, busy_model_config(gguf))
    _write_model(repo, BUSY_MODEL_NB, busy_model_config(gguf, decoupled=False))
    _write_model(
        repo,
        "bad_missing",
        """backend: "ferrum"
parameters [ { key: "model_path", value: { string_value: "does_not_exist.gguf" } } ]
""",
    )
    _write_model(
        repo,
        "bad_corrupt",
        """backend: "ferrum"
parameters [ { key: "model_path", value: { string_value: "model.gguf" } } ]
""",
    )
    (repo / "bad_corrupt" / "1" / "model.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
    _write_model(
        repo,
        "bad_param",
        f"""backend: "ferrum"
parameters [
  {{ key: "model_path", value: {{ string_value: "{gguf}" }} }},
  {{ key: "max_num_seqs", value: {{ string_value: "many" }} }}
]
""",
    )

    with _serve(
        root, repo, load=["smollm2", "smollm2_nb", *TINY_ARCH_MODELS], ready=["smollm2", "smollm2_nb"]
    ) as srv:
        yield srv


BUSY_MODEL = "smollm2_busy"
BUSY_MODEL_NB = "smollm2_busy_nb"
BUSY_MAX_NUM_SEQS = 2
BUSY_MAX_QUEUE_SIZE = 2


def busy_model_config(gguf: Path, decoupled: bool = True) -> str:
    """Decoupled with tensorrtllm shapes, 2 seats and 2 places; or not decoupled with vLLM
    shapes, one seat and no place."""
    seats, places = (BUSY_MAX_NUM_SEQS, BUSY_MAX_QUEUE_SIZE) if decoupled else (1, 0)
    return f"""backend: "ferrum"
max_batch_size: {64 if decoupled else 0}
model_transaction_policy {{ decoupled: {str(decoupled).lower()} }}
parameters [
  {{ key: "model_path", value: {{ string_value: "{gguf}" }} }},
  {{ key: "device", value: {{ string_value: "cpu" }} }},
  {{ key: "weight_format", value: {{ string_value: "f32" }} }},
  {{ key: "max_num_seqs", value: {{ string_value: "{seats}" }} }},
  {{ key: "max_queue_size", value: {{ string_value: "{places}" }} }},
  {{ key: "max_model_len", value: {{ string_value: "1024" }} }},
  {{ key: "max_tokens_in_paged_kv_cache", value: {{ string_value: "4096" }} }},
  {{ key: "exclude_input_in_output", value: {{ string_value: "true" }} }}
]
"""


# A SmolLM2 token id (of 49152) that none of the tests' text prompts holds.
PANIC_TOKEN = 49000


@pytest.fixture(scope="session")
def panic_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton_panic")
    repo = root / "models"
    _write_model(repo, "smollm2", _shipped_smollm2_config())
    with _serve(
        root, repo, load=["smollm2"], ready=["smollm2"], env={"FERRUM_INJECT_PANIC_TOKEN": str(PANIC_TOKEN)}
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def contracts_server(tmp_path_factory):
    gguf = _gguf()
    root = tmp_path_factory.mktemp("triton_contracts")
    repo = root / "models"
    common = f"""parameters [
  {{ key: "model_path", value: {{ string_value: "{gguf}" }} }},
  {{ key: "device", value: {{ string_value: "cpu" }} }},
  {{ key: "weight_format", value: {{ string_value: "f32" }} }},
  {{ key: "max_tokens_in_paged_kv_cache", value: {{ string_value: "8192" }} }}
]
"""
    _write_model(
        repo, "trtllm", 'backend: "ferrum"\nmax_batch_size: 64\nmodel_transaction_policy { decoupled: true }\n' + common
    )
    _write_model(
        repo, "vllm", 'backend: "ferrum"\nmax_batch_size: 0\nmodel_transaction_policy { decoupled: true }\n' + common
    )
    _write_model(repo, "llmapi", _shipped_smollm2_config("smollm2-llmapi"))
    models = ["trtllm", "vllm", "llmapi"]
    with _serve(root, repo, load=models, ready=models) as srv:
        yield srv
