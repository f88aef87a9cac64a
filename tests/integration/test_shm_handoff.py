"""The shared-memory hand-off through a real daemon, real workers and real trainers (processes, sockets,
tmpfs): every sample once, the bytes of the frame path, kept batches intact, a /dev/shm too small
falling back with a warning, and no segment left behind when a worker or a trainer is SIGKILLed.

Each daemon here keeps its slots in a directory of its own under /dev/shm (``AUGSERVE_SHM_DIR``, which
the trainer in this process reads too), so "no segment left" is checked against that directory alone.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
import zmq

from augserve import protocol as P
from augserve.handoff import shm
from augserve.handoff.host import host_identity
from augserve.status import format_status

try:  # tests/integration is a package in some checkouts (tests/__init__.py) and a plain folder in others
    from .conftest import CROP_FLIP, GEOMETRIC, SHAPES, as_record, collect, ids_per_epoch, images_by_sample, launch_daemon, open_stream, raw_data_socket, raw_dealer, subprocess_env, wait_until
except ImportError:
    from conftest import CROP_FLIP, GEOMETRIC, SHAPES, as_record, collect, ids_per_epoch, images_by_sample, launch_daemon, open_stream, raw_data_socket, raw_dealer, subprocess_env, wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.isdir("/dev/shm"), reason="shared-memory hand-off needs Linux and /dev/shm")

BATCHES = -(-SHAPES["n"] // 16)  # per epoch, at batch size 16


def slot_names(directory: str, pids=None) -> list[str]:
    """Slot names in ``directory`` (made by one of ``pids`` when given)."""
    found = [n for n in os.listdir(directory) if n.startswith(shm.PREFIX)]
    if pids is not None:
        found = [n for n in found if int(n[len(shm.PREFIX) :].split("-")[1]) in set(pids)]
    return sorted(found)


def fresh_shm_dir() -> str:
    return tempfile.mkdtemp(prefix="augserve-it-", dir="/dev/shm")


@pytest.fixture
def shm_dir(monkeypatch):
    directory = fresh_shm_dir()
    monkeypatch.setenv("AUGSERVE_SHM_DIR", directory)  # the trainer in this process looks there too
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One daemon with two workers for the tests that do not disturb it, and its shm directory."""
    directory = fresh_shm_dir()
    proc = launch_daemon(tmp_path_factory.mktemp("shm-daemon"), workers=2, env=subprocess_env(AUGSERVE_SHM_DIR=directory))
    try:
        proc.wait_ready(2)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("AUGSERVE_SHM_DIR", directory)  # the trainer in this process looks there too
            yield proc, directory
    finally:
        code = proc.stop(signal.SIGINT)
    assert code == 0, f"daemon exited with {code} on SIGINT:\n{proc.log()[-4000:]}"
    assert slot_names(directory) == [], "a daemon stopped cleanly leaves no slot behind"
    shutil.rmtree(directory, ignore_errors=True)


def test_shared_memory_delivers_every_sample_once_with_the_bytes_of_frames(shared):
    daemon, directory = shared
    runs = {}
    for transport in ("shm", "frames"):
        stream = open_stream(daemon.address, pipeline=GEOMETRIC, batch_size=16, seed=5, epochs=2, transport=transport)
        runs[transport] = (collect(stream), dict(stream.batches_by_transport), stream.rejected_batches)
    (shm_records, shm_counts, shm_rejected), (frame_records, frame_counts, _) = runs["shm"], runs["frames"]
    assert shm_counts["frames"] == 0 and shm_counts["shm"] >= 2 * BATCHES and shm_rejected == 0
    assert frame_counts == {"shm": 0, "frames": frame_counts["frames"]} and frame_counts["frames"] >= 2 * BATCHES
    for records in (shm_records, frame_records):
        assert len(records) == 2 * BATCHES
        for epoch, ids in ids_per_epoch(records).items():
            assert sorted(ids) == list(range(SHAPES["n"])), f"epoch {epoch} is not every sample exactly once"
    by_shm, by_frames = images_by_sample(shm_records), images_by_sample(frame_records)
    assert by_shm.keys() == by_frames.keys()
    for key, image in by_shm.items():
        assert image.dtype == np.uint8 and np.array_equal(image, by_frames[key]), f"sample {key}: shared memory and frames differ"
    assert "transport shm: shared memory from workers on the trainer's host" in daemon.log()
    assert "transport frames (the trainer asked for them)" in daemon.log()


def test_kept_batches_keep_their_bytes_and_a_full_pool_sends_frames(shared):
    """A trainer that keeps every batch (no clone) holds every slot: its batches stay intact, and once
    the pools are full the workers send frames instead of waiting."""
    daemon, directory = shared
    stream = open_stream(daemon.address, pipeline=CROP_FLIP, batch_size=16, seed=9, epochs=1, prefetch=2, transport="shm")
    kept, copies = [], []
    for batch in stream:
        kept.append(batch)
        copies.append(as_record(batch))
    counts = stream.batches_by_transport
    # Two workers, each with a pool of prefetch + 2 = 4 slots, all held: at most 8 batches fit.
    assert 1 <= counts["shm"] <= 8 and counts["frames"] >= BATCHES - 8, counts
    for batch, copy in zip(kept, copies):
        assert np.array_equal(batch.images.numpy(), copy["images"]), f"batch {batch.index} changed while the trainer held it"
    reference = open_stream(daemon.address, pipeline=CROP_FLIP, batch_size=16, seed=9, epochs=1, transport="frames")
    expected = images_by_sample(collect(reference))
    assert all(np.array_equal(image, expected[key]) for key, image in images_by_sample(copies).items())

    clone = kept[0].clone()
    assert torch.equal(clone.images, kept[0].images) and clone.images.data_ptr() != kept[0].images.data_ptr()
    assert clone.sample_ids.tolist() == kept[0].sample_ids.tolist() and (clone.epoch, clone.index) == (kept[0].epoch, kept[0].index)


def test_a_trainer_that_sees_another_shm_directory_gets_frames_and_is_told(shared, monkeypatch, caplog, tmp_path):
    daemon, directory = shared
    elsewhere = fresh_shm_dir()
    monkeypatch.setenv("AUGSERVE_SHM_DIR", elsewhere)  # like a trainer in another container
    try:
        with caplog.at_level(logging.INFO, logger="augserve.client"):
            stream = open_stream(daemon.address, pipeline=CROP_FLIP, batch_size=16, seed=1, epochs=1, transport="shm")
            records = collect(stream)
        assert len(records) == BATCHES and stream.batches_by_transport == {"shm": 0, "frames": stream.batches_by_transport["frames"]}
        told = [r for r in caplog.records if "come as frames, not through shared memory" in r.getMessage()]
        assert len(told) == 1 and told[0].levelno == logging.WARNING, [r.getMessage() for r in told]  # asked for shm: a warning, once
        assert "the trainer sees another shared-memory directory" in told[0].getMessage()
        assert slot_names(elsewhere) == []
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)


def test_status_shows_each_streams_transport_and_why_frames(shared, monkeypatch):
    """``augserve status`` while three streams run: one through shared memory, one forced to frames by
    its trainer, one whose trainer sees another /dev/shm (the workers fall back: "remote host")."""
    daemon, directory = shared
    streams = {
        "shm": open_stream(daemon.address, pipeline=CROP_FLIP, batch_size=16, seed=2, epochs=1, transport="shm"),
        "frames": open_stream(daemon.address, pipeline=CROP_FLIP, batch_size=16, seed=2, epochs=1, transport="frames"),
    }
    elsewhere = fresh_shm_dir()
    try:
        monkeypatch.setenv("AUGSERVE_SHM_DIR", elsewhere)  # like a trainer in another container
        streams["elsewhere"] = open_stream(daemon.address, pipeline=CROP_FLIP, batch_size=16, seed=2, epochs=1)
        monkeypatch.setenv("AUGSERVE_SHM_DIR", directory)
        for stream in streams.values():
            assert len(collect(stream, limit=2)) == 2  # the rest stays in flight: the streams are still attached

        def transports():
            found = {s["stream"]: s["transport"] for s in daemon.status()["streams"]}
            got = {name: found.get(stream.id) for name, stream in streams.items()}
            return got if all(t is not None and sum(t["batches"].values()) >= 2 for t in got.values()) else None

        got = wait_until(transports, timeout=30, what="the workers' reports of two batches per stream")
        assert got["shm"]["mode"] == "shm" and got["shm"]["batches"]["shm"] >= 2 and not any(got["shm"]["fallbacks"].values())
        assert got["frames"]["mode"] == "frames" and got["frames"]["frames_reason"] == "trainer" and got["frames"]["batches"]["frames"] >= 2
        assert got["elsewhere"]["mode"] == "auto" and got["elsewhere"]["batches"]["shm"] == 0
        assert got["elsewhere"]["fallbacks"]["other_host"] == got["elsewhere"]["batches"]["frames"] >= 2
        lines = {name: next(line for line in format_status(daemon.status()).splitlines() if line.strip().startswith(stream.id)) for name, stream in streams.items()}
        assert " · transport shm: " in lines["shm"] and "batches through shared memory, 0 as frames" in lines["shm"]
        assert lines["frames"].endswith(" · transport frames (forced by the trainer)")
        assert "as frames (remote host (or another /dev/shm or user) " in lines["elsewhere"]
        for stream in streams.values():
            collect(stream)
    finally:
        for stream in streams.values():
            stream.close()
        shutil.rmtree(elsewhere, ignore_errors=True)


@pytest.mark.slow
def test_a_reserve_the_shm_directory_cannot_keep_falls_back_with_one_warning(start_daemon, shm_dir, caplog):
    env = subprocess_env(AUGSERVE_SHM_DIR=shm_dir, AUGSERVE_SHM_RESERVE_MB=str(1 << 30))
    daemon = start_daemon(workers=2, env=env)
    with caplog.at_level(logging.INFO, logger="augserve.client"):
        stream = open_stream(daemon.address, pipeline=CROP_FLIP, batch_size=16, seed=2, epochs=1)  # auto
        records = collect(stream)
    assert len(records) == BATCHES and stream.batches_by_transport["shm"] == 0
    told = [r for r in caplog.records if "come as frames, not through shared memory" in r.getMessage()]
    assert len(told) == 1 and told[0].levelno == logging.WARNING, [r.getMessage() for r in told]  # no_space warns even under auto
    assert f"{shm_dir} has " in told[0].getMessage() and "--shm-size" in told[0].getMessage()
    warned = [line for line in daemon.log().splitlines() if "batches as frames:" in line]
    assert 1 <= len(warned) <= 2 and all(line.startswith("WARNING augserve.worker") for line in warned), warned  # once per worker
    assert slot_names(shm_dir) == []


@pytest.mark.slow
def test_a_tiny_tmpfs_falls_back_to_frames_without_a_bus_error(start_daemon, tiny_tmpfs, monkeypatch, caplog):
    """A real 1 MB tmpfs (root only) and 1.5 MB batches: frames, one warning, every sample intact."""
    target = tiny_tmpfs
    monkeypatch.setenv("AUGSERVE_SHM_DIR", str(target))
    daemon = start_daemon(workers=1, env=subprocess_env(AUGSERVE_SHM_DIR=str(target), AUGSERVE_SHM_RESERVE_MB="0"))
    options = {"size": 128, "n": 96}
    crop = {"ops": [{"op": "random_crop", "size": 128, "padding": 4}, {"op": "mirror"}]}
    with caplog.at_level(logging.INFO, logger="augserve.client"):
        stream = open_stream(daemon.address, dataset_options=options, pipeline=crop, batch_size=32, seed=4, epochs=1)
        records = collect(stream)
    assert len(records) == 3 and stream.batches_by_transport["shm"] == 0
    assert sorted(ids_per_epoch(records)[0]) == list(range(96))
    told = [r.getMessage() for r in caplog.records if "come as frames, not through shared memory" in r.getMessage()]
    assert len(told) == 1 and f"{target} has 1.0 MB free; it cannot hold a 1.6 MB slot" in told[0], told
    daemon.assert_alive()
    assert slot_names(str(target)) == []


def test_a_killed_worker_leaves_no_segment_and_the_epoch_stays_exactly_once(start_daemon, shm_dir):
    """SIGKILL a worker while a trainer that never reads its data socket leaves its slots unmapped (so
    their names exist): the daemon reaps them. Then a real trainer gets every sample once."""
    daemon = start_daemon(workers=2, env=subprocess_env(AUGSERVE_SHM_DIR=shm_dir))
    workers = daemon.worker_pids()
    context = zmq.Context()
    control = raw_dealer(context, daemon.address)
    data, gatekeeper, data_key = raw_data_socket(context)
    try:
        host, _ = host_identity(shm_dir)
        request = P.Attach(dataset="shapes", dataset_options=SHAPES, pipeline=CROP_FLIP, batch_size=16, prefetch=6, transport="shm", shm_host=host,
                           data=data.getsockopt_string(zmq.LAST_ENDPOINT), data_key=data_key)  # fmt: skip
        control.send_multipart(P.encode(request))
        assert control.poll(10_000), "no reply to attach"
        assert P.decode(control.recv_multipart(), P.DAEMON_TO_CLIENT).type == "attached"
        # Nobody maps these slots, so each batch takes a new one and its name stays.
        victim = wait_until(lambda: next((pid for pid in workers if slot_names(shm_dir, [pid])), None), timeout=30, what="a worker's slot names")
        assert slot_names(shm_dir, [victim])
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: not slot_names(shm_dir, [victim]), timeout=15, what=f"the names of killed worker {victim} to be reaped")
        assert "removed" in daemon.log() and "shared-memory slot(s) left by exited workers" in daemon.log()
    finally:
        control.close(linger=0)
        data.close(linger=0)
        gatekeeper.stop()
        context.term()

    wait_until(lambda: len(daemon.status()["workers"]) == 2, timeout=60, what="the replacement worker")
    stream = open_stream(daemon.address, pipeline=GEOMETRIC, batch_size=16, seed=3, epochs=1, transport="shm", prefetch=4)
    records = []
    for batch in stream:
        records.append(as_record(batch))
        if len(records) == 2:
            os.kill(daemon.worker_pids()[0], signal.SIGKILL)  # and one more while a real trainer reads
    assert sorted(ids_per_epoch(records)[0]) == list(range(SHAPES["n"]))
    assert stream.batches_by_transport["shm"] >= 1
    code = daemon.stop(signal.SIGINT)
    assert code == 0, daemon.log()[-4000:]
    assert slot_names(shm_dir) == [], "every name is gone once the daemon and its workers have stopped"


_TRAINER = """
import sys
from augserve import connect
# Elastic warps of 128² images: a batch takes a worker a good part of a second, so when the test stops
# this trainer the batches its credits asked for are still being made, and their slots are filled
# after it stopped (never mapped). With cheap batches they could all arrive first, on a quiet machine.
stream = connect(sys.argv[1], dataset="shapes", dataset_options={"size": 128, "n": 200}, batch_size=16, epochs=100, prefetch=4,
                 pipeline={"ops": [{"op": "warp", "kind": "elastic", "magnitude": 0.05}, {"op": "mirror"}]}, transport="shm",
                 timeout=10, batch_timeout=60)
kept = []
for batch in stream:
    kept.append(batch)  # every slot stays held, so each new batch needs a new slot (and a new name)
    print(batch.index, flush=True)
"""


@pytest.mark.slow
def test_a_killed_trainer_leaves_no_segment(start_daemon, shm_dir):
    """Stop a trainer so slots its workers fill are never mapped (their names exist), then SIGKILL it:
    once the daemon drops the silent stream the workers close its pool and no name is left."""
    env = subprocess_env(AUGSERVE_SHM_DIR=shm_dir, AUGSERVE_HEARTBEAT_INTERVAL="0.25")
    daemon = start_daemon(workers=2, env=env)
    trainer = subprocess.Popen([sys.executable, "-c", _TRAINER, daemon.address], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        for _ in range(3):
            line = trainer.stdout.readline()
            assert line.strip().isdigit(), f"the trainer printed {line!r} instead of a batch index"
        os.kill(trainer.pid, signal.SIGSTOP)
        wait_until(lambda: slot_names(shm_dir), timeout=20, what="slots filled for the stopped trainer")
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.wait(timeout=10)
        wait_until(lambda: not slot_names(shm_dir), timeout=30, what="the dead trainer's slots to be closed")
        assert "trainer silent; dropping it" in daemon.log()
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait(timeout=10)
        trainer.stdout.close()
    daemon.assert_alive()
