"""Grid presets for `python -m sweeps.dropout_grid --preset NAME`.

Each preset is the set of axis values plus the base recipe. Every ETD cell has its no-ETD twin
(dropout none, the same recipe), so the grid always holds the plain baseline. Verdicts pool a
cell's seeds (at least 3, EXPERIMENTS.md), so every preset but `tiny` and `smoke` has three.

ETD's p_gen per arch follows a rule fixed before any run, not test accuracy: the paper's 0.2
unless it leaves fewer than 8 generalization units at some site of the default width; then the
smallest of 0.3, 0.4, 0.5 that leaves 8 (`P_GEN_RULE`; tests check the table against the
models). mlp at width 512: 0.2 (102 units a site); resnet9 at width 16 (16-64 channels a site):
0.5 (8 at its 16-channel first site). Widths are the architectures' defaults (CPU-sized).
"""
from __future__ import annotations

P_GEN_RULE = {"min_units": 8, "candidates": (0.2, 0.3, 0.4, 0.5)}
P_GEN_BY_ARCH = {"mlp": [0.2], "resnet9": [0.5]}

FLIP_BUDGETS = {"flip_targets": 16, "flip_budget": 32, "flip_reference": 64, "eval_samples": 256}

PRESETS: dict[str, dict] = {
    # Seconds: for tests. digits, a narrow mlp, 3 epochs, tiny analysis budgets (plumbing only:
    # the one preset whose retraining budget is not the authors').
    "tiny": {
        "datasets": ["digits"], "archs": ["mlp"], "widths": [64], "noise": [0.1],
        "dropout": ["example_tied"], "p_gen": [0.2], "p_mem": [0.1], "seeds": [0], "epochs": 3,
        "analyses": ["gradients", "rewind", "retrain", "flip", "localize"],
        "base": {"analyses": {"retrain_max_epochs": 2, "flip_targets": 4, "flip_budget": 8, "flip_reference": 16,
                              "eval_samples": 64, "localize_targets": 2, "localize_reference": 8,
                              "localize_budget": 8, "localize_k": [4], "ig_steps": 16}},
    },
    # Under 2 minutes on 2 cores: digits, mlp, ETD vs its plain twin, one seed.
    "smoke": {
        "datasets": ["digits"], "archs": ["mlp"], "widths": [512], "noise": [0.1],
        "dropout": ["example_tied"], "p_gen": [0.2], "p_mem": [0.1], "seeds": [0], "epochs": 60,
        "analyses": ["gradients", "rewind", "retrain", "flip"],
        "base": {"analyses": dict(FLIP_BUDGETS)},
    },
    # The default sweep (`make sweep`): digits x mlp and resnet9 x (plain twin, ETD p_mem 0.1) x 3 seeds.
    "default": {
        "datasets": ["digits"], "archs": ["mlp", "resnet9"], "widths": [None], "noise": [0.1],
        "dropout": ["example_tied"], "p_gen": [0.2], "p_mem": [0.1], "seeds": [0, 1, 2], "epochs": None,
        "epochs_by_arch": {"mlp": 60, "resnet9": 30},
        "p_gen_by_arch": P_GEN_BY_ARCH,
        "analyses": ["gradients", "rewind", "retrain", "flip", "localize"],
        "base": {"analyses": dict(FLIP_BUDGETS)},
    },
    # The grid the default preset had before protocol 2, with 3 seeds: both offline datasets, p_mem
    # 0.1 and 0.2. No time bound (about an hour on 2 cores).
    "full": {
        "datasets": ["digits", "mnist1d"], "archs": ["mlp", "resnet9"], "widths": [None], "noise": [0.1],
        "dropout": ["example_tied"], "p_gen": [0.2], "p_mem": [0.1, 0.2], "seeds": [0, 1, 2], "epochs": None,
        # resnet9 needs 30 epochs to memorize mnist1d's noisy labels (15: 25% of them; 30: all)
        "epochs_by_arch": {"mlp": 60, "resnet9": 30},
        "p_gen_by_arch": P_GEN_BY_ARCH,
        "analyses": ["gradients", "rewind", "retrain", "flip", "localize"],
        "base": {"analyses": dict(FLIP_BUDGETS)},
    },
    # The authors' recipe on a GPU cluster (EXPERIMENTS.md, "The authors' recipe"): SGD momentum
    # 0.9, peak lr 0.1, weight decay 5e-4, batch 512, a one-cycle (linear warm-up, linear decay)
    # schedule rather than their cosine with warm-up, stated here.
    "paper": {
        "datasets": ["mnist", "svhn", "cifar10"], "archs": ["resnet9", "resnet50", "vit_small"],
        "widths": [None], "noise": [0.05, 0.1, 0.2], "dropout": ["example_tied", "standard"],
        "p_gen": [0.1, 0.2, 0.4], "p_mem": [0.05, 0.1, 0.2], "seeds": [0, 1, 2], "epochs": None,
        "analyses": ["gradients", "rewind", "retrain", "flip", "localize"],
        "base": {"optim": {"lr": 0.1, "weight_decay": 5e-4, "batch_size": 512, "schedule": "onecycle"},
                 "analyses": {"snapshot_epochs": [10, 25]},
                 # an ETD evaluation (3 modes on the training set) costs about an epoch of training
                 "eval_every": 5},
        "epochs_by_dataset": {"mnist": 100, "svhn": 50, "cifar10": 50},
    },
}
PAPER_RESNET9_WIDTH = 64  # the authors' ResNet-9 channels (64, 128, 128, 128, 256, 256, 256, 128)
