"""``augserve tune`` as a user runs it: a real (tiny) Optuna study of LeNet on digits against a real
daemon with two workers, its files, its JSON summary, and resuming an interrupted/extended study."""

import csv
import json
import os
import subprocess
import sys

import pytest

from pipelines import PipelineSpec, resolve
from trainer.data import embedded_daemon

pytestmark = pytest.mark.slow

BASE = ["--model", "lenet5_relu", "--dataset", "digits", "--epochs", "2", "--batch-size", "128", "--lr", "0.1", "--seed", "0"]


@pytest.fixture(scope="module")
def daemon_address():
    with embedded_daemon(workers=2) as address:
        yield address


def tune(*args, timeout=120):
    """``augserve tune ...`` (through ``python -m trainer.tuning``, the same parser and error handling)."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    return subprocess.run([sys.executable, "-m", "trainer.tuning", *args], capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def summary_of(proc) -> dict:
    assert proc.returncode == 0, f"tune failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def read_trials(folder) -> list[dict]:
    with open(folder / "trials.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_study_writes_its_outputs_and_resumes(daemon_address, tmp_path):
    out = tmp_path / "tune"
    args = [*BASE, "--connect", daemon_address, "--out", str(out), "--json"]
    first = summary_of(tune(*args, "--trials", "3"))

    assert first["n_trials"] == 3 and first["n_ran"] == 3 and first["n_complete"] + first["n_pruned"] == 3
    assert first["n_complete"] >= 2  # the pruner waits for two complete trials
    assert first["jobs"] == 2  # min(2, the daemon's workers)
    assert 0.3 < first["best_value"] <= 1.0  # held-out accuracy of two LeNet epochs: far above chance (0.1)
    assert set(first["best_params"]) == {"rotate.degrees", "shear.degrees"}  # the defaults for the lenet5 preset
    assert first["baseline_value"] is not None  # trial 0 is the base spec itself
    for key in ("best_spec_path", "trials_csv", "history_png", "importances_png"):
        assert os.path.isfile(first[key]), key
    for name in ("history.png", "importances.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (first["importances"] is None) == (first["importances_note"] is not None)

    best = PipelineSpec.from_file(str(out / "best.yaml"))
    assert resolve(str(out / "best.yaml")) == best  # what --pipeline best.yaml loads
    assert best.ops[1].degrees == pytest.approx(first["best_params"]["rotate.degrees"])
    assert best.ops[2].degrees == pytest.approx(first["best_params"]["shear.degrees"])
    assert best.ops[0] == resolve("lenet5").ops[0] and best.ops[-1] == resolve("lenet5").ops[-1]

    rows = read_trials(out)
    assert [r["number"] for r in rows] == ["0", "1", "2"]
    assert {r["state"] for r in rows} <= {"COMPLETE", "PRUNED"}
    assert rows[0]["params_rotate.degrees"] == "10" and rows[0]["params_shear.degrees"] == "8"  # the base spec
    assert len(list((out / "trials").glob("trial-*.yaml"))) == 3

    # The same command asking for 4 trials continues the stored study: only the missing one runs.
    second = summary_of(tune(*args, "--trials", "4"))
    assert second["n_trials"] == 4 and second["n_ran"] == 1
    again = read_trials(out)
    assert len(again) == 4 and again[:3] == rows  # earlier trials untouched
    # Asking for no more than the study holds runs nothing and still reports.
    third = summary_of(tune(*args, "--trials", "4", "--quiet"))
    assert third["n_trials"] == 4 and third["n_ran"] == 0 and third["best_value"] == second["best_value"]


def test_a_resumed_study_must_keep_its_settings(daemon_address, tmp_path):
    out = tmp_path / "tune"
    summary_of(tune(*BASE, "--connect", daemon_address, "--out", str(out), "--trials", "1", "--json", "--param", "rotate.degrees=0:20"))
    proc = tune(*BASE, "--connect", daemon_address, "--out", str(out), "--trials", "2", "--param", "rotate.degrees=0:30")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line
    assert "was made with other settings (params)" in proc.stderr


def test_user_mistakes_end_in_one_line(daemon_address, tmp_path, capsys):
    from trainer.tuning.cli import main

    cases = [
        (["--model", "lenet9", "--dataset", "digits"], "unknown model 'lenet9'"),
        (["--model", "lenet5_relu", "--dataset", "digits", "--param", "twirl.degrees=0:10"], "has no 'twirl' op"),
        (["--model", "lenet5_relu", "--dataset", "digits", "--param", "rotate.degrees=0:400"], "rotate.degrees = 400.0"),
        (["--model", "lenet5_relu", "--dataset", "digits", "--param", "rotate.degrees=9:1"], "bad range"),
        (["--model", "lenet5_relu", "--dataset", "photos", "--connect", daemon_address], "no held-out (test) split"),
        (["--model", "lenet5_relu", "--dataset", "nothing", "--connect", daemon_address], "unknown dataset 'nothing'"),
        (["--model", "lenet5_relu", "--dataset", "digits", "--pipeline", "alexnet", "--connect", daemon_address], "pca_color needs RGB images"),
    ]
    for args, fragment in cases:
        code = main(["tune", *args, "--out", str(tmp_path / "x"), "--trials", "1"])
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("augserve: error: ") and fragment in lines[0], (args, err)
    assert not (tmp_path / "x").exists()  # nothing was created or stored
