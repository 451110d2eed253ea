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


def subset_accuracies(subject: Subject, train_ids: torch.Tensor | None = None) -> dict[str, float]:
    """Accuracy on train_clean, train_noisy (given label), train_noisy_true and test, in the
    model's natural mode. `train_ids` restricts the training subsets to a fixed sample."""
    model, data, etd = subject.model, subject.data, subject.etd
    ids = train_ids if train_ids is not None else torch.arange(data.n_train, device=data.device)
    own = (lambda i: etd.example_masks(ids[i])) if etd is not None else None
    logits = predict(model, data.x_train[ids], own)
    pred = logits.argmax(1)
    noisy = data.noise_mask[ids]
    out = {"train_clean": (pred[~noisy] == data.y_train[ids][~noisy]).double().mean().item()}
    if noisy.any():
        out["train_noisy"] = (pred[noisy] == data.y_train[ids][noisy]).double().mean().item()
        out["train_noisy_true"] = (pred[noisy] == data.y_true[ids][noisy]).double().mean().item()
    fixed = etd.mode_masks("all") if etd is not None else None
    test_logits = predict(model, data.x_test, (lambda i: fixed) if fixed is not None else None)
    out["test"] = (test_logits.argmax(1) == data.y_test).double().mean().item()
    return out


def rewind_item(subject: Subject, final: dict[str, torch.Tensor], snapshot: dict[str, torch.Tensor],
                group: int, epoch: int) -> list[dict[str, Any]]:
    """Rows for one (group, snapshot epoch): rewinds, measures, then restores the final weights."""
    model = subject.model
    rewind_layer(model, group, snapshot)
    try:
        acc = subset_accuracies(subject)
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
