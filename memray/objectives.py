"""Search objectives: one number per epoch from that epoch's evaluation metrics.

`dropout_search` reports the chosen objective every epoch so an early-stopping scheduler can act
on it. Metrics are the trial's `<mode>/<subset>/accuracy` values (ETD modes own/all/drop).
"""
from __future__ import annotations

import math

OWN_NOISY_FLOOR = 0.9  # the constraint: ETD must still memorize (own-mode train_noisy >= 0.9)

OBJECTIVES: dict[str, str] = {
    "etd_tradeoff": "drop/test - drop/train_noisy, minus the shortfall of own/train_noisy below 0.9",
    "drop_test": "drop/test",
    "drop_noisy": "drop/train_noisy",
    "forgetting": "own/train_noisy - drop/train_noisy",
    "pareto": "two objectives: drop/test (up) and drop/train_noisy (down), a Pareto front (NSGA-II)",
}
# multi-objective searches: name -> (objective, direction) pairs, reported as objective/<name>
MULTI: dict[str, tuple[tuple[str, str], ...]] = {"pareto": (("drop_test", "max"), ("drop_noisy", "min"))}


def objective_metrics(name: str, metrics: dict[str, float]) -> dict[str, float]:
    """What a search trial reports each epoch: {"objective": v}, or {"objective/<name>": v} for
    each objective of a multi-objective search."""
    if name in MULTI:
        return {f"objective/{n}": objective(n, metrics) for n, _ in MULTI[name]}
    return {"objective": objective(name, metrics)}


ALIASES = {"localization": "etd_tradeoff"}  # old names still accepted


def objective(name: str, metrics: dict[str, float]) -> float:
    """The objective `name` (one of OBJECTIVES) from one epoch's metrics; NaN when they are missing.

    `etd_tradeoff` (the default; `localization`, its name before the localization table existed,
    is an alias) is drop-mode test accuracy minus drop-mode train_noisy accuracy,
    subject to own-mode train_noisy >= 0.9. The constraint is a penalty equal to the shortfall,
    max(0, 0.9 - own/train_noisy): zero once the constraint holds (so the objective is exactly
    the unconstrained one there), and graded before, so early epochs of a trial that is on its way
    to memorizing rank above one that is not -- which is what an early-stopping scheduler needs.
    """
    name = ALIASES.get(name, name)
    if name not in OBJECTIVES:
        raise ValueError(f"objective={name!r} is invalid: one of {sorted(OBJECTIVES)}")

    def m(k):
        return metrics.get(f"{k}/accuracy", math.nan)

    if name == "drop_test":
        return m("drop/test")
    if name == "drop_noisy":
        return m("drop/train_noisy")
    if name in MULTI:
        raise ValueError(f"objective={name!r} has several values: use objective_metrics")
    if name == "forgetting":
        return m("own/train_noisy") - m("drop/train_noisy")
    own = m("own/train_noisy")
    if math.isnan(own):
        return math.nan
    return m("drop/test") - m("drop/train_noisy") - max(0.0, OWN_NOISY_FLOOR - own)
