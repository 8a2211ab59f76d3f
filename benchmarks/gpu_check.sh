#!/usr/bin/env bash
# The GPU check of issue 12 in one go, for a lent GPU machine (one H200 or H100, no network), run from the
# repository root:  bash benchmarks/gpu_check.sh
#
# 1. prints the machine's torch / CUDA / Triton / transformers, installs this project (editable, no dependencies:
#    torch and transformers stay the machine's; a transformers wheel carried in .whl/ is installed first if there is
#    one: the lent machines' image has transformers 5.17, below focal_hf's floor),
# 2. runs the GPU correctness tests but the torch.compile ones, benchmarks/test_gpu.py (at most 150 s; stopping at the
#    first failure, whose traceback then shows even if what follows runs out of time),
# 3. profiles a bf16 training step at batch 64 and inference at batch 1 of Swin-T and of Focal-T (whether the host or
#    the GPU sets their pace, phase by phase; the host's time by function; the top CUDA kernels:
#    benchmarks/profile_gpu.py; where the host waited for the GPU), and the host's time per call of each layer of the
#    Triton op (benchmarks/launch_cost.py),
# 4. what focal_sdpa's Triton kernels are worth: Focal-T's training step (batch 64) and inference (batch 128, where it
#    takes them) with them and without them (SDPA on the folded windows), benchmarks/ablation.py --without
#    triton-kernels, speed interleaved in one process, and peak memory; then the launch configurations
#    triton.autotune chose,
# 5. runs the torch.compile tests of benchmarks/test_gpu.py (at most 120 s, stopping at the first failure; among them
#    the Triton kernels traced by torch.compile),
# 6. compares Focal-T's training step and inference with those of other versions of the package, each carried as a
#    `focal_hf` folder in $BASELINES (default .gpu_baseline/focal_hf and .gpu_baseline/*/focal_hf; e.g. `mkdir -p
#    .gpu_baseline && git archive <commit> src/focal_hf | tar -x --strip-components=1 -C .gpu_baseline`, ignored by git,
#    so name .gpu_baseline in the device tool's `carry`; versions before 2026-11-28 register their kernels as an op,
#    once per process by name: of two such versions rename the op of one, e.g. `sed -i
#    s/\"triton_gathered_attention\"/\"triton_gathered_attention_old\"/ .gpu_baseline/focal_hf/modeling_focal.py`, or it
#    runs the other's kernels): benchmarks/ablation.py --against, 100 s each, for each model of $AGAINST_MODELS (default
#    focal-tiny) (its speed-up is this version's: below 1, the other version is faster),
# 7. runs the benchmark against Swin-T (bf16; by default every model at 224 and 448 px, plus torch.compile at 224;
#    $BENCH_ARGS replaces the models, sizes and modes, e.g. BENCH_ARGS="--models swin-tiny focal-tiny
#    --image-sizes 224") in what is left of the budget; interrupted, it still prints the table of what it measured.
# $PARTS picks the steps after the first (default all: "tests profile ablation compiled against bench"), e.g.
# PARTS="against" to only compare versions in a short session. Each step runs under `timeout`; the whole within
# $BUDGET_S seconds (default 540, under the device tool's 10 minutes a command). Output: $OUT/test_gpu.txt,
# $OUT/test_gpu_compiled.txt, $OUT/ablation.txt, $OUT/profile.txt, $OUT/launch_cost.txt, $OUT/against.txt,
# $OUT/bench.txt, $OUT/bench.json ($OUT defaults to ./gpu-check-output).
# Exit status non-zero if any step failed.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-$PWD/gpu-check-output}
BUDGET_S=${BUDGET_S:-540}  # the whole script, seconds
BASELINES=${BASELINES:-".gpu_baseline/focal_hf .gpu_baseline/*/focal_hf"}  # other versions to compare with, if there
BENCH_ARGS=${BENCH_ARGS:---compile}
PARTS=" ${PARTS:-tests profile ablation compiled against bench} "
AGAINST_MODELS=${AGAINST_MODELS:-focal-tiny}
part() { [[ "$PARTS" == *" $1 "* ]]; }
mkdir -p "$OUT"
PYTHON=$(command -v python3 || command -v python)
status=0

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || status=1
PIP=("$PYTHON" -m pip install -q --no-build-isolation --retries 1 --timeout 10)
if compgen -G ".whl/transformers-*.whl" >/dev/null; then
    "${PIP[@]}" --no-index --no-deps .whl/transformers-*.whl || status=1
fi
"${PIP[@]}" --no-index --no-deps -e . || {
    echo "pip install -e . failed: importing focal_hf from $PWD/src instead"
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
}
"$PYTHON" -c "import torch, triton, transformers, focal_hf
from focal_hf import modeling_focal
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA GPU'
kernels = 'with' if modeling_focal.triton_gathered_attention else 'WITHOUT'
print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), Triton {triton.__version__}, transformers',
      transformers.__version__, '|', gpu, '| focal_hf from', focal_hf.__file__, kernels, 'Triton kernels')" ||
    status=1

if part tests; then
    echo "== GPU correctness: benchmarks/test_gpu.py, all but torch.compile (${SECONDS} s)"
    timeout -k 10 150 "$PYTHON" -m pytest -x -v -p no:cacheprovider --tb=short -k "not compiled" \
        benchmarks/test_gpu.py 2>&1 | tee "$OUT/test_gpu.txt" || status=1
fi

if part profile; then
    echo "== where a training step and inference go: benchmarks/profile_gpu.py (${SECONDS} s)"
    timeout -k 10 90 "$PYTHON" benchmarks/profile_gpu.py --modes train-64 infer-1 --rows 30 2>&1 |
        tee "$OUT/profile.txt" || status=1
    timeout -k 10 60 "$PYTHON" benchmarks/launch_cost.py 2>&1 | tee "$OUT/launch_cost.txt" || status=1
fi

if part ablation; then
    echo "== what the Triton kernels are worth: benchmarks/ablation.py --without triton-kernels (${SECONDS} s)"
    timeout -k 10 120 "$PYTHON" benchmarks/ablation.py --device cuda --dtype bf16 --without triton-kernels \
        --modes train-64 infer-128 --steps 10 2>&1 | tee "$OUT/ablation.txt" || status=1
fi

if part compiled; then
    echo "== GPU correctness: benchmarks/test_gpu.py, torch.compile (${SECONDS} s)"
    timeout -k 10 120 "$PYTHON" -m pytest -x -v -p no:cacheprovider --tb=short -k compiled benchmarks/test_gpu.py \
        2>&1 | tee "$OUT/test_gpu_compiled.txt" || status=1
fi

if part against; then
    compared=0
    # shellcheck disable=SC2086  # (BASELINES: several folders and patterns; AGAINST_MODELS: several models)
    for baseline in $BASELINES; do
        [ -f "$baseline/modeling_focal.py" ] || continue
        compared=$((compared + 1))
        for model in $AGAINST_MODELS; do
            echo "== this version against the one in $baseline, $model: benchmarks/ablation.py --against (${SECONDS} s)"
            timeout -k 10 100 "$PYTHON" benchmarks/ablation.py --device cuda --dtype bf16 --against "$baseline" \
                --model "$model" --modes train-64 infer-128 --steps 30 2>&1 | tee -a "$OUT/against.txt" || status=1
        done
    done
    ((compared)) || echo "== no other version in $BASELINES: no comparison"
fi

if part bench; then
    left=$((BUDGET_S - SECONDS))
    ((left < 60)) && left=60
    echo "== benchmark ${BENCH_ARGS} (${SECONDS} s, ${left} s for it)"
    # shellcheck disable=SC2086  # (BENCH_ARGS: several arguments)
    timeout -s TERM -k 20 "$left" "$PYTHON" benchmarks/benchmark.py --device cuda --dtype bf16 $BENCH_ARGS \
        --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt" || status=1
fi

echo "== done in ${SECONDS} s, status ${status}"
exit "$status"
