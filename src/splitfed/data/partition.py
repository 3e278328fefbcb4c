"""Split one dataset's training examples across data parties (clients), IID or non-IID.

Schemes, as used by the federated and split-federated literature to simulate clients:

* ``"iid"``: shuffle and deal out equal shares (sizes differ by at most one).
* ``"dirichlet"`` (label skew, Hsu et al. 2019, "Measuring the Effects of Non-Identical Data
  Distribution for Federated Visual Classification"; the NIID-Bench form of Li et al. 2022):
  for every class, the share each party gets is drawn from ``Dir(alpha, ..., alpha)``. Small
  ``alpha`` (0.05) gives most parties only a few classes; large ``alpha`` (100) is close to IID.
* ``"quantity"`` (quantity skew, NIID-Bench): party sizes are drawn from ``Dir(alpha)``, and
  examples are dealt out at random, so every party's label mix stays close to the global one.

Every example goes to exactly one party, and the result depends only on the examples (their
order included), the scheme and ``seed``. Drawing proportions can leave a party with almost
nothing, so the skewed schemes redraw until every party has ``min_per_party`` examples and
give up, with an error saying what to change, after :data:`MAX_DRAWS` draws.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from splitfed.data.errors import DataError

SCHEMES = ("iid", "dirichlet", "quantity")
"""Accepted values of ``scheme``."""

DEFAULT_ALPHA = 0.5
"""Concentration used when a spec string names a skewed scheme without one."""

MAX_DRAWS = 1000
"""Proportion draws tried before :func:`partition_examples` gives up on ``min_per_party``."""

ACCEPTED_SPECS = "'iid', 'dirichlet:<alpha>' (label skew) or 'quantity:<alpha>' (size skew), alpha > 0"

Example = dict[str, Any]


class PartitionError(DataError):
    """Examples cannot be partitioned as asked; the message says what to change.

    A :class:`~splitfed.data.errors.DataError` (hence a ``ValueError``), so callers that
    handle data errors handle this one too.
    """


def partition_examples(
    examples: list[Example],
    num_parties: int,
    scheme: str = "iid",
    alpha: float = DEFAULT_ALPHA,
    seed: int = 0,
    label_key: str = "label",
    min_per_party: int = 1,
) -> list[list[Example]]:
    """Split ``examples`` across ``num_parties`` data parties.

    Parameters
    ----------
    examples : list[dict]
        The training examples (not copied: parties share the dict objects).
    num_parties : int
        Number of data parties, >= 1.
    scheme : {"iid", "dirichlet", "quantity"}, default "iid"
        See the module docstring.
    alpha : float, default 0.5
        Dirichlet concentration for ``"dirichlet"`` and ``"quantity"``; ignored by ``"iid"``.
    seed : int, default 0
        The same seed (and input) gives the same partition.
    label_key : str, default "label"
        Field holding the class of an example (``"dirichlet"`` only).
    min_per_party : int, default 1
        Every party gets at least this many examples.

    Returns
    -------
    list[list[dict]]
        One list per party, in party order; each is shuffled so classes are interleaved.

    Raises
    ------
    PartitionError
        For an unknown scheme, ``num_parties < 1``, ``alpha <= 0``, too few examples for
        ``num_parties * min_per_party``, ``"dirichlet"`` on examples without labels, or when no
        draw within :data:`MAX_DRAWS` gives every party ``min_per_party`` examples.
    """
    if scheme not in SCHEMES:
        raise PartitionError(f"unknown partition scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    if num_parties < 1:
        raise PartitionError(f"num_parties must be >= 1, got {num_parties}")
    if min_per_party < 0:
        raise PartitionError(f"min_per_party must be >= 0, got {min_per_party}")
    if scheme != "iid" and not (math.isfinite(alpha) and alpha > 0):
        raise PartitionError(f"{scheme} partition needs a finite alpha > 0, got {alpha}")
    if len(examples) < num_parties * min_per_party:
        raise PartitionError(
            f"{len(examples)} examples cannot give {num_parties} parties {min_per_party} each; "
            f"use fewer parties (at most {len(examples) // max(min_per_party, 1)}) or a lower min_per_party"
        )
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        order = rng.permutation(len(examples))
        groups = [list(chunk) for chunk in np.array_split(order, num_parties)]
    elif scheme == "quantity":
        groups = _quantity_skew(len(examples), num_parties, alpha, min_per_party, rng)
    else:
        labels = _labels(examples, label_key)
        groups = _label_skew(labels, num_parties, alpha, min_per_party, rng)
    # Shuffle each party so its classes (grouped by construction above) are interleaved.
    return [[examples[int(i)] for i in rng.permutation(np.asarray(g, dtype=np.int64))] for g in groups]


def _labels(examples: Sequence[Example], label_key: str) -> list[Hashable]:
    """The label of every example, or an error that points at iid / quantity for unlabeled data."""
    labels: list[Hashable] = []
    for index, example in enumerate(examples):
        label = example.get(label_key)
        if label is None:
            raise PartitionError(
                f"dirichlet (label-skew) partition needs a {label_key!r} field, but example {index} has none "
                "(causal LM and other unlabeled data have no classes); use 'iid' or 'quantity:<alpha>' instead"
            )
        if not isinstance(label, Hashable):
            raise PartitionError(
                f"example {index} has an unhashable label {label!r}; labels must be class ids"
            )
        labels.append(label)
    return labels


def _cut(indices: np.ndarray, proportions: np.ndarray) -> list[np.ndarray]:
    """Cut ``indices`` into consecutive pieces of (about) the given proportions."""
    cuts = (np.cumsum(proportions)[:-1] * len(indices)).astype(np.int64)
    return list(np.split(indices, cuts))


def _quantity_skew(
    n: int, num_parties: int, alpha: float, min_per_party: int, rng: np.random.Generator
) -> list[list[int]]:
    for _ in range(MAX_DRAWS):
        pieces = _cut(rng.permutation(n), rng.dirichlet(np.full(num_parties, alpha)))
        if min(len(p) for p in pieces) >= min_per_party:
            return [p.tolist() for p in pieces]
    raise _gave_up("quantity", n, num_parties, alpha, min_per_party)


def _label_skew(
    labels: Sequence[Hashable], num_parties: int, alpha: float, min_per_party: int, rng: np.random.Generator
) -> list[list[int]]:
    # Classes in order of first appearance: deterministic without needing labels to be sortable.
    by_class: dict[Hashable, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    members = [np.asarray(ix, dtype=np.int64) for ix in by_class.values()]
    for _ in range(MAX_DRAWS):
        groups: list[list[int]] = [[] for _ in range(num_parties)]
        for ix in members:
            pieces = _cut(rng.permutation(ix), rng.dirichlet(np.full(num_parties, alpha)))
            for party, piece in enumerate(pieces):
                groups[party].extend(piece.tolist())
        if min(len(g) for g in groups) >= min_per_party:
            return groups
    raise _gave_up("dirichlet", len(labels), num_parties, alpha, min_per_party)


def _gave_up(scheme: str, n: int, num_parties: int, alpha: float, min_per_party: int) -> PartitionError:
    return PartitionError(
        f"{scheme}:{alpha} partition of {n} examples over {num_parties} parties left some party with "
        f"fewer than min_per_party={min_per_party} examples in all {MAX_DRAWS} draws; raise alpha, "
        "use fewer parties, or lower min_per_party"
    )


def parse_partition(spec: str) -> tuple[str, float]:
    """Parse a CLI partition string into ``(scheme, alpha)``.

    Accepts ``"iid"``, ``"dirichlet:<alpha>"`` and ``"quantity:<alpha>"`` (case and spaces
    ignored); a skewed scheme without ``:<alpha>`` gets :data:`DEFAULT_ALPHA`, and ``"iid"``
    returns it too (unused). Anything else raises :class:`PartitionError` listing the forms.
    """
    text = spec.strip().lower()
    scheme, sep, value = text.partition(":")
    scheme = scheme.strip()
    if scheme not in SCHEMES or (scheme == "iid" and sep):
        raise PartitionError(f"bad partition {spec!r}; accepted: {ACCEPTED_SPECS}")
    if not sep:
        return scheme, DEFAULT_ALPHA
    try:
        alpha = float(value)
    except ValueError:
        raise PartitionError(
            f"bad partition {spec!r}: alpha {value.strip()!r} is not a number; accepted: {ACCEPTED_SPECS}"
        ) from None
    if not (math.isfinite(alpha) and alpha > 0):
        raise PartitionError(f"bad partition {spec!r}: alpha must be > 0; accepted: {ACCEPTED_SPECS}")
    return scheme, alpha


def label_counts(
    parts: Sequence[Sequence[Example]], num_labels: int | None = None, label_key: str = "label"
) -> list[list[int]]:
    """Per party, the number of examples of each class ``0 .. num_labels - 1``.

    ``num_labels=None`` uses the largest label seen plus one. Labels must be non-negative ints
    (the classification task's schema); anything else raises :class:`PartitionError`.
    """
    seen: list[list[int]] = []
    for p, part in enumerate(parts):
        row: list[int] = []
        for i, example in enumerate(part):
            label = example.get(label_key)
            if isinstance(label, bool) or not isinstance(label, int | np.integer) or label < 0:
                raise PartitionError(
                    f"party {p}, example {i}: {label_key}={label!r} is not a class index (a non-negative int)"
                )
            row.append(int(label))
        seen.append(row)
    largest = max((max(row) for row in seen if row), default=-1)
    width = largest + 1 if num_labels is None else num_labels
    if largest >= width:
        raise PartitionError(f"label {largest} is outside 0..{width - 1} (num_labels={num_labels})")
    counts = []
    for row in seen:
        count = [0] * width
        for label in row:
            count[label] += 1
        counts.append(count)
    return counts


def _has_int_labels(parts: Sequence[Sequence[Example]], label_key: str) -> bool:
    examples = [ex for part in parts for ex in part]
    return bool(examples) and all(
        isinstance(ex.get(label_key), int | np.integer) and not isinstance(ex.get(label_key), bool)
        for ex in examples
    )


def format_summary(
    parts: Sequence[Sequence[Example]], label_names: list[str] | None = None, label_key: str = "label"
) -> str:
    """A plain-text table of the partition: one row per party, then a ``total`` row.

    Columns are ``party``, ``size`` and, when every example has an int label, one count per
    class, headed by ``label_names`` (or the class index). Unlabeled data gets ``size`` only.
    """
    header = ["party", "size"]
    rows = [[str(p), str(len(part))] for p, part in enumerate(parts)]
    total = ["total", str(sum(len(part) for part in parts))]
    if label_names is not None or _has_int_labels(parts, label_key):
        counts = label_counts(parts, None if label_names is None else len(label_names), label_key)
        width = len(counts[0]) if counts else len(label_names or [])
        header += list(label_names) if label_names is not None else [str(c) for c in range(width)]
        for row, count in zip(rows, counts, strict=True):
            row += [str(c) for c in count]
        total += [str(sum(count[c] for count in counts)) for c in range(width)]
    table = [header, *rows, total]
    widths = [max(len(line[c]) for line in table) for c in range(len(header))]
    lines = []
    for line in table:
        cells = [line[0].ljust(widths[0])] + [
            cell.rjust(w) for cell, w in zip(line[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
