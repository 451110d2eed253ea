"""Memorization-score models per minute: M mlps trained at once (`memray.memscores.train_stacked`:
forward, backward and SGD step as batched matmuls) vs the same M one after another (`train_one`:
the model with autograd and torch's fused SGD), both doing the same work: digits,
the default recipe (mlp width 512, 60 epochs, batch 64, r = 0.7), final predictions only, no
per-epoch evaluation. Headline `stacked_over_sequential` (models per minute, stacked over one at
a time; goal >= 1.5 on 2 CPU cores). Also FLOPs per step (forward + backward, 3 x the forward's
multiply-adds x 2) and the achieved GFLOP/s of both sides.

    python benchmarks/memscore_throughput.py
    BENCH_MODELS=8 BENCH_EPOCHS=10 python benchmarks/memscore_throughput.py   # M = 16 by default
"""
from __future__ import annotations

import json
import math
import os
import time

import torch

from memray import memscores as M
from memray.config import DataConfig, ScoreConfig
from memray.data import load_data
from memray.train import describe_device

MODELS = int(os.environ.get("BENCH_MODELS", "16"))  # the default scoring preset's models per trial
EPOCHS = int(os.environ.get("BENCH_EPOCHS", "60"))


def main() -> None:
    data = load_data(DataConfig(dataset="digits", noise_rate=0.1))
    x, y = data.x_train, data.y_train
    recipe = ScoreConfig(width=512, epochs=EPOCHS, batch_size=64, subset_fraction=0.7)
    seeds = M.model_seeds(MODELS)
    M.train_one(ScoreConfig(width=512, epochs=1), seeds[0], x, y, 10)  # warm-up
    t = time.perf_counter()
    M.train_stacked(recipe, seeds, x, y, 10)
    stacked = time.perf_counter() - t
    t = time.perf_counter()
    for s in seeds:
        M.train_one(recipe, s, x, y, 10)
    sequential = time.perf_counter() - t
    d, w = math.prod(x.shape[1:]), recipe.resolved_width
    macs = d * w + 2 * w * w + w * 10  # per example, forward
    steps = EPOCHS * math.ceil(round(0.7 * len(x)) / recipe.batch_size)
    flops_per_step = 3 * 2 * macs * recipe.batch_size  # per model: forward + backward
    total = flops_per_step * steps * MODELS
    out = {"torch": torch.__version__, "device": describe_device(torch.device("cpu")), "models": MODELS,
           "epochs": EPOCHS, "stacked_s": round(stacked, 2), "sequential_s": round(sequential, 2),
           "stacked_models_per_min": round(60 * MODELS / stacked, 2),
           "sequential_models_per_min": round(60 * MODELS / sequential, 2),
           "flops_per_step_per_model": flops_per_step,
           "stacked_gflops": round(total / stacked / 1e9, 2), "sequential_gflops": round(total / sequential / 1e9, 2)}
    out["headline"] = {"stacked_over_sequential": round(sequential / stacked, 3)}
    out["goals"] = {"stacked_over_sequential": ">= 1.5 on 2 CPU cores"}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
