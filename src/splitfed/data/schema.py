"""Turn table rows (local files, Hub rows) into examples in a task's schema.

A ``columns`` mapping goes from the task's field names to the table's column names
(``{"text": "review", "label": "stars"}``); fields it does not mention are looked up under
their own name. Two conveniences for files that cannot hold nested values:

* ``choices`` may map to several columns joined by commas (``"A,B,C,D"``, the original MMLU
  CSV layout), or to one column holding a JSON list;
* ``answers`` (span QA) may be a JSON string.

Labels are made class indices by :func:`index_labels` over all splits at once, so that a
string label gets the same index in every split.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from splitfed.data.errors import DataError
from splitfed.data.tasks import TASKS, Task

Rows = list[dict[str, Any]]


def _columns_of(source: str, field: str) -> list[str]:
    return [c.strip() for c in source.split(",")] if field == "choices" and "," in source else [source]


def resolve_fields(
    task: type[Task], columns: Mapping[str, str], available: Sequence[str], where: str
) -> dict[str, str]:
    """Pick the task field set the table can fill: field -> column (or comma-joined columns).

    Raises
    ------
    DataError
        Naming ``where`` (the file or dataset), the missing column(s) and the columns that exist.
    """
    unknown = sorted(set(columns) - {f for fs in task.fields for f in fs} - set(task.optional_fields))
    if unknown:
        known = sorted({f for fs in task.fields for f in fs} | set(task.optional_fields))
        raise DataError(
            f"{where}: columns: maps unknown field(s) {unknown} for task {task.name!r}; its fields: {known}"
        )
    have = set(available)
    best_missing: list[tuple[str, str]] | None = None
    for fields in task.fields:
        mapping = {f: columns.get(f, f) for f in fields}
        missing = [(f, c) for f, src in mapping.items() for c in _columns_of(src, f) if c not in have]
        if not missing:
            for f in task.optional_fields:
                src = columns.get(f, f)
                if all(c in have for c in _columns_of(src, f)):
                    mapping[f] = src
            return mapping
        if best_missing is None or len(missing) < len(best_missing):
            best_missing = missing
    assert best_missing is not None
    what = ", ".join(f"{c!r} (for field {f!r})" for f, c in best_missing)
    example = ", ".join(f"{f}: <column>" for f, _ in best_missing)
    raise DataError(
        f"{where}: missing column {what}; the columns are {sorted(have)}. "
        f"Map the task's fields to your columns with columns: {{{example}}}"
    )


def _choices(value: Any, where: str, index: int) -> list[str]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise DataError(
                f"{where}: row {index} has choices {value!r}; give a JSON list, or several columns "
                "joined by commas in columns: (choices: 'A,B,C,D')"
            ) from None
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise DataError(f"{where}: row {index} has choices {value!r}; expected a non-empty list")
    return [str(v) for v in value]


def _answers(value: Any, where: str, index: int) -> dict[str, list[Any]]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    if not isinstance(value, Mapping) or "text" not in value or "answer_start" not in value:
        raise DataError(
            f"{where}: row {index} has answers {value!r}; expected {{'text': [...], 'answer_start': [...]}} "
            "(a JSON string of it works in CSV files)"
        )
    return {"text": list(value["text"]), "answer_start": [int(s) for s in value["answer_start"]]}


def rows_to_examples(rows: Sequence[Mapping[str, Any]], mapping: Mapping[str, str], where: str) -> Rows:
    """Build examples from rows with a field -> column mapping from :func:`resolve_fields`."""
    examples: Rows = []
    for i, row in enumerate(rows):
        example: dict[str, Any] = {}
        for field, source in mapping.items():
            if field == "choices":
                cols = _columns_of(source, field)
                value: Any = [row[c] for c in cols] if len(cols) > 1 else _choices(row[source], where, i)
                example[field] = [str(v) for v in value]
            elif field == "answers":
                example[field] = _answers(row[source], where, i)
            elif field == "label":
                example[field] = row[source]
            else:
                value = row[source]
                if value is None:
                    raise DataError(f"{where}: row {i} has no value in column {source!r} (field {field!r})")
                example[field] = str(value)
        examples.append(example)
    return examples


def _int_like(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, int):
        return True
    if isinstance(value, float):
        return value.is_integer()
    return isinstance(value, str) and value.strip().lstrip("-").isdigit()


def index_labels(
    task: str, splits: Sequence[Rows], label_names: Sequence[str] | None = None
) -> list[str] | None:
    """Make ``label`` a class index in every example of every split, in place.

    Classification: integer labels (or integer strings) are kept and named ``"0"``, ``"1"``,
    ... unless ``label_names`` is given; other labels are looked up in ``label_names``, or,
    without it, numbered in sorted order of their string form. Multiple choice: integers or
    answer letters (``"A"`` -> 0). Returns the label names (``None`` outside classification).
    """
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}")
    labels = [ex["label"] for split in splits for ex in split if "label" in ex]
    if task == "multiple_choice":
        for split in splits:
            for ex in split:
                ex["label"] = _choice_index(ex["label"], len(ex["choices"]))
        return None
    if task != "classification":
        return None
    if all(_int_like(v) for v in labels):
        ints = [int(float(v)) if isinstance(v, float | str) else int(v) for v in labels]
        for split in splits:
            for ex in split:
                v = ex["label"]
                ex["label"] = int(float(v)) if isinstance(v, float | str) else int(v)
        if label_names is not None:
            return list(label_names)
        return [str(i) for i in range(max(ints) + 1)] if ints else []
    names = list(label_names) if label_names is not None else sorted({str(v) for v in labels})
    lookup = {name: i for i, name in enumerate(names)}
    for split in splits:
        for ex in split:
            key = str(ex["label"])
            if key not in lookup:
                raise DataError(f"label {key!r} is not one of the label names {names}")
            ex["label"] = lookup[key]
    return names


def _choice_index(value: Any, n: int) -> int:
    if _int_like(value):
        index = int(float(value)) if isinstance(value, float | str) else int(value)
    elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().isalpha():
        index = ord(value.strip().upper()) - ord("A")
    else:
        raise DataError(f"multiple_choice label {value!r} is neither a choice index nor an answer letter")
    if not 0 <= index < n:
        raise DataError(f"multiple_choice label {value!r} is outside the {n} choices")
    return index
