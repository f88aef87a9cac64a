"""``augserve bench soak``: its accounting on synthetic logs (fast), and a bounded real soak (slow).

The real soak runs the command as a user would — a daemon subprocess with three workers, four trainer
streams, a worker SIGKILLed every 3 s for 45 seconds — and reads its ``--json`` summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from augserve.bench.soak import EpochLedger, version_violations


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUGSERVE_")}
    env.update(NO_ALBUMENTATIONS_UPDATE="1", PYTHONUNBUFFERED="1")
    return env


# --- the accounting -----------------------------------------------------------------------------------


def test_the_ledger_reports_a_known_loss_and_a_known_duplicate():
    ledger = EpochLedger(num_samples=10)
    ledger.record(0, [3, 1, 4, 0])
    ledger.record(0, [5, 2, 6, 8])
    ledger.record(0, [8, 7])  # 8 again, 9 never
    assert ledger.accounts == [], "epoch 0 is judged only once the stream has moved past it"
    ledger.record(1, list(range(10)))
    ledger.record(2, [0, 1])  # the soak stops here: epoch 2 stays open
    accounts = ledger.finish()

    assert [a.epoch for a in accounts] == [0, 1, 2]
    first, second, open_ = accounts
    assert (first.delivered, first.lost, first.duplicated, first.unexpected) == (10, 1, 1, 0)
    assert not first.clean and first.complete
    assert (second.lost, second.duplicated) == (0, 0) and second.clean
    assert not open_.complete and open_.lost is None and open_.clean


def test_the_ledger_judges_ddp_ranks_together_and_counts_skipped_epochs_and_foreign_ids():
    ledger = EpochLedger(num_samples=8, members=2)
    ledger.record(0, [0, 2, 4, 6], member=0)
    ledger.record(0, [1, 3, 5, 7], member=1)
    ledger.record(1, [0, 1, 2, 3], member=0)
    assert ledger.accounts == [], "rank 1 is still in epoch 0"
    ledger.record(1, [4, 5, 6, 99], member=1)  # 99 is no sample of this dataset; 7 never comes
    ledger.record(3, [0, 1], member=0)  # rank 0 jumps over epoch 2 entirely
    ledger.record(3, [2, 3], member=1)
    ledger.record(1, [7], member=1)  # too late: epoch 1 was judged when both ranks reached epoch 3
    accounts = ledger.finish()

    by_epoch = {a.epoch: a for a in accounts}
    assert sorted(by_epoch) == [0, 1, 2, 3]
    assert by_epoch[0].clean and by_epoch[0].delivered == 8
    assert (by_epoch[1].lost, by_epoch[1].duplicated, by_epoch[1].unexpected) == (1, 0, 1)
    assert (by_epoch[2].delivered, by_epoch[2].lost) == (0, 8), "an epoch nobody delivered is wholly lost"
    assert not by_epoch[3].complete
    assert ledger.late == 1


def test_the_ledger_counts_a_duplicate_within_one_batch_and_across_ranks():
    ledger = EpochLedger(num_samples=4, members=2)
    ledger.record(0, [0, 1, 1], member=0)
    ledger.record(0, [1, 2, 3], member=1)
    ledger.record(1, [0], member=0)
    ledger.record(1, [1], member=1)
    (first,) = [a for a in ledger.finish() if a.complete]
    assert (first.lost, first.duplicated) == (0, 2)


def test_version_violations_accepts_the_stated_starts_and_flags_anything_else():
    starts = {1: (0, 0), 2: (0, 3), 3: (1, 1)}
    good = [(0, 0, 1), (0, 1, 1), (0, 2, 1), (0, 3, 2), (0, 4, 2), (1, 0, 2), (1, 1, 3), (1, 2, 3)]
    assert version_violations(good, starts) == []

    decreasing = [(0, 0, 1), (0, 3, 2), (0, 4, 1)]
    assert any("after one of version 2" in line for line in version_violations(decreasing, starts))
    early = [(0, 0, 1), (0, 2, 2)]  # version 2 was stated to start at batch 3
    assert version_violations(early, starts) == ["batch 0/2 has pipeline version 2, expected 1 from the update replies"]
    late = [(0, 3, 1)]
    assert len(version_violations(late, starts)) == 1


def test_bad_soak_settings_end_in_one_line_before_anything_starts():
    proc = subprocess.run([sys.executable, "-m", "augserve", "bench", "soak", "--minutes", "0"], capture_output=True, text=True, env=_env(), timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "augserve: error: --minutes must be > 0, got 0.0"


# --- a real soak --------------------------------------------------------------------------------------

SAMPLES = 320  # a small set, so that every job completes several epochs within the 45 s soak


@pytest.mark.slow
def test_a_bounded_soak_loses_and_repeats_nothing_under_worker_kills(tmp_path):
    out = tmp_path / "soak"
    command = [sys.executable, "-m", "augserve", "bench", "soak", "--minutes", "0.75", "--kill-every", "3", "--workers", "3",
               "--samples", str(SAMPLES), "--reattach-every", "5", "--pause-every", "6", "--pause", "2", "--retune-every", "2", "--json", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=420, stdin=subprocess.DEVNULL)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no output (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    summary = json.loads(lines[-1])
    context = f"exit {proc.returncode}; failures: {summary.get('failures')}\ndaemon log tail:\n{summary.get('daemon_log_tail')}\nstderr:\n{proc.stderr[-2000:]}"
    assert proc.returncode == 0 and summary["ok"] and summary["failures"] == [], context
    rows = [json.loads(line) for line in lines[:-1]]
    assert {r["stream"] for r in rows if r["kind"] == "stream"} == {"ddp-rank0", "ddp-rank1", "pausing", "retuned"}

    # Exactly once, epoch by epoch, for every job — and enough epochs that it means something.
    assert {job["job"] for job in summary["jobs"]} == {"ddp", "pausing", "retuned"}
    for job in summary["jobs"]:
        complete = [e for e in job["epochs"] if e["lost"] is not None]
        assert len(complete) >= 2 and job["epochs_completed"] == len(complete), f"{job['job']}: {len(complete)} completed epoch(s)"
        assert [e["epoch"] for e in complete] == list(range(len(complete)))
        for epoch in job["epochs"]:
            assert epoch["duplicated"] == 0 and epoch["unexpected"] == 0, f"{job['job']}: {epoch}"
            if epoch["lost"] is not None:
                assert epoch["lost"] == 0 and epoch["delivered"] == SAMPLES, f"{job['job']}: {epoch}"
        assert job["late"] == 0

    streams = {s["stream"]: s for s in summary["streams"]}
    for stream in streams.values():
        assert stream["error"] is None and stream["batches"] > 0, stream
    assert streams["pausing"]["attaches"] >= 2 and streams["pausing"]["pauses"] >= 1
    assert streams["retuned"]["updates"] >= 2 and len(streams["retuned"]["pipeline_versions"]) > 1
    assert summary["version_violations"] == 0

    # The chaos happened and the daemon recovered from all of it.
    assert summary["kills"] >= 1 and summary["worker_restarts"] >= summary["kills"]
    assert len(summary["kills_detail"]) == summary["kills"]
    assert summary["daemon_exit_code"] == 0
    memory = summary["memory_mib"]
    for snapshot in (memory["start"], memory["end"]):
        assert snapshot["daemon"] > 0 and len(snapshot["workers"]) == 3 and snapshot["workers_total"] > 0

    written = json.loads((out / "soak.json").read_text())
    assert written == {k: v for k, v in summary.items() if k != "out"}
    assert (out / "daemon.log").stat().st_size > 0
