#!/usr/bin/env bash
# Prepares the device check (scripts/device/check.sh) for a GPU machine that has no Rust
# toolchain, no Vulkan loader and no network (../shared/gpu.md): run it here, on the
# development machine (same x86-64 architecture), then carry `.gpu` and `.gl` there.
#
#   .gpu/sparsync        the release binary (bench, serve, adapters), stripped
#   .gpu/tests/*         the GPU correctness tests (gpu_engine, gpu_topk, gpu_faults), --release
#   .gl/*.deb            Debian's Vulkan loader (libvulkan1), unpacked there by check.sh
#
# Both folders are git-ignored (this script adds them to .git/info/exclude).
set -euo pipefail
cd "$(dirname "$0")/../.."

grep -qsx '/.gpu/' .git/info/exclude 2>/dev/null || printf '/.gl/\n/.gpu/\n' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/tests .gl

echo "==> cargo build --release (sparsync)"
bin=$(cargo build --release --bin sparsync --message-format=json-render-diagnostics \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "sparsync":
        print(m["executable"])')
cp "$bin" .gpu/sparsync

echo "==> cargo test --release --no-run (the GPU tests)"
cargo test --release --no-run --test gpu_engine --test gpu_topk --test gpu_faults --message-format=json-render-diagnostics \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])' \
    | while read -r name exe; do cp "$exe" ".gpu/tests/$name"; done
strip .gpu/sparsync .gpu/tests/*

if ! compgen -G '.gl/libvulkan1_*.deb' >/dev/null; then
    echo "==> downloading libvulkan1 (amd64)"
    lists=$(mktemp -d)
    mkdir -p "$lists/partial"
    o=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 "-oDir::State::Lists=$lists")
    apt-get "${o[@]}" update -qq
    (cd .gl && apt-get "${o[@]}" download libvulkan1 2>/dev/null)
    rm -rf "$lists"
fi

git rev-parse HEAD > .gpu/commit
git diff --quiet HEAD || echo "dirty" >> .gpu/commit
du -sh .gpu .gl
ls -l .gpu .gpu/tests .gl
echo "ready: carry .gpu and .gl, and run scripts/device/check.sh there"
