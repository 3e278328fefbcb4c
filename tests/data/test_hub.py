"""Hugging Face Hub entries: the registry, the offline error, and local copies of Hub data."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from splitfed.data import DATASETS, TASKS, DataConfigLike, DataError, load_splits
from splitfed.data.hub import HubDataset

HUB_NAMES = {
    "sst2", "mrpc", "mnli", "qnli", "cola", "rte", "yelp_polarity", "ag_news",
    "squad", "mmlu", "gsm8k", "lambada", "alpaca", "dolly",
}  # fmt: skip


def test_hub_entries_are_registered_and_consistent() -> None:
    hub = {name: spec for name, spec in DATASETS.items() if isinstance(spec, HubDataset)}
    assert set(hub) == HUB_NAMES
    for name, spec in hub.items():
        assert spec.task in TASKS
        assert "train" in spec.splits
        if spec.task == "classification":
            assert spec.label_names, name
        if spec.convert is None:
            fields = TASKS[spec.task].fields
            assert any(set(f) <= set(spec.columns) for f in fields), name
    assert DATASETS["mmlu"].hub_id == "cais/mmlu" and DATASETS["mmlu"].config == "all"  # type: ignore[attr-defined]
    assert DATASETS["gsm8k"].hub_id == "openai/gsm8k"  # type: ignore[attr-defined]


def test_unreachable_hub_raises_data_error_suggesting_a_local_file(monkeypatch: pytest.MonkeyPatch) -> None:
    # Offline mode makes datasets fail at once instead of retrying a dead network.
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", Path("/nonexistent-splitfed-cache"))
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        load_splits(DataConfigLike("sst2"))
    assert time.perf_counter() - start < 30
    message = str(info.value)
    assert "nyu-mll/glue" in message and "Hub" in message
    assert "path:" in message and "columns:" in message


def test_task_mismatch_is_an_error() -> None:
    with pytest.raises(DataError, match="'sst2' is a 'classification' dataset"):
        load_splits(DataConfigLike("sst2", task="causal_lm"))


def test_local_copy_of_a_hub_dataset_uses_its_columns_and_labels(tmp_path: Path) -> None:
    rows = [{"sentence": f"a sentence {i}", "label": i % 2, "idx": i} for i in range(30)]
    path = tmp_path / "sst2.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = load_splits(DataConfigLike("sst2", path=str(path)))
    assert splits.label_names == ["negative", "positive"]
    assert set(splits.train[0]) == {"text", "label"}
    # A column renamed in the copy is mapped by the config; the others keep the Hub names.
    renamed = [{"review": r["sentence"], "label": r["label"]} for r in rows]
    path2 = tmp_path / "renamed.jsonl"
    path2.write_text("".join(json.dumps(r) + "\n" for r in renamed))
    assert load_splits(DataConfigLike("sst2", path=str(path2), columns={"text": "review"})) == splits


def test_local_copy_of_an_instruction_dataset_is_converted(tmp_path: Path) -> None:
    rows = [
        {"instruction": f"Add {i} and 1.", "input": "" if i % 2 else "numbers", "output": f"{i + 1}"}
        for i in range(10)
    ]
    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = load_splits(DataConfigLike("alpaca", path=str(path)))
    example = (splits.train + splits.validation + splits.test)[0]
    assert set(example) == {"prompt", "response"}
    assert example["prompt"].startswith("### Instruction:\n") and example["prompt"].endswith(
        "### Response:\n"
    )
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(DataError, match=r"missing column 'instruction'.*\['question'\]"):
        load_splits(DataConfigLike("alpaca", path=str(broken)))
