#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU and this project checked out:
#
#   bash bench/gpu_check.sh [RESULTS_DIR]        (default: bench/results/)
#
# 1. builds the extension in place for sm_80 and sm_90a (FORCE_CUDA=1 setup.py build_ext
#    --inplace, objects kept in build/gpu_build for the static report) and installs the
#    package offline against the torch already there (pip install --no-build-isolation
#    --no-deps --no-index -e . with ARCFACE_NO_EXTENSION=1: the in-place build is used).
#    The CUDA kernel needs the CUTLASS headers: third_party/cutlass/include when there
#    (`make cutlass-include` on a machine with a package registry, then carry that
#    git-ignored folder along; CUTLASS_PATH is set to it), else an installed nvidia-cutlass
#    package; with neither, the build step fails saying so,
# 2. runs the test suite on the GPU (pytest; GPU tests included),
# 3. runs compute-sanitizer on small cpp CUDA cases, where the tool exists: memcheck and
#    racecheck (shared-memory hazards) on fp32/bf16, then memcheck on fp16 with
#    sub_centers=3 and Partial FC's index (the sampled classes of w),
# 4. calibrates the static report: measures the steps it predicts (bench/static/
#    calibrate.py: time per phase, memory, host syncs, per-kernel device time), then writes
#    the report with the measured column (static_gpu.md; reduced: sm_90a, bf16),
# 5. runs the headline benchmarks (N=8192 C=262144 D=512 bf16; N=1024 C=1M D=512 bf16;
#    a sweep over C at N=1024; the reference wherever its N x C copies fit), then
#    torch.compile(reference) at the two headline shapes if time is left,
# 6. prints a short table last.
#
# Every step runs under `timeout` within one overall budget (BUDGET_S, default 520 s, so
# that the whole ends within 9 minutes); a failing step is recorded, never fatal to the
# later ones; the exit status is 0 only if every step passed. Outputs (few files, as the
# device machine sends back at most 8): gpu_check.log, gpu_bf16.csv, gpu_bf16.md,
# gpu_bf16.json, gpu_bf16_full_N1024_D512.png, pytest.txt, static_measured.json,
# static_gpu.md (8: the device machine sends back at most 8 files).
#
# Environment: PYTHON (default python3), BUDGET_S, PYTEST_ARGS (default: -m "not slow" tests),
# SKIP_BUILD=1 (use the package as installed).
set -u
cd "$(dirname "$0")/.."
OUT="${1:-bench/results}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-520}"
LOG="$OUT/gpu_check.log"
: > "$LOG"
export PYTHONUNBUFFERED=1
START=$SECONDS
NAMES=()
RESULTS=()

say() { echo "$*" | tee -a "$LOG"; }

# step NAME MAX_SECONDS CMD...: run CMD under timeout (the smaller of MAX_SECONDS and what
# is left of the budget), output to the console and the log; record the outcome.
step() {
    local name="$1" max="$2"; shift 2
    local left=$(( BUDGET_S - (SECONDS - START) ))
    local t=$(( max < left ? max : left ))
    local t0=$SECONDS rc
    if (( t < 10 )); then
        NAMES+=("$name"); RESULTS+=("not run: budget spent"); say "== $name: not run (budget spent)"
        return 0
    fi
    say "== $name (timeout ${t}s): $*"
    timeout -k 10 "$t" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    local dt=$(( SECONDS - t0 ))
    case $rc in
        0) RESULTS+=("ok (${dt}s)") ;;
        124|137) RESULTS+=("TIMEOUT after ${dt}s") ;;
        *) RESULTS+=("FAILED rc=$rc (${dt}s)") ;;
    esac
    NAMES+=("$name")
    say "== $name: ${RESULTS[-1]}"
    return 0
}

step "machine" 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv; \
    $PY -c 'import torch, sys; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0))'; \
    $PY -c 'import triton; print(\"triton\", triton.__version__)'; command -v nvcc && nvcc --version | tail -2"

# The CUTLASS headers: the carried copy when there (no package registry here), else
# setup.py's own search (an installed nvidia-cutlass); none: the build step fails saying so.
if [[ -f third_party/cutlass/include/cutlass/version.h ]]; then
    export CUTLASS_PATH="$PWD/third_party/cutlass/include"
fi
export CUTLASS_CHECK='
import runpy, sys
setup = runpy.run_path("setup.py", run_name="arcface_setup")   # the functions; no build
found = setup["find_cutlass"]()
if found is None:
    sys.exit("gpu_check: " + setup["missing_cutlass_message"]())
print("CUTLASS", ".".join(map(str, found.version)), "headers:", found.include, "from", found.source)
'
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    step "build" 240 bash -c "'$PY' -c \"\$CUTLASS_CHECK\" && \
        FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST='8.0;9.0a' MAX_JOBS=16 \
        '$PY' setup.py build_ext --inplace --build-temp build/gpu_build/tmp && \
        ARCFACE_NO_EXTENSION=1 '$PY' -m pip install --no-build-isolation --no-deps --no-index -e ."
fi

step "backends" 60 "$PY" -c "import torch, arcface_kernels as ak; \
print('\n'.join(f'{k}: {v}' for k, v in ak.backend_status().items())); \
ok = ak.available_backends(); print('available:', ok); \
assert torch.cuda.is_available(), 'no CUDA device visible to torch'"

# The tests: the whole suite, GPU tests included (conftest turns the Triton interpreter
# on only without a GPU). -m "not slow" keeps the 8-minute budget.
if [[ -n "${PYTEST_ARGS+x}" ]]; then read -r -a PTA <<< "$PYTEST_ARGS"; else PTA=(-m "not slow" tests); fi
step "tests" 150 bash -c "set -o pipefail; $PY -m pytest -q -rfEs -p no:cacheprovider ${PTA[*]@Q} 2>&1 | tee '$OUT/pytest.txt' | tail -40"

# compute-sanitizer on small forwards+backwards of the cpp CUDA kernels: memcheck and
# racecheck on fp32 / bf16, then memcheck on fp16 with 3 sub-centers and an index (Partial
# FC's sampled classes, which the kernels read w through).
SAN_CASE='
import torch, arcface_kernels as ak
from arcface_kernels.backends import resolve_backend
resolve_backend("cpp", torch.device("cuda"))   # raises if cpp has no CUDA kernels here
g = torch.Generator(device="cuda").manual_seed(0)
for dt in (torch.float32, torch.bfloat16):
    x = torch.randn(37, 72, device="cuda", generator=g).to(dt).requires_grad_()
    w = torch.randn(1031, 72, device="cuda", generator=g).to(dt).requires_grad_()
    y = torch.randint(0, 1031, (37,), device="cuda", generator=g)
    ak.arcface_loss(x, w, y, backend="cpp").backward()
    ak.arcface_loss(x, w, y, backend="cpp", sub_centers=1, m2=0.0, m3=0.35).backward()
torch.cuda.synchronize()
print("cpp CUDA case ran:", x.grad.shape, w.grad.shape)
'
SAN_CASE_INDEX='
import torch, arcface_kernels as ak
from arcface_kernels.backends import resolve_backend
resolve_backend("cpp", torch.device("cuda"))   # raises if cpp has no CUDA kernels here
torch.manual_seed(0)
x = torch.randn(37, 72, device="cuda").half().requires_grad_()
w = torch.randn(1031 * 3, 72, device="cuda").half().requires_grad_()
y = torch.randint(0, 1031, (37,), device="cuda")
y[5] = -100
ak.arcface_loss(x, w, y, backend="cpp", sub_centers=3).backward()
# sample_rate < 1: the fwd/bwd ops get index = the sampled classes (fp16 weight: no copy)
head = ak.PartialFC(72, 1031, sample_rate=0.3, sub_centers=3, backend="cpp", device="cuda",
                    dtype=torch.float16)
head(x, y).backward()
assert head.weight_index is not None and head.weight_index.numel() < 1031
torch.cuda.synchronize()
print("cpp CUDA case (fp16, sub_centers=3, index) ran:", x.grad.shape,
      head.weight.grad.shape, tuple(head.weight_index.shape))
'
SAN_STEPS=("memcheck 120 memcheck SAN_CASE" "racecheck 120 racecheck SAN_CASE"
           "memcheck-fp16-index 90 memcheck SAN_CASE_INDEX")
if ! command -v compute-sanitizer >/dev/null 2>&1; then
    why="no compute-sanitizer on PATH"
elif ! "$PY" -c "import torch, arcface_kernels as ak; from arcface_kernels.backends import resolve_backend; resolve_backend('cpp', torch.device('cuda'))" >/dev/null 2>&1; then
    why="cpp backend has no CUDA kernels here"
else
    why=""
fi
for s in "${SAN_STEPS[@]}"; do
    read -r name max tool code <<< "$s"
    if [[ -n "$why" ]]; then
        NAMES+=("$name"); RESULTS+=("not run: $why"); say "== $name: not run ($why)"
    else
        step "$name" "$max" compute-sanitizer --tool "$tool" --error-exitcode 99 \
            --print-limit 20 "$PY" -c "${!code}"
    fi
done

# The static report's calibration: the predicted steps measured, then the report (sm_90a,
# bf16) with the measured column beside the predictions.
step "static-calibrate" 150 "$PY" -m bench.static.calibrate --out "$OUT/static_measured.json"
step "static-report" 150 bash -c "env -u TRITON_INTERPRET MAX_JOBS=16 '$PY' -m bench static \
    --quick --cuda-build build/gpu_build --measured '$OUT/static_measured.json' \
    --out build/static_gpu --tag static_gpu > build/static_gpu.log && \
    cp build/static_gpu/static_gpu.md '$OUT/'"

# Benchmarks: our backends, the reference and peers first (the preset's headline shapes
# come first, then the sweep over C); torch.compile last, at the headline shapes only.
LEFT=$(( BUDGET_S - (SECONDS - START) ))
step "bench" $(( LEFT > 60 ? LEFT - 45 : LEFT )) "$PY" -m bench --preset gpu --out "$OUT" \
    --tag gpu_bf16 --quiet --providers triton,triton-filter,cpp,chunked,reference,cce,cce-nofilter,liger,pml \
    --time-budget $(( LEFT > 60 ? LEFT - 80 : 10 ))
step "bench-compile" 300 "$PY" -m bench --preset gpu --out "$OUT" --tag gpu_bf16 --quiet \
    --append --no-matmul --providers compile --shapes 8192x262144x512,1024x1048576x512 \
    --time-budget 20

# The short table, last.
fail=0
for r in "${RESULTS[@]}"; do
    [[ "$r" == ok* || "$r" == "not run: no"* || "$r" == "not run: cpp"* ]] || fail=1
done
{
    echo
    if [[ -f "$OUT/gpu_bf16.md" ]]; then
        # the two headline shapes only (the sweep is in the CSV and the plot)
        awk '/^\*\*/{keep = ($0 ~ /N=8192, C=262144,/ || $0 ~ /N=1024, C=1048576,/)} keep' "$OUT/gpu_bf16.md"
    else
        echo "(no benchmark summary was written)"
    fi
    echo
    echo "| step | result |"
    echo "|---|---|"
    for i in "${!NAMES[@]}"; do
        echo "| ${NAMES[$i]} | ${RESULTS[$i]} |"
    done
    echo
    echo "gpu_check: $(( SECONDS - START ))s, exit status $fail, results in $OUT"
} | tee -a "$LOG"
exit $fail
