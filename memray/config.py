"""One typed, validated config tree for a trial.

`ExperimentConfig` holds everything that decides a trial's numbers: data, model, dropout,
optimisation, analyses and seed. Paths and resources are *not* part of it (they live in the
runtime layer), so the `trial_key` -- a short hash of the canonical JSON form -- is the same for
the same science wherever it runs.

Every user-facing mistake raises `ConfigError` naming the field, the bad value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

# ----------------------------------------------------------------------------- vocab
DATASETS = ("digits", "mnist1d", "mnist5k", "mnist", "fashion_mnist", "cifar10", "cifar100", "svhn")
OFFLINE_DATASETS = ("digits", "mnist1d", "mnist5k")
ONE_D_DATASETS = ("mnist1d",)
ARCHS = ("mlp", "lenet", "resnet9", "resnet50", "vit_small")
# arch -> datasets with a 1-D signal it cannot take (ResNet-50 is defined for images only).
ARCH_REJECTS_1D = ("resnet50",)
DROPOUT_KINDS = ("none", "standard", "example_tied")
NOISE_KINDS = ("label", "placebo")  # placebo: the "noisy" examples keep their true labels
PROTOCOL = 3  # EXPERIMENTS.md's version: results of different protocols are never pooled
# Fields added after protocol 2: left out of the canonical form (so of the trial key) while they
# hold these defaults, so adding one keeps every existing key.
OMIT_AT_DEFAULT: dict[tuple[str, str], Any] = {("analyses", "memscores"): None, ("analyses", "rare_threshold"): 0.25}
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # sweep names (memray.tables.check_name)
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("onecycle", "triangle", "cosine", "step", "constant")
ANALYSES = ("gradients", "rewind", "retrain", "flip", "localize")
# localization methods (section 7): the methods, the leak controls (mask_only, class_mean, random) and
# the oracle (the target's own mask: a plumbing check and the ceiling of the log-prob fall)
LOCALIZE_METHODS = ("greedy", "random", "mask_only", "class_mean", "oracle", "zero_out", "grad_x_act",
                    "integrated_gradients", "activation", "slimming")
LOCALIZE_TRACKS = ("decoy", "all")
# analyses.* fields and the analyses that read them: a trial that runs none of those leaves the
# field out of its canonical form (so adding a localization method keeps the keys of trials
# without `localize`); a trial that runs one keeps the field's full value in its key
FIELD_USERS: dict[str, tuple[str, ...]] = {
    "snapshot_thresholds": ("rewind",), "snapshot_epochs": ("rewind", "retrain"),
    **{f: ("retrain",) for f in ("retrain_epoch", "retrain_lr", "retrain_weight_decay", "retrain_max_epochs",
                                "retrain_patience")},
    **{f: ("flip",) for f in ("flip_targets", "flip_budget", "flip_reference", "flip_targets_per_batch",
                             "flip_sites")},
    "eval_samples": ("flip", "localize"),
    **{f: ("localize",) for f in ("localize_methods", "localize_tracks", "localize_k", "localize_targets",
                                 "localize_reference", "localize_budget", "ig_steps")},
}
DEFAULT_WIDTH = {"mlp": 512, "lenet": 16, "resnet9": 16, "resnet50": 64, "vit_small": 64}
# Evaluation modes (EXPERIMENTS.md section 5: `plain` without ETD; `own`, `all`, `drop` with it) and
# subsets: the `evals` table's `mode` and `subset` values. Metric names are `metric_key(mode, subset)`.
MODES = ("plain", "own", "all", "drop")
ETD_MODES = ("own", "all", "drop")
SUBSETS = ("train_clean", "train_noisy", "train_noisy_true", "test")


def metric_key(mode: str, subset: str) -> str:
    """The name of an accuracy metric in Tune results, MLflow and the sweep summary."""
    return f"{mode}/{subset}/accuracy"


def parse_metric_key(key: str) -> tuple[str, str] | None:
    """(mode, subset) of an accuracy metric name, or None for any other name."""
    parts = key.split("/")
    if len(parts) == 3 and parts[0] in MODES and parts[1] in SUBSETS and parts[2] == "accuracy":
        return parts[0], parts[1]
    return None


class ConfigError(ValueError):
    """A user-caused config mistake: names the field, the value and what is allowed."""

    def __init__(self, field_name: str, value: Any, allowed: str):
        self.field = field_name
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field_name}={value!r} is invalid: {allowed}")


def _require(ok: bool, field_name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(field_name, value, allowed)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ----------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"
    noise_rate: float = 0.1  # fraction of training labels replaced by a different class
    data_seed: int = 0  # chooses the noisy examples and their wrong labels
    noise_kind: str = "label"  # label: wrong labels; placebo: the same examples keep their labels
    train_limit: int | None = None  # keep only the first N training examples (quick checks)
    augment: bool = False  # on-device random crop + flip (images); off for memorization runs

    def validate(self) -> None:
        _require(self.dataset in DATASETS, "data.dataset", self.dataset, f"one of {list(DATASETS)}")
        _require(_is_num(self.noise_rate) and 0 <= self.noise_rate < 1,
                 "data.noise_rate", self.noise_rate, "a number in [0, 1)")
        _require(self.noise_kind in NOISE_KINDS, "data.noise_kind", self.noise_kind, f"one of {list(NOISE_KINDS)}")
        _require(isinstance(self.data_seed, int), "data.data_seed", self.data_seed, "an integer")
        _require(self.train_limit is None or (isinstance(self.train_limit, int)
                                              and self.train_limit >= 10),
                 "data.train_limit", self.train_limit, "null or an integer >= 10")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "mlp"
    width: int | None = None  # arch-specific base width (see memray.models); None = default

    def validate(self) -> None:
        _require(self.arch in ARCHS, "model.arch", self.arch, f"one of {list(ARCHS)}")
        _require(self.width is None or (isinstance(self.width, int) and not isinstance(self.width, bool)
                                        and self.width > 0),
                 "model.width", self.width, "a positive integer (or null for the arch default)")

    @property
    def resolved_width(self) -> int:
        return self.width if self.width is not None else DEFAULT_WIDTH[self.arch]


@dataclass(frozen=True)
class DropoutConfig:
    kind: str = "none"
    p_gen: float = 0.2  # fraction of each site's units that are generalization units
    p_mem: float = 0.1  # each example's keep probability for each memorization unit
    sites: tuple[int, ...] | None = None  # site indices (None = every site of the model)
    mask_seed: int = 0
    rate: float | None = None  # standard dropout's drop rate; None = match ETD's keep rate

    def validate(self) -> None:
        _require(self.kind in DROPOUT_KINDS, "dropout.kind", self.kind, f"one of {list(DROPOUT_KINDS)}")
        _require(_is_num(self.p_gen) and 0 < self.p_gen < 1, "dropout.p_gen", self.p_gen,
                 "a number in the open interval (0, 1)")
        _require(_is_num(self.p_mem) and 0 < self.p_mem < 1, "dropout.p_mem", self.p_mem,
                 "a number in the open interval (0, 1)")
        _require(self.rate is None or (_is_num(self.rate) and 0 <= self.rate < 1),
                 "dropout.rate", self.rate, "null or a number in [0, 1)")
        if self.sites is not None:
            _require(len(self.sites) > 0 and all(isinstance(s, int) and s >= 0 for s in self.sites)
                     and len(set(self.sites)) == len(self.sites),
                     "dropout.sites", self.sites, "null (every site) or distinct site indices >= 0")

    @property
    def keep_rate(self) -> float:
        """Expected fraction of a site's units kept in training under ETD: p_gen + (1-p_gen) p_mem."""
        return self.p_gen + (1 - self.p_gen) * self.p_mem

    @property
    def standard_rate(self) -> float:
        return self.rate if self.rate is not None else 1.0 - self.keep_rate


@dataclass(frozen=True)
class OptimConfig:
    # Defaults: the offline-dataset recipe, chosen so that a plain mlp on digits memorizes all of
    # its 10% noisy labels (measured: train_noisy 1.00, test 0.935, 60 epochs in ~13 s on 2 CPU
    # cores). The `paper` preset sets the authors' recipe (lr 0.1, weight decay 5e-4, batch 512).
    optimizer: str = "sgd"
    lr: float = 0.05  # peak learning rate
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 64
    epochs: int = 60
    schedule: str = "onecycle"
    warmup_frac: float = 0.2  # onecycle/triangle: fraction of steps rising to the peak

    def validate(self) -> None:
        _require(self.optimizer in OPTIMIZERS, "optim.optimizer", self.optimizer, f"one of {list(OPTIMIZERS)}")
        _require(_is_num(self.lr) and self.lr > 0, "optim.lr", self.lr, "a number > 0")
        _require(_is_num(self.momentum) and 0 <= self.momentum < 1, "optim.momentum", self.momentum,
                 "a number in [0, 1)")
        _require(_is_num(self.weight_decay) and self.weight_decay >= 0, "optim.weight_decay",
                 self.weight_decay, "a number >= 0")
        _require(isinstance(self.batch_size, int) and self.batch_size >= 1, "optim.batch_size",
                 self.batch_size, "an integer >= 1")
        _require(isinstance(self.epochs, int) and not isinstance(self.epochs, bool) and self.epochs >= 1,
                 "optim.epochs", self.epochs, "an integer >= 1")
        _require(self.schedule in SCHEDULES, "optim.schedule", self.schedule, f"one of {list(SCHEDULES)}")
        _require(_is_num(self.warmup_frac) and 0 <= self.warmup_frac < 1, "optim.warmup_frac",
                 self.warmup_frac, "a number in [0, 1)")


@dataclass(frozen=True)
class AnalysisConfig:
    """Which analyses run, and their budgets (EXPERIMENTS.md sections 1-4)."""

    run: tuple[str, ...] = ANALYSES
    # Weight snapshots for rewinding (section 2): epoch 0, the first epoch whose train_noisy (mode
    # `own` for ETD) reaches each threshold, the final epoch, and these fixed epochs.
    snapshot_thresholds: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75)
    snapshot_epochs: tuple[int, ...] = ()
    retrain_epoch: int = 0  # snapshot a group is rewound to before retraining
    # retraining (section 3), the authors' budget: SGD momentum 0.9, a triangle to this peak lr
    retrain_lr: float = 0.01
    retrain_weight_decay: float = 5e-4
    retrain_max_epochs: int = 20
    retrain_patience: int = 3  # stop once clean train accuracy has been 100% in this many epochs
    flip_targets: int = 32  # noisy targets (and as many clean ones)
    flip_budget: int = 64  # most units zeroed per target
    flip_reference: int = 64  # clean reference batch size
    flip_targets_per_batch: int = 64  # targets searched together (1: one at a time)
    flip_sites: tuple[int, ...] | None = None  # sites whose units may be zeroed (None: all)
    eval_samples: int = 512  # fixed sample size per subset for post-edit accuracies
    # localization methods (section 7), scored against ETD's truth in each track (decoy, all)
    localize_methods: tuple[str, ...] = LOCALIZE_METHODS
    localize_tracks: tuple[str, ...] = LOCALIZE_TRACKS
    localize_k: tuple[int, ...] = (8, 32)  # fixed k for precision@k (k = |truth| is always scored)
    localize_targets: int = 16  # noisy targets (and as many clean ones)
    localize_reference: int = 32  # reference batch R
    localize_budget: int = 64  # most units zeroed in rank order when counting units to flip
    ig_steps: int = 32  # integrated gradients' trapezoid intervals (>= 16)
    # memorization scores (section 8): the scoring sweep whose `memscores` this trial uses (rare
    # flip and localization targets; findings 5b and 8a-8b), and the score from which a clean
    # example is rare
    memscores: str | None = None
    rare_threshold: float = 0.25

    def validate(self) -> None:
        _require(all(a in ANALYSES for a in self.run) and len(set(self.run)) == len(self.run),
                 "analyses.run", list(self.run), f"distinct names from {list(ANALYSES)} (or empty)")
        _require(self.flip_sites is None or (len(self.flip_sites) > 0 and all(
                     isinstance(x, int) and x >= 0 for x in self.flip_sites)), "analyses.flip_sites",
                 self.flip_sites, "null (every site) or a non-empty list of site indices >= 0")
        _require(all(isinstance(e, int) and e >= 0 for e in self.snapshot_epochs),
                 "analyses.snapshot_epochs", list(self.snapshot_epochs), "a list of epochs >= 0")
        _require(all(_is_num(t) and 0 < t <= 1 for t in self.snapshot_thresholds),
                 "analyses.snapshot_thresholds", list(self.snapshot_thresholds), "numbers in (0, 1]")
        _require(self.retrain_epoch == 0 or self.retrain_epoch in self.snapshot_epochs, "analyses.retrain_epoch",
                 self.retrain_epoch, f"0 or one of the fixed snapshot epochs {list(self.snapshot_epochs)}")
        _require(_is_num(self.retrain_weight_decay) and self.retrain_weight_decay >= 0,
                 "analyses.retrain_weight_decay", self.retrain_weight_decay, "a number >= 0")
        _require(len(self.localize_methods) > 0 and all(m in LOCALIZE_METHODS for m in self.localize_methods)
                 and len(set(self.localize_methods)) == len(self.localize_methods), "analyses.localize_methods",
                 list(self.localize_methods), f"distinct names from {list(LOCALIZE_METHODS)}")
        _require(len(self.localize_tracks) > 0 and all(t in LOCALIZE_TRACKS for t in self.localize_tracks)
                 and len(set(self.localize_tracks)) == len(self.localize_tracks), "analyses.localize_tracks",
                 list(self.localize_tracks), f"distinct names from {list(LOCALIZE_TRACKS)}")
        _require(len(self.localize_k) > 0 and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1
                                                  for k in self.localize_k), "analyses.localize_k",
                 list(self.localize_k), "a non-empty list of integers >= 1")
        _require(isinstance(self.ig_steps, int) and self.ig_steps >= 16, "analyses.ig_steps", self.ig_steps,
                 "an integer >= 16 (the trapezoid rule's error)")
        for name in ("retrain_max_epochs", "retrain_patience", "flip_targets", "flip_reference",
                     "flip_targets_per_batch", "eval_samples", "localize_targets", "localize_reference",
                     "localize_budget"):
            v = getattr(self, name)
            _require(isinstance(v, int) and v >= 1, f"analyses.{name}", v, "an integer >= 1")
        _require(isinstance(self.flip_budget, int) and self.flip_budget >= 1, "analyses.flip_budget",
                 self.flip_budget, "an integer >= 1")
        _require(_is_num(self.retrain_lr) and self.retrain_lr > 0, "analyses.retrain_lr",
                 self.retrain_lr, "a number > 0")
        _require(self.memscores is None or (isinstance(self.memscores, str) and bool(NAME_PATTERN.match(self.memscores))
                                            and ".." not in self.memscores), "analyses.memscores", self.memscores,
                 "null or a scoring sweep's name (letters, digits, '_', '-', '.')")
        _require(_is_num(self.rare_threshold) and 0 < self.rare_threshold <= 1, "analyses.rare_threshold",
                 self.rare_threshold, "a number in (0, 1]")


@dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dropout: DropoutConfig = field(default_factory=DropoutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    analyses: AnalysisConfig = field(default_factory=AnalysisConfig)
    seed: int = 0  # model init, batch order, dropout draws
    eval_every: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    protocol: int = PROTOCOL  # EXPERIMENTS.md's version these numbers follow (part of the key)

    # -- validation -------------------------------------------------------------------------
    def validate(self) -> "ExperimentConfig":
        self.data.validate()
        self.model.validate()
        self.dropout.validate()
        self.optim.validate()
        self.analyses.validate()
        _require(isinstance(self.seed, int), "seed", self.seed, "an integer")
        _require(self.protocol == PROTOCOL, "protocol", self.protocol,
                 f"{PROTOCOL} (this code runs EXPERIMENTS.md's protocol {PROTOCOL}; results of another "
                 f"protocol are read, never re-run or pooled)")
        _require(isinstance(self.eval_every, int) and self.eval_every >= 1, "eval_every",
                 self.eval_every, "an integer >= 1")
        if self.data.dataset in ONE_D_DATASETS and self.model.arch in ARCH_REJECTS_1D:
            raise ConfigError("model.arch", self.model.arch,
                              f"dataset {self.data.dataset!r} is a 1-D signal; {self.model.arch} takes "
                              f"2-D images only (use one of {[a for a in ARCHS if a not in ARCH_REJECTS_1D]})")
        return self

    # -- canonical form and key -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def canonical_json(self) -> str:
        d = self.to_dict()
        for (section, name), default in OMIT_AT_DEFAULT.items():
            if d[section].get(name) == default:
                del d[section][name]
        run = set(self.analyses.run)
        for name, users in FIELD_USERS.items():  # settings of analyses this trial does not run
            if not run & set(users):
                del d["analyses"][name]
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @property
    def trial_key(self) -> str:
        """Short stable hash of the canonical config: same science, same key."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:12]

    @property
    def run_name(self) -> str:
        """A name a person can scan (MLflow's run name): dataset, arch (and a non-default width),
        dropout and its p's, noise rate and kind, seed; e.g. digits-mlp-etd-pg0.2-pm0.1-n0.1-s0,
        digits-mlp-plain-n0.1placebo-s0. Not unique across recipes: the trial_key is."""
        d, m, dr = self.data, self.model, self.dropout
        arch = m.arch + (f"{m.width}" if m.width is not None and m.width != DEFAULT_WIDTH[m.arch] else "")
        drop = {"none": "plain", "example_tied": f"etd-pg{dr.p_gen:g}-pm{dr.p_mem:g}",
                "standard": f"dropout-r{dr.standard_rate:.3g}"}[dr.kind]
        noise = f"n{d.noise_rate:g}" + ("placebo" if d.noise_kind == "placebo" else "")
        return f"{d.dataset}-{arch}-{drop}-{noise}-s{self.seed}"

    def flat(self) -> dict[str, Any]:
        """Flattened `section.field` view (MLflow params, table columns)."""
        out: dict[str, Any] = {}
        for k, v in self.to_dict().items():
            if isinstance(v, dict):
                for k2, v2 in v.items():
                    out[f"{k}.{k2}"] = v2
            else:
                out[k] = v
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExperimentConfig":
        """Build and validate from a nested dict; unknown keys are errors, missing keys default."""
        if not isinstance(d, dict):
            raise ConfigError("config", d, "a mapping")
        sections = {"data": DataConfig, "model": ModelConfig, "dropout": DropoutConfig,
                    "optim": OptimConfig, "analyses": AnalysisConfig}
        scalars = {"seed", "eval_every", "protocol"}
        kwargs: dict[str, Any] = {}
        for k, v in d.items():
            if k in sections:
                kwargs[k] = _build_section(k, sections[k], v)
            elif k in scalars:
                kwargs[k] = v
            else:
                raise ConfigError(k, v, f"unknown key; allowed: {sorted(list(sections) + list(scalars))}")
        return cls(**kwargs).validate()

    def replace(self, **changes: Any) -> "ExperimentConfig":
        """Copy with dotted-path changes, e.g. replace(**{"optim.epochs": 3})."""
        d = self.to_dict()
        for path, v in changes.items():
            parts = path.split(".")
            node = d
            for p in parts[:-1]:
                node = node[p]
            node[parts[-1]] = v
        return ExperimentConfig.from_dict(d)


@dataclass(frozen=True)
class ScoreConfig:
    """One trial of a memorization-score sweep (EXPERIMENTS.md section 8): models `first` ..
    `first + count - 1` of the sweep, each trained with one fixed recipe (no ETD: SGD with momentum,
    a one-cycle schedule) on its seeded subset holding `subset_fraction` of the
    training set. Model k's subset, initialisation and data order come from its seed
    (`memray.memscores.model_seeds(k, seed)`), so a trial stores only seeds and predictions. The
    sweep's K is not part of a trial: the same models are the same trials in any sweep."""

    data: DataConfig = field(default_factory=DataConfig)
    arch: str = "mlp"
    width: int | None = None
    epochs: int = 60
    lr: float = 0.05  # peak of the one-cycle schedule
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 64
    subset_fraction: float = 0.7
    first: int = 0
    count: int = 16
    seed: int = 0  # base of the model seeds
    protocol: int = PROTOCOL

    def validate(self) -> "ScoreConfig":
        self.data.validate()
        ModelConfig(self.arch, self.width).validate()
        _require(not self.data.augment, "data.augment", self.data.augment, "false (scores use one fixed recipe)")
        _require(_is_num(self.subset_fraction) and 0 < self.subset_fraction < 1, "subset_fraction",
                 self.subset_fraction, "a number in the open interval (0, 1)")
        for name, low in (("epochs", 1), ("batch_size", 1), ("first", 0), ("count", 1)):
            v = getattr(self, name)
            _require(isinstance(v, int) and not isinstance(v, bool) and v >= low, name, v, f"an integer >= {low}")
        _require(_is_num(self.lr) and self.lr > 0, "lr", self.lr, "a number > 0")
        _require(_is_num(self.momentum) and 0 <= self.momentum < 1, "momentum", self.momentum, "a number in [0, 1)")
        _require(_is_num(self.weight_decay) and self.weight_decay >= 0, "weight_decay", self.weight_decay,
                 "a number >= 0")
        _require(isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0, "seed", self.seed,
                 "an integer >= 0")
        _require(self.protocol == PROTOCOL, "protocol", self.protocol, f"{PROTOCOL}")
        if self.data.dataset in ONE_D_DATASETS and self.arch in ARCH_REJECTS_1D:
            raise ConfigError("arch", self.arch, f"dataset {self.data.dataset!r} is a 1-D signal")
        return self

    @property
    def resolved_width(self) -> int:
        return self.width if self.width is not None else DEFAULT_WIDTH[self.arch]

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def canonical_json(self) -> str:
        return json.dumps({"kind": "memscores", **self.to_dict()}, sort_keys=True, separators=(",", ":"))

    @property
    def trial_key(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ScoreConfig":
        if not isinstance(d, dict):
            raise ConfigError("config", d, "a mapping")
        allowed = {f.name for f in fields(cls)}
        for k, v in d.items():
            if k not in allowed:
                raise ConfigError(k, v, f"unknown key; allowed: {sorted(allowed)}")
        kwargs = dict(d)
        if "data" in kwargs:
            kwargs["data"] = _build_section("data", DataConfig, kwargs["data"])
        return cls(**kwargs).validate()


def _build_section(name: str, klass: type, v: Any) -> Any:
    if not isinstance(v, dict):
        raise ConfigError(name, v, "a mapping of fields")
    allowed = {f.name: f for f in fields(klass)}
    out = {}
    for k, x in v.items():
        if k not in allowed:
            raise ConfigError(f"{name}.{k}", x, f"unknown field; allowed: {sorted(allowed)}")
        if isinstance(x, list):
            x = tuple(x)
        out[k] = x
    return klass(**out)


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
