import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# ----------------------------------------------------------------------------- hermetic tests
# No test writes outside pytest's temporary directories. Everything a tool keeps per user (Ray's
# ~/.ray and its /tmp/ray sessions, ~/.cache, matplotlib's config, MLflow's and Optuna's defaults
# under the home directory) is pointed into the session's basetemp before the first test, for
# this process and every process it starts; the real home directory is listed (path, size, mtime)
# before and after the session, and the session fails naming whatever changed there.
REAL_HOME = os.path.realpath(os.path.expanduser("~"))
# Paths under the home directory that other programs on the machine write while tests run
# (colon-separated, relative to it): left out of the comparison.
HOME_IGNORE = tuple(p.strip("/") for p in os.environ.get("MEMLOC_HOME_IGNORE", "").split(":") if p.strip("/"))


def home_listing(root: str, ignore: tuple[str, ...] = ()) -> dict[str, tuple]:
    """{path relative to root: (kind, size, mtime_ns)} of everything under root, links not followed."""
    out: dict[str, tuple] = {}
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            entries = list(os.scandir(d))
        except (PermissionError, FileNotFoundError):
            continue
        for e in entries:
            rel = os.path.relpath(e.path, root)
            if rel in ignore or rel.startswith(tuple(f"{i}/" for i in ignore)):
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if e.is_dir(follow_symlinks=False):
                out[rel] = ("dir", 0, 0)  # a directory's own mtime moves with its entries: they are listed
                stack.append(e.path)
            else:
                out[rel] = ("link" if e.is_symlink() else "file", st.st_size, st.st_mtime_ns)
    return out


def home_changes(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    new = sorted(set(after) - set(before))
    gone = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    return ([f"new: ~/{k}" for k in new] + [f"removed: ~/{k}" for k in gone]
            + [f"changed: ~/{k} (size, mtime {before[k][1:]} -> {after[k][1:]})" for k in changed])


@pytest.fixture(scope="session", autouse=True)
def hermetic_home(tmp_path_factory):
    """Points HOME, the XDG dirs, Ray's temp dir and matplotlib's config into basetemp, and fails
    the session naming every path under the real home directory that the tests changed."""
    base = tmp_path_factory.getbasetemp()
    home = base / "home"
    home.mkdir(exist_ok=True)
    before = home_listing(REAL_HOME, HOME_IGNORE)
    saved = dict(os.environ)
    os.environ.update({
        "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local" / "share"), "MPLCONFIGDIR": str(home / ".config" / "matplotlib"),
        # Ray's session dirs (sockets inside: a short path keeps them under the 107-byte limit)
        "RAY_TMPDIR": str(base / "r"), "TMPDIR": str(base / "t"),
    })
    for d in ("r", "t"):
        (base / d).mkdir(exist_ok=True)
    yield home
    os.environ.clear()
    os.environ.update(saved)
    changes = home_changes(before, home_listing(REAL_HOME, HOME_IGNORE))
    assert not changes, f"the tests changed {len(changes)} path(s) under {REAL_HOME}:\n" + "\n".join(changes[:50])


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
