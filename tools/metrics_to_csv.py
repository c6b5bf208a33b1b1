#!/usr/bin/env python
"""Export a trainer run's metrics.jsonl (one JSON object per optimizer step) to CSV.

Columns: the union of keys over all lines. ``step`` comes first, then the other keys in the order
they are first seen (the trainer writes rollout statistics before loss metrics, so this keeps
related columns together and a metric that appears only later, e.g. after a resume with a newer
version, is appended at the end). ``--sort`` orders the non-step columns alphabetically instead;
``--columns`` picks and orders them explicitly.

Cells: a key missing from a line, or JSON null, is an empty cell; nested objects are flattened
with ``/`` ({"reward": {"mean": 1}} -> column ``reward/mean``, the trainer's own flat naming);
lists are JSON-encoded; booleans are written true/false; numbers keep full precision.

A malformed last line (a run killed mid-write) is skipped with a warning on stderr; a malformed
line anywhere else is an error naming file:line. Blank lines are ignored, as the trainer does.

    python tools/metrics_to_csv.py runs/demo --out metrics.csv
    python tools/metrics_to_csv.py runs/demo/metrics.jsonl --columns step,reward/mean,policy_loss

Exit status: 0 on success, 1 for malformed input data, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

METRICS_FILE = "metrics.jsonl"
PROG = "metrics_to_csv.py"


class ToolError(Exception):
    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def resolve_input(path: str) -> str:
    """A metrics.jsonl file, or a run directory holding one."""
    if os.path.isdir(path):
        candidate = os.path.join(path, METRICS_FILE)
        if not os.path.isfile(candidate):
            raise ToolError(f"run directory {path!r} has no {METRICS_FILE}", 2)
        return candidate
    if not os.path.isfile(path):
        raise ToolError(f"input {path!r} does not exist", 2)
    return path


def flatten(obj: dict, prefix: str = "", out: dict | None = None, where: str = "") -> dict:
    out = {} if out is None else out
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flatten(value, name + "/", out, where)
        else:
            if name in out:  # e.g. both "a/b" and {"a": {"b": ...}} on one line
                raise ToolError(f"{where}: key {name!r} occurs twice after flattening nested objects", 1)
            out[name] = value
    return out


def read_rows(path: str) -> tuple[list[dict], list[str]]:
    """(flattened rows, column names in first-seen order)."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    rows, columns = [], {}
    for position, (lineno, line) in enumerate(numbered):
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            if position == len(numbered) - 1:
                print(f"{PROG}: warning: {where}: ignoring truncated last line ({exc.msg}; "
                      f"{len(line)} characters)", file=sys.stderr)
                break
            raise ToolError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})", 1) from None
        if not isinstance(obj, dict):
            raise ToolError(f"{where}: expected a JSON object, got {type(obj).__name__}", 1)
        row = flatten(obj, where=where)
        rows.append(row)
        for name in row:
            columns.setdefault(name, None)
    return rows, list(columns)


def order_columns(seen: list[str], sort: bool) -> list[str]:
    rest = [c for c in seen if c != "step"]
    if sort:
        rest.sort()
    return (["step"] if "step" in seen else []) + rest


def select_columns(requested: str, available: list[str]) -> list[str]:
    wanted = [c.strip() for c in requested.split(",")]
    if any(not c for c in wanted):
        raise ToolError(f"--columns {requested!r} has an empty column name", 2)
    unknown = [c for c in wanted if c not in available]
    if unknown:
        shown = ", ".join(available[:8]) + (f", ... ({len(available)} in all)" if len(available) > 8 else "")
        raise ToolError(f"--columns: unknown column(s) {', '.join(unknown)}; available: {shown or 'none'}", 2)
    return wanted


def cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    if isinstance(value, float):
        return repr(value)  # shortest round-trip form; nan / inf as Python spells them
    return str(value)


def write_csv(rows: list[dict], columns: list[str], stream) -> None:
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([cell(row.get(c)) for c in columns])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("input", help=f"a {METRICS_FILE} file or a run directory containing one")
    p.add_argument("--out", default="-", help="CSV file, or - for stdout (default)")
    p.add_argument("--columns", default=None, help="comma-separated columns to export, in this order")
    p.add_argument("--sort", action="store_true", help="order the non-step columns alphabetically")
    args = p.parse_args(argv)
    try:
        path = resolve_input(args.input)
        rows, seen = read_rows(path)
        columns = order_columns(seen, args.sort)
        if args.columns is not None:
            columns = select_columns(args.columns, columns)
        if not rows:
            print(f"{PROG}: warning: {path} has no metrics rows", file=sys.stderr)
        if args.out == "-":
            try:
                write_csv(rows, columns, sys.stdout)
                sys.stdout.flush()
            except BrokenPipeError:  # e.g. piped into head: not an error
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        else:
            try:
                # Everything is parsed before the file is opened, so a bad input leaves no partial CSV.
                with open(args.out, "w", newline="", encoding="utf-8") as f:
                    write_csv(rows, columns, f)
            except OSError as exc:
                raise ToolError(f"--out {args.out!r}: {exc.strerror or exc}", 2) from None
    except ToolError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.status
    except (OSError, UnicodeDecodeError) as exc:
        print(f"{PROG}: error: cannot read {args.input!r}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
