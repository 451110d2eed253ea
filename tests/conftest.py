import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def digits():
    from memray.config import DataConfig
    from memray.data import load_data

    return load_data(DataConfig(dataset="digits", noise_rate=0.1))


def small_cfg(**changes):
    """A fast config: dotted keys override, e.g. small_cfg(**{"model.arch": "lenet"})."""
    from memray.config import ExperimentConfig

    base = ExperimentConfig().replace(**{"optim.epochs": 2, "analyses.run": []})
    return base.replace(**changes) if changes else base


PY = sys.executable


def run_cli(*args, module="sweeps.dropout_grid", timeout=600, env=None, cwd=None):
    return subprocess.run([PY, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def q(results, table, sql="select count(*) from t"):
    import duckdb

    rel = duckdb.read_parquet(f"{results}/tables/{table}/*/*.parquet", hive_partitioning=True)  # noqa: F841 (named in the SQL)
    return duckdb.sql(sql.replace("from t", "from rel")).fetchall()


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory):
    """One real tiny sweep (2 trials through Ray Tune) shared by the tests that only read it."""
    home = tmp_path_factory.mktemp("tiny")
    results = home / "results"
    # a relative --results-dir, as the README's default: the trials' workers must write there too
    p = run_cli("--preset", "tiny", "--results-dir", "results", "--name", "t1", cwd=home)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return results, p.stdout


def latest_checkpoints(results, sweep) -> dict[str, int]:
    """Per trial folder of a sweep's Tune storage: its newest checkpoint's index (older ones are
    deleted as new ones arrive, so poll for 'at least', never for one index)."""
    import glob

    out = {}
    for d in glob.glob(f"{results}/ray/{sweep}/train_trial_*"):
        idx = [int(c.rsplit("_", 1)[1]) for c in glob.glob(f"{d}/checkpoint_*")]
        out[d] = max(idx, default=-1)
    return out


def all_trials_checkpointed(results, sweep, n_trials, at_least) -> bool:
    ck = latest_checkpoints(results, sweep)
    return len(ck) == n_trials and min(ck.values()) >= at_least
