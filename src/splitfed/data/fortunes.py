"""``fortunes-topic``: topic classification of real quotes from the Debian ``fortunes`` package.

The topics are five whose quotes a small LM can tell apart by content: ``computers``,
``education``, ``food``, ``law`` and ``startrek`` (measured here, a bag-of-words naive Bayes
baseline scores about 0.59 on them, 0.55 with ``politics``, which overlaps ``law``, in place
of ``education``). ``medicine`` and ``sports`` would fit but have fewer than 150 usable quotes.
Cleaning, and why:

* terminal overstrike sequences (``_\\bX``, bold/underline) are reduced to the plain letter;
* the attribution block (from the first line after the first that starts with ``--``) is
  dropped from every quote: ``-- Kirk, "The Menagerie", stardate 3012.4`` or ``-- Speech to
  the Association of American Law Schools`` give the label away without reading the quote;
* whitespace is squeezed to single spaces (the files indent and wrap for an 80-column
  terminal); quotes outside 10..400 characters are dropped (ASCII art, long stories that
  would be truncated anyway); quotes that occur in two topics are dropped, duplicates within
  a topic kept once.

Classes are balanced by capping every topic at the size of the smallest (at most
:data:`MAX_PER_CLASS`), then split 80/10/10 per class with a fixed seed, so the splits never
change with the training seed.
"""

from __future__ import annotations

import re
from pathlib import Path

from splitfed.data.errors import DataError
from splitfed.data.offline import OfflineDataset, asset_root
from splitfed.data.registry import DatasetSplits, register
from splitfed.data.splitting import shuffled, stratified_three_way

FORTUNE_TOPICS: tuple[str, ...] = ("computers", "education", "food", "law", "startrek")
MAX_PER_CLASS = 170
MIN_CHARS = 10
MAX_CHARS = 400
SPLIT_SEED = "fortunes-topic-v1"

_SEPARATOR = re.compile(r"^%\s*$", re.MULTILINE)
_OVERSTRIKE = re.compile(r".\x08")


def clean_quote(raw: str) -> str:
    """One quote as plain single-spaced text, without its attribution block."""
    lines = _OVERSTRIKE.sub("", raw).strip("\n").split("\n")
    for i, line in enumerate(lines):
        if i > 0 and line.strip().startswith("--"):
            lines = lines[:i]
            break
    return " ".join(" ".join(lines).split())


def read_fortunes(path: Path) -> list[str]:
    """The cleaned quotes of one topic file, in file order, without duplicates."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise DataError(f"{path}: cannot read the fortunes topic file ({exc})") from exc
    quotes: dict[str, None] = {}
    for raw in _SEPARATOR.split(text):
        quote = clean_quote(raw)
        if MIN_CHARS <= len(quote) <= MAX_CHARS:
            quotes.setdefault(quote)
    return list(quotes)


def build_fortunes_topic(
    root: Path | None = None,
    topics: tuple[str, ...] = FORTUNE_TOPICS,
    max_per_class: int = MAX_PER_CLASS,
) -> DatasetSplits:
    """Build ``fortunes-topic`` from the topic files under ``root`` (default: the asset).

    Parameters
    ----------
    root : Path | None, default None
        Directory with the plain-text topic files; ``None`` uses ``asset_path("fortunes")``.
    topics : tuple[str, ...], default FORTUNE_TOPICS
        Topic files to use; label ``i`` is ``topics[i]``.
    max_per_class : int, default MAX_PER_CLASS
        Cap on the examples per class (before splitting).
    """
    directory = asset_root("fortunes", root)
    missing = [t for t in topics if not (directory / t).is_file()]
    if missing:
        raise DataError(f"{directory}: missing fortunes topic file(s) {missing}; is this the fortunes asset?")
    quotes = {topic: read_fortunes(directory / topic) for topic in topics}
    seen: dict[str, int] = {}
    for topic_quotes in quotes.values():
        for q in topic_quotes:
            seen[q] = seen.get(q, 0) + 1
    quotes = {t: [q for q in qs if seen[q] == 1] for t, qs in quotes.items()}
    per_class = min(max_per_class, *(len(qs) for qs in quotes.values()))
    if per_class < 3:
        counts = {t: len(qs) for t, qs in quotes.items()}
        raise DataError(f"{directory}: too few usable quotes per topic to split: {counts}")
    examples = [
        {"text": q, "label": label}
        for label, topic in enumerate(topics)
        for q in shuffled(quotes[topic], SPLIT_SEED, topic)[:per_class]
    ]
    train, validation, test = stratified_three_way(examples, lambda ex: ex["label"], SPLIT_SEED)
    return DatasetSplits(train, validation, test, label_names=list(topics), task="classification")


register(
    OfflineDataset(
        "fortunes-topic",
        "classification",
        "Topic of Debian fortunes quotes: computers/education/food/law/startrek (offline)",
        lambda root: build_fortunes_topic(root),
    )
)

#: The two topics of ``fortunes-binary``: the pair a small LM tells apart most easily.
BINARY_TOPICS: tuple[str, ...] = ("computers", "startrek")

register(
    OfflineDataset(
        "fortunes-binary",
        "classification",
        "Binary topic of Debian fortunes quotes: computers/startrek (offline; for binary label attacks)",
        lambda root: build_fortunes_topic(root, BINARY_TOPICS),
    )
)
