"""The example-tied dropout effect per (dataset, arch): an ETD model and its plain twin.

Trains both with the `default` preset's recipe (same width, optimiser, epochs, seed; only the
dropout kind differs; ETD with the preset's p_gen for the arch and p_mem 0.1), 10% label noise, and prints one JSON object: per case the twin's and the
ETD model's final accuracies per mode and subset, and each acceptance threshold of the ETD issue
(own noisy >= .95; drop noisy <= .05; drop clean >= .95; drop test >= twin test - .01; twin
memorizes: noisy >= .95, test >= .85) as measured. Not a timing benchmark.

    python scripts/etd_effect.py --cases digits/mlp,mnist1d/mlp,digits/resnet9,mnist1d/resnet9
"""
from __future__ import annotations

import argparse
import json
import time

from memray.config import DataConfig, ExperimentConfig
from memray.data import load_data
from memray.train import Trainer, pick_device
from sweeps.presets import PRESETS


def case(dataset: str, arch: str, noise: float, device) -> dict:
    epochs = PRESETS["default"]["epochs_by_arch"][arch]
    p_gen = PRESETS["default"]["p_gen_by_arch"][arch][0]
    base = ExperimentConfig().replace(**{"data.dataset": dataset, "data.noise_rate": noise, "model.arch": arch,
                                         "optim.epochs": epochs, "analyses.run": [], "dropout.p_gen": p_gen,
                                         "dropout.p_mem": 0.1})
    data = load_data(DataConfig(dataset=dataset, noise_rate=noise))
    out = {"epochs": epochs, "width": base.model.resolved_width, "p_gen": p_gen, "p_mem": 0.1}
    for kind in ("none", "example_tied"):
        t = time.perf_counter()
        tr = Trainer(base.replace(**{"dropout.kind": kind}), data, device)
        tr.fit()
        out[kind] = {k: round(v, 4) for k, v in tr.final().items()}
        out[kind]["train_s"] = round(time.perf_counter() - t, 1)
    p, e = out["none"], out["example_tied"]
    out["checks"] = {
        "twin_memorizes": p["plain/train_noisy/accuracy"] >= 0.95 and p["plain/test/accuracy"] >= 0.85,
        "own_noisy>=.95": e["own/train_noisy/accuracy"] >= 0.95,
        "drop_noisy<=.05": e["drop/train_noisy/accuracy"] <= 0.05,
        "drop_clean>=.95": e["drop/train_clean/accuracy"] >= 0.95,
        "drop_test>=twin_test-.01": e["drop/test/accuracy"] >= p["plain/test/accuracy"] - 0.01,
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="digits/mlp,mnist1d/mlp,digits/resnet9,mnist1d/resnet9")
    ap.add_argument("--noise", type=float, default=0.1)
    args = ap.parse_args()
    device = pick_device()
    out = {}
    for c in args.cases.split(","):
        ds, arch = c.split("/")
        out[c] = case(ds, arch, args.noise, device)
        print(json.dumps({c: out[c]}), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
