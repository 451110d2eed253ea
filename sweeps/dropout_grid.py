"""python -m sweeps.dropout_grid: example-tied dropout across datasets, noise rates, memorization-unit
fractions and architectures, as a Ray Tune grid. Every ETD cell has its no-ETD twin.

    python -m sweeps.dropout_grid                      # the default preset
    python -m sweeps.dropout_grid --preset smoke       # digits, mlp, ETD vs none, < 2 min
    python -m sweeps.dropout_grid --noise 0.05,0.1 --p-mem 0.1,0.2 --archs resnet9
    python -m sweeps.dropout_grid --preset paper --dry-run
"""
from __future__ import annotations

import argparse
import copy
import itertools
import sys

from memray import tables
from memray.config import ANALYSES, NOISE_KINDS, ConfigError, ExperimentConfig
from memray.exiting import exiting
from memray.sources import DatasetMissing, default_data_dir, prepare

from .cli import (
    UsageError,
    check_memscores,
    add_localize_flags,
    add_runtime_flags,
    check_resume,
    check_runtime,
    localize_overrides,
    print_dry_run,
    split_list,
)
from .launch import launch
from .plan import Plan, longest_first
from .presets import PAPER_RESNET9_WIDTH, PRESETS


def _width(v: str):
    return None if v in ("default", "none") else int(v)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sweeps.dropout_grid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default", help=f"one of {sorted(PRESETS)} [default]")
    p.add_argument("--datasets"), p.add_argument("--archs"), p.add_argument("--widths")
    p.add_argument("--noise"), p.add_argument("--p-gen"), p.add_argument("--p-mem")
    p.add_argument("--noise-kind", help=f"label noise and/or its placebo: comma-separated from {list(NOISE_KINDS)} "
                                        "[label]")
    p.add_argument("--dropout", help="kinds besides the always-present twin 'none': example_tied,standard")
    p.add_argument("--lr", help="peak learning rates (an axis), e.g. 0.05,0.1")
    p.add_argument("--seeds"), p.add_argument("--epochs", type=int)
    p.add_argument("--analyses", help=f"comma-separated from {list(ANALYSES)}, or 'none'")
    p.add_argument("--memscores", metavar="SWEEP",
                   help="a memorization-score sweep of the same data (python -m sweeps.memorization_scores): "
                        "rare flip and localization targets, findings 5b, 7d and 8a-8b; with label and placebo "
                        "cells, name each kind's scores: label=A,placebo=B")
    p.add_argument("--rare-threshold", type=float,
                   help="score from which a clean example is rare (with --memscores) [0.25]")
    add_localize_flags(p)
    add_runtime_flags(p)
    return p


def build_configs(args) -> list[ExperimentConfig]:
    if args.preset not in PRESETS:
        raise UsageError(f"--preset={args.preset!r} is invalid: one of {sorted(PRESETS)}")
    pr = copy.deepcopy(PRESETS[args.preset])
    axes = {
        "datasets": split_list("--datasets", args.datasets, str) if args.datasets else pr["datasets"],
        "archs": split_list("--archs", args.archs, str) if args.archs else pr["archs"],
        "widths": split_list("--widths", args.widths, _width) if args.widths else pr["widths"],
        "noise": split_list("--noise", args.noise, float) if args.noise else pr["noise"],
        "noise_kind": split_list("--noise-kind", args.noise_kind, str) if args.noise_kind else ["label"],
        "p_gen": split_list("--p-gen", args.p_gen, float) if args.p_gen else pr["p_gen"],
        "p_mem": split_list("--p-mem", args.p_mem, float) if args.p_mem else pr["p_mem"],
        "dropout": split_list("--dropout", args.dropout, str) if args.dropout else pr["dropout"],
        "seeds": split_list("--seeds", args.seeds, int) if args.seeds else pr["seeds"],
        "lr": split_list("--lr", args.lr, float) if args.lr else [None],
    }
    analyses = pr["analyses"]
    if args.analyses:
        analyses = [] if args.analyses == "none" else split_list("--analyses", args.analyses, str)
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs={args.epochs} is invalid: an integer >= 1")
    base = copy.deepcopy(pr.get("base", {}))
    base.setdefault("analyses", {}).update(localize_overrides(args))
    if args.rare_threshold is not None and args.memscores is None:
        raise UsageError(f"--rare-threshold={args.rare_threshold} is invalid without --memscores: rare examples "
                         f"are defined by memorization scores")
    scores_by_kind = parse_memscores(args.memscores, axes["noise_kind"]) if args.memscores is not None else {}
    if args.memscores is not None:
        if args.rare_threshold is not None:
            if not 0 < args.rare_threshold <= 1:
                raise UsageError(f"--rare-threshold={args.rare_threshold} is invalid: a number in (0, 1]")
            base["analyses"]["rare_threshold"] = args.rare_threshold
    configs: dict[str, ExperimentConfig] = {}
    for ds, arch, width, noise, kind_of_noise, seed, lr in itertools.product(
            axes["datasets"], axes["archs"], axes["widths"], axes["noise"], axes["noise_kind"], axes["seeds"],
            axes["lr"]):
        epochs = (args.epochs or pr["epochs"] or pr.get("epochs_by_arch", {}).get(arch)
                  or pr.get("epochs_by_dataset", {}).get(ds, 50))
        if width is None and args.preset == "paper" and arch == "resnet9":
            width = PAPER_RESNET9_WIDTH
        if width is None:
            width = pr.get("widths_by_arch", {}).get(arch)
        arch_lr = lr if lr is not None else pr.get("lr_by_arch", {}).get(arch)
        cells = [("none", None, None)]
        for kind in axes["dropout"]:
            if kind == "none":
                continue
            p_gens = axes["p_gen"] if args.p_gen else pr.get("p_gen_by_arch", {}).get(arch, axes["p_gen"])
            cells += [(kind, pg, pm) for pg in p_gens for pm in axes["p_mem"]]
        for kind, pg, pm in cells:
            d = copy.deepcopy(base)
            d.setdefault("data", {}).update({"dataset": ds, "noise_rate": noise, "noise_kind": kind_of_noise})
            d.setdefault("model", {}).update({"arch": arch, "width": width})
            drop = {"kind": kind}
            if pg is not None:
                drop.update({"p_gen": pg, "p_mem": pm})
            d["dropout"] = drop
            d.setdefault("optim", {})["epochs"] = epochs
            if arch_lr is not None:
                d["optim"]["lr"] = arch_lr
            d.setdefault("analyses", {})["run"] = list(analyses)
            if scores_by_kind:
                d["analyses"]["memscores"] = scores_by_kind[kind_of_noise]
            snaps = d["analyses"].get("snapshot_epochs")
            if snaps:  # fixed snapshots past the end are never taken
                d["analyses"]["snapshot_epochs"] = sorted(e for e in snaps if e <= epochs)
            d["seed"] = seed
            c = ExperimentConfig.from_dict(d)
            configs.setdefault(c.trial_key, c)
    return longest_first(list(configs.values()))


def parse_memscores(text: str, kinds: list[str]) -> dict[str, str]:
    """{noise kind: scoring sweep} from --memscores: one name (every cell of one noise kind), or
    kind=NAME pairs naming each kind's scores (label=A,placebo=B: scores describe one data
    config, and a placebo's labels are not the label cells')."""
    parts = split_list("--memscores", text, str)
    if len(parts) == 1 and "=" not in parts[0]:
        if len(set(kinds)) > 1:
            raise UsageError(f"--memscores={text!r} is invalid with --noise-kind {','.join(kinds)}: name each kind's "
                             f"scores, e.g. --memscores label=A,placebo=B (a placebo's labels are not the label cells')")
        out = {kinds[0]: parts[0]}
    else:
        out = {}
        for part in parts:
            kind, _, name = part.partition("=")
            if kind not in NOISE_KINDS or not name or kind in out:
                raise UsageError(f"--memscores={text!r} is invalid: one scoring sweep, or kind=SWEEP pairs with kinds "
                                 f"from {list(NOISE_KINDS)}, each once")
            out[kind] = name
        missing = sorted(set(kinds) - set(out))
        if missing:
            raise UsageError(f"--memscores={text!r} is invalid: it names no scores for noise kind {missing[0]!r}")
    for name in out.values():
        try:
            tables.check_name("sweep", name)
        except ValueError:
            raise UsageError(f"--memscores={text!r} is invalid: {name!r} is not a scoring sweep's name (letters, "
                             f"digits, '_', '-', '.')") from None
    return out


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.name is None:
            args.name = f"dropout_grid-{args.preset}"
        check_runtime(args)
        configs = build_configs(args)
        check_memscores(args, configs)
        if args.dry_run:
            from trainables.trial import resources

            print_dry_run(configs, args, resources(args.cpus_per_trial, args.gpus_per_trial,
                                                   args.analysis_workers).bundles)
            return 0
        run_id = check_resume(args, configs)
        for ds in sorted({c.data.dataset for c in configs}):
            prepare(ds, args.data_dir or default_data_dir(), download=args.download)
    except (UsageError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DatasetMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return launch(args, Plan(args.preset, configs=configs, resume_run_id=run_id))


if __name__ == "__main__":
    sys.exit(exiting(main()))
