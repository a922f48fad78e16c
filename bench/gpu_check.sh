#!/usr/bin/env bash
# One prepared script for a session that is lent a GPU (bench/step_cost.py's per-step cost table on CUDA, plus the
# tests marked `gpu`). Run it from the repository root:
#
#     bash bench/gpu_check.sh
#
# It uses whatever python3 and torch the machine has (PYTHON=... to pick another interpreter) and does not install
# the package: the repository root goes on PYTHONPATH. Nothing is downloaded. pytorch_optimizer, if missing, is
# installed from a wheel in .whl/ when one was carried there (pure Python: pytorch_optimizer-*.whl), else
# step_cost.py leaves its SAM out.
#
# Parts, in order, each under `timeout` and inside a total budget (GPU_CHECK_BUDGET_S, default 450 s), so that a
# hanging part cannot eat the lease: a part that fails or times out is recorded (rc) and the next one runs; the
# script exits 0 when every part passed, 1 otherwise, 2 or 3 at once when CUDA or the package is missing.
#   1. environment: torch version, CUDA, GPU name (exits 2 at once if CUDA is not available)
#   2. step_cost.py --device cuda --models resnet18   (batch 256, bf16-mixed, every variant, peak memory)
#   3. step_cost.py --device cuda --models vit_s16    (batch 256)
#   4. pytest -m gpu on the test files that have gpu-marked tests
#   5. step_cost.py --device cuda --models cnn,mlp48  (the CPU table's models, on the GPU)
# The GPU-sized models come first (what the issue asks for); one step_cost process per part, so that a timeout
# loses that part's JSON only.
#
# Estimate on one H200 (not measured): ResNet-18 ~30-40 ms per forward/backward at batch 256 in bf16, ViT-S/16
# ~40-60 ms; 10 methods x (1 untimed + 3 timed repeats) x 16 steps + one peak-memory fit per method: ~1.5 min for
# resnet18, ~1.5-2 min for vit_s16, ~1 min for cnn,mlp48, ~1 min for the tests and interpreter starts: ~5 min in
# all, 7.5 min at most (the budget).
#
# Knobs (environment): GPU_CHECK_BUDGET_S, GPU_CHECK_STEPS (10), GPU_CHECK_WARMUP (5), GPU_CHECK_REPEATS (3),
# GPU_CHECK_EXTRA (more step_cost.py options), PYTHON.
#
# Output, in $OUT (set by the device tool; ./gpu_out otherwise): gpu_check.log (everything), step_cost_cuda.txt
# (the step_cost tables), step_cost_resnet18.json, step_cost_vit_s16.json, step_cost_small.json, gpu_tests.txt.

set -u

OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.." || exit 1
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || PY=python
BUDGET="${GPU_CHECK_BUDGET_S:-450}"
STEPS="${GPU_CHECK_STEPS:-10}"
WARMUP="${GPU_CHECK_WARMUP:-5}"
REPEATS="${GPU_CHECK_REPEATS:-3}"
read -r -a EXTRA <<<"${GPU_CHECK_EXTRA:-}" # more step_cost.py options, e.g. "--variants sam,ssam"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT/gpu_check.log"
TABLES="$OUT/step_cost_cuda.txt"
: >"$LOG"
: >"$TABLES"
: >"$OUT/gpu_tests.txt"
declare -a SUMMARY=()
FAILED=0

say() { echo "$*" | tee -a "$LOG"; }

# part NAME CAP_S FILE CMD...: run CMD under timeout min(CAP_S, what is left of the budget), its output into the log
# and into FILE (if not "-"); records the rc (124: timed out; "skipped": no time left).
part() {
    local name="$1" cap="$2" file="$3"
    shift 3
    local left=$((BUDGET - SECONDS))
    local limit=$((cap < left ? cap : left))
    if ((limit < 20)); then
        say "=== $name: skipped, ${left}s left of the ${BUDGET}s budget"
        SUMMARY+=("$name: skipped (no time left)")
        FAILED=1
        return
    fi
    say "=== $name (timeout ${limit}s, at ${SECONDS}s): $*"
    local started=$SECONDS rc
    if [[ "$file" == "-" ]]; then
        timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
        rc=${PIPESTATUS[0]}
    else
        timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG" "$file"
        rc=${PIPESTATUS[0]}
    fi
    local took=$((SECONDS - started))
    [[ $rc == 124 || $rc == 137 ]] && say "=== $name: TIMED OUT after ${took}s"
    say "=== $name: rc=$rc in ${took}s"
    SUMMARY+=("$name: rc=$rc, ${took}s")
    ((rc == 0)) || FAILED=1
}

# ---------------------------------------------------------------------------------------------------- 1. environment
say "=== environment ($(date -u +%FT%TZ), $PY)"
timeout -k 10 120 "$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch.__version__", torch.__version__, "| CUDA build", torch.version.cuda)
print("torch.cuda.is_available()", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("GPU", torch.cuda.get_device_name(0), f"| {p.total_memory / 2**30:.0f} GiB | {torch.cuda.device_count()} device(s)")
EOF
if ! timeout -k 10 120 "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    say "CUDA is not available to $PY (torch missing, a CPU build, or no GPU): nothing to check here, exiting."
    exit 2
fi
command -v nvidia-smi >/dev/null 2>&1 &&
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"

if ! "$PY" -c "import pytorch_optimizer" >/dev/null 2>&1; then
    wheels=(.whl/pytorch_optimizer-*.whl)
    if [[ -e "${wheels[0]}" ]]; then
        say "installing ${wheels[0]} into /tmp/site (no index, no deps)"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${wheels[0]}" 2>&1 | tee -a "$LOG"
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
    fi
fi
timeout -k 10 120 "$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib.metadata as md
import lightning_sam
print("lightning_sam from", lightning_sam.__file__)
for name in ("lightning", "torchmetrics", "pytorch_optimizer", "pytest", "pytest-timeout"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
EOF
if ! timeout -k 10 120 "$PY" -c "import lightning, lightning_sam" >/dev/null 2>&1; then
    say "lightning or lightning_sam does not import with $PY (see above): nothing to check here, exiting."
    exit 3
fi

# ---------------------------------------------------------------------------------------------------- 2-5
COMMON=(--device cuda --steps "$STEPS" --warmup "$WARMUP" --repeats "$REPEATS" "${EXTRA[@]}")
part "step_cost resnet18" 170 "$TABLES" \
    "$PY" bench/step_cost.py "${COMMON[@]}" --models resnet18 --json "$OUT/step_cost_resnet18.json"
part "step_cost vit_s16" 190 "$TABLES" \
    "$PY" bench/step_cost.py "${COMMON[@]}" --models vit_s16 --json "$OUT/step_cost_vit_s16.json"

mapfile -t GPU_TESTS < <(grep -l "pytest.mark.gpu" tests/test_*.py 2>/dev/null)
if ((${#GPU_TESTS[@]})); then
    part "pytest -m gpu" 90 "$OUT/gpu_tests.txt" \
        "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider -o timeout=60 "${GPU_TESTS[@]}"
else
    say "=== pytest -m gpu: no test file has a gpu mark"
fi

part "step_cost cnn,mlp48" 120 "$TABLES" \
    "$PY" bench/step_cost.py "${COMMON[@]}" --models cnn,mlp48 --json "$OUT/step_cost_small.json"

say ""
say "=== summary (${SECONDS}s of the ${BUDGET}s budget)"
for line in "${SUMMARY[@]}"; do say "  $line"; done
exit "$FAILED" # 0: every part ran and passed; 1: one failed, timed out or was skipped (the others still ran)
