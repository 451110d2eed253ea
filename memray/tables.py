"""The results store: declared Parquet schemas, the one atomic writer, and a store bound to a trial.

Layout (ARCHITECTURE.md, "Results store"):

    <results>/tables/<table>/sweep=<sweep>/<trial_key>.parquet   one fragment per trial and table
    <results>/figures/sweep=<sweep>/<trial_key>/<name>.png

`<results>` is a local path or any URI pyarrow.fs understands (s3://...). A fragment is written to
a temporary name in its directory and renamed, so a reader never sees half a file; the name is
the trial_key, so a retried or resumed trial overwrites its own fragment and no row is duplicated.
"""
from __future__ import annotations

import os
import uuid
from typing import Any, Callable, Iterable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .config import NAME_PATTERN as _NAME

_units = pa.list_(pa.struct([("site", pa.int32()), ("unit", pa.int32())]))

SCHEMAS: dict[str, pa.Schema] = {
    "sweeps": pa.schema([("sweep", pa.string()), ("started_at", pa.timestamp("us", tz="UTC")),
                         ("finished_at", pa.timestamp("us", tz="UTC")), ("command", pa.string()),
                         ("preset", pa.string()), ("n_trials", pa.int32()), ("git_sha", pa.string()),
                         ("ray_address", pa.string())]),
    "trials": pa.schema([("sweep", pa.string()), ("trial_key", pa.string()), ("protocol", pa.int32()),
                         ("dataset", pa.string()), ("arch", pa.string()), ("width", pa.int32()),
                         ("noise_rate", pa.float64()), ("noise_kind", pa.string()), ("data_seed", pa.int32()),
                         ("dropout", pa.string()), ("p_gen", pa.float64()), ("p_mem", pa.float64()),
                         ("seed", pa.int32()), ("epochs", pa.int32()), ("status", pa.string()),
                         ("attempts", pa.int32()), ("wall_s", pa.float64()), ("device", pa.string()),
                         ("node_id", pa.string()), ("config_json", pa.string()), ("error", pa.string()),
                         ("epochs_done", pa.int32()), ("restored_from", pa.int32()), ("run_id", pa.string()),
                         ("data_digest", pa.string())]),
    "evals": pa.schema([("sweep", pa.string()), ("trial_key", pa.string()), ("epoch", pa.int32()),
                        ("mode", pa.string()), ("subset", pa.string()), ("accuracy", pa.float64()),
                        ("loss", pa.float64()), ("n", pa.int32())]),
    "gradients": pa.schema([("sweep", pa.string()), ("trial_key", pa.string()), ("epoch", pa.int32()),
                            ("layer_index", pa.int32()), ("layer_name", pa.string()), ("aggregation", pa.string()),
                            ("clean_norm", pa.float64()), ("noisy_norm", pa.float64()),
                            ("control_norm", pa.float64()), ("cosine", pa.float64()),
                            ("control_cosine", pa.float64())]),
    "rewinding": pa.schema([("sweep", pa.string()), ("trial_key", pa.string()), ("layer_index", pa.int32()),
                            ("layer_name", pa.string()), ("rewind_epoch", pa.int32()), ("subset", pa.string()),
                            ("accuracy", pa.float64())]),
    "flips": pa.schema([("sweep", pa.string()), ("trial_key", pa.string()), ("example_id", pa.int64()),
                        ("target_kind", pa.string()), ("is_noisy", pa.bool_()), ("given_label", pa.int32()),
                        ("true_label", pa.int32()), ("method", pa.string()), ("flipped", pa.bool_()),
                        ("n_units", pa.int32()), ("units", _units),
                        *[(f"{w}_{s}_acc", pa.float64()) for w in ("pre", "post") for s in ("clean", "noisy", "test")],
                        ("site_units", pa.list_(pa.int32()))]),  # units per site the search could zero (finding 4c)
    # EXPERIMENTS.md section 7: `mode` is the mode R ran in (own/all; plain models: plain), `track`
    # decoy/all (plain models: none), `chance` |truth| / |candidates|, `lift` precision / chance
    "localization": pa.schema([("sweep", pa.string()), ("trial_key", pa.string()), ("example_id", pa.int64()),
                               ("target_kind", pa.string()), ("mode", pa.string()), ("method", pa.string()),
                               ("k", pa.int32()), ("n_candidates", pa.int32()), ("n_truth", pa.int32()),
                               ("precision", pa.float64()), ("recall", pa.float64()), ("flipped", pa.bool_()),
                               ("units_to_flip", pa.int32()), ("post_ref_acc", pa.float64()),
                               ("post_test_acc", pa.float64()), ("seconds", pa.float64()), ("track", pa.string()),
                               ("chance", pa.float64()), ("lift", pa.float64()), ("auroc", pa.float64()),
                               ("given_before", pa.bool_()), ("logp_drop", pa.float64())]),
    "etd_examples": pa.schema([("sweep", pa.string()), ("trial_key", pa.string()), ("example_id", pa.int64()),
                               ("is_noisy", pa.bool_()), ("own_correct", pa.bool_()), ("all_correct", pa.bool_()),
                               ("drop_correct", pa.bool_())]),
    # every trial: the free memorization proxy (EXPERIMENTS.md section 8), from the training pass
    "example_stats": pa.schema([("sweep", pa.string()), ("trial_key", pa.string()), ("example_id", pa.int64()),
                                ("is_noisy", pa.bool_()), ("cum_loss", pa.float64()), ("learn_epoch", pa.int32())]),
}
SCHEMAS["memscore_models"] = pa.schema([("sweep", pa.string()), ("trial_key", pa.string()), ("model_index", pa.int32()),
                                        ("subset_seed", pa.int64()), ("predictions", pa.list_(pa.int16()))])
# one fragment per scoring sweep, named after it (like `sweeps`); undefined scores (n_in or n_out 0) are null
SCHEMAS["memscores"] = pa.schema([("sweep", pa.string()), ("protocol", pa.int32()), ("data_digest", pa.string()),
                                  ("dataset", pa.string()), ("noise_rate", pa.float64()),
                                  ("noise_kind", pa.string()), ("data_seed", pa.int32()), ("arch", pa.string()),
                                  ("width", pa.int32()), ("models", pa.int32()), ("subset_fraction", pa.float64()),
                                  ("example_id", pa.int64()), ("is_noisy", pa.bool_()), ("given_label", pa.int32()),
                                  ("true_label", pa.int32()), ("n_in", pa.int32()), ("n_out", pa.int32()),
                                  ("acc_in", pa.float64()), ("acc_out", pa.float64()), ("score", pa.float64()),
                                  ("stderr", pa.float64())])
SCHEMAS["retraining"] = pa.schema([*SCHEMAS["rewinding"], ("epochs_run", pa.int32()), ("converged", pa.bool_())])



def check_name(kind: str, name: str) -> str:
    """User-supplied names become path parts only after this check."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise ValueError(f"{kind} name {name!r} is invalid: use 1-128 letters, digits, '_', '-' or '.', "
                         f"starting with a letter or digit")
    return name


def filesystem(results: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, base path) for a local path or a URI."""
    if "://" in results:
        return pafs.FileSystem.from_uri(results)
    return pafs.LocalFileSystem(), os.path.abspath(results)


def fragment_rel(table: str, sweep: str, key: str) -> str:
    return f"tables/{table}/sweep={check_name('sweep', sweep)}/{check_name('trial_key', key)}.parquet"


def fragment_path(base: str, table: str, sweep: str, key: str) -> str:
    return f"{base}/{fragment_rel(table, sweep, key)}"


def read_fragment(results: str, table: str, sweep: str, key: str) -> list[dict[str, Any]]:
    """One fragment's rows (with the declared schema; the `sweep` column is stored in the file)."""
    fs, base = filesystem(results)
    return pq.read_table(fragment_path(base, table, sweep, key), filesystem=fs, schema=SCHEMAS[table]).to_pylist()


def to_table(table: str, rows: Iterable[dict[str, Any]]) -> pa.Table:
    schema = SCHEMAS[table]
    rows = list(rows)
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)


def atomic_write(fs: pafs.FileSystem, path: str, data: bytes | Callable[[Any], None]) -> str:
    """The one way this project writes a file: to a temporary name in the same directory, then a
    rename, so a reader sees the old file or the new one, never half of one. `data` is the bytes,
    or a function that writes them to the open output stream (a large table streams out)."""
    directory = path.rsplit("/", 1)[0]
    fs.create_dir(directory, recursive=True)
    tmp = f"{directory}/.tmp-{uuid.uuid4().hex}"
    with fs.open_output_stream(tmp) as f:
        data(f) if callable(data) else f.write(data)
    fs.move(tmp, path)
    return path


def write_local(path: str | os.PathLike, data: bytes) -> str:
    """`atomic_write` for a local path."""
    return atomic_write(pafs.LocalFileSystem(), os.path.abspath(path), data)


def write_fragment(results: str, table: str, sweep: str, key: str, rows: Iterable[dict[str, Any]] | pa.Table) -> str:
    """Atomically (over)write one fragment: rows, or an Arrow table with the declared schema."""
    fs, base = filesystem(results)
    data = rows if isinstance(rows, pa.Table) else to_table(table, rows)
    if not data.schema.equals(SCHEMAS[table]):
        raise ValueError(f"a {table} fragment must have the declared schema {SCHEMAS[table]}, not {data.schema}")
    return atomic_write(fs, fragment_path(base, table, sweep, key), lambda f: pq.write_table(data, f))


def read_predictions(results: str, sweep: str, keys: list[str]) -> tuple[Any, list[int]]:
    """A scoring sweep's models, in model order: ((K, N) int16 predictions, subset seeds), read as
    Arrow buffers (no Python object per prediction)."""
    import numpy as np

    fs, base = filesystem(results)
    parts = [pq.read_table(fragment_path(base, "memscore_models", sweep, k), filesystem=fs,
                           columns=["model_index", "subset_seed", "predictions"]) for k in keys]
    t = pa.concat_tables(parts).sort_by("model_index")
    lists = t.column("predictions").combine_chunks()
    n = len(lists[0]) if len(lists) else 0
    preds = np.array(lists.flatten().to_numpy().reshape(len(lists), n), dtype=np.int16)  # writable, for torch
    return preds, t.column("subset_seed").to_pylist()


def write_bytes(results: str, relpath: str, data: bytes) -> str:
    fs, base = filesystem(results)
    return atomic_write(fs, f"{base}/{relpath}", data)


def read_bytes(results: str, relpath: str) -> bytes:
    fs, base = filesystem(results)
    with fs.open_input_stream(f"{base}/{relpath}") as f:
        return f.read()


def exists(results: str, relpath: str) -> bool:
    fs, base = filesystem(results)
    return fs.get_file_info(f"{base}/{relpath}").type != pafs.FileType.NotFound


def finished_row(results: str, sweep: str, key: str, run_id: str | None) -> dict[str, Any] | None:
    """The trial's `trials` row if this sweep invocation (`run_id`; a --resume keeps it) ended it,
    else None: a row left by an earlier run of the same sweep name does not count."""
    if run_id is None or not exists(results, fragment_rel("trials", sweep, key)):
        return None
    rows = read_fragment(results, "trials", sweep, key)
    return rows[0] if rows and rows[0].get("run_id") == run_id else None


class TrialStore:
    """The results store bound to one trial: its table fragments, figures and weight snapshots."""

    def __init__(self, results: str, sweep: str, key: str):
        self.results, self.sweep, self.key = results, check_name("sweep", sweep), check_name("trial_key", key)

    def write(self, table: str, rows: Iterable[dict[str, Any]]) -> str:
        tag = {"sweep": self.sweep, "trial_key": self.key}
        return write_fragment(self.results, table, self.sweep, self.key, ({**tag, **r} for r in rows))

    def has(self, table: str) -> bool:
        return exists(self.results, fragment_rel(table, self.sweep, self.key))

    def read(self, table: str) -> list[dict[str, Any]]:
        """The trial's rows of `table` ([] when it wrote none)."""
        return read_fragment(self.results, table, self.sweep, self.key) if self.has(table) else []

    def finished(self, run_id: str | None) -> dict[str, Any] | None:
        """Its `trials` row if this sweep invocation already finished it (status done)."""
        row = finished_row(self.results, self.sweep, self.key, run_id)
        return row if row is not None and row["status"] == "done" else None

    def write_figure(self, name: str, png: bytes) -> str:
        return write_bytes(self.results, f"figures/sweep={self.sweep}/{self.key}/{name}.png", png)

    def _snapshot_rel(self, epoch: int) -> str:
        return f"snapshots/sweep={self.sweep}/{self.key}/epoch={int(epoch)}.pt"

    def write_snapshot(self, epoch: int, data: bytes) -> str:
        return write_bytes(self.results, self._snapshot_rel(epoch), data)

    def read_snapshot(self, epoch: int) -> bytes:
        return read_bytes(self.results, self._snapshot_rel(epoch))


def read_memscores(results: str, sweep: str, columns: list[str] | None = None) -> pa.Table:
    """A scoring sweep's `memscores` (one fragment, named after the sweep); a clear error when the
    sweep has none."""
    rel = fragment_rel("memscores", sweep, sweep)
    if not exists(results, rel):
        raise ValueError(f"memscores={sweep!r} is invalid: no memorization scores of that sweep under {results} "
                         f"(compute them first: python -m sweeps.memorization_scores --name {sweep} "
                         f"--results-dir {results})")
    fs, base = filesystem(results)
    return pq.read_table(f"{base}/{rel}", filesystem=fs, columns=columns)


MEMSCORES_MATCH = ("dataset", "noise_rate", "noise_kind", "data_seed")  # EXPERIMENTS.md section 8


def check_memscores(results: str, sweep: str, data, n_train: int | None = None,
                    columns: tuple[str, ...] = (), digest: str | None = None) -> pa.Table:
    """The scores a grid names must be of its data and protocol: the same protocol, dataset, noise
    rate and kind, data seed (when given, training-set size and data digest: the given labels and
    noise mask, which protocol 3's streams changed). Raises ValueError naming the first that
    differs; returns the table (the match columns and `columns`), read once."""
    from .config import PROTOCOL

    t = read_memscores(results, sweep, list(dict.fromkeys(["protocol", "data_digest", *MEMSCORES_MATCH, *columns])))
    first = t.slice(0, 1).to_pylist()[0] if t.num_rows else {}
    if first.get("protocol") != PROTOCOL:
        raise ValueError(f"memscores={sweep!r} does not match: its protocol is {first.get('protocol')!r}, this code "
                         f"runs protocol {PROTOCOL} (score the data again under it)")
    if digest is not None and first.get("data_digest") != digest:
        raise ValueError(f"memscores={sweep!r} does not match: its data_digest is {first.get('data_digest')!r}, the "
                         f"trial's is {digest!r} (other labels or another noisy set: score the same data)")
    for name in MEMSCORES_MATCH:
        theirs, ours = first.get(name), getattr(data, name)
        same = (theirs is not None and abs(theirs - ours) < 1e-12) if name == "noise_rate" else theirs == ours
        if not same:
            raise ValueError(f"memscores={sweep!r} does not match: its {name} is {theirs!r}, the trial's is {ours!r} "
                             f"(scores are per example of one noisy training set: score the same data)")
    if n_train is not None and t.num_rows != n_train:
        raise ValueError(f"memscores={sweep!r} does not match: it scores {t.num_rows} training examples, the "
                         f"trial's training set has {n_train} (train_limit)")
    return t


def default_mlflow_uri(results: str) -> str:
    """`sqlite:///<results>/mlflow.db` for a local results dir; `sqlite:///mlflow.db` in the working
    directory for a URI results dir (on a cluster, pass the head's server instead)."""
    if "://" in results:
        return "sqlite:///mlflow.db"
    return f"sqlite:///{os.path.abspath(results)}/mlflow.db"
