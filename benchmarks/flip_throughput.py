"""Minimum-unit flip throughput: batched targets vs one target at a time.

For `mlp` and `resnet9` (default recipe, digits, 10% noise): the same 64 noisy + 64 clean targets
and the same clean reference batch (128 examples), greedy search with budget 64, in float32, run
batched (all targets advancing together, passes of at most `max_rows` rows) and one at a time
(`targets_per_batch=1`), alternating, timing only the search. Reports targets/second for each,
whether the two gave the same unit sequences, the rows each pushed through forward + backward
(the batched form's exact savings: reference blocks shared by targets that zeroed the same units,
none for targets that just flipped), and the speedup. Headline `batched_speedup` = the `mlp`
speedup.

    BENCH_TARGETS=16 python benchmarks/flip_throughput.py   # fewer targets per kind (quicker)
"""
from __future__ import annotations

import json
import os
import time

import torch

from memray.config import DataConfig, ExperimentConfig
from memray.data import load_data
from memray.probes.flips import FlipSearch, select_targets
from memray.train import Trainer, describe_device, pick_device
from sweeps.presets import PRESETS

N_TARGETS = int(os.environ.get("BENCH_TARGETS", "64"))
REFERENCE = 128
BUDGET = 64


def bench(arch: str, device: torch.device) -> dict:
    epochs = PRESETS["default"]["epochs_by_arch"][arch]
    cfg = ExperimentConfig().replace(**{"model.arch": arch, "optim.epochs": epochs, "analyses.run": []})
    tr = Trainer(cfg, load_data(DataConfig(noise_rate=0.1)), device)
    tr.fit()
    tr.model.eval()
    for p in tr.model.parameters():
        p.requires_grad_(False)
    subject = tr.subject
    targets, ref = select_targets(subject, N_TARGETS, N_TARGETS, REFERENCE, seed=0)
    search = FlipSearch(subject, ref)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    modes = {"batched": len(targets), "one_at_a_time": 1}
    times = {k: 0.0 for k in modes}
    results, rows = {}, {}
    for rnd in range(2):  # alternate the order: machine drift hits both
        for k in (list(modes) if rnd == 0 else list(modes)[::-1]):
            search.rows_computed = {"target": 0, "reference": 0}
            sync()
            t = time.perf_counter()
            results[k] = search.greedy(targets, BUDGET, modes[k])
            sync()
            times[k] += time.perf_counter() - t
            rows[k] = dict(search.rows_computed)
    n = 2 * len(targets)  # targets searched over both rounds
    steps = sum(len(u) + 1 for u, _ in results["batched"])
    return {
        "targets": len(targets), "reference": len(ref), "budget": BUDGET, "search_steps": steps,
        "max_rows_per_pass": search.max_rows, "rows_computed": rows,
        "targets_per_s": {k: round(n / v, 3) for k, v in times.items()},
        "same_results": results["batched"] == results["one_at_a_time"],
        "speedup": round(times["one_at_a_time"] / times["batched"], 3),
    }


def main() -> None:
    device = pick_device()
    out = {"torch": torch.__version__, "device": describe_device(device),
           "models": {a: bench(a, device) for a in ("mlp", "resnet9")}}
    out["headline"] = {"batched_speedup": out["models"]["mlp"]["speedup"],
                       "resnet9_speedup": out["models"]["resnet9"]["speedup"]}
    out["goals"] = {"batched_speedup": ">= 2 on CPU, >= 20 on a GPU", "resnet9_speedup": ">= 0.9 on CPU"}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
