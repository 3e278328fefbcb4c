"""Deterministic splitting and subsampling of example lists.

All randomness comes from ``random.Random`` seeded with a string (``f"{seed}:{salt}"``),
which Python hashes the same way in every process and version, so a split depends only on
the seed and the salt, not on ``PYTHONHASHSEED`` or on how many draws happened elsewhere.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

from splitfed.data.errors import DataError

T = TypeVar("T")


def rng(seed: int | str, salt: str) -> random.Random:
    """A random generator determined by ``seed`` and ``salt`` alone."""
    return random.Random(f"{seed}:{salt}")


def subsample(items: Sequence[T], k: int | None, seed: int | str, salt: str) -> list[T]:
    """Keep ``k`` items chosen uniformly without replacement, in their original order.

    ``k=None`` or ``k >= len(items)`` keeps everything.
    """
    if k is None or k >= len(items):
        return list(items)
    if k < 0:
        raise DataError(f"a subsample size must be >= 0, got {k}")
    keep = sorted(rng(seed, salt).sample(range(len(items)), k))
    return [items[i] for i in keep]


def shuffled(items: Sequence[T], seed: int | str, salt: str) -> list[T]:
    """A shuffled copy of ``items``."""
    out = list(items)
    rng(seed, salt).shuffle(out)
    return out


def split_counts(n: int, validation: float, test: float) -> tuple[int, int, int]:
    """Sizes of train/validation/test for ``n`` items; each held-out part gets at least one
    item when ``n >= 3`` so that no split comes out empty on small data."""
    n_val = round(n * validation)
    n_test = round(n * test)
    if n >= 3:
        n_val = max(n_val, 1 if validation > 0 else 0)
        n_test = max(n_test, 1 if test > 0 else 0)
    return n - n_val - n_test, n_val, n_test


def three_way(
    items: Sequence[T], seed: int | str, validation: float = 0.1, test: float = 0.1
) -> tuple[list[T], list[T], list[T]]:
    """Shuffle and cut into train/validation/test (default 80/10/10)."""
    order = shuffled(items, seed, "three_way")
    n_train, n_val, _ = split_counts(len(order), validation, test)
    return order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]


def stratified_three_way(
    items: Sequence[T],
    key: Callable[[T], Hashable],
    seed: int | str,
    validation: float = 0.1,
    test: float = 0.1,
) -> tuple[list[T], list[T], list[T]]:
    """:func:`three_way` within each group of ``key``, so every split keeps the class mix.

    Each split is shuffled afterwards so that classes are interleaved.
    """
    groups: dict[Hashable, list[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    train: list[T] = []
    val: list[T] = []
    test_part: list[T] = []
    for name, group in groups.items():
        a, b, c = three_way(group, f"{seed}:{name}", validation, test)
        train += a
        val += b
        test_part += c
    return (
        shuffled(train, seed, "train"),
        shuffled(val, seed, "validation"),
        shuffled(test_part, seed, "test"),
    )


def carve(items: Sequence[T], fraction: float, seed: int | str, salt: str) -> tuple[list[T], list[T]]:
    """Take a random ``fraction`` of ``items`` out: ``(rest, carved)``, both in original order."""
    n = round(len(items) * fraction)
    if len(items) >= 2:
        n = max(n, 1)
    chosen = set(rng(seed, salt).sample(range(len(items)), n))
    rest = [x for i, x in enumerate(items) if i not in chosen]
    carved = [x for i, x in enumerate(items) if i in chosen]
    return rest, carved
