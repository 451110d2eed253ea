import json

import pytest

from memray.config import ConfigError, ExperimentConfig


@pytest.mark.parametrize("path,value,needle", [
    ("data.dataset", "imagenet", "one of ['digits'"),
    ("model.arch", "resnet18", "one of ['mlp'"),
    ("data.noise_rate", 1.0, "[0, 1)"),
    ("data.noise_rate", -0.1, "[0, 1)"),
    ("dropout.p_gen", 0.0, "open interval (0, 1)"),
    ("dropout.p_gen", 1.0, "open interval (0, 1)"),
    ("dropout.p_mem", 1.5, "open interval (0, 1)"),
    ("optim.epochs", 0, "an integer >= 1"),
    ("model.width", 0, "a positive integer"),
    ("model.width", -3, "a positive integer"),
    ("dropout.kind", "gaussian", "one of ['none', 'standard', 'example_tied']"),
    ("analyses.run", ["gradients", "probe"], "distinct names from"),
])
def test_bad_values_name_field_value_and_allowed(path, value, needle):
    with pytest.raises(ConfigError) as e:
        ExperimentConfig().replace(**{path: value})
    msg = str(e.value)
    assert msg.startswith(f"{path}={value!r} is invalid"), msg
    assert needle in msg


def test_incompatible_dataset_arch_pair_is_rejected():
    with pytest.raises(ConfigError, match=r"model.arch='resnet50' is invalid: dataset 'mnist1d' is a 1-D signal"):
        ExperimentConfig().replace(**{"data.dataset": "mnist1d", "model.arch": "resnet50"})


def test_unknown_keys_are_errors():
    with pytest.raises(ConfigError, match=r"data.noise=0.1 is invalid: unknown field"):
        ExperimentConfig.from_dict({"data": {"noise": 0.1}})
    with pytest.raises(ConfigError, match="unknown key"):
        ExperimentConfig.from_dict({"lr": 0.1})


def test_canonical_json_and_trial_key_are_stable():
    a = ExperimentConfig.from_dict({"model": {"arch": "lenet"}, "seed": 3})
    b = ExperimentConfig.from_dict({"seed": 3, "model": {"arch": "lenet", "width": None}})
    assert a.canonical_json() == b.canonical_json()
    assert a.trial_key == b.trial_key and len(a.trial_key) == 12
    assert a.replace(seed=4).trial_key != a.trial_key
    # round trip through JSON gives the same key
    assert ExperimentConfig.from_dict(json.loads(a.canonical_json())).trial_key == a.trial_key
    # the key is pinned: changing the canonical form on purpose must update this
    assert ExperimentConfig().canonical_json().startswith('{"analyses":{')


def test_flat_view():
    flat = ExperimentConfig().flat()
    assert flat["data.dataset"] == "digits" and flat["seed"] == 0 and flat["optim.epochs"] == 60


def test_adding_a_localization_method_changes_only_the_keys_of_trials_that_localize(monkeypatch):
    """The fields of an analysis a trial does not run are left out of its key; a trial that runs
    it keeps its full settings there (ARCHITECTURE.md, trial_key)."""
    from memray import config as C

    def key(run, methods):
        return ExperimentConfig.from_dict({"analyses": {"run": run, "localize_methods": methods}}).trial_key

    old = list(C.LOCALIZE_METHODS)
    monkeypatch.setattr(C, "LOCALIZE_METHODS", (*C.LOCALIZE_METHODS, "new_method"))  # the registry grows
    new = [*old, "new_method"]
    for run in (["flip"], ["gradients", "rewind", "retrain", "flip"], []):
        assert key(run, old) == key(run, new), run
    for run in (["localize"], ["flip", "localize"]):
        assert key(run, old) != key(run, new), run
    cfg = ExperimentConfig.from_dict({"analyses": {"run": ["flip"]}})
    canon = json.loads(cfg.canonical_json())["analyses"]
    assert "flip_budget" in canon and "localize_methods" not in canon and "retrain_lr" not in canon
    assert cfg.protocol == 3
