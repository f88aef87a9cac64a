"""``augserve bench control-plane``: the real daemon, a real process of fake workers, real sockets.

Rates are never asserted (the machine is shared and each window lasts a fraction of a second); what
is checked is the result's structure, that its figures agree with each other, that every task was
handled by exactly one fake worker once and acknowledged once (counted at the workers and at the
trainers), that malformed messages from a worker are refused without stopping the measurement, and
that the user's own keys are never touched.
"""

from __future__ import annotations

import json
import os

import pytest

from augserve.bench.control_plane import _exactly_once, _Tally
from augserve.cli import main

SMALL = ["--seconds", "0.4", "--timeout", "60"]
PARTS = {"daemon", "daemon_loop", "workers", "trainers", "machine", "others"}


def run_json(capsys, *flags: str) -> tuple[int, list[dict], dict]:
    code = main(["bench", "control-plane", *flags, *SMALL, "--json"])
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.strip().splitlines()]
    assert lines, f"no result (exit status {code}): {err[-2000:]}"
    return code, lines[:-1], lines[-1]


def test_every_configuration_is_measured_and_every_task_acked_exactly_once(capsys, monkeypatch, tmp_path):
    user_keys = tmp_path / "user-keys"
    monkeypatch.setenv("AUGSERVE_KEYS_DIR", str(user_keys))
    code, rows, summary = run_json(capsys, "--workers", "1", "3", "--streams", "2", "--client", "fake", "real")
    assert code == 0

    assert [(r["client"], r["workers"], r["streams"]) for r in rows] == [("fake", 1, 2), ("fake", 3, 2), ("real", 1, 2), ("real", 3, 2)]
    for row in rows:
        assert row["benchmark"] == "control-plane" and (row["batch_size"], row["prefetch"], row["capacity"]) == (64, 8, 2)
        assert row["tasks"] % row["streams"] == 0 and row["tasks"] >= 2 * 20  # whole streams of at least 20 tasks
        # Counted at the fake workers and at the trainers, per (stream, epoch, index): each exactly once.
        assert row["exactly_once"] and row["acked"] == row["handled"] == row["tasks"] and row["duplicates"] == 0, row
        assert row["reissued"] == 0 and row["refused_messages"] == row["malformed_sent"] == 0
        assert 0 < row["window_tasks"] <= row["tasks"] and row["window_s"] > 0
        assert row["tasks_per_s"] == pytest.approx(row["window_tasks"] / row["window_s"], rel=2e-3)
        assert set(row["cpu_pct"]) == PARTS and all(v >= 0 for v in row["cpu_pct"].values())
        # One thread of the process: at most the whole, give or take the two clock ticks each reading can miss.
        two_ticks_pct = 100 * 2 / (os.sysconf("SC_CLK_TCK") * row["window_s"])
        assert row["cpu_pct"]["daemon_loop"] <= row["cpu_pct"]["daemon"] + two_ticks_pct
        if row["tasks_per_daemon_cpu_s"] is not None:
            assert row["tasks_per_daemon_cpu_s"] == pytest.approx(row["tasks_per_s"] / (row["cpu_pct"]["daemon"] / 100), rel=0.01)
        ours = sum(row["cpu_pct"][part] for part in ("daemon", "workers", "trainers"))
        assert row["cpu_pct"]["others"] == pytest.approx(max(0.0, row["cpu_pct"]["machine"] - ours), abs=0.3)  # each rounded to 0.1
        assert row["bound_by"] in ("daemon loop", "workers", "trainers", "latency") or row["bound_by"].startswith(f"machine ({os.cpu_count()} cores busy, ")

    assert summary["rows"] == rows and summary["exactly_once"] is True and summary["idle"] is None
    assert (summary["workers"], summary["streams"], summary["clients"]) == ([1, 3], [2], ["fake", "real"])
    assert summary["max_tasks_per_s"] == max(r["tasks_per_s"] for r in rows) and summary["min_tasks_per_s"] == min(r["tasks_per_s"] for r in rows)
    assert summary["conditions"]["cores"] == os.cpu_count()
    assert not user_keys.exists(), "the bench must use a throwaway keyring, never the user's"


def test_malformed_messages_from_a_worker_are_refused_and_the_measurement_goes_on(capsys):
    code, rows, summary = run_json(capsys, "--workers", "2", "--streams", "1", "--malformed-every", "3", "--idle-workers", "8")
    assert code == 0 and summary["exactly_once"]
    idle = summary["idle"]  # 8 workers registered and no stream, after the measurement went on
    assert idle["workers"] == 8 and idle["window_s"] >= 0.4 and set(idle["cpu_pct"]) == {"daemon", "daemon_loop"}
    assert idle["daemon_cpu_pct_per_100_workers"] == pytest.approx(100 * idle["cpu_pct"]["daemon"] / 8, rel=0.02, abs=0.2)
    (row,) = rows
    assert row["malformed_sent"] > 0 and row["refused_messages"] == row["malformed_sent"]  # each one refused, none lost
    assert row["acked"] == row["handled"] == row["tasks"] and row["reissued"] == 0


def test_the_table_names_every_part(capsys):
    assert main(["bench", "control-plane", "--workers", "2", "--streams", "1", *SMALL]) == 0
    captured = capsys.readouterr()
    table = [line for line in captured.out.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| trainers | workers | streams | tasks/s | daemon CPU % | daemon loop % | workers % | trainers % | other processes % |")
    assert len(table) == 2 and table[1].startswith("| fake | 2 | 1 | ") and table[1].endswith("| yes |")
    assert "cores" in captured.out and "warm-up" in captured.err  # progress goes to stderr


def _tally(stream: str, planned: int, acked: list[int]) -> _Tally:
    return _Tally(stream, planned, {(0, i) for i in acked})


def test_the_exactly_once_check_catches_a_duplicate_a_loss_and_a_stray_stream():
    good = {"total": 3, "handled": {"s|0|0": 1, "s|0|1": 1, "s|0|2": 1}}
    assert _exactly_once([_tally("s", 3, [0, 1, 2])], good)["exactly_once"]

    twice = {"total": 4, "handled": {**good["handled"], "s|0|1": 2}}
    result = _exactly_once([_tally("s", 3, [0, 1, 2])], twice)
    assert not result["exactly_once"] and result["duplicates"] == 1 and result["handled"] == 4
    assert not _exactly_once([_tally("s", 3, [0, 2])], good)["exactly_once"]  # one batch never acknowledged
    stray = {"total": 4, "handled": {**good["handled"], "t|0|0": 1}}
    assert not _exactly_once([_tally("s", 3, [0, 1, 2])], stray)["exactly_once"]  # a task of no stream of ours
    dropped = _tally("s", 3, [0, 1, 2])
    dropped.duplicates = 1
    assert not _exactly_once([dropped], good)["exactly_once"]  # a copy arrived at the trainer


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--workers", "0"], "--workers must be in [1, 1024], got 0"),
        (["--streams", "300"], "--streams must be in [1, 256], got 300"),
        (["--streams", "2", "2"], "--streams lists a value twice: 2 2"),
        (["--seconds", "0"], "--seconds must be in [0.1, 600], got 0.0"),
        (["--prefetch", "0"], "--prefetch must be in [1, 1024], got 0"),
        (["--malformed-every", "-1"], "--malformed-every must be >= 0, got -1"),
        (["--idle-workers", "5000"], "--idle-workers must be in [0, 4096], got 5000"),
    ],
)
def test_user_mistakes_end_in_one_line(capsys, flags, message):
    assert main(["bench", "control-plane", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"augserve: error: {message}"]
