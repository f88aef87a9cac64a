"""What a study leaves behind: ``best.yaml``, ``trials.csv``, a printed table, ``history.png`` and
``importances.png`` (all in the study's ``out`` folder).

Plots are drawn with matplotlib's object API on an Agg canvas (no pyplot global state, no display
needed). Importances come from ``optuna.importance.get_param_importances`` with a seeded fANOVA
evaluator over the complete trials; with fewer than two complete trials they cannot be computed, and
``importances.png`` then carries that note instead of bars (the summary's ``importances`` is None and
``importances_note`` says why).
"""

from __future__ import annotations

import csv
import math
import os
import warnings

import yaml

CSV_FIELDS = ["number", "state", "value", "epochs", "duration_s"]


def trial_rows(study, param_names: list[str]) -> list[dict]:
    """One dict per trial: number, state, value, epochs (reported), duration_s, then each parameter."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        row = {
            "number": trial.number,
            "state": trial.state.name,
            "value": trial.value,
            "epochs": len(trial.intermediate_values),
            "duration_s": round(trial.duration.total_seconds(), 2) if trial.duration else None,
        }
        for name in param_names:
            row[name] = trial.params.get(name)
        rows.append(row)
    return rows


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_csv(path: str, rows: list[dict], param_names: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_FIELDS + [f"params_{name}" for name in param_names])
        for row in rows:
            writer.writerow([_cell(row[k]) for k in CSV_FIELDS + param_names])


def format_table(rows: list[dict], param_names: list[str], best_number: int | None = None) -> str:
    """The trials as an aligned text table; the best trial is marked with ``*``."""
    headers = ["#", "state", "accuracy", "epochs", "time_s", *param_names]
    body = []
    for row in rows:
        mark = "*" if row["number"] == best_number else ""
        value = "" if row["value"] is None else f"{row['value']:.4f}"
        seconds = "" if row["duration_s"] is None else f"{row['duration_s']:.1f}"
        params = ["" if row[n] is None else f"{row[n]:.4g}" for n in param_names]
        body.append([f"{row['number']}{mark}", row["state"].lower(), value, str(row["epochs"]), seconds, *params])
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in body]
    return "\n".join(lines)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def plot_history(study, path: str, title: str) -> None:
    """Held-out accuracy against trial number: complete trials, pruned ones at their last report, and
    the best so far."""
    import optuna

    State = optuna.trial.TrialState
    figure = _figure(7, 4.2)
    axes = figure.add_subplot()
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == State.COMPLETE]
    pruned = [t for t in study.get_trials(deepcopy=False) if t.state == State.PRUNED and t.intermediate_values]
    if complete:
        axes.scatter([t.number for t in complete], [t.value for t in complete], color="tab:blue", label="complete", zorder=3)
        best, xs, ys = -math.inf, [], []
        for trial in sorted(complete, key=lambda t: t.number):
            best = max(best, trial.value)
            xs.append(trial.number)
            ys.append(best)
        last = max(t.number for t in study.get_trials(deepcopy=False))
        if last > xs[-1]:
            xs.append(last)
            ys.append(best)
        axes.step(xs, ys, where="post", color="tab:red", label="best so far")
    if pruned:
        axes.scatter([t.number for t in pruned], [t.intermediate_values[max(t.intermediate_values)] for t in pruned], marker="x", color="tab:grey", label="pruned (last epoch reported)", zorder=3)
    baseline = [t for t in complete if t.user_attrs.get("baseline")]
    for trial in baseline:
        axes.annotate("base spec", (trial.number, trial.value), textcoords="offset points", xytext=(6, -12), fontsize=8)
    if not complete and not pruned:
        axes.text(0.5, 0.5, "no finished trials yet", ha="center", va="center", transform=axes.transAxes)
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("trial")
    axes.set_ylabel("held-out accuracy")
    axes.set_title(title, fontsize=10)
    axes.grid(True, alpha=0.3)
    if complete or pruned:
        axes.legend(loc="best", fontsize=8, framealpha=0.6)
    figure.tight_layout()
    figure.savefig(path)


def compute_importances(study, seed: int = 0) -> tuple[dict | None, str | None]:
    """(importances, None), or (None, the reason they cannot be computed)."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return None, f"parameter importances need at least 2 complete trials; this study has {len(complete)}"
    if len({t.value for t in complete}) < 2:
        return None, "parameter importances are undefined: every complete trial scored the same"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
            importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (RuntimeError, ValueError) as exc:
        return None, f"parameter importances could not be computed: {exc}"
    return {k: float(v) for k, v in importances.items()}, None


def plot_importances(importances: dict | None, note: str | None, path: str, title: str) -> None:
    figure = _figure(7, max(2.5, 0.5 * len(importances or {}) + 1.5))
    axes = figure.add_subplot()
    if importances:
        names = list(importances)[::-1]  # largest on top
        bars = axes.barh(names, [importances[n] for n in names], color="tab:blue")
        axes.bar_label(bars, fmt="%.2f", padding=3, fontsize=8)
        axes.set_xlabel("importance (fANOVA, share of variance of held-out accuracy)")
        axes.set_xlim(0, 1)
    else:
        axes.axis("off")
        axes.text(0.5, 0.5, note or "no importances", ha="center", va="center", wrap=True, transform=axes.transAxes)
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path)


def write_best(study, plan, path: str) -> dict | None:
    """``best.yaml`` from the best complete trial (its stored spec, or the base spec with its params)."""
    from pipelines import PipelineSpec

    from .params import apply_values

    try:
        best = study.best_trial
    except ValueError:
        return None
    stored = best.user_attrs.get("spec")
    spec = PipelineSpec.model_validate(stored) if stored else apply_values(plan.base, best.params, name=f"{plan.base.name or 'custom'}-tuned")
    c = plan.config
    header = [
        f"# Best of augserve tune study {plan.study_name!r}: trial {best.number}, held-out accuracy {best.value:.4f}",
        f"# after {c.epochs} epoch(s) of {c.model} on {c.dataset} (batch {c.batch_size}, lr {c.lr:g}, seed {c.seed}); base pipeline {plan.pipeline_name}.",
        "# Tuned: " + ", ".join(f"{k}={v:.6g}" for k, v in best.params.items()),
        f"# Train with it: python -m trainer train --model {c.model} --dataset {c.dataset} --pipeline {path}",
    ]
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(header) + "\n")
        handle.write(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    return {"trial": best.number, "value": best.value, "params": dict(best.params)}


def write_outputs(study, plan) -> dict:
    """Write every output file; return the summary fields about them."""
    import optuna

    State = optuna.trial.TrialState
    os.makedirs(plan.out, exist_ok=True)
    names = [p.name for p in plan.params]
    trials = study.get_trials(deepcopy=False)
    best = write_best(study, plan, os.path.join(plan.out, "best.yaml"))
    rows = trial_rows(study, names)
    csv_path = os.path.join(plan.out, "trials.csv")
    write_csv(csv_path, rows, names)
    title = f"{plan.config.model} on {plan.config.dataset}, {plan.config.epochs} epoch(s) per trial"
    history_path = os.path.join(plan.out, "history.png")
    plot_history(study, history_path, f"augserve tune: {title}")
    importances, note = compute_importances(study, plan.config.seed)
    importances_path = os.path.join(plan.out, "importances.png")
    plot_importances(importances, note, importances_path, f"parameter importances: {title}")
    baseline = [t.value for t in trials if t.user_attrs.get("baseline") and t.state == State.COMPLETE]
    return {
        "study_name": plan.study_name,
        "storage": plan.storage,
        "out": plan.out,
        "best_value": best["value"] if best else None,
        "best_trial": best["trial"] if best else None,
        "best_params": best["params"] if best else None,
        "best_spec_path": os.path.join(plan.out, "best.yaml") if best else None,
        "baseline_value": baseline[0] if baseline else None,
        "n_trials": len(trials),
        "n_complete": sum(t.state == State.COMPLETE for t in trials),
        "n_pruned": sum(t.state == State.PRUNED for t in trials),
        "n_failed": sum(t.state == State.FAIL for t in trials),
        "trials_csv": csv_path,
        "history_png": history_path,
        "importances_png": importances_path,
        "importances": importances,
        "importances_note": note,
        "table": format_table(rows, names, best["trial"] if best else None),
    }
