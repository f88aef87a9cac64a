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

from augserve.worker import Worker, WorkerOptions

try:  # tests/integration is a package in some checkouts (tests/__init__.py) and a plain folder in others
    from .conftest import CROP_FLIP, GEOMETRIC, SHAPES, as_record, collect, freeze_a_busy_worker, ids_per_epoch, open_stream, pid_alive, subprocess_env, wait_until, write_image_folder
    from .test_service_deadlines import FakeWorker, honest_worker
except ImportError:
    from conftest import CROP_FLIP, GEOMETRIC, SHAPES, as_record, collect, freeze_a_busy_worker, ids_per_epoch, open_stream, pid_alive, subprocess_env, wait_until, write_image_folder
    from test_service_deadlines import FakeWorker, honest_worker


def _half_heavy_folder(root, served_folders) -> str:
    """An ImageFolder of 32 images in which every second one is the slow 3000×3000 PNG (hard links: a
    symlink out of the root would be refused), so each 4-image batch keeps a worker busy ~0.2 s."""
    big = next(served_folders.slow.rglob("*.png"))
    paths = write_image_folder(root, per_class=16)
    for path in paths[::2]:
        os.unlink(path)
        os.link(big, os.path.splitext(path)[0] + ".png")
    return str(root)


def test_a_killed_worker_is_respawned_and_the_epoch_stays_exactly_once(start_daemon, served_folders, tmp_path):
    """SIGKILL a worker while it holds tasks: they are re-issued (the daemon counts them), every sample
    arrives once with the bytes the library computes, and the worker is replaced."""
    root = _half_heavy_folder(tmp_path / "heavy", served_folders)
    daemon = start_daemon("--dataset", f"heavy={root}", workers=2)
    assert daemon.status()["reissued_tasks"] == 0
    source = open_dataset(root)
    stream = open_stream(daemon.address, dataset="heavy", pipeline=GEOMETRIC, batch_size=4, seed=8, epochs=1, prefetch=6)
    records, consumer_error, resume = [], [], threading.Event()

    def consume():
        try:
            for batch in stream:
                records.append(as_record(batch))
                resume.wait(60)  # hold the stream open (it cannot finish) until the kill has been counted
        except BaseException as exc:  # surfaced below
            consumer_error.append(exc)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    try:
        wait_until(lambda: records, timeout=60, interval=0.01, what="the first batch")

        victim, held = freeze_a_busy_worker(daemon)
        os.kill(victim["pid"], signal.SIGKILL)

        def reissued():
            status = daemon.status()
            [mine] = [s for s in status["streams"] if s["stream"] == stream.id]
            return status if status["reissued_tasks"] > 0 and mine["reissued"] > 0 else None

        wait_until(reissued, timeout=30, what="the killed worker's tasks to be re-issued")
    finally:
        resume.set()
    consumer.join(timeout=90)
    assert not consumer.is_alive(), "the stream stalled after a worker was killed"
    assert not consumer_error, f"the stream failed after a worker was killed: {consumer_error[0]!r}"

    assert len(records) == stream.batches_per_epoch
    assert sorted(ids_per_epoch(records)[0]) == list(range(len(source))), "the epoch lost or repeated samples after the kill"
    # Whether a copy of a re-issued batch also arrived depends on when the kill landed; either way none
    # was delivered twice (above) and none was refused as malformed.
    assert stream.rejected_batches == 0
    # A restart mid-epoch changes no byte: every image is what the library computes for (seed, epoch, id).
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


def test_a_late_copy_of_a_reissued_batch_is_dropped_as_a_duplicate(start_daemon):
    """A worker takes batch (0, 0) and goes silent; the daemon writes it off and re-issues the batch to
    an honest worker, whose copy the trainer receives. Then the first worker's copy arrives after all
    (a worker that was only slow, or whose report was lost): the trainer drops it and counts it, and the
    epoch still has every sample once."""
    daemon = start_daemon(workers=0, env=subprocess_env(AUGSERVE_HEARTBEAT_INTERVAL="0.2"))
    ghost = FakeWorker(daemon.address, "ghost", lambda task: "die", capacity=1)
    try:
        wait_until(lambda: daemon.status()["workers"], 10, what="the ghost worker to join")
        stream = open_stream(daemon.address, batch_size=20, prefetch=2, ordered=True, seed=3)
        wait_until(lambda: ghost.dead, 10, what="a task to reach the ghost")
        [task] = ghost.tasks
        assert (task.epoch, task.index) == (0, 0)
        with honest_worker(daemon.address):
            batches = iter(stream)
            first = as_record(next(batches))  # the honest worker's copy (ordered: (0, 0) comes first)
            assert (first["epoch"], first["index"]) == (0, 0)
            assert daemon.status()["reissued_tasks"] >= 1
            assert stream.duplicates_dropped == 0
            # The ghost's copy, made and sent by the real worker code with a worker key.
            late = Worker(WorkerOptions(connect=daemon.address, name="ghost"))
            try:
                report = late._run_task(task)
                assert report.type == "done", report
                # Unconsumed credits keep the stream open, so the copy cannot arrive after it ended.
                wait_until(lambda: stream.duplicates_dropped == 1, 10, what="the late copy to be dropped")
            finally:
                late.outputs.clear()
            records = [first, *(as_record(b) for b in batches)]
    finally:
        ghost.close()
    assert stream.duplicates_dropped == 1 and stream.rejected_batches == 0
    assert [(r["epoch"], r["index"]) for r in records] == [(0, k) for k in range(stream.batches_per_epoch)]
    assert sorted(ids_per_epoch(records)[0]) == list(range(SHAPES["n"]))


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
