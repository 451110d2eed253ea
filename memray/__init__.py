"""memray: localizing memorization in neural networks (Maini et al., ICML 2023), in pure PyTorch.

Reads top-down: `config` (one validated config tree), `data` (datasets with label noise), `sites`
(the per-example unit-mask mechanism), `models`, `dropout` (example-tied and standard), `train`,
then the probes: `probes.gradients`, `probes.rewinding`, `probes.retraining`, `probes.flips`.
No Ray import anywhere in this package.
"""
from .config import ConfigError, ExperimentConfig

__all__ = ["ConfigError", "ExperimentConfig"]
