"""The Ray Tune function trainable, its resources, and the trial config a search algorithm fills in.

This module is what the sweep driver imports: it loads no torch and no memray model code. The
trial's body is `trainables.run.train` (training, analyses, tables), imported in the trial's own
process when Tune first calls `train_trial` there.
"""
from __future__ import annotations

import copy
from typing import Any

from ray import tune


def resources(cpus_per_trial: float, gpus_per_trial: float, analysis_workers: int) -> tune.PlacementGroupFactory:
    """Bundle 0 for the trainable, one bundle per analysis worker; the trial's CPUs (and GPUs) are
    split evenly between them. Training and analysis are phases, so each phase uses all of them."""
    parts = analysis_workers + 1 if analysis_workers > 0 else 1
    return tune.PlacementGroupFactory([dict(_share(cpus_per_trial, gpus_per_trial, parts)) for _ in range(parts)])


def _share(cpus: float, gpus: float, parts: int) -> dict[str, float]:
    share = {"CPU": cpus / parts}
    if gpus > 0:
        share["GPU"] = gpus / parts
    return share


def _threads(cpus: float) -> int:
    return max(1, int(round(cpus)))


# Search algorithms sample flat names; these are the config fields they set.
SEARCH_FIELDS = {"p_gen": ("dropout", "p_gen"), "p_mem": ("dropout", "p_mem"), "lr": ("optim", "lr"),
                 "width": ("model", "width")}


def exp_dict(config: dict[str, Any]) -> dict[str, Any]:
    """The trial's experiment config: the grid's `exp`, with a search algorithm's samples applied."""
    exp = copy.deepcopy(config["exp"])
    for name, value in (config.get("search") or {}).items():
        section, field = SEARCH_FIELDS[name]
        exp.setdefault(section, {})[field] = int(value) if field == "width" else float(value)
    return exp


def train_trial(config: dict[str, Any]) -> None:
    """The trainable Tune runs: one trial (see `trainables.run`)."""
    from .run import train

    train(config)
