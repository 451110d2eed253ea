"""The results store: declared Parquet schemas and the one atomic, idempotent fragment writer.

Layout (ARCHITECTURE.md, "Results store"):

    <results>/tables/<table>/sweep=<sweep>/<trial_key>.parquet   one fragment per trial and table
    <results>/figures/sweep=<sweep>/<trial_key>/<name>.png

`<results>` is a local path or any URI pyarrow.fs understands (s3://...). A fragment is written to
a temporary name in its directory and renamed, so a reader never sees half a file; the name is
the trial_key, so a retried or resumed trial overwrites its own fragment and no row is duplicated.
"""
from __future__ import annotations

import os
import re
import uuid
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

_units = pa.list_(pa.struct([("site", pa.int32()), ("unit", pa.int32())]))

SCHEMAS: dict[str, pa.Schema] = {
    "sweeps": pa.schema([("sweep", pa.string()), ("started_at", pa.timestamp("us", tz="UTC")),
                         ("finished_at", pa.timestamp("us", tz="UTC")), ("command", pa.string()),
                         ("preset", pa.string()), ("n_trials", pa.int32()), ("git_sha", pa.string()),
                         ("ray_address", pa.string())]),
    "trials": pa.schema([("sweep", pa.string()), ("trial_key", pa.string()), ("dataset", pa.string()),
                         ("arch", pa.string()), ("width", pa.int32()), ("noise_rate", pa.float64()),
                         ("dropout", pa.string()), ("p_gen", pa.float64()), ("p_mem", pa.float64()),
                         ("seed", pa.int32()), ("epochs", pa.int32()), ("status", pa.string()),
                         ("attempts", pa.int32()), ("wall_s", pa.float64()), ("device", pa.string()),
                         ("node_id", pa.string()), ("config_json", pa.string()), ("error", pa.string()),
                         ("epochs_done", pa.int32()), ("restored_from", pa.int32()), ("run_id", pa.string())]),
    "evals": pa.schema([("sweep", pa.string()), ("trial_key", pa.string()), ("epoch", pa.int32()),
                        ("mode", pa.string()), ("subset", pa.string()), ("accuracy", pa.float64()),
                        ("loss", pa.float64()), ("n", pa.int32())]),
    "gradients": pa.schema([("sweep", pa.string()), ("trial_key", pa.string()), ("epoch", pa.int32()),
                            ("layer_index", pa.int32()), ("layer_name", pa.string()),
                            ("clean_norm", pa.float64()), ("noisy_norm", pa.float64()),
                            ("cosine", pa.float64())]),
    "rewinding": pa.schema([("sweep", pa.string()), ("trial_key", pa.string()), ("layer_index", pa.int32()),
                            ("layer_name", pa.string()), ("rewind_epoch", pa.int32()), ("subset", pa.string()),
                            ("accuracy", pa.float64())]),
    "flips": pa.schema([("sweep", pa.string()), ("trial_key", pa.string()), ("example_id", pa.int64()),
                        ("is_noisy", pa.bool_()), ("given_label", pa.int32()), ("true_label", pa.int32()),
                        ("method", pa.string()), ("flipped", pa.bool_()), ("n_units", pa.int32()),
                        ("units", _units), ("post_clean_acc", pa.float64()), ("post_noisy_acc", pa.float64()),
                        ("post_test_acc", pa.float64())]),
}
SCHEMAS["retraining"] = SCHEMAS["rewinding"]
TABLES = tuple(SCHEMAS)
ANALYSIS_TABLE = {"gradients": "gradients", "rewind": "rewinding", "retrain": "retraining", "flip": "flips"}

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


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


def write_fragment(results: str, table: str, sweep: str, key: str, rows: Iterable[dict[str, Any]],
                   fs: pafs.FileSystem | None = None) -> str:
    """Atomically (over)write one fragment: temp name in the same directory, then rename."""
    if fs is None:
        fs, base = filesystem(results)
    else:
        base = results
    path = fragment_path(base, table, sweep, key)
    directory = path.rsplit("/", 1)[0]
    fs.create_dir(directory, recursive=True)
    tmp = f"{directory}/.tmp-{uuid.uuid4().hex}.parquet"
    pq.write_table(to_table(table, rows), tmp, filesystem=fs)
    fs.move(tmp, path)
    return path


def write_bytes(results: str, relpath: str, data: bytes) -> str:
    fs, base = filesystem(results)
    path = f"{base}/{relpath}"
    directory = path.rsplit("/", 1)[0]
    fs.create_dir(directory, recursive=True)
    tmp = f"{directory}/.tmp-{uuid.uuid4().hex}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)
    return path


def read_bytes(results: str, relpath: str) -> bytes:
    fs, base = filesystem(results)
    with fs.open_input_stream(f"{base}/{relpath}") as f:
        return f.read()


def exists(results: str, relpath: str) -> bool:
    fs, base = filesystem(results)
    return fs.get_file_info(f"{base}/{relpath}").type != pafs.FileType.NotFound


def default_mlflow_uri(results: str) -> str:
    """`sqlite:///<results>/mlflow.db` for a local results dir; `sqlite:///mlflow.db` in the working
    directory for a URI results dir (on a cluster, pass the head's server instead)."""
    if "://" in results:
        return "sqlite:///mlflow.db"
    return f"sqlite:///{os.path.abspath(results)}/mlflow.db"
