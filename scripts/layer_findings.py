"""Layer- and neuron-level findings for one (dataset, arch, noise kind) without Ray: train one
trial per seed in this process (`memray.experiment.run_trial`, the default preset's recipe and
budgets), then judge them with `analysis.findings` exactly as a sweep's tables would be.

    python scripts/layer_findings.py --dataset digits --arch resnet9
    python scripts/layer_findings.py --arch mlp --seeds 0,1,2 --noise-kind placebo --format json
"""
from __future__ import annotations

import argparse
import copy
import time

from analysis import findings
from memray.config import PROTOCOL, ExperimentConfig
from memray.experiment import run_trial
from sweeps.presets import PRESETS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--arch", default="resnet9")
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--noise-kind", default="label")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--format", default="table", choices=("table", "json", "csv"))
    args = ap.parse_args()
    pr = PRESETS["default"]
    cell = findings.Cell("script", f"{args.dataset}-{args.arch}-plain-n{args.noise:g}"
                         + ("placebo" if args.noise_kind == "placebo" else ""), PROTOCOL, "none", args.noise_kind)
    for seed in (int(s) for s in args.seeds.split(",")):
        d = copy.deepcopy(pr["base"])
        d["data"] = {"dataset": args.dataset, "noise_rate": args.noise, "noise_kind": args.noise_kind}
        d["model"] = {"arch": args.arch}
        d["optim"] = {"epochs": pr["epochs_by_arch"].get(args.arch, 60)}
        d["seed"] = seed
        t = time.perf_counter()
        out = run_trial(ExperimentConfig.from_dict(d))
        print(f"seed {seed}: {time.perf_counter() - t:.1f} s", flush=True)
        cell.seeds[seed] = {name: out["tables"].get(name, []) for name in findings.TABLES}
    verdicts = findings.judge_sweep([cell])
    print(findings.render(verdicts, args.format))


if __name__ == "__main__":
    main()
