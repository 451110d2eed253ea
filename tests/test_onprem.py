"""`ray up` for real: cluster-onprem.yaml brought up over SSH on the loopback addresses (head on
127.0.0.1, worker on 127.0.0.2), a tiny grid run on it with `ray exec`, and `ray down`.

Isolation: everything (sshd, the launcher, both Ray nodes, the MLflow server) runs in its own PID
and mount namespace (`unshare --pid --fork --mount --mount-proc`) with private /tmp, /run and /mnt
and the home directory bind-mounted to a temp dir, so `ray down`'s `ray stop` can stop nothing but
this cluster, and when the namespace's first process exits every process in it ends. The
Debian packages (openssh-server, rsync, netcat-openbsd) are installed by `.ci/run` or
`make cluster-deps`, never here: without them the test skips, saying so.

The test's cluster file is cluster-onprem.yaml with its site values replaced (addresses, user,
key, results store, this venv) and the changes that two nodes on one machine need: sshd's port in
~/.ssh/config, each node's address and one CPU each (so the two trials land on different nodes),
and no `ray stop` or fixed object-manager port on the worker (it would stop the head, or clash with
its port).
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from .conftest import q

ROOT = Path(__file__).resolve().parents[1]
NEEDS = ("sshd", "ssh", "ssh-keygen", "rsync", "unshare")


def _missing() -> list[str]:
    found = {n: shutil.which(n) or (os.path.exists(f"/usr/sbin/{n}") and f"/usr/sbin/{n}") for n in NEEDS}
    return [n for n, p in found.items() if not p]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shared_commands_are_identical_and_both_files_pass_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    aws = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    onprem = yaml.safe_load((ROOT / "cluster-onprem.yaml").read_text())
    for raw in (aws, onprem):
        validate_config(prepare_config(raw))
    assert onprem["provider"]["type"] == "local" and onprem["provider"]["head_ip"] and onprem["provider"]["worker_ips"]
    # the commands both clusters run: Ray's token, the import check, the start commands
    token = [c for c in aws["setup_commands"] if "RAY_AUTH_MODE=token" in c]
    assert token and token == [c for c in onprem["setup_commands"] if "RAY_AUTH_MODE=token" in c]
    check = 'python -c "import memray, trainables, sweeps, analysis"'
    assert check in aws["setup_commands"] and check in onprem["setup_commands"]
    for k in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert aws[k] == onprem[k], k
    assert aws["rsync_exclude"] == onprem["rsync_exclude"]
    # on-prem copies a clean export of the project (Ray hashes every file under a mount's source)
    assert onprem["file_mounts"] == {"~/memloc": "./build/cluster-src", "~/.ray/auth_token": "~/.ray/auth_token"}
    assert "scripts/cluster_src.sh build/cluster-src" in (ROOT / "Makefile").read_text()
    # the MLflow server: the same loopback binding and allowed hosts
    ml = [c for c in onprem["head_setup_commands"] if "mlflow server" in c]
    assert ml and "--host 127.0.0.1 --port 5000 --allowed-hosts localhost:5000,127.0.0.1:5000" in ml[0]
    # without MLflow's job runner, which held the sweep's first requests past their 20 s timeout
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false nohup mlflow server" in ml[0]
    # the project is installed from the lock, and only where the node's venv is not the lock
    install = [c for c in onprem["setup_commands"] if "make install" in c]
    assert install and "scripts/check_env.py requirements.lock" in install[0] and "||" in install[0]


def loopback_config(tmp: str, venv: str, port_mlflow: int, src: str) -> dict:
    """cluster-onprem.yaml with its site values set for the loopback cluster (see the docstring)."""
    raw = yaml.safe_load((ROOT / "cluster-onprem.yaml").read_text())
    raw["cluster_name"] = "memloc-loopback"
    raw["provider"].update({"head_ip": "127.0.0.1", "worker_ips": ["127.0.0.2"]})
    raw["auth"] = {"ssh_user": "root", "ssh_private_key": "~/.ssh/id_ed25519"}
    raw["file_mounts"] = {"~/memloc": src, "~/.ray/auth_token": "~/.ray/auth_token"}
    env = raw["setup_commands"][0]
    assert env.startswith("echo 'export MEMLOC_RESULTS=") and "MEMLOC_VENV=" in env
    raw["setup_commands"][0] = f"echo 'export MEMLOC_RESULTS={tmp}/results MEMLOC_VENV={venv}' > ~/memloc.env"
    raw["head_setup_commands"] = [c.replace("--port 5000", f"--port {port_mlflow}")
                                  .replace("localhost:5000,127.0.0.1:5000", f"localhost:{port_mlflow},127.0.0.1:{port_mlflow}")
                                  for c in raw["head_setup_commands"]]
    head, worker = raw["head_start_ray_commands"], raw["worker_start_ray_commands"]
    raw["head_start_ray_commands"] = [c + " --node-ip-address=127.0.0.1 --num-cpus=1" if "ray start" in c else c
                                      for c in head]
    raw["worker_start_ray_commands"] = [
        c.replace(" --object-manager-port=8076", "") + " --node-ip-address=127.0.0.2 --num-cpus=1"
        for c in worker if "ray start" in c]
    return raw


WAIT = """import sys, time, urllib.request, ray
ray.init(address="auto")
t = time.time()
while sum(n["Alive"] for n in ray.nodes()) < 2 and time.time() - t < 120:
    time.sleep(1)
print(f"alive nodes: {sum(n['Alive'] for n in ray.nodes())}")
for n in ray.nodes():
    if n["Alive"]:
        role = "head" if "node:__internal_head__" in n["Resources"] else "worker"
        print(f"node: {role} {n['NodeManagerAddress']} {n['NodeID']}")
while time.time() - t < 180:  # the head's MLflow server (started by head_setup_commands) answers
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=2)
        print("mlflow: up")
        break
    except OSError:
        time.sleep(1)
"""


@pytest.mark.slow
@pytest.mark.skipif(bool(_missing()), reason=f"needs {', '.join(_missing())}: install openssh-server rsync "
                    f"netcat-openbsd (make cluster-deps; .ci/run does)")
@pytest.mark.skipif(os.geteuid() != 0, reason="unshare --mount needs root (user namespaces are not used)")
def test_ray_up_runs_a_grid_on_two_nodes_and_ray_down_leaves_nothing(tmp_path):
    t = tmp_path
    home = t / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ray").mkdir()
    for key in (t / "hostkey", home / ".ssh" / "id_ed25519"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    shutil.copy(home / ".ssh" / "id_ed25519.pub", home / ".ssh" / "authorized_keys")
    # Ray has no ssh port setting: sshd's port for every node, here and on the head
    (home / ".ssh" / "config").write_text("Host 127.0.0.*\n  Port 2222\n  StrictHostKeyChecking no\n"
                                          "  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n")
    (t / "sshd_config").write_text(textwrap.dedent(f"""\
        Port 2222
        ListenAddress 127.0.0.1
        ListenAddress 127.0.0.2
        HostKey {t}/hostkey
        AuthorizedKeysFile {home}/.ssh/authorized_keys
        PermitRootLogin prohibit-password
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        UsePAM no
        StrictModes no
        PidFile /run/sshd.pid
        """))
    # inside the namespace this user's home (for sshd's sessions too) is the temp one: a private
    # copy of /etc/passwd says so (nothing is bind-mounted over the real home)
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    passwd = [line.split(":") for line in Path("/etc/passwd").read_text().splitlines()]
    (t / "passwd").write_text("\n".join(":".join(f[:5] + [str(home)] + f[6:]) if f[0] == user else ":".join(f)
                                         for f in passwd) + "\n")
    venv = Path(sys.executable).parent.parent
    port = _free_port()
    subprocess.run([str(ROOT / "scripts" / "cluster_src.sh"), str(t / "src")], check=True)  # = make cluster-src
    (t / "cluster.yaml").write_text(yaml.safe_dump(loopback_config(str(t), str(venv), port, str(t / "src"))))
    (t / "wait.py").write_text(WAIT)
    grid = (f"source ~/memloc.env && cd ~/memloc && python -m sweeps.dropout_grid --preset tiny --address auto "
            f"--results-dir $MEMLOC_RESULTS --name onprem --mlflow-uri http://127.0.0.1:{port}")
    keep = [p for p in dict.fromkeys(map(str, (t, ROOT, venv))) if p.startswith("/tmp/")]
    (t / "inner.sh").write_text(textwrap.dedent(f"""\
        set -u
        # private /tmp, /run and /mnt; the test's own paths under /tmp stay where they are
        mount -t tmpfs tmpfs /mnt
        keep=({" ".join(keep)}); i=0
        for p in "${{keep[@]}}"; do mkdir -p /mnt/keep$i && mount --bind "$p" /mnt/keep$i; i=$((i+1)); done
        mount -t tmpfs tmpfs /tmp
        i=0; for p in "${{keep[@]}}"; do mkdir -p "$p" && mount --bind /mnt/keep$i "$p"; i=$((i+1)); done
        mount -t tmpfs tmpfs /run && mkdir -p /run/sshd
        mount --bind {t}/passwd /etc/passwd
        export HOME={home} TMPDIR=/tmp RAY_TMPDIR=/tmp/ray PATH={venv}/bin:$PATH RAY_UP_enable_autoscaler_v2=0
        cd {t}
        /usr/sbin/sshd -D -e -f {t}/sshd_config 2> {t}/sshd.log &
        ray get-auth-token --generate > {t}/token.log 2>&1
        step() {{ local name=$1; shift; local t0=$(date +%s%N); "$@" > {t}/$name.log 2>&1; local rc=$?
                  echo "{{\\"step\\": \\"$name\\", \\"rc\\": $rc, \\"ms\\": $(( ($(date +%s%N) - t0) / 1000000 ))}}" >> {t}/steps.jsonl; }}
        step up ray up -y {t}/cluster.yaml --no-config-cache
        step wait ray exec {t}/cluster.yaml 'source ~/memloc.env && python {t}/wait.py {port}'
        step exec ray exec {t}/cluster.yaml '{grid}'
        step down ray down -y {t}/cluster.yaml
        ps -eo pid,comm > {t}/ps_after.txt
        """))
    t0 = time.time()
    p = subprocess.run(["unshare", "--pid", "--fork", "--mount", "--mount-proc", "bash", str(t / "inner.sh")],
                       capture_output=True, text=True, timeout=600)
    wall = time.time() - t0
    steps = {s["step"]: s for s in map(json.loads, (t / "steps.jsonl").read_text().splitlines())} \
        if (t / "steps.jsonl").exists() else {}
    logs = {n: (t / f"{n}.log").read_text()[-3000:] for n in ("up", "wait", "exec", "down") if (t / f"{n}.log").exists()}
    assert p.returncode == 0 and set(steps) == {"up", "wait", "exec", "down"}, (p.stdout[-2000:], p.stderr[-2000:], logs)
    for name in ("up", "wait", "exec", "down"):
        assert steps[name]["rc"] == 0, (name, logs.get(name))
    assert re.search(r"^alive nodes: 2\s*$", logs["wait"], re.MULTILINE), logs["wait"]
    assert re.search(r"^mlflow: up\s*$", logs["wait"], re.MULTILINE), logs["wait"]
    # the grid ran on both nodes: its trials' node ids are the head's and the worker's
    found = re.findall(r"^node: (head|worker) (\S+) (\S+)\s*$", logs["wait"], re.MULTILINE)
    nodes = {role: node_id for role, _, node_id in found}
    assert sorted(nodes) == ["head", "worker"] and len(found) == 2, logs["wait"]
    assert [ip for role, ip, _ in found if role == "worker"] == ["127.0.0.2"], logs["wait"]
    results = t / "results"
    trial_nodes = q(results, "trials", "select trial_key, node_id from t where status = 'done' order by trial_key")
    assert len(trial_nodes) == 2 and {n for _, n in trial_nodes} == set(nodes.values()), (trial_nodes, nodes)
    role_of = {node_id: role for role, node_id in nodes.items()}
    where = {k: role_of[n] for k, n in trial_nodes}
    # MLflow (the head's server, stopped with the cluster) left its store beside the tables
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{results}/mlflow.db")
    exp = client.get_experiment_by_name("onprem")
    assert len(client.search_runs([exp.experiment_id], "tags.`memray.role` = 'trial'")) == 2
    # nothing of the cluster is left: its processes ended with the namespace
    after = (t / "ps_after.txt").read_text()
    assert "raylet" not in after and "gcs_server" not in after, after
    print(json.dumps({"wall_s": round(wall, 1), **{k: v["ms"] / 1000 for k, v in steps.items()},
                      "nodes": nodes, "trial_node": where}))
