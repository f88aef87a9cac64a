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


def write_best(plan, confirmation: dict, path: str) -> None:
    """``best.yaml``: the tuned spec that beat the base spec on test accuracy across seeds, with the
    evidence in its header."""
    c, t = plan.config, plan.trial
    tuned, base = confirmation["arms"]["tuned"], confirmation["arms"]["base"]
    test = confirmation["tuned_vs_base"]
    header = [
        f"# Best of augserve tune study {plan.study_name!r}: trial {confirmation['best_trial']}, confirmed on the test split over seeds {confirmation['seeds']}:",
        f"# tuned {format_arm(tuned)} vs base spec {format_arm(base)} (Welch p = {test['p']:.3g}),",
        f"# each run {t.epochs} epoch(s) of {c.model} on {c.dataset} (batch {t.batch_size}, {t.optimizer} lr {t.lr:g}); base pipeline {plan.base.name or plan.pipeline_name}.",
        f"# Train with it: python -m trainer train --model {c.model} --dataset {c.dataset} --pipeline {path}",
    ]
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(header) + "\n")
        handle.write(yaml.safe_dump(tuned["spec"], sort_keys=False))


def format_arm(stats: dict) -> str:
    return f"{100 * stats['mean']:.2f} ± {100 * stats['std']:.2f}%"


ARM_LABELS = {"tuned": "tuned (best trial)", "base": "base spec", "none": "no augmentation"}


def plot_confirmation(confirmation: dict, path: str, title: str, labels: dict | None = None) -> None:
    """Test accuracy per arm: every seed's run as a dot, mean ± std as a bar with error bars."""
    figure = _figure(6, 3.8)
    axes = figure.add_subplot()
    arms = list(confirmation["arms"])
    for x, arm in enumerate(arms):
        stats = confirmation["arms"][arm]
        values = [100 * v for v in stats["accuracies"]]
        axes.bar(x, 100 * stats["mean"], yerr=100 * stats["std"], color="tab:blue" if arm == "tuned" else "tab:grey", alpha=0.5, capsize=6)
        axes.scatter([x] * len(values), values, color="black", s=14, zorder=3)
    lows = [100 * min(confirmation["arms"][a]["accuracies"]) for a in arms]
    axes.set_ylim(max(0.0, min(lows) - 5), min(100.0, max(100 * confirmation["arms"][a]["mean"] + 100 * confirmation["arms"][a]["std"] for a in arms) + 3))
    axes.set_xticks(range(len(arms)), [(labels or ARM_LABELS)[a] for a in arms], fontsize=8 if len(arms) > 3 else None)
    axes.set_ylabel("test accuracy (%)")
    axes.set_title(title, fontsize=10)
    axes.grid(True, axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)


def write_markdown(path: str, plan, summary: dict, confirmation: dict | None) -> None:
    """``report.md``: settings, the best trials, and the confirmation with its verdict and plots."""
    c, t = plan.config, plan.trial
    lines = [
        f"# augserve tune: {c.model} on {c.dataset}",
        "",
        f"Study `{plan.study_name}`: {summary['n_trials']} trials ({summary['n_complete']} complete, {summary['n_pruned']} pruned, {summary['n_failed']} failed), "
        f"pruner {c.pruner}. Each trial: {t.epochs} epoch(s) = {summary.get('trial_steps')} steps, batch {t.batch_size}, {t.optimizer} lr {t.lr:g}, seed {c.seed}; "
        f"scored on a {c.val_fraction:g} stratified hold-out of train (val, {plan.val_size} samples). Base spec: `{plan.base.name or plan.pipeline_name}`.",
        "",
        "![trials](history.png)",
        "",
    ]
    if summary.get("best_value") is not None:
        lines += [f"Best trial: {summary['best_trial']}, val accuracy {summary['best_value']:.4f}: " + ", ".join(f"`{k}={v:.4g}`" for k, v in summary["best_params"].items()), ""]
    if confirmation is None:
        lines += ["No confirmation across seeds (`--confirm-seeds 0`, or no complete trial): nothing is claimed and no best.yaml is written.", ""]
    else:
        lines += [
            f"## Confirmation on the test split, seeds {confirmation['seeds']}",
            "",
            "| arm | test accuracy (mean ± std) | runs |",
            "|---|---|---|",
        ]
        for arm, stats in confirmation["arms"].items():
            lines.append(f"| {ARM_LABELS[arm]} | {format_arm(stats)} | " + ", ".join(f"{100 * v:.2f}" for v in stats["accuracies"]) + " |")
        lines.append("")
        for name, label in (("tuned_vs_base", "tuned − base"), ("base_vs_none", "base − none")):
            test = confirmation.get(name)
            if test is not None:
                p = "undefined" if test["p"] is None else f"{test['p']:.3g}"
                lines.append(f"- {label}: {100 * test['difference']:+.2f} points, Welch one-sided p = {p}")
        lines += ["", f"**Verdict:** {confirmation['verdict']}.", "", "![confirmation](confirmation.png)", ""]
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))


def write_outputs(study, plan, confirmation: dict | None = None) -> dict:
    """Write every output file; return the summary fields about them. ``best.yaml`` only when the
    confirmation says the tuned spec beats the base spec (a stale one from an earlier run is removed)."""
    import optuna

    State = optuna.trial.TrialState
    os.makedirs(plan.out, exist_ok=True)
    names = [p.name for p in plan.params]
    trials = study.get_trials(deepcopy=False)
    try:
        best = study.best_trial
    except ValueError:
        best = None
    best_path = os.path.join(plan.out, "best.yaml")
    confirmed = bool(confirmation and confirmation["tuned_beats_base"])
    if confirmed:
        write_best(plan, confirmation, best_path)
    elif os.path.exists(best_path):
        os.remove(best_path)
    rows = trial_rows(study, names)
    csv_path = os.path.join(plan.out, "trials.csv")
    write_csv(csv_path, rows, names)
    title = f"{plan.config.model} on {plan.config.dataset}, {plan.trial.epochs} epoch(s) per trial"
    history_path = os.path.join(plan.out, "history.png")
    plot_history(study, history_path, f"augserve tune: {title}")
    importances, note = compute_importances(study, plan.config.seed)
    importances_path = os.path.join(plan.out, "importances.png")
    plot_importances(importances, note, importances_path, f"parameter importances: {title}")
    baseline = [t.value for t in trials if t.user_attrs.get("baseline") and t.state == State.COMPLETE]
    summary = {
        "study_name": plan.study_name,
        "storage": plan.storage,
        "out": plan.out,
        "trial_epochs": plan.trial.epochs,
        "trial_steps": best.user_attrs.get("steps") if best else None,
        "batch_size": plan.trial.batch_size,
        "lr": plan.trial.lr,
        "optimizer": plan.trial.optimizer,
        "pruner": plan.config.pruner,
        "val_size": plan.val_size,
        "best_value": best.value if best else None,
        "best_trial": best.number if best else None,
        "best_params": dict(best.params) if best else None,
        "best_trial_spec": os.path.join(plan.out, "trials", f"trial-{best.number:04d}.yaml") if best else None,
        "best_spec_path": best_path if confirmed else None,
        "baseline_value": baseline[0] if baseline else None,
        "confirmation": confirmation,
        "n_trials": len(trials),
        "n_complete": sum(t.state == State.COMPLETE for t in trials),
        "n_pruned": sum(t.state == State.PRUNED for t in trials),
        "n_failed": sum(t.state == State.FAIL for t in trials),
        "trials_csv": csv_path,
        "history_png": history_path,
        "importances_png": importances_path,
        "importances": importances,
        "importances_note": note,
        "report_md": os.path.join(plan.out, "report.md"),
        "confirmation_png": None,
        "table": format_table(rows, names, best.number if best else None),
    }
    if confirmation is not None:
        summary["confirmation_png"] = os.path.join(plan.out, "confirmation.png")
        plot_confirmation(confirmation, summary["confirmation_png"], f"{plan.config.model} on {plan.config.dataset}: test accuracy over seeds {confirmation['seeds']}")
    write_markdown(summary["report_md"], plan, summary, confirmation)
    return summary
