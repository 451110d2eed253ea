"""Where the datasets' files come from: the torchvision datasets' files under the data dir, the
data dir itself, `--download`. No torch import here (the sweep driver checks datasets with it
before any trial starts); torchvision is imported only to open or fetch its files.
"""
from __future__ import annotations

import os
from pathlib import Path


class DatasetMissing(FileNotFoundError):
    """A dataset that needs files which are not there; the message says how to get them."""


# torchvision: name -> (class name, expected sub-path under the data dir, classes)
TORCHVISION = {
    "mnist": ("MNIST", "MNIST/raw", 10),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST/raw", 10),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", 10),
    "cifar100": ("CIFAR100", "cifar-100-python", 100),
    "svhn": ("SVHN", "train_32x32.mat + test_32x32.mat", 10),
}
# Tests swap entries here for subclasses that skip torchvision's MD5 checks on tiny files.
TORCHVISION_CLASSES: dict[str, type] = {}


def _tv_class(name: str) -> type:
    if name in TORCHVISION_CLASSES:
        return TORCHVISION_CLASSES[name]
    import torchvision.datasets as tvd

    return getattr(tvd, TORCHVISION[name][0])


def _open_tv(name: str, root: Path, train: bool, download: bool):
    cls = _tv_class(name)
    kw = {"split": "train" if train else "test"} if name == "svhn" else {"train": train}
    try:
        return cls(str(root), download=download, **kw)
    except RuntimeError as e:
        raise DatasetMissing(
            f"dataset {name!r} not found under {root} (expected {TORCHVISION[name][1]}): "
            f"run with --download to fetch it, or pass --data-dir pointing at a folder that holds it"
            f" [{e}]") from None


def prepare(name: str, root: str | os.PathLike, download: bool = False) -> None:
    """Fetch a torchvision dataset once, under a file lock (safe with many processes)."""
    if name not in TORCHVISION:
        return
    from filelock import FileLock

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{name}.lock")):
        for train in (True, False):
            _open_tv(name, root, train, download)


def default_data_dir() -> Path:
    return Path(os.environ.get("MEMRAY_DATA_DIR", Path.home() / ".cache" / "memray" / "data"))
