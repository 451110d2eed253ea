"""What recording the free memorization proxy costs (EXPERIMENTS.md section 8, "A free proxy").

Every training step adds its per-example losses to a cumulative-loss vector and marks the
examples it got wrong (the learning epoch). Two trainers with the same config and seed (same
weights, same batches) train epoch by epoch, one recording and one not (`Trainer.record_stats`),
interleaved with a rotating order so machine noise hits both alike; an epoch here is only the
training steps (no evaluation runs in these epochs). Per arch: the median over BENCH_REPEATS
(default 15, at least 5) epoch pairs of time with / time without. Cases: mnist5k (4,000 real MNIST
images at 28x28) x the `mnist` preset's mlp (width 512) and lenet (width 40), ETD as trained
(p_gen 0.2, p_mem 0.1), batch 64. Headline `proxy_over_none`: the worst arch's median ratio
(goal <= 1.02). Prints one JSON object as its last line.

    python benchmarks/proxy_overhead.py
"""
from __future__ import annotations

import json
import os
import statistics
import time

import torch

from memray.config import ExperimentConfig
from memray.data import load_data
from memray.train import Trainer, describe_device, pick_device

REPEATS = max(5, int(os.environ.get("BENCH_REPEATS", "15")))
CASES = (("mlp", 512), ("lenet", 40))


def trainer(arch: str, width: int, data, device, record: bool) -> Trainer:
    cfg = ExperimentConfig.from_dict({
        "data": {"dataset": "mnist5k", "noise_rate": 0.1}, "model": {"arch": arch, "width": width},
        "dropout": {"kind": "example_tied", "p_gen": 0.2, "p_mem": 0.1},
        "optim": {"epochs": 1000, "batch_size": 64}, "eval_every": 1000, "analyses": {"run": []}})
    tr = Trainer(cfg, data, device)
    tr.record_stats = record
    return tr


def main() -> None:
    device = pick_device()
    data = load_data(ExperimentConfig.from_dict({"data": {"dataset": "mnist5k", "noise_rate": 0.1}}).data)
    out = {"torch": torch.__version__, "device": describe_device(device), "repeats": REPEATS, "models": {}}
    for arch, width in CASES:
        on, off = (trainer(arch, width, data, device, r) for r in (True, False))
        on.run_epoch(), off.run_epoch()  # warm-up (allocations, ETD mask state)
        ratios, secs = [], {"with": [], "without": []}
        for rep in range(REPEATS):
            t = {}
            for name, tr in ((("with", on), ("without", off)) if rep % 2 == 0 else (("without", off), ("with", on))):
                t0 = time.perf_counter()
                tr.run_epoch()
                t[name] = time.perf_counter() - t0
                secs[name].append(t[name])
            ratios.append(t["with"] / t["without"])
        assert torch.equal(next(on.model.parameters()), next(off.model.parameters()))  # recording changes nothing
        out["models"][arch] = {"width": width, "median_ratio": round(statistics.median(ratios), 4),
                               "min_ratio": round(min(ratios), 4), "max_ratio": round(max(ratios), 4),
                               "epoch_s_with": round(statistics.median(secs["with"]), 4),
                               "epoch_s_without": round(statistics.median(secs["without"]), 4)}
        print(json.dumps({arch: out["models"][arch]}), flush=True)
    out["headline"] = {"proxy_over_none": max(m["median_ratio"] for m in out["models"].values())}
    out["goals"] = {"proxy_over_none": "<= 1.02"}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
