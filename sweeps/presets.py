"""Grid presets for `python -m sweeps.dropout_grid --preset NAME`.

Each preset is the set of axis values plus the base recipe. Every ETD cell has its no-ETD twin
(dropout none, the same recipe), so the grid always holds the plain baseline.
"""
from __future__ import annotations

PRESETS: dict[str, dict] = {
    # Seconds: for tests. digits, a narrow mlp, 3 epochs, tiny analysis budgets.
    "tiny": {
        "datasets": ["digits"], "archs": ["mlp"], "widths": [64], "noise": [0.1],
        "dropout": ["example_tied"], "p_gen": [0.2], "p_mem": [0.1], "seeds": [0], "epochs": 3,
        "analyses": ["gradients", "rewind", "retrain", "flip"],
        "base": {"analyses": {"snapshot_epochs": [0, 3], "retrain_max_epochs": 2, "flip_targets": 4,
                              "flip_budget": 8, "flip_reference": 16, "eval_samples": 64}},
    },
    # Under 2 minutes on 2 cores; meets the ETD acceptance thresholds on digits.
    "smoke": {
        "datasets": ["digits"], "archs": ["mlp"], "widths": [512], "noise": [0.1],
        "dropout": ["example_tied"], "p_gen": [0.2], "p_mem": [0.1], "seeds": [0], "epochs": 60,
        "analyses": ["gradients", "rewind", "retrain", "flip"],
        "base": {"analyses": {"snapshot_epochs": [0, 5, 60], "retrain_max_epochs": 5, "flip_targets": 16,
                              "flip_budget": 32, "flip_reference": 64, "eval_samples": 256}},
    },
    # The default sweep: both offline datasets x mlp and resnet9 x a p_mem grid, + plain twins.
    # p_gen per arch (`p_gen_by_arch`) unless --p-gen is given.
    "default": {
        "datasets": ["digits", "mnist1d"], "archs": ["mlp", "resnet9"], "widths": [None], "noise": [0.1],
        "dropout": ["example_tied"], "p_gen": [0.2], "p_mem": [0.1, 0.2], "seeds": [0], "epochs": None,
        # resnet9 needs 30 epochs to memorize mnist1d's noisy labels (15: 25% of them; 30: all, test 0.96)
        "epochs_by_arch": {"mlp": 60, "resnet9": 30},
        # resnet9 at its default width 16 has 16-128 channels per site: p_gen 0.2 leaves 3 generalization
        # channels at the first site and `drop` loses clean accuracy (test 0.85 digits, 0.35 mnist1d at
        # p_mem 0.1); p_gen 0.5 keeps 8, and drop mode forgets the noisy labels while clean and test
        # accuracy stay near the twin's (figures in the README, under Quickstart).
        "p_gen_by_arch": {"mlp": [0.2], "resnet9": [0.5]},
        "analyses": ["gradients", "rewind", "retrain", "flip"],
        "base": {"analyses": {"snapshot_epochs": [0, 2, 5, 15, 60], "retrain_max_epochs": 4, "flip_targets": 16,
                              "flip_budget": 32, "flip_reference": 64, "eval_samples": 256}},
    },
    # The authors' recipe on a GPU cluster (EXPERIMENTS.md, "The authors' recipe").
    "paper": {
        "datasets": ["mnist", "svhn", "cifar10"], "archs": ["resnet9", "resnet50", "vit_small"],
        "widths": [None], "noise": [0.05, 0.1, 0.2], "dropout": ["example_tied", "standard"],
        "p_gen": [0.1, 0.2, 0.4], "p_mem": [0.05, 0.1, 0.2], "seeds": [0, 1, 2], "epochs": None,
        "analyses": ["gradients", "rewind", "retrain", "flip"],
        "base": {"optim": {"lr": 0.1, "weight_decay": 5e-4, "batch_size": 512, "schedule": "onecycle"},
                 "analyses": {"snapshot_epochs": [0, 1, 2, 5, 10, 25, 50]},
                 # an ETD evaluation (3 modes on the training set) costs about an epoch of training
                 "eval_every": 5},
        "epochs_by_dataset": {"mnist": 100, "svhn": 50, "cifar10": 50},
    },
}
PAPER_RESNET9_WIDTH = 64  # the paper's ResNet-9 channels (64, 128, 256, 512)
