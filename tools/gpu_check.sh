#!/usr/bin/env bash
# The GPU checks of augserve in one run, for a CUDA machine without a package index (the device tool):
#   wheels for what the machine lacks travel in .whl/ (see README, "GPU checks"); results go to $OUT.
# Usage: bash tools/gpu_check.sh            (OUT defaults to ./out/gpu)
set -uo pipefail
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
if [ -z "${SKIP_WHEELS:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
echo "== GPU tests"; timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu --ignore tests/gpu/test_recipes_gpu.py 2>&1 | tail -15 | tee "$OUT/tests.txt"
# The big models' default recipes on shapes at 64² (issue 10's acceptance check), each a full default run.
echo "== recipes"; timeout 420 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_recipes_gpu.py 2>&1 | tail -15 | tee "$OUT/recipes.txt"
echo "== bench gpu"; timeout 120 python3 -m augserve bench gpu --rounds 8 --json > "$OUT/bench_gpu.jsonl" 2> "$OUT/bench_gpu.err"
tail -1 "$OUT/bench_gpu.jsonl" | python3 -c "import json,sys; from augserve.bench.gpu import format_table; print(format_table(json.loads(sys.stdin.read())))" | tee "$OUT/bench_gpu.md"
tail -3 "$OUT/bench_gpu.err"
echo "== trainer on the GPU fed by 12 CPU workers"
timeout 150 python3 -m trainer train --model resnet18 --dataset shapes --dataset-option size=96 --dataset-option n=6000 \
  --pipeline resnet --epochs 1 --batch-size 256 --lr 0.2 --workers 12 --device cuda --amp bf16 --channels-last \
  --no-tensorboard --json > "$OUT/trainer.json" 2> "$OUT/trainer.err"
tail -1 "$OUT/trainer.json"; tail -3 "$OUT/trainer.err"
