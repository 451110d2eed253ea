"""Read the results store: every table across all sweeps, with its declared schema, in DuckDB.

Fragments are listed through pyarrow.fs (local paths and URIs such as s3://... alike), each
fragment's footer is checked, and each table becomes a pyarrow dataset registered in one DuckDB
connection under the table's name (DuckDB scans it lazily, pushing projections and filters down).
A table with no fragments yet is an empty view with the declared columns, so queries still run.

A corrupt fragment is an error naming the file, unless the caller asks to skip corrupt fragments;
then each skipped file is reported. Temporary files of in-progress writes (`.tmp-*`) are never read.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from memray.tables import SCHEMAS, filesystem


class StoreError(Exception):
    """The results store cannot be read as asked (missing, corrupt fragment): the message says why."""


@dataclass
class Store:
    con: duckdb.DuckDBPyConnection
    results: str
    files: dict[str, list[str]] = field(default_factory=dict)  # table -> fragment paths
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def rows(self, sql: str, params=None) -> list[dict]:
        rel = self.con.execute(sql, params or [])
        cols = [d[0] for d in rel.description]
        return [dict(zip(cols, r)) for r in rel.fetchall()]


def list_fragments(fs: pafs.FileSystem, base: str, table: str) -> list[str]:
    info = fs.get_file_info(f"{base}/tables/{table}")
    if info.type == pafs.FileType.NotFound:
        return []
    sel = pafs.FileSelector(f"{base}/tables/{table}", recursive=True)
    return sorted(i.path for i in fs.get_file_info(sel)
                  if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
                  and not i.base_name.startswith(".tmp-"))


def _check(fs: pafs.FileSystem, path: str, table: str) -> str | None:
    """None if the fragment is readable Parquet holding the declared columns, else the reason."""
    try:
        with fs.open_input_file(path) as f:
            schema = pq.ParquetFile(f).schema_arrow
    except (OSError, ValueError) as e:  # ArrowInvalid (a ValueError) or OSError: truncated, not Parquet
        return f"{type(e).__name__}: {e}"
    # Columns added to a table later are absent from older fragments: they read as nulls. A column
    # that is present must have its declared type.
    declared = SCHEMAS[table]
    wrong = [f"{f.name} ({schema.field(f.name).type}, declared {f.type})" for f in declared
             if f.name in schema.names and not schema.field(f.name).type.equals(f.type)]
    if not set(schema.names) & set(declared.names):
        return f"none of the {table} columns {declared.names}"
    return f"columns of the wrong type: {', '.join(wrong)}" if wrong else None


def open_store(results: str, skip_corrupt: bool = False, tables: tuple[str, ...] | None = None) -> Store:
    """A DuckDB connection with every table of the results store registered as a view."""
    fs, base = filesystem(results)
    if fs.get_file_info(base).type == pafs.FileType.NotFound:
        raise StoreError(f"results dir {results!r} does not exist (give --results-dir, where a sweep "
                         f"wrote its tables)")
    if fs.get_file_info(f"{base}/tables").type == pafs.FileType.NotFound:
        raise StoreError(f"results dir {results!r} has no tables/ folder: no sweep has written results there")
    store = Store(duckdb.connect(), results)
    for table in tables or tuple(SCHEMAS):
        good = []
        for path in list_fragments(fs, base, table):
            reason = _check(fs, path, table)
            if reason is None:
                good.append(path)
            elif skip_corrupt:
                store.skipped.append((path, reason))
            else:
                raise StoreError(f"corrupt fragment {path}: {reason} (pass --skip-corrupt to leave it out)")
        store.files[table] = good
        schema = SCHEMAS[table]
        data = (pads.dataset(good, schema=schema, filesystem=fs, format="parquet") if good
                else pa.Table.from_pylist([], schema=schema))
        store.con.register(table, data)
    # Queries read the registered tables only: no COPY ... TO, ATTACH or reads of other files.
    store.con.execute("SET enable_external_access = false")
    return store


def store_parser(prog: str, doc: str | None):
    """An analysis CLI's parser with the flags it takes to read a results store."""
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", default="results", help="local path or URI [results]")
    p.add_argument("--sweep", action="append", default=None, help="a sweep to include (repeat for several) [all]")
    p.add_argument("--skip-corrupt", action="store_true",
                   help="leave out unreadable fragments (named in the output) instead of failing")
    return p


def open_for_cli(results: str, skip_corrupt: bool) -> Store | None:
    """open_store for a command line: errors and skipped fragments go to stderr; None on error
    (the caller exits 1)."""
    import sys

    try:
        store = open_store(results, skip_corrupt=skip_corrupt)
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    for path, reason in store.skipped:
        print(f"warning: skipped corrupt fragment {path}: {reason}", file=sys.stderr)
    return store
