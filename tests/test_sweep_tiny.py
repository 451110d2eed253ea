"""The dropout_grid CLI end to end through real Ray Tune trials (tiny preset)."""
import json
import re
import subprocess

import pytest
import torch

from .conftest import PY, q, run_cli


@pytest.mark.slow
def test_tiny_sweep_writes_every_table(tiny_sweep):
    results, out = tiny_sweep
    assert "Sweep 't1': 2 trials" in out and "mlflow ui --backend-store-uri" in out
    assert q(results, "trials") == [(2,)]
    assert q(results, "trials", "select count(*) from t where status = 'done'") == [(2,)]
    # evals: plain twin 3 epochs x 4 subsets; ETD 3 epochs x (own 3 + all 4 + drop 4)
    assert q(results, "evals", "select count(*) from t") == [(3 * 4 + 3 * 11,)]
    # gradients: 2 trials x 3 epochs x 4 mlp groups
    assert q(results, "gradients") == [(2 * 3 * 4,)]
    # rewinding: per trial 4 groups x its snapshots x 4 subsets. Snapshots: epoch 0, the final epoch 3,
    # and the first epoch whose train_noisy (own for ETD) reaches 0.1, 0.25, 0.5, 0.75 (read from evals)
    for key, in q(results, "trials", "select trial_key from t"):
        curve = dict(q(results, "evals", f"select epoch, accuracy from t where trial_key = '{key}' and "
                                         "subset = 'train_noisy' and mode in ('plain', 'own')"))
        firsts = {min((e for e, a in curve.items() if a >= th), default=None) for th in (0.1, 0.25, 0.5, 0.75)}
        snaps = {0, 3} | (firsts - {None})
        got = q(results, "rewinding", f"select rewind_epoch, count(*) from t where trial_key = '{key}' group by all")
        assert dict(got) == {e: 4 * 4 for e in snaps}
    # retraining: 4 groups x 4 subsets
    assert q(results, "retraining") == [(2 * 4 * 4,)]
    assert q(results, "sweeps", "select n_trials, preset from t") == [(2, "tiny")]
    # flips: per trial and method the same targets (at most 4 noisy + 4 clean), both methods
    per = q(results, "flips", "select trial_key, method, list(example_id order by example_id) from t "
                              "group by all order by all")
    assert len(per) == 4 and per[0][2] == per[1][2] and per[2][2] == per[3][2]
    assert all(0 < len(ids) <= 8 for _, _, ids in per)
    assert q(results, "flips", "select count(*) from t where method = 'greedy' and n_units > 8") == [(0,)]
    # two trials at once on 2 cores: their training intervals overlap
    spans = []
    for f in sorted(results.glob("ray/t1/*/result.json")):
        ts = [json.loads(line)["timestamp"] for line in f.read_text().splitlines()]
        spans.append((min(ts), max(ts)))
    assert len(spans) == 2 and max(a for a, _ in spans) <= min(b for _, b in spans)  # 1 s resolution
    # checkpoints by time (--checkpoint-s, 30 s by default) and at the last training epoch: every
    # epoch is reported, one checkpoint per started 30 s of training, the newest holding epoch 3
    for f in sorted(results.glob("ray/t1/*/result.json")):
        res = [json.loads(line) for line in f.read_text().splitlines()]
        assert [r["epoch"] for r in res if r["phase"] == "train"] == [1, 2, 3]
        cks = sorted(f.parent.glob("checkpoint_*"))
        train_s = next(r for r in res if r["phase"] == "done")["time/train"]
        assert 1 <= len(cks) <= 1 + train_s // 30 and cks[-1].name == f"checkpoint_{len(cks) - 1:06d}"
        state = torch.load(cks[-1] / "state.pt", weights_only=True)
        assert int(state["epoch"]) == 3
    for k, dropout in q(results, "trials", "select trial_key, dropout from t"):
        figs = sorted(p.name for p in (results / "figures" / "sweep=t1" / k).iterdir())
        # an ETD trial also draws the clean examples `drop` forgets beside kept ones
        assert figs == (["flips.png"] + (["forgotten.png"] if dropout == "example_tied" else [])
                        + ["gradients.png", "localization.png", "retraining.png", "rewinding.png"])
    # protocol 3: every trial's protocol and noise kind, per-example ETD correctness
    assert q(results, "trials", "select distinct protocol, noise_kind from t") == [(3, "label")]
    assert q(results, "etd_examples") == [(1400,)]
    # the free memorization proxy: every trial, every training example once, from its training pass
    assert q(results, "example_stats", "select count(*), count(distinct trial_key), count(distinct example_id), "
             "sum(is_noisy::int), min(cum_loss) > 0, min(learn_epoch) >= 1 and max(learn_epoch) <= 3 from t") == \
        [(2800, 2, 1400, 280, True, True)]  # the tiny preset trains 3 epochs
    (noisy_loss, clean_loss), = q(results, "example_stats", "select median(cum_loss) filter (where is_noisy), "
                                  "median(cum_loss) filter (where not is_noisy) from t")
    assert noisy_loss > clean_loss  # wrong labels are fit late, if at all
    # localization: the ETD trial in both tracks (R in mode own for decoy, all for all) with all 10
    # methods; the plain twin over every unit (track none, no truth: precision null) without the
    # two that read ETD's masks (mask_only, oracle)
    per = dict(((m, t), n) for m, t, n in q(results, "localization", "select mode, track, count(distinct method) "
                                                                     "from t group by mode, track"))
    assert per == {("own", "decoy"): 10, ("all", "all"): 10, ("plain", "none"): 8}
    assert q(results, "localization", "select count(*) from t where track = 'none' and precision is not null") == [(0,)]
    assert q(results, "localization", "select count(*) from t where track = 'decoy' and k = n_truth and "
                                      "precision between 0 and 1 and chance = 0.5") != [(0,)]
    assert q(results, "localization", "select count(*) from t where track = 'all' and flipped is not null") == [(0,)]
    assert q(results, "localization", "select count(*) from t where method = 'oracle' and k = n_truth "
                                      "and precision < 1") == [(0,)]
    assert q(results, "gradients", "select count(*) from t where aggregation = 'epoch' and control_norm > 0") \
        == [(2 * 3 * 4,)]


@pytest.mark.slow
def test_mlflow_has_parent_and_children(tiny_sweep):
    results, _ = tiny_sweep
    code = f"""
import json, mlflow
mlflow.set_tracking_uri("sqlite:///{results}/mlflow.db")
runs = mlflow.search_runs(experiment_names=["t1"], output_format="list")
parents = [r for r in runs if r.data.tags.get("memray.role") == "sweep"]
children = [r for r in runs if r.data.tags.get("memray.role") == "trial"]
c = mlflow.MlflowClient()
hist = c.get_metric_history(children[0].info.run_id, next(k for k in children[0].data.metrics if k.endswith("train_clean/accuracy") and not k.startswith("final")))
arts = sorted(a.path for ch in children for a in c.list_artifacts(ch.info.run_id, "figures"))
print(json.dumps({{"parents": len(parents), "children": len(children), "artifacts": arts,
  "status": sorted({{r.info.status for r in runs}}),
  "parent_ok": all(ch.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for ch in children),
  "steps": sorted(m.step for m in hist)}}))
"""
    out = json.loads(subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    figs = ["figures/flips.png", "figures/gradients.png", "figures/localization.png", "figures/retraining.png",
            "figures/rewinding.png"]
    assert out == {"parents": 1, "children": 2, "parent_ok": True, "steps": [1, 2, 3], "status": ["FINISHED"],
                   "artifacts": sorted(figs * 2 + ["figures/forgotten.png"])}
    # the artifacts live in the results store beside mlflow.db, not in the working directory
    assert len(list((results / "mlartifacts" / "t1").glob("*/artifacts/figures/*.png"))) == 2 * 5 + 1
    assert not (results.parent / "mlruns").exists()


def test_bad_input_exits_2_before_anything(tmp_path):
    p = run_cli("--noise", "0.1,1.5", "--results-dir", str(tmp_path / "r"))
    assert p.returncode == 2
    assert "data.noise_rate=1.5 is invalid: a number in [0, 1)" in p.stderr
    assert not (tmp_path / "r").exists()
    p = run_cli("--archs", "resnet50", "--datasets", "mnist1d", "--results-dir", str(tmp_path / "r"))
    assert p.returncode == 2 and "1-D signal" in p.stderr
    p = run_cli("--preset", "tiny", "--resume", "--name", "nope", "--results-dir", str(tmp_path / "r"))
    assert p.returncode == 2 and "no sweep named 'nope'" in p.stderr
    p = run_cli("--name", "../evil", "--results-dir", str(tmp_path / "r"))
    assert p.returncode == 2 and "sweep name '../evil' is invalid" in p.stderr
    assert not (tmp_path / "r").exists()


def test_paper_preset_dry_run():
    p = run_cli("--preset", "paper", "--dry-run")
    assert p.returncode == 0, p.stderr
    first = p.stdout.splitlines()[0]
    # 3 datasets x 3 archs x 3 noise x 3 seeds x (1 twin + 2 kinds x 3 p_gen x 3 p_mem)
    assert first.startswith(f"{3 * 3 * 3 * 3 * (1 + 2 * 9)} trials for sweep 'dropout_grid-paper'")
    assert '"dataset":"cifar10"' in p.stdout and '"epochs":100' in p.stdout


def test_default_preset_p_gen_per_arch_unless_given():
    from sweeps.dropout_grid import build_configs, parser

    def cells(*argv):
        return sorted({(c.model.arch, c.dropout.p_gen, c.dropout.p_mem)
                       for c in build_configs(parser().parse_args(["--preset", "default", *argv]))
                       if c.dropout.kind == "example_tied"})

    assert cells() == [("mlp", 0.2, 0.1), ("resnet9", 0.5, 0.1)]
    assert cells("--p-gen", "0.3") == [("mlp", 0.3, 0.1), ("resnet9", 0.3, 0.1)]
    configs = build_configs(parser().parse_args(["--preset", "default"]))
    assert len(configs) == 12 and {c.seed for c in configs} == {0, 1, 2}
    assert {c.protocol for c in configs} == {3}


def test_default_grid_starts_longest_trials_first():
    """The grid's trials start in decreasing estimated cost: resnet9 before mlp, and within an arch
    the ETD trials (two modes of analyses) before their plain twins."""
    from sweeps.dropout_grid import build_configs, parser

    order = [(c.model.arch, c.dropout.kind) for c in build_configs(parser().parse_args(["--preset", "default"]))]
    assert order == [("resnet9", "example_tied")] * 3 + [("resnet9", "none")] * 3 + \
        [("mlp", "example_tied")] * 3 + [("mlp", "none")] * 3


def test_p_gen_per_arch_follows_the_rule_fixed_in_advance():
    """The presets' p_gen per arch: the first candidate leaving >= 8 generalization units at every
    site of the default width (checked against the built models)."""
    import math

    from memray.models import build_model
    from sweeps.presets import P_GEN_BY_ARCH, P_GEN_RULE

    for arch, (p_gen,) in P_GEN_BY_ARCH.items():
        units = build_model(arch, {"mlp": 512, "resnet9": 16}[arch], (1, 8, 8), 10).site_units
        ok = [p for p in P_GEN_RULE["candidates"] if min(math.floor(p * u) for u in units) >= P_GEN_RULE["min_units"]]
        assert p_gen == ok[0], (arch, units, ok)


def test_the_sweep_driver_loads_no_torch_or_plotting():
    """The driver only plans trials and hands Tune the trainable: torch, memray's model code and
    matplotlib load in the trials' processes (about 2 s of start-up, and memory, saved per sweep)."""
    code = ("import sys, sweeps.dropout_grid, sweeps.dropout_search, sweeps.cli, sweeps.launch, sweeps.plan, "
            "trainables.trial, trainables.callbacks; print(sorted(m for m in ('torch', 'matplotlib', "
            "'memray.data', 'memray.train', 'memray.experiment', 'trainables.actors') if m in sys.modules))")
    p = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "[]"
    # nor does checking a grid that names no memorization scores (torch was 3 s of the driver's start)
    code = ("import sys; from sweeps.dropout_grid import build_configs, parser; from sweeps.cli import check_memscores; "
            "a = parser().parse_args(['--preset', 'default']); check_memscores(a, build_configs(a)); "
            "print('torch' in sys.modules)")
    assert subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
    p = run_cli("--preset", "paper", "--dry-run")
    assert p.returncode == 0 and re.match(r"\d+ trials for sweep 'dropout_grid-paper'; resources per trial: \[", p.stdout)


COMMANDS = ("sweeps.dropout_grid", "sweeps.dropout_search", "sweeps.memorization_scores", "analysis.findings",
            "analysis.query", "analysis.report", "analysis.sync_mlflow")


def test_every_command_exits_through_exiting():
    """Each command's `__main__` block returns its code through memray.exiting, which takes the
    imports' objects out of Python's last garbage collection (1.4 s of a sweep command's exit)."""
    import ast
    import gc
    import pathlib

    from memray.exiting import exiting

    try:
        assert exiting(2) == 2 and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0
    root = pathlib.Path(__file__).resolve().parents[1]
    for mod in COMMANDS:
        tree = ast.parse((root / f"{mod.replace('.', '/')}.py").read_text())
        blocks = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
        assert [ast.unparse(b) for b in blocks] == ["if __name__ == '__main__':\n    sys.exit(exiting(main()))"], mod
    found = {str(p.relative_to(root).with_suffix("")).replace("/", ".") for d in ("sweeps", "analysis")
             for p in (root / d).glob("*.py") if 'if __name__ == "__main__":' in p.read_text()}
    assert found == set(COMMANDS)


def test_analysis_loads_no_torch():
    """`analysis/` is arithmetic on table rows: importing every module of it loads no torch."""
    code = ("import importlib, pkgutil, sys, analysis\n"
            "for m in pkgutil.iter_modules(analysis.__path__): importlib.import_module('analysis.' + m.name)\n"
            "print(sorted(m for m in ('torch', 'memray.train', 'memray.experiment') if m in sys.modules))")
    p = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "[]"


def test_no_import_cycles():
    """The project's modules import each other top-down: no module imports one that imports it
    back, directly or through others, at module level or inside a function."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    packages = ("memray", "trainables", "sweeps", "analysis")
    graph = {}
    for path in root.glob("*/**/*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[0] not in packages:
            continue
        mod = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):  # imports inside functions count too
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
                    pkg = pkg[:len(pkg) - node.level + 1]
                    base = ".".join([*pkg, *([base] if base else [])])
                deps |= {base} | {f"{base}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[mod] = deps
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    assert "memray.experiment" in graph and "trainables.trial" in graph

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for d in graph[todo.pop()]:
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen

    cycles = sorted(m for m in graph if m in reach(m))
    assert cycles == []


@pytest.mark.parametrize("protocol", [1, 2])
def test_resuming_an_older_protocols_sweep_exits_2_and_names_it(tmp_path, protocol):
    """A sweep stored under protocol 1 (its grid file has no protocol) or 2 is not resumed or
    re-run under protocol 3: exit 2 before anything starts, the stored files untouched."""
    results = tmp_path / "r"
    grid = results / "sweeps" / "old.grid.json"
    grid.parent.mkdir(parents=True)
    stored = {"trial_keys": ["abc"], "spec": None, "preset": "tiny", "run_id": "x"}
    grid.write_text(json.dumps({**stored, **({"protocol": protocol} if protocol > 1 else {})}))
    before = sorted(p.name for p in results.rglob("*"))
    for extra in (["--resume"], []):
        p = run_cli("--preset", "tiny", "--name", "old", "--results-dir", str(results), *extra)
        assert p.returncode == 2
        assert f"sweep 'old'" in p.stderr and f"was run under protocol {protocol}; this code runs protocol 3" in p.stderr
    assert sorted(p.name for p in results.rglob("*")) == before and not (results / "ray").exists()


def test_noise_kind_axis_and_bad_values():
    from sweeps.dropout_grid import build_configs, parser

    configs = build_configs(parser().parse_args(["--preset", "tiny", "--noise-kind", "label,placebo"]))
    assert sorted((c.data.noise_kind, c.dropout.kind) for c in configs) == [
        ("label", "example_tied"), ("label", "none"), ("placebo", "example_tied"), ("placebo", "none")]
    assert len({c.trial_key for c in configs}) == 4
    p = run_cli("--preset", "tiny", "--noise-kind", "label,fake", "--dry-run")
    assert p.returncode == 2 and "data.noise_kind='fake' is invalid: one of ['label', 'placebo']" in p.stderr


@pytest.mark.parametrize("module", ["sweeps.dropout_grid", "sweeps.dropout_search"])
def test_bad_localize_flags_exit_2_naming_the_value(tmp_path, module):
    r = tmp_path / "r"
    p = run_cli("--localize-methods", "greedy,best", "--results-dir", str(r), module=module)
    assert p.returncode == 2 and "--localize-methods='greedy,best' is invalid: 'best' is not one of" in p.stderr
    p = run_cli("--localize-k", "8,0", "--results-dir", str(r), module=module)
    assert p.returncode == 2 and "--localize-k='8,0' is invalid: integers >= 1" in p.stderr
    p = run_cli("--localize-k", "8,x", "--results-dir", str(r), module=module)
    assert p.returncode == 2 and "--localize-k='8,x' is invalid: 'x' is not a int" in p.stderr
    assert not r.exists()
    if module == "sweeps.dropout_grid":
        from sweeps.dropout_grid import build_configs, parser

        c = build_configs(parser().parse_args(["--preset", "default", "--localize-methods", "zero_out,random",
                                               "--localize-k", "4"]))[0]
        assert c.analyses.localize_methods == ("zero_out", "random") and c.analyses.localize_k == (4,)


def test_search_storage_and_objective_alias(tmp_path):
    p = run_cli("--results-dir", "s3://bucket/memloc", module="sweeps.dropout_search")
    assert p.returncode == 2 and "--storage is required with --results-dir='s3://bucket/memloc'" in p.stderr
    # `localization` (the objective's old name) is an alias of etd_tradeoff
    p = run_cli("--objective", "localization", "--dry-run", "--results-dir", str(tmp_path / "r"),
                module="sweeps.dropout_search")
    assert p.returncode == 0 and "objective etd_tradeoff" in p.stdout
    assert not (tmp_path / "r").exists()
