"""Memorization scores (EXPERIMENTS.md section 8): the estimator on known answers, stacked training."""
import math

import torch

from memray import memscores as M


def test_estimator_on_a_known_answer():
    """Example 0 is only right when trained on (a memorized noisy label): score -> 1; example 1 is
    right in and out: score 0; stderr is section 8's formula; an example never held out is NaN."""
    K, N = 200, 3
    in_subset = torch.stack([M.subset_mask(s, N, 0.5) for s in range(K)])
    in_subset[:, 2] = True  # never held out
    labels = torch.tensor([4, 7, 1])
    preds = torch.empty(K, N, dtype=torch.int16)
    preds[:, 0] = torch.where(in_subset[:, 0], 4, 9)
    preds[:, 1] = 7
    preds[:, 2] = 1
    s = M.scores(preds, in_subset, labels)
    assert s["score"][0].item() == 1.0 and s["score"][1].item() == 0.0 and math.isnan(s["score"][2].item())
    assert s["n_in"][0].item() + s["n_out"][0].item() == K
    # stderr: sqrt(a(1-a)/n_in + b(1-b)/n_out), here with a mixed example
    preds[:, 1] = torch.where(torch.arange(K) % 3 == 0, 7, 2).to(torch.int16)
    s = M.scores(preds, in_subset, labels)
    a, b = s["acc_in"][1].item(), s["acc_out"][1].item()
    want = math.sqrt(a * (1 - a) / s["n_in"][1].item() + b * (1 - b) / s["n_out"][1].item())
    assert s["stderr"][1].item() == want and math.isnan(M.median_stderr({"stderr": torch.tensor([math.nan])}))


def test_subsets_are_seeded_and_sized():
    a, b = M.subset_mask(3, 1000, 0.7), M.subset_mask(3, 1000, 0.7)
    assert torch.equal(a, b) and int(a.sum()) == 700 and not torch.equal(a, M.subset_mask(4, 1000, 0.7))


def test_stacked_training_equals_one_at_a_time(digits):
    """3 models, 2 epochs, a tiny mlp, float64: every parameter within 1e-9 of training the models
    one by one, and the same predictions."""
    x, y = digits.x_train[:200].double(), digits.y_train[:200]
    recipe = M.Recipe(width=16, epochs=2, batch_size=32)
    seeds = M.model_seeds(3)
    preds, stacked = M.train_stacked(recipe, seeds, x, y, 10)
    for k, s in enumerate(seeds):
        p1, params = M.train_one(recipe, s, x, y, 10)
        assert torch.equal(preds[k], p1)
        for name, v in params.items():
            assert (stacked[name][k] - v).abs().max().item() <= 1e-9, name
    # the models differ from each other (own subset, order and init)
    assert not torch.equal(stacked["head.weight"][0], stacked["head.weight"][1])
