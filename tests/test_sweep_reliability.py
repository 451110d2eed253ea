"""Fault tolerance of real sweeps: processes are really killed, interrupted and resumed."""
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest
import torch

from memray.config import ExperimentConfig
from memray.data import load_data
from memray.train import Trainer

from .conftest import PY, all_trials_checkpointed
from .conftest import q as rows

pytestmark = pytest.mark.slow


def start(module, *args):
    return subprocess.Popen([PY, "-m", module, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(cond, proc, timeout=240, what="condition"):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"sweep ended ({proc.returncode}) before {what}:\n{out[-2000:]}\n{err[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"timed out waiting for {what}")


def processes(prefix: str) -> list[int]:
    """PIDs whose command line starts with prefix (Ray sets worker titles such as 'ray::ImplicitFunc')."""
    out = []
    for d in glob.glob("/proc/[0-9]*"):
        try:
            with open(f"{d}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith(prefix):
            out.append(int(d.rsplit("/", 1)[1]))
    return out


def finish(proc, timeout=400):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def fragments(results, table):
    return sorted(glob.glob(f"{results}/tables/{table}/sweep=*/*"))


def trials_done(results):
    return len(fragments(results, "trials"))


def reference_final(config_json: str) -> dict:
    """The same trial trained without interruption, in this process, on one thread (as the trial)."""
    cfg = ExperimentConfig.from_dict(json.loads(config_json))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tr = Trainer(cfg, load_data(cfg.data), "cpu")
        tr.fit()
    finally:
        torch.set_num_threads(threads)
    last = tr.epoch
    return {(r["mode"], r["subset"]): (r["accuracy"], r["loss"]) for r in tr.history if r["epoch"] == last}


def assert_final_equals_uninterrupted(results, key: str, config_json: str, epoch: int) -> None:
    """The trial's last evaluation equals the same trial trained without interruption."""
    got = {(m, s): (a, lo) for m, s, a, lo in rows(
        results, "evals", f"select mode, subset, accuracy, loss from t where trial_key = '{key}' and epoch = {epoch}")}
    want = reference_final(config_json)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k][0] == want[k][0], k
        assert got[k][1] == pytest.approx(want[k][1], rel=1e-6), k


def test_sigkill_of_a_trial_worker_resumes_from_its_checkpoint(tmp_path):
    results = tmp_path / "r"
    proc = start("sweeps.dropout_grid", "--preset", "tiny", "--epochs", "40", "--widths", "256", "--checkpoint-s", "0",
                 "--analyses", "none", "--results-dir", str(results), "--name", "k")
    # kill a trainable's process once both trials have checkpointed (and before any trial ended)
    wait_for(lambda: all_trials_checkpointed(results, "k", 2, at_least=2), proc, what="checkpoints")
    assert trials_done(results) == 0
    victims = processes("ray::ImplicitFunc")
    assert victims, "no trainable worker process found"
    os.kill(victims[0], signal.SIGKILL)
    rc, out, err = finish(proc)
    assert rc == 0, out[-2000:] + err[-3000:]
    t = rows(results, "trials", "select trial_key, status, attempts, restored_from, epochs_done, config_json "
                                "from t order by attempts")
    assert [(s, a) for _, s, a, *_ in t] == [("done", 1), ("done", 2)]
    _, _, _, restored_from, epochs_done, config_json = t[1]
    assert 1 <= restored_from < 40 and epochs_done == 40  # resumed from a checkpoint, not from scratch
    # fragments exist once; every epoch evaluated exactly once per mode and subset
    assert len(fragments(results, "evals")) == 2 and not glob.glob(f"{results}/tables/*/*/.tmp-*")
    assert rows(results, "evals", "select count(*), count(distinct (trial_key, epoch, mode, subset)) from t") == \
        [(40 * 4 + 40 * 11,) * 2]
    # the interrupted trial ends with the same final metrics as an uninterrupted run
    assert_final_equals_uninterrupted(results, t[1][0], config_json, 40)


@pytest.mark.parametrize("damage", ["truncated", "emptied"])
def test_a_damaged_newest_checkpoint_restarts_the_retry_from_an_older_one(tmp_path, damage):
    """A trial's worker is stopped, its newest checkpoint's state file truncated (or the folder
    emptied), then the worker is killed: Tune retries from that checkpoint, the trainable falls
    back to an older one (or to scratch), and the trial ends with the numbers of an uninterrupted
    run. (A checkpoint folder deleted outright is refused by Tune 2.60 itself before the trainable
    runs: "Could not recover from checkpoint as it does not exist on storage anymore".)"""
    results = tmp_path / "r"
    proc = start("sweeps.dropout_grid", "--preset", "tiny", "--epochs", "40", "--widths", "256", "--checkpoint-s", "0",
                 "--analyses", "none", "--results-dir", str(results), "--name", "k")
    wait_for(lambda: all_trials_checkpointed(results, "k", 2, at_least=3), proc, what="checkpoints")
    victim = processes("ray::ImplicitFunc")[0]
    os.kill(victim, signal.SIGSTOP)
    try:
        # the victim's trial folder: its results carry the worker's pid
        folder = next(d for d in glob.glob(f"{results}/ray/k/train_trial_*")
                      if any(json.loads(line).get("pid") == victim
                             for line in open(f"{d}/result.json").read().splitlines() if line.strip()))
        newest = max(glob.glob(f"{folder}/checkpoint_*"))
        if damage == "emptied":
            shutil.rmtree(newest)
            os.mkdir(newest)
        else:
            state = f"{newest}/state.pt"
            with open(state, "r+b") as f:
                f.truncate(os.path.getsize(state) // 2)
    finally:
        os.kill(victim, signal.SIGKILL)
    rc, out, err = finish(proc)
    assert rc == 0, out[-2000:] + err[-3000:]
    t = rows(results, "trials", "select trial_key, status, attempts, restored_from, epochs_done, config_json "
                                "from t order by attempts")
    assert [(s, a) for _, s, a, *_ in t] == [("done", 1), ("done", 2)]
    key, _, _, restored_from, epochs_done, config_json = t[1]
    damaged_epoch = int(newest.rsplit("_", 1)[1]) + 1  # checkpoint_00000i holds epoch i + 1
    assert 0 <= restored_from < damaged_epoch and epochs_done == 40
    assert rows(results, "evals", "select count(*), count(distinct (trial_key, epoch, mode, subset)) from t") == \
        [(40 * 4 + 40 * 11,) * 2]
    assert_final_equals_uninterrupted(results, key, config_json, 40)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_driver_interrupt_then_resume_completes_without_rerunning(tmp_path, sig):
    results = tmp_path / "r"
    args = ["--preset", "tiny", "--p-mem", "0.1,0.2,0.3", "--epochs", "20", "--widths", "128", "--analyses",
            "rewind", "--results-dir", str(results), "--name", "i"]
    # the SIGKILL run starts with one analysis actor a trial and resumes with the default (none
    # for a 1-CPU trial): the restored trials get the new placement groups, and must not wait for
    # actors that no bundle can hold
    proc = start("sweeps.dropout_grid", *args, *(["--analysis-workers", "1"] if sig == signal.SIGKILL else []))
    wait_for(lambda: trials_done(results) >= 1, proc, what="a finished trial")
    first = fragments(results, "trials")[0].rsplit("/", 1)[1]
    evals_first = f"{results}/tables/evals/sweep=i/{first}"
    mtime = os.stat(evals_first).st_mtime_ns
    proc.send_signal(sig)
    rc, out, err = finish(proc)
    if sig == signal.SIGINT:
        assert rc == 130 and "--resume" in err, (rc, err[-2000:])
    else:
        assert rc == -signal.SIGKILL
        time.sleep(2)  # the killed driver's Ray processes exit with it
    assert trials_done(results) < 4
    rc, out, err = finish(start("sweeps.dropout_grid", *args, "--resume"))
    assert rc == 0, out[-2000:] + err[-3000:]
    assert rows(results, "trials", "select count(*), count(distinct trial_key), count(*) filter (status = 'done') "
                                   "from t") == [(4, 4, 4)]
    assert os.stat(evals_first).st_mtime_ns == mtime  # the finished trial was not run again
    assert rows(results, "evals", "select count(*), count(distinct (trial_key, epoch, mode, subset)) from t") == \
        [(20 * 4 + 3 * 20 * 11,) * 2]
    # rewinding: 4 trials x 4 groups x 4 subsets x snapshots (0, the final epoch 20, and where
    # train_noisy crossed its thresholds, which depends on the CPU's floats): no row twice
    (n, distinct, at_0_and_20), = rows(results, "rewinding", "select count(*), count(distinct (trial_key, layer_index, "
                                       "rewind_epoch, subset)), count(*) filter (rewind_epoch in (0, 20)) from t")
    assert n == distinct and n % 16 == 0 and at_0_and_20 == 4 * 4 * 2 * 4
    assert len(fragments(results, "rewinding")) == 4
    assert not glob.glob(f"{results}/tables/*/*/.tmp-*")


def test_diverging_trial_is_recorded_failed_and_others_finish(tmp_path):
    """Also: an unreachable MLflow server fails no trial (it warns), and sync_mlflow rebuilds MLflow."""
    results = tmp_path / "r"
    with socket.socket() as sk:  # a loopback port with nothing listening
        sk.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sk.getsockname()[1]}"
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    proc = subprocess.Popen([PY, "-m", "sweeps.dropout_grid", "--preset", "tiny", "--lr", "0.05,1e6", "--analyses",
                             "none", "--max-failures", "0", "--results-dir", str(results), "--name", "dv",
                             "--mlflow-uri", dead], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    rc, out, err = finish(proc)
    assert rc == 1, out[-2000:] + err[-3000:]
    assert "MLflow logging failed" in err and "analysis.sync_mlflow" in err
    t = rows(results, "trials", "select status, error, config_json from t order by status, trial_key")
    assert [s for s, _, _ in t] == ["done", "done", "failed", "failed"]
    for status, error, cfg in t:
        lr = json.loads(cfg)["optim"]["lr"]
        assert (status == "failed") == (lr == 1e6)
        if status == "failed":
            assert "diverged at epoch" in error and "training loss is" in error
    failed_lines = [ln for ln in out.splitlines() if ln.startswith("FAILED ")]
    assert len(failed_lines) == 2 and all("diverged at epoch" in ln for ln in failed_lines)
    uri = f"sqlite:///{tmp_path}/rebuilt.db"
    for _ in range(2):  # rebuilding twice duplicates nothing
        p = subprocess.run([PY, "-m", "analysis.sync_mlflow", "--results-dir", str(results), "--mlflow-uri", uri],
                           capture_output=True, text=True)
        assert p.returncode == 0 and "synced sweep 'dv': 4 trials" in p.stdout, p.stderr[-2000:]
    code = f"""
import json, mlflow
mlflow.set_tracking_uri({uri!r})
runs = mlflow.search_runs(experiment_names=["dv"], output_format="list")
c = mlflow.MlflowClient()
kids = [r for r in runs if r.data.tags.get("memray.role") == "trial"]
done = next(r for r in kids if r.info.status == "FINISHED")
print(json.dumps({{"roles": sorted(r.data.tags.get("memray.role") for r in runs),
                   "status": sorted(r.info.status for r in kids),
                   "parent": [r.info.status for r in runs if r.data.tags.get("memray.role") == "sweep"],
                   "steps": sorted(m.step for m in c.get_metric_history(done.info.run_id, "plain/test/accuracy")
                                   ) if "plain/test/accuracy" in done.data.metrics else
                            sorted(m.step for m in c.get_metric_history(done.info.run_id, "drop/test/accuracy"))}}))
"""
    got = json.loads(subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    assert got == {"roles": ["sweep"] + ["trial"] * 4, "status": ["FAILED", "FAILED", "FINISHED", "FINISHED"],
                   "parent": ["FAILED"], "steps": [1, 2, 3]}


def test_resume_with_a_changed_grid_is_refused_and_changes_nothing(tmp_path):
    results = tmp_path / "r"
    rc, out, err = finish(start("sweeps.dropout_grid", "--preset", "tiny", "--analyses", "none", "--epochs", "1",
                                "--results-dir", str(results), "--name", "g"))
    assert rc == 0, err[-3000:]
    before = {p: os.stat(p).st_mtime_ns for p in glob.glob(f"{results}/**", recursive=True)}
    rc, out, err = finish(start("sweeps.dropout_grid", "--preset", "tiny", "--analyses", "none", "--epochs", "1",
                                "--noise", "0.2", "--resume", "--results-dir", str(results), "--name", "g"))
    assert rc == 2 and "sweep 'g' under" in err and "was run with a different grid (2 trials" in err
    rc, out, err = finish(start("sweeps.dropout_search", "--resume", "--results-dir", str(results), "--name", "g2"))
    assert rc == 2 and "no sweep named 'g2'" in err
    assert {p: os.stat(p).st_mtime_ns for p in glob.glob(f"{results}/**", recursive=True)} == before


def test_dropout_search_optuna_asha_interrupt_and_resume(tmp_path):
    results = tmp_path / "r"
    args = ["--num-samples", "6", "--epochs", "8", "--grace-period", "1", "--width", "32,128",
            "--p-gen", "0.1,0.4", "--p-mem", "0.05,0.3", "--results-dir", str(results), "--name", "s"]
    proc = start("sweeps.dropout_search", *args)
    wait_for(lambda: trials_done(results) >= 2, proc, what="two finished trials")
    proc.send_signal(signal.SIGINT)
    rc, out, err = finish(proc)
    assert rc == 130, err[-3000:]
    before = set(os.path.basename(p) for p in fragments(results, "trials"))
    assert 2 <= len(before) < 6
    rc, out, err = finish(start("sweeps.dropout_search", *args, "--resume"))
    assert rc == 0, out[-2000:] + err[-3000:]
    t = rows(results, "trials", "select trial_key, status, p_gen, p_mem, width, epochs_done, dropout from t")
    assert len(t) == 6 and before <= {f"{k}.parquet" for k, *_ in t}  # the study continued
    assert all(0.1 <= pg <= 0.4 and 0.05 <= pm <= 0.3 and 32 <= w <= 128 and d == "example_tied"
               for _, _, pg, pm, w, _, d in t)
    assert len({pg for _, _, pg, *_ in t}) == 6  # sampled from ranges, not a grid
    stopped = [(k, e) for k, s, *_, e, _ in t if s == "stopped"]
    assert stopped and all(e < 8 for _, e in stopped)  # ASHA stopped at least one trial early
    assert all(s in ("done", "stopped") for _, s, *_ in t)
    # a stopped trial's evals are in the table: every epoch it ran, every mode and subset
    k, e = stopped[0]
    assert rows(results, "evals", f"select count(*) from t where trial_key = '{k}'") == [(e * 11,)]
    code = f"""
import json, mlflow
mlflow.set_tracking_uri("sqlite:///{results}/mlflow.db")
runs = mlflow.search_runs(experiment_names=["s"], output_format="list")
roles = [r.data.tags.get("memray.role") for r in runs]
child = next(r for r in runs if r.data.tags.get("memray.role") == "trial")
print(json.dumps({{"sweep": roles.count("sweep"), "trial": roles.count("trial"),
                   "objective": "objective" in child.data.metrics}}))
"""
    got = json.loads(subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    assert got == {"sweep": 1, "trial": 6, "objective": True}
    # the Optuna study is stored beside the tables: every Tune trial once, none left RUNNING
    import optuna

    study = optuna.load_study(study_name="s", storage=f"sqlite:///{results}/optuna.db")
    states = sorted(t.state.name for t in study.trials)
    assert len(states) == 6 and set(states) <= {"COMPLETE", "PRUNED", "FAIL"}, states
    assert sorted(tr.params["exp/dropout/p_gen"] for tr in study.trials) == sorted(pg for _, _, pg, *_ in t)


def test_multi_objective_search_finishes_and_reports_its_front(tmp_path):
    """--objective pareto: NSGA-II over drop test (up) and drop train_noisy (down), no early
    stopping; the study holds both values of every trial and the report plots the front."""
    results = tmp_path / "r"
    rc, out, err = finish(start("sweeps.dropout_search", "--objective", "pareto", "--num-samples", "3", "--epochs",
                                "3", "--width", "32,64", "--results-dir", str(results), "--name", "mo"))
    assert rc == 0, out[-2000:] + err[-3000:]
    assert rows(results, "trials", "select count(*) from t where status = 'done' and epochs_done = 3") == [(3,)]
    import optuna

    study = optuna.load_study(study_name="mo", storage=f"sqlite:///{results}/optuna.db")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3 and all(len(t.values) == 2 for t in study.trials)
    assert 1 <= len(study.best_trials) <= 3
    p = subprocess.run([PY, "-m", "analysis.report", "--results-dir", str(results), "--out", str(tmp_path / "rep")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "<h3>Search: Pareto front</h3>" in page and 'alt="pareto"' in page
