#!/usr/bin/env bash
# Every GPU measurement the project still needs, in one run of at most nine minutes on one H100/H200:
# the CUDA-only paths checked (benchmarks/gpu_checks.py: bf16 log-probs, fused AdamW's resume state, flex
# attention's backward, the compiled sampler on SmolLM2 at 512 rows whose answers end, with its graph count),
# packed training at Qwen2-7B shapes (LoRA r=16), the compiled sampler at 1 and 256 rows x 512 new
# tokens, and one whole iteration on 256 prompts with its stage times. Each stage writes its own
# file into $OUT (default runs/gpu), so a run cut short still returns the stages it finished.
#
# The GPU machine is offline, so the assets (tokenizer, prompts, SmolLM2, IFEval's checkers for the default
# principle set's rule checks) come along in a cache folder filled here first:
#     SSO_MINI_CACHE=.gpu-cache python benchmarks/make_random_model.py --fetch-only
# then on the GPU machine, with .gpu-cache carried next to the checkout:
#     SSO_MINI_CACHE=.gpu-cache bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

stage() {  # stage NAME SECONDS COMMAND...: run it under a time limit; its lines, each with the clock, in $OUT/NAME.txt
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit} s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | while IFS= read -r line; do printf '%(%T)T %s\n' -1 "$line"; done | tee "$OUT/$name.txt"
    echo "== $name: exit ${PIPESTATUS[0]}, $((SECONDS - start)) s" | tee -a "$OUT/$name.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"

stage checks 100 $PY benchmarks/gpu_checks.py
# training: one record per forward against records packed into 16k-token rows (flex_attention block masks)
stage packed_train 90 $PY benchmarks/bench_packed_train.py --device cuda --preset Qwen2-7B --lora-rank 16 \
    --records 32 --steps 1
# sampling: compile time printed apart from the steady-state rate, against transformers on the same weights
stage generate 150 $PY benchmarks/bench_generate.py --preset Qwen2-7B --device cuda --dtype bf16 --compile \
    --batches 1 256 --new-tokens 512 --repeats 1 --modes sampled
# one whole iteration on 256 prompts (random weights with the real Qwen2 tokenizer); stage times in timing.json
stage random_model 50 $PY benchmarks/make_random_model.py --preset Qwen2-7B --out /tmp/q7 --device cuda
stage iteration 150 $PY train.py --model /tmp/q7 --iterations 1 --prompts-per-iteration 256 --eval-prompts 0 \
    --max-new-tokens 512 --out /tmp/q7-run --no-progress
cp /tmp/q7-run/iter_0/timing.json "$OUT/iteration_timing.json" 2>/dev/null || true
