"""What a fresh install gets: the environment is the lock (scripts/check_env.py), and the pieces a
new dependency release broke before (Optuna 5.1's NSGA-II sampler could not be pickled) work on
the locked versions."""
import pickle
import subprocess
import sys

import cloudpickle
import pytest

from scripts.check_env import compare, read_lock
from sweeps.dropout_search import make_searcher, search_space
from memray.objectives import MULTI, OBJECTIVES

LOCK = "requirements.lock"


def test_the_lock_pins_every_installed_dependency_with_hashes():
    pins = read_lock(LOCK)
    assert {"torch", "torchvision", "ray", "mlflow", "optuna", "pyarrow", "mlxtend", "pytest"} <= set(pins)
    text = open(LOCK).read()
    blocks = [b for b in text.split("\n") if "==" in b and not b.startswith((" ", "#"))]
    assert len(blocks) == len(pins)
    assert text.count("--hash=sha256:") >= len(pins)  # every pin has at least one hash


def test_a_version_other_than_the_lock_is_named():
    pins = {"optuna": "5.1.0", "numpy": "2.4.6", "pyyaml": "6.0.3"}
    problems, extras = compare(pins, {"optuna": "4.5.0", "numpy": "2.4.6", "rich": "14.0"})
    assert problems == ["optuna: 4.5.0 installed, the lock pins 5.1.0", "pyyaml: not installed (the lock pins 6.0.3)"]
    assert extras == ["rich"]


def test_check_env_passes_on_this_venv_and_fails_naming_a_changed_pin(tmp_path):
    ok = subprocess.run([sys.executable, "scripts/check_env.py", LOCK], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    pins = read_lock(LOCK)
    wrong = tmp_path / "other.lock"
    text = open(LOCK).read().replace(f"\nduckdb=={pins['duckdb']} ", "\nduckdb==0.0.1 ")
    wrong.write_text(text)
    bad = subprocess.run([sys.executable, "scripts/check_env.py", str(wrong)], capture_output=True, text=True)
    assert bad.returncode == 1
    assert f"duckdb: {pins['duckdb']} installed, the lock pins 0.0.1" in bad.stderr


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_the_searcher_survives_pickle_and_cloudpickle_for_every_objective(objective, tmp_path):
    ray_tune = pytest.importorskip("ray.tune")  # noqa: F841 (Tune's searcher classes)
    storage = f"sqlite:///{tmp_path}/optuna.db"
    s = make_searcher(objective, "study", storage, seed=0, num_samples=8, max_concurrent=2)
    base = {"data": {"dataset": "digits"}, "model": {"arch": "mlp"}, "dropout": {"kind": "example_tied"},
            "optim": {"epochs": 2}, "analyses": {"run": []}, "seed": 0}
    space = search_space(base, {"p_gen": (0.1, 0.5), "p_mem": (0.05, 0.5), "lr": (0.01, 0.1), "width": (64, 256)})
    for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)):
        copy = loads(dumps(s))
        multi = objective in MULTI
        assert copy.set_search_properties(None if multi else "objective", None if multi else "max", space)
        cfg = copy.suggest("t1")
        assert 0.1 <= cfg["dropout"]["p_gen"] <= 0.5 and 64 <= cfg["model"]["width"] <= 256
        again = loads(dumps(copy))  # after a suggestion too: the study then holds a running trial
        assert 0.01 <= again.suggest("t2")["optim"]["lr"] <= 0.1
        checkpoint = tmp_path / f"searcher-{objective}.pkl"
        again.searcher.save(str(checkpoint))  # Tune's experiment checkpoint of the searcher
        assert checkpoint.stat().st_size > 0


def test_the_home_listing_sees_a_file_rewritten_in_place(tmp_path):
    """The hermetic-home check compares (path, size, mtime): a token rewritten with the same name
    and size is seen, as are new and removed paths."""
    import os

    from tests.conftest import home_changes, home_listing

    (tmp_path / ".ray").mkdir()
    token = tmp_path / ".ray" / "auth_token"
    token.write_text("a" * 32)
    (tmp_path / "gone").write_text("x")
    before = home_listing(str(tmp_path))
    token.write_text("b" * 32)
    os.utime(token, ns=(before[".ray/auth_token"][2] + 10**9,) * 2)
    (tmp_path / "gone").unlink()
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "new").write_text("y")
    changes = home_changes(before, home_listing(str(tmp_path)))
    assert changes[:2] == ["new: ~/.cache", "new: ~/.cache/new"]
    assert changes[2] == "removed: ~/gone"
    assert changes[3].startswith("changed: ~/.ray/auth_token")
    assert home_changes(before, home_listing(str(tmp_path), ignore=(".cache",)))[0] == "removed: ~/gone"
