"""python -m analysis.sync_mlflow: rebuild or complete the MLflow view from the Parquet tables.

Parquet is the source of truth; MLflow is a view of it (ARCHITECTURE.md, "MLflow"). When the
tracking server was unreachable during a sweep (trials never fail over it), or to move runs to
another tracking server, this logs every trial of the chosen sweeps from the tables: experiment =
sweep, one parent run per sweep, one child per trial tagged trial_key (existing runs are reused,
never duplicated), params = the flattened config, `<mode>/<subset>/accuracy` per epoch (step =
epoch), the finals, the trial's figures as artifacts, and the run status from `trials`.

    python -m analysis.sync_mlflow --results-dir results
    python -m analysis.sync_mlflow --results-dir s3://bucket/prefix --mlflow-uri http://127.0.0.1:5000
"""
from __future__ import annotations

import argparse
import json
import sys

from mlflow.tracking import MlflowClient

from memray.config import ExperimentConfig
from memray.exiting import exiting
from memray.mlflow_view import TRIALS_FILTER, MlflowView, runs_link
from memray.summary import flip_summary, layer_summary, localization_summary, memscore_summary
from memray.tables import default_mlflow_uri, exists, read_bytes

from .findings import verdict_files
from .store import StoreError, open_store


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis.sync_mlflow", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", default="results", help="local path or URI [results]")
    p.add_argument("--sweep", action="append", default=None, help="a sweep to sync (repeat for several) [all]")
    p.add_argument("--mlflow-uri", default=None, help="tracking URI [sqlite:///<results>/mlflow.db]")
    p.add_argument("--skip-corrupt", action="store_true", help="leave out unreadable fragments (named)")
    return p


def sync_scores(store, results: str, uri: str, sweep: str) -> int:
    """A scoring sweep's MLflow run from its `memscores` rows and figures; returns its model count."""
    rows = store.rows("select * from memscores where sweep = ? order by example_id", [sweep])
    first = rows[0]
    params = {"data.dataset": first["dataset"], "data.noise_rate": first["noise_rate"],
              "data.noise_kind": first["noise_kind"], "data.data_seed": first["data_seed"], "arch": first["arch"],
              "width": first["width"], "subset_fraction": first["subset_fraction"], "models": first["models"]}
    figures = {}
    for name in ("scores", "top_scoring"):
        rel = f"figures/sweep={sweep}/{sweep}/{name}.png"
        if exists(results, rel):
            figures[name] = read_bytes(results, rel)
    MlflowView(uri, sweep).log_memscores(params, memscore_summary(rows), figures)
    return int(first["models"])


def sync(results: str, uri: str, sweeps: list[str] | None = None, skip_corrupt: bool = False) -> dict[str, int]:
    """Log the sweeps' trials (a scoring sweep: its summary) to MLflow; returns {sweep: trials
    (models) synced}."""
    store = open_store(results, skip_corrupt=skip_corrupt)
    known = [r["sweep"] for r in store.rows("select distinct sweep from trials order by sweep")]
    scored = [r["sweep"] for r in store.rows("select distinct sweep from memscores order by sweep")]
    unknown = [s for s in (sweeps or []) if s not in known + scored]
    if unknown:
        raise ValueError(f"--sweep={unknown[0]!r} is invalid: sweeps with trials or scores under {results}: "
                         f"{known + scored}")
    out = {}
    for sweep in [s for s in sweeps or scored if s in scored]:
        out[sweep] = sync_scores(store, results, uri, sweep)
    for sweep in [s for s in sweeps or known if s in known]:
        view = MlflowView(uri, sweep)
        trials = store.rows("select trial_key, status, config_json, data_digest from trials where sweep = ? "
                            "order by trial_key", [sweep])
        for t in trials:
            cfg = ExperimentConfig.from_dict(json.loads(t["config_json"]))  # once per trial
            run_id = view.child(t["trial_key"], cfg)
            evals = store.rows("select epoch, mode, subset, accuracy from evals where sweep = ? and trial_key = ? "
                               "order by epoch", [sweep, t["trial_key"]])
            by_epoch: dict[int, dict[str, float]] = {}
            for r in evals:
                by_epoch.setdefault(int(r["epoch"]), {})[f"{r['mode']}/{r['subset']}/accuracy"] = r["accuracy"]
            if by_epoch and t["status"] == "done":
                last = max(by_epoch)
                tabs = {name: store.rows(f"select * from {name} where sweep = ? and trial_key = ?", [sweep, t["trial_key"]])
                        for name in ("flips", "localization", "rewinding", "retraining", "gradients")}
                summary = {**flip_summary(tabs["flips"]), **localization_summary(tabs["localization"]),
                           **layer_summary(tabs)}
                by_epoch[last] = {**by_epoch[last], **{f"final/{k}": v for k, v in by_epoch[last].items()},
                                  **{k: v for k, v in summary.items() if v == v}}
            view.log_metrics(run_id, by_epoch)
            view.log_dataset(run_id, cfg, t["data_digest"])
            view.log_figures(run_id, results, t["trial_key"])
            view.client.set_terminated(run_id, {"done": "FINISHED", "failed": "FAILED"}.get(t["status"], "KILLED"))
        view.log_files(view.parent_id, verdict_files(store, sweep))
        view.close("FAILED" if any(t["status"] == "failed" for t in trials) else "FINISHED")
        out[sweep] = len(trials)
    return out


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    uri = args.mlflow_uri or default_mlflow_uri(args.results_dir)
    try:
        done = sync(args.results_dir, uri, args.sweep, args.skip_corrupt)
        client = MlflowClient(tracking_uri=uri)
        links = {}
        for sweep in done:
            exp = client.get_experiment_by_name(sweep)
            if exp is not None:
                trials = bool(client.search_runs([exp.experiment_id], TRIALS_FILTER, max_results=1))
                links[sweep] = runs_link(uri, exp.experiment_id, trials)
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 -- the tracking store failed: say so, the tables are intact
        print(f"error: MLflow at {uri} failed ({type(e).__name__}: {e}); the Parquet tables are unchanged",
              file=sys.stderr)
        return 1
    for sweep, n in done.items():
        print(f"synced sweep {sweep!r}: {n} trials (models, for a scoring sweep) -> {uri}")
        if sweep in links:
            print(f"  its runs in MLflow's UI: {links[sweep]}")
    return 0


if __name__ == "__main__":
    sys.exit(exiting(main()))
