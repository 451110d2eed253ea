"""Running on a cluster: cluster.yaml checked by Ray's own validator; a real two-node Ray cluster on
this machine (one node removed mid-sweep); an S3 results store served on loopback (moto); a node
that declares GPUs receives the GPU-requesting trials."""
import glob
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from .conftest import PY, all_trials_checkpointed, q

ROOT = Path(__file__).resolve().parents[1]
# vCPUs and GPUs of the instance types cluster.yaml uses (AWS published figures)
INSTANCES = {"m6i.2xlarge": (8, 0), "g5.2xlarge": (8, 1), "g5.12xlarge": (48, 4)}


def test_cluster_yaml_passes_rays_validator_and_names_real_things():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(raw))
    with pytest.raises(Exception, match="bogus"):
        validate_config(prepare_config({**raw, "bogus": 1}))
    for name, nt in raw["available_node_types"].items():
        cpus, gpus = INSTANCES[nt["node_config"]["InstanceType"]]
        assert nt["resources"].get("GPU", 0) == gpus, name
        if name != raw["head_node_type"]:
            assert nt["resources"]["CPU"] == cpus and gpus >= 1 and nt["max_workers"] >= 1
        assert nt["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
    for dst, src in raw["file_mounts"].items():
        if dst == "~/.ray/auth_token":  # Ray's token, generated on the launching machine before `ray up`
            continue
        assert (ROOT / src).exists(), src
    # security defaults: Ray's token authentication on every `ray start`, MLflow answering only
    # requests addressed to the loopback name it is bound to
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("RAY_AUTH_MODE=token" in c and "RAY_AUTH_TOKEN_PATH" in c for c in raw["setup_commands"])
    for k in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in raw[k] if "ray start" in c]
        assert start and all(c.startswith("source ~/memloc.env;") for c in start), k
    commands = [c for k in ("setup_commands", "head_setup_commands", "worker_setup_commands",
                            "head_start_ray_commands", "worker_start_ray_commands") for c in raw[k]]
    text = "\n".join(commands) + "\n" + (ROOT / "cluster.yaml").read_text()
    modules = set(re.findall(r"python -m ([\w.]+)", text)) | {
        m for imp in re.findall(r"import ([\w, ]+)\"", text) for m in imp.replace(" ", "").split(",")}
    assert {"sweeps.dropout_grid", "memray", "trainables", "sweeps", "analysis"} <= modules
    for m in modules:
        assert importlib.util.find_spec(m) is not None, m
    assert "--dashboard-host=127.0.0.1" in text and "0.0.0.0" not in text
    assert re.search(r"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false nohup mlflow server --host 127\.0\.0\.1 --port 5000 "
                     r"--allowed-hosts localhost:5000,127\.0\.0\.1:5000", " ".join(commands))
    assert sum("MEMLOC_RESULTS=s3://" in c for c in commands) == 1  # the bucket, named once


def _start(*args, env=None):
    return subprocess.Popen([PY, "-m", "sweeps.dropout_grid", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def _node_ids_reported(results, name):
    out = {}
    for f in glob.glob(f"{results}/ray/{name}/*/result.json"):
        lines = Path(f).read_text().splitlines()
        if lines:
            out[f] = json.loads(lines[0])["node_id"]
    return out


@pytest.mark.slow
def test_two_node_cluster_spreads_trials_and_survives_losing_a_node(tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    results = tmp_path / "r"
    try:
        proc = _start("--preset", "tiny", "--epochs", "80", "--widths", "512", "--analyses", "none", "--checkpoint-s", "0",
                      "--address", cluster.address, "--results-dir", str(results), "--name", "two")
        t0 = time.time()
        while not all_trials_checkpointed(results, "two", 2, at_least=3):
            assert proc.poll() is None and time.time() - t0 < 180, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        nodes = _node_ids_reported(results, "two")
        assert len(set(nodes.values())) == 2  # one trial per node
        cluster.remove_node(worker)
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, out[-2000:] + err[-3000:]
    finally:
        cluster.shutdown()
    rows = q(results, "trials", "select status, attempts, node_id from t order by attempts")
    assert [(s, a) for s, a, _ in rows] == [("done", 1), ("done", 2)]
    assert rows[1][2] == rows[0][2] != worker.node_id  # the moved trial finished on the remaining node
    assert q(results, "evals", "select count(*), count(distinct (trial_key, epoch, mode, subset)) from t") == \
        [(80 * 4 + 80 * 11,) * 2]


@pytest.mark.slow
def test_gpu_node_receives_the_gpu_trials_with_fractional_bundles(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    gpu_node = cluster.add_node(num_cpus=2, num_gpus=1)
    cluster.wait_for_nodes()
    results = tmp_path / "r"
    seen = set()
    try:
        ray.init(address=cluster.address)
        proc = _start("--preset", "tiny", "--epochs", "20", "--analyses", "rewind", "--gpus-per-trial", "0.5",
                      "--analysis-workers", "1", "--address", cluster.address, "--results-dir", str(results),
                      "--name", "gpu")
        while proc.poll() is None:
            for pg in ray.util.placement_group_table().values():
                if pg["state"] == "CREATED":
                    seen.add(json.dumps(sorted(pg["bundles"].items()), sort_keys=True))
            time.sleep(0.2)
        out, err = proc.communicate()
        assert proc.returncode == 0, out[-2000:] + err[-3000:]
    finally:
        ray.shutdown()
        cluster.shutdown()
    half = {"CPU": 0.5, "GPU": 0.25}
    assert json.dumps([[0, half], [1, half]], sort_keys=True) in seen, seen
    rows = q(results, "trials", "select node_id, status from t")
    assert rows == [(gpu_node.node_id, "done")] * 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_s3_results_store_on_loopback(tmp_path):
    port = _free_port()
    server = subprocess.Popen([os.path.join(os.path.dirname(PY), "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        import boto3

        t0 = time.time()
        while True:
            try:
                boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                             aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket="memloc")
                break
            except Exception:
                assert time.time() - t0 < 30, "moto server did not come up"
                time.sleep(0.3)
        uri = "s3://memloc/results"
        args = ["--preset", "tiny", "--p-mem", "0.1,0.2,0.3", "--results-dir", uri, "--name", "s3",
                "--mlflow-uri", f"sqlite:///{tmp_path}/mlflow.db"]
        proc = _start(*args, env=env)
        old = dict(os.environ)
        os.environ.update(env)
        try:
            from analysis.store import open_store

            def n_trials():
                try:
                    return len(open_store(uri, tables=("trials",)).files["trials"])
                except Exception:
                    return 0
            t0 = time.time()
            while n_trials() < 1:
                assert proc.poll() is None and time.time() - t0 < 300, proc.communicate()[1][-3000:]
                time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=300)
            assert proc.returncode in (130, 0), err[-3000:]
            resumed = _start(*args, "--resume", env=env)
            out, err = resumed.communicate(timeout=600)
            assert resumed.returncode == 0, out[-2000:] + err[-3000:]
            p = subprocess.run([PY, "-m", "analysis.query", "--results-dir", uri, "--format", "csv",
                                "select (select count(*) from trials where status = 'done') t, "
                                "(select count(*) from evals) e, (select count(*) from rewinding) r, "
                                "(select count(distinct (trial_key, layer_index, rewind_epoch, subset)) from rewinding) rd, "
                                "(select count(*) from rewinding where rewind_epoch in (0, 3)) r03, "
                                "(select count(distinct trial_key) from flips) f, (select count(*) from sweeps) s"],
                               capture_output=True, text=True, env={**os.environ})
            assert p.returncode == 0, p.stderr[-2000:]
            # 4 trials: evals 3 epochs x (4 plain + 3 x 11 ETD); rewinding 4 x 4 groups x 4 subsets x the
            # snapshots (0, the final epoch 3, and where train_noisy crossed its thresholds): no row twice
            t, e, r, rd, r03, f, s = map(int, p.stdout.splitlines()[1].split(","))
            assert (t, e, f, s) == (4, 3 * 4 + 3 * 3 * 11, 4, 1)
            assert r == rd and r % 16 == 0 and r03 == 4 * 4 * 2 * 4
            store = open_store(uri)
            # every table of a grid sweep written to S3 (a scoring sweep's two are tests/test_memscore_sweep.py's)
            assert all(store.files[t] for t in store.files if t not in ("memscore_models", "memscores"))
        finally:
            os.environ.clear()
            os.environ.update(old)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
