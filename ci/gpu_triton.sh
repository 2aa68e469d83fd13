#!/usr/bin/env bash
# Triton end-to-end smoke test on a GPU machine (issue 6): built and packed here, run there
# (the GPU machine has no cargo and no network).
#
#   ci/gpu_triton.sh [--dest DIR] [--cuda-device DEV]
#       builds the release libtriton_ferrum.so and `ferrum` (stripped) and packs into DIR
#       (default <repo>/.gpu-triton, git-ignored; DIR must sit at the root of a checkout whose
#       tests/fixtures travel with it):
#         triton.tar.xz            tritonserver 2.51 from PyPI nvidia-pytriton==0.7.0
#                                  (pytriton/tritonserver/bin + the nvidia_pytriton.libs it links;
#                                  the bundled libpython and the Python backend are left out)
#         backends/ferrum/libtriton_ferrum.so, bin/ferrum
#         models/                  tiny fixtures of tests/fixtures/models: gpt2, falcon_new and
#                                  llama_gqa_llama3 with `device: DEV` (default cuda) and
#                                  `dtype: float32` (greedy tokens must equal the transformers
#                                  goldens exactly), and llama_gqa_llama3 with `device: auto`,
#                                  `dtype: bfloat16` (top-5 rule at a first divergence)
#         smoke_triton.py          tests/e2e_gpu/smoke_triton.py (standard library only)
#         bench_triton_gpu.py      tests/e2e_gpu/bench_triton_gpu.py (needs torch + safetensors)
#         run.sh
#   bash .gpu-triton/run.sh   on the GPU machine, from the checkout root: unpacks tritonserver
#       into /tmp/ferrum-triton, runs the smoke test, logs to $OUT (else DIR/out):
#       triton_smoke.log, tritonserver.log, triton_smoke.json. EXPECT_DEVICE=cpu checks that the
#       models run on the CPU instead (for a dry run on a machine without a GPU, packed with
#       --cuda-device auto). BENCH=1 then also measures the serving overhead: `ferrum bench`
#       against the same random checkpoint (BENCH_SHAPE tinyllama | llama2-7b | tiny, written
#       with torch there) behind tritonserver, BENCH_ROUNDS alternating rounds (default 3);
#       logs triton_bench.log / triton_bench.json.
#
# With the device tool the tree that travels is the main checkout: pack into it, then one call:
#   ci/gpu_triton.sh --dest /work/main/.gpu-triton
#   device run: command "bash .gpu-triton/run.sh", carry [".gpu-triton"]
# Dry run here on the CPU (same script, same server):
#   ci/gpu_triton.sh --cuda-device auto && EXPECT_DEVICE=cpu bash .gpu-triton/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

dest="$repo/.gpu-triton"
cuda_device="cuda"
while [ $# -gt 0 ]; do
  case "$1" in
    --dest) dest="${2:?--dest needs a folder}"; shift 2 ;;
    --cuda-device) cuda_device="${2:?--cuda-device needs a value}"; shift 2 ;;
    -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
    *) echo "unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
tree=$(dirname "$dest")
pytriton_version="0.7.0"
# At most this many bytes travel with the tree in one device call (64 MiB), less the tree.
max_pack_bytes=$((56 * 1024 * 1024))

# Keep the pack out of git in every worktree (info/exclude is shared by them) and in the tree
# it is packed into.
for gitdir in "$(git rev-parse --git-common-dir)" "$(git -C "$tree" rev-parse --git-common-dir 2>/dev/null || true)"; do
  [ -n "$gitdir" ] || continue
  case "$gitdir" in /*) ;; *) gitdir="$tree/$gitdir" ;; esac
  mkdir -p "$gitdir/info"
  grep -qxF '/.gpu-triton/' "$gitdir/info/exclude" 2>/dev/null || echo '/.gpu-triton/' >>"$gitdir/info/exclude"
done

echo "== building libtriton_ferrum.so and ferrum (release)"
cargo build --release --locked --lib --bin ferrum

# 1. tritonserver out of the nvidia-pytriton wheel, cached by wheel (xz takes ~40 s).
cache="$repo/build/gpu_triton"
mkdir -p "$cache"
wheel=$(ls "$cache"/nvidia_pytriton-"$pytriton_version"-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
  echo "== downloading nvidia-pytriton==$pytriton_version (PyPI)"
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_35_x86_64 -d "$cache" "nvidia-pytriton==$pytriton_version"
  wheel=$(ls "$cache"/nvidia_pytriton-"$pytriton_version"-*.whl | head -n1)
fi
tarball="$cache/triton-$(sha256sum "$wheel" | cut -c1-16).tar.xz"
if [ ! -f "$tarball" ]; then
  echo "== unpacking tritonserver from $(basename "$wheel")"
  stage=$(mktemp -d)
  # zipfile drops the run bit of bin/tritonserver: run.sh chmods it after unpacking.
  python3 - "$wheel" "$stage/site" <<'PY'
import sys, zipfile
wheel, out = sys.argv[1:3]
# The server binary and the libraries it links; not libpython (the Python backend's, 32 MB) nor
# the Python backend and its stubs, which serving ferrum does not use.
skip = ("nvidia_pytriton.libs/libpython",)
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist()
             if (n.startswith("pytriton/tritonserver/bin/") or n.startswith("nvidia_pytriton.libs/"))
             and not n.startswith(skip) and not n.endswith("/")]
    z.extractall(out, names)
print(f"{len(names)} files")
PY
  chmod +x "$stage/site/pytriton/tritonserver/bin/tritonserver"
  # Every library the server links must be there (ldd resolves through its RPATH).
  if ldd "$stage/site/pytriton/tritonserver/bin/tritonserver" | grep -q "not found"; then
    ldd "$stage/site/pytriton/tritonserver/bin/tritonserver" | grep "not found" >&2
    echo "tritonserver misses libraries" >&2
    exit 1
  fi
  tar -C "$stage" -cf - site | xz -T0 -6 >"$tarball.tmp"
  mv "$tarball.tmp" "$tarball"
  rm -rf "$stage"
fi

rm -rf "$dest"/{backends,bin,models,run.sh,smoke_triton.py,bench_triton_gpu.py,triton.tar.xz,out}
mkdir -p "$dest/backends/ferrum" "$dest/bin"
cp "$tarball" "$dest/triton.tar.xz"
strip -o "$dest/backends/ferrum/libtriton_ferrum.so" target/release/libtriton_ferrum.so
strip -o "$dest/bin/ferrum" target/release/ferrum
cp tests/e2e_gpu/smoke_triton.py tests/e2e_gpu/bench_triton_gpu.py "$dest/"

# 2. The model repository. model_path is relative to the version folder:
#    <tree>/.gpu-triton/models/<name>/1 -> ../../../../tests/fixtures/models/<fixture>.
write_model() {  # name fixture device dtype
  local name="$1" fixture="$2" device="$3" dtype="$4"
  [ -f "$tree/tests/fixtures/models/$fixture/model.safetensors" ] ||
    { echo "$tree/tests/fixtures/models/$fixture is missing" >&2; exit 1; }
  [ -f "$tree/tests/fixtures/golden/$fixture.json" ] ||
    { echo "$tree/tests/fixtures/golden/$fixture.json is missing" >&2; exit 1; }
  mkdir -p "$dest/models/$name/1"
  cat >"$dest/models/$name/config.pbtxt" <<CFG
# Generated by ci/gpu_triton.sh: fixture tests/fixtures/models/$fixture.
backend: "ferrum"
max_batch_size: 64
model_transaction_policy { decoupled: true }
parameters [
  { key: "model_path", value: { string_value: "../../../../tests/fixtures/models/$fixture" } },
  { key: "device", value: { string_value: "$device" } },
  { key: "dtype", value: { string_value: "$dtype" } },
  { key: "max_tokens_in_paged_kv_cache", value: { string_value: "4096" } },
  { key: "exclude_input_in_output", value: { string_value: "true" } }
]
CFG
}
write_model gpt2_f32 gpt2 "$cuda_device" float32
write_model falcon_f32 falcon_new "$cuda_device" float32
write_model llama_f32 llama_gqa_llama3 "$cuda_device" float32
write_model llama_auto_bf16 llama_gqa_llama3 auto bfloat16

# 3. The runner.
cat >"$dest/run.sh" <<RUN
#!/usr/bin/env bash
# Generated by ci/gpu_triton.sh at $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src kernels triton_api tests/e2e_gpu || echo '+dirty'), libtriton_ferrum.so of that build.
# Runs the Triton smoke test (see ci/gpu_triton.sh); EXPECT_DEVICE=cpu for a dry run without GPU.
set -uo pipefail
here=\$(cd "\$(dirname "\$0")" && pwd)
out=\${OUT:-\$here/out}
mkdir -p "\$out"
work=/tmp/ferrum-triton
rm -rf "\$work" && mkdir -p "\$work"
# tar needs xz(1); Python's tarfile does not.
tar -C "\$work" -xJf "\$here/triton.tar.xz" 2>/dev/null ||
  python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "\$here/triton.tar.xz" "\$work" || exit 1
chmod +x "\$work/site/pytriton/tritonserver/bin/tritonserver" "\$here/bin/ferrum"
for m in "\$here"/models/*/; do mkdir -p "\$m/1"; done
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 || true
  python3 "\$here/smoke_triton.py" \\
    --tritonserver "\$work/site/pytriton/tritonserver/bin/tritonserver" \\
    --backend-dir "\$here/backends" \\
    --model-repository "\$here/models" \\
    --fixtures "\$here/../tests/fixtures" \\
    --expect-device "\${EXPECT_DEVICE:-cuda}" \\
    --log "\$out/tritonserver.log" --json "\$out/triton_smoke.json"
} 2>&1 | tee "\$out/triton_smoke.log"
status=\${PIPESTATUS[0]}
if [ "\${BENCH:-0}" = 1 ]; then
  # Serving overhead (engine alone vs through tritonserver); reported, never fails the smoke test.
  timeout "\${BENCH_TIMEOUT_S:-240}" "\${PYTHON:-python3}" "\$here/bench_triton_gpu.py" \\
    --tritonserver "\$work/site/pytriton/tritonserver/bin/tritonserver" \\
    --backend-dir "\$here/backends" --ferrum "\$here/bin/ferrum" --work /tmp/ferrum-bench \\
    --shape "\${BENCH_SHAPE:-tinyllama}" --rounds "\${BENCH_ROUNDS:-3}" --device "\${BENCH_DEVICE:-cuda}" --dtype "\${BENCH_DTYPE:-bfloat16}" \\
    --log "\$out/tritonserver_bench.log" --json "\$out/triton_bench.json" 2>&1 | tee "\$out/triton_bench.log"
  echo "== triton bench exit status \${PIPESTATUS[0]}"
fi
exit "\$status"
RUN
chmod +x "$dest/run.sh"

bytes=$(du -sb "$dest" | cut -f1)
du -sh "$dest"/*; du -sh "$dest"
if [ "$bytes" -gt "$max_pack_bytes" ]; then
  echo "error: $dest holds $bytes bytes, more than one device call carries with the tree" >&2
  exit 1
fi
echo "packed into $dest ($(git -C "$tree" ls-files -z | xargs -0 du -cb 2>/dev/null | tail -n1 | cut -f1) bytes of tracked tree travel too)"
echo "device call: bash $(basename "$dest")/run.sh   (carry [\"$(basename "$dest")\"])"
