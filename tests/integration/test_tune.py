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

# Batch size, optimiser and learning rate from lenet5_relu's recipe; a short step budget per trial.
BASE = ["--model", "lenet5_relu", "--dataset", "digits", "--steps", "60", "--seed", "0"]
VAL_SIZE = 287  # round(0.2 × each class's train count), summed over the classes of digits' 1,437 train images


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
    first = summary_of(tune(*args, "--trials", "3", "--confirm-seeds", "0"))

    assert first["n_trials"] == 3 and first["n_ran"] == 3 and first["n_complete"] + first["n_pruned"] == 3
    assert first["n_complete"] >= 2  # the pruner waits for two complete trials
    assert first["jobs"] == 2  # min(2, the daemon's workers)
    assert 0.3 < first["best_value"] <= 1.0  # val accuracy of 60 LeNet steps: far above chance (0.1)
    assert set(first["best_params"]) == {"rotate.degrees", "shear.degrees"}  # the defaults for the lenet5 preset
    assert first["baseline_value"] is not None  # trial 0 is the base spec itself
    # The recipe settled the trials: its batch size, AdamW and rate; 60 steps = 4 epochs of 18 batches.
    assert (first["batch_size"], first["optimizer"], first["lr"], first["trial_epochs"]) == (64, "adamw", 0.002, 4)
    # Trials are scored on val (287 samples), never on test (359): every value is a count out of 287.
    assert first["val_size"] == VAL_SIZE
    for row in read_trials(out):
        if row["state"] == "COMPLETE":
            assert float(row["value"]) * VAL_SIZE == pytest.approx(round(float(row["value"]) * VAL_SIZE), abs=1e-3)
    for key in ("trials_csv", "history_png", "importances_png", "report_md", "best_trial_spec"):
        assert os.path.isfile(first[key]), key
    for name in ("history.png", "importances.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (first["importances"] is None) == (first["importances_note"] is not None)
    # Without a confirmation nothing is claimed: no best.yaml, the best trial's spec is named instead.
    assert first["confirmation"] is None and first["best_spec_path"] is None and not (out / "best.yaml").exists()
    assert "No confirmation across seeds" in (out / "report.md").read_text()

    best = PipelineSpec.from_file(first["best_trial_spec"])
    assert resolve(first["best_trial_spec"]) == best  # what --pipeline loads
    assert best.ops[1].degrees == pytest.approx(first["best_params"]["rotate.degrees"])
    assert best.ops[2].degrees == pytest.approx(first["best_params"]["shear.degrees"])
    assert best.ops[0] == resolve("lenet5").ops[0] and best.ops[-1] == resolve("lenet5").ops[-1]

    rows = read_trials(out)
    assert [r["number"] for r in rows] == ["0", "1", "2"]
    assert {r["state"] for r in rows} <= {"COMPLETE", "PRUNED"}
    assert rows[0]["params_rotate.degrees"] == "10" and rows[0]["params_shear.degrees"] == "8"  # the base spec
    assert len(list((out / "trials").glob("trial-*.yaml"))) == 3

    # The same command asking for 4 trials continues the stored study: only the missing one runs.
    second = summary_of(tune(*args, "--trials", "4", "--confirm-seeds", "0"))
    assert second["n_trials"] == 4 and second["n_ran"] == 1
    again = read_trials(out)
    assert len(again) == 4 and again[:3] == rows  # earlier trials untouched
    # Asking for no more than the study holds runs nothing and still reports.
    third = summary_of(tune(*args, "--trials", "4", "--quiet", "--confirm-seeds", "0"))
    assert third["n_trials"] == 4 and third["n_ran"] == 0 and third["best_value"] == second["best_value"]


def test_a_resumed_study_must_keep_its_settings(daemon_address, tmp_path):
    out = tmp_path / "tune"
    summary_of(tune(*BASE, "--connect", daemon_address, "--out", str(out), "--trials", "1", "--json", "--param", "rotate.degrees=0:20", "--confirm-seeds", "0"))
    proc = tune(*BASE, "--connect", daemon_address, "--out", str(out), "--trials", "2", "--param", "rotate.degrees=0:30", "--confirm-seeds", "0")
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
        (["--model", "lenet5_relu", "--dataset", "photos", "--connect", daemon_address], "--dataset photos cannot hold out a val split to score trials on: dataset 'photos': val_fraction=0.2 leaves the val split empty"),
        (["--model", "lenet5_relu", "--dataset", "shapes", "--val-fraction", "1.5"], "--val-fraction must be strictly between 0 and 1"),
        (["--model", "lenet5_relu", "--dataset", "shapes", "--confirm-seeds", "1"], "--confirm-seeds 1 cannot measure noise"),
        (["--model", "lenet5_relu", "--dataset", "shapes", "--dataset-option", "val_fraction=0.5"], "the hold-out is the tuner's: pass --val-fraction"),
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


def test_confirmation_writes_best_yaml_only_when_the_tuned_spec_wins(daemon_address, tmp_path):
    """A base spec that rotates digits anywhere in ±180° learns badly; every trial rotates by at most 10°
    (the base value lies outside the range, so no trial repeats it). Three new seeds per arm must show
    the tuned spec ahead beyond noise, and only then is best.yaml written."""
    base = tmp_path / "upside-down.yaml"
    base.write_text("name: upside-down\nops:\n  - {op: random_crop, size: 32, padding: 2}\n  - {op: rotate, degrees: 180}\n  - {op: normalize, mean: [0.26], std: [0.36]}\n")
    out = tmp_path / "tune"
    summary = summary_of(tune(*BASE, "--steps", "120", "--connect", daemon_address, "--out", str(out), "--pipeline", str(base), "--param", "rotate.degrees=0:10",
                              "--trials", "2", "--no-prune", "--json", timeout=400))  # fmt: skip
    confirmation = summary["confirmation"]
    assert confirmation["seeds"] == [1, 2, 3]
    assert list(confirmation["arms"]) == ["tuned", "base", "none"]
    assert all(len(arm["accuracies"]) == 3 for arm in confirmation["arms"].values())
    tuned, upside_down = confirmation["arms"]["tuned"], confirmation["arms"]["base"]
    assert summary["best_params"]["rotate.degrees"] <= 10 and summary["baseline_value"] is None
    assert tuned["mean"] > upside_down["mean"] + 0.1, confirmation
    assert confirmation["tuned_beats_base"] and confirmation["tuned_vs_base"]["p"] < 0.05, confirmation
    assert confirmation["verdict"].startswith("the tuned spec beats the base spec")
    # Test accuracies are counts out of digits' 359 test images.
    for arm in confirmation["arms"].values():
        assert all(v * 359 == pytest.approx(round(v * 359), abs=1e-3) for v in arm["accuracies"])
    best = PipelineSpec.from_file(str(out / "best.yaml"))
    assert summary["best_spec_path"] == str(out / "best.yaml")
    assert best.ops[1].degrees == pytest.approx(summary["best_params"]["rotate.degrees"])
    header = (out / "best.yaml").read_text().splitlines()[:3]
    assert "confirmed on the test split over seeds [1, 2, 3]" in header[0] and "Welch p = " in header[1]
    report = (out / "report.md").read_text()
    assert "| tuned (best trial) |" in report and "**Verdict:** the tuned spec beats the base spec" in report
    assert (out / "confirmation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Running it again reuses the stored confirmation: no trial and no confirmation run.
    again = summary_of(tune(*BASE, "--steps", "120", "--connect", daemon_address, "--out", str(out), "--pipeline", str(base), "--param", "rotate.degrees=0:10",
                            "--trials", "2", "--no-prune", "--json", "--quiet"))  # fmt: skip
    assert again["n_ran"] == 0 and again["confirmation"] == confirmation


def test_a_base_spec_at_chance_stops_the_study_and_a_fixed_rerun_starts_over(daemon_address, tmp_path):
    out = tmp_path / "tune"
    proc = tune(*BASE[:4], "--steps", "3", "--lr", "1e-7", "--connect", daemon_address, "--out", str(out), "--trials", "3")
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1  # one line: no traceback from Optuna
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("augserve: error: the base spec's trial ended at chance: val accuracy")
    assert "10 classes, 287 val samples" in line and "raise --steps" in line
    assert not (out / "best.yaml").exists()
    # The user raises the budget and the rate: the study made under the old settings held no trial that
    # counts, so it starts over instead of being refused as "made with other settings".
    fixed = summary_of(tune(*BASE, "--connect", daemon_address, "--out", str(out), "--trials", "2", "--confirm-seeds", "0", "--json", "--quiet"))
    assert fixed["n_trials"] == 2 and fixed["n_ran"] == 2 and fixed["best_value"] > 0.3


def test_hyperband_pruner_runs_a_study(daemon_address, tmp_path):
    out = tmp_path / "tune"
    summary = summary_of(tune(*BASE, "--connect", daemon_address, "--out", str(out), "--trials", "4", "--pruner", "hyperband", "--confirm-seeds", "0", "--json", "--quiet"))
    assert summary["pruner"] == "hyperband" and summary["n_complete"] + summary["n_pruned"] == 4
    assert summary["n_complete"] >= 1 and "pruner hyperband" in (out / "report.md").read_text()
