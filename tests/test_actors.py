"""The analysis executors: `--analysis-workers`' default, and Ray actors giving the same rows as
the trainable's own process."""
from __future__ import annotations

import json
import re

import pytest

from sweeps.cli import auto_analysis_workers

from .conftest import run_cli


@pytest.mark.parametrize("cpus, workers", [(0.5, 0), (1.0, 0), (1.9, 0), (2.0, 2), (3.5, 3), (8.0, 8)])
def test_default_analysis_workers_one_per_whole_cpu_from_two(cpus, workers):
    assert auto_analysis_workers(cpus) == workers


def test_dry_run_shows_the_bundles_the_default_and_an_explicit_workers_flag_give():
    def bundles(*flags):
        p = run_cli("--preset", "tiny", "--dry-run", *flags)
        assert p.returncode == 0, p.stderr[-2000:]
        return re.search(r"resources per trial: (\[.*?\])", p.stdout).group(1)

    assert bundles() == "[{'CPU': 1.0}]"  # one CPU: the analyses run in the trainable
    assert bundles("--cpus-per-trial", "2") == str([{"CPU": 2 / 3}] * 3)  # trainable + 2 actors
    assert bundles("--analysis-workers", "1") == "[{'CPU': 0.5}, {'CPU': 0.5}]"
    p = run_cli("--preset", "tiny", "--dry-run", "--analysis-workers", "-1")
    assert p.returncode == 2 and "--analysis-workers=-1 is invalid: an integer >= 0" in p.stderr


@pytest.mark.slow
def test_actor_pool_gives_the_rows_the_trainables_process_gives():
    """A tiny ETD trial's analyses (rewind, retrain, flip, localize) run once here (`run_here`)
    and once on two real Ray actors (`trainables.actors`, items in any order): the same rows,
    to the bit (one torch thread on both sides)."""
    import ray
    import torch

    from memray.experiment import Trial, run_here
    from sweeps.dropout_grid import build_configs, parser
    from trainables import actors
    from trainables.actors import analysis_executor

    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)  # as each actor
    cfg = next(c for c in build_configs(parser().parse_args(["--preset", "tiny"])) if c.dropout.kind != "none")
    trial = Trial(cfg, device="cpu")
    for _ in trial.epochs():
        pass
    job = trial.analysis_job()
    assert {item[0] for item in job.items} == {"rewind", "retrain", "flip", "localize"}
    here = run_here(job, trial.trainer.data, "cpu")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = list(analysis_executor(cfg, 2, 2.0, 0.0, None)(job))
    finally:
        ray.shutdown()
        actors._POOLS.clear()  # their handles died with this Ray
        torch.set_num_threads(threads_before)

    def canon(results):  # a localization row's `seconds` is its method's run time: not compared
        return sorted(json.dumps([table, [{k: v for k, v in r.items() if k != "seconds"} for r in rows]],
                                 sort_keys=True, default=str) for table, rows in results)

    assert len(remote) == len(here) == len(job.items)
    assert canon(remote) == canon(here)
