"""CUDA IPC on a real GPU: a worker process and a trainer on cuda:0 hand batches over in device memory.

* two processes, no daemon: a child process with a worker's :class:`~augserve.handoff.sender.Sender`
  writes each batch into a device slot and pushes the ``cuda_batch`` descriptor over loopback; this
  process opens the slot (once), views the images on the GPU and drops them; the slot is refilled;
  kept batches stay intact while the pool falls back to host shared memory; SIGKILL of the child leaves
  this process able to let go of everything;
* the service: ``augserve serve --backend torch --device cuda:0`` and a trainer with
  ``transport="cuda-ipc"``: every sample exactly once, on the GPU, the bytes of the frame path; SIGKILL
  of a worker mid-epoch does not hang the trainer, and no slot name is left once the daemon stops;
* ``augserve bench transport`` has a ``cuda-ipc`` row;
* ``Pipeline(out=)`` takes a tensor on the pipeline's GPU.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from augserve import protocol as P  # noqa: E402
from augserve.bench.transport import SENDERS  # noqa: E402
from augserve.handoff import shm  # noqa: E402
from augserve.handoff.cuda import CudaOpener, gpu_uuid  # noqa: E402
from augserve.handoff.device_receiver import DeviceSlotReader  # noqa: E402
from augserve.handoff.receiver import SlotReader  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEVICE = torch.device("cuda", 0)
SHAPE = (2, 64, 64, 3)


def _integration_helpers():
    """tests/integration/conftest.py as a module of its own (its daemon launcher and stream helpers)."""
    spec = importlib.util.spec_from_file_location("augserve_integration_helpers", REPO / "tests" / "integration" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


H = _integration_helpers()


@pytest.fixture
def shm_dir(monkeypatch):
    directory = tempfile.mkdtemp(prefix="augserve-gpu-", dir="/dev/shm")
    monkeypatch.setenv("AUGSERVE_SHM_DIR", directory)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def slot_names(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith(shm.PREFIX))


def pattern(k: int) -> torch.Tensor:
    """Batch ``k``'s images: uint8 N×H×W×C made on the GPU, different for every k."""
    return ((torch.arange(int(np.prod(SHAPE)), device=DEVICE) * (k + 1) + 7 * k) % 251).to(torch.uint8).view(SHAPE)


# --- two processes, no daemon ------------------------------------------------------------------------------

_WORKER = r"""
import sys
import numpy as np
import torch
import zmq
from augserve import protocol as P
from augserve.handoff.host import host_identity
from augserve.handoff.sender import Sender

directory, endpoint, gpu, slots = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
shape = (2, 64, 64, 3)
sender = Sender(directory, device="cuda:0")
if sender.gpu != gpu:
    sys.exit(f"the worker sees GPU {sender.gpu}, the trainer {gpu}")
host, why = host_identity(directory)
context = zmq.Context()
push = context.socket(zmq.PUSH)
push.setsockopt(zmq.LINGER, 0)
push.connect(endpoint)
for line in sys.stdin:
    k = int(line)
    task = P.Task(task=f"s:0:{k}", stream="s", epoch=0, index=k, ids=[k, k + 1], seed=0, dataset=P.DatasetRef(ref="digits"),
                  pipeline=P.PipelineRef(stream="s", version=1, spec={}), data="tcp://127.0.0.1:9",
                  handoff=P.Handoff(mode="shm", host=host, slots=slots, cuda=P.CudaDevice(uuid=gpu)))
    reservation = sender.reserve(task, (8, 8))
    images = reservation.images(shape)
    made = ((torch.arange(int(np.prod(shape)), device="cuda:0") * (k + 1) + 7 * k) % 251).to(torch.uint8).view(shape)
    if isinstance(images, torch.Tensor) and images.is_cuda:
        images.copy_(made)  # the pipeline's out= on the GPU
    else:
        images[...] = made.cpu().numpy()  # a host slot (the device pool is full) or private memory
    info = dict(stream="s", task=task.task, epoch=0, index=k, pipeline_version=1, worker="child")
    tensors = [("images", images if isinstance(images, torch.Tensor) else torch.from_numpy(images)),
               ("labels", np.array([k, k], dtype=np.int64)), ("sample_ids", np.array([k, k + 1], dtype=np.int64))]
    out = sender.pack(task, info, tensors, reservation)
    push.send_multipart(out.frames, copy=False)
    print(out.via, flush=True)
"""


class ChildWorker:
    """The child process and this side's PULL socket; :meth:`batch` asks for batch k and receives it."""

    def __init__(self, directory: str, slots: int) -> None:
        self.context = zmq.Context()
        self.pull = self.context.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.bind("tcp://127.0.0.1:*")
        # REPO joins PYTHONPATH rather than replacing it: on the GPU machine pyzmq and pydantic come from there.
        env = H.subprocess_env(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), AUGSERVE_SHM_DIR=directory)
        args = [sys.executable, "-c", _WORKER, directory, self.pull.getsockopt_string(zmq.LAST_ENDPOINT), gpu_uuid(DEVICE), str(slots)]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def batch(self, k: int, timeout_s: float = 60.0) -> tuple[str, P.Message]:
        self.proc.stdin.write(f"{k}\n")
        self.proc.stdin.flush()
        if not self.pull.poll(int(timeout_s * 1000)):
            self.proc.kill()
            pytest.fail(f"no batch {k} from the child worker within {timeout_s:g} s:\n{self.proc.stderr.read()[-3000:]}")
        message = P.decode(self.pull.recv_multipart(), P.WORKER_TO_CLIENT)
        return self.proc.stdout.readline().strip(), message

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            stream.close()
        self.pull.close(linger=0)
        self.context.term()


def test_two_processes_hand_batches_over_in_device_memory(shm_dir):
    uuid = gpu_uuid(DEVICE)
    reader = DeviceSlotReader(shm_dir, uuid, CudaOpener(DEVICE))
    child = ChildWorker(shm_dir, slots=2)
    try:
        # One batch at a time, dropped before the next: the one slot is refilled, opened once.
        for k in range(5):
            via, message = child.batch(k)
            assert via == "cuda-ipc" and message.type == "cuda_batch" and message.body.generation == k + 1
            got = reader.wrap(message.body, message.buffers)
            images = got["images"]
            assert images.is_cuda and images.device == DEVICE and images.dtype == torch.uint8 and tuple(images.shape) == SHAPE
            assert torch.equal(images, pattern(k)), f"batch {k}: the bytes in the slot are not the worker's"
            assert got["sample_ids"].tolist() == [k, k + 1] and not got["sample_ids"].is_cuda
            del got, images
            assert reader.flush(10.0)
        assert reader.opened == 1

        # Kept batches hold their slots: the pool (2 slots) then sends host shared memory, saying why.
        kept = []
        for k in range(5, 7):
            via, message = child.batch(k)
            assert via == "cuda-ipc"
            kept.append(reader.wrap(message.body, message.buffers)["images"])
        via, message = child.batch(7)
        assert via == "shm" and message.type == "shm_batch" and message.body.fallback.kind == "busy"
        assert torch.equal(SlotReader(shm_dir).wrap(message.body)["images"], pattern(7).cpu())
        torch.cuda.synchronize()
        assert torch.equal(kept[0], pattern(5)) and torch.equal(kept[1], pattern(6)), "a kept batch changed"

        # The worker dies while this process still holds two of its slots: letting go must not hang.
        child.proc.kill()
        child.proc.wait(timeout=30)
        started = time.monotonic()
        del kept
        assert reader.flush(10.0)
        reader.close()
        torch.cuda.synchronize()
        assert time.monotonic() - started < 20
    finally:
        child.close()
        reader.close()


# --- the service -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_daemon(tmp_path_factory):
    directory = tempfile.mkdtemp(prefix="augserve-gpu-daemon-", dir="/dev/shm")
    proc = H.launch_daemon(tmp_path_factory.mktemp("cuda-ipc"), "--backend", "torch", "--device", "cuda:0", workers=2,
                           env=H.subprocess_env(AUGSERVE_SHM_DIR=directory))  # fmt: skip
    try:
        proc.wait_ready(2, timeout=120)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("AUGSERVE_SHM_DIR", directory)  # the trainer in this process looks there too
            yield proc, directory
    finally:
        code = proc.stop(signal.SIGINT)
        leftover = slot_names(directory)
        shutil.rmtree(directory, ignore_errors=True)
    assert code == 0, f"daemon exited with {code} on SIGINT:\n{proc.log()[-4000:]}"
    assert leftover == [], "a daemon stopped cleanly leaves no slot behind"


def record(batch) -> dict:
    """A batch as host copies (its images may be on the GPU)."""
    return {"epoch": batch.epoch, "index": batch.index, "images": batch.images.cpu().numpy().copy(), "ids": batch.sample_ids.numpy().copy()}


def test_a_trainer_on_the_workers_gpu_gets_every_sample_once_in_device_memory(gpu_daemon, caplog):
    daemon, directory = gpu_daemon
    runs, devices = {}, set()
    for transport in ("cuda-ipc", "frames"):
        with caplog.at_level(logging.INFO, logger="augserve.client"):
            stream = H.open_stream(daemon.address, pipeline=H.GEOMETRIC, batch_size=16, seed=5, epochs=2, transport=transport, device="cuda:0")
        records = []
        for batch in stream:
            devices.add((transport, str(batch.images.device)))
            records.append(record(batch))
        runs[transport] = (records, dict(stream.batches_by_transport), stream.rejected_batches)
    batches = 2 * -(-H.SHAPES["n"] // 16)
    records, counts, rejected = runs["cuda-ipc"]
    assert counts == {"shm": 0, "frames": 0, "cuda-ipc": counts["cuda-ipc"]} and counts["cuda-ipc"] >= batches and rejected == 0, counts
    assert devices == {("cuda-ipc", "cuda:0"), ("frames", "cuda:0")}
    for run in (records, runs["frames"][0]):
        assert len(run) == batches
        for epoch, ids in H.ids_per_epoch(run).items():
            assert sorted(ids) == list(range(H.SHAPES["n"])), f"epoch {epoch} is not every sample exactly once"
    by_ipc, by_frames = H.images_by_sample(records), H.images_by_sample(runs["frames"][0])
    assert by_ipc.keys() == by_frames.keys()
    assert all(np.array_equal(image, by_frames[key]) for key, image in by_ipc.items()), "CUDA IPC and frames differ"
    told = [r.getMessage() for r in caplog.records if "transport cuda-ipc: batches from workers on this trainer's GPU" in r.getMessage()]
    assert len(told) == 1 and gpu_uuid(DEVICE) in told[0], told  # one INFO line for the stream that asked
    assert "transport cuda-ipc: device memory from workers on the trainer's GPU" in daemon.log()
    assert "batches in device memory on cuda:0" in daemon.log()


def test_sigkill_of_a_worker_does_not_hang_a_cuda_ipc_trainer(gpu_daemon):
    daemon, directory = gpu_daemon
    stream = H.open_stream(daemon.address, pipeline=H.GEOMETRIC, batch_size=16, seed=3, epochs=1, transport="cuda-ipc", device="cuda:0", prefetch=4)
    records, started = [], time.monotonic()
    for batch in stream:
        records.append(record(batch))
        if len(records) == 2:
            os.kill(daemon.worker_pids()[0], signal.SIGKILL)  # while the trainer reads, and holds a batch of it
    assert time.monotonic() - started < 90
    assert sorted(H.ids_per_epoch(records)[0]) == list(range(H.SHAPES["n"]))
    assert stream.batches_by_transport["cuda-ipc"] >= 1


# --- the bench and out= ------------------------------------------------------------------------------------


def test_bench_transport_has_a_cuda_ipc_row(shm_dir, tmp_path):
    env = H.subprocess_env(AUGSERVE_SHM_DIR=shm_dir, AUGSERVE_KEYS_DIR=str(tmp_path / "keys"))
    command = [sys.executable, "-m", "augserve", "bench", "transport", "--batch-images", "2", "4", "--size", "32", "--batches", "3", "--rounds", "1", "--json"]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240, cwd=REPO, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    rows, summary = lines[:-1], lines[-1]
    ipc = {row["batch_images"]: row for row in rows if row["transport"] == "cuda-ipc"}
    assert sorted(ipc) == [2, 4] and all(row["gb_per_s"] > 0 and row["batches_per_s"] > 0 for row in ipc.values())
    for entry in summary["by_batch"]:
        rates = entry["gb_per_s"]
        assert entry["cuda_ipc_vs_shm"] == pytest.approx(rates["cuda-ipc"] / rates["shm"], rel=2e-3)
    assert summary["cuda_ipc_vs_tcp"] > 0
    assert {row["transport"] for row in rows} == {"memcpy", *SENDERS, "cuda-ipc"}  # every sender measured, cuda-ipc beside them
    assert slot_names(shm_dir) == []


def test_out_takes_a_tensor_on_the_pipelines_gpu():
    import pipelines

    images = np.random.default_rng(0).integers(0, 256, (4, 40, 40, 3), dtype=np.uint8)
    pipe = pipelines.build({"ops": [{"op": "random_crop", "size": 32}, {"op": "rotate", "degrees": 20}]}, backend="torch", device="cuda:0")
    expected = pipe(images, seed=1)
    out = torch.empty((4, 32, 32, 3), dtype=torch.uint8, device="cuda:0")
    assert pipe(images, seed=1, out=out) is out and torch.equal(out, expected)
