"""What a sweep runs: a grid of trial configs, or a search space with its searcher (`Plan`), and the
order a grid's trials start in."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memray.config import DEFAULT_WIDTH, ExperimentConfig


@dataclass
class Plan:
    """A sweep's trials. A grid gives `configs`; a search gives `exp_space` (an experiment config
    with Tune search domains in it, e.g. {"dropout": {"p_mem": tune.uniform(...)}}),
    `num_samples` and its searcher and scheduler, and reports `objective` every epoch."""

    preset: str  # the grid preset's name, or "search"
    configs: list[ExperimentConfig] | None = None
    exp_space: dict[str, Any] | None = None
    num_samples: int = 1
    search_alg: Any = None
    scheduler: Any = None
    objective: str | None = None  # the search's metric, maximised
    spec: dict | None = None  # a search's flags: --resume must give the same
    resume_run_id: str | None = None  # the run id a --resume keeps

    @property
    def n_trials(self) -> int:
        return len(self.configs) if self.configs is not None else self.num_samples


# Training-set sizes and rough relative per-example costs (measured on a CPU for mlp and resnet9;
# the rest by their FLOPs): enough to order trials, not to predict their time.
TRAIN_SIZE = {"digits": 1400, "mnist1d": 4000, "mnist5k": 4000, "mnist": 60000, "fashion_mnist": 60000, "cifar10": 50000,
              "cifar100": 50000, "svhn": 73257}
ARCH_COST = {"mlp": 1.0, "lenet": 2.0, "resnet9": 6.0, "resnet50": 40.0, "vit_small": 20.0}
# An ETD trial's analyses probe the model in two modes (own and drop) and localize twice: on the
# default grid its trial took 1.5-1.8x its plain twin's time (resnet9 100 s vs 65, mlp 62-70 vs
# 38-40 on 2 cores), and starting it later left one core idle at the sweep's end.
ETD_COST = 1.6


def estimated_cost(c: ExperimentConfig) -> float:
    n = c.data.train_limit or TRAIN_SIZE[c.data.dataset]
    cost = c.optim.epochs * n * ARCH_COST[c.model.arch] * (c.model.resolved_width / DEFAULT_WIDTH[c.model.arch])
    return cost * (ETD_COST if c.dropout.kind != "none" and c.analyses.run else 1.0)


def longest_first(configs: list[ExperimentConfig]) -> list[ExperimentConfig]:
    """Trials in decreasing estimated cost: the last to start are short, so no core idles for long
    at the end of a sweep while one long trial finishes (longest-processing-time-first order)."""
    return sorted(configs, key=estimated_cost, reverse=True)
