"""Deterministic training with per-epoch evaluation, weight snapshots and a full resume state.

`Trainer(cfg, data)` builds the model, its dropout (none, standard, example-tied), optimiser and
schedule from one `ExperimentConfig`. `run_epoch()` trains one epoch and returns that epoch's
`evals` rows (and `gradients` rows when gradient accounting is on); `fit()` runs to the end.
`state_dict()` / `load_state_dict()` capture everything needed to continue bit-for-bit on the CPU:
model, optimiser, schedule, RNG streams, epoch, metric history. Weight snapshots for rewinding
live in `trainer.snapshots` ({epoch: state dict on the CPU}); they are kept apart from the resume
state so a caller can store each one once.
"""
from __future__ import annotations

import copy
import ctypes
import io
import math
import os
import sys
from typing import Any

import torch
import torch.nn.functional as F

from . import streams
from .config import ETD_MODES, ExperimentConfig
from .data import Data, augment, batches
from .dropout import ExampleTiedDropout, StandardDropout
from .models import build_model
from .probes import Subject
from .probes.gradients import GradientAccounting
from .sites import SiteModel
from .summary import final_metrics
from .tables import write_local

class Diverged(RuntimeError):
    pass


def pick_device() -> torch.device:
    """The one place the device is chosen: CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe_device(device: torch.device) -> str:
    """The device in words, for benchmark output: the GPU's name, or the CPU's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def set_deterministic() -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if "torch._inductor" in sys.modules:
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        # Eager kernels read only this flag. The public call above also sets the compiler's flag,
        # importing torch._inductor and torch._dynamo to do so: about 2 s in every trial worker
        # process. memray never compiles; a caller that compiles after this imports torch._inductor
        # first (then the branch above runs) or sets torch.use_deterministic_algorithms itself.
        torch._C._set_deterministic_algorithms(True, warn_only=True)
    # Deterministic mode also fills every new empty tensor with NaN (a guard against reading
    # uninitialized memory); nothing here reads it, and the fills cost a pass per allocation.
    torch.utils.deterministic.fill_uninitialized_memory = False


_KEEP_FREED_DONE = False
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed threshold (64-bit)
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 * 1024 * 1024  # glibc's HEAP_MAX_SIZE on 64-bit: a thread arena's largest heap


def keep_freed_memory() -> None:
    """Have glibc's malloc keep freed memory for the next allocation instead of handing it back
    to the kernel (a process-wide setting; nothing happens where the C library is not glibc).

    torch's CPU tensors are malloc'd and freed per op. By glibc's defaults a freed block of more
    than the trim threshold at the top of the heap goes back to the kernel, a block over the
    adaptive mmap threshold is mapped afresh, and in a thread's own arena (a Tune trainable runs in
    a thread) a heap left empty is unmapped: the next batch's activations then fault every page in
    again. Three settings stop that: the mmap threshold at its 32 MiB maximum, the trim threshold
    at 1 GiB, and 64 MiB of top padding (a thread arena's heap is at most 64 MiB, so none is
    unmapped). Measured on LeNet 40 at 28x28, one thread, one full evaluation of an ETD trial
    (three modes, batches of 256 rows): 6.35-6.84 s by the defaults, 2.4-2.7 s of it in the kernel
    (1.3 million page faults); 3.72-4.06 s with the two thresholds set. In a thread: 5.57-5.70 s
    with the thresholds alone, 3.62-3.99 s with the padding too, set before the thread's first
    large tensors (the trainables call this first; set after the data was loaded, 4.74-5.04 s).
    The 30 rewinding items of a trial took 29.2 s against 19.5-20.1 s. A block over 32 MiB is
    still mapped afresh, so the probes' CPU passes stay under it (`memray.probes.flips.post_edit`)."""
    global _KEEP_FREED_DONE
    if _KEEP_FREED_DONE or not sys.platform.startswith("linux"):
        return
    _KEEP_FREED_DONE = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    mallopt(M_TOP_PAD, TOP_PAD)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(model: SiteModel, x: torch.Tensor, masks_for=None, batch_size: int | None = None,
            stages: tuple[int, int | None] | None = None) -> torch.Tensor:
    """Logits for all of x in eval mode. masks_for(idx) -> per-site masks for rows idx, or None.
    Batches of 256 rows on a CPU, where a batch's activations then stay in cache (LeNet 40 over
    5,000 28x28 images: 2.5 s against 4.2-4.7 s in batches of 1,024), 1,024 on an accelerator.
    `stages` (start, stop): run only those stages of the model's chain (x is stage start's
    input; the output is stage stop-1's); the same batches, so the rows are the same as a whole
    pass's."""
    if batch_size is None:
        batch_size = 256 if x.device.type == "cpu" else 1024
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, x.shape[0], batch_size):
        idx = torch.arange(start, min(start + batch_size, x.shape[0]), device=x.device)
        masks = masks_for(idx) if masks_for is not None else None
        out.append(model(x[idx], masks) if stages is None else model.forward_stages(x[idx], masks, *stages))
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, device=x.device)


def subset_metrics(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float, int]:
    if y.numel() == 0:
        return float("nan"), float("nan"), 0
    loss = F.cross_entropy(logits.double(), y, reduction="mean").item()
    acc = (logits.argmax(1) == y).double().mean().item()
    return acc, loss, y.numel()


def evaluate(subject: Subject, mode: str, train: bool = True, test: bool = True) -> list[dict[str, Any]]:
    """`evals` rows (mode, subset, accuracy, loss, n) for one evaluation mode.

    plain: no masks; own: each training example's tied mask (train subsets only);
    all / drop: ETD's fixed masks (see memray.dropout)."""
    model, data, etd = subject.model, subject.data, subject.etd
    rows = []

    def add(subset, logits, y):
        acc, loss, n = subset_metrics(logits, y)
        rows.append({"mode": mode, "subset": subset, "accuracy": acc, "loss": loss, "n": n})

    if mode == "plain":
        fixed = None
    elif mode == "own":
        fixed, test = None, False
    else:
        fixed = etd.mode_masks(mode)
    if train:
        masks_for = (lambda idx: etd.example_masks(idx)) if mode == "own" else (lambda idx: fixed)
        logits = predict(model, data.x_train, masks_for if mode != "plain" else None)
        clean, noisy = ~data.noise_mask, data.noise_mask
        add("train_clean", logits[clean], data.y_train[clean])
        if noisy.any():
            add("train_noisy", logits[noisy], data.y_train[noisy])
            add("train_noisy_true", logits[noisy], data.y_true[noisy])
    if test:
        logits = predict(model, data.x_test, (lambda idx: fixed) if fixed is not None else None)
        add("test", logits, data.y_test)
    return rows


@torch.no_grad()
def example_correctness(subject: Subject) -> list[dict[str, Any]]:
    """`etd_examples` rows: per training example of an ETD subject, whether its given label is
    predicted under its own tied mask, with every unit on (`all`) and with the memorization units
    dropped (`drop`)."""
    model, data, etd = subject.model, subject.data, subject.etd
    right = {"own": predict(model, data.x_train, etd.example_masks).argmax(1) == data.y_train}
    for mode in ("all", "drop"):
        fixed = etd.mode_masks(mode)
        right[mode] = predict(model, data.x_train, lambda idx: fixed).argmax(1) == data.y_train
    cols = {m: v.tolist() for m, v in right.items()}
    noisy = data.noise_mask.tolist()
    return [{"example_id": i, "is_noisy": noisy[i], "own_correct": cols["own"][i], "all_correct": cols["all"][i],
             "drop_correct": cols["drop"][i]} for i in range(data.n_train)]


def eval_modes(cfg: ExperimentConfig) -> tuple[str, ...]:
    return ETD_MODES if cfg.dropout.kind == "example_tied" else ("plain",)


# ----------------------------------------------------------------------------- schedule
def lr_factor(schedule: str, step: int, total: int, warmup_frac: float) -> float:
    t = step / max(1, total)
    if schedule in ("onecycle", "triangle"):  # linear up to the peak, then linear down to 0
        w = warmup_frac
        return t / w if (w > 0 and t < w) else max(0.0, (1 - t) / (1 - w))
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    if schedule == "step":
        return 0.1 ** (int(t >= 0.5) + int(t >= 0.75))
    return 1.0


# ----------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, cfg: ExperimentConfig, data: Data, device: torch.device | str | None = None):
        self.cfg = cfg
        self.device = torch.device(device) if device is not None else pick_device()
        set_deterministic()
        keep_freed_memory()
        self.data = data.to(self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(streams.torch_seed("train.init", cfg.seed))
            self.model = build_model(cfg.model.arch, cfg.model.resolved_width, self.data.in_shape,
                                     self.data.num_classes).to(self.device)
        units = self.model.site_units
        self.etd = (ExampleTiedDropout(cfg.dropout, units, self.data.n_train, self.device)
                    if cfg.dropout.kind == "example_tied" else None)
        self.std_dropout = (StandardDropout(cfg.dropout, units, self.device)
                            if cfg.dropout.kind == "standard" else None)
        o = cfg.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        if o.optimizer == "sgd":
            self.opt = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        else:
            self.opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
        self.steps_per_epoch = math.ceil(self.data.n_train / o.batch_size)
        total = self.steps_per_epoch * o.epochs
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(o.schedule, s, total, o.warmup_frac))
        # each random choice its own stream (EXPERIMENTS.md, "Random streams")
        self.gen_batches = streams.torch_generator("train.order", cfg.seed)
        self.gen_dropout = streams.torch_generator("train.dropout", cfg.seed)
        self.gen_augment = streams.torch_generator("train.augment", cfg.seed)
        self.accounting = (GradientAccounting(self.model, self.data.noise_mask, cfg.data.data_seed)
                           if "gradients" in cfg.analyses.run and self.data.noise_mask.any() else None)
        self.epoch = 0
        # the free memorization proxy (EXPERIMENTS.md section 8, "A free proxy"), from the
        # training pass itself: each example's loss summed over epochs, and the last epoch in
        # which the training pass did not predict its given label (0: none yet)
        self.record_stats = True  # off only to measure what recording costs (benchmarks/proxy_overhead.py)
        self.cum_loss = torch.zeros(self.data.n_train, device=self.device, dtype=torch.float64)
        self.last_wrong = torch.zeros(self.data.n_train, device=self.device, dtype=torch.int32)
        self.history: list[dict[str, Any]] = []  # evals rows, each with its epoch
        self.grad_rows: list[dict[str, Any]] = []
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}
        self._maybe_snapshot()

    # -- training ---------------------------------------------------------------------------
    def masks_for_training(self, idx: torch.Tensor):
        if self.etd is not None:
            return self.etd.example_masks(idx)
        if self.std_dropout is not None:
            return self.std_dropout.train_masks(idx.shape[0], self.gen_dropout)
        return None

    def run_epoch(self) -> dict[str, list[dict[str, Any]]]:
        cfg, data, model = self.cfg, self.data, self.model
        model.train()
        total_loss = torch.zeros((), device=self.device, dtype=torch.float64)
        if self.accounting is not None:
            self.accounting.start_epoch()
        for idx in batches(data.n_train, cfg.optim.batch_size, self.gen_batches, self.device):
            x, y = data.x_train[idx], data.y_train[idx]
            if cfg.data.augment:
                x = augment(x, self.gen_augment)
            self.opt.zero_grad(set_to_none=True)
            if self.accounting is not None:  # sets .grad to the mean loss's gradient
                losses, logits = self.accounting.step(x, y, self.masks_for_training(idx), idx)
            else:
                logits = model(x, self.masks_for_training(idx))
                losses = F.cross_entropy(logits, y, reduction="none")  # (B,)
                losses.mean().backward()
            self.opt.step()
            self.sched.step()
            total_loss += losses.detach().sum()
            if self.record_stats:
                self.cum_loss.index_add_(0, idx, losses.detach().double())
                wrong = logits.detach().argmax(1) != y  # no boolean indexing: no device sync a step
                self.last_wrong[idx] = torch.where(wrong, self.epoch + 1, self.last_wrong[idx])
        self.epoch += 1
        if not torch.isfinite(total_loss).item():
            raise Diverged(f"diverged at epoch {self.epoch}: training loss is {total_loss.item()}")
        out: dict[str, list[dict[str, Any]]] = {"evals": [], "gradients": []}
        if self.accounting is not None:
            rows = [{"epoch": self.epoch, **r} for r in self.accounting.end_epoch()]
            self.grad_rows += rows
            out["gradients"] = rows
        if self.epoch % cfg.eval_every == 0 or self.epoch == cfg.optim.epochs:
            rows = [{"epoch": self.epoch, **r} for r in self.evaluate()]
        elif self.needs_noisy_curve:  # the memorization window needs train_noisy every epoch
            rows = [{"epoch": self.epoch, **r} for r in self.evaluate_noisy()]
        else:
            rows = []
        if rows:
            self.history += rows
            out["evals"] = rows
        self._maybe_snapshot()
        return out

    def evaluate(self) -> list[dict[str, Any]]:
        rows = []
        for mode in eval_modes(self.cfg):
            rows += evaluate(self.subject, mode)
        return rows

    @property
    def subject(self) -> Subject:
        """The model as trained, its data and ETD: what the probes examine."""
        return Subject(self.model, self.data, self.etd)

    @property
    def needs_noisy_curve(self) -> bool:
        """The gradient findings' memorization window and the rewinding snapshots read train_noisy
        at every epoch (EXPERIMENTS.md, "The memorization window")."""
        return bool({"gradients", "rewind", "retrain"} & set(self.cfg.analyses.run)) and bool(self.data.noise_mask.any())

    @torch.no_grad()
    def evaluate_noisy(self) -> list[dict[str, Any]]:
        """train_noisy and train_noisy_true alone, in the mode memorization is read in (own for
        ETD, plain otherwise): a tenth of an evaluation, between full ones."""
        mode = "own" if self.etd is not None else "plain"
        idx = torch.nonzero(self.data.noise_mask).flatten()
        masks_for = (lambda i: self.etd.example_masks(idx[i])) if self.etd is not None else None
        logits = predict(self.model, self.data.x_train[idx], masks_for)
        rows = []
        for subset, y in (("train_noisy", self.data.y_train[idx]), ("train_noisy_true", self.data.y_true[idx])):
            acc, loss, n = subset_metrics(logits, y)
            rows.append({"mode": mode, "subset": subset, "accuracy": acc, "loss": loss, "n": n})
        return rows

    def fit(self, on_epoch=None) -> list[dict[str, Any]]:
        while self.epoch < self.cfg.optim.epochs:
            out = self.run_epoch()
            if on_epoch is not None:
                on_epoch(self, out)
        return self.history

    def example_stats(self) -> list[dict[str, Any]]:
        """`example_stats` rows: per training example its cumulative sample loss and learning
        epoch (the first epoch from which the training pass predicted its given label in every
        later epoch; None if it did not in the last one)."""
        learn = (self.last_wrong + 1).tolist()
        return [{"example_id": i, "is_noisy": bool(n), "cum_loss": c, "learn_epoch": e if e <= self.epoch else None}
                for i, (n, c, e) in enumerate(zip(self.data.noise_mask.tolist(), self.cum_loss.tolist(), learn))]

    def final(self) -> dict[str, float]:
        """Last evaluation as {'<mode>/<subset>/accuracy': value}."""
        return final_metrics(self.history)

    # -- snapshots and resume ---------------------------------------------------------------
    def noisy_accuracy(self) -> dict[int, float]:
        """{epoch: train_noisy accuracy} of the evaluated epochs, in mode `own` for ETD models (the
        model as trained): what the rewinding snapshots and the memorization window follow."""
        mode = "own" if self.etd is not None else "plain"
        return {r["epoch"]: r["accuracy"] for r in self.history if r["mode"] == mode and r["subset"] == "train_noisy"}

    def _maybe_snapshot(self) -> None:
        """Snapshot at epoch 0, the final epoch, the fixed snapshot epochs, and the first epoch at
        which train_noisy reaches each threshold (decided from this epoch's evaluation)."""
        a = self.cfg.analyses
        take = self.epoch in (0, self.cfg.optim.epochs) or self.epoch in a.snapshot_epochs
        acc = self.noisy_accuracy()
        if self.epoch in acc:
            before = max((v for e, v in acc.items() if e < self.epoch), default=-1.0)
            take |= any(before < t <= acc[self.epoch] for t in a.snapshot_thresholds)
        if take and self.epoch not in self.snapshots:
            self.snapshots[self.epoch] = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "optimizer": _to_cpu(self.opt.state_dict()),
            "scheduler": self.sched.state_dict(),
            "rng": {"batches": self.gen_batches.get_state(), "dropout": self.gen_dropout.get_state(),
                    "augment": self.gen_augment.get_state()},
            "history": copy.deepcopy(self.history),
            "grad_rows": copy.deepcopy(self.grad_rows),
            "snapshot_epochs": sorted(self.snapshots),
            "cum_loss": self.cum_loss.detach().cpu().clone(),
            "last_wrong": self.last_wrong.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any], snapshots: dict[int, dict] | None = None) -> None:
        self.epoch = int(state["epoch"])
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.gen_batches.set_state(state["rng"]["batches"])
        self.gen_dropout.set_state(state["rng"]["dropout"])
        self.gen_augment.set_state(state["rng"]["augment"])
        self.history = list(state["history"])
        self.grad_rows = list(state["grad_rows"])
        if "cum_loss" not in state:
            raise ValueError("this checkpoint predates the per-example training statistics (example_stats): "
                             "run the trial again without --resume")
        self.cum_loss = state["cum_loss"].to(self.device, torch.float64)
        self.last_wrong = state["last_wrong"].to(self.device, torch.int32)
        if snapshots is not None:
            self.snapshots = dict(snapshots)


def _to_cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().clone()
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(v) for v in x)
    return x


def save_state(state: dict[str, Any], path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    write_local(path, buf.getvalue())


def load_state(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Checkpoints hold plain dicts of tensors and primitives: loaded without executing code."""
    return torch.load(path, map_location=device, weights_only=True)
