"""Layer retraining (EXPERIMENTS.md section 3).

For layer group g: take the converged model, rewind g to a snapshot (default epoch 0, the
initialisation), freeze every other group, and train g alone on the *clean* training examples.
Budget after the authors (`experiments/retraining.py`, `do_ft`): SGD momentum 0.9, weight decay
5e-4, a triangle schedule from 0 up to lr 0.01 at the middle epoch and back to 0 at the last
(the authors' peak is at epoch 10 of 20), at most 20 epochs, stopping once clean training accuracy
has been 100% in 3 epochs (counted as the authors do: not necessarily consecutive). "Clean
training accuracy" is the accuracy on the epoch's training batches as they were seen (the same
forward passes; no extra evaluation pass). Each group records the epochs it ran and whether it
**converged** (final train_clean >= 99% of the trained model's). The authors' script trains all
parameters (its freezing has no effect); the paper means one group, and so does this.

Frozen groups stay exactly as they were, buffers included: the model runs in eval mode except the
modules of g, so only g's norm layers update running statistics. Each group is an independent work
item (`retrain_item`).
"""
from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from .. import streams
from ..data import batches
from ..sites import SiteModel
from ..train import lr_factor
from . import Subject
from .rewinding import Prefix, rewind_layer, subset_accuracies

CONVERGED = 0.99  # of the trained model's train_clean


def retrain_layer(subject: Subject, group: int, snapshot: dict[str, torch.Tensor],
                  lr: float = 0.01, weight_decay: float = 5e-4, max_epochs: int = 20, patience: int = 3,
                  batch_size: int = 128, seed: int = 0, seen_ids: list[torch.Tensor] | None = None,
                  prefix: Prefix | None = None) -> tuple[SiteModel, dict[str, Any]]:
    """Returns (retrained copy of the model, {'epochs': n, 'clean_train_acc': last}).
    `seen_ids`, when given, collects every batch's example ids (for checking). `prefix`: the
    trained model's activations before the group's first stage (`rewinding.Prefix`); the frozen
    stages before it then run once, not every epoch (to float rounding the same training)."""
    data, etd = subject.data, subject.etd
    if prefix is not None and prefix.start > subject.model.stages_before(group):
        raise ValueError(f"a prefix of {prefix.start} stages covers layer group {group}")
    m = copy.deepcopy(subject.model)
    rewind_layer(m, group, snapshot)
    params = [p for _, p in m.group_parameters(group)]
    for p in m.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    m.eval()
    for mod in m.group_modules(group):
        mod.train()
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    clean = data.clean_ids()
    steps = max_epochs * math.ceil(clean.numel() / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor("triangle", s, steps, 0.5))
    gen = streams.torch_generator("retrain.order", seed)
    perfect, epoch, acc = 0, 0, 0.0
    for epoch in range(1, max_epochs + 1):
        correct = torch.zeros((), device=data.device)
        for b in batches(clean.numel(), batch_size, gen, data.device):
            ids = clean[b]
            if seen_ids is not None:
                seen_ids.append(ids.detach().cpu())
            masks = etd.example_masks(ids) if etd is not None else None
            logits = (m(data.x_train[ids], masks) if prefix is None
                      else m.forward_stages(prefix.train[ids], masks, prefix.start))
            loss = F.cross_entropy(logits, data.y_train[ids])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            correct += (logits.argmax(1) == data.y_train[ids]).sum()
        acc = correct.item() / clean.numel()
        perfect += acc == 1.0
        if perfect >= patience:
            break
    for p in m.parameters():
        p.requires_grad_(True)
    m.eval()
    return m, {"epochs": epoch, "clean_train_acc": acc}


def retrain_item(subject: Subject, group: int, snapshot: dict[str, torch.Tensor], epoch: int,
                 prefix: Prefix | None = None, **budget) -> list[dict[str, Any]]:
    """Rows (one per subset) for retraining one group of the trained model (`prefix`: its
    activations before the group's first stage, or None)."""
    trained = subset_accuracies(subject, prefix=prefix)["train_clean"]
    m, info = retrain_layer(subject, group, snapshot, prefix=prefix, **budget)
    acc = subset_accuracies(replace(subject, model=m), prefix=prefix)
    name = subject.model.group_names()[group]
    converged = acc["train_clean"] >= CONVERGED * trained
    return [{"layer_index": group, "layer_name": name, "rewind_epoch": epoch, "subset": s, "accuracy": a,
             "epochs_run": info["epochs"], "converged": converged} for s, a in acc.items()]
