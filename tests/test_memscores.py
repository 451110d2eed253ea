"""Memorization scores (EXPERIMENTS.md section 8): the estimator on known answers, stacked training."""
import math

import torch

from memray import memscores as M
from memray.config import ScoreConfig


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


def assert_stacked_equals_one_at_a_time(recipe, seeds, x, y):
    """Every parameter of the stacked models within 1e-9 of the same models trained one by one,
    and the same predictions; returns the stacked parameters."""
    preds, stacked = M.train_stacked(recipe, seeds, x, y, 10)
    for k, s in enumerate(seeds):
        p1, params = M.train_one(recipe, s, x, y, 10)
        assert torch.equal(preds[k], p1)
        for name, v in params.items():
            assert (stacked[name][k] - v).abs().max().item() <= 1e-9, name
    return stacked


def test_stacked_training_equals_one_at_a_time(digits):
    """3 models, 2 epochs, a tiny mlp (batched matmuls), float64."""
    x, y = digits.x_train[:200].double(), digits.y_train[:200]
    recipe = ScoreConfig(width=16, epochs=2, batch_size=32)
    assert M.Stacked(recipe, M.model_seeds(3), x, y, 10).bmm
    stacked = assert_stacked_equals_one_at_a_time(recipe, M.model_seeds(3), x, y)
    # the models differ from each other (own subset, order and init)
    assert not torch.equal(stacked["head.weight"][0], stacked["head.weight"][1])


def test_stacked_vmap_path_equals_one_at_a_time_for_a_conv_net(digits):
    """Stackable models other than the mlp (no BatchNorm: lenet) train through torch.func's vmap;
    the same equality holds (2 models, 1 epoch, float64)."""
    x, y = digits.x_train[:96].double(), digits.y_train[:96]
    recipe = ScoreConfig(arch="lenet", width=4, epochs=1, batch_size=32)
    assert not M.Stacked(recipe, M.model_seeds(2, base_seed=5), x, y, 10).bmm
    assert_stacked_equals_one_at_a_time(recipe, M.model_seeds(2, base_seed=5), x, y)


def test_batchnorm_models_train_one_at_a_time():
    assert M.stackable(ScoreConfig(arch="mlp", width=8), (1, 8, 8), 10)
    assert M.stackable(ScoreConfig(arch="lenet", width=4), (1, 8, 8), 10)
    assert not M.stackable(ScoreConfig(arch="resnet9", width=8), (1, 8, 8), 10)


def test_a_scoring_run_resumed_from_its_state_ends_with_the_same_predictions(digits, tmp_path):
    """ScoringRun saved after 2 of 4 epochs and restored into a fresh run: the same predictions
    as the uninterrupted run, stacked and one at a time (a conv net with BatchNorm)."""
    from memray.config import DataConfig, ScoreConfig

    data = digits
    for arch, width in (("mlp", 16), ("resnet9", 4)):
        cfg = ScoreConfig(data=DataConfig(dataset="digits", noise_rate=0.1), arch=arch, width=width, epochs=4,
                          count=2).validate()
        whole = M.ScoringRun(cfg, data)
        for _ in whole.steps():
            pass
        part = M.ScoringRun(cfg, data)
        steps = part.steps()
        next(steps)
        part.save(tmp_path / "state.pt")
        again = M.ScoringRun(cfg, data)
        again.restore(tmp_path / "state.pt")
        assert again.restored_from == 1 and again.stacked == (arch == "mlp")
        for _ in again.steps():
            pass
        assert torch.equal(again.predictions(), whole.predictions()), arch
        t = again.table("s")
        assert t.column("model_index").to_pylist() == [0, 1] and len(t.column("predictions")[0]) == 1400
