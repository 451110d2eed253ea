"""The Ray Tune function trainable of a memorization-score sweep: one `memray.memscores.ScoringRun`
(a `ScoreConfig`'s models), adapted to Tune like `trainables.trial`.

It restores from Tune's checkpoint (falling back to an older one if the newest is unreadable),
reports after each step (an epoch of the stacked models, or one model when they train one at a
time) with a checkpoint at most every `checkpoint_s` seconds (a stacked checkpoint holds every
model's weights and momentum: 72 MB for 16 mlps of width 512), and writes its `memscore_models`
fragment once, atomically, at the end. A trial whose fragment exists is not trained again: the
same config gives the same predictions.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from ray import tune

from memray import tables
from memray.config import ScoreConfig

from .resources import threads
from .trial import restore_newest_readable


def score_trial(config: dict[str, Any]) -> None:
    import ray
    import torch

    from memray.data import load_data
    from memray.memscores import ScoringRun
    from memray.train import keep_freed_memory

    keep_freed_memory()  # before this thread's first large tensors (see its docstring)

    cfg = ScoreConfig.from_dict(config["score"])
    results, sweep, key = config["results_dir"], config["sweep"], cfg.trial_key
    base = {"trial_key": key, "node_id": ray.get_runtime_context().get_node_id()}
    if tables.exists(results, tables.fragment_rel("memscore_models", sweep, key)):
        tune.report({**base, "phase": "done", "already_done": True, "models_done": cfg.count})
        return
    torch.set_num_threads(threads(float(config["cpus_per_trial"])))
    device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    t0 = time.time()
    run = ScoringRun(cfg, load_data(cfg.data, config.get("data_dir"), device=device))
    restore_newest_readable(run, tune.get_checkpoint())
    base.update({"device": device, "stacked": run.stacked, "restored_from": run.restored_from})
    every, last = float(config.get("checkpoint_s", 30.0)), time.monotonic()
    for progress in run.steps():
        metrics = {**base, **progress, "phase": "train", "wall_s": time.time() - t0}
        if time.monotonic() - last >= every and progress["step"] < progress["steps"]:
            with tempfile.TemporaryDirectory() as d:
                run.save(Path(d) / "state.pt")
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
            last = time.monotonic()
        else:
            tune.report(metrics)
    tables.write_fragment(results, "memscore_models", sweep, key, run.table(sweep))
    tune.report({**base, "phase": "done", "step": run.step, "steps": run.n_steps, "models_done": cfg.count,
                 "wall_s": time.time() - t0})
