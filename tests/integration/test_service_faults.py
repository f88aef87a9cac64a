"""Faults: a worker killed mid-epoch, trainers that vanish, corrupt files in a served ImageFolder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import pipelines
import torch

from augserve.client import StreamError
from augserve.sources import open_dataset

try:  # tests/integration is a package in some checkouts (tests/__init__.py) and a plain folder in others
    from .conftest import CROP_FLIP, GEOMETRIC, SHAPES, as_record, collect, ids_per_epoch, open_stream, pid_alive, subprocess_env, wait_until
except ImportError:
    from conftest import CROP_FLIP, GEOMETRIC, SHAPES, as_record, collect, ids_per_epoch, open_stream, pid_alive, subprocess_env, wait_until


def test_a_killed_worker_is_respawned_and_the_epoch_stays_exactly_once(start_daemon):
    daemon = start_daemon(workers=2)
    n = len(open_dataset("digits"))
    stream = open_stream(daemon.address, dataset="digits", pipeline=GEOMETRIC, batch_size=32, seed=8, epochs=1, prefetch=8)
    records, consumer_error = [], []

    def consume():
        try:
            for batch in stream:
                records.append(as_record(batch))
                time.sleep(0.01)
        except BaseException as exc:  # surfaced below
            consumer_error.append(exc)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    wait_until(lambda: len(records) >= 5, timeout=30, interval=0.01, what="the first batches")

    def busy_worker():
        workers = [w for w in daemon.status()["workers"] if w["busy"] > 0]
        return workers[0] if workers else None

    victim = wait_until(busy_worker, timeout=10, interval=0.005, what="a worker holding a task")
    os.kill(victim["pid"], signal.SIGKILL)
    consumer.join(timeout=90)
    assert not consumer.is_alive(), "the stream stalled after a worker was killed"
    assert not consumer_error, f"the stream failed after a worker was killed: {consumer_error[0]!r}"

    per_epoch = ids_per_epoch(records)
    assert len(records) == stream.batches_per_epoch
    for epoch in (0,):
        assert sorted(per_epoch[epoch]) == list(range(n)), f"epoch {epoch} lost or repeated samples after the kill"
    # A restart mid-epoch changes no byte: every image is what the library computes for (seed, epoch, id).
    source = open_dataset("digits")
    pipe = pipelines.build(pipelines.PipelineSpec.model_validate(GEOMETRIC), backend="albumentations")
    for record in records:
        ids = record["ids"].tolist()
        expected = pipe([source.load(i) for i in ids], seed=8, epoch=record["epoch"], sample_ids=ids).numpy()
        np.testing.assert_array_equal(record["images"], expected, err_msg=f"batch {record['epoch']}/{record['index']}")
    def respawned():
        status = daemon.status()
        pids = {w["pid"] for w in status["workers"]}
        return status if len(pids) == 2 and victim["pid"] not in pids else None

    status = wait_until(respawned, timeout=30, what="the respawned worker to join")
    assert status["worker_restarts"] >= 1
    assert not pid_alive(victim["pid"])
    # The respawned worker serves streams like the others.
    assert sum(len(r["ids"]) for r in collect(open_stream(daemon.address, batch_size=16, prefetch=8))) == SHAPES["n"]


def test_a_task_longer_than_the_heartbeat_liveness_does_not_get_its_worker_killed(start_daemon, served_folders, tmp_path):
    """A worker busy with one long task (a big batch of large images, a first task that lists a huge
    ImageFolder, a CUDA start-up) is working, not hung. Here one batch takes ~2 s to decode while the
    daemon's liveness is 5 × 0.2 s = 1 s: the batch must still arrive, without the worker being killed
    and the task re-issued to the next victim forever."""
    big = next(served_folders.slow.rglob("*.png"))  # 3000×3000, ~0.1 s to decode
    root = tmp_path / "heavy"
    (root / "a").mkdir(parents=True)
    for k in range(16):
        os.link(big, root / "a" / f"{k:03d}.png")  # hard links: a symlink out of the root would be refused
    daemon = start_daemon("--dataset", f"heavy={root}", workers=1, env=subprocess_env(AUGSERVE_HEARTBEAT_INTERVAL="0.2"))
    stream = open_stream(daemon.address, dataset="heavy", pipeline=CROP_FLIP, batch_size=16, batch_timeout=8)
    records = collect(stream)
    assert sorted(ids_per_epoch(records)[0]) == list(range(16))
    assert daemon.status()["worker_restarts"] == 0


def _stream_ids(daemon) -> set[str]:
    return {s["stream"] for s in daemon.status()["streams"]}


def test_a_trainer_that_closes_without_consuming_disappears_at_once(daemon):
    stream = open_stream(daemon.address, dataset="digits", pipeline="lenet5", batch_size=64, epochs=3, prefetch=4)
    assert stream.id in _stream_ids(daemon)
    time.sleep(0.3)  # let its first batches reach the trainer's socket unread
    stream.close()
    wait_until(lambda: stream.id not in _stream_ids(daemon), timeout=3, what="the closed stream to leave the daemon's status")
    assert sum(len(r["ids"]) for r in collect(open_stream(daemon.address, batch_size=32))) == SHAPES["n"]


def test_a_trainer_killed_with_sigkill_is_dropped_and_another_trainer_completes(start_daemon):
    # A short heartbeat so "silent for 2 × liveness" is 5 s; also shows AUGSERVE_* settings apply.
    heartbeat = 0.5
    daemon = start_daemon(workers=2, env=subprocess_env(AUGSERVE_HEARTBEAT_INTERVAL=str(heartbeat)))
    script = (
        "import sys, time\n"
        "from augserve import connect\n"
        f"stream = connect({daemon.address!r}, dataset='digits', pipeline='lenet5', batch_size=64, epochs=5, prefetch=4, timeout=10, batch_timeout=30)\n"
        "it = iter(stream)\n"
        "next(it); next(it)\n"
        "print(stream.id, flush=True)\n"
        "time.sleep(120)\n"
    )
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(), stdin=subprocess.DEVNULL)
    try:
        line = []
        reader = threading.Thread(target=lambda: line.append(trainer.stdout.readline().strip()), daemon=True)
        reader.start()
        reader.join(timeout=60)
        assert line and line[0], f"the trainer subprocess did not start streaming: {trainer.poll()} {trainer.stderr.read() if trainer.poll() is not None else ''}"
        stream_id = line[0]
        assert stream_id in _stream_ids(daemon)
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(timeout=10)
        killed_at = time.monotonic()
        # Another trainer runs to completion while the dead one is still being timed out.
        records = collect(open_stream(daemon.address, dataset="digits", pipeline=CROP_FLIP, batch_size=64))
        assert sorted(ids_per_epoch(records)[0]) == list(range(len(open_dataset("digits"))))
        wait_until(lambda: stream_id not in _stream_ids(daemon), timeout=2 * heartbeat * 5 + 3, what="the killed trainer's stream to be dropped")
        assert time.monotonic() - killed_at < 2 * heartbeat * 5 + 3
        daemon.assert_alive()
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait(timeout=10)


# --- corrupt files -----------------------------------------------------------------------------------


def test_corrupt_files_are_skipped_counted_and_reported(daemon, served_folders):
    bad = sorted(served_folders.corrupt)
    source = open_dataset(str(served_folders.folder))
    assert len(source) == 63
    before = daemon.status()["skipped_corrupt"]
    stream = open_stream(daemon.address, dataset="folder", pipeline=CROP_FLIP, batch_size=8, seed=1)
    assert stream.classes == ["a", "b"]
    records = collect(stream)
    assert len(records) == stream.batches_per_epoch
    ids = ids_per_epoch(records)[0]
    good_ids = [i for i, p in enumerate(source.paths) if p not in bad]
    assert sorted(ids) == good_ids, "every readable image exactly once, no corrupt one"
    for record in records:
        np.testing.assert_array_equal(record["labels"], source.labels[record["ids"]])
    assert sorted(p for r in records for p in r["skipped"]) == bad
    # A worker reports "done" to the daemon just after it sent the batch: allow that report a moment.
    wait_until(lambda: daemon.status()["skipped_corrupt"] >= before + len(bad), timeout=3, what="the daemon to count the corrupt files")
    assert daemon.status()["skipped_corrupt"] == before + len(bad)


def test_corrupt_file_with_on_error_raise_ends_the_stream_with_its_path(daemon, served_folders):
    stream = open_stream(daemon.address, dataset="folder", pipeline=CROP_FLIP, batch_size=8, on_error="raise")
    with pytest.raises(StreamError) as info:
        collect(stream)
    assert any(path in str(info.value) for path in served_folders.corrupt), str(info.value)
    wait_until(lambda: stream.id not in _stream_ids(daemon), timeout=3, what="the failed stream to end")
    # The daemon and its workers carry on.
    daemon.assert_alive()
    skipped = collect(open_stream(daemon.address, dataset="folder", pipeline=CROP_FLIP, batch_size=8))
    assert sum(len(r["ids"]) for r in skipped) == 60


def test_a_batch_whose_images_are_all_corrupt_keeps_the_stream_dtype_and_layout(daemon, served_folders):
    """With ``on_error="skip"`` a batch may lose every image (here: batches of one, three corrupt
    files). The stream must go on, and every batch the trainer gets must still be the documented output
    (here float32 N×C×H×W from ``normalize``) so ``model(batch.images)`` works; an empty batch may
    also be left out, as long as every good image arrives once."""
    spec = {"ops": [*CROP_FLIP["ops"], {"op": "normalize"}]}
    stream = open_stream(daemon.address, dataset="folder", pipeline=spec, batch_size=1, shuffle=False, prefetch=16)
    shapes, ids = {}, []
    for batch in stream:
        shapes[(batch.index, tuple(batch.skipped))] = (batch.images.dtype, tuple(batch.images.shape[1:]))
        ids.extend(batch.sample_ids.tolist())
    source = open_dataset(str(served_folders.folder))
    assert sorted(ids) == [i for i, p in enumerate(source.paths) if p not in served_folders.corrupt]
    assert 60 <= len(shapes) <= 63
    wrong = {key: value for key, value in shapes.items() if value != (torch.float32, (3, 32, 32))}
    assert not wrong, f"batches with another dtype/layout: {wrong}"
