"""Small matplotlib helpers for the ``augserve bench`` PNG plots (Agg backend: no display needed).

Every figure carries a title line naming the machine's CPU and the date, because absolute figures hold
only for the machine that produced them (ratios are what to compare across machines).
"""

from __future__ import annotations

import datetime
import os
import platform

PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_line() -> str:
    """``'<CPU>, <n> cores — <YYYY-MM-DD>'`` for figure titles."""
    return f"{cpu_name()}, {os.cpu_count()} cores — {datetime.date.today().isoformat()}"


def check_png_path(path: str | None) -> None:
    """Raise ValueError (one line) unless ``path`` is None or a writable ``.png`` path — checked before a
    long benchmark starts, not after it."""
    if path is None:
        return
    if not str(path).lower().endswith(".png"):
        raise ValueError(f"--plot must name a .png file, got {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"cannot write {path}: folder {folder} is not writable")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    try:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    except OSError as exc:
        raise ValueError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        _pyplot().close(fig)
    return path


def _grouped_barh(ax, groups: list[str], series: list[str], values: dict[tuple[str, str], float], log: bool, xlabel: str, annotate: bool = True) -> None:
    """Horizontal bars: one band per group (top to bottom in the given order), one bar per series."""
    import numpy as np

    height = 0.8 / max(len(series), 1)
    positions = np.arange(len(groups))[::-1].astype(float)  # first group on top
    ax.set_ylim(-0.5, len(groups) - 0.5)
    finite = [v for v in values.values() if v and v > 0]
    for k, name in enumerate(series):
        offsets = positions + 0.4 - height * (k + 0.5)
        widths = [values.get((group, name)) or 0.0 for group in groups]
        bars = ax.barh(offsets, widths, height=height * 0.95, color=PALETTE[k % len(PALETTE)], label=name)
        if annotate:
            for bar, width in zip(bars, widths):
                if width > 0:
                    ax.text(width, bar.get_y() + bar.get_height() / 2, f" {width:,.0f}", va="center", ha="left", fontsize=6.5)
    ax.set_yticks(positions)
    ax.set_yticklabels(groups, fontsize=9)
    ax.set_xlabel(xlabel)
    if log and finite:
        ax.set_xscale("log")
        ax.set_xlim(min(finite) / 1.5, max(finite) * 2.5)
    elif finite:
        ax.set_xlim(0, max(finite) * 1.25)
    ax.grid(axis="x", which="both", alpha=0.3)
    ax.set_axisbelow(True)


def grouped_barh(path: str, panels: list[dict], title: str, log: bool = True) -> str:
    """One or more grouped horizontal bar charts stacked vertically, written to ``path``.

    ``panels``: ``{"title", "groups" (bands, top to bottom), "series" (bars per band, legend order),
    "values" ({(group, series): value}), "xlabel"}``.
    """
    plt = _pyplot()
    panels = [p for p in panels if p["groups"]]
    if not panels:
        raise ValueError("nothing to plot")
    heights = [max(2.0, 0.22 * len(p["groups"]) * max(len(p["series"]), 1) + 1.2) for p in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, sum(heights) + 0.8), gridspec_kw={"height_ratios": heights}, squeeze=False, layout="constrained")
    for ax, panel in zip(axes[:, 0], panels):
        _grouped_barh(ax, panel["groups"], panel["series"], panel["values"], log=log, xlabel=panel.get("xlabel", "images/s"))
        ax.set_title(panel.get("title", ""), fontsize=10, loc="left")
        ax.legend(fontsize=8, loc="lower right", framealpha=0.9)
    fig.suptitle(f"{title}\n{machine_line()}", fontsize=11)
    return _save(fig, path)


def scaling_plot(path: str, workers: list[int], curves: dict[str, list[float]], title: str, ratio_of: tuple[str, str] | None = None, ratio_label: str = "ratio") -> str:
    """Images/s against worker count, one line per loader; with ``ratio_of=(a, b)`` (curve names) a
    second panel shows a / b per worker count, its axis labelled ``ratio_label``."""
    plt = _pyplot()
    rows = 2 if ratio_of else 1
    fig, axes = plt.subplots(rows, 1, figsize=(7.5, 4.2 + 2.4 * (rows - 1)), gridspec_kw={"height_ratios": [3, 1.6][:rows]}, squeeze=False, sharex=True, layout="constrained")
    ax = axes[0, 0]
    for k, (name, values) in enumerate(curves.items()):
        ax.plot(workers, values, marker="o", color=PALETTE[k % len(PALETTE)], label=name)
        for x, y in zip(workers, values):
            ax.annotate(f"{y:,.0f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7.5)
    ax.set_ylabel("images/s to the trainer")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if ratio_of:
        a, b = ratio_of
        ratios = [x / y if y else float("nan") for x, y in zip(curves[a], curves[b])]
        ratio_ax = axes[1, 0]
        ratio_ax.plot(workers, ratios, marker="s", color="#333333")
        for x, y in zip(workers, ratios):
            ratio_ax.annotate(f"{y:.2f}×", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7.5)
        ratio_ax.axhline(1.0, color="#999999", linewidth=0.8, linestyle="--")
        ratio_ax.set_ylabel(ratio_label)
        ratio_ax.set_ylim(bottom=0, top=max([r for r in ratios if r == r] + [1.0]) * 1.3)
        ratio_ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("worker processes")
    axes[-1, 0].set_xticks(workers)
    fig.suptitle(f"{title}\n{machine_line()}", fontsize=10)
    return _save(fig, path)


def loader_comparison(path: str, loaders: list[str], images_per_s: list[float], stall_pct: list[float], title: str) -> str:
    """Two side-by-side bar panels: images/s trained and data-stall % for each loader."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), layout="constrained")
    colors = [PALETTE[k % len(PALETTE)] for k in range(len(loaders))]
    for ax, values, label, fmt in ((left, images_per_s, "images/s trained", "{:,.0f}"), (right, stall_pct, "data stall (% of step time)", "{:.1f}%")):
        bars = ax.bar(range(len(loaders)), values, color=colors)
        for bar, value in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), fmt.format(value), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(loaders)))
        ax.set_xticklabels(loaders, fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.set_ylim(0, max(list(values) + [1.0]) * 1.2)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    right.set_ylim(0, max(100.0, max(stall_pct, default=0) * 1.1))
    fig.suptitle(f"{title}\n{machine_line()}", fontsize=10)
    return _save(fig, path)
