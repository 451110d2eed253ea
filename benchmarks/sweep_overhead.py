"""Sweep overhead: the smoke and default grids through Ray Tune vs a Ray-free parallel floor.

For each grid: (1) the grid through `python -m sweeps.dropout_grid` (Ray start-up, trials in
parallel, per-epoch checkpoints, analysis actors, tables, figures, MLflow: everything a user waits
for), wall time of the whole command; (2) the parallel floor without Ray: the same trials
(`memray.experiment.run_trial`: training and every analysis, no store) in one single-threaded
worker process per core (started before the clock), longest first, as a 2-slot scheduler with no
overhead at all would run them. Headline `tune_over_floor` for the default grid (goal <= 1.12 on
2 cores). With BENCH_SEQUENTIAL=1 it also runs (3) every trial one after another in this process
(torch using every core), `tune_over_sequential`.

Where the time goes, side by side: the phases every trial timed (setup, training, reports,
checkpoints, analyses, tables and figures), summed over the grid, for the Tune side and for the
floor. With BENCH_REPEAT=N each grid runs N pairs, Tune first in the odd ones and the floor first
in the even ones, and the headline is the median of their ratios (the machine's speed drifts
between minutes).

    python benchmarks/sweep_overhead.py                 # smoke and default (about 10 minutes on 2 cores)
    BENCH_GRIDS=smoke python benchmarks/sweep_overhead.py
"""
from __future__ import annotations

import glob
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from memray.experiment import run_trial
from memray.train import describe_device
from sweeps.plan import longest_first
from sweeps.dropout_grid import build_configs, parser

GRIDS = [g for g in os.environ.get("BENCH_GRIDS", "smoke,default").split(",") if g]
REPEAT = int(os.environ.get("BENCH_REPEAT", "1"))  # pairs per grid; the headline is their median


def sequential(preset: str) -> dict:
    configs = build_configs(parser().parse_args(["--preset", preset]))
    t0 = time.perf_counter()
    per = []
    for c in configs:
        t = time.perf_counter()
        run_trial(c, device="cpu")
        per.append(round(time.perf_counter() - t, 2))
    return {"trials": len(configs), "wall_s": round(time.perf_counter() - t0, 2), "per_trial_s": per}


def _one_thread() -> None:
    torch.set_num_threads(1)


def _phase_sums(finals) -> dict[str, float]:
    """Per phase, the seconds summed over trials' final results (their `time/*`, memray.experiment)."""
    sums: dict[str, float] = {}
    for final in finals:
        for k, v in final.items():
            if k.startswith("time/"):
                sums[k[5:]] = round(sums.get(k[5:], 0.0) + v, 2)
    return sums


def _run(c) -> tuple[float, dict]:
    """A trial's wall seconds and its final result."""
    t = time.perf_counter()
    final = run_trial(c, device="cpu")["final"]
    return round(time.perf_counter() - t, 2), final


def _warm(_: int) -> int:
    return os.getpid()


def parallel_floor(preset: str) -> dict:
    configs = longest_first(build_configs(parser().parse_args(["--preset", preset])))
    n = os.cpu_count() or 1
    with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread) as ex:
        list(ex.map(_warm, range(4 * n)))  # workers up, torch imported
        t0 = time.perf_counter()
        runs = list(ex.map(_run, configs, chunksize=1))
        wall = time.perf_counter() - t0
    per = [w for w, _ in runs]
    return {"workers": n, "wall_s": round(wall, 2), "per_trial_s": per, "trial_s_sum": round(sum(per), 2),
            "phase_s_sum": _phase_sums(final for _, final in runs)}


def _phases(storage: str) -> dict:
    """Per phase, the seconds every trial's trainable spent in it (its last result's time/*), and
    when the first trial reported relative to the last (Tune's 1 s timestamps)."""
    lasts, stamps = [], []
    for f in glob.glob(f"{storage}/*/result.json"):
        results = [json.loads(line) for line in open(f).read().splitlines() if line.strip()]
        stamps += [r["timestamp"] for r in results]
        lasts.append(results[-1])
    return {"trainable_phase_s_sum": _phase_sums(lasts), "first_to_last_report_s": max(stamps) - min(stamps) if stamps else None}


def through_tune(preset: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "sweeps.dropout_grid", "--preset", preset, "--results-dir",
                            f"{d}/results", "--name", f"bench-{preset}"], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(f"sweep failed ({p.returncode}): {p.stderr[-2000:]}")
        return {"wall_s": round(wall, 2), **_phases(f"{d}/results/ray/bench-{preset}")}


def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    out = {"torch": torch.__version__, "device": describe_device(torch.device("cpu")), "cpus": os.cpu_count(),
           "grids": {}}
    for g in GRIDS:
        pairs = []
        for i in range(REPEAT):  # each pair side by side: this machine's speed drifts over minutes,
            if i % 2 == 0:       # so every other pair runs the floor first
                tune, floor = through_tune(g), parallel_floor(g)
            else:
                floor, tune = parallel_floor(g), through_tune(g)
            pairs.append({"tune": tune, "parallel_floor": floor,
                          "tune_over_floor": round(tune["wall_s"] / floor["wall_s"], 3)})
            print(json.dumps({g: pairs[-1]}), flush=True)
        median = round(statistics.median(p["tune_over_floor"] for p in pairs), 3)
        if REPEAT > 1:  # every pair's walls and phases, not one pair's beside the median of all
            out["grids"][g] = {"tune_over_floor": median, "pairs": [p["tune_over_floor"] for p in pairs],
                               "runs": pairs}
        else:
            out["grids"][g] = pairs[0]
        if os.environ.get("BENCH_SEQUENTIAL") == "1":
            seq = sequential(g)  # beside the last pair
            out["grids"][g].update({"sequential": seq, "tune_over_sequential": round(tune["wall_s"] / seq["wall_s"], 3),
                                    "floor_over_sequential": round(floor["wall_s"] / seq["wall_s"], 3)})
        print(json.dumps({g: out["grids"][g]}), flush=True)
    key = "default" if "default" in out["grids"] else GRIDS[-1]
    out["headline"] = {"tune_over_floor": out["grids"][key]["tune_over_floor"], "grid": key}
    out["goals"] = {"tune_over_floor": "<= 1.12 on 2 cores (default grid)"}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
