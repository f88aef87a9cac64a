#!/usr/bin/env bash
# The GPU checks of augserve, for a CUDA machine without a package index (the device tool):
#   wheels for what the machine lacks travel in .whl/ (see README, "GPU checks"); results go to $OUT.
# Usage: bash tools/gpu_check.sh [STAGE ...]     (OUT defaults to ./out/gpu)
# Stages, most wanted first, each under its own timeout (a device session has ~15 minutes in all, at
# most 10 per call: run them in separate calls when time is short):
#   tests    the GPU tests but those of the stages below (~4 min)
#   ipc      CUDA IPC hand-off: its GPU tests, then bench transport with the cuda-ipc row (~8 min)
#   bench    bench gpu (torch vs DALI vs kornia, JPEG bytes → batch) and bench sampling on cuda (~3 min)
#   decode   GPU JPEG decode: the device decoder's tests and bench decoders --device cuda:0 (~6 min)
#   e2e      bench gpu-e2e: ResNet-50 bf16 fed by augserve vs DataLoader vs DALI vs synthetic (~5 min)
#   recipes  the big families' default recipes on shapes at 64² (issue 10's acceptance check, ~7 min)
#   trainer  ResNet-18 on the GPU fed by 12 CPU workers (the issue 11 baseline, ~2.5 min)
# No stage named: all of them, in that order.
set -uo pipefail
stages=("$@"); [ ${#stages[@]} -eq 0 ] && stages=(tests bench ipc decode e2e recipes trainer)
for stage in "${stages[@]}"; do
  case "$stage" in
    tests|bench|ipc|decode|e2e|recipes|trainer) ;;
    *) echo "gpu_check.sh: unknown stage '$stage' (tests, bench, ipc, decode, e2e, recipes, trainer)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
if [ -z "${SKIP_WHEELS:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

table() {  # table MODULE JSONL: the summary line of a bench's --json output as its markdown table
  tail -1 "$2" | python3 -c "import json,sys; from $1 import format_table; print(format_table(json.loads(sys.stdin.read())))"
}

stage_tests() {
  echo "== GPU tests"
  timeout 280 python3 -m pytest -q -p no:cacheprovider tests/gpu --ignore tests/gpu/test_recipes_gpu.py --ignore tests/gpu/test_device_decode_gpu.py --ignore tests/gpu/test_cuda_ipc_gpu.py 2>&1 | tail -20 | tee "$OUT/tests.txt"
}

stage_bench() {
  echo "== bench gpu"
  timeout 120 python3 -m augserve bench gpu --rounds 8 --json > "$OUT/bench_gpu.jsonl" 2> "$OUT/bench_gpu.err"
  table augserve.bench.gpu "$OUT/bench_gpu.jsonl" | tee "$OUT/bench_gpu.md"; tail -3 "$OUT/bench_gpu.err"
  echo "== bench sampling (host numpy vs device)"
  timeout 60 python3 -m augserve bench sampling --device cpu --device cuda:0 --json > "$OUT/bench_sampling.jsonl" 2> "$OUT/bench_sampling.err"
  table augserve.bench.sampling "$OUT/bench_sampling.jsonl" | tee "$OUT/bench_sampling.md"; tail -3 "$OUT/bench_sampling.err"
}

stage_ipc() {
  echo "== CUDA IPC: device-memory hand-off tests, then bench transport with its cuda-ipc row"
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_cuda_ipc_gpu.py 2>&1 | tail -25 | tee "$OUT/cuda_ipc.txt"
  timeout 200 python3 -m augserve bench transport --rounds 3 --batches 10 --json > "$OUT/bench_transport.jsonl" 2> "$OUT/bench_transport.err"
  table augserve.bench.transport "$OUT/bench_transport.jsonl" | tee "$OUT/bench_transport.md"; tail -3 "$OUT/bench_transport.err"
}

stage_decode() {
  echo "== GPU decode: device decoder tests, bench decoders --device cuda:0"
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_device_decode_gpu.py 2>&1 | tail -15 | tee "$OUT/decode_tests.txt"
  timeout 150 python3 -m augserve bench decoders --device cuda:0 --photos 6 --rounds 5 --batch 128 > "$OUT/bench_decoders_gpu.md" 2> "$OUT/bench_decoders_gpu.err"
  cat "$OUT/bench_decoders_gpu.md"; tail -3 "$OUT/bench_decoders_gpu.err"
}

stage_e2e() {
  echo "== bench gpu-e2e (ResNet-50 bf16 channels_last, 2,048 JPEGs of 500×375)"
  timeout 300 python3 -m augserve bench gpu-e2e --rounds 1 --timeout 100 --json > "$OUT/gpu_e2e.jsonl" 2> "$OUT/gpu_e2e.err"
  table trainer.bench.gpu_e2e "$OUT/gpu_e2e.jsonl" | tee "$OUT/gpu_e2e.md"; tail -8 "$OUT/gpu_e2e.err"
}

stage_recipes() {
  echo "== recipes"
  timeout 420 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_recipes_gpu.py 2>&1 | tail -15 | tee "$OUT/recipes.txt"
}

stage_trainer() {
  echo "== trainer on the GPU fed by 12 CPU workers"
  timeout 150 python3 -m trainer train --model resnet18 --dataset shapes --dataset-option size=96 --dataset-option n=6000 \
    --pipeline resnet --epochs 1 --batch-size 256 --lr 0.2 --workers 12 --device cuda --amp bf16 --channels-last \
    --no-tensorboard --json > "$OUT/trainer.json" 2> "$OUT/trainer.err"
  tail -1 "$OUT/trainer.json"; tail -3 "$OUT/trainer.err"
}

for stage in "${stages[@]}"; do "stage_$stage"; done
