"""Memorization scores (EXPERIMENTS.md section 8): the estimator and stacked subset training.

After Feldman & Zhang (2020): K models with one recipe (no ETD), model k trained on a seeded random
subset S_k holding a fraction r of the training set. For example i with given label y_i:

    acc_in(i)  = mean over k with i in S_k     of [h_k(x_i) = y_i]
    acc_out(i) = mean over k with i not in S_k of [h_k(x_i) = y_i]
    score      = acc_in - acc_out
    stderr     = sqrt(acc_in (1 - acc_in) / n_in + acc_out (1 - acc_out) / n_out)

(NaN, and excluded, where n_in or n_out is 0). Subsets are regenerated from their seeds
(`subset_mask`), so a trial stores only each model's seed and its predictions (int16).

`train_stacked` trains M models at once in one process (`Stacked`), each model with its own
subset, data order and initialisation: their parameters stacked (`torch.func.stack_module_state`);
the mlp's forward, backward and SGD step written out as batched matmuls (`baddbmm`, weights held
as (M, in, out), each weight gradient accumulated into its momentum buffer by the matmul that
computes it); other models without buffers (lenet) through one `vmap` of `functional_call` and
`grad`, then torch's fused SGD over the stacked tensors. SGD with momentum is elementwise, so
either is exactly per-model SGD.
`train_one` is the same recipe one model at a time; the two agree in float64 (tested). Models
with BatchNorm (resnet9) are not stacked (vmap over running statistics would need
`functional_call` to return buffers): a scoring trial trains them one at a time.

`ScoringRun` is one trial of the scoring sweep (`python -m sweeps.memorization_scores`): its
models, a resume state, and its `memscore_models` fragment; `score_table` is the sweep's reduce
step (the `memscores` rows), `memray.summary.memscore_summary` what it reports.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, stack_module_state, vmap

from . import streams
from .config import ScoreConfig
from .data import Data
from .models import build_model
from .tables import SCHEMAS
from .train import load_state, lr_factor, save_state


def subset_mask(seed: int, n: int, fraction: float) -> torch.Tensor:
    """(n,) bool: the seeded subset S_k of round(fraction * n) training examples."""
    g = streams.torch_generator("memscores.subset", seed)
    out = torch.zeros(n, dtype=torch.bool)
    out[torch.randperm(n, generator=g)[:round(fraction * n)]] = True
    return out


def scores(predictions: torch.Tensor, in_subset: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per example: n_in, n_out, acc_in, acc_out, score, stderr (float64; NaN where n_in or n_out
    is 0). predictions (K, N) class ids, in_subset (K, N) bool, labels (N,) given labels."""
    right = predictions == labels.to(predictions.dtype)[None]  # (K, N) bool: 1 byte a prediction
    n_in = in_subset.sum(0, dtype=torch.float64)
    n_out = predictions.shape[0] - n_in
    acc_in = (right & in_subset).sum(0, dtype=torch.float64) / n_in
    acc_out = (right & ~in_subset).sum(0, dtype=torch.float64) / n_out
    stderr = (acc_in * (1 - acc_in) / n_in + acc_out * (1 - acc_out) / n_out).sqrt()
    return {"n_in": n_in, "n_out": n_out, "acc_in": acc_in, "acc_out": acc_out, "score": acc_in - acc_out,
            "stderr": stderr}


def _init(recipe: ScoreConfig, seed: int, in_shape, classes, dtype, device=None) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(streams.torch_seed("memscores.init", seed))
        return build_model(recipe.arch, recipe.resolved_width, in_shape, classes).to(dtype).to(device or "cpu")


def _batches(seed: int, ids: torch.Tensor, epoch: int, batch_size: int) -> list[torch.Tensor]:
    """One epoch's batches of the model's subset `ids`, in the epoch's own seeded order (drawn
    when the epoch starts: nothing is held for the epochs ahead)."""
    g = streams.torch_generator("memscores.order", seed, epoch)
    return list(ids[torch.randperm(len(ids), generator=g)].split(batch_size))


def _lr(recipe: ScoreConfig, step: int, total: int) -> float:
    return recipe.lr * lr_factor("onecycle", step, total, 0.2)  # linear up to the peak at 20%, then down


def stackable(recipe: ScoreConfig, in_shape, classes) -> bool:
    """Models without buffers (no BatchNorm running statistics) train stacked; others one at a time."""
    return not list(build_model(recipe.arch, recipe.resolved_width, tuple(in_shape), classes).buffers())


def train_one(recipe: ScoreConfig, seed: int, x: torch.Tensor, y: torch.Tensor,
              classes: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One model on its subset: (its predictions on all of x (int16), its parameters)."""
    model = _init(recipe, seed, tuple(x.shape[1:]), classes, x.dtype, x.device)
    ids = torch.nonzero(subset_mask(seed, len(x), recipe.subset_fraction)).flatten()
    total = recipe.epochs * math.ceil(len(ids) / recipe.batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                          weight_decay=recipe.weight_decay, fused=True)
    step = 0
    model.train()
    for epoch in range(recipe.epochs):
        for b in _batches(seed, ids, epoch, recipe.batch_size):
            b = b.to(x.device)
            for group in opt.param_groups:
                group["lr"] = _lr(recipe, step, total)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
            step += 1
    with torch.no_grad():
        model.eval()
        pred = torch.cat([model(xb).argmax(1) for xb in x.split(1024)])
        return pred.to(torch.int16).cpu(), {k: v.detach() for k, v in model.named_parameters()}


class Stacked:
    """M models trained at once (see the module doc), one epoch per `run_epoch`, with a resume
    state: the stacked parameters, their momentum buffers and the epoch. Data orders are drawn
    from the seeds up front, so a restored run takes the same batches as an uninterrupted one."""

    def __init__(self, recipe: ScoreConfig, seeds: list[int], x: torch.Tensor, y: torch.Tensor, classes: int):
        self.recipe, self.x, self.y = recipe, x, y
        models = [_init(recipe, s, tuple(x.shape[1:]), classes, x.dtype, x.device) for s in seeds]
        self.params = {k: v.detach() for k, v in stack_module_state(models)[0].items()}  # {name: (M, ...)}, no graph
        self.base = copy.deepcopy(models[0]).to("meta")
        self.bmm = recipe.arch == "mlp"  # batched matmuls; other stackable models: vmap
        if self.bmm:  # weights held as (M, in, out): h @ W is one contiguous bmm, and so are its gradients
            self.params = {k: v.transpose(1, 2).contiguous() if k.endswith("weight") else v
                           for k, v in self.params.items()}
        self.seeds = list(seeds)
        self.ids = [torch.nonzero(subset_mask(s, len(x), recipe.subset_fraction)).flatten() for s in seeds]
        self.steps_per_epoch = math.ceil(len(self.ids[0]) / recipe.batch_size)  # subsets have equal sizes
        self.total = recipe.epochs * self.steps_per_epoch
        # SGD with momentum over the stacked tensors is elementwise, so it is each model's own SGD.
        # The mlp's step is written out (`_bmm_step`): each weight gradient is accumulated straight
        # into its momentum buffer by the batched matmul that computes it. Other models: torch's
        # fused SGD (the momentum and the update in one pass over the weights).
        self.mom = {k: torch.zeros_like(v) for k, v in self.params.items()} if self.bmm else None
        self.opt = None if self.bmm else torch.optim.SGD(list(self.params.values()), lr=recipe.lr,
                                                         momentum=recipe.momentum,
                                                         weight_decay=recipe.weight_decay, fused=True)
        self.epoch = 0

        def loss(p, xb, yb):
            return F.cross_entropy(functional_call(self.base, p, (xb,)), yb)

        self.grads = vmap(grad(loss))

    def _mlp_logits(self, p: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
        """memray.models.MLP's forward for M models at once: (M, B, ...) -> (M, B, classes), each
        layer one batched matmul (baddbmm) for every model; weights held as (M, in, out)."""
        h = xb.flatten(2)
        i = 0
        while f"hidden.{i}.0.weight" in p:
            h = torch.relu(torch.baddbmm(p[f"hidden.{i}.0.bias"].unsqueeze(1), h, p[f"hidden.{i}.0.weight"]))
            i += 1
        return torch.baddbmm(p["head.bias"].unsqueeze(1), h, p["head.weight"])

    def module_params(self) -> dict[str, torch.Tensor]:
        """The stacked parameters in the modules' own layout ({name: (M, ...)}, as nn.Linear holds them)."""
        if not self.bmm:
            return self.params
        return {k: v.transpose(1, 2) if k.endswith("weight") else v for k, v in self.params.items()}

    def _bmm_step(self, xb: torch.Tensor, yb: torch.Tensor, lr: float) -> None:
        """One SGD step with momentum of every mlp on its own batch (xb (M, B, ...), yb (M, B)),
        forward and backward as batched matmuls: torch.optim.SGD's update (buf = momentum * buf +
        grad + weight_decay * w; w -= lr * buf) with each weight's gradient (h^T d) accumulated
        into its buffer by the matmul that computes it (`baddbmm_` with beta = momentum)."""
        p, mom, r = self.params, self.mom, self.recipe
        with torch.no_grad():
            hs = [xb.flatten(2)]  # each layer's input: x, then the ReLU outputs
            layers = []
            while f"hidden.{len(layers)}.0.weight" in p:
                w, b = f"hidden.{len(layers)}.0.weight", f"hidden.{len(layers)}.0.bias"
                hs.append(torch.relu(torch.baddbmm(p[b].unsqueeze(1), hs[-1], p[w])))
                layers.append((w, b))
            layers.append(("head.weight", "head.bias"))
            d = torch.softmax(torch.baddbmm(p["head.bias"].unsqueeze(1), hs[-1], p["head.weight"]), -1)
            d.scatter_add_(-1, yb.unsqueeze(-1), torch.full(yb.shape + (1,), -1.0, dtype=d.dtype, device=d.device))
            d.div_(yb.shape[1])  # d(mean cross-entropy)/d(logits) of each model
            for i in reversed(range(len(layers))):
                w, b = layers[i]
                dh = torch.bmm(d, p[w].transpose(1, 2)) if i > 0 else None  # with the weights before the step
                mom[w].baddbmm_(hs[i].transpose(1, 2), d, beta=r.momentum)
                mom[b].mul_(r.momentum).add_(d.sum(1))
                if r.weight_decay:
                    mom[w].add_(p[w], alpha=r.weight_decay)
                    mom[b].add_(p[b], alpha=r.weight_decay)
                if dh is not None:
                    d = torch.ops.aten.threshold_backward(dh, hs[i], 0.0)  # through the ReLU (its own backward)
            torch._foreach_add_(list(p.values()), [mom[k] for k in p], alpha=-lr)

    def run_epoch(self) -> None:
        e, r = self.epoch, self.recipe
        step = e * self.steps_per_epoch
        plans = [_batches(s, ids, e, r.batch_size) for s, ids in zip(self.seeds, self.ids)]
        for j in range(self.steps_per_epoch):
            idx = torch.stack([p[j] for p in plans]).to(self.x.device)  # (M, B): every model's batch
            lr = _lr(r, step, self.total)
            if self.bmm:
                self._bmm_step(self.x[idx], self.y[idx], lr)
            else:
                g = self.grads(self.params, self.x[idx], self.y[idx])
                for k, v in self.params.items():
                    v.grad = g[k]
                self.opt.param_groups[0]["lr"] = lr
                self.opt.step()
            step += 1
        self.epoch += 1

    def predictions(self) -> torch.Tensor:
        """(M, N) int16: every model's prediction on every training example."""
        m = len(self.seeds)
        with torch.no_grad():  # (M, chunk, classes) logits, one chunk of examples at a time
            return torch.cat([(self._mlp_logits(self.params, xb.expand(m, *xb.shape)) if self.bmm else
                               vmap(lambda p, xb=xb: functional_call(self.base, p, (xb,)))(self.params)).argmax(-1)
                              for xb in self.x.split(1024)], dim=1).to(torch.int16).cpu()

    def state_dict(self) -> dict:
        out = {"epoch": self.epoch, "params": {k: v.detach().cpu() for k, v in self.params.items()}}
        if self.bmm:
            out["mom"] = {k: v.cpu() for k, v in self.mom.items()}
        else:
            out["opt"] = self.opt.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        """Checked before anything changes: a state that does not fit raises and leaves the run as
        it was (the trainable then tries an older checkpoint)."""
        params, epoch = state["params"], int(state["epoch"])
        mom, opt = state.get("mom"), state.get("opt")
        fits = (set(params) == set(self.params) and all(params[k].shape == v.shape for k, v in self.params.items())
                and 0 <= epoch <= self.recipe.epochs)
        if self.bmm:
            fits = fits and mom is not None and all(mom[k].shape == v.shape for k, v in self.params.items())
        else:
            fits = fits and opt is not None and len(opt["state"]) in (0, len(self.params))
        if not fits:
            raise ValueError(f"the saved stacked state (epoch {epoch}) does not fit these models")
        with torch.no_grad():
            for k in self.params:
                self.params[k].copy_(params[k])
                if self.bmm:
                    self.mom[k].copy_(mom[k])
        if not self.bmm:
            self.opt.load_state_dict(opt)
        self.epoch = epoch


def train_stacked(recipe: ScoreConfig, seeds: list[int], x: torch.Tensor, y: torch.Tensor,
                  classes: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """len(seeds) models trained at once: ((M, N) int16 predictions, the stacked parameters
    {name: (M, ...)})."""
    run = Stacked(recipe, seeds, x, y, classes)
    while run.epoch < recipe.epochs:
        run.run_epoch()
    return run.predictions(), run.module_params()


class ScoringRun:
    """A scoring trial's models (`ScoreConfig`): trained stacked, one epoch per step, or (models
    with BatchNorm) one at a time, one model per step. `steps()` yields progress after each step;
    `state_dict`/`load_state_dict` resume (a one-at-a-time run resumes at its next model);
    `table()` is its `memscore_models` fragment."""

    def __init__(self, cfg: ScoreConfig, data: Data):
        self.cfg, self.data = cfg, data
        self.recipe = cfg
        self.seeds = [model_seed(k, cfg.seed) for k in range(cfg.first, cfg.first + cfg.count)]
        self.stacked = stackable(self.recipe, data.in_shape, data.num_classes)
        self.run = Stacked(self.recipe, self.seeds, data.x_train, data.y_train, data.num_classes) if self.stacked else None
        self.done: list[torch.Tensor] = []  # one at a time: finished models' predictions
        self.restored_from = 0  # the step a restored run continued from

    @property
    def n_steps(self) -> int:
        return self.recipe.epochs if self.stacked else len(self.seeds)

    @property
    def step(self) -> int:
        return self.run.epoch if self.stacked else len(self.done)

    def steps(self):
        while self.step < self.n_steps:
            if self.stacked:
                self.run.run_epoch()
            else:
                s = self.seeds[len(self.done)]
                self.done.append(train_one(self.recipe, s, self.data.x_train, self.data.y_train,
                                           self.data.num_classes)[0])
            yield {"step": self.step, "steps": self.n_steps}

    def predictions(self) -> torch.Tensor:
        return self.run.predictions() if self.stacked else torch.stack(self.done)

    def table(self, sweep: str) -> pa.Table:
        """Its `memscore_models` rows: one per model, its subset seed and its predictions (int16)."""
        preds = self.predictions().numpy()  # (M, N) int16
        m, n = preds.shape
        values = pa.ListArray.from_arrays(pa.array(np.arange(0, (m + 1) * n, n, dtype=np.int32)),
                                          pa.array(preds.reshape(-1)))
        return pa.table({"sweep": [sweep] * m, "trial_key": [self.cfg.trial_key] * m,
                         "model_index": pa.array(range(self.cfg.first, self.cfg.first + m), pa.int32()),
                         "subset_seed": pa.array(self.seeds, pa.int64()), "predictions": values},
                        schema=SCHEMAS["memscore_models"])

    def state_dict(self) -> dict:
        return {"stacked": self.run.state_dict()} if self.stacked else {"done": [p.clone() for p in self.done]}

    def load_state_dict(self, state: dict) -> None:
        if self.stacked:
            self.run.load_state_dict(state["stacked"])
        else:
            self.done = list(state["done"])
        self.restored_from = self.step

    def save(self, path) -> None:
        save_state(self.state_dict(), path)

    def restore(self, path) -> None:
        """Continue from a state `save` wrote (loaded with weights_only: no code runs)."""
        self.load_state_dict(load_state(path))


def model_seed(k: int, base_seed: int = 0) -> int:
    """Model k's seed (its subset, initialisation and data order each draw their own stream of
    it): a 63-bit integer from the base seed's `memscores.model` stream for model k."""
    return streams.torch_seed("memscores.model", base_seed, k)


def model_seeds(models: int, base_seed: int = 0) -> list[int]:
    """The subset (and init, and order) seed of each of K models."""
    return [model_seed(k, base_seed) for k in range(models)]


def median_stderr(s: dict[str, torch.Tensor]) -> float:
    v = s["stderr"][~s["stderr"].isnan()]
    return float(v.median()) if v.numel() else math.nan


# ----------------------------------------------------------------------------- the reduce step
def score_table(sweep: str, cfg: ScoreConfig, data: Data, predictions: np.ndarray, subset_seeds: list[int]) -> list[dict]:
    """The `memscores` rows (one per training example) from a sweep's models: their predictions
    (K, N) int16 and subset seeds (the subsets are regenerated). Undefined values (n_in or n_out 0)
    are null. Memory: the predictions, and two (K, N) bool masks (CIFAR-10, K = 2,000: 300 MB)."""
    n = data.n_train
    preds = torch.from_numpy(np.ascontiguousarray(predictions, dtype=np.int16))
    if preds.shape[1] != n:
        raise ValueError(f"sweep {sweep!r}: predictions cover {preds.shape[1]} examples, the data has {n}")
    in_subset = torch.stack([subset_mask(int(s), n, cfg.subset_fraction) for s in subset_seeds])
    s = scores(preds, in_subset, data.y_train.cpu())
    cols = {k: v.tolist() for k, v in s.items()}
    noisy, given, true = data.noise_mask.cpu().tolist(), data.y_train.cpu().tolist(), data.y_true.cpu().tolist()
    d = cfg.data

    def val(k, i):
        v = cols[k][i]
        return None if math.isnan(v) else v

    digest = data.digest()
    return [{"sweep": sweep, "protocol": cfg.protocol, "data_digest": digest, "dataset": d.dataset, "noise_rate": d.noise_rate, "noise_kind": d.noise_kind,
             "data_seed": d.data_seed, "arch": cfg.arch, "width": cfg.resolved_width, "models": len(subset_seeds),
             "subset_fraction": cfg.subset_fraction, "example_id": i, "is_noisy": noisy[i], "given_label": given[i],
             "true_label": true[i], "n_in": int(cols["n_in"][i]), "n_out": int(cols["n_out"][i]),
             "acc_in": val("acc_in", i), "acc_out": val("acc_out", i), "score": val("score", i),
             "stderr": val("stderr", i)} for i in range(n)]


def top_clean_figure(rows: list[dict], data: Data, title: str, n: int = 10) -> bytes | None:
    """The top-scoring clean examples (the rarest: right mostly when trained on) above the
    highest-scoring noisy ones, drawn from the data; captions: id, given label, score."""
    from . import plots

    groups = {}
    for label, noisy in (("top clean", False), ("top noisy", True)):
        sel = sorted((r for r in rows if r["score"] is not None and r["is_noisy"] == noisy),
                     key=lambda r: (-r["score"], r["example_id"]))[:n]
        if sel:
            ids = torch.tensor([r["example_id"] for r in sel])
            groups[label] = (data.x_train[ids.to(data.device)].cpu().numpy(),
                             [f"#{r['example_id']} y={r['given_label']} s={r['score']:.2f}" for r in sel])
    if not groups:
        return None
    return plots.png(plots.examples_figure(groups, f"{title}: highest memorization scores"))
