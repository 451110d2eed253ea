"""Training throughput: examples/second for each arch on digits and mnist1d on the current device.

Each (dataset, arch) trains 1 warm-up epoch, then `EPOCHS` timed epochs of the default recipe
(plain training, no analyses, evaluation excluded). On a GPU it also times a cifar10-shaped
ResNet-9 (width 64, the paper's) on synthetic tensors. Prints one JSON object as its last line.
"""
from __future__ import annotations

import json
import os
import time

import torch

from memray.config import ARCHS, DataConfig, ExperimentConfig
from memray.data import Data, load_data
from memray.train import Trainer, describe_device, pick_device

EPOCHS = int(os.environ.get("BENCH_EPOCHS", "2"))


def time_epochs(tr: Trainer, epochs: int) -> float:
    sync = torch.cuda.synchronize if tr.device.type == "cuda" else (lambda: None)
    tr.cfg = tr.cfg.replace(eval_every=10_000, **{"optim.epochs": 10_000})
    tr.run_epoch()  # warm-up
    sync()
    t = time.perf_counter()
    for _ in range(epochs):
        tr.run_epoch()
    sync()
    return tr.data.n_train * epochs / (time.perf_counter() - t)


def main() -> None:
    device = pick_device()
    out: dict = {"torch": torch.__version__, "device": describe_device(device), "epochs_timed": EPOCHS, "examples_per_s": {}}
    for ds in ("digits", "mnist1d"):
        data = load_data(DataConfig(dataset=ds))
        for arch in ARCHS:
            if ds == "mnist1d" and arch == "resnet50":
                continue
            cfg = ExperimentConfig().replace(**{"data.dataset": ds, "model.arch": arch, "analyses.run": []})
            out["examples_per_s"][f"{ds}/{arch}"] = round(time_epochs(Trainer(cfg, data, device), EPOCHS), 1)
    if device.type == "cuda":
        g = torch.Generator().manual_seed(0)
        n = 10_000
        fake = Data("cifar10-shaped", torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g),
                    torch.randint(0, 10, (n,), generator=g), torch.zeros(n, dtype=torch.bool),
                    torch.randn(100, 3, 32, 32), torch.randint(0, 10, (100,)), 10)
        cfg = ExperimentConfig().replace(**{"model.arch": "resnet9", "model.width": 64, "optim.batch_size": 512,
                                            "analyses.run": []})
        out["examples_per_s"]["cifar10_shaped/resnet9_w64_b512"] = round(time_epochs(Trainer(cfg, fake, device), EPOCHS), 1)
    out["headline"] = {"digits_mlp_examples_per_s": out["examples_per_s"]["digits/mlp"]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
