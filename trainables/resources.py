"""How a trial's CPUs and GPUs are split between its trainable and its analysis actors."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # ray.tune is imported where it is used: the analysis actors import this module too
    from ray import tune


def share(cpus: float, gpus: float, parts: int) -> dict[str, float]:
    """One bundle's resources when a trial's are split into `parts` equal bundles."""
    out = {"CPU": cpus / parts}
    if gpus > 0:
        out["GPU"] = gpus / parts
    return out


def resources(cpus_per_trial: float, gpus_per_trial: float, analysis_workers: int) -> tune.PlacementGroupFactory:
    """Bundle 0 for the trainable, one bundle per analysis worker; the trial's CPUs (and GPUs) are
    split evenly between them. Training and analysis are phases, so each phase uses all of them."""
    from ray import tune

    parts = analysis_workers + 1 if analysis_workers > 0 else 1
    return tune.PlacementGroupFactory([share(cpus_per_trial, gpus_per_trial, parts) for _ in range(parts)])


def threads(cpus: float) -> int:
    """torch's thread count for a process given `cpus` CPUs."""
    return max(1, int(round(cpus)))
