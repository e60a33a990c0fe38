#!/usr/bin/env bash
# The device check: everything a GPU machine lent for a few minutes should measure, in one
# command (../shared/gpu.md). Prepare first with scripts/device/prepare.sh on a machine with
# the Rust toolchain, carry .gpu and .gl, then run this from the repository root:
#
#   1. the adapter wgpu opens (name, backend, driver, limits, features); unless
#      SPARSYNC_DEVICE_ALLOW_SOFTWARE=1, a software adapter (lavapipe) fails the check here;
#   2. the GPU correctness tests (.gpu/tests/*) against the real driver;
#   3. `sparsync bench copy` (one buffer pair against 64 MiB pieces), `bench aggregate` and
#      `bench topk` with the device copy reference, and
#      benches/peers/torch_ref.py (PyTorch, when installed) on the same sizes;
#   4. `sparsync bench e2e --engine gpu` in deterministic and fast mode (server and load
#      generator processes);
#   5. check.json and summary.txt.
# Results go to $OUT (default runs/device): summary.txt, check.json, and every step's own
# output under raw/ (also packed as raw.tar.gz). Exit status: 0 when every step passed.
#
#   --quick   small sizes and short runs (the test that keeps this script working runs it so,
#             on whatever adapter exists)
#   --no-tests  do not run .gpu/tests (said so in the summary)
#   --pack    leave only summary.txt, check.json and raw.tar.gz in $OUT (a device machine
#             returns few files)
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/runs/device}
DIR=${SPARSYNC_DEVICE_DIR:-$ROOT/.gpu}
BIN=${SPARSYNC_BIN:-$DIR/sparsync}
QUICK=0
TESTS=1
PACK=0
for a in "$@"; do
    case $a in
        --quick) QUICK=1 ;;
        --no-tests) TESTS=0 ;;
        --pack) PACK=1 ;;
        *) echo "unknown argument $a" >&2; exit 2 ;;
    esac
done
RAW=$OUT/raw
rm -rf "$RAW" && mkdir -p "$RAW"
started=$(date +%s)
: > "$RAW/steps.tsv"
step() { printf '\n==> %s (%ds)\n' "$*" $(($(date +%s) - started)) | tee -a "$RAW/log.txt"; }
# record NAME STATUS SECONDS
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$RAW/steps.tsv"; }
# finish STATUS: the summary, the pack, the exit status
finish() {
    python3 "$ROOT/scripts/device/summarize.py" "$RAW" "$OUT" || set -- 1
    tar czf "$OUT/raw.tar.gz" -C "$OUT" raw
    [ $PACK = 1 ] && rm -rf "$RAW"
    exit "$1"
}
# run NAME TIMEOUT_S CMD...: output to $OUT/NAME.txt, status recorded
run() {
    local name=$1 limit=$2 t0 rc
    shift 2
    t0=$(date +%s)
    step "$name: $*"
    timeout -k 5 "$limit" "$@" > "$RAW/$name.txt" 2>&1
    rc=$?
    tail -n 40 "$RAW/$name.txt"
    record "$name" "$rc" $(($(date +%s) - t0))
    return $rc
}

# --- 0. the Vulkan loader and driver ------------------------------------------------------
if ! ldconfig -p 2>/dev/null | grep -q 'libvulkan.so.1 '; then
    if compgen -G "$ROOT/.gl/*.deb" >/dev/null; then
        step "installing the Vulkan loader from .gl"
        for f in "$ROOT"/.gl/*.deb; do dpkg -x "$f" /; done
        ldconfig
    fi
fi
if [ -z "${VK_DRIVER_FILES:-}" ] && [ -z "${VK_ICD_FILENAMES:-}" ]; then
    for f in /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json /usr/share/vulkan/icd.d/nvidia_icd.json \
        /etc/vulkan/icd.d/nvidia_icd.json /usr/share/vulkan/icd.d/nvidia_icd.x86_64.json; do
        if [ -f "$f" ]; then export VK_DRIVER_FILES=$f; break; fi
    done
fi
# NVIDIA's manifest names libGLX_nvidia.so.0, whose Vulkan entry point refuses to create an
# instance when there is no X server (seen on a headless H200 container: "Could not get
# 'vkCreateInstance' via 'vk_icdGetInstanceProcAddr'"). The same driver's EGL library exports
# the same ICD and works headless: point the loader at it.
if [ -f "${VK_DRIVER_FILES:-}" ] && grep -q libGLX_nvidia "$VK_DRIVER_FILES" &&
    { ldconfig -p | grep -q 'libEGL_nvidia.so.0 ' ||
        compgen -G '/usr/local/nvidia/lib*/libEGL_nvidia.so.0' >/dev/null; }; then
    egl_icd=$(mktemp --suffix=.json)
    sed 's/libGLX_nvidia\.so\.0/libEGL_nvidia.so.0/' "$VK_DRIVER_FILES" > "$egl_icd"
    export VK_DRIVER_FILES=$egl_icd
fi
{
    echo "date: $(date -u +%FT%TZ)"
    echo "commit: $(cat "$DIR/commit" 2>/dev/null | tr '\n' ' ')"
    echo "VK_DRIVER_FILES=${VK_DRIVER_FILES:-} VK_ICD_FILENAMES=${VK_ICD_FILENAMES:-}"
    [ -f "${VK_DRIVER_FILES:-}" ] && tr -d '\n ' < "$VK_DRIVER_FILES" && echo
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) x $(nproc)"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    echo "Vulkan drivers present:"
    ls /usr/local/nvidia/share/vulkan/icd.d /usr/share/vulkan/icd.d /etc/vulkan/icd.d 2>/dev/null
} > "$RAW/machine.txt" 2>&1
cat "$RAW/machine.txt"

# --- 1. the adapter -------------------------------------------------------------------------
hw=(--require-hardware)
[ "${SPARSYNC_DEVICE_ALLOW_SOFTWARE:-0}" = 1 ] && hw=()
if ! run adapter 60 "$BIN" adapters --json "$RAW/adapter.json" "${hw[@]}"; then
    echo "DEVICE CHECK FAILED: no usable GPU adapter (see adapter.txt); nothing measured" | tee -a "$RAW/log.txt"
    finish 1
fi

# --- 2. correctness on the real driver --------------------------------------------------------
if [ $TESTS = 1 ]; then
    if ! compgen -G "$DIR/tests/*" >/dev/null; then
        echo "no test binaries in $DIR/tests: run scripts/device/prepare.sh" | tee "$RAW/tests.txt"
        record tests missing 0
    else
        t0=$(date +%s)
        step "GPU tests"
        rc=0
        for t in "$DIR"/tests/*; do
            echo "--- $(basename "$t")" >> "$RAW/tests.txt"
            SPARSYNC_REQUIRE_GPU=1 timeout -k 5 240 "$t" >> "$RAW/tests.txt" 2>&1 || rc=$?
        done
        grep -E '^(test result|test .* FAILED|---)' "$RAW/tests.txt"
        record tests $rc $(($(date +%s) - t0))
    fi
else
    record tests not-requested 0
fi

# --- 3. kernels, and PyTorch on the same sizes -----------------------------------------------
if [ $QUICK = 1 ]; then sizes=16; reps=2; copies=16,18; else sizes=20,24,26; reps=7; copies=24,26,28; fi
run copy 60 "$BIN" bench copy --log2-sizes "$copies" --reps $reps --json "$RAW/copy.json"
run aggregate 240 "$BIN" bench aggregate --no-cpu --log2-sizes "$sizes" --reps $reps --json "$RAW/aggregate.json"
run topk 180 "$BIN" bench topk --no-cpu --log2-sizes "$sizes" --reps $reps --json "$RAW/topk.json"
if python3 -c 'import torch' 2>/dev/null; then
    run torch 180 python3 "$ROOT/benches/peers/torch_ref.py" --log2-sizes "$sizes" --reps $reps --json "$RAW/torch.json"
else
    echo "PyTorch is not installed here: no peer figures" | tee "$RAW/torch.txt"
    record torch not-installed 0
fi

# --- 4. the whole server --------------------------------------------------------------------
# The adapter the check opened, by name: `--engine gpu` uses a software adapter only when named.
name=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["opened"]["name"])' "$RAW/adapter.json")
if [ $QUICK = 1 ]; then
    e2e=(--clients 4 --log2-params 14 --log2-sizes 14 --size-clients 2 --duration-s 1)
    e2e_fast=(--clients 4 --log2-params 14 --log2-sizes 14 --size-clients 2 --duration-s 1 --no-raw)
else
    e2e=(--clients 8,64 --log2-params 20 --log2-sizes 20 --size-clients 256 --duration-s 5)
    e2e_fast=(--clients 64 --log2-params 20 --log2-sizes 24 --size-clients 64 --duration-s 5)
fi
run e2e 200 "$BIN" bench e2e --engine gpu --adapter "$name" "${e2e[@]}" --json "$RAW/e2e.json"
run e2e-fast 200 "$BIN" bench e2e --engine gpu --gpu-mode fast --adapter "$name" "${e2e_fast[@]}" \
    --json "$RAW/e2e-fast.json"

# --- 5. summary -------------------------------------------------------------------------------
step "summary"
finish 0
