import pytest

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
    return {"gradients": grads, "rewinding": rew, "retraining": ret, "flips": flips}


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


def test_findings_from_rows():
    from analysis import findings

    rows = _rows()
    g = findings.gradient_findings(rows["gradients"], 0.1)
    assert g["noisy_grad_norm_share"]["fc1"] == pytest.approx(2 / 3)
    assert g["groups_with_negative_cosine"] == 2 and g["epochs_with_negative_cosine"]["fc1"] == []
    r = findings.rewinding_findings(rows["rewinding"], final_noisy=0.6)
    assert r["n_groups_keeping"] == 3  # 0.5 >= 0.8 * 0.6
    assert findings.rewinding_findings(rows["rewinding"], final_noisy=0.9)["n_groups_keeping"] == 0
    assert findings.retraining_findings(rows["retraining"])["n_groups_still_memorizing"] == 3
    f = findings.flip_findings(rows["flips"], test_before=0.9)
    # greedy noisy targets: ids 0, 2, 4 -> 3, 5, 7 units
    assert f["greedy_noisy_median"] == 5 and f["greedy_clean_median"] == 6 and f["greedy_sites"] == [0, 1, 2]
