"""Probes of one trained model: `Subject` is what each examines."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from ..data import Data
from ..dropout import ExampleTiedDropout
from ..sites import SiteModel


@dataclass(frozen=True)
class Subject:
    """What a probe examines: one trained model, its data, and its example-tied dropout (None for a plain model)."""

    model: SiteModel
    data: Data
    etd: ExampleTiedDropout | None = None

    @contextmanager
    def frozen(self, dtype: torch.dtype) -> Iterator[SiteModel]:
        """The model in eval mode, without parameter gradients, in `dtype`; its training flag,
        requires_grad flags and dtype are restored on exit."""
        model = self.model
        was_training, orig = model.training, next(model.parameters()).dtype
        req = [p.requires_grad for p in model.parameters()]
        model.eval().to(dtype).requires_grad_(False)
        try:
            yield model
        finally:
            model.to(orig)
            for p, r in zip(model.parameters(), req):
                p.requires_grad_(r)
            model.train(was_training)
