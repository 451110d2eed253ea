"""Example-tied dropout overhead: training step time with ETD, standard dropout and no dropout.

For `mlp` and `resnet9` at their default widths, batch 128: three trainers with the same seed (same
init weights) step through the same batches, interleaved step by step with a rotating order, so
machine noise hits all three alike. Per epoch and kind: the summed step time (forward with the
kind's masks, backward, optimiser step). ETD's first epoch also pays for building its mask state
(timed separately and added there), the cost a design that builds masks lazily would pay on its
first pass. Also: bytes of ETD mask state for a 50,000-example dataset against the bound
examples x units / 8.

The whole measurement (fresh trainers, same seed) is repeated BENCH_REPEATS times (default 5);
each epoch's ratio is reported as the median over repeats, with its min and max, so one stall of
this shared machine does not decide the figure. Headline `etd_over_none`: the worst (over epochs)
median ETD / no-dropout ratio for `resnet9`. Prints one JSON object as its last line.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from memray.config import DataConfig, ExperimentConfig
from memray.data import batches, load_data
from memray.dropout import ExampleTiedDropout
from memray.train import Trainer, describe_device, pick_device

EPOCHS = int(os.environ.get("BENCH_EPOCHS", "4"))
REPEATS = int(os.environ.get("BENCH_REPEATS", "5"))
BATCH = 128
KINDS = ("none", "standard", "example_tied")
CASES = (("mlp", "mnist1d"), ("resnet9", "digits"))


def step(tr: Trainer, idx: torch.Tensor) -> None:
    x, y = tr.data.x_train[idx], tr.data.y_train[idx]
    loss = F.cross_entropy(tr.model(x, tr.masks_for_training(idx)), y)
    tr.opt.zero_grad(set_to_none=True)
    loss.backward()
    tr.opt.step()
    tr.sched.step()


def one_run(base: ExperimentConfig, data, device: torch.device) -> tuple[list[dict], float, list[int]]:
    """One side-by-side measurement: per-epoch summed step times for each kind, and the build time."""
    trainers = {k: Trainer(base.replace(**{"dropout.kind": k}), data, device) for k in KINDS}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # the ETD mask state each trainer built in its constructor, timed on its own
    t = time.perf_counter()
    etd = ExampleTiedDropout(trainers["example_tied"].cfg.dropout, trainers["example_tied"].model.site_units,
                             data.n_train, device)
    sync()
    build_s = time.perf_counter() - t
    assert torch.equal(etd.packed, trainers["example_tied"].etd.packed)
    gen = torch.Generator().manual_seed(0)
    epochs = []
    for epoch in range(1, EPOCHS + 1):
        times = {k: [] for k in KINDS}
        for i, idx in enumerate(batches(data.n_train, BATCH, gen, device)):
            order = KINDS[i % 3:] + KINDS[:i % 3]
            for k in order:
                sync()
                t = time.perf_counter()
                step(trainers[k], idx)
                sync()
                times[k].append(time.perf_counter() - t)
        total = {k: sum(v) for k, v in times.items()}
        if epoch == 1:
            total["example_tied"] += build_s
        epochs.append({"steps": len(times["none"]), "total": total})
    return epochs, build_s, trainers["example_tied"].model.site_units


def bench(arch: str, dataset: str, device: torch.device) -> dict:
    data = load_data(DataConfig(dataset=dataset, noise_rate=0.1))
    base = ExperimentConfig().replace(**{"data.dataset": dataset, "data.noise_rate": 0.1, "model.arch": arch,
                                         "optim.batch_size": BATCH, "optim.epochs": EPOCHS,
                                         "analyses.run": []})
    runs = [one_run(base, data, device) for _ in range(REPEATS)]
    units = runs[0][2]
    epochs = []
    for e in range(EPOCHS):
        per = [r[0][e] for r in runs]
        etd = [p["total"]["example_tied"] / p["total"]["none"] for p in per]
        std = [p["total"]["standard"] / p["total"]["none"] for p in per]
        epochs.append({
            "epoch": e + 1, "steps": per[0]["steps"],
            "step_ms": {k: round(1000 * statistics.median(p["total"][k] for p in per) / per[0]["steps"], 3)
                        for k in KINDS},
            "etd_over_none": round(statistics.median(etd), 3),
            "etd_over_none_min_max": [round(min(etd), 3), round(max(etd), 3)],
            "standard_over_none": round(statistics.median(std), 3),
        })
    big = ExampleTiedDropout(base.replace(**{"dropout.kind": "example_tied"}).dropout, units, 50_000, device)
    return {
        "dataset": dataset, "width": base.model.resolved_width, "site_units": units, "repeats": REPEATS,
        "mask_build_s_first_epoch": round(statistics.median(r[1] for r in runs), 4), "epochs": epochs,
        "worst_etd_over_none": max(e["etd_over_none"] for e in epochs),
        "first_epoch_etd_over_none": epochs[0]["etd_over_none"],
        "worst_etd_over_none_later_epochs": max(e["etd_over_none"] for e in epochs[1:]) if EPOCHS > 1 else None,
        "mask_state_bytes_50k": big.state_bytes,
        "mask_state_bound_bytes_50k": 50_000 * sum(units) // 8,
    }


def main() -> None:
    device = pick_device()
    out = {"torch": torch.__version__, "device": describe_device(device),
           "batch_size": BATCH, "epochs": EPOCHS, "repeats": REPEATS,
           "models": {arch: bench(arch, ds, device) for arch, ds in CASES}}
    out["headline"] = {"etd_over_none": out["models"]["resnet9"]["worst_etd_over_none"],
                       "mlp_etd_over_none": out["models"]["mlp"]["worst_etd_over_none"]}
    out["goals"] = {"etd_over_none": "<= 1.05", "mlp_etd_over_none": "<= 1.15"}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
