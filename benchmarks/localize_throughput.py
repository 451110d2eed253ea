"""Localization throughput: targets per second per method and track, batched over targets vs one
target at a time, on the default preset's ETD mlp and resnet9 (digits; EXPERIMENTS.md section 7).

Each method ranks 64 targets (32 noisy, 32 clean) against a reference batch of 32 in each track
(`decoy`: R in mode own, each target its own candidates, so integrated gradients' reference term
is per target; `all`: every unit on, one candidate set, a shared reference term), once with all
64 in one batch and once one target at a time (timed on the first 16 and reported per target),
the same rankings either way (tests/test_localize.py checks that in float64). Headline
`ig_batched_speedup` per track: integrated gradients (32 steps) on the mlp, batched over one at a
time (goal >= 3 on 2 CPU cores, in both tracks).

    python benchmarks/localize_throughput.py
    BENCH_ARCHS=mlp BENCH_METHODS=integrated_gradients,grad_x_act python benchmarks/localize_throughput.py
"""
from __future__ import annotations

import json
import os
import time

import torch

from memray.config import LOCALIZE_METHODS, ExperimentConfig
from memray.data import load_data
from memray.probes import localize as L
from memray.train import Trainer, describe_device, pick_device, predict
from sweeps.presets import P_GEN_BY_ARCH, PRESETS

ARCHS = os.environ.get("BENCH_ARCHS", "mlp,resnet9").split(",")
METHODS = os.environ.get("BENCH_METHODS", ",".join(LOCALIZE_METHODS)).split(",")
N_TARGETS, N_SINGLE, N_REF, IG_STEPS, BUDGET = 64, 16, 32, 32, 64


def setup(arch: str, device):
    cfg = ExperimentConfig.from_dict({
        "data": {"dataset": "digits", "noise_rate": 0.1}, "model": {"arch": arch},
        "dropout": {"kind": "example_tied", "p_gen": P_GEN_BY_ARCH[arch][0], "p_mem": 0.1},
        "optim": {"epochs": PRESETS["default"]["epochs_by_arch"][arch]}, "analyses": {"run": []}})
    tr = Trainer(cfg, load_data(cfg.data), device)
    tr.fit()
    model, data, etd = tr.model.eval(), tr.data, tr.etd
    for p in model.parameters():
        p.requires_grad_(False)
    ok = (predict(model, data.x_train, etd.example_masks).argmax(1) == data.y_train).cpu()
    noisy, clean = data.noise_mask.cpu() & ok, ~data.noise_mask.cpu() & ok
    targets = torch.cat([torch.nonzero(noisy).flatten()[:N_TARGETS // 2], torch.nonzero(clean).flatten()[:N_TARGETS // 2]])
    pool = torch.nonzero(~data.noise_mask.cpu()).flatten()
    ref = pool[~torch.isin(pool, targets)][:N_REF]
    return {t: L.Localizer(tr.subject, ref, torch.arange(64), t, torch.float32) for t in L.TRACKS}, targets


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    device = pick_device()
    out = {"torch": torch.__version__, "device": describe_device(device), "targets": N_TARGETS,
           "single_timed_on": N_SINGLE, "reference": N_REF, "ig_steps": IG_STEPS, "models": {}}
    for arch in ARCHS:
        locs, targets = setup(arch, device)
        res: dict = {}
        for track, loc in locs.items():
            res[track] = {}
            for m in METHODS:
                def rank(ids, m=m, loc=loc):
                    return L.scores_and_order(loc, m, loc.targets(ids), BUDGET, IG_STEPS)
                rank(targets[:2])  # warm-up
                batched = timed(lambda: rank(targets))
                single = timed(lambda: [rank(targets[i:i + 1]) for i in range(N_SINGLE)]) / N_SINGLE * N_TARGETS
                res[track][m] = {"batched_targets_per_s": round(N_TARGETS / batched, 1),
                                 "single_targets_per_s": round(N_TARGETS / single, 1),
                                 "speedup": round(single / batched, 2)}
                print(json.dumps({arch: {track: {m: res[track][m]}}}), flush=True)
        out["models"][arch] = res
    mlp = out["models"].get("mlp", {})
    out["headline"] = {f"ig_batched_speedup_{t}": mlp.get(t, {}).get("integrated_gradients", {}).get("speedup")
                       for t in L.TRACKS}
    out["goals"] = {f"ig_batched_speedup_{t}": ">= 3 on 2 CPU cores" for t in L.TRACKS}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
