"""Datasets from local files: CSV, JSON, JSONL and Parquet.

``path`` is either

* one file, split 80/10/10 into train/validation/test, shuffled with the config's seed; or
* a directory holding ``train.<ext>`` and optionally ``validation.<ext>`` (also ``valid``,
  ``val`` or ``dev``) and ``test.<ext>``; a missing validation or test split is carved out of
  train (10% each, with the seed).

``<ext>`` is ``csv``, ``json`` (a list of objects), ``jsonl`` or ``parquet``. The config's
``columns`` maps the task's field names to the file's columns (see
:mod:`splitfed.data.schema`); string class labels are numbered in sorted order.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from splitfed.data.errors import DataError
from splitfed.data.registry import DatasetSplits
from splitfed.data.schema import index_labels, resolve_fields, rows_to_examples
from splitfed.data.splitting import carve, three_way
from splitfed.data.tasks import TASKS

Rows = list[dict[str, Any]]
SUFFIXES = (".csv", ".json", ".jsonl", ".parquet")
SPLIT_FILES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}
HELD_OUT_FRACTION = 0.1


def _read_csv(path: Path) -> tuple[Rows, list[str]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return rows, list(reader.fieldnames or [])


def _columns(rows: Rows) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        if not isinstance(row, dict):
            raise DataError(f"expected one object per row, found {type(row).__name__} {row!r:.60}")
        seen.update(dict.fromkeys(row))
    return list(seen)


def _read_json(path: Path) -> tuple[Rows, list[str]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise DataError(
            "a .json file must hold a list of objects (one per example); use .jsonl for one per line"
        )
    return data, _columns(data)


def _read_jsonl(path: Path) -> tuple[Rows, list[str]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as exc:
                    raise DataError(f"line {number} is not valid JSON ({exc})") from None
    return rows, _columns(rows)


def _read_parquet(path: Path) -> tuple[Rows, list[str]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return table.to_pylist(), list(table.column_names)


READERS: dict[str, Callable[[Path], tuple[Rows, list[str]]]] = {
    ".csv": _read_csv,
    ".json": _read_json,
    ".jsonl": _read_jsonl,
    ".parquet": _read_parquet,
}


def read_table(path: Path) -> tuple[Rows, list[str]]:
    """Read one data file into rows (dicts) and its column names.

    Raises
    ------
    DataError
        If the file is missing, has an unsupported suffix, or cannot be parsed; the message
        names the file.
    """
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        rows, columns = reader(path)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from exc
    except Exception as exc:  # csv, json, pyarrow and decoding errors alike: name the file
        raise DataError(f"{path}: cannot read it as {path.suffix.lstrip('.').upper()} ({exc})") from exc
    if not rows:
        raise DataError(f"{path}: has no rows")
    return rows, columns


def _split_files(directory: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for split, stems in SPLIT_FILES.items():
        candidates = [directory / f"{stem}{suffix}" for stem in stems for suffix in SUFFIXES]
        existing = [p for p in candidates if p.is_file()]
        if len(existing) > 1:
            raise DataError(f"{directory}: several files for the {split} split: {[p.name for p in existing]}")
        if existing:
            found[split] = existing[0]
    if "train" not in found:
        present = sorted(p.name for p in directory.iterdir())
        raise DataError(
            f"{directory}: no train file (train.csv, train.json, train.jsonl or train.parquet); it holds {present}"
        )
    return found


def read_splits(path: str | Path, seed: int = 0) -> dict[str, tuple[Rows, list[str], str]]:
    """Read raw rows of train/validation/test from a file or split directory.

    Returns split -> ``(rows, column names, where)``, ``where`` naming the file (and the part of
    it a split was cut from) for error messages. Splitting is as in the module docstring.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"{root}: no such file or directory (data path: of the config)")
    if not root.is_dir():
        rows, columns = read_table(root)
        train, validation, test = three_way(rows, seed, HELD_OUT_FRACTION, HELD_OUT_FRACTION)
        return {
            "train": (train, columns, str(root)),
            "validation": (validation, columns, str(root)),
            "test": (test, columns, str(root)),
        }
    files = _split_files(root)
    parts = {split: (*read_table(file), str(file)) for split, file in files.items()}
    train, columns, where = parts["train"]
    for split in ("test", "validation"):
        if split not in parts:
            train, held_out = carve(train, HELD_OUT_FRACTION, seed, split)
            parts[split] = (held_out, columns, where)
    parts["train"] = (train, columns, where)
    return {split: parts[split] for split in ("train", "validation", "test")}


def load_local(
    path: str | Path,
    task: str,
    columns: Mapping[str, str] | None = None,
    seed: int = 0,
    label_names: list[str] | None = None,
) -> DatasetSplits:
    """Load a local file or split directory (see the module docstring) as ``task`` examples.

    Parameters
    ----------
    path : str | Path
        A data file or a directory of split files.
    task : str
        Task name; decides which fields the examples need.
    columns : Mapping[str, str] | None, default None
        Task field -> file column.
    seed : int, default 0
        Seed of the split of a single file and of carving missing splits.
    label_names : list[str] | None, default None
        Known class names (e.g. of a Hub dataset this file is a copy of).

    Raises
    ------
    DataError
        Naming the file for a missing or unreadable file, and the missing column and the
        columns that exist when the task's fields cannot be found.
    """
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; known tasks: {', '.join(sorted(TASKS))}")
    task_cls = TASKS[task]
    out: list[Rows] = []
    for rows, available, where in read_splits(path, seed).values():
        mapping = resolve_fields(task_cls, columns or {}, available, where)
        out.append(rows_to_examples(rows, mapping, where))
    names = index_labels(task, out, label_names)
    return DatasetSplits(train=out[0], validation=out[1], test=out[2], label_names=names, task=task)
