#!/usr/bin/env bash
# The GPU check of issue 12 in one go, for a lent GPU machine (one H200 or H100, no network), run from the
# repository root:  bash benchmarks/gpu_check.sh
#
# 1. prints the machine's torch / CUDA / transformers, installs this project (editable, no dependencies: torch and
#    transformers stay the machine's; a transformers wheel carried in .whl/ is installed first if there is one),
# 2. runs the GPU correctness tests, benchmarks/test_gpu.py, if that file exists (the fused Triton candidate's too),
# 3. compares Focal-T's training step (batch 64) and inference (batch 128) with the fused Triton candidate
#    (`focal_triton`, benchmarks/triton_attention.py) and with the default focal_sdpa: benchmarks/ablation.py
#    --attention, speed interleaved in one process, and peak memory,
# 4. profiles one bf16 training step of Focal-T with focal_triton (the top CUDA kernels, benchmarks/profile_gpu.py;
#    stop 17 profiled focal_sdpa),
# 5. compares Focal-T's training step (batch 64) and inference (batch 128) with those of another version of the
#    package, if one is carried in $BASELINE (default .gpu_baseline/focal_hf; e.g. `mkdir -p .gpu_baseline &&
#    git archive 0143432 src/focal_hf | tar -x --strip-components=1 -C .gpu_baseline`, ignored by git, so name it
#    in the device tool's `carry`): benchmarks/ablation.py --against, speed interleaved in one process, and peak
#    memory,
# 6. runs the benchmark against Swin-T (bf16, 224 and 448 px, plus torch.compile at 224).
# (benchmarks/gather_kernels.py, which times the key/value gather alone, is no longer run here: the fused candidate
# does not gather.) Everything ends within about 9 minutes, under the device tool's 10 minutes a command: each step
# runs under `timeout`, the benchmark in what is left of the budget; interrupted, it still prints the table of what it
# measured. Output: $OUT/test_gpu.txt, $OUT/triton.txt, $OUT/profile.txt, $OUT/ablation.txt, $OUT/bench.txt,
# $OUT/bench.json ($OUT defaults to ./gpu-check-output). Exit status non-zero if any step failed.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-$PWD/gpu-check-output}
BUDGET_S=${BUDGET_S:-540}  # the whole script, seconds
BASELINE=${BASELINE:-.gpu_baseline/focal_hf}  # another version of the package to compare with, if there
mkdir -p "$OUT"
PYTHON=$(command -v python3 || command -v python)
status=0

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || status=1
"$PYTHON" -c "import torch,transformers;print(torch.__version__, torch.cuda.is_available(), transformers.__version__)"
PIP=("$PYTHON" -m pip install -q --no-build-isolation --retries 1 --timeout 10)
if compgen -G ".whl/transformers-*.whl" >/dev/null; then
    "${PIP[@]}" --no-index --no-deps .whl/transformers-*.whl || status=1
fi
if "$PYTHON" -c "import transformers" 2>/dev/null; then
    "${PIP[@]}" --no-index --no-deps -e .
else
    "${PIP[@]}" -e .
fi || {
    echo "pip install -e . failed: importing focal_hf from $PWD/src instead"
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
}
"$PYTHON" -c "import torch, transformers, focal_hf
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA GPU'
print('focal_hf from', focal_hf.__file__, '| transformers', transformers.__version__, '|', gpu)" ||
    status=1

echo "== GPU correctness: benchmarks/test_gpu.py"
if [ -f benchmarks/test_gpu.py ]; then
    timeout -k 10 150 "$PYTHON" -m pytest -q -p no:cacheprovider benchmarks/test_gpu.py 2>&1 | tee "$OUT/test_gpu.txt" ||
        status=1
else
    echo "benchmarks/test_gpu.py does not exist: skipped"
fi

echo "== the fused Triton candidate against focal_sdpa: benchmarks/ablation.py --attention focal_triton"
timeout -k 10 150 "$PYTHON" benchmarks/ablation.py --device cuda --dtype bf16 --attention focal_triton \
    --modes train-64 infer-128 --steps 10 2>&1 | tee "$OUT/triton.txt" || status=1

echo "== where a Focal-T training step with focal_triton goes: benchmarks/profile_gpu.py"
timeout -k 10 75 "$PYTHON" benchmarks/profile_gpu.py --models focal-tiny --rows 20 --attention focal_triton 2>&1 |
    tee "$OUT/profile.txt" || status=1

echo "== this version against the one in $BASELINE: benchmarks/ablation.py --against"
if [ -f "$BASELINE/modeling_focal.py" ]; then
    timeout -k 10 100 "$PYTHON" benchmarks/ablation.py --device cuda --dtype bf16 --against "$BASELINE" \
        --modes train-64 infer-128 --steps 10 2>&1 | tee "$OUT/ablation.txt" || status=1
else
    echo "no $BASELINE/modeling_focal.py: skipped"
fi

left=$((BUDGET_S - SECONDS))
((left < 60)) && left=60
echo "== benchmark (${left} s left)"
timeout -s TERM -k 20 "$left" "$PYTHON" benchmarks/benchmark.py --device cuda --dtype bf16 --compile \
    --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt" || status=1
echo "== done in ${SECONDS} s, status ${status}"
exit "$status"
