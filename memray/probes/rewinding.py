"""Layer rewinding (EXPERIMENTS.md section 2).

For a converged model and its weight snapshots: for each layer group g and snapshot epoch e,
replace g's **parameters** with their epoch-e values (norm running statistics stay final, as in
the authors' code), keep every other group final, and measure accuracy on train_clean,
train_noisy, train_noisy_true and test (batched inference). The snapshots are epoch 0, the first
epoch at which train_noisy reaches 0.1, 0.25, 0.5 and 0.75, and the final epoch (`Trainer`);
the classes at e* (redundant, critical, damaged, partial) are arithmetic on these rows and the
trial's `evals` (`analysis.findings`).
Each (g, e) is an independent work item (`rewind_item`), so callers can spread them over workers.

Models trained with example-tied dropout are measured as trained: training subsets under their
own tied masks (mode `own`), the test set in mode `all`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..sites import SiteModel
from ..train import predict
from . import Subject


def rewind_layer(model: SiteModel, group: int, snapshot: dict[str, torch.Tensor]) -> None:
    """In place: load layer group `group`'s parameters from `snapshot` (buffers stay)."""
    sd = model.state_dict()
    keys = [n for n, _ in model.group_parameters(group)]
    with torch.no_grad():
        for k in keys:
            sd[k].copy_(snapshot[k].to(sd[k].device))


MAX_PREFIX_BYTES = 512 * 2**20  # a prefix's activations for the training and test sets


@dataclass(frozen=True)
class Prefix:
    """The trained model's output after its first `start` stages (`SiteModel.stages_before`) for
    every training example (its own mask where ETD trained it) and the test set (mode `all`),
    computed in `predict`'s batches. A model that differs from the trained one only from stage
    `start` on (a rewound or retrained group) runs from there on these: the same rows as a whole
    pass, for a fraction of the work (LeNet 40 at 28x28: conv1 and conv2 are about 80% of it)."""

    start: int
    train: torch.Tensor
    test: torch.Tensor

    @staticmethod
    def of(subject: Subject, start: int, max_bytes: int = MAX_PREFIX_BYTES) -> Prefix | None:
        """The prefix of `start` stages, or None where there is none to reuse or it would
        take more than `max_bytes`."""
        model, data, etd = subject.model, subject.data, subject.etd
        if start <= 0:
            return None
        with torch.no_grad():
            row = predict(model, data.x_train[:1], _own(etd, None), stages=(0, start))
        if row.numel() * row.element_size() * (data.n_train + len(data.x_test)) > max_bytes:
            return None
        return Prefix(start, predict(model, data.x_train, _own(etd, None), stages=(0, start)),
                      predict(model, data.x_test, _fixed(etd), stages=(0, start)))


def _own(etd, ids: torch.Tensor | None):
    """masks_for of the training examples `ids` (None: all, in order) in their own masks."""
    if etd is None:
        return None
    return etd.example_masks if ids is None else (lambda i: etd.example_masks(ids[i]))


def _fixed(etd):
    """masks_for of the test set: ETD's mode `all`, or none."""
    if etd is None:
        return None
    fixed = etd.mode_masks("all")
    return lambda i: fixed


def subset_accuracies(subject: Subject, train_ids: torch.Tensor | None = None,
                      prefix: Prefix | None = None) -> dict[str, float]:
    """Accuracy on train_clean, train_noisy (given label), train_noisy_true and test, in the
    model's natural mode. `train_ids` restricts the training subsets to a fixed sample.
    `prefix`: the model is the trained one up to its stage `prefix.start` (all examples only)."""
    model, data, etd = subject.model, subject.data, subject.etd
    if prefix is not None and train_ids is not None:
        raise ValueError("a prefix holds every training example: train_ids must be None")
    ids = train_ids if train_ids is not None else torch.arange(data.n_train, device=data.device)
    if prefix is not None:
        logits = predict(model, prefix.train, _own(etd, None), stages=(prefix.start, None))
    else:
        logits = predict(model, data.x_train[ids], _own(etd, ids))
    pred = logits.argmax(1)
    noisy = data.noise_mask[ids]
    out = {"train_clean": (pred[~noisy] == data.y_train[ids][~noisy]).double().mean().item()}
    if noisy.any():
        out["train_noisy"] = (pred[noisy] == data.y_train[ids][noisy]).double().mean().item()
        out["train_noisy_true"] = (pred[noisy] == data.y_true[ids][noisy]).double().mean().item()
    test_logits = (predict(model, prefix.test, _fixed(etd), stages=(prefix.start, None)) if prefix is not None
                   else predict(model, data.x_test, _fixed(etd)))
    out["test"] = (test_logits.argmax(1) == data.y_test).double().mean().item()
    return out


def rewind_item(subject: Subject, final: dict[str, torch.Tensor], snapshot: dict[str, torch.Tensor],
                group: int, epoch: int, prefix: Prefix | None = None) -> list[dict[str, Any]]:
    """Rows for one (group, snapshot epoch): rewinds, measures, then restores the final weights.
    `prefix`: the trained model's prefix up to the group's first stage, or None."""
    model = subject.model
    if prefix is not None and prefix.start > model.stages_before(group):
        raise ValueError(f"a prefix of {prefix.start} stages covers layer group {group}")
    rewind_layer(model, group, snapshot)
    try:
        acc = subset_accuracies(subject, prefix=prefix)
    finally:
        rewind_layer(model, group, final)
    name = model.group_names()[group]
    return [{"layer_index": group, "layer_name": name, "rewind_epoch": epoch, "subset": s, "accuracy": a}
            for s, a in acc.items()]


def rewinding_rows(subject: Subject, snapshots: dict[int, dict[str, torch.Tensor]]) -> list[dict[str, Any]]:
    final = {k: v.detach().clone() for k, v in subject.model.state_dict().items()}
    rows = []
    for g in range(len(subject.model.layer_groups)):
        for e in sorted(snapshots):
            rows += rewind_item(subject, final, snapshots[e], g, e)
    return rows
