"""The Ray Tune function trainable: one `memray.experiment.Trial`, adapted to Tune.

In the shape of Tune's own function-trainable examples: restore from `tune.get_checkpoint()`,
report each epoch, with a checkpoint at most every `checkpoint_s` seconds (`--checkpoint-s`) and at
the last training epoch (`FailureConfig` restarts a killed trial from its last one; training is
deterministic, so a trial resumed from an older checkpoint ends with the same numbers), and hand
the analyses to the trial's actors (`trainables.actors`) when its placement group has bundles for
them, else run them in this process. Everything a trial does is
memray's; this module only moves it through Tune.

The sweep driver imports this module: it loads no torch and no memray model code at import (the
trial's process imports them when Tune first calls `train_trial` there).

Resources: a trial's placement group has bundle 0 for this trainable and one bundle per analysis
worker, the trial's CPUs (and GPUs) split evenly. Training and analysis are phases, so each uses
all of them: on a 2-core laptop with `--cpus-per-trial 1` two trials run at once, each training on
one core and then analysing on it.

A resumed sweep (same run id) does not train a trial whose `trials` row already says done: it
reports that trial's final metrics from its tables.
"""
from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
from ray import tune

from memray.config import ExperimentConfig
from memray.tables import TrialStore

from .resources import resources, threads

__all__ = ["resources", "train_trial"]


def restore_newest_readable(trial, checkpoint: tune.Checkpoint | None) -> None:
    """Restore from Tune's checkpoint; if it is gone or unreadable (deleted, truncated), from the
    newest older one the trial kept beside it; if none can be read, the trial starts from scratch.
    Either way it ends with the same numbers (deterministic resume)."""
    if checkpoint is None:
        return
    fs, (parent, name) = checkpoint.filesystem, checkpoint.path.rstrip("/").rsplit("/", 1)
    older = sorted((i.path for i in fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
                    if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")
                    and i.base_name < name), reverse=True)  # never one newer than Tune's
    for candidate in [checkpoint, *(tune.Checkpoint(p, filesystem=fs) for p in older)]:
        try:
            with candidate.as_directory() as d:
                trial.restore(Path(d) / "state.pt")
            return
        except Exception as e:  # noqa: BLE001 -- a damaged checkpoint: try the one before it
            warnings.warn(f"checkpoint {candidate.path} is unreadable ({type(e).__name__}: {e}); "
                          f"trying an older one", stacklevel=1)


def train_trial(config: dict[str, Any]) -> None:
    """The trainable Tune runs. `config["exp"]` is the trial's experiment config (a search's
    samples already in it); the rest is the sweep's runtime: where to write, CPUs, the run id."""
    import ray
    import torch

    from memray.experiment import Trial, finished_result
    from memray.train import keep_freed_memory

    from .actors import analysis_executor

    keep_freed_memory()  # before this thread's first large tensors (see its docstring)
    exp = ExperimentConfig.from_dict(config["exp"])
    store = TrialStore(config["results_dir"], config["sweep"], exp.trial_key)
    node_id = ray.get_runtime_context().get_node_id()
    done = store.finished(config.get("run_id"))
    if done is not None:
        tune.report({"trial_key": exp.trial_key, "node_id": done["node_id"], "device": done["device"],
                     "phase": "done", "restored_from": done.get("restored_from") or 0,
                     "attempts": done["attempts"], "already_done": True,
                     **finished_result(store, done, config.get("objective"))})
        return
    cpus, gpus = float(config["cpus_per_trial"]), float(config.get("gpus_per_trial") or 0.0)
    torch.set_num_threads(threads(cpus))
    device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    # the analysis actors start first: their start-up (torch import, data) overlaps training. Their
    # number is read from the placement group this trial holds (bundle 0 is the trainable's), not
    # from the config: a sweep resumed under another `--analysis-workers` default keeps its trials'
    # old configs but gets the new bundles, and actors sized for the old ones would never be placed
    workers = len(tune.get_context().get_trial_resources().bundles) - 1
    executor = analysis_executor(exp, workers, cpus, gpus, config.get("data_dir"))
    trial = Trial(exp, store, device=device, data_dir=config.get("data_dir"), objective=config.get("objective"))

    restore_newest_readable(trial, tune.get_checkpoint())
    base = {"trial_key": exp.trial_key, "node_id": node_id, "device": device, "restored_from": trial.restored_from}
    every, last = float(config.get("checkpoint_s", 30.0)), time.monotonic()
    for metrics in trial.epochs():
        t = time.perf_counter()
        result = {**base, "epoch": trial.epoch, "phase": "train", "wall_s": trial.wall_s, **metrics}
        # a checkpoint at most every `checkpoint_s` and at the last training epoch (a trial lost in
        # its analyses does not train again); the other epochs are reported without one
        if trial.epoch >= exp.optim.epochs or time.monotonic() - last >= every:
            with tempfile.TemporaryDirectory() as d:
                trial.save(Path(d) / "state.pt")
                tune.report(result, checkpoint=tune.Checkpoint.from_directory(d))
            last = time.monotonic()
            trial.timed("checkpoint", t)
        else:
            tune.report(result)
            trial.timed("report", t)
    final = trial.finish(executor)
    tune.report({**base, "epoch": trial.epoch, "phase": "done", "wall_s": trial.wall_s, **final})
