#!/usr/bin/env bash
# Makes <repo>/.venv, the Python venv the ci/ scripts install into (test models, Triton, the
# test client, a pinned libclang), and prints its python on stdout. Idempotent: keeps a venv whose
# pip works. On Debian, python3 lacks ensurepip until python3-venv is installed; as root with apt
# this installs it, else it says what to install.
#
# Env: PYTHON (default python3) picks the interpreter that creates the venv.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
PYTHON="${PYTHON:-python3}"
log() { echo "venv: $*" >&2; }
die() { log "error: $*"; exit 1; }

command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found; install python3 (Debian: apt-get install python3 python3-venv)"

# A venv is usable when its python runs pip (a failed `python3 -m venv` leaves one without pip).
venv_ok() { [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -m pip --version >/dev/null 2>&1; }
make_venv() { rm -rf "$VENV"; "$PYTHON" -m venv "$VENV" >&2; }

if ! venv_ok; then
    log "creating $VENV"
    if ! make_venv || ! venv_ok; then
        if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
            py_minor="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
            log "python3 -m venv failed; installing python3-venv via apt"
            apt-get update -qq >&2
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2 ||
                DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python${py_minor}-venv" >&2
            make_venv
            venv_ok || die "$VENV has no working pip even after installing python3-venv"
        else
            die "'$PYTHON -m venv' failed; install python3-venv (as root: apt-get install python3-venv) and rerun"
        fi
    fi
fi
echo "$VENV/bin/python"
