"""The results store read back: declared schemas, analysis.query, analysis.report, MLflow server,
idempotent re-runs, interrupted writes and corrupt fragments."""
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis.store import StoreError, open_store
from memray.tables import SCHEMAS

from .conftest import PY, q, run_cli

pytestmark = pytest.mark.slow


def copy_results(tiny_sweep, tmp_path):
    results, _ = tiny_sweep
    dst = tmp_path / "results"
    shutil.copytree(results, dst)
    return dst


def test_every_table_reads_with_its_declared_schema(tiny_sweep):
    results, _ = tiny_sweep
    store = open_store(str(results))
    # rewinding's snapshots depend on where train_noisy crosses its thresholds: test_sweep_tiny counts them
    expected = {"sweeps": 1, "trials": 2, "evals": 3 * 4 + 3 * 11, "gradients": 2 * 3 * 4,
                "retraining": 2 * 4 * 4, "etd_examples": 1400}
    for table, schema in SCHEMAS.items():
        if table in ("memscore_models", "memscores"):  # a scoring sweep's: tests/test_memscore_sweep.py
            continue
        files = sorted(glob.glob(f"{results}/tables/{table}/sweep=t1/*.parquet"))
        assert files, table
        for f in files:  # pyarrow: every fragment holds exactly the declared schema
            assert pq.read_schema(f).remove_metadata() == schema, (table, f)
        got = store.con.sql(f"select * from {table}").arrow()
        got = got.read_all() if hasattr(got, "read_all") else got
        # DuckDB view over the store: the same columns and types (DuckDB spells UTC "Etc/UTC" and
        # names a list's item field "l")
        assert [(f.name, str(f.type).replace("Etc/UTC", "UTC").replace("list<l:", "list<item:"))
                for f in got.schema] == \
            [(f.name, str(f.type)) for f in schema]
        if table in expected:
            assert got.num_rows == expected[table], table
    assert store.rows("select count(*) n from flips where method = 'greedy'")[0]["n"] > 0


def test_query_cli_formats_and_errors(tiny_sweep, tmp_path):
    results, _ = tiny_sweep
    sql = "select mode, count(*) n from evals group by mode order by mode"
    p = run_cli(sql, "--results-dir", str(results), module="analysis.query")
    assert p.returncode == 0 and "own" in p.stdout and "plain" in p.stdout
    p = run_cli(sql, "--results-dir", str(results), "--format", "csv", module="analysis.query")
    assert p.stdout.splitlines() == ['"mode","n"', '"all",12', '"drop",12', '"own",9', '"plain",12']
    p = run_cli(sql, "--results-dir", str(results), "--format", "json", "--out", str(tmp_path / "a.json"),
                module="analysis.query")
    assert [json.loads(line) for line in (tmp_path / "a.json").read_text().splitlines()][0] == {"mode": "all", "n": 12}
    p = run_cli(sql, "--results-dir", str(results), "--format", "parquet", "--out", str(tmp_path / "a.parquet"),
                module="analysis.query")
    assert pq.read_table(tmp_path / "a.parquet").to_pylist()[-1] == {"mode": "plain", "n": 12}
    p = run_cli("select nope from evals", "--results-dir", str(results), module="analysis.query")
    assert p.returncode == 2 and "query failed" in p.stderr and "nope" in p.stderr
    p = run_cli("select 1", "--results-dir", str(tmp_path / "missing"), module="analysis.query")
    assert p.returncode == 1 and "does not exist" in p.stderr and "missing" in p.stderr


def test_corrupt_fragment_is_named_or_skipped_when_asked(tiny_sweep, tmp_path):
    results = copy_results(tiny_sweep, tmp_path)
    victim = sorted(glob.glob(f"{results}/tables/evals/sweep=t1/*.parquet"))[0]
    with open(victim, "r+b") as f:  # truncate the footer away
        f.truncate(os.path.getsize(victim) // 2)
    p = run_cli("select count(*) from evals", "--results-dir", str(results), module="analysis.query")
    assert p.returncode == 1 and f"corrupt fragment {victim}" in p.stderr and "--skip-corrupt" in p.stderr
    p = run_cli("select count(*) n from evals", "--results-dir", str(results), "--skip-corrupt", "--format", "csv",
                module="analysis.query")
    assert p.returncode == 0 and f"skipped corrupt fragment {victim}" in p.stderr
    assert p.stdout.splitlines()[1] in ("12", str(3 * 11))  # only the other trial's rows
    p = run_cli("--results-dir", str(results), "--out", str(tmp_path / "rep"), module="analysis.report")
    assert p.returncode == 1 and f"corrupt fragment {victim}" in p.stderr
    assert not (tmp_path / "rep" / "index.html").exists()
    p = run_cli("--results-dir", str(results), "--out", str(tmp_path / "rep"), "--skip-corrupt",
                module="analysis.report")
    assert p.returncode == 0 and "skipped corrupt fragment" in (tmp_path / "rep" / "index.html").read_text()


def test_report_has_figures_and_findings(tiny_sweep, tmp_path):
    results, _ = tiny_sweep
    out = tmp_path / "rep"
    p = run_cli("--results-dir", str(results), "--sweep", "t1", "--out", str(out), module="analysis.report")
    assert p.returncode == 0, p.stderr[-2000:]
    page = (out / "index.html").read_text()
    # per cell: gradient norms with the control, rewinding classes, flip collateral (where a greedy
    # edit flipped its target within the tiny budget: the trained models decide), localization;
    # the ETD cell also its accuracy curves and the forgotten-vs-kept examples its trial drew
    flipped = q(results, "flips", "select count(distinct trial_key) from t where method = 'greedy' and flipped")[0][0]
    assert page.count('src="data:image/png;base64,') == 9 + flipped and "<script" not in page  # + the verdict matrix
    # the first screen: the verdict matrix and the reproduction scorecard, then the summary lines
    assert page.index('alt="verdict matrix"') < page.index("<h3>Reproduction scorecard</h3>") < \
        page.index("<h3>Summary</h3>") < page.index("<h3>Verdicts per cell") < page.index("<h3>Trials</h3>")
    assert "about 5 units flip a memorized example" in page and "100% -&gt; 3%" in page
    assert "(protocol 3)" in page and 'alt="forgotten vs kept"' in page
    # every verdict of analysis.findings is a row of the table, coloured by its verdict
    js = run_cli("--results-dir", str(results), "--sweep", "t1", "--format", "json", module="analysis.findings")
    verdicts = json.loads(js.stdout)
    assert {v["id"] for v in verdicts} == {"1a", "1b", "2a", "2b", "3", "4a", "4b", "4c", "4d", "5a", "5b", "7a", "7b",
                                           "7c", "7d", "8a", "8b", "8c"}  # 5b, 7d, 8a-8c: no scores named
    assert {v["verdict"] for v in verdicts} <= {"agree", "differ", "inconclusive"}
    assert sum(page.count(f"<td class='{k}'>") for k in ("agree", "differ", "inconclusive")) == len(verdicts)
    assert f"{len(verdicts)} findings" in p.stdout
    # one seed per cell: every seed-pooled verdict is inconclusive, never agree
    assert all(v["verdict"].startswith("inconclusive") for v in verdicts if v["id"] in ("1a", "1b", "2a", "3", "5a"))
    p = run_cli("--results-dir", str(results), "--sweep", "nope", "--out", str(out), module="analysis.report")
    assert p.returncode == 2 and "--sweep='nope' is invalid" in p.stderr and "t1" in p.stderr


def test_a_write_killed_midway_leaves_no_partial_fragment(tmp_path):
    results = tmp_path / "r"
    code = f"""
from memray import tables
rows = [{{"sweep": "w", "trial_key": "k", "epoch": i, "mode": "plain", "subset": "test", "accuracy": 0.5,
         "loss": 1.0, "n": 10}} for i in range(3_000_000)]
print("ready", flush=True)
tables.write_fragment({str(results)!r}, "evals", "w", "k", rows)
print("written", flush=True)
"""
    p = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    folder = results / "tables" / "evals" / "sweep=w"
    t0 = time.time()
    while not glob.glob(f"{folder}/.tmp-*") and time.time() - t0 < 60:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert glob.glob(f"{folder}/.tmp-*"), "the write never started"
    assert not (folder / "k.parquet").exists()
    store = open_store(str(results))
    assert store.rows("select count(*) n from evals") == [{"n": 0}]


def test_missing_results_dir_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        open_store(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="no tables/ folder"):
        open_store(str(tmp_path / "empty"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_server_on_loopback_serves_the_runs(tiny_sweep, tmp_path):
    results, stdout = tiny_sweep
    # the link the sweep's summary prints: the model-training workspace, the runs filtered to trials
    (link,) = re.findall(r"^\s+(http://127\.0\.0\.1:5000/#/experiments/\S+)$", stdout, re.MULTILINE)
    m = re.fullmatch(r"http://127\.0\.0\.1:5000/#/experiments/(\d+)/runs\?(.+)", link)
    assert m, link
    link_exp, query = m.group(1), urllib.parse.parse_qs(m.group(2))
    assert query == {"workflowType": ["machine_learning"], "searchFilter": ["tags.`memray.role` = 'trial'"],
                     "orderByKey": ["tags.`mlflow.runName`"], "orderByAsc": ["true"]}
    assert f"mlflow ui --backend-store-uri sqlite:///{results}/mlflow.db --host 127.0.0.1 --port 5000" in stdout
    port = _free_port()
    server = subprocess.Popen([os.path.join(os.path.dirname(PY), "mlflow"), "server", "--host", "127.0.0.1",
                               "--port", str(port), "--backend-store-uri", f"sqlite:///{results}/mlflow.db",
                               "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}/api/2.0/mlflow"

    def call(path, body=None):
        req = urllib.request.Request(base + path, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    try:
        t0 = time.time()
        while True:
            try:
                exp = call("/experiments/get-by-name?experiment_name=t1")["experiment"]
                break
            except OSError:
                assert time.time() - t0 < 90 and server.poll() is None, "mlflow server did not come up"
                time.sleep(0.5)
        # the printed link names this experiment, its page answers 200, and its filter lists the trials
        assert exp["experiment_id"] == link_exp
        assert call(f"/experiments/get?experiment_id={link_exp}")["experiment"]["name"] == "t1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
            assert r.status == 200 and b"<div id=\"root\"" in r.read()
        listed = call("/runs/search", {"experiment_ids": [link_exp], "filter": query["searchFilter"][0]})["runs"]
        assert sorted(r["info"]["run_name"] for r in listed) == ["digits-mlp64-etd-pg0.2-pm0.1-n0.1-s0",
                                                                "digits-mlp64-plain-n0.1-s0"]
        assert {t["key"]: t["value"] for t in exp.get("tags", [])}["mlflow.experimentKind"] == "custom_model_development"
        runs = call("/runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100})["runs"]
        tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
        parents = [r for r, t in zip(runs, tags) if t.get("memray.role") == "sweep"]
        children = [r for r, t in zip(runs, tags) if t.get("memray.role") == "trial"]
        assert len(parents) == 1 and len(children) == 2
        parent_id = parents[0]["info"]["run_id"]
        ptags = {t["key"]: t["value"] for t in parents[0]["data"]["tags"]}
        assert ptags["mlflow.source.name"] == "sweeps.dropout_grid" and "--preset tiny" in ptags["memray.command"]
        # readable run names (trial_key stays a tag), the dataset input, the analyses' summary metrics
        names = sorted(r["info"]["run_name"] for r in children)
        assert names == ["digits-mlp64-etd-pg0.2-pm0.1-n0.1-s0", "digits-mlp64-plain-n0.1-s0"]
        for r in children:
            t = {x["key"]: x["value"] for x in r["data"]["tags"]}
            assert t["mlflow.parentRunId"] == parent_id and len(t["trial_key"]) == 12
            (inp,) = r["inputs"]["dataset_inputs"]
            assert inp["dataset"]["name"] == "digits" and len(inp["dataset"]["digest"]) == 16
            assert json.loads(inp["dataset"]["profile"]) == {"noise_rate": 0.1, "noise_kind": "label", "data_seed": 0,
                                                             "train_limit": None}
            metrics = {m["key"] for m in r["data"]["metrics"]}
            assert {"flip/greedy/clean/flipped_frac", "rewind/fc1/train_noisy_at_0", "retrain/head/converged"} <= metrics
            etd = "-etd-" in r["info"]["run_name"]  # ETD trials localize in both tracks, plain ones over every unit
            tracks = ("decoy", "all") if etd else ("none",)
            assert {f"localize/{t}/zero_out/clean/seconds_per_target" for t in tracks} <= metrics
        # both trials learn from the same labels and noise: one digest
        assert len({r["inputs"]["dataset_inputs"][0]["dataset"]["digest"] for r in children}) == 1
        # the parent holds the sweep's verdict table, a page a person can open
        files = call(f"/artifacts/list?run_id={parent_id}")["files"]
        assert sorted(f["path"] for f in files) == ["verdicts.csv", "verdicts.html"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_rerunning_a_sweep_keeps_row_counts_and_mlflow_runs(tiny_sweep, tmp_path):
    results = copy_results(tiny_sweep, tmp_path)
    tables = ("trials", "evals", "gradients", "rewinding", "retraining", "flips", "sweeps")
    before = {t: q(results, t) for t in tables}
    p = run_cli("--preset", "tiny", "--results-dir", str(results), "--name", "t1")
    assert p.returncode == 0, p.stderr[-3000:]
    assert {t: q(results, t) for t in tables} == before
    code = f"""
import json, mlflow
mlflow.set_tracking_uri("sqlite:///{results}/mlflow.db")
runs = mlflow.search_runs(experiment_names=["t1"], output_format="list")
roles = sorted(r.data.tags.get("memray.role") for r in runs)
c = mlflow.MlflowClient()
child = next(r for r in runs if r.data.tags.get("memray.role") == "trial")
key = next(k for k in child.data.metrics if k.endswith("test/accuracy") and not k.startswith("final"))
print(json.dumps({{"roles": roles, "steps": sorted(m.step for m in c.get_metric_history(child.info.run_id, key))}}))
"""
    out = json.loads(subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    assert out == {"roles": ["sweep", "trial", "trial"], "steps": [1, 2, 3]}


def test_report_puts_several_sweeps_side_by_side(tiny_sweep, tmp_path):
    """A second sweep (the tiny sweep's rows under another name) gets its own section, judged on its own."""
    results = copy_results(tiny_sweep, tmp_path)
    for f in glob.glob(f"{results}/tables/*/sweep=t1/*.parquet"):
        t = pq.read_table(f)
        t = t.set_column(t.schema.get_field_index("sweep"), "sweep", pa.array(["t2"] * t.num_rows, pa.string()))
        dst = f.replace("sweep=t1", "sweep=t2")
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        pq.write_table(t, dst)
    out = tmp_path / "rep"
    p = run_cli("--results-dir", str(results), "--sweep", "t1", "--sweep", "t2", "--out", str(out),
                module="analysis.report")
    assert p.returncode == 0, p.stderr[-2000:]
    page = (out / "index.html").read_text()
    assert "<h2>Sweep t1 (protocol 3)</h2>" in page and "<h2>Sweep t2 (protocol 3)</h2>" in page
    assert page.index("<h2>Sweep t1") < page.index("<h2>Sweep t2")
    # the forgotten-vs-kept figure is the trial's file under figures/sweep=t1 only; flip collateral
    # where a greedy edit flipped its target (the trained models decide)
    per = 9 + q(results, "flips", "select count(distinct trial_key) from t where method = 'greedy' and flipped "
                                  "and sweep = 't1'")[0][0]
    assert page.count('src="data:image/png;base64,') == per + (per - 1)
    assert f"2 sweep(s), {2 * per - 1} figures" in p.stdout


def _runs(uri: str, experiment: str) -> dict:
    """{run name: (role, trial_key, parent name, params, {metric: [(step, value)]}, dataset digests)}."""
    code = f"""
import json
from mlflow.tracking import MlflowClient
c = MlflowClient(tracking_uri={uri!r})
exp = c.get_experiment_by_name({experiment!r})
runs = c.search_runs([exp.experiment_id], max_results=100)
names = {{r.info.run_id: r.info.run_name for r in runs}}
out = {{}}
for r in runs:
    hist = {{k: sorted((m.step, m.value) for m in c.get_metric_history(r.info.run_id, k)) for k in r.data.metrics}}
    out[r.info.run_name] = [r.data.tags.get("memray.role"), r.data.tags.get("trial_key"),
                            names.get(r.data.tags.get("mlflow.parentRunId")), r.data.params, hist,
                            sorted(d.dataset.digest for d in r.inputs.dataset_inputs)]
print(json.dumps(out))
"""
    p = subprocess.run([PY, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_mlflow_db_deleted_after_a_sweep_is_rebuilt_by_sync(tiny_sweep, tmp_path):
    """The tables are the source of truth: with mlflow.db gone, sync_mlflow rebuilds the same runs
    (names, params, metric histories, parent/child, dataset inputs)."""
    results = copy_results(tiny_sweep, tmp_path)
    uri = f"sqlite:///{results}/mlflow.db"
    before = _runs(uri, "t1")
    assert len(before) == 3 and sum(v[0] == "trial" for v in before.values()) == 2
    os.remove(results / "mlflow.db")
    shutil.rmtree(results / "mlartifacts")
    p = run_cli("--results-dir", str(results), module="analysis.sync_mlflow")
    assert p.returncode == 0, p.stderr[-2000:]
    assert _runs(uri, "t1") == before


def test_mlflow_unreachable_for_a_whole_sweep_then_sync_catches_up(tmp_path):
    results, port = tmp_path / "r", _free_port()
    uri = f"http://127.0.0.1:{port}"  # nothing listens here during the sweep
    t0 = time.time()
    p = run_cli("--preset", "tiny", "--results-dir", str(results), "--name", "down", "--mlflow-uri", uri)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert time.time() - t0 < 180
    assert q(results, "trials", "select count(*) from t where status = 'done'") == [(2,)]
    for table in ("evals", "gradients", "rewinding", "retraining", "flips", "localization", "etd_examples"):
        assert q(results, table) != [(0,)], table
    # MLflow comes back: a server on that port, and sync_mlflow logs the sweep there
    server = subprocess.Popen([os.path.join(os.path.dirname(PY), "mlflow"), "server", "--host", "127.0.0.1",
                               "--port", str(port), "--backend-store-uri", f"sqlite:///{tmp_path}/srv.db",
                               "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        for _ in range(180):
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        p = run_cli("--results-dir", str(results), "--mlflow-uri", uri, module="analysis.sync_mlflow")
        assert p.returncode == 0, p.stderr[-2000:]
        runs = _runs(uri, "down")
        assert sorted(runs) == ["digits-mlp64-etd-pg0.2-pm0.1-n0.1-s0", "digits-mlp64-plain-n0.1-s0", "down"]
        assert all(v[2] == "down" for k, v in runs.items() if k != "down")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_two_sweeps_started_together_on_one_results_dir_and_a_new_mlflow_store(tmp_path):
    """Two sweeps with different names, started at the same moment on one results dir and one
    SQLite MLflow store that does not exist yet (its creation races): both finish, and neither
    loses or mixes a row or a run."""
    results = tmp_path / "r"
    procs = [subprocess.Popen([PY, "-m", "sweeps.dropout_grid", "--preset", "tiny", "--analyses", "gradients",
                               "--results-dir", str(results), "--name", name, *extra],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, extra in (("a", []), ("b", ["--seeds", "1"]))]
    for p in procs:
        out, err = p.communicate(timeout=400)
        assert p.returncode == 0, out[-2000:] + err[-3000:]
    assert q(results, "trials", "select sweep, count(*), count(distinct trial_key) from t group by all order by all") \
        == [("a", 2, 2), ("b", 2, 2)]
    assert q(results, "evals", "select sweep, count(*) from t group by all order by all") == [("a", 45), ("b", 45)]
    uri = f"sqlite:///{results}/mlflow.db"
    for name, seed in (("a", 0), ("b", 1)):
        runs = _runs(uri, name)
        trials = {k: v for k, v in runs.items() if v[0] == "trial"}
        assert sorted(runs) == sorted([name, *trials]) and len(trials) == 2
        assert all(v[2] == name and k.endswith(f"-s{seed}") for k, v in trials.items())
        assert all(len(h) == 3 for v in trials.values() for m, h in v[4].items() if m.endswith("test/accuracy")
                   and not m.startswith("final/"))
