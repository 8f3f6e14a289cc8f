"""Read rows from a local file, a hub dataset (or a local dataset directory), or a built-in set.

Every row keeps where it came from (`file.jsonl:12`), so that any later complaint about it names
the file and line. JSON Lines, JSON and CSV are read here, line by line, for exactly that reason;
Parquet, hub datasets and dataset directories go through `datasets`/`pyarrow`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from rlhf_cli.errors import UserError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class Row:
    data: dict[str, Any]
    where: str  # "data.jsonl:12", "builtin:arith#3", "org/name[train]#7"


def load_rows(spec: str, *, subset: Optional[str] = None, split: str = "train") -> list[Row]:
    if spec.startswith(BUILTIN_PREFIX):
        from rlhf_cli.data.builtin import builtin_rows

        return builtin_rows(spec[len(BUILTIN_PREFIX) :])
    path = Path(spec)
    if path.is_file():
        rows = _read_file(path)
    elif path.is_dir():
        rows = _read_datasets(str(path), subset, split)
    elif looks_local(spec):
        raise UserError(f"{spec}: no such file")
    else:
        rows = _read_datasets(spec, subset, split)
    if not rows:
        raise UserError(f"{spec}: no rows (the file or split is empty)")
    return rows


def looks_local(spec: str) -> bool:
    """A hub id is `name` or `org/name`; a path with a file suffix, a leading ./ or /, or deeper nesting is local."""
    return spec.lower().endswith(LOCAL_SUFFIXES) or spec.startswith((".", "/", "~")) or spec.count("/") > 1


def _read_file(path: Path) -> list[Row]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise UserError(f"{path}: unsupported file type '{suffix}' (use {', '.join(LOCAL_SUFFIXES)})")


def _lines(path: Path):
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                # utf-8-sig on the first line: a byte-order mark is not part of the data.
                yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"{path}:{number}: not UTF-8 text (byte {exc.start + 1} of the line)") from None


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: malformed JSON: {exc.msg} (column {exc.colno})") from None
        rows.append(Row(_object(value, f"{path}:{number}"), f"{path}:{number}"))
    return rows


def _read_json(path: Path) -> list[Row]:
    text = "".join(line for _, line in _lines(path))
    if not text.strip():
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several objects, one per line: JSON Lines under a .json name
            return _read_jsonl(path)
        raise UserError(f"{path}:{exc.lineno}: malformed JSON: {exc.msg} (column {exc.colno})") from None
    if isinstance(value, dict):
        return [Row(value, f"{path}:1")]
    if not isinstance(value, list):
        raise UserError(f"{path}:1: expected a list of objects, found {type(value).__name__}")
    line_of = _object_lines(text)
    return [
        Row(_object(item, f"{path}:{line_of(i)}"), f"{path}:{line_of(i)}")
        for i, item in enumerate(value)
    ]


def _object_lines(text: str):
    """Line of the i-th top-level object in a JSON array (best effort: counts depth-1 `{`)."""
    starts, depth, line, in_string, escaped = [], 0, 1, False, False
    for ch in text:
        if ch == "\n":
            line += 1
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
            continue
        if ch == '"':
            in_string = True
        elif ch in "[{":
            if ch == "{" and depth == 1:
                starts.append(line)
            depth += 1
        elif ch in "]}":
            depth -= 1
    return lambda i: starts[i] if i < len(starts) else "?"


def _read_csv(path: Path) -> list[Row]:
    lines = (line for _, line in _lines(path))
    reader = csv.DictReader(lines)
    rows = []
    try:
        for record in reader:
            where = f"{path}:{reader.line_num}"
            if None in record:
                raise UserError(f"{where}: more fields than the header has")
            rows.append(Row(dict(record), where))
    except csv.Error as exc:
        raise UserError(f"{path}:{reader.line_num}: malformed CSV: {exc}") from None
    return rows


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise UserError(f"{path}: not a readable Parquet file: {exc}") from None
    return [Row(record, f"{path}:row {i + 1}") for i, record in enumerate(table.to_pylist())]


def _read_datasets(name: str, subset: Optional[str], split: str) -> list[Row]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, subset, split=split)
    except ValueError as exc:
        message = str(exc).splitlines()[0]
        raise UserError(f"{name}: {message}") from None
    except Exception as exc:  # hub, network and file-format errors come in many types
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{name}: cannot load dataset (split {split}): {message}") from None
    return [Row(record, f"{name}[{split}]#{i + 1}") for i, record in enumerate(dataset)]


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a JSON object, found {type(value).__name__}")
    return value
