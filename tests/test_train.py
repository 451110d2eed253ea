
import subprocess
import sys

import pytest
import torch

from memray.config import ExperimentConfig
from memray.data import load_data
from memray.train import Diverged, Trainer, load_state, save_state

from .conftest import small_cfg


def _final(tr):
    return {(r["mode"], r["subset"]): (r["accuracy"], r["loss"]) for r in tr.history if r["epoch"] == tr.epoch}


def test_same_config_same_metrics(digits):
    cfg = small_cfg(**{"dropout.kind": "standard"})
    a, b = Trainer(cfg, digits, "cpu"), Trainer(cfg, digits, "cpu")
    a.fit(), b.fit()
    assert a.history == b.history
    assert all(torch.equal(a.model.state_dict()[k], b.model.state_dict()[k]) for k in a.model.state_dict())


@pytest.mark.parametrize("kind,arch", [("none", "resnet9"), ("standard", "resnet9"), ("example_tied", "resnet9"),
                                       ("example_tied", "mlp")])
def test_resume_mid_run_matches_uninterrupted(digits, tmp_path, kind, arch):
    """resnet9's batch norm keeps gradient accounting on one forward per batch; the mlp splits it."""
    cfg = small_cfg(**{"optim.epochs": 4, "dropout.kind": kind, "analyses.run": ["gradients"],
                       "model.arch": arch, "model.width": 8})
    full = Trainer(cfg, digits, "cpu")
    full.fit()
    first = Trainer(cfg, digits, "cpu")
    first.run_epoch(), first.run_epoch()
    save_state(first.state_dict(), tmp_path / "ck.pt")
    del first
    resumed = Trainer(cfg, digits, "cpu")
    resumed.load_state_dict(load_state(tmp_path / "ck.pt"))
    assert resumed.epoch == 2
    resumed.fit()
    assert resumed.history == full.history
    assert resumed.grad_rows == full.grad_rows
    assert all(torch.equal(resumed.model.state_dict()[k], full.model.state_dict()[k]) for k in full.model.state_dict())
    # the free proxy: a resumed trial's per-example statistics are the uninterrupted one's
    assert resumed.example_stats() == full.example_stats()


@pytest.mark.parametrize("kind", ["standard", "example_tied"])
def test_gradient_accounting_leaves_training_unchanged(digits, kind):
    """Where accounting splits each batch into its noisy, control and other examples (no layer
    couples a batch's examples), the weights after two epochs are those of plain training with the
    same batches and masks (to float rounding: the parts' passes add in another order)."""
    cfg = small_cfg(**{"optim.epochs": 2, "dropout.kind": kind, "model.arch": "lenet", "model.width": 8})
    plain = Trainer(cfg, digits, "cpu")
    acc = Trainer(cfg.replace(**{"analyses.run": ["gradients"]}), digits, "cpu")
    assert plain.accounting is None and acc.accounting is not None and acc.accounting.split
    plain.fit(), acc.fit()
    assert len(acc.grad_rows) == 2 * len(acc.model.layer_groups)
    for k, v in plain.model.state_dict().items():
        assert torch.allclose(acc.model.state_dict()[k], v, rtol=1e-4, atol=1e-5), k
    a, b = plain.cum_loss, acc.cum_loss
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_example_stats_are_the_training_pass_losses_and_learning_epochs(digits, monkeypatch):
    """cum_loss is the sum over epochs of each example's loss as computed for its step, and
    learn_epoch the first epoch from which the training pass predicted its given label in every
    later epoch: recomputed here from the logits the model produced in training."""
    cfg = small_cfg(**{"optim.epochs": 4, "dropout.kind": "example_tied"})
    tr = Trainer(cfg, digits, "cpu")
    seen = []  # (epoch, idx, logits) of every training step
    forward = type(tr.model).forward

    def spy(self, x, masks=None):
        out = forward(self, x, masks)
        if self.training:
            seen.append((tr.epoch, current["idx"], out.detach().clone()))
        return out
    current = {}
    real_masks = tr.masks_for_training

    def masks(idx):
        current["idx"] = idx.clone()
        return real_masks(idx)
    monkeypatch.setattr(type(tr.model), "forward", spy)
    monkeypatch.setattr(tr, "masks_for_training", masks)
    tr.fit()
    n = digits.n_train
    cum = torch.zeros(n, dtype=torch.float64)
    right = torch.zeros(cfg.optim.epochs, n, dtype=torch.bool)
    for e, idx, logits in seen:
        y = tr.data.y_train[idx]
        cum[idx] += torch.nn.functional.cross_entropy(logits, y, reduction="none").double()
        right[e, idx] = logits.argmax(1) == y
    rows = tr.example_stats()
    assert len(rows) == n and [r["example_id"] for r in rows] == list(range(n))
    assert torch.allclose(torch.tensor([r["cum_loss"] for r in rows], dtype=torch.float64), cum, rtol=0, atol=1e-9)
    for i in range(n):
        later = [e for e in range(cfg.optim.epochs) if right[e:, i].all()]
        assert rows[i]["learn_epoch"] == (later[0] + 1 if later else None), i
    assert sum(r["is_noisy"] for r in rows) == int(digits.noise_mask.sum())
    assert {r["learn_epoch"] for r in rows} - {None} <= set(range(1, cfg.optim.epochs + 1))


def test_divergence_stops_with_epoch(digits):
    cfg = small_cfg(**{"optim.lr": 1e6, "optim.schedule": "constant", "optim.epochs": 5})
    tr = Trainer(cfg, digits, "cpu")
    with pytest.raises(Diverged, match=r"^diverged at epoch [1-5]"):
        tr.fit()


def test_snapshots_at_epoch_0_the_thresholds_the_fixed_epochs_and_the_end(digits):
    """Protocol 2: epoch 0, the first epoch whose train_noisy reaches each threshold (read from the
    trainer's own evaluations: whichever epochs they fall on), the fixed epochs, the final epoch."""
    cfg = small_cfg(**{"optim.epochs": 6, "analyses.snapshot_epochs": [2, 9],
                       "analyses.snapshot_thresholds": [0.1, 0.25, 0.5]})
    tr = Trainer(cfg, digits, "cpu")
    init = {k: v.clone() for k, v in tr.model.state_dict().items()}
    tr.fit()
    acc = tr.noisy_accuracy()
    assert sorted(acc) == list(range(1, 7))
    firsts = {min((e for e, a in acc.items() if a >= t), default=None) for t in (0.1, 0.25, 0.5)}
    assert sorted(tr.snapshots) == sorted({0, 2, 6} | (firsts - {None}))
    assert all(torch.equal(tr.snapshots[0][k], init[k]) for k in init)
    assert all(torch.equal(tr.snapshots[6][k], v) for k, v in tr.model.state_dict().items())


def test_eval_rows_every_epoch_and_subsets(digits):
    tr = Trainer(small_cfg(**{"optim.epochs": 3, "eval_every": 2}), digits, "cpu")
    tr.fit()
    assert sorted({r["epoch"] for r in tr.history}) == [2, 3]
    last = [r for r in tr.history if r["epoch"] == 3]
    assert [r["subset"] for r in last] == ["train_clean", "train_noisy", "train_noisy_true", "test"]
    n = {r["subset"]: r["n"] for r in last}
    assert n == {"train_clean": 1260, "train_noisy": 140, "train_noisy_true": 140, "test": 397}


def test_no_noise_writes_no_noisy_rows(digits):
    from memray.config import DataConfig

    clean = load_data(DataConfig(dataset="digits", noise_rate=0.0, train_limit=200))
    tr = Trainer(small_cfg(**{"data.noise_rate": 0.0, "optim.epochs": 1, "analyses.run": ["gradients"]}), clean, "cpu")
    tr.fit()
    assert {r["subset"] for r in tr.history} == {"train_clean", "test"}
    assert tr.accounting is None and tr.grad_rows == []


@pytest.mark.slow
def test_plain_mlp_memorizes_digits_noise(digits):
    """Acceptance: train_noisy >= 0.95 with test >= 0.85 (default recipe, 60 epochs)."""
    tr = Trainer(ExperimentConfig().replace(**{"analyses.run": []}), digits, "cpu")
    tr.fit()
    f = tr.final()
    assert f["plain/train_noisy/accuracy"] >= 0.95
    assert f["plain/test/accuracy"] >= 0.85
    assert f["plain/train_clean/accuracy"] >= 0.99  # fits its training set (a margin for other CPUs)


def test_deterministic_mode_without_importing_the_compiler():
    """set_deterministic turns on deterministic eager kernels (warn-only) without the ~2 s import of
    torch._inductor/_dynamo that torch.use_deterministic_algorithms does; with the compiler already
    imported it sets the compiler's flag too."""
    code = """
import sys, torch
from memray.train import set_deterministic
assert not torch.are_deterministic_algorithms_enabled()
set_deterministic()
out = [torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
       "torch._inductor" in sys.modules, "torch._dynamo" in sys.modules]
import torch._inductor.config as ic
ic.deterministic = False
set_deterministic()
out.append(ic.deterministic)
print(out)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[True, True, False, False, True]"


def test_keep_freed_memory_sets_glibcs_thresholds_once(monkeypatch):
    """keep_freed_memory() sets glibc's mmap threshold to its 32 MiB maximum, the trim threshold
    to 1 GiB and the top padding to 64 MiB, once per process, and does nothing where libc has no
    mallopt. (What it saves is a timing, measured in its docstring; page-fault counts vary too
    much between runs and kernels to test.)"""
    from memray import train

    calls = []

    class Libc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(train, "_KEEP_FREED_DONE", False)
    monkeypatch.setattr(train.sys, "platform", "linux")
    monkeypatch.setattr(train.ctypes, "CDLL", lambda name: Libc())
    train.keep_freed_memory()
    train.keep_freed_memory()
    assert calls == [(-3, 32 * 1024 * 1024), (-1, 1 << 30), (-2, 64 * 1024 * 1024)]  # mmap, trim, top pad

    def no_libc(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(train, "_KEEP_FREED_DONE", False)
    monkeypatch.setattr(train.ctypes, "CDLL", no_libc)
    train.keep_freed_memory()  # musl, or no libc.so.6: nothing to set, no error
    assert len(calls) == 3
    # and for real, in a fresh process: glibc accepts the three values (mallopt returns 1 on success)
    code = ("import ctypes, platform, memray.train as t; t.keep_freed_memory(); "
            "libc = ctypes.CDLL('libc.so.6') if platform.libc_ver()[0] == 'glibc' else None; "
            "print([libc.mallopt(-3, t.MMAP_THRESHOLD), libc.mallopt(-1, t.TRIM_THRESHOLD), libc.mallopt(-2, t.TOP_PAD)] "
            "if libc else 'no glibc')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() in ("[1, 1, 1]", "no glibc")
