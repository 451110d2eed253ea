"""python -m analysis.query "SQL": DuckDB over every table of every sweep in a results store.

Tables (ARCHITECTURE.md): sweeps, trials, evals, gradients, rewinding, retraining, flips; each is
a view across all sweeps under --results-dir (a local path or s3://...), with its declared schema.

    python -m analysis.query "select sweep, count(*) from trials group by sweep"
    python -m analysis.query --results-dir results "select * from evals where mode = 'drop'" \\
        --format csv --out drop.csv
    python -m analysis.query "select * from flips" --format parquet --out flips.parquet

Exit codes: 0 done; 1 the store cannot be read (missing, or a corrupt fragment, named); 2 bad
input (SQL error, bad flags).
"""
from __future__ import annotations

import argparse
import io
import json
import sys

import duckdb
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from memray.exiting import exiting

from .store import open_for_cli

FORMATS = ("table", "csv", "parquet", "json")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis.query", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sql", help="a DuckDB query over the tables")
    p.add_argument("--results-dir", default="results", help="local path or URI [results]")
    p.add_argument("--format", default="table", help=f"one of {list(FORMATS)} [table]")
    p.add_argument("--out", default=None, help="file to write (required for parquet; csv/json default to stdout)")
    p.add_argument("--max-rows", type=int, default=100, help="rows printed in table format [100]")
    p.add_argument("--skip-corrupt", action="store_true",
                   help="leave out unreadable fragments (each one is named on stderr) instead of failing")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.format not in FORMATS:
        print(f"error: --format={args.format!r} is invalid: one of {list(FORMATS)}", file=sys.stderr)
        return 2
    if args.format == "parquet" and not args.out:
        print("error: --format parquet needs --out FILE", file=sys.stderr)
        return 2
    store = open_for_cli(args.results_dir, args.skip_corrupt)
    if store is None:
        return 1
    try:
        result = store.con.sql(args.sql)
        if result is None:
            print("error: the query returned no result set (use a SELECT)", file=sys.stderr)
            return 2
        table = result.arrow()
        if hasattr(table, "read_all"):  # some DuckDB versions hand back a record batch reader
            table = table.read_all()
    except duckdb.Error as e:
        print(f"error: query failed: {e}", file=sys.stderr)
        return 2
    try:
        write(args, result, table)
    except OSError as e:
        print(f"error: cannot write --out={args.out!r}: {e}", file=sys.stderr)
        return 1
    if args.out:
        print(f"wrote {table.num_rows} rows to {args.out}", file=sys.stderr)
    return 0


def write(args, result, table) -> None:
    if args.format == "table":
        result.show(max_rows=args.max_rows, max_width=200)
    elif args.format == "parquet":
        pq.write_table(table, args.out)
    elif args.format == "csv":
        if args.out:
            pacsv.write_csv(table, args.out)
        else:
            buf = io.BytesIO()
            pacsv.write_csv(table, buf)
            sys.stdout.write(buf.getvalue().decode())
    else:
        text = "\n".join(json.dumps(r, default=str) for r in table.to_pylist())
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + ("\n" if text else ""))
        else:
            print(text)


if __name__ == "__main__":
    sys.exit(exiting(main()))
