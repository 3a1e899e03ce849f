#!/usr/bin/env bash
# All GPU checks in one run (for a lent H100/H200), at most 10 minutes (the sum of the timeouts
# below; the inference part alone at most 5). The paper's 128K inference setting runs first, and
# its longest length first: the benchmark writes its JSON after every length, so a cut-off run
# keeps what it measured. Results go to $OUT (or ./gpu_out).
#   bash scripts/gpu_checks.sh
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
# 1. inference at the paper's setting: Llama-3.1-8B shape, bf16, K = 24, up to 128K (targets:
#    KV ratio = predicted, TTFT ratio <= 0.77, TPOT within 5% of the roofline)
timeout 300 $PY -m speed_train.bench.inference --preset llama31_8b --dtype bfloat16 --k 24 \
  --lengths 131072,32768,8192 --decode-steps 32 --runs 3 --json "$OUT/inference.json" --plot "$OUT/inference.png" \
  2>&1 | tee "$OUT/inference.txt"
# 2. exactness on GPU: flex and sdpa paths, fp32, tiny models (forward + gradients)
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_executors.py tests/test_wrappers.py \
  -k "agree or packed or full_depth or flex" 2>&1 | tail -5 | tee "$OUT/exactness.txt"
timeout 60 $PY scripts/gpu_flex_grads.py 2>&1 | tee "$OUT/flex_grads.txt"
# 3. training step benchmark (issue sizes, then a bf16 8-layer 4096-hidden model)
timeout 45 $PY -m speed_train.bench.step --runs 5 --json "$OUT/step_small.json" 2>&1 | tee "$OUT/step_small.txt"
timeout 45 $PY -m speed_train.bench.step --layers 8 --hidden 4096 --heads 32 --vocab 128256 --seq 4096 --batch 2 \
  --k 6 --dtype bfloat16 --runs 5 --json "$OUT/step_big.json" 2>&1 | tee "$OUT/step_big.txt"
