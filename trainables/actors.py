"""A trial's analysis actors: a `memray.experiment` executor over a pool of Ray actors.

The actors are started when their trial starts (their start-up overlaps training) and, like the
trainable actor itself (Tune's `reuse_actors`), are kept for the next trial that this trainable
process runs: each trial hands them its trained weights and snapshots (`AnalysisJob`), and they
run its work items in the trial's own placement group (one bundle each, see `resources`).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import ray
import torch

from memray.config import ExperimentConfig
from memray.data import load_data
from memray.experiment import AnalysisJob, AnalysisRunner, Executor
from memray.train import keep_freed_memory

from .resources import share, threads


@ray.remote
class AnalysisWorker:
    """Builds an `AnalysisRunner` for each trial it is handed and runs work items on it; loads a
    dataset once for every trial that uses it."""

    def __init__(self, data_dir: str | None, n_threads: int):
        keep_freed_memory()
        torch.set_num_threads(n_threads)
        self.data_dir = data_dir
        self.device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.data: tuple[str, Any] | None = None
        self.runner: AnalysisRunner | None = None

    def setup(self, cfg: ExperimentConfig, model_state: dict, snapshots: dict, rare: list[int] | None = None) -> None:
        dkey = json.dumps(dataclasses.asdict(cfg.data), sort_keys=True)
        if self.data is None or self.data[0] != dkey:
            self.data = (dkey, load_data(cfg.data, self.data_dir))
        self.runner = AnalysisRunner(cfg, model_state, snapshots, self.data[1], device=self.device, rare=rare)

    def run(self, item):
        return self.runner.run(item)


_POOLS: dict[tuple, list] = {}  # per trainable process: the actors kept between its trials


def _pool(n: int, cpus: float, gpus: float, data_dir: str | None) -> list:
    key = (n, cpus, gpus, data_dir)
    for k in [k for k in _POOLS if k != key]:
        for a in _POOLS.pop(k):
            ray.kill(a)
    if key not in _POOLS:
        bundle = share(cpus, gpus, n + 1)  # the bundle each worker has in resources()
        opts = {"num_cpus": bundle["CPU"], **({"num_gpus": bundle["GPU"]} if "GPU" in bundle else {})}
        _POOLS[key] = [AnalysisWorker.options(**opts).remote(data_dir, threads(cpus / n)) for _ in range(n)]
    return _POOLS[key]


def analysis_executor(cfg: ExperimentConfig, workers: int, cpus: float, gpus: float,
                      data_dir: str | None) -> Executor | None:
    """An executor over `workers` actors holding the trial's CPUs, or None (the analyses then run in
    the trainable's own process) when there are no workers or no analyses that use them."""
    if workers <= 0 or not set(cfg.analyses.run) & {"rewind", "retrain", "flip", "localize"}:
        return None
    actors = _pool(workers, cpus, gpus, data_dir)

    def run(job: AnalysisJob) -> list:
        torch.set_num_threads(1)  # the workers hold the trial's CPUs now
        try:
            state, snaps = ray.put(job.model_state), ray.put(job.snapshots)
            ray.get([a.setup.remote(job.cfg, state, snaps, job.rare) for a in actors])
            pool = ray.util.ActorPool(actors)
            return list(pool.map_unordered(lambda a, item: a.run.remote(item), job.items))
        finally:
            torch.set_num_threads(threads(cpus))

    return run
