#!/usr/bin/env bash
# The fresh-clone check: what a new user gets. Clones the repository (its committed HEAD) into a
# new folder and runs, there, with a scrubbed environment (the clone's own new target/, no
# CARGO_TARGET_DIR, no LIBCLANG_PATH, no .venv, no models/, no pip cache, no FERRUM_* variables):
#   1. the README's CLI section: `cargo build --release` (with LIBCLANG_PATH=/nonexistent: a
#      build needs no libclang), ci/fetch_models.sh, then each `target/release/ferrum` line of
#      that section except the 7B random-weight bench (28 GB of f32 weights on the CPU);
#   2. the first quick-start command, `ci/serve.sh`, until it has answered the demo request and
#      says it is serving; then it is stopped (SIGTERM, trapped like Ctrl-C; ports 8000-8002
#      must be free);
#   3. the second quick-start command, `ci/test.sh`.
# Prints how long each step took; exits non-zero at the first failure.
#
#   ci/fresh_clone.sh [--keep] [--source REPO_OR_URL] [--dir DIR]
#
# --keep leaves the clone (default: removed on success); --source defaults to this checkout.
set -euo pipefail
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# bash reads a script as it runs: run from a private copy, so that editing (or checking out)
# this file during the long run cannot change what the rest of the run executes.
if [ -z "${FERRUM_FRESH_COPY:-}" ]; then
    copy="$(mktemp /tmp/fresh_clone.XXXXXX.sh)"
    cp "${BASH_SOURCE[0]}" "$copy"
    FERRUM_FRESH_COPY="$copy" FERRUM_FRESH_SRC="$SRC" exec bash "$copy" "$@"
fi
SRC="${FERRUM_FRESH_SRC:-$SRC}"
DIR=""
KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
        --keep) KEEP=1; shift ;;
        --source) SRC="${2:?--source needs a value}"; shift 2 ;;
        --dir) DIR="${2:?--dir needs a value}"; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "fresh_clone: unknown argument '$1'" >&2; exit 2 ;;
    esac
done
[ -n "$DIR" ] || DIR="$(mktemp -d /tmp/ferrum-fresh.XXXXXX)"
mkdir -p "$DIR"
CLONE="$DIR/ferrum"
LOGS="$DIR/logs"
mkdir -p "$LOGS"

# The environment a new user's shell has: no project variables, no build or Python state.
run_scrubbed() {
    env -i HOME="$HOME" USER="${USER:-root}" PATH="$PATH" LANG="${LANG:-C.UTF-8}" TERM=dumb \
        PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 "$@"
}

declare -a SUMMARY=()
step() {
    local name="$1"; shift
    local log="$LOGS/$(echo "$name" | tr -c 'a-zA-Z0-9\n' '_').log"
    local t0=$SECONDS
    echo "fresh_clone: == $name (log: $log)"
    if ! (cd "$CLONE" && run_scrubbed bash -c "$*") >"$log" 2>&1; then
        tail -n 40 "$log"
        SUMMARY+=("FAILED $(printf '%6ds' $((SECONDS - t0)))  $name")
        printf '%s\n' "${SUMMARY[@]}"
        echo "fresh_clone: FAILED at '$name' (clone kept in $CLONE)"
        exit 1
    fi
    SUMMARY+=("ok     $(printf '%6ds' $((SECONDS - t0)))  $name")
}

t_start=$SECONDS
git clone -q "$SRC" "$CLONE"
echo "fresh_clone: cloned $(git -C "$CLONE" rev-parse --short HEAD) from $SRC into $CLONE"
for p in .venv models target build; do
    [ ! -e "$CLONE/$p" ] || { echo "fresh_clone: $p exists in a fresh clone" >&2; exit 1; }
done

# 1. The README's CLI section, line by line as written (the bench of the 7B preset left out).
cli_lines="$(python3 - "$CLONE/README.md" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
section = text.split("## The `ferrum` command line", 1)[1]
block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
# Join continued lines; drop comments after the command.
lines, cur = [], ""
for raw in block.splitlines():
    cur += raw.rstrip("\\").rstrip() + " " if raw.rstrip().endswith("\\") else raw
    if not raw.rstrip().endswith("\\"):
        lines.append(cur.strip()); cur = ""
for line in lines:
    if not line or "--preset llama2-7b" in line:
        continue
    print(line)
PY
)"
[ -n "$cli_lines" ] || { echo "fresh_clone: no CLI section found in README.md" >&2; exit 1; }
cli_script="set -euo pipefail"
while IFS= read -r line; do
    case "$line" in
        "cargo build --release"*) line="LIBCLANG_PATH=/nonexistent $line" ;;
    esac
    cli_script+=$'\n'"echo \"+ ${line//\"/\\\"}\""$'\n'"$line"
done <<<"$cli_lines"
step "README CLI section (cargo build --release, fetch_models, ferrum ...)" "$cli_script"

# 2. ci/serve.sh, the first quick-start command, as written: it must answer the demo request and
#    report that it is serving; then it is stopped, and tritonserver with it.
serve_script='
set -euo pipefail
rm -rf models .venv   # as a new user has them: not yet
ci/serve.sh > serve.out 2>&1 &
pid=$!
for _ in $(seq 1 1800); do
    grep -q "Press Ctrl-C" serve.out && break
    kill -0 $pid 2>/dev/null || { cat serve.out; echo "ci/serve.sh exited before serving"; exit 1; }
    sleep 1
done
cat serve.out
grep -q "Press Ctrl-C" serve.out || { echo "ci/serve.sh did not serve within 30 minutes"; exit 1; }
grep -q "smollm2: .*Paris" serve.out || { echo "the demo answer does not name Paris"; exit 1; }
# A background job of a non-interactive shell ignores SIGINT, so Ctrl-C is sent as what the
# script traps alike: SIGTERM (the same cleanup path: stop tritonserver, exit).
kill -TERM $pid; wait $pid || true
! kill -0 $pid 2>/dev/null
'
step "ci/serve.sh (README quick start 1)" "$serve_script"

# 3. ci/test.sh, the second quick-start command, from the state a new user has: no venv, no models.
step "ci/test.sh (README quick start 2)" "rm -rf models .venv; ci/test.sh"

echo
echo "fresh_clone: all steps passed on $(git -C "$CLONE" rev-parse --short HEAD) in $((SECONDS - t_start))s:"
printf '%s\n' "${SUMMARY[@]}"
if [ "$KEEP" = 0 ]; then rm -rf "$DIR"; else echo "fresh_clone: clone kept in $CLONE"; fi
