"""Local CSV / JSON / JSONL / Parquet datasets and their error messages."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from splitfed.data import DataConfigLike, DataError, load_splits
from splitfed.data.local import load_local


def _reviews(n: int = 50) -> list[dict[str, object]]:
    return [{"review": f"review number {i}", "stars": "good" if i % 3 else "bad", "id": i} for i in range(n)]


def _write_csv(path: Path, rows: list[dict[str, object]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _cfg(path: Path, **kw: object) -> DataConfigLike:
    args: dict[str, object] = {"task": "classification", "columns": {"text": "review", "label": "stars"}}
    args.update(kw)
    return DataConfigLike("my-reviews", path=str(path), **args)  # type: ignore[arg-type]


def test_single_csv_is_split_80_10_10_by_seed(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "reviews.csv", _reviews())
    splits = load_splits(_cfg(path))
    assert splits.sizes() == {"train": 40, "validation": 5, "test": 5}
    assert splits.label_names == ["bad", "good"]  # string labels numbered in sorted order
    assert {ex["label"] for ex in splits.train} == {0, 1}
    texts = [ex["text"] for ex in splits.train + splits.validation + splits.test]
    assert len(set(texts)) == 50
    assert load_splits(_cfg(path)) == splits
    assert load_splits(_cfg(path, seed=1)).test != splits.test
    assert set(splits.train[0]) == {"text", "label"}


def test_integer_labels_and_max_sizes(tmp_path: Path) -> None:
    rows = [{"text": f"t {i}", "label": i % 4} for i in range(40)]
    path = _write_jsonl(tmp_path / "data.jsonl", rows)
    splits = load_splits(DataConfigLike("x", path=str(path), task="classification", max_train=10, max_eval=2))
    assert splits.sizes() == {"train": 10, "validation": 2, "test": 2}
    assert splits.label_names == ["0", "1", "2", "3"]
    assert all(isinstance(ex["label"], int) for ex in splits.train)


def test_directory_of_split_files_carves_validation(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "train.jsonl", _reviews(40))
    _write_jsonl(tmp_path / "test.jsonl", _reviews(7))
    splits = load_splits(_cfg(tmp_path))
    assert splits.sizes() == {"train": 36, "validation": 4, "test": 7}
    assert not {ex["text"] for ex in splits.train} & {ex["text"] for ex in splits.validation}


def test_parquet_and_json(tmp_path: Path) -> None:
    rows = _reviews(20)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "r.parquet")
    (tmp_path / "r.json").write_text(json.dumps(rows), encoding="utf-8")
    a = load_splits(_cfg(tmp_path / "r.parquet"))
    b = load_splits(_cfg(tmp_path / "r.json"))
    assert a == b
    assert a.sizes() == {"train": 16, "validation": 2, "test": 2}


def test_missing_column_names_file_column_and_columns(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "reviews.csv", _reviews(10))
    with pytest.raises(DataError) as info:
        load_splits(_cfg(path, columns={"text": "body", "label": "stars"}))
    message = str(info.value)
    assert str(path) in message
    assert "'body'" in message and "'text'" in message
    assert "['id', 'review', 'stars']" in message
    assert "columns:" in message


def test_unknown_field_in_columns(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "reviews.csv", _reviews(10))
    with pytest.raises(DataError, match=r"unknown field.*'txt'"):
        load_splits(_cfg(path, columns={"txt": "review", "label": "stars"}))


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("bad.jsonl", '{"text": "a", "label": 0}\n{not json\n', "line 2 is not valid JSON"),
        ("bad.json", '{"text": "a"}', "list of objects"),
        ("bad.parquet", "not parquet at all", "cannot read it as PARQUET"),
        ("empty.csv", "text,label\n", "has no rows"),
        ("data.txt", "hello", "unsupported file type '.txt'"),
    ],
)
def test_bad_files_name_the_file(tmp_path: Path, name: str, content: str, match: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=match) as info:
        load_local(path, "classification")
    assert str(path) in str(info.value)


def test_missing_path_and_missing_train_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or directory"):
        load_local(tmp_path / "nope.csv", "classification")
    (tmp_path / "test.csv").write_text("text,label\na,0\n")
    with pytest.raises(DataError, match=r"no train file.*test\.csv"):
        load_local(tmp_path, "classification")


def test_unregistered_name_needs_a_task_or_a_path(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "reviews.csv", _reviews(10))
    with pytest.raises(DataError, match="needs task:"):
        load_splits(DataConfigLike("my-reviews", path=str(path)))
    with pytest.raises(DataError, match=r"unknown dataset 'my-reviews'.*fortunes-topic.*path:"):
        load_splits(DataConfigLike("my-reviews"))


def test_multiple_choice_csv_with_letter_answers(tmp_path: Path) -> None:
    rows = [
        {"q": f"question {i}", "A": "x", "B": "y", "C": "z", "D": "w", "answer": "ABCD"[i % 4]}
        for i in range(20)
    ]
    path = _write_csv(tmp_path / "mmlu.csv", rows)
    columns = {"question": "q", "choices": "A,B,C,D", "label": "answer"}
    splits = load_splits(DataConfigLike("mine", path=str(path), task="multiple_choice", columns=columns))
    example = next(ex for ex in splits.train if ex["question"] == "question 6")
    assert example == {"question": "question 6", "choices": ["x", "y", "z", "w"], "label": 2}
    assert splits.label_names is None


def test_span_qa_jsonl_and_causal_prompt_response(tmp_path: Path) -> None:
    squad = [
        {"question": "q", "context": "the cat sat", "answers": {"text": ["cat"], "answer_start": [4]}}
        for _ in range(10)
    ]
    path = _write_jsonl(tmp_path / "squad.jsonl", squad)
    splits = load_splits(DataConfigLike("mine", path=str(path), task="span_qa"))
    assert splits.train[0]["answers"] == {"text": ["cat"], "answer_start": [4]}
    # In CSV the answers column holds JSON.
    csv_rows = [{**r, "answers": json.dumps(r["answers"])} for r in squad]
    csv_path = _write_csv(tmp_path / "squad.csv", csv_rows)
    assert load_splits(DataConfigLike("mine", path=str(csv_path), task="span_qa")) == splits
    chat = [{"instruction": f"say {i}", "output": f"{i}"} for i in range(10)]
    chat_path = _write_jsonl(tmp_path / "chat.jsonl", chat)
    cfg = DataConfigLike(
        "mine", path=str(chat_path), task="causal_lm", columns={"prompt": "instruction", "response": "output"}
    )
    lm = load_splits(cfg)
    assert set(lm.train[0]) == {"prompt", "response"}
    with pytest.raises(DataError, match=r"missing column 'text' \(for field 'text'\)"):
        load_splits(DataConfigLike("mine", path=str(chat_path), task="causal_lm"))
