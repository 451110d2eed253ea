"""Layer- and neuron-level findings for one (dataset, arch): train with gradient accounting, then
rewinding, retraining and flips, and print the measured findings next to the paper's (JSON).

Also times the full rewinding table on its own (every layer group x every snapshot epoch, batched
inference). Figures go to --figures DIR when given. Not a timing benchmark otherwise.

    python scripts/layer_findings.py --dataset digits --arch resnet9 --figures figures
    python scripts/layer_findings.py --arch mlp --flip-targets 32 --flip-budget 64 --eval-samples 512
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from analysis import findings
from memray import plots
from memray.config import ExperimentConfig
from memray.data import load_data
from memray.experiment import AnalysisRunner, analysis_items
from memray.probes.flips import FlipSearch, fixed_samples, post_edit
from memray.probes.rewinding import rewinding_rows
from memray.train import Trainer, pick_device
from sweeps.presets import PRESETS

PAPER = {
    "gradients": "noisy examples' gradient norm of the same order as clean ones in every layer; cosine negative",
    "rewinding": "rewinding a single layer rarely removes memorization (most layers keep it); mostly early layers matter",
    "retraining": "retraining one layer on clean data leaves most layers still predicting noisy given labels",
    "flips": "noisy examples flip after far fewer units than clean ones (~5); units spread over sites; little cost",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--arch", default="resnet9")
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--figures", default=None)
    ap.add_argument("--flip-targets", type=int, default=16, help="noisy and clean targets (each)")
    ap.add_argument("--flip-reference", type=int, default=64)
    ap.add_argument("--flip-budget", type=int, default=32)
    ap.add_argument("--eval-samples", type=int, default=256)
    args = ap.parse_args()
    epochs = PRESETS["default"]["epochs_by_arch"].get(args.arch, 60)
    snaps = sorted({0, 2, 5, 10, epochs} if epochs > 10 else {0, 2, 5, epochs})
    cfg = ExperimentConfig().replace(**{
        "data.dataset": args.dataset, "data.noise_rate": args.noise, "model.arch": args.arch,
        "optim.epochs": epochs, "analyses.snapshot_epochs": snaps, "analyses.retrain_max_epochs": 4,
        "analyses.flip_targets": args.flip_targets, "analyses.flip_reference": args.flip_reference,
        "analyses.flip_budget": args.flip_budget, "analyses.eval_samples": args.eval_samples})
    device = pick_device()
    data = load_data(cfg.data)
    t = time.perf_counter()
    tr = Trainer(cfg, data, device)
    tr.fit()
    train_s = time.perf_counter() - t
    final = tr.final()
    runner = AnalysisRunner(cfg, tr.model.state_dict(), tr.snapshots, tr.data, device)
    t = time.perf_counter()
    rewinding = rewinding_rows(runner.model, tr.snapshots, runner.data, runner.etd)
    rewind_s = time.perf_counter() - t
    tables = {"gradients": tr.grad_rows, "rewinding": rewinding, "retraining": [], "flips": []}
    for item in analysis_items(cfg, len(tr.model.layer_groups), snaps, True):
        if item[0] != "rewind":
            table, rows = runner.run(item)
            tables[table] += rows
    _, ref = runner.flip_targets()
    samples = fixed_samples(runner.data, args.eval_samples, cfg.seed)
    test_before = post_edit(FlipSearch(runner.model, runner.data, ref), samples, [[]])[0]["test"]
    noisy_key = "plain/train_noisy/accuracy" if cfg.dropout.kind != "example_tied" else "own/train_noisy/accuracy"
    out = {
        "case": f"{args.dataset}/{args.arch}", "epochs": epochs, "final": final, "train_s": round(train_s, 1),
        "rewinding_table_s": round(rewind_s, 2), "rewinding_items": len(rewinding) // 4,
        "gradients": findings.gradient_findings(tables["gradients"], args.noise),
        "rewinding": findings.rewinding_findings(tables["rewinding"], final[noisy_key]),
        "retraining": findings.retraining_findings(tables["retraining"]),
        "flips": findings.flip_findings(tables["flips"], test_before),
        "paper": PAPER,
    }
    if args.figures:
        d = Path(args.figures)
        d.mkdir(parents=True, exist_ok=True)
        for name, png in plots.trial_figures(tables, out["case"]).items():
            (d / f"{args.dataset}_{args.arch}_{name}.png").write_bytes(png)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
