"""Client partitioning: coverage, determinism, and the skew each scheme promises."""

from __future__ import annotations

import math

import pytest

from splitfed.data.errors import DataError
from splitfed.data.partition import (
    PartitionError,
    format_summary,
    label_counts,
    parse_partition,
    partition_examples,
)

NUM_LABELS = 4


def labeled(n: int = 2000, num_labels: int = NUM_LABELS) -> list[dict]:
    return [{"text": f"example {i}", "label": i % num_labels} for i in range(n)]


def unlabeled(n: int = 500) -> list[dict]:
    return [{"text": f"line {i}"} for i in range(n)]


def ids(parts: list[list[dict]]) -> list[list[str]]:
    return [[ex["text"] for ex in part] for part in parts]


def mean_entropy(parts: list[list[dict]]) -> float:
    """Mean over parties of the entropy (nats) of the party's label distribution."""
    total = 0.0
    for count in label_counts(parts, NUM_LABELS):
        n = sum(count)
        total -= sum(c / n * math.log(c / n) for c in count if c)
    return total / len(parts)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity"])
def test_every_example_exactly_once(scheme: str) -> None:
    examples = labeled(1003)
    parts = partition_examples(examples, 7, scheme, alpha=0.3, seed=1)
    assert len(parts) == 7
    flat = [ex["text"] for part in parts for ex in part]
    assert len(flat) == len(set(flat)) == len(examples)
    assert set(flat) == {ex["text"] for ex in examples}
    assert all(len(part) >= 1 for part in parts)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity"])
def test_deterministic_for_a_seed(scheme: str) -> None:
    examples = labeled(500)
    first = ids(partition_examples(examples, 5, scheme, alpha=0.5, seed=3))
    assert first == ids(partition_examples(examples, 5, scheme, alpha=0.5, seed=3))
    assert first != ids(partition_examples(examples, 5, scheme, alpha=0.5, seed=4))


def test_iid_sizes_equal_within_one_and_labels_balanced() -> None:
    parts = partition_examples(labeled(1003), 10, "iid", seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    for count in label_counts(parts, NUM_LABELS):
        assert min(count) > 0.5 * (sum(count) / NUM_LABELS)


def test_smaller_alpha_gives_more_label_skew() -> None:
    examples = labeled(4000)
    skewed = mean_entropy(partition_examples(examples, 10, "dirichlet", alpha=0.05, seed=0))
    mild = mean_entropy(partition_examples(examples, 10, "dirichlet", alpha=100.0, seed=0))
    assert mild > 0.95 * math.log(NUM_LABELS)  # close to uniform
    assert skewed < 0.6 * mild


def test_quantity_skew_varies_sizes_but_keeps_label_mix() -> None:
    parts = partition_examples(labeled(4000), 5, "quantity", alpha=0.5, seed=2, min_per_party=50)
    sizes = [len(p) for p in parts]
    assert max(sizes) > 2 * min(sizes)
    for count in label_counts(parts, NUM_LABELS):
        shares = [c / sum(count) for c in count]
        assert max(abs(s - 1 / NUM_LABELS) for s in shares) < 0.1


def test_min_per_party_is_met_by_redrawing() -> None:
    parts = partition_examples(labeled(400), 8, "dirichlet", alpha=0.1, seed=0, min_per_party=10)
    assert min(len(p) for p in parts) >= 10


def test_impossible_min_per_party_gives_up_with_advice() -> None:
    with pytest.raises(PartitionError, match="raise alpha"):
        partition_examples(labeled(100), 10, "quantity", alpha=0.01, min_per_party=9)


def test_too_few_examples() -> None:
    with pytest.raises(PartitionError, match="fewer parties"):
        partition_examples(labeled(5), 6)


def test_dirichlet_on_unlabeled_data_points_at_other_schemes() -> None:
    with pytest.raises(PartitionError, match="use 'iid' or 'quantity"):
        partition_examples(unlabeled(), 3, "dirichlet")
    parts = partition_examples(unlabeled(), 3, "quantity", alpha=1.0)
    assert sum(len(p) for p in parts) == 500


def test_string_labels_work_for_dirichlet() -> None:
    examples = [{"text": str(i), "label": "pos" if i % 3 else "neg"} for i in range(300)]
    parts = partition_examples(examples, 4, "dirichlet", alpha=0.2)
    assert sum(len(p) for p in parts) == 300


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scheme": "pathological"}, "unknown partition scheme"),
        ({"num_parties": 0}, "num_parties must be >= 1"),
        ({"scheme": "dirichlet", "alpha": 0.0}, "alpha > 0"),
        ({"scheme": "quantity", "alpha": float("nan")}, "alpha > 0"),
        ({"min_per_party": -1}, "min_per_party"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    args = {"num_parties": 3, **kwargs}
    with pytest.raises(PartitionError, match=message):
        partition_examples(labeled(30), **args)


def test_partition_error_is_a_data_error() -> None:
    assert issubclass(PartitionError, DataError)
    assert issubclass(PartitionError, ValueError)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("iid", ("iid", 0.5)),
        ("dirichlet:0.3", ("dirichlet", 0.3)),
        (" Quantity : 2 ", ("quantity", 2.0)),
        ("dirichlet", ("dirichlet", 0.5)),
    ],
)
def test_parse_partition(spec: str, expected: tuple[str, float]) -> None:
    assert parse_partition(spec) == expected


@pytest.mark.parametrize("spec", ["", "dirichlet:", "dirichlet:abc", "dirichlet:-1", "iid:0.5", "label:0.3"])
def test_parse_partition_rejects_with_the_accepted_forms(spec: str) -> None:
    with pytest.raises(PartitionError, match=r"'iid', 'dirichlet:<alpha>'.*'quantity:<alpha>'"):
        parse_partition(spec)


def test_label_counts() -> None:
    parts = [[{"label": 0}, {"label": 2}, {"label": 2}], [{"label": 1}]]
    assert label_counts(parts) == [[1, 0, 2], [0, 1, 0]]
    assert label_counts(parts, num_labels=4) == [[1, 0, 2, 0], [0, 1, 0, 0]]
    with pytest.raises(PartitionError, match=r"outside 0\.\.1"):
        label_counts(parts, num_labels=2)
    with pytest.raises(PartitionError, match="not a class index"):
        label_counts([[{"label": "pos"}]])


def test_format_summary_with_labels() -> None:
    parts = [[{"label": 0}, {"label": 1}, {"label": 1}], [{"label": 0}]]
    assert format_summary(parts, ["neg", "pos"]).splitlines() == [
        "party  size  neg  pos",
        "0         3    1    2",
        "1         1    1    0",
        "total     4    2    2",
    ]
    # Without names the columns are the class indices.
    assert format_summary(parts).splitlines()[0] == "party  size  0  1"


def test_format_summary_without_labels() -> None:
    parts = partition_examples(unlabeled(10), 3, "iid")
    assert format_summary(parts).splitlines() == [
        "party  size",
        "0         4",
        "1         3",
        "2         3",
        "total    10",
    ]
