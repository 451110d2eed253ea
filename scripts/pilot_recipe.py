"""The rule that picks the `mnist` presets' epochs and learning rate, run as written before any
verdict is computed (issue: "Closer to the paper").

Recipe: the authors' (SGD momentum 0.9, weight decay 5e-4, cosine schedule), batch 128, on
mnist5k with 10% label noise. For each arch, seed 0's plain model (no ETD) is trained for each
epoch count of 20, 30, 50 (fewest first) and, within it, each peak lr of 0.01 (the authors') and
0.05; the first pair whose final train_noisy accuracy reaches 0.99 (it memorizes) is the preset's.
If none does, the rule takes 50 epochs at the lr with the highest train_noisy and says so. Prints
one JSON line per pilot and, last, the choice per arch.

    python scripts/pilot_recipe.py                 # mlp 512, lenet 40 (the `mnist` preset)
    python scripts/pilot_recipe.py resnet9:64      # the `mnist-resnet9` preset's arch (a GPU)
"""
from __future__ import annotations

import json
import sys
import time

from memray.config import ExperimentConfig
from memray.data import load_data
from memray.train import Trainer, pick_device

EPOCHS = (20, 30, 50)
LRS = (0.01, 0.05)
MEMORIZES = 0.99
RECIPE = {"momentum": 0.9, "weight_decay": 5e-4, "schedule": "cosine", "batch_size": 128}


def pilot(arch: str, width: int, epochs: int, lr: float, data, device) -> dict:
    cfg = ExperimentConfig.from_dict({
        "data": {"dataset": "mnist5k", "noise_rate": 0.1}, "model": {"arch": arch, "width": width},
        "dropout": {"kind": "none"}, "optim": {**RECIPE, "epochs": epochs, "lr": lr}, "eval_every": epochs,
        "analyses": {"run": []}, "seed": 0})
    t0 = time.perf_counter()
    tr = Trainer(cfg, data, device)
    tr.fit()
    f = tr.final()
    return {"arch": arch, "width": width, "epochs": epochs, "lr": lr, "seconds": round(time.perf_counter() - t0, 1),
            "train_noisy": round(f["plain/train_noisy/accuracy"], 4), "test": round(f["plain/test/accuracy"], 4)}


def choose(arch: str, width: int, data, device) -> dict:
    tried = []
    for epochs in EPOCHS:
        for lr in LRS:
            r = pilot(arch, width, epochs, lr, data, device)
            print(json.dumps(r), flush=True)
            tried.append(r)
            if r["train_noisy"] >= MEMORIZES:
                return {"arch": arch, "width": width, "epochs": epochs, "lr": lr, "memorizes": True, "pilots": len(tried)}
    best = max((r for r in tried if r["epochs"] == EPOCHS[-1]), key=lambda r: r["train_noisy"])
    return {"arch": arch, "width": width, "epochs": EPOCHS[-1], "lr": best["lr"], "memorizes": False,
            "pilots": len(tried)}


def main(argv: list[str]) -> None:
    cases = [(a, int(w)) for a, w in (x.split(":") for x in argv)] or [("mlp", 512), ("lenet", 40)]
    device = pick_device()
    data = load_data(ExperimentConfig.from_dict({"data": {"dataset": "mnist5k", "noise_rate": 0.1}}).data, device=device)
    print(json.dumps({"recipe": RECIPE, "choice": [choose(a, w, data, device) for a, w in cases]}))


if __name__ == "__main__":
    main(sys.argv[1:])
