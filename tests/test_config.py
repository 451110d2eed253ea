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
