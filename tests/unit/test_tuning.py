"""``augserve tune``'s pure parts: parsing ``--param``, bounds and combinations, defaults, applying
sampled values to a spec, the pruning hook, the trials table and the importances note. No daemon."""

import math
import statistics
from types import SimpleNamespace

import pytest

import pipelines
from trainer.tuning import apply_values, baseline_values, build_search_space, default_params, parse_param
from trainer.tuning.params import Param
from pipelines import PipelineSpec, resolve

LENET = pipelines.load_preset("lenet5")  # random_crop, rotate (10, p 0.8), shear (8, p 0.5), normalize
RESNET = pipelines.load_preset("resnet")  # random_resized_crop, mirror, pca_color, normalize
ALL_OPS = PipelineSpec.model_validate(
    {
        "ops": [
            {"op": "random_resized_crop", "size": 32, "scale": [0.2, 0.9]},
            {"op": "rotate", "degrees": 5},
            {"op": "shear", "degrees": 5},
            {"op": "warp", "magnitude": 0.02},
            {"op": "pca_color"},
            {"op": "color_shift", "limit": 10},
            {"op": "rotate", "degrees": 2},
        ]
    }
)


# --- parsing -----------------------------------------------------------------------------------------


def test_parse_float_param():
    param = parse_param("rotate.degrees=0:30", LENET)
    assert (param.name, param.low, param.high, param.kind, param.log) == ("rotate.degrees", 0.0, 30.0, "float", False)
    assert param.base == 10.0 and (param.position, param.field, param.index) == (1, "degrees", None)


def test_parse_pair_element_and_log_scale():
    param = parse_param("random_resized_crop.scale.0=0.01:0.5:log", RESNET)
    assert (param.index, param.low, param.high, param.log, param.base) == (0, 0.01, 0.5, True, 0.08)


def test_parse_op_by_position_and_int_field():
    by_position = parse_param("1.degrees=0:20", LENET)
    assert by_position.position == 1 and by_position.field == "degrees"
    padding = parse_param("random_crop.padding=0:4", LENET)
    assert padding.kind == "int" and padding.base == 2


def test_first_op_of_a_name_is_addressed():
    assert parse_param("rotate.degrees=0:30", ALL_OPS).position == 1
    assert parse_param("6.degrees=0:30", ALL_OPS).position == 6


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("rotate.degrees", "must look like op.field=LOW:HIGH"),
        ("rotate.degrees=0", "must look like op.field=LOW:HIGH"),
        ("=0:3", "must look like op.field=LOW:HIGH"),
        ("rotate.degrees=0:3:linear", "must be 'log'"),
        ("rotate.degrees=a:3", "LOW 'a' is not a number"),
        ("rotate.degrees=0:inf", "must be finite"),
        ("rotate.degrees=10:5", "bad range, LOW must be < HIGH"),
        ("rotate.degrees=5:5", "bad range"),
        ("rotate.degrees=0:30:log", "log range needs LOW > 0"),
        ("twirl.degrees=0:30", "has no 'twirl' op"),
        ("rotate.degree=0:30", "rotate has no field 'degree'"),
        ("rotate.op=0:1", "has no field 'op'"),
        ("rotate.degrees.0=0:30", "not a list to index"),
        ("9.degrees=0:30", "the pipeline has 4 ops"),
        ("rotate.degrees=0:200", "ops[1].rotate.degrees = 200.0"),
        ("rotate.p=0:1.5", "ops[1].rotate.p = 1.5"),
        ("random_crop.padding=0:2.5", "takes whole numbers"),
        ("random_crop.size=20:32", "is not a number (a pair: address one element"),
        ("normalize.dtype=0:1", "is not a number"),
    ],
)
def test_bad_params_end_in_one_clear_line(text, fragment):
    with pytest.raises(ValueError) as info:
        parse_param(text, LENET)
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_scale_bounds_come_from_the_spec():
    with pytest.raises(ValueError, match=r"scale values must lie in \[0.0001, 1.0\]"):
        parse_param("random_resized_crop.scale.0=0.05:1.5", RESNET)


def test_duplicate_fields_are_refused():
    with pytest.raises(ValueError, match="address the same field"):
        build_search_space(LENET, ["rotate.degrees=0:30", "1.degrees=0:10"])


def test_combinations_of_ranges_are_checked():
    # Each range alone is fine, but scale.0 = 0.9 with scale.1 = 0.5 breaks min <= max.
    with pytest.raises(ValueError, match=r"combine into an invalid spec at random_resized_crop.scale.0=0.9, random_resized_crop.scale.1=0.5"):
        build_search_space(RESNET, ["random_resized_crop.scale.0=0.05:0.9", "random_resized_crop.scale.1=0.5:1"])
    assert len(build_search_space(RESNET, ["random_resized_crop.scale.0=0.05:0.5", "random_resized_crop.scale.1=0.5:1"])) == 2


# --- defaults ----------------------------------------------------------------------------------------


def test_defaults_only_for_ops_in_the_base_spec():
    assert [p.name for p in default_params(LENET)] == ["rotate.degrees", "shear.degrees"]
    assert [p.describe() for p in default_params(RESNET)] == ["random_resized_crop.scale.0=0.05:0.5", "pca_color.alpha_std=0:0.3"]
    names = [p.name for p in default_params(ALL_OPS)]
    assert names == ["random_resized_crop.scale.0", "rotate.degrees", "shear.degrees", "pca_color.alpha_std", "color_shift.limit", "warp.magnitude"]
    assert build_search_space(LENET, None) == default_params(LENET)


def test_default_crop_range_is_capped_by_the_spec_maximum():
    spec = PipelineSpec.model_validate({"ops": [{"op": "random_resized_crop", "size": 32, "scale": [0.1, 0.3]}]})
    (param,) = default_params(spec)
    assert (param.low, param.high) == (0.05, 0.3)


def test_no_tunable_op_is_an_error():
    spec = PipelineSpec.model_validate({"ops": [{"op": "mirror"}, {"op": "center_crop", "size": 8}]})
    with pytest.raises(ValueError, match="none of the ops tuned by default.*--param"):
        default_params(spec)


# --- applying values ---------------------------------------------------------------------------------


def test_apply_values_changes_only_the_addressed_fields():
    params = build_search_space(RESNET, ["random_resized_crop.scale.0=0.05:0.5", "pca_color.alpha_std=0:0.3", "mirror.horizontal=0:1"])
    spec = apply_values(RESNET, {"random_resized_crop.scale.0": 0.3, "pca_color.alpha_std": 0.25, "mirror.horizontal": 0.0}, name="resnet-tuned")
    assert spec.name == "resnet-tuned"
    assert spec.ops[0].scale == (0.3, 1.0) and spec.ops[0].size == RESNET.ops[0].size
    assert spec.ops[1].horizontal == 0.0 and spec.ops[2].alpha_std == 0.25
    assert spec.ops[2].eigval == RESNET.ops[2].eigval and spec.ops[3] == RESNET.ops[3]
    assert RESNET.ops[0].scale == (0.08, 1.0)  # the base spec is left alone
    assert PipelineSpec.model_validate(spec.to_yaml()) == spec  # what best.yaml holds loads back
    assert len(params) == 3


def test_apply_int_value():
    spec = apply_values(LENET, {"random_crop.padding": 4})
    assert spec.ops[0].padding == 4 and isinstance(spec.ops[0].padding, int)


def test_suggest_uses_the_right_optuna_distribution():
    calls = []
    trial = SimpleNamespace(
        suggest_int=lambda name, low, high, log: calls.append(("int", name, low, high, log)) or low,
        suggest_float=lambda name, low, high, log: calls.append(("float", name, low, high, log)) or high,
    )
    assert parse_param("random_crop.padding=0:4", LENET).suggest(trial) == 0
    assert parse_param("rotate.degrees=1:30:log", LENET).suggest(trial) == 30.0
    assert calls == [("int", "random_crop.padding", 0, 4, False), ("float", "rotate.degrees", 1.0, 30.0, True)]


def test_baseline_values_are_those_inside_the_ranges():
    params = build_search_space(LENET, ["rotate.degrees=0:30", "shear.degrees=10:20", "random_crop.padding=0:4"])
    assert baseline_values(params) == {"rotate.degrees": 10.0, "random_crop.padding": 2}  # shear's 8 lies outside 10-20


def test_param_round_trips_to_a_dict():
    param = parse_param("rotate.degrees=0:30", LENET)
    assert param.to_dict() == {"name": "rotate.degrees", "low": 0.0, "high": 30.0, "kind": "float", "log": False}
    assert isinstance(param, Param) and param.contains(10.0) and not param.contains(None)


# --- study pieces without a daemon -------------------------------------------------------------------


def test_prepare_checks_model_pipeline_and_params_before_any_daemon(tmp_path):
    from trainer.tuning.study import TuneConfig, prepare

    plan = prepare(TuneConfig(model="lenet5_relu", dataset="digits", out=str(tmp_path)))
    assert plan.pipeline_name == "lenet5" and [p.name for p in plan.params] == ["rotate.degrees", "shear.degrees"]
    assert plan.storage == f"sqlite:///{tmp_path / 'study.db'}" and plan.study_name == "tune-lenet5_relu-digits"
    assert prepare(TuneConfig(model="resnet18", dataset="/data/My Set.npz")).pipeline_name == "resnet"
    assert prepare(TuneConfig(model="resnet18", dataset="/data/My Set.npz")).out.endswith("tune-resnet18-My-Set")
    with pytest.raises(ValueError, match="unknown model 'lenet6'"):
        prepare(TuneConfig(model="lenet6", dataset="digits"))
    with pytest.raises(ValueError, match="unknown pipeline 'lenet7'"):
        prepare(TuneConfig(model="lenet5", dataset="digits", pipeline="lenet7"))
    with pytest.raises(ValueError, match="--trials must be >= 1"):
        prepare(TuneConfig(model="lenet5", dataset="digits", trials=0))


def test_trial_run_reports_each_epoch_and_prunes(tmp_path):
    import optuna

    from trainer.loop import EpochStats
    from trainer.metrics import MetricsLog
    from trainer.run import Run, TrainConfig
    from trainer.tuning.study import trial_reporter

    class FakeTrial:
        def __init__(self, prune):
            self.reports, self.prune = [], prune

        def report(self, value, step):
            self.reports.append((step, value))

        def should_prune(self):
            return self.prune

    config = TrainConfig(model="lenet5_relu", epochs=3, connect="tcp://127.0.0.1:9", progress=False, tensorboard=False)

    def run_with(trial):
        run = Run(config, epoch_callbacks=[trial_reporter(trial, config.epochs)])
        run.optimizer = SimpleNamespace(param_groups=[{"lr": 0.1}])
        run.evaluate = lambda: 0.5
        return run

    keep = FakeTrial(prune=False)
    run = run_with(keep)
    run._end_epoch(0, EpochStats(), MetricsLog(None, tensorboard=False))
    assert keep.reports == [(1, 0.5)] and run.history[-1]["val_accuracy"] == 0.5

    cut = FakeTrial(prune=True)
    run = run_with(cut)
    with pytest.raises(optuna.TrialPruned, match="after epoch 1"):
        run._end_epoch(0, EpochStats(), MetricsLog(None, tensorboard=False))
    run._end_epoch(2, EpochStats(), MetricsLog(None, tensorboard=False))  # the last epoch is never pruned
    assert cut.reports == [(1, 0.5), (3, 0.5)]


def test_trials_table_csv_and_importances_note(tmp_path):
    import optuna

    from trainer.tuning import report

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(lambda t: t.suggest_float("rotate.degrees", 0, 30) / 30, n_trials=1)
    importances, note = report.compute_importances(study)
    assert importances is None and "at least 2 complete trials" in note
    report.plot_importances(importances, note, str(tmp_path / "imp.png"), "t")
    assert (tmp_path / "imp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def pruned(trial):
        trial.suggest_float("rotate.degrees", 0, 30)
        trial.report(0.1, 1)
        raise optuna.TrialPruned()

    study.optimize(pruned, n_trials=1)
    study.optimize(lambda t: t.suggest_float("rotate.degrees", 0, 30) / 60, n_trials=2)
    rows = report.trial_rows(study, ["rotate.degrees"])
    assert [r["state"] for r in rows] == ["COMPLETE", "PRUNED", "COMPLETE", "COMPLETE"] and rows[1]["epochs"] == 1
    report.write_csv(str(tmp_path / "t.csv"), rows, ["rotate.degrees"])
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert lines[0] == "number,state,value,epochs,duration_s,params_rotate.degrees" and len(lines) == 5
    table = report.format_table(rows, ["rotate.degrees"], best_number=0)
    assert table.splitlines()[1].startswith("0*") and "pruned" in table
    importances, note = report.compute_importances(study)
    assert note is None and set(importances) == {"rotate.degrees"}
    report.plot_history(study, str(tmp_path / "h.png"), "t")
    assert (tmp_path / "h.png").stat().st_size > 1000


def test_add_parser_registers_tune_on_a_command():
    import argparse

    from trainer.tuning.cli import add_parser, config_from, run_command

    parser = argparse.ArgumentParser(prog="augserve")
    commands = parser.add_subparsers(dest="command", required=True)
    add_parser(commands)
    args = parser.parse_args(["tune", "--model", "lenet5_relu", "--dataset", "digits", "--param", "rotate.degrees=0:30", "--dataset-option", "size=64", "--trials", "5", "--json"])
    assert args.func is run_command and args.command == "tune"
    config = config_from(args)
    assert (config.model, config.trials, config.params, config.dataset_options, config.baseline, config.pruner) == ("lenet5_relu", 5, ["rotate.degrees=0:30"], {"size": 64}, True, "median")
    assert (config.steps, config.epochs, config.batch_size, config.lr, config.val_fraction, config.confirm_seeds) == (None, None, None, None, 0.2, 3)
    hyperband = config_from(parser.parse_args(["tune", "--model", "lenet5", "--dataset", "digits", "--pruner", "hyperband", "--steps", "200", "--confirm-seeds", "5"]))
    assert (hyperband.pruner, hyperband.steps, hyperband.confirm_seeds) == ("hyperband", 200, 5)
    assert config_from(parser.parse_args(["tune", "--model", "lenet5", "--dataset", "digits", "--no-prune"])).pruner == "none"


def test_main_turns_mistakes_into_one_line_and_status_2(capsys):
    from trainer.tuning.cli import main

    assert main(["--model", "lenet5_relu", "--dataset", "digits", "--param", "rotate.degrees=0:999"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("augserve: error: --param rotate.degrees=0:999 breaks the spec's bounds") and "\n" not in err


# --- confirmation across seeds --------------------------------------------------------------------------


def test_welch_matches_the_formula():
    from scipy import stats

    from trainer.tuning.confirm import welch

    result = welch([0.90, 0.92, 0.91], [0.80, 0.82, 0.81])
    assert result["difference"] == pytest.approx(0.10)
    assert result["t"] == pytest.approx(0.10 / math.sqrt(1e-4 / 3 + 1e-4 / 3))  # 12.247
    assert result["df"] == pytest.approx(4.0)  # equal variances and sizes: n_a + n_b - 2
    assert result["p"] == pytest.approx(stats.t.sf(result["t"], 4.0))
    unequal = welch([0.5, 0.7, 0.6, 0.65], [0.55, 0.56])
    va, vb = statistics.variance([0.5, 0.7, 0.6, 0.65]) / 4, statistics.variance([0.55, 0.56]) / 2
    assert unequal["df"] == pytest.approx((va + vb) ** 2 / (va**2 / 3 + vb**2 / 1))
    assert welch([0.8, 0.8], [0.8, 0.8])["p"] is None  # no spread: undefined, never "significant"
    assert welch([0.8], [0.7, 0.75])["p"] is None


def _confirmation(tuned, base, none=(0.5, 0.52, 0.51)):
    from trainer.tuning.confirm import ALPHA, describe, verdict, welch

    result = {"seeds": [1, 2, 3], "best_trial": 4, "arms": {}}
    if tuned is not None:
        result["arms"]["tuned"] = describe(list(tuned))
    result["arms"]["base"] = describe(list(base))
    result["arms"]["none"] = describe(list(none))
    test = welch(list(tuned), list(base)) if tuned is not None else None
    result["tuned_vs_base"] = test
    result["tuned_beats_base"] = bool(test and test["p"] is not None and test["p"] < ALPHA and test["difference"] > 0)
    result["verdict"] = verdict(result)
    return result


def test_verdicts():
    clear = _confirmation((0.90, 0.92, 0.91), (0.80, 0.82, 0.81))
    assert clear["tuned_beats_base"] and clear["verdict"].startswith("the tuned spec beats the base spec by +10.00 points")
    noise = _confirmation((0.90, 0.80, 0.85), (0.84, 0.86, 0.83))
    assert not noise["tuned_beats_base"] and "within the noise across 3 seeds" in noise["verdict"] and noise["verdict"].endswith("the base spec stands")
    worse = _confirmation((0.70, 0.71, 0.72), (0.80, 0.82, 0.81))
    assert not worse["tuned_beats_base"] and "-10.00 points" in worse["verdict"]
    assert _confirmation(None, (0.8, 0.81, 0.82))["verdict"] == "the best trial is the base spec itself: the base spec stands"


def test_confirmation_seeds_are_new_and_arms_follow_the_best_trial():
    from trainer.data import eval_spec
    from trainer.tuning.confirm import arms_of, seeds_for
    from trainer.tuning.params import apply_values

    assert seeds_for(0, 3) == [1, 2, 3] and seeds_for(7, 2) == [8, 9]
    base = resolve("lenet5")
    plan = SimpleNamespace(base=base)
    tuned = apply_values(base, {"rotate.degrees": 3.0}, name="lenet5-tuned")
    arms = arms_of(plan, SimpleNamespace(user_attrs={"spec": tuned.to_dict()}))
    assert [name for name, _ in arms] == ["tuned", "base", "none"]
    assert arms[0][1] == tuned and arms[1][1] is base and arms[2][1].ops == eval_spec(base).ops
    assert not any(op.op in ("rotate", "shear", "random_crop") for op in arms[2][1].ops)  # no augmentation at all
    same = arms_of(plan, SimpleNamespace(user_attrs={"spec": base.to_dict(), "baseline": True}))
    assert [name for name, _ in same] == ["base", "none"]


def test_chance_bound():
    from trainer.tuning.study import chance_bound

    assert chance_bound(10, 287) == pytest.approx(0.1 + 3 * math.sqrt(0.09 / 287))
    assert 0.15 < chance_bound(10, 287) < 0.16 and chance_bound(2, 10_000) == pytest.approx(0.515)
