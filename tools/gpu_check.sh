#!/usr/bin/env bash
# The GPU checks of augserve, for a CUDA machine without a package index (the device tool).
# Usage: bash tools/gpu_check.sh [STAGE ...]     (OUT defaults to ./out/gpu)
#
# A device session has 15 minutes of device time in all (each call's start and transfers count; at most
# 10 minutes a call; the machine stays warm 30 s between calls). The targets of issue 11 are judged
# against DALI, so DALI travels too, split by ../shared/tools/wheelhouse.sh into parts of <= 60 MiB
# (the tree adds ~4 MB to each call's 64 MiB). Pinned, as tested here — the `wheels:` line below
# (244 MB: 4 parts; DALI 2.4 without nvCOMP, which it loads only for its inflate operator, and without
# nvImageCodec's JPEG 2000 and TIFF libraries, whose absence it reports on import; `--dali --base`
# instead brings them and unpinned base packages in 5 parts):
# wheels: pyzmq==27.3.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 albumentations==2.0.8 albucore==0.0.24 stringzilla==5.3.2 simsimd==6.5.16 kornia==0.9.0 kornia_rs==0.2.0 nvidia-dali-cuda130==2.4.0 astunparse==1.6.3 gast==0.7.0 optree==0.20.0 makefun==1.16.0 libcst==1.9.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.3.2.43 nvtx==0.2.17
#   here, once:   echo /.wh/ >> .git/info/exclude
#                 bash ../shared/tools/wheelhouse.sh .wh $(sed -n 's/^# wheels: //p' tools/gpu_check.sh)
#   calls 1-4, back to back, kind nvidia-h100-x1, carry [".wh/partK"], timeout_s 120:
#                 mkdir -p /tmp/w && cp .wh/partK/* /tmp/w/
#   call 5 (timeout_s 560): bash tools/gpu_check.sh bench e2e           the figures of section 4 and 5 (~7 min)
#   call 6 (the rest):      SKIP_WHEELS=1 bash tools/gpu_check.sh tests ipc   (~6 min; decode if time is left)
# The first call also starts the machine (1-2 minutes). If fewer than ~10 minutes are left after the
# copies, run `bench` alone in call 5. Without DALI (no time for the copies), carry .whl (below).
#
# Wheels. The machine has CUDA PyTorch, torchvision, OpenCV, pytest (with pytest-timeout) but not
# pyzmq, pydantic, albumentations, kornia, nvImageCodec or DALI. This script installs, into /tmp/site
# (again on every call; SKIP_WHEELS=1 skips that on a warm machine), the wheels in the chunks of
# /tmp/w (the parts above) and those in .whl/ (ignored by git: `echo /.whl/ >> .git/info/exclude`;
# carry `.whl`), a wheel in both taken once. Without DALI (~45 MB, one call):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pyzmq==27.3.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
#     typing-inspection==0.4.5 typing-extensions==4.16.0 albumentations==2.0.8 albucore==0.0.24 \
#     stringzilla==5.3.2 simsimd==6.5.16 kornia==0.9.0 kornia_rs==0.2.0 \
#     nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.3.2.43
# (pydantic pins pydantic-core exactly: an unpinned pair can break every import.) The preflight below
# prints the image's OpenCV: augserve needs >= 5 (exact float bilinear; the GPU tests compare against
# the OpenCV backend within 0.05-0.1 levels). If it prints 4.x, carry opencv-python-headless==5.1.0.95
# (64 MB: a call of its own, before the others) and expect the parity tests to fail until it is installed.
#
# Results go to $OUT: gpu.txt (the machine and the preflight), one markdown table per bench, and
# gpu_check.tgz with every full log, pytest's JUnit XML and the benches' JSON (the device tool returns
# at most 8 files). Stages, each under its own timeout:
#   tests    the GPU tests but those of the stages below (~3 min)
#   bench    bench gpu (in memory and from JPEG files: torch vs DALI's own pipelines vs kornia, the
#            targets judged) and bench sampling (~3 min)
#   ipc      CUDA IPC hand-off: its GPU tests, then bench transport with the cuda-ipc row (~3 min)
#   decode   GPU JPEG decode: the device decoder's tests and bench decoders --device cuda:0 (~4 min)
#   e2e      bench gpu-e2e (ResNet-50 bf16 fed by augserve vs DataLoader vs DALI vs synthetic) and its test (~5 min)
#   recipes  the big families' default recipes on shapes at 64² (issue 10's acceptance check, ~7 min)
#   trainer  ResNet-18 on the GPU fed by 12 CPU workers (the issue 11 baseline, ~2.5 min)
# No stage named: tests bench ipc.
set -uo pipefail
stages=("$@"); [ ${#stages[@]} -eq 0 ] && stages=(tests bench ipc)
for stage in "${stages[@]}"; do
  case "$stage" in
    tests|bench|ipc|decode|e2e|recipes|trainer) ;;
    *) echo "gpu_check.sh: unknown stage '$stage' (tests, bench, ipc, decode, e2e, recipes, trainer)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
install_wheels() {  # the wheels of /tmp/w's chunks and of .whl/, each file name once, into /tmp/site
  local wheels=() seen=" " wheel
  if ls /tmp/w/chunk.* >/dev/null 2>&1; then
    rm -rf /tmp/wh && mkdir -p /tmp/wh
    cat /tmp/w/chunk.* | tar x -C /tmp/wh || { echo "gpu_check.sh: the chunks in /tmp/w do not make a whole archive: copy every part of .wh first ($(ls /tmp/w | tr '\n' ' '))" >&2; return 1; }
  fi
  for wheel in /tmp/wh/*.whl .whl/*.whl; do
    [ -f "$wheel" ] || continue
    case "$seen" in *" ${wheel##*/} "*) continue ;; esac
    seen="$seen${wheel##*/} "; wheels+=("$wheel")
  done
  [ ${#wheels[@]} -eq 0 ] && return 0
  echo "installing ${#wheels[@]} wheels into /tmp/site"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}"
}
if [ -z "${SKIP_WHEELS:-}" ]; then install_wheels || exit 1; fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:$PWD  # also on a warm rerun that skipped the install

preflight() {  # what the machine has, before any stage spends minutes on a missing piece
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  df -h /dev/shm | tail -1
  python3 - <<'EOF'
import importlib
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE: no CUDA device")
for name in ("cv2", "zmq", "pydantic", "albumentations", "kornia", "nvidia.nvimgcodec", "nvidia.dali", "pytest_timeout"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "installed"))
    except Exception as exc:  # noqa: BLE001 - report and go on: the stages skip or fail with their own message
        print(name, "MISSING:", type(exc).__name__, exc)
import cv2
if int(cv2.__version__.split(".")[0]) < 5:
    print(f"WARNING: OpenCV {cv2.__version__} < 5: the parity tests against the OpenCV backend will fail (carry opencv-python-headless==5.1.0.95)")
try:
    from nvidia import nvimgcodec
    nvimgcodec.Decoder(device_id=0)
    print("nvImageCodec decodes on cuda:0")
except Exception as exc:  # noqa: BLE001
    print("WARNING: no nvImageCodec decoder on cuda:0:", type(exc).__name__, exc)
EOF
}
preflight 2>&1 | tee "$OUT/gpu.txt"

PYTEST_TIMEOUT=(); python3 -c "import pytest_timeout" 2>/dev/null && PYTEST_TIMEOUT=(--timeout=150)
run_pytest() {  # run_pytest NAME SECONDS ARGS...: the whole log and JUnit XML kept, the tail shown
  local name=$1 seconds=$2; shift 2
  timeout "$seconds" python3 -m pytest -q -rA -p no:cacheprovider "${PYTEST_TIMEOUT[@]}" --junitxml="$OUT/$name.xml" "$@" > "$OUT/$name.log" 2>&1
  echo "pytest $name: exit $?"; tail -25 "$OUT/$name.log"
}
table() {  # table MODULE JSONL: the summary line of a bench's --json output as its markdown table
  tail -1 "$2" | python3 -c "import json,sys; from $1 import format_table; print(format_table(json.loads(sys.stdin.read())))"
}

stage_tests() {
  echo "== GPU tests"
  run_pytest tests 240 tests/gpu --ignore tests/gpu/test_recipes_gpu.py --ignore tests/gpu/test_device_decode_gpu.py \
    --ignore tests/gpu/test_cuda_ipc_gpu.py --ignore tests/gpu/test_bench_gpu_e2e_cuda.py
}

stage_bench() {
  echo "== bench gpu (in memory and from JPEG files; torch vs DALI's own pipelines vs kornia vs torchvision)"
  timeout 200 python3 -m augserve bench gpu --rounds 8 --json > "$OUT/bench_gpu.jsonl" 2> "$OUT/bench_gpu.err"
  table augserve.bench.gpu "$OUT/bench_gpu.jsonl" | tee "$OUT/bench_gpu.md"; tail -3 "$OUT/bench_gpu.err"
  echo "== bench sampling (host numpy vs device)"
  timeout 60 python3 -m augserve bench sampling --device cpu --device cuda:0 --json > "$OUT/bench_sampling.jsonl" 2> "$OUT/bench_sampling.err"
  table augserve.bench.sampling "$OUT/bench_sampling.jsonl" | tee "$OUT/bench_sampling.md"; tail -3 "$OUT/bench_sampling.err"
}

stage_ipc() {
  echo "== CUDA IPC: device-memory hand-off tests, then bench transport with its cuda-ipc row"
  run_pytest cuda_ipc 150 tests/gpu/test_cuda_ipc_gpu.py
  timeout 180 python3 -m augserve bench transport --rounds 3 --json > "$OUT/bench_transport.jsonl" 2> "$OUT/bench_transport.err"
  table augserve.bench.transport "$OUT/bench_transport.jsonl" | tee "$OUT/bench_transport.md"; tail -3 "$OUT/bench_transport.err"
}

stage_decode() {
  echo "== GPU decode: device decoder tests (not the slow out-of-memory one), bench decoders --device cuda:0"
  run_pytest decode 150 -m "not slow" tests/gpu/test_device_decode_gpu.py
  timeout 100 python3 -m augserve bench decoders --device cuda:0 --photos 6 --rounds 5 --batch 128 > "$OUT/bench_decoders_gpu.md" 2> "$OUT/bench_decoders_gpu.err"
  cat "$OUT/bench_decoders_gpu.md"; tail -3 "$OUT/bench_decoders_gpu.err"
}

stage_e2e() {
  echo "== bench gpu-e2e (ResNet-50 bf16 channels_last, 2,048 JPEGs of 500×375)"
  timeout 240 python3 -m augserve bench gpu-e2e --rounds 1 --timeout 100 --json > "$OUT/gpu_e2e.jsonl" 2> "$OUT/gpu_e2e.err"
  table trainer.bench.gpu_e2e "$OUT/gpu_e2e.jsonl" | tee "$OUT/gpu_e2e.md"; tail -8 "$OUT/gpu_e2e.err"
  run_pytest gpu_e2e_test 120 tests/gpu/test_bench_gpu_e2e_cuda.py
}

stage_recipes() {
  echo "== recipes"
  run_pytest recipes 420 tests/gpu/test_recipes_gpu.py
}

stage_trainer() {
  echo "== trainer on the GPU fed by 12 CPU workers"
  timeout 150 python3 -m trainer train --model resnet18 --dataset shapes --dataset-option size=96 --dataset-option n=6000 \
    --pipeline resnet --epochs 1 --batch-size 256 --lr 0.2 --workers 12 --device cuda --amp bf16 --channels-last \
    --no-tensorboard --json > "$OUT/trainer.json" 2> "$OUT/trainer.err"
  tail -1 "$OUT/trainer.json"; tail -3 "$OUT/trainer.err"
}

for stage in "${stages[@]}"; do "stage_$stage"; done
# Everything but gpu.txt and the tables in one archive: the device tool brings back at most 8 files.
( cd "$OUT" && shopt -s nullglob && files=(*.log *.xml *.jsonl *.err *.json) \
    && if [ ${#files[@]} -gt 0 ]; then tar czf gpu_check.tgz "${files[@]}" && rm -f "${files[@]}"; fi )
ls "$OUT"
