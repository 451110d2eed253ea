"""python -m sweeps.memorization_scores: per-example memorization scores (EXPERIMENTS.md section 8)
from K models trained on seeded random subsets, as a Ray Tune sweep.

    python -m sweeps.memorization_scores                      # digits, mlp, 10% noise, K = 128
    python -m sweeps.memorization_scores --preset tiny        # K = 8, seconds (tests)
    python -m sweeps.memorization_scores --models 256 --subset-fraction 0.5 --name ms-256
    python -m sweeps.memorization_scores --preset paper --dry-run

Each trial trains `--models-per-trial` models at once (stacked, memray.memscores; one at a time
for models with BatchNorm) and writes their subset seeds and predictions (`memscore_models`).
When every trial is done, the reduce step writes `memscores` (one row per training example),
draws the top-scoring clean examples, and logs a summary to MLflow. A grid sweep then names the
scores: `python -m sweeps.dropout_grid --memscores SWEEP`.

Exit codes: 0 done; 1 some trials failed after retries; 2 bad input (nothing written);
130 interrupted (the same command plus --resume continues).
"""
from __future__ import annotations

import argparse
import copy
import sys
import uuid

from memray import tables
from memray.config import DATASETS, NOISE_KINDS, ConfigError, DataConfig, ScoreConfig
from memray.exiting import exiting
from memray.sources import DatasetMissing, default_data_dir, prepare
from memray.summary import memscore_summary

from .cli import UsageError, add_runtime_flags, check_resume, check_runtime
from .launch import fit, record_end, record_start, source_tags, tune_environment

PRESETS: dict[str, dict] = {
    # seconds, for tests: 8 narrow mlps, 40 epochs (enough to fit digits' noisy labels when trained on)
    "tiny": {"dataset": "digits", "arch": "mlp", "width": 128, "noise": 0.1, "epochs": 40, "models": 8,
             "models_per_trial": 4},
    # the default recipe of the grid's mlp (width 512, 60 epochs: it fits all of its noisy labels)
    "default": {"dataset": "digits", "arch": "mlp", "width": 512, "noise": 0.1, "epochs": 60, "models": 128,
                "models_per_trial": 16},
    # Feldman & Zhang's scale on the authors' data and network, the authors' recipe (SGD momentum
    # 0.9, peak lr 0.1, weight decay 5e-4, batch 512, a one-cycle schedule), on a GPU cluster.
    # ResNet-9 has BatchNorm: its models train one at a time.
    "paper": {"dataset": "cifar10", "arch": "resnet9", "width": 64, "noise": 0.1, "epochs": 50, "models": 2000,
              "models_per_trial": 20, "lr": 0.1, "weight_decay": 5e-4, "batch_size": 512},
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sweeps.memorization_scores", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default", help=f"one of {sorted(PRESETS)} [default]")
    p.add_argument("--dataset"), p.add_argument("--arch")
    p.add_argument("--width", type=int)
    p.add_argument("--noise", type=float, help="label noise rate, in [0, 1)")
    p.add_argument("--noise-kind", help=f"one of {list(NOISE_KINDS)} [label]")
    p.add_argument("--data-seed", type=int, help="chooses the noisy examples [0]")
    p.add_argument("--models", type=int, help="K, the number of subset models (>= 2)")
    p.add_argument("--models-per-trial", type=int, help="models one trial trains at once")
    p.add_argument("--subset-fraction", type=float, help="r, each subset's share of the training set [0.7]")
    p.add_argument("--epochs", type=int), p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int, help="base of the model seeds [0]")
    add_runtime_flags(p)
    return p


def _pick(args, pr: dict, flag: str, key: str, default=None):
    v = getattr(args, flag)
    return v if v is not None else pr.get(key, default)


def build_configs(args) -> list[ScoreConfig]:
    if args.preset not in PRESETS:
        raise UsageError(f"--preset={args.preset!r} is invalid: one of {sorted(PRESETS)}")
    pr = copy.deepcopy(PRESETS[args.preset])
    dataset = _pick(args, pr, "dataset", "dataset")
    if dataset not in DATASETS:
        raise UsageError(f"--dataset={dataset!r} is invalid: one of {list(DATASETS)}")
    k = _pick(args, pr, "models", "models")
    if k < 2:
        raise UsageError(f"--models={k} is invalid: an integer >= 2 (scores compare models trained with and "
                         f"without each example)")
    m = _pick(args, pr, "models_per_trial", "models_per_trial")
    if m < 1:
        raise UsageError(f"--models-per-trial={m} is invalid: an integer >= 1")
    r = _pick(args, pr, "subset_fraction", "subset_fraction", 0.7)
    if not 0 < r < 1:
        raise UsageError(f"--subset-fraction={r} is invalid: a number in the open interval (0, 1)")
    data = DataConfig(dataset=dataset, noise_rate=_pick(args, pr, "noise", "noise", 0.1),
                      noise_kind=_pick(args, pr, "noise_kind", "noise_kind", "label"),
                      data_seed=_pick(args, pr, "data_seed", "data_seed", 0))
    common = {"data": data, "arch": _pick(args, pr, "arch", "arch"), "width": _pick(args, pr, "width", "width"),
              "epochs": _pick(args, pr, "epochs", "epochs"), "lr": _pick(args, pr, "lr", "lr", 0.05),
              "batch_size": _pick(args, pr, "batch_size", "batch_size", 64),
              "weight_decay": pr.get("weight_decay", 0.0), "subset_fraction": r,
              "seed": _pick(args, pr, "seed", "seed", 0)}
    flags = {"data.dataset": "--dataset", "data.noise_rate": "--noise", "data.noise_kind": "--noise-kind",
             "data.data_seed": "--data-seed", "model.arch": "--arch", "model.width": "--width", "arch": "--arch",
             "width": "--width", "epochs": "--epochs",
             "lr": "--lr", "batch_size": "--batch-size", "seed": "--seed"}
    try:
        return [ScoreConfig(**common, first=first, count=min(m, k - first)).validate() for first in range(0, k, m)]
    except ConfigError as e:  # name the flag the user typed
        raise UsageError(f"{flags.get(e.field, e.field)}={e.value!r} is invalid: {e.allowed}") from None


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.name is None:
            args.name = f"memscores-{args.preset}"
        check_runtime(args)
        configs = build_configs(args)
        if args.dry_run:
            k = sum(c.count for c in configs)
            print(f"{len(configs)} trials ({k} models) for scoring sweep {args.name!r}; resources per trial: "
                  f"{{'CPU': {args.cpus_per_trial}, 'GPU': {args.gpus_per_trial}}}")
            for c in configs:
                print(f"  {c.trial_key}  {c.canonical_json()}")
            return 0
        run_id = check_resume(args, configs)
        prepare(configs[0].data.dataset, args.data_dir or default_data_dir(), download=args.download)
    except (UsageError, ConfigError, ValueError, DatasetMissing) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return launch(args, configs, run_id)


def launch(args, configs: list[ScoreConfig], run_id: str | None) -> int:
    tune_environment()
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from trainables.resources import resources
    from trainables.scoring import score_trial

    keys = [c.trial_key for c in configs]
    row = record_start(args, keys, args.preset, run_id or uuid.uuid4().hex[:12], len(configs))
    trainable = tune.with_resources(score_trial, resources(args.cpus_per_trial, args.gpus_per_trial, 0))
    space = {"score": tune.grid_search([c.to_dict() for c in configs]), "sweep": args.name,
             "results_dir": args.results_dir, "data_dir": args.data_dir, "cpus_per_trial": args.cpus_per_trial,
             "gpus_per_trial": args.gpus_per_trial, "checkpoint_s": args.checkpoint_s}
    reporter = tune.CLIReporter(metric_columns={"step": "step", "steps": "of", "wall_s": "s"},
                                parameter_columns={"score/first": "first", "score/count": "models"},
                                max_report_frequency=15)
    grid = fit(args, trainable, space, [JsonLoggerCallback(), CSVLoggerCallback()], reporter)
    record_end(args, row)
    done = [k for k in keys if tables.exists(args.results_dir, tables.fragment_rel("memscore_models", args.name, k))]
    failed = {}
    for r in grid:
        if r.config and r.error is not None:
            key = ScoreConfig.from_dict(r.config["score"]).trial_key
            if key not in done:
                failed[key] = str(r.error).strip().splitlines()[-1] if str(r.error).strip() else "error"
    print(f"\nScoring sweep {args.name!r}: {len(done)} of {len(keys)} trials done "
          f"({sum(c.count for c in configs if c.trial_key in done)} of {sum(c.count for c in configs)} models)")
    for key, err in failed.items():
        print(f"FAILED {key}: {err}")
    if failed:
        return 1
    if len(done) < len(keys):
        print(f"\nInterrupted: {len(keys) - len(done)} of {len(keys)} trial(s) unfinished. Continue with the same "
              f"command plus --resume.", file=sys.stderr)
        return 130
    reduce(args, configs)
    return 0


def reduce(args, configs: list[ScoreConfig]) -> dict[str, float]:
    """Every model's predictions -> the `memscores` fragment (named after the sweep), the top-scoring
    examples' figure, the summary (printed and logged to the sweep's MLflow run)."""
    import torch

    from memray import memscores, plots
    from memray.data import load_data

    torch.set_num_threads(1)
    cfg = configs[0]
    preds, seeds = tables.read_predictions(args.results_dir, args.name, [c.trial_key for c in configs])
    data = load_data(cfg.data, args.data_dir)
    rows = memscores.score_table(args.name, cfg, data, preds, seeds)
    k = len(seeds)
    tables.write_fragment(args.results_dir, "memscores", args.name, args.name, rows)
    s = memscore_summary(rows)
    figures = {"scores": plots.png(plots.scores_figure(
        {"noisy": [r["score"] for r in rows if r["is_noisy"] and r["score"] is not None],
         "clean": [r["score"] for r in rows if not r["is_noisy"] and r["score"] is not None]},
        f"{args.name}: {cfg.data.dataset} {cfg.arch}, K={k}, r={cfg.subset_fraction:g}", 0.25))}
    top = memscores.top_clean_figure(rows, data, args.name)
    if top is not None:
        figures["top_scoring"] = top
    for name, png in figures.items():
        tables.write_bytes(args.results_dir, f"figures/sweep={args.name}/{args.name}/{name}.png", png)
    print(f"memscores: {len(rows)} examples, {int(s['scored'])} scored (held in and out at least once), "
          f"K = {k}, r = {cfg.subset_fraction:g}")
    print(f"  median stderr {s['median_stderr']:.4f} (noisy examples: {s['noisy_median_stderr']:.4f}); "
          f"{s['varied_median_stderr']:.4f} over the {int(s['varied'])} examples whose models do not all agree "
          f"(max {s['max_stderr']:.4f})")
    print(f"  median score: noisy {s['noisy_median_score']:.3f}, clean {s['clean_median_score']:.3f}; "
          f"noisy > clean, one-sided Mann-Whitney p = {s['noisy_gt_clean_p']:.3g}")
    print(f"  rare (clean, score >= 0.25): {int(s['rare'])}")
    print(f"\nTable:      {args.results_dir}/tables/memscores/sweep={args.name}/{args.name}.parquet")
    print(f"Figures:    {args.results_dir}/figures/sweep={args.name}/{args.name}/")
    print(f"Use:        python -m sweeps.dropout_grid --memscores {args.name} --results-dir {args.results_dir}")
    log_mlflow(args, cfg, k, s, figures)
    return s


def log_mlflow(args, cfg: ScoreConfig, k: int, s: dict[str, float], figures: dict[str, bytes]) -> None:
    """The sweep's MLflow run (experiment = sweep name): the recipe as params, the summary as
    metrics, the figures as artifacts. MLflow is a view: a failure warns and loses nothing
    (`python -m analysis.sync_mlflow` logs the same from the tables)."""
    import warnings

    try:
        from memray.mlflow_view import MlflowView

        view = MlflowView(args.mlflow_uri, args.name, source_tags())
        params = {**{f"data.{k2}": v for k2, v in cfg.to_dict()["data"].items()},
                  **{k2: v for k2, v in cfg.to_dict().items() if k2 not in ("data", "first", "count")},
                  "models": k}
        view.log_memscores(params, s, figures)
    except Exception as e:  # noqa: BLE001 -- a view: the tables are complete
        warnings.warn(f"MLflow logging failed ({type(e).__name__}: {e}); the memscores table is complete: "
                      f"`python -m analysis.sync_mlflow --results-dir {args.results_dir}` logs it", stacklevel=1)


if __name__ == "__main__":
    sys.exit(exiting(main()))
