"""The real-MNIST presets (mnist5k at 28x28): their grids as the pilot rule fixed them, and
seconds-long runs of each preset's own trials (the presets themselves take minutes to hours)."""
import copy
import json
import math

from memray.config import ExperimentConfig
from memray.data import load_data
from memray.experiment import run_trial
from memray.models import build_model
from sweeps.dropout_grid import build_configs, parser
from sweeps.presets import P_GEN_RULE, PRESETS

from .conftest import run_cli


def _configs(preset: str) -> list[ExperimentConfig]:
    return build_configs(parser().parse_args(["--preset", preset]))


def test_mnist_preset_is_the_pilot_rules_grid():
    cs = _configs("mnist")
    assert len(cs) == 12
    got = {(c.model.arch, c.model.width, c.dropout.kind, c.optim.epochs, c.optim.lr) for c in cs}
    assert got == {("mlp", 512, "none", 30, 0.05), ("mlp", 512, "example_tied", 30, 0.05),
                   ("lenet", 40, "none", 50, 0.05), ("lenet", 40, "example_tied", 50, 0.05)}
    for c in cs:  # the authors' recipe, 10% label noise on mnist5k, seeds 0-2
        assert (c.data.dataset, c.data.noise_rate, c.optim.momentum, c.optim.weight_decay, c.optim.schedule,
                c.optim.batch_size) == ("mnist5k", 0.1, 0.9, 5e-4, "cosine", 128)
        if c.dropout.kind == "example_tied":
            assert (c.dropout.p_gen, c.dropout.p_mem) == (0.2, 0.1)
    assert sorted({c.seed for c in cs}) == [0, 1, 2]
    # p_gen 0.2 keeps 8 generalization units at every site of lenet 40 (and none fewer than 8)
    units = build_model("lenet", 40, (1, 28, 28), 10).site_units
    assert min(math.floor(0.2 * u) for u in units) == P_GEN_RULE["min_units"]
    assert min(math.floor(0.2 * u) for u in build_model("lenet", 35, (1, 28, 28), 10).site_units) < 8


def test_explicit_flags_override_the_presets_per_arch_recipe():
    cs = build_configs(parser().parse_args(["--preset", "mnist", "--lr", "0.2", "--widths", "64"]))
    assert {(c.model.width, c.optim.lr) for c in cs} == {(64, 0.2)}


def test_mnist_resnet9_dry_run_names_the_authors_resnet9():
    p = run_cli("--preset", "mnist-resnet9", "--dry-run")
    assert p.returncode == 0, p.stderr
    assert "6 trials for sweep 'dropout_grid-mnist-resnet9'" in p.stdout
    cfgs = [json.loads(line.split(None, 1)[1]) for line in p.stdout.splitlines() if line.startswith("  ")]
    assert {(c["model"]["arch"], c["model"]["width"], c["data"]["dataset"]) for c in cfgs} == {("resnet9", 64, "mnist5k")}


def _seconds_long(c: ExperimentConfig, n: int, analyses: dict) -> ExperimentConfig:
    d = copy.deepcopy(c.to_dict())
    d["data"]["train_limit"], d["optim"]["epochs"] = n, 2
    d["analyses"].update(analyses)
    return ExperimentConfig.from_dict(d)


def test_seconds_long_runs_of_both_presets_trials():
    """An ETD trial of each preset (28x28 inputs through every site), on a few hundred examples and
    2 epochs: mnist's mlp with flips and localization in both tracks, mnist-resnet9 (width 64)
    training only."""
    mlp = next(c for c in _configs("mnist") if c.model.arch == "mlp" and c.dropout.kind == "example_tied")
    small = {"run": ["flip", "localize"], "flip_targets": 2, "flip_budget": 8, "flip_reference": 16,
             "eval_samples": 64, "localize_targets": 2, "localize_reference": 8, "localize_budget": 8,
             "localize_k": [4], "ig_steps": 16, "localize_methods": ["grad_x_act", "mask_only", "oracle"]}
    cfg = _seconds_long(mlp, 400, small)
    out = run_trial(cfg, load_data(cfg.data))
    assert 0.0 <= out["final"]["own/train_noisy/accuracy"] <= 1.0 and len(out["tables"]["example_stats"]) == 400
    tracks = {r["track"] for r in out["tables"]["localization"]}
    assert tracks == {"decoy", "all"} and out["tables"]["flips"]
    r9 = next(c for c in _configs("mnist-resnet9") if c.dropout.kind == "example_tied")
    cfg = _seconds_long(r9, 128, {"run": []})
    out = run_trial(cfg, load_data(cfg.data))
    assert cfg.model.width == 64 and len(out["tables"]["example_stats"]) == 128
    assert 0.0 <= out["final"]["all/test/accuracy"] <= 1.0
