#!/usr/bin/env bash
# The GPU check (docs/benchmarks.md, "GPU check"): what only a CUDA machine can show, in one script of under 8
# minutes on one GPU, printing one line per check:
#
#   CHECK setup: ...        a venv with torch==2.13.0 (PyPI's CUDA build) and vitlab[dev]
#   CHECK cuda-tests: ...   pytest -m cuda: the suite's CUDA-marked tests (tests/test_cuda.py and any others)
#   CHECK torchrun: ...     torchrun --nproc_per_node 1 -m vitlab train --config configs/demo.yaml, NCCL, < 1 min
#   CHECK bf16-train: ...   a bf16 training run on cuda
#   CHECK eval: ...         vitlab eval on that run's checkpoint, against the run's own test accuracy
#
# Usage, from anywhere (it works in the repository root):
#   bash benchmarks/gpu_check.sh                  # a CUDA machine with PyPI: creates and fills .venv-gpu
#   VENV=.venv bash benchmarks/gpu_check.sh       # an existing venv that has vitlab[dev] (nothing is installed)
#   VENV=.venv bash benchmarks/gpu_check.sh --cpu # the plumbing on a CPU machine: --device cpu, a few steps,
#                                                 # the CUDA tests collected and skipped, NCCL not expected
# Needs no network but PyPI (for the venv) and no dataset download: it trains on scikit-learn's digits, which
# ships with scikit-learn (Fashion-MNIST, the demo config's data, is not on a GPU box). Every step has its own
# timeout (the script never hangs); logs and runs go to $GPU_CHECK_OUT (default runs/gpu-check). Exit status 0
# when every check passes.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=cuda
for arg in "$@"; do
    case $arg in
        --cpu | --dry-run) MODE=cpu ;;
        -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "unknown argument $arg (see --help)" >&2; exit 2 ;;
    esac
done
VENV=${VENV:-.venv-gpu}
OUT=${GPU_CHECK_OUT:-runs/gpu-check}
PY=$VENV/bin/python
# seconds per step; together under 8 minutes (setup 220 + 75 + 90 + 55 + 35 = 475)
T_SETUP=220 T_TESTS=75 T_TORCHRUN=90 T_BF16=55 T_EVAL=35
if [[ $MODE == cpu ]]; then
    DEVICE=cpu STEPS=(--max-steps 3 --batch-size 16)  # a few small steps: the plumbing, not the speed
    T_TESTS=150 T_TORCHRUN=150 T_BF16=150 T_EVAL=90  # a small shared CPU (bf16 emulated): no time promised
else
    DEVICE=cuda STEPS=()
fi

mkdir -p "$OUT" && rm -rf "$OUT"/{torchrun,bf16,eval,summary.txt} "$OUT"/*.log  # this script's own, only
START=$SECONDS
PASSED=0 TOTAL=0

FAILED_LOGS=()

# report NAME PASS|FAIL DETAILS SECONDS [LOG]: the check's one line, also kept in $OUT/summary.txt
report() {
    local line="CHECK $1: $2 ($3, $4 s)"
    echo "$line" | tee -a "$OUT/summary.txt"
    TOTAL=$((TOTAL + 1))
    if [[ $2 == PASS ]]; then
        PASSED=$((PASSED + 1))
    elif [[ -n ${5:-} ]]; then
        FAILED_LOGS+=("$5")
    fi
}

# step SECONDS LOG COMMAND...: run with a time limit (the whole process group is killed at it); sets RC and TOOK
step() {
    local limit=$1 log=$2 t0=$SECONDS
    shift 2
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    RC=$?
    TOOK=$((SECONDS - t0))
}

# why COMMAND's exit status RC failed, in a few words
why() {
    if [[ $RC == 124 || $RC == 137 ]]; then echo "timed out after ${TOOK} s"; else echo "exit $RC"; fi
}

# json FILE EXPRESSION: a value from a JSON file (``d`` is the parsed object), or "?"
json() {
    "$PY" -c "import json, sys; d = json.load(open(sys.argv[1])); print($2)" "$1" 2>/dev/null || echo "?"
}

# --- setup ---------------------------------------------------------------------------------------------------
setup() {
    if [[ ! -x $PY ]]; then
        python3 -m venv "$VENV" || return 1
    fi
    if ! "$PY" -c "import vitlab, pytest, fastapi" 2>/dev/null; then
        # torch first and pinned, as the Makefile does: on a CUDA machine PyPI's wheel is the CUDA build
        "$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0 || return 1
        "$VENV/bin/pip" install -q --disable-pip-version-check -e ".[dev]" || return 1
    fi
    "$PY" -c "
import torch
cuda = torch.cuda.is_available()
print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, device: '
      + (torch.cuda.get_device_name(0) if cuda else 'none') + ', NCCL ' + str(torch.distributed.is_nccl_available()))
"
}
export -f setup
export VENV PY
step "$T_SETUP" "$OUT/setup.log" bash -c setup
SETUP_INFO=$(tail -n 1 "$OUT/setup.log")
if [[ $RC != 0 ]]; then
    report setup FAIL "$(why): $SETUP_INFO" "$TOOK" "$OUT/setup.log"
elif [[ $MODE == cuda && ($SETUP_INFO != *"device: "* || $SETUP_INFO == *"device: none"*) ]]; then
    RC=1
    report setup FAIL "no CUDA device visible to torch: $SETUP_INFO" "$TOOK" "$OUT/setup.log"
else
    report setup PASS "$MODE mode, $SETUP_INFO" "$TOOK"
fi

# the last line, and the end of each failed check's log: one run of the script is enough to see why
finish() {
    echo "GPU CHECK: $PASSED of $TOTAL passed in $((SECONDS - START)) s ($MODE mode); logs in $OUT"
    [[ $PASSED == "$TOTAL" ]] && exit 0
    for log in "${FAILED_LOGS[@]}"; do
        echo "--- last lines of $log"
        tail -n 15 "$log"
    done
    exit 1
}

if [[ $RC != 0 ]]; then
    for name in cuda-tests torchrun bf16-train eval; do report "$name" FAIL "not run: setup failed" 0; done
    finish
fi

# --- (a) the suite's CUDA-marked tests -----------------------------------------------------------------------
step "$T_TESTS" "$OUT/cuda-tests.log" "$VENV/bin/pytest" -m cuda -q -p no:cacheprovider tests
COUNTS=$(grep -E "(passed|failed|skipped|error|deselected).* in [0-9.]+s" "$OUT/cuda-tests.log" | tail -n 1 | tr -d '=')
COUNTS=${COUNTS:-no pytest summary}
if [[ $MODE == cuda ]]; then  # on a GPU nothing may skip: a skipped CUDA test is one that did not run
    if [[ $RC == 0 && $COUNTS == *passed* && $COUNTS != *skipped* ]]; then
        report cuda-tests PASS "${COUNTS# }" "$TOOK"
    else
        report cuda-tests FAIL "$(why): ${COUNTS# }" "$TOOK" "$OUT/cuda-tests.log"
    fi
elif [[ $RC == 0 || $RC == 5 ]]; then  # on a CPU they are collected and skip (5: none collected at all)
    report cuda-tests PASS "cpu mode, collected and skipped: ${COUNTS# }" "$TOOK"
else
    report cuda-tests FAIL "$(why): ${COUNTS# }" "$TOOK" "$OUT/cuda-tests.log"
fi

# --- (b) torchrun on the demo config, NCCL on a GPU ------------------------------------------------------------
# The demo config's data is Fashion-MNIST with digits as its fallback; digits is named here so that no download
# is attempted. Its 3-minute budget is shortened to 20 s of training.
RUN_B=$OUT/torchrun
step "$T_TORCHRUN" "$OUT/torchrun.log" env NCCL_DEBUG=INFO "$VENV/bin/torchrun" --standalone --nproc_per_node 1 \
    -m vitlab train --config configs/demo.yaml --data digits --device "$DEVICE" --budget 20s "${STEPS[@]}" \
    --out "$RUN_B"
DETAILS="$(json "$RUN_B/summary.json" "f\"{d['model']} on {d['data']}: {d['steps']} steps, test accuracy {d['test_accuracy']:.4f}, {d['processes']} process(es)\"")"
if [[ $RC != 0 || ! -f $RUN_B/summary.json ]]; then
    report torchrun FAIL "$(why): $(tail -n 1 "$OUT/torchrun.log" | cut -c1-160)" "$TOOK" "$OUT/torchrun.log"
elif [[ $MODE == cuda ]] && ! grep -q "NCCL INFO" "$OUT/torchrun.log"; then
    # NCCL logs at INFO as soon as a communicator is made: none means the run never used a process group
    report torchrun FAIL "$DETAILS; but NCCL was never initialised: vitlab made no process group at world size 1" "$TOOK" \
        "$OUT/torchrun.log"
elif [[ $MODE == cuda ]]; then
    report torchrun PASS "$DETAILS; NCCL $(grep -m1 -oE "NCCL version [0-9.+a-z]+" "$OUT/torchrun.log" | cut -d' ' -f3)" "$TOOK"
else
    report torchrun PASS "cpu mode (no NCCL), $DETAILS" "$TOOK"
fi

# --- (c) a bf16 training run -------------------------------------------------------------------------------------
RUN_C=$OUT/bf16
step "$T_BF16" "$OUT/bf16-train.log" "$VENV/bin/vitlab" train --data digits --model cvt_7_28 --epochs 5 \
    --precision bf16 --device "$DEVICE" "${STEPS[@]}" --out "$RUN_C"
PRECISION=$(json "$RUN_C/summary.json" "d['precision']")
DETAILS="$(json "$RUN_C/summary.json" "f\"{d['steps']} steps in {d['train_time_s']} s, test accuracy {d['test_accuracy']:.4f}\"")"
if [[ $RC == 0 && $PRECISION == bf16 ]]; then
    report bf16-train PASS "$DEVICE, precision $PRECISION, $DETAILS" "$TOOK"
else
    report bf16-train FAIL "$(why), precision $PRECISION: $(tail -n 1 "$OUT/bf16-train.log" | cut -c1-160)" "$TOOK" \
        "$OUT/bf16-train.log"
fi

# --- (d) vitlab eval on the bf16 run's checkpoint ------------------------------------------------------------------
step "$T_EVAL" "$OUT/eval.log" "$VENV/bin/vitlab" eval "$RUN_C/checkpoints/best" --data digits --out "$OUT/eval"
EVAL_ACC=$(grep -oE "accuracy [0-9.]+ on [0-9]+ images" "$OUT/eval.log" | head -n 1)
RUN_ACC=$(json "$RUN_C/summary.json" "f\"{d['test_accuracy']:.4f} on {d['test_count']} images\"")
# the same images in the same precision: equal up to bf16 rounding on another device (eval runs on the CPU),
# so at most 2 images may flip
AGREE=$("$PY" -c "
import sys
e, n = sys.argv[1].split()[1], sys.argv[1].split()[3]
print(abs(float(e) - float(sys.argv[2].split()[0])) * int(n) <= 2 + 1e-6)
" "$EVAL_ACC" "$RUN_ACC" 2>/dev/null)
if [[ $RC == 0 && $AGREE == True ]]; then
    report eval PASS "eval: $EVAL_ACC; the run's test: $RUN_ACC" "$TOOK"
else
    report eval FAIL "$(why): eval: ${EVAL_ACC:-none}; the run's test: $RUN_ACC" "$TOOK" "$OUT/eval.log"
fi

finish
