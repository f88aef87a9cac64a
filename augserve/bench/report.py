"""What the benches' tables share: ratios between rows, numbers shown or a dash, targets judged together."""

from __future__ import annotations


def ratio(value: float | None, baseline: float | None) -> float | None:
    """``value / baseline`` to two decimals; None when either is missing (or the baseline is 0)."""
    return round(value / baseline, 2) if value is not None and baseline else None


def shown(value, fmt: str) -> str:
    """``value`` formatted by ``fmt`` (e.g. ``"{:.2f}"``), or a dash for a missing one."""
    return fmt.format(value) if value is not None else "–"


def all_met(targets: list[dict]) -> bool | None:
    """Whether every target (``{"pass": True / False / None, ...}``) passed; None when one was not judged."""
    if any(target["pass"] is None for target in targets):
        return None
    return all(target["pass"] for target in targets)
