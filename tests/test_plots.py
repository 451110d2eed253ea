from memray import plots

GROUPS = [(0, "fc1"), (1, "fc2"), (2, "head")]


def _rows():
    grads = [{"epoch": e, "layer_index": g, "layer_name": n, "clean_norm": 1.0 / e, "noisy_norm": 2.0 / e,
              "cosine": -0.1 * g} for e in (1, 2, 3) for g, n in GROUPS]
    rew = [{"layer_index": g, "layer_name": n, "rewind_epoch": e, "subset": s, "accuracy": 0.5}
           for g, n in GROUPS for e in (0, 3) for s in ("train_clean", "train_noisy", "test")]
    ret = [{"layer_index": g, "layer_name": n, "rewind_epoch": 0, "subset": s, "accuracy": 0.7}
           for g, n in GROUPS for s in ("train_clean", "train_noisy", "train_noisy_true", "test")]
    flips = [{"example_id": i, "is_noisy": i % 2 == 0, "method": m, "flipped": True, "n_units": 3 + i,
              "units": [{"site": i % 3, "unit": 1}], "post_test_acc": 0.88} for i in range(6) for m in ("greedy", "random")]
    loc = [{"example_id": i, "target_kind": "noisy" if i % 2 else "clean", "track": t, "method": m, "k": k,
            "n_truth": 12, "chance": 0.5 if t == "decoy" else 0.1, "precision": 0.5, "auroc": 0.6,
            "flipped": True if t == "decoy" else None, "units_to_flip": 3 + i if t == "decoy" else None, "seconds": 0.01}
           for i in range(4) for t in ("decoy", "all") for m in ("greedy", "mask_only") for k in (8, 12)]
    return {"gradients": grads, "rewinding": rew, "retraining": ret, "flips": flips, "localization": loc}


def test_every_figure_is_labelled_and_has_a_legend():
    rows = _rows()
    for name, fn in plots.FIGURES.items():
        fig = fn(rows[name], "t")
        for ax in fig.axes:
            if ax.get_label() == "<colorbar>":
                continue
            assert ax.get_xlabel() and ax.get_ylabel(), (name, ax.get_title())
        legends = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
        if name == "gradients":
            assert legends == ["fc1", "fc2", "head"]
        if name == "flips":
            assert "noisy (3/3 flipped)" in legends and "clean (3/3 flipped)" in legends
        if name == "localization":  # bars per track (methods on x), then the units-to-flip CDF's legend
            assert legends == ["greedy", "mask_only"]
            assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["greedy", "mask_only"]
        if name == "retraining":
            assert legends == ["train_clean", "train_noisy", "train_noisy_true", "test"]
        if name == "rewinding":
            # two heatmaps: noisy then clean, groups on y, epochs on x
            titles = [ax.get_title() for ax in fig.axes if ax.get_label() != "<colorbar>"]
            assert titles == ["train_noisy accuracy after rewinding", "train_clean accuracy after rewinding"]
            assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["fc1", "fc2", "head"]


def test_trial_figures_are_pngs_for_the_tables_present():
    rows = _rows()
    out = plots.trial_figures({"gradients": rows["gradients"], "flips": [], "rewinding": rows["rewinding"]})
    assert sorted(out) == ["gradients", "rewinding"]
    assert all(b[:8] == b"\x89PNG\r\n\x1a\n" and len(b) > 10_000 for b in out.values())


def test_report_figures_are_labelled():
    """The report's pooled figures: gradient norms with the control, the rewinding-class map, flip
    collateral, ETD curves; and the trial's examples figure (images and 1-D signals)."""
    import numpy as np

    rows = _rows()
    grads = [{**r, "control_norm": 0.5 / r["epoch"], "control_cosine": 0.0} for r in rows["gradients"]]
    fig = plots.gradient_control_figure(grads, "t")
    assert [ax.get_title() for ax in fig.axes] == ["noisy / clean aggregate norm", "noisy / control norm",
                                                   "cosine clean/noisy (solid), control (dotted)"]
    fig = plots.class_map_figure(["fc1", "head"], [0, 5], [["redundant", "critical"], ["partial", ""]], "m")
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["fc1", "head"]
    assert fig.axes[0].get_xlabel() == "rewound to epoch"
    fig = plots.flip_cost_figure({"noisy": [0.0, 0.01], "clean": [0.02, 0.05]})
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["noisy", "clean"]
    evals = [{"epoch": e, "mode": m, "subset": s, "accuracy": 0.5} for e in (1, 2) for m in ("own", "drop", "plain")
             for s in ("train_clean", "train_noisy", "train_noisy_true", "test")]
    fig = plots.etd_curves_figure(evals)
    assert [ax.get_title() for ax in fig.axes] == ["train_clean", "train_noisy", "train_noisy_true", "test"]
    assert [t.get_text() for t in fig.axes[-1].get_legend().get_texts()] == ["plain twin", "own", "drop"]
    for x in (np.zeros((3, 1, 8, 8)), np.zeros((2, 1, 40))):
        fig = plots.examples_figure({"forgotten": (x, ["a"] * len(x)), "kept": (x[:1], ["b"])})
        assert fig.axes[0].get_ylabel() == "forgotten" and fig.axes[len(x)].get_ylabel() == "kept"
        assert plots.png(fig)[:8] == b"\x89PNG\r\n\x1a\n"


def test_pareto_front_keeps_the_non_dominated_points():
    # (drop train_noisy: lower is better, drop test: higher is better)
    points = [(0.1, 0.9), (0.2, 0.95), (0.05, 0.8), (0.2, 0.85), (0.1, 0.9)]
    assert plots.pareto_front(points) == [0, 1, 2, 4]  # (0.2, 0.85) is dominated; ties both kept
    fig = plots.pareto_figure(points, list("abcde"))
    assert fig.axes[0].get_xlabel().startswith("drop train_noisy")


def test_png_draws_once_and_gives_savefigs_pixels():
    import io

    import matplotlib.figure
    from matplotlib.image import imread

    rows = _rows()
    draws = []
    real = matplotlib.figure.Figure.draw

    def counting(self, renderer):
        draws.append(self)
        return real(self, renderer)

    for name, fn in plots.FIGURES.items():
        a, b = fn(rows[name], "t"), fn(rows[name], "t")  # both after tight_layout
        buf = io.BytesIO()
        a.savefig(buf, format="png", dpi=110)
        matplotlib.figure.Figure.draw = counting
        try:
            got = plots.png(b)
        finally:
            matplotlib.figure.Figure.draw = real
        want = imread(io.BytesIO(buf.getvalue()))
        have = imread(io.BytesIO(got))
        assert have.shape == want.shape and (have == want).all(), name
        assert len(draws) == 1, (name, len(draws))
        draws.clear()
