"""The memorization-score sweep (EXPERIMENTS.md section 8) through Ray Tune, and a grid sweep that
uses its scores: bad input, the tables, kill-and-resume, rare targets and findings 5b/8a/8b."""
import glob
import json
import math
import os
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from memray import memscores as M
from memray import tables

from .conftest import q as rows
from .conftest import run_cli
from .test_sweep_reliability import finish, start, wait_for

SCORE = "sweeps.memorization_scores"


def _nothing_written(results) -> bool:
    return not os.path.exists(results) or not glob.glob(f"{results}/**/*.parquet", recursive=True)


@pytest.mark.parametrize("flags, needle", [
    (["--models", "1"], "--models=1 is invalid: an integer >= 2"),
    (["--subset-fraction", "1.0"], "--subset-fraction=1.0 is invalid: a number in the open interval (0, 1)"),
    (["--subset-fraction", "0"], "--subset-fraction=0.0 is invalid"),
    (["--dataset", "imagenet"], "--dataset='imagenet' is invalid: one of ["),
    (["--noise", "1.5"], "--noise=1.5 is invalid: a number in [0, 1)"),
    (["--preset", "huge"], "--preset='huge' is invalid"),
    (["--models-per-trial", "0"], "--models-per-trial=0 is invalid"),
])
def test_bad_scoring_input_exits_2_and_writes_nothing(tmp_path, flags, needle):
    results = tmp_path / "r"
    p = run_cli("--preset", "tiny", *flags, "--results-dir", str(results), module=SCORE, timeout=60)
    assert p.returncode == 2, p.stdout + p.stderr
    assert needle in p.stderr, p.stderr
    assert not os.path.exists(results)


def _fake_scores(results, name, **meta):
    """A `memscores` fragment in the real format (what the reduce step writes), for the checks
    that read only its metadata."""
    from memray.config import DataConfig, PROTOCOL
    from memray.data import load_data

    digest = load_data(DataConfig(dataset="digits", noise_rate=0.1)).digest()  # the tiny grid's data
    base = {"protocol": PROTOCOL, "data_digest": digest, "dataset": "digits", "noise_rate": 0.1,
            "noise_kind": "label", "data_seed": 0, "arch": "mlp"}
    base.update(meta)
    n = base.pop("n", 1400)
    tables.write_fragment(str(results), "memscores", name, name,
                          [{"sweep": name, **base, "example_id": i, "is_noisy": False, "score": 0.0} for i in range(n)])


@pytest.mark.parametrize("meta, flags, needle", [
    ({}, ["--memscores", "missing"], "--memscores='missing' is invalid: no memorization scores of that sweep"),
    ({"noise_rate": 0.2}, [], "its noise_rate is 0.2, the trial's is 0.1"),
    ({"dataset": "mnist1d"}, [], "its dataset is 'mnist1d', the trial's is 'digits'"),
    ({"data_seed": 3}, [], "its data_seed is 3, the trial's is 0"),
    ({"noise_kind": "placebo"}, [], "its noise_kind is 'placebo', the trial's is 'label'"),
    ({"n": 700}, [], "it scores 700 training examples, the trial's training set has 1400"),
    ({"protocol": 2}, [], "its protocol is 2, this code runs protocol 3"),
    ({"data_digest": "0123456789abcdef"}, [], "its data_digest is '0123456789abcdef', the trial's is"),
    ({}, ["--rare-threshold", "0"], "--rare-threshold=0.0 is invalid: a number in (0, 1]"),
    ({}, ["--memscores", "../x"], "--memscores='../x' is invalid"),
])
def test_grid_naming_mismatched_scores_exits_2_and_writes_nothing(tmp_path, meta, flags, needle):
    results = tmp_path / "r"
    _fake_scores(results, "s", **meta)
    before = sorted(glob.glob(f"{results}/**/*", recursive=True))
    args = ["--memscores", "s", *flags] if "--memscores" not in flags else flags
    p = run_cli("--preset", "tiny", *args, "--results-dir", str(results), "--name", "g", timeout=60)
    assert p.returncode == 2, p.stdout + p.stderr
    assert needle in p.stderr, p.stderr
    assert sorted(glob.glob(f"{results}/**/*", recursive=True)) == before


def test_rare_threshold_needs_scores(tmp_path):
    p = run_cli("--preset", "tiny", "--rare-threshold", "0.3", "--results-dir", str(tmp_path / "r"), timeout=60)
    assert p.returncode == 2 and "--rare-threshold=0.3 is invalid without --memscores" in p.stderr
    assert not os.path.exists(tmp_path / "r")


# ----------------------------------------------------------------------------- real sweeps
@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    """The tiny scoring sweep, uninterrupted: 8 models, 2 trials of 4."""
    results = tmp_path_factory.mktemp("ms") / "r"
    p = run_cli("--preset", "tiny", "--results-dir", str(results), "--name", "ms", module=SCORE)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return results, p.stdout


def _scores_table(results, name):
    return pq.read_table(f"{results}/tables/memscores/sweep={name}/{name}.parquet").sort_by("example_id")


@pytest.mark.slow
def test_scoring_sweep_writes_its_tables_figures_and_mlflow_run(scores):
    results, out = scores
    models = rows(results, "memscore_models", "select model_index, subset_seed, len(predictions) from t "
                                              "order by model_index")
    assert [m[0] for m in models] == list(range(8)) and all(m[2] == 1400 for m in models)
    assert len({m[1] for m in models}) == 8
    assert pq.read_schema(glob.glob(f"{results}/tables/memscore_models/sweep=ms/*.parquet")[0]).field(
        "predictions").type.value_type == "int16"
    t = _scores_table(results, "ms")
    assert t.num_rows == 1400 and t.schema.remove_metadata() == tables.SCHEMAS["memscores"]
    d = t.to_pydict()
    assert set(d["models"]) == {8} and set(d["subset_fraction"]) == {0.7}
    # recomputed here, in numpy, from the models' predictions and their regenerated subsets
    preds = np.array(rows(results, "memscore_models", "select predictions from t order by model_index"),
                     dtype=object)
    preds = np.stack([np.asarray(p[0]) for p in preds])  # (8, 1400)
    inside = np.stack([M.subset_mask(m[1], 1400, 0.7).numpy() for m in models])
    right = preds == np.asarray(d["given_label"])[None]
    for i in range(1400):
        n_in = int(inside[:, i].sum())
        assert (d["n_in"][i], d["n_out"][i]) == (n_in, 8 - n_in)
        if n_in in (0, 8):
            assert d["score"][i] is None and d["stderr"][i] is None
        else:
            a, b = right[inside[:, i], i].mean(), right[~inside[:, i], i].mean()
            assert d["acc_in"][i] == pytest.approx(a) and d["acc_out"][i] == pytest.approx(b)
            assert d["score"][i] == pytest.approx(a - b)
            assert d["stderr"][i] == pytest.approx(math.sqrt(a * (1 - a) / n_in + b * (1 - b) / (8 - n_in)))
    # the scores' own check, on real models: noisy examples score higher than clean ones
    assert "noisy > clean, one-sided Mann-Whitney p = " in out
    p = float(out.split("one-sided Mann-Whitney p = ")[1].split()[0])
    assert p < 0.05
    for name in ("scores", "top_scoring"):
        assert os.path.getsize(f"{results}/figures/sweep=ms/ms/{name}.png") > 1000
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{results}/mlflow.db")
    run = c.search_runs([c.get_experiment_by_name("ms").experiment_id])[0]
    assert run.data.metrics["models"] == 8 and run.data.metrics["noisy_gt_clean_p"] == pytest.approx(p, rel=1e-2)
    assert run.data.params["subset_fraction"] == "0.7" and run.info.status == "FINISHED"
    assert {a.path for a in c.list_artifacts(run.info.run_id, "figures")} == {"figures/scores.png",
                                                                              "figures/top_scoring.png"}
    # MLflow is a view: the same run rebuilt from the tables into another store
    other = f"sqlite:///{results}/other.db"
    p2 = run_cli("--results-dir", str(results), "--mlflow-uri", other, "--sweep", "ms", module="analysis.sync_mlflow")
    assert p2.returncode == 0 and "synced sweep 'ms': 8 trials (models" in p2.stdout, p2.stderr
    c2 = MlflowClient(other)
    run2 = c2.search_runs([c2.get_experiment_by_name("ms").experiment_id])[0]
    assert run2.data.metrics == run.data.metrics and run2.data.params["models"] == "8"


@pytest.mark.slow
def test_killed_scoring_driver_resumes_to_the_uninterrupted_scores(tmp_path):
    """SIGKILL the driver once every trial has checkpointed and none has finished, then --resume:
    the trials continue from their checkpoints and `memscores` equals the uninterrupted run's.
    (400 epochs: about 13 s a trial here, so the kill lands mid-run.)"""
    results = tmp_path / "r"
    args = ["--preset", "tiny", "--epochs", "400", "--checkpoint-s", "0.5", "--results-dir", str(results),
            "--name", "ms"]
    proc = start(SCORE, *args)

    def checkpointed():  # a few checkpoints each (Tune's experiment state has caught up with one)
        folders = glob.glob(f"{results}/ray/ms/score_trial_*")
        newest = [max((int(c.rsplit("_", 1)[1]) for c in glob.glob(f"{f}/checkpoint_*")), default=-1) for f in folders]
        return len(folders) == 2 and min(newest) >= 3

    wait_for(checkpointed, proc, what="checkpoints")
    proc.kill()
    proc.communicate()
    unfinished = 2 - len(glob.glob(f"{results}/tables/memscore_models/sweep=ms/*.parquet"))
    time.sleep(2)  # the killed driver's Ray processes exit with it
    assert unfinished >= 1 and not glob.glob(f"{results}/tables/memscores/*/*.parquet")
    rc, out, err = finish(start(SCORE, *args, "--resume"))
    assert rc == 0, out[-2000:] + err[-3000:]
    restored = [json.loads(line).get("restored_from", 0) for f in glob.glob(f"{results}/ray/ms/score_trial_*/result.json")
                for line in open(f).read().splitlines() if line.strip()]
    assert max(restored) > 0  # continued from a checkpoint, not from scratch
    # the same models as an uninterrupted run of 400 epochs
    want = run_cli(*args[:-4], "--results-dir", str(tmp_path / "u"), "--name", "ms", module=SCORE)
    assert want.returncode == 0, want.stderr[-3000:]
    got, exp = _scores_table(results, "ms"), _scores_table(tmp_path / "u", "ms")
    assert got.equals(exp)
    assert rows(results, "memscore_models", "select count(*), count(distinct model_index) from t") == [(8, 8)]
    assert not glob.glob(f"{results}/tables/*/*/.tmp-*")


@pytest.mark.slow
def test_grid_with_scores_has_rare_targets_and_findings(scores):
    results, _ = scores
    p = run_cli("--preset", "tiny", "--epochs", "20", "--widths", "128", "--analyses", "flip,localize",
                "--memscores", "ms", "--results-dir", str(results), "--name", "g")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rare = {r[0] for r in rows(results, "memscores", "select example_id from t where sweep = 'ms' and not is_noisy "
                                                     "and score >= 0.25")}
    kinds = rows(results, "flips", "select target_kind, example_id from t where sweep = 'g'")
    assert {k for k, _ in kinds} == {"noisy", "clean", "rare"}
    assert all((i in rare) == (k == "rare") for k, i in kinds if k != "noisy")
    loc = rows(results, "localization", "select distinct target_kind, example_id from t where sweep = 'g'")
    assert all(i in rare for k, i in loc if k == "rare") and any(k == "rare" for k, _ in loc)
    out = run_cli("--results-dir", str(results), "--sweep", "g", "--format", "json", module="analysis.findings")
    assert out.returncode == 0, out.stderr
    verdicts = {(v["id"], v["cell"].split("-")[2].split()[0]): v for v in json.loads(out.stdout)}
    assert verdicts[("8a", "plain")]["verdict"] == "agree"  # noisy above clean, p far below 0.05
    for fid, cell in (("8b", "plain"), ("5b", "etd"), ("8c", "plain")):  # judged, not skipped
        assert "no memorization scores" not in verdicts[(fid, cell)]["reason"], verdicts[(fid, cell)]
    # 8c: the grid's mlp against the mlp scores, over every training example
    assert verdicts[("8c", "plain")]["n"] > 100 and "Spearman rho" in verdicts[("8c", "plain")]["value"]
    assert {v["verdict"] for v in verdicts.values()} <= {"agree", "differ", "inconclusive"}
    page = run_cli("--results-dir", str(results), "--sweep", "g", "--out", str(results / "report"),
                   module="analysis.report")
    assert page.returncode == 0, page.stderr
    html = open(results / "report" / "index.html").read()
    assert "Memorization scores: ms" in html and 'alt="5b scores"' in html and 'alt="top-scoring examples"' in html
    assert 'alt="8c proxy"' in html  # cumulative loss against the score, per plain cell with scores
