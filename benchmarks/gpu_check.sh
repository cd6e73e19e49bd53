#!/usr/bin/env bash
# The GPU check of the kernels and the extension, in one go (at most 10 minutes on an H100/H200):
#   1. builds mtbert (the C++/CUDA extension) in the venv,
#   2. runs the kernel tests natively on the GPU (tests/conftest.py only turns on Triton's
#      interpreter when there is no CUDA): attention, add+LayerNorm, bias+GELU, the unpadded
#      path, parity with transformers, and the CUDA optimizer / gradient-combination ops,
#   3. runs every benchmark suite on the GPU (attention, add+LayerNorm, encoder training step in
#      bf16, AdamW, PCGrad, the end-to-end multitask step) and renders their report.
# Everything lands in benchmarks/results/gpu-<UTC time>/ (log.txt, tests.xml, gpu.json, REPORT.md);
# when $OUT is set (a device runner's output folder) it is copied there too. Commit that folder.
#
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
RESULTS=benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$RESULTS"
exec > >(tee "$RESULTS/log.txt") 2>&1
status=0

step() {  # step NAME SECONDS COMMAND...: runs one phase under a time limit, remembers failures
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s) $(date -u +%T)"
    timeout "$limit" "$@"
    local rc=$?
    [ $rc -eq 0 ] || { echo "=== $name FAILED (exit $rc)"; status=1; }
    return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); assert torch.cuda.is_available(), 'no CUDA device visible'" || exit 1

step build 120 "$PY" -m pip install -q --no-build-isolation --no-deps -e .

step tests 180 "$PY" -m pytest -q -p no:cacheprovider --junitxml="$RESULTS/tests.xml" \
    tests/test_kernels_attention.py tests/test_kernels_layer_norm.py tests/test_kernels_bias_gelu.py \
    tests/test_unpadded.py tests/test_model.py tests/test_adamw.py tests/test_pcgrad.py tests/test_flat_buffers.py

step benchmarks 270 "$PY" -m pytest -q -p no:cacheprovider -o python_files='bench_*.py' benchmarks \
    --benchmark-json="$RESULTS/gpu.json" --benchmark-columns=median,iqr,rounds

[ -s "$RESULTS/gpu.json" ] && step report 20 "$PY" benchmarks/report.py "$RESULTS/gpu.json" --out "$RESULTS/REPORT.md"

echo "=== done $(date -u +%T), status $status; results in $RESULTS"
if [ -n "${OUT:-}" ]; then cp -r "$RESULTS" "$OUT/"; fi
exit $status
