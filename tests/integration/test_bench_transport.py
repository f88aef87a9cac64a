"""``augserve bench transport``: real sender processes and real sockets, tiny batches.

Speeds are never asserted (the machine is shared and these runs last milliseconds); what is checked is
that every transport and batch size is measured, that the figures agree with each other, that the
user's own keys are never touched, and that a user's mistake, a dead sender and a silent sender each
end in one clear error, fast.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import statistics
import tempfile
import time

import numpy as np
import pytest
import torch
import zmq

from augserve import security
from augserve.bench.transport import BASELINE, IN_PLACE_RATIOS, PRODUCE, PRODUCING, TRANSPORTS, Channel, TransportBenchConfig, payload_bytes
from augserve.cli import main

SMALL = ["--size", "32", "--batches", "3", "--rounds", "1"]


def _ipc_leftovers() -> set[str]:
    return {name for name in os.listdir(security.private_ipc_dir()) if name.startswith(f"bench-transport-{os.getpid()}-")}


@pytest.fixture(autouse=True)
def private_shm_dir(monkeypatch):
    """The shm row's slots go to a directory of this test's own, so leftovers can be counted."""
    directory = tempfile.mkdtemp(prefix="augserve-bench-test-", dir="/dev/shm")
    monkeypatch.setenv("AUGSERVE_SHM_DIR", directory)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_json_rows_cover_every_transport_and_batch_size(capsys, monkeypatch, tmp_path, private_shm_dir):
    user_keys = tmp_path / "user-keys"
    monkeypatch.setenv("AUGSERVE_KEYS_DIR", str(user_keys))
    assert main(["bench", "transport", "--batch-images", "2", "3", *SMALL, "--json"]) == 0
    out = capsys.readouterr().out
    lines = [json.loads(line) for line in out.strip().splitlines()]
    rows, summary = lines[:-1], lines[-1]

    assert {(r["transport"], r["batch_images"]) for r in rows} == {(t, n) for t in (BASELINE, PRODUCE, *TRANSPORTS) for n in (2, 3)}
    assert len(rows) == 18 and all(r["benchmark"] == "transport" for r in rows)
    assert set(TRANSPORTS) == {"tcp", "tcp+curve", "ipc", "shm", "tcp-made", "shm-copied", "shm-in-place"}
    assert set(PRODUCING) == {PRODUCE, "tcp-made", "shm-copied", "shm-in-place"}
    for row in rows:
        assert row["batch_bytes"] == payload_bytes(row["batch_images"], 32) == row["batch_images"] * 32 * 32 * 3 + 16 * row["batch_images"]
        assert math.isfinite(row["gb_per_s"]) and row["gb_per_s"] > 0, row
        assert row["gb_per_s"] == pytest.approx(row["batches_per_s"] * row["batch_bytes"] / 1e9, rel=2e-3)
        same_batch = {r["transport"]: r["gb_per_s"] for r in rows if r["batch_images"] == row["batch_images"]}
        assert row["vs_tcp"] == pytest.approx(row["gb_per_s"] / same_batch["tcp"], rel=2e-3)
        assert row["vs_memcpy"] == pytest.approx(row["gb_per_s"] / same_batch[BASELINE], rel=2e-3)
        assert row["makes_batches"] == (row["transport"] in PRODUCING)
        if row["makes_batches"]:
            assert row["vs_produce"] == pytest.approx(row["gb_per_s"] / same_batch[PRODUCE], rel=2e-3)
        else:
            assert row["vs_produce"] is None  # a row that does not make its batches has no business with that baseline
        assert len(row["runs_gb_per_s"]) == 1 and row["runs_gb_per_s"][0] == pytest.approx(row["gb_per_s"], rel=2e-3)

    assert summary["benchmark"] == "transport" and summary["rows"] == rows
    assert [b["batch_images"] for b in summary["by_batch"]] == [2, 3]
    for entry in summary["by_batch"]:
        rates = entry["gb_per_s"]
        assert set(rates) == {BASELINE, PRODUCE, *TRANSPORTS}
        assert entry["curve_vs_tcp"] == pytest.approx(rates["tcp+curve"] / rates["tcp"], rel=2e-3)
        assert entry["shm_vs_tcp"] == pytest.approx(rates["shm"] / rates["tcp"], rel=2e-3)
        assert entry["shm_vs_memcpy"] == pytest.approx(rates["shm"] / rates[BASELINE], rel=2e-3)
        assert entry["in_place_vs_tcp"] == pytest.approx(rates["shm-in-place"] / rates["tcp"], rel=2e-3)
        assert entry["in_place_vs_memcpy"] == pytest.approx(rates["shm-in-place"] / rates[BASELINE], rel=2e-3)
        assert entry["in_place_vs_produce"] == pytest.approx(rates["shm-in-place"] / rates[PRODUCE], rel=2e-3)
        assert entry["in_place_vs_copied"] == pytest.approx(rates["shm-in-place"] / rates["shm-copied"], rel=2e-3)
        assert entry["in_place_vs_tcp_made"] == pytest.approx(rates["shm-in-place"] / rates["tcp-made"], rel=2e-3)
        assert entry["copied_vs_produce"] == pytest.approx(rates["shm-copied"] / rates[PRODUCE], rel=2e-3)
    assert summary["curve_vs_tcp"] == pytest.approx(statistics.median(b["curve_vs_tcp"] for b in summary["by_batch"]), rel=1e-3)
    assert summary["shm_vs_tcp"] == pytest.approx(statistics.median(b["shm_vs_tcp"] for b in summary["by_batch"]), rel=1e-3)
    for key in IN_PLACE_RATIOS:
        assert summary[key] == pytest.approx(statistics.median(b[key] for b in summary["by_batch"]), rel=1e-3)
    conditions = summary["conditions"]
    assert conditions["libzmq"] == zmq.zmq_version() and conditions["pyzmq"] == zmq.pyzmq_version()
    assert conditions["cores"] == os.cpu_count() and conditions["curve"]

    assert not user_keys.exists(), "the bench must use a throwaway keyring, never the user's"
    assert not _ipc_leftovers(), "the ipc socket file must be removed"
    assert os.listdir(private_shm_dir) == [], "the shm sender's slots must be removed"


def test_table_names_every_transport(capsys):
    assert main(["bench", "transport", "--batch-images", "2", "--size", "16", "--batches", "1", "--rounds", "1"]) == 0
    captured = capsys.readouterr()
    table = [line for line in captured.out.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in table[1:]] == [
        "| memcpy (baseline)", "| tcp", "| tcp+curve", "| ipc", "| shm", "| produce (baseline)", "| tcp-made", "| shm-copied", "| shm-in-place"
    ]  # fmt: skip
    assert [line.split(" | ")[-1] for line in table[1:5]] == ["— |"] * 4 and table[6].endswith(" | 1.00 |")  # × produce: its own rows only
    assert "tcp+curve / tcp:" in captured.out and f"libzmq {zmq.zmq_version()}" in captured.out
    assert "shm: " in captured.out and "× memcpy at" in captured.out
    assert "shm-in-place: " in captured.out and "× produce, " in captured.out and "× shm-copied" in captured.out and "× tcp-made" in captured.out
    assert "the hand-off of a batch made beforehand" in captured.out and "the time includes making it" in captured.out  # what each row times
    assert "starting 8 sender processes" in captured.err  # progress goes to stderr, never into the table


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batches", "0"], "--batches must be >= 1, got 0"),
        (["--rounds", "0"], "--rounds must be >= 1, got 0"),
        (["--batch-images", "0"], "--batch-images must be >= 1, got 0"),
        (["--batch-images", "4", "4"], "--batch-images lists a size twice"),
        (["--size", "0"], "--size must be >= 1, got 0"),
        (["--timeout", "0"], "--timeout must be > 0 seconds"),
        (["--timeout", "nan"], "--timeout must be > 0 seconds"),
        (["--batch-images", "100000"], "GB batch; at most 1 GB"),
    ],
)
def test_a_bad_flag_is_one_error_line_and_exit_2(capsys, flags, message):
    assert main(["bench", "transport", *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1, captured.err
    assert captured.err.startswith("augserve: error: ") and message in captured.err


def _config(timeout_s: float = 5.0) -> TransportBenchConfig:
    return TransportBenchConfig(batch_images=(2,), size=16, rounds=1, batches=1, timeout_s=timeout_s)


def test_a_dead_sender_is_a_connection_error_not_a_hang():
    channel = Channel("tcp", _config())
    try:
        channel.wait_ready()
        channel.move(2, 2)
        os.kill(channel.pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(ConnectionError, match=rf"the tcp sender \(pid {channel.pid}\) died \(signal 9\)"):
            channel.move(2, 1)
        assert time.monotonic() - started < 3.0
    finally:
        channel.close()


def test_a_silent_sender_times_out_within_the_deadline():
    channel = Channel("ipc", _config(timeout_s=1.0))
    try:
        channel.wait_ready()
        os.kill(channel.pid, signal.SIGSTOP)  # alive, but sends nothing
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=r"no batch over ipc within 1 s"):
            channel.move(2, 1)
        assert 1.0 <= time.monotonic() - started < 3.0
    finally:
        os.kill(channel.pid, signal.SIGCONT)
        channel.close()
    assert not _ipc_leftovers()


def test_the_curve_channel_admits_only_the_worker_key(tmp_path):
    keyring = security.Keyring.load(tmp_path / "keys")
    channel = Channel("tcp+curve", _config(), tmp_path / "keys")
    context = zmq.Context()
    stranger = context.socket(zmq.PUSH)
    try:
        channel.wait_ready()
        channel.move(2, 1)  # the sender, presenting the worker key, gets through
        assert channel.gatekeeper is not None and channel.gatekeeper.refused == 0
        stranger.setsockopt(zmq.LINGER, 0)
        security.secure_client(stranger, security.KeyPair.generate(), keyring.client.public)
        stranger.connect(channel.sock.getsockopt_string(zmq.LAST_ENDPOINT))
        deadline = time.monotonic() + 5.0
        while channel.gatekeeper.refused == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert channel.gatekeeper.refused >= 1, "a CURVE client with an unknown key must be refused"
        assert channel.gatekeeper.recent_refusals[-1].reason.startswith("key not allowed")
    finally:
        stranger.close(linger=0)
        context.term()
        channel.close()


@pytest.mark.parametrize("transport", ["shm", "shm-copied", "shm-in-place"])
def test_the_shm_channel_hands_over_slots_and_leaves_none_behind(private_shm_dir, transport):
    channel = None
    keys = tempfile.mkdtemp(prefix="augserve-bench-keys-")
    try:
        security.Keyring.load(keys)
        channel = Channel(transport, _config(), keys)
        channel.wait_ready()
        channel.move(2, 20)  # more batches than slots: each one is released as it is received
        names = os.listdir(private_shm_dir)
        assert names == [], f"the receiver unlinks each slot it maps: {names}"
        os.kill(channel.pid, signal.SIGKILL)
        with pytest.raises(ConnectionError, match=rf"the {transport} sender \(pid \d+\) died \(signal 9\)"):
            channel.move(2, 1)
    finally:
        if channel is not None:
            channel.close()
        shutil.rmtree(keys, ignore_errors=True)
    assert os.listdir(private_shm_dir) == []


@pytest.mark.parametrize("transport", ["shm", "shm-in-place"])
def test_fill_makes_the_whole_pool_before_the_rounds_and_leaves_no_name_behind(private_shm_dir, transport):
    """``Channel.fill``: every slot of the sender's pool made and handed over once (so the receiver has
    mapped, and unlinked, all of them); the batches after it take those slots and make no new one."""
    from augserve.bench.transport import SHM_SLOTS

    channel = None
    keys = tempfile.mkdtemp(prefix="augserve-bench-keys-")
    try:
        security.Keyring.load(keys)
        channel = Channel(transport, TransportBenchConfig(batch_images=(2, 3), size=16, rounds=1, batches=1, timeout_s=5.0), keys)
        channel.wait_ready()
        channel.fill()
        mapped = set(channel.reader._segments)
        assert len(mapped) == SHM_SLOTS and os.listdir(private_shm_dir) == []
        for images in (2, 3, 2):
            channel.move(images, 12)
        assert set(channel.reader._segments) == mapped  # no slot made after the fill
        os.kill(channel.pid, signal.SIGKILL)
    finally:
        if channel is not None:
            channel.close()
        shutil.rmtree(keys, ignore_errors=True)
    assert os.listdir(private_shm_dir) == []


def test_the_in_place_row_makes_its_batch_in_the_slot_it_sends(private_shm_dir):
    """``shm-in-place`` makes each batch straight into the slot it then lends (nothing copied after), and
    makes the same batch as ``produce`` and ``shm-copied`` do: the rows time the same producing step."""
    from functools import partial

    from augserve.bench.transport import Producer, _made_in_slot, _waiting_for_a_slot
    from augserve.handoff.sender import write_batch
    from augserve.handoff.shm import Segment
    from augserve.handoff.slots import LENT, SlotPool

    producer = Producer((3,), 16)
    pool = SlotPool(partial(Segment.create, private_shm_dir), 2)
    try:
        slot_for, images = _made_in_slot(producer, pool, _waiting_for_a_slot(pool, 5.0), 3, 7, 16)
        slot = slot_for(1)
        assert images.data_ptr() == slot.memory.data.ctypes.data and tuple(images.shape) == (3, 16, 16, 3)
        assert torch.equal(images, producer.make(3, 7)) and not torch.equal(images, producer.make(3, 8))
        ids = np.arange(3, dtype=np.int64)
        lent, _, descriptors = write_batch(pool, [("images", images), ("labels", ids), ("sample_ids", ids)], slot_for)
        assert lent is slot and slot.memory.state() == LENT and [d.offset for d in descriptors] == [0, 2304, 2368]
    finally:
        pool.close()
    assert os.listdir(private_shm_dir) == []
