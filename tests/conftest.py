import os

import pytest
import torch

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def digits():
    from memray.config import DataConfig
    from memray.data import load_data

    return load_data(DataConfig(dataset="digits", noise_rate=0.1))


def small_cfg(**changes):
    """A fast config: dotted keys override, e.g. small_cfg(**{"model.arch": "lenet"})."""
    from memray.config import ExperimentConfig

    base = ExperimentConfig().replace(**{"optim.epochs": 2, "analyses.run": []})
    return base.replace(**changes) if changes else base
