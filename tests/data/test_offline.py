"""Offline dataset builders on tiny fixture files, plus one check against the real assets."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from splitfed.data import DataConfigLike, DataError, load_splits
from splitfed.data.arithmetic import build_arithmetic
from splitfed.data.fortunes import FORTUNE_TOPICS, build_fortunes_topic, clean_quote
from splitfed.data.metrics import extract_final_number
from splitfed.data.registry import DatasetSplits
from splitfed.data.shakespeare import GENRES, build_shakespeare, build_shakespeare_genre, parse_play

# --------------------------------------------------------------------------- fortunes


def _write_fortunes(root: Path, per_topic: dict[str, int]) -> None:
    for topic, n in per_topic.items():
        quotes = [f"A {topic} quote number {k} about {topic} things." for k in range(n)]
        quotes[0] += "\n\t\t-- Somebody Famous, stardate 3012.4"
        quotes.append(quotes[1])  # a duplicate within the topic: kept once
        quotes.append("x" * 401)  # too long
        quotes.append("Shared by two topics, so it is dropped.")
        (root / topic).write_text("\n%\n".join(quotes) + "\n%\n", encoding="utf-8")


@pytest.fixture
def fortunes_root(tmp_path: Path) -> Path:
    sizes = {topic: 20 + 3 * i for i, topic in enumerate(FORTUNE_TOPICS)}
    _write_fortunes(tmp_path, sizes)
    (tmp_path / "unused-topic").write_text("Not a chosen topic.\n%\n")
    return tmp_path


def _texts(splits: DatasetSplits, key: str = "text") -> dict[str, set[str]]:
    return {name: {str(ex[key]) for ex in getattr(splits, name)} for name in ("train", "validation", "test")}


def _assert_disjoint(splits: DatasetSplits, key: str = "text") -> None:
    texts = _texts(splits, key)
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]


def test_clean_quote_drops_attribution_and_overstrike() -> None:
    raw = "I am *_\bn_\bo_\bt* a number.\n  I am a free man!\n\t\t-- The Prisoner\n\t\t   episode 1"
    assert clean_quote(raw) == "I am *not* a number. I am a free man!"
    assert clean_quote("-- a dash first\nthen text") == "-- a dash first then text"


def test_fortunes_topic_is_balanced_deterministic_and_disjoint(fortunes_root: Path) -> None:
    splits = build_fortunes_topic(fortunes_root)
    assert splits.label_names == list(FORTUNE_TOPICS)
    assert splits.task == "classification"
    # The smallest topic has 20 usable quotes: every class is capped there, then 16/2/2.
    for name, size in (("train", 16), ("validation", 2), ("test", 2)):
        counts = Counter(ex["label"] for ex in getattr(splits, name))
        assert counts == dict.fromkeys(range(len(FORTUNE_TOPICS)), size)
    _assert_disjoint(splits)
    all_texts = set().union(*_texts(splits).values())
    assert not any("Somebody" in t or "stardate" in t for t in all_texts)
    assert not any(t.startswith("xxx") or t.startswith("Shared") for t in all_texts)
    assert build_fortunes_topic(fortunes_root) == splits
    for ex in splits.train:
        assert FORTUNE_TOPICS[ex["label"]] in ex["text"]


def test_fortunes_topic_missing_topic_file(tmp_path: Path) -> None:
    _write_fortunes(tmp_path, {"computers": 10})
    with pytest.raises(DataError, match=r"missing fortunes topic file.*education"):
        build_fortunes_topic(tmp_path)


def test_fortunes_binary_is_two_balanced_topics(fortunes_root: Path) -> None:
    from splitfed.data.fortunes import BINARY_TOPICS

    splits = load_splits(DataConfigLike("fortunes-binary", path=str(fortunes_root)))
    assert splits.label_names == list(BINARY_TOPICS) and splits.task == "classification"
    counts = Counter(ex["label"] for ex in splits.train)
    assert sorted(counts) == [0, 1] and counts[0] == counts[1]
    for ex in splits.train:
        assert BINARY_TOPICS[ex["label"]] in ex["text"]


def test_load_splits_uses_path_as_the_asset_and_subsamples(fortunes_root: Path) -> None:
    cfg = DataConfigLike("fortunes-topic", path=str(fortunes_root), max_train=30, max_eval=4, seed=3)
    splits = load_splits(cfg)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (30, 4, 4)
    full = build_fortunes_topic(fortunes_root)
    assert all(ex in full.train for ex in splits.train)
    assert load_splits(cfg) == splits
    other = load_splits(DataConfigLike("fortunes-topic", path=str(fortunes_root), max_train=30, seed=4))
    assert other.train != splits.train
    with pytest.raises(DataError, match="columns: does not apply"):
        load_splits(DataConfigLike("fortunes-topic", path=str(fortunes_root), columns={"text": "x"}))


# --------------------------------------------------------------------------- shakespeare

FRONT = """THE PLAY OF {title}

by William Shakespeare

Dramatis Personae

KING, a monarch of {title}.
FOOL, his jester.


ACT I.

SCENE I. A hall.

[Enter KING and FOOL.]

"""


def _write_play(root: Path, play: str, speeches: int = 10) -> None:
    parts = [FRONT.format(title=play.upper())]
    for k in range(speeches):
        speaker = "KING." if k % 2 == 0 else "Fool."
        lines = [
            f"{play} says line {k}-{j} [Aside.] softly" if j == 1 else f"{play} says line {k}-{j}"
            for j in range(4)
        ]
        parts.append(speaker + "\n" + "\n".join(lines) + "\n")
        if k == 4:
            parts.append("[Exit KING.]\n")
            parts.append(f"{play} continues after the exit\n")  # the same speech goes on
    parts.append("ACT II.\n\nSCENE I. Another hall.\n\nA bare stage direction without brackets.\n")
    (root / f"{play}_gut.txt").write_text("\n".join(parts), encoding="utf-8")
    (root / f"{play}_gut_f.txt").write_text("Folio duplicate: never read.\n", encoding="utf-8")


GENRE_TABLE = {
    "c1": "comedy",
    "c2": "comedy",
    "c3": "comedy",
    "t1": "tragedy",
    "t2": "tragedy",
    "t3": "tragedy",
    "h1": "history",
    "h2": "history",
    "h3": "history",
    "h4": "history",
}
VALIDATION = ("c2", "t2", "h2")
TEST = ("c3", "t3", "h3")


@pytest.fixture
def plays_root(tmp_path: Path) -> Path:
    for play in GENRE_TABLE:
        _write_play(tmp_path, play)
    (tmp_path / "sonnets_gut.txt").write_text("Shall I compare thee to a summer's day?\n")
    return tmp_path


def test_parse_play_keeps_speech_only(plays_root: Path) -> None:
    speeches = parse_play((plays_root / "c1_gut.txt").read_text())
    assert [s.speaker for s in speeches[:2]] == ["KING.", "Fool."]
    assert len(speeches) == 10
    assert speeches[0].lines[1] == "c1 says line 0-1 softly"
    assert speeches[4].lines[-1] == "c1 continues after the exit"
    text = "\n".join(line for s in speeches for line in s.lines)
    for leak in ("Dramatis", "monarch", "Enter", "Aside", "SCENE", "bare stage direction", "Folio"):
        assert leak not in text


def test_shakespeare_genre_splits_by_play_with_all_classes(plays_root: Path) -> None:
    splits = build_shakespeare_genre(plays_root, GENRE_TABLE, VALIDATION, TEST, lines_per_passage=4)
    assert splits.label_names == list(GENRES)
    held_out = {"validation": VALIDATION, "test": TEST}
    for name in ("train", "validation", "test"):
        examples = getattr(splits, name)
        counts = Counter(ex["label"] for ex in examples)
        assert set(counts) == {0, 1, 2}
        assert len(set(counts.values())) == 1  # balanced (history has two training plays)
        plays = {ex["text"].split()[0] for ex in examples}
        if name in held_out:
            assert plays == set(held_out[name])
        else:
            assert not plays & (set(VALIDATION) | set(TEST))
        for ex in examples:
            assert GENRE_TABLE[ex["text"].split()[0]] == GENRES[ex["label"]]
            assert "KING." not in ex["text"] and "Fool." not in ex["text"]
    assert len(splits.train) == 30  # 41 lines per play -> 10 passages; capped to 10 per genre
    _assert_disjoint(splits)
    assert build_shakespeare_genre(plays_root, GENRE_TABLE, VALIDATION, TEST) == build_shakespeare_genre(
        plays_root, GENRE_TABLE, VALIDATION, TEST
    )


def test_shakespeare_genre_needs_every_genre_held_out(plays_root: Path) -> None:
    with pytest.raises(DataError, match="has no \\['history'\\]"):
        build_shakespeare_genre(plays_root, GENRE_TABLE, ("c2", "t2"), TEST)
    with pytest.raises(DataError, match="held-out plays"):
        build_shakespeare_genre(plays_root, GENRE_TABLE, ("nope",), TEST)


def test_shakespeare_lm_keeps_speakers_and_splits_by_play(plays_root: Path) -> None:
    splits = build_shakespeare(plays_root, list(GENRE_TABLE), VALIDATION, TEST, lines_per_passage=5)
    assert splits.task == "causal_lm" and splits.label_names is None
    assert any("KING." in ex["text"] for ex in splits.train)
    for ex in splits.test:
        assert {line.split()[0] for line in ex["text"].split("\n") if " says " in line} <= set(TEST)
    _assert_disjoint(splits)


def test_missing_play_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"c1_gut\.txt"):
        build_shakespeare_genre(tmp_path, GENRE_TABLE, VALIDATION, TEST)


# --------------------------------------------------------------------------- arithmetic


def test_arithmetic_is_deterministic_disjoint_and_correct() -> None:
    splits = build_arithmetic(sizes={"train": 300, "validation": 40, "test": 40})
    assert splits.sizes() == {"train": 300, "validation": 40, "test": 40}
    assert splits == build_arithmetic(sizes={"train": 300, "validation": 40, "test": 40})
    _assert_disjoint(splits, key="question")
    for ex in splits.train + splits.validation + splits.test:
        answer = str(ex["answer"])
        assert answer.splitlines()[-1].startswith("#### ")
        # The final number equals the result of the last computation shown in the answer.
        last_result = answer.splitlines()[0].rsplit("=", 1)[1].split()[0].strip("$.")
        assert extract_final_number(answer) == last_result
    # Validation and test do not depend on how large train is.
    small = build_arithmetic(sizes={"train": 10, "validation": 40, "test": 40})
    assert small.test == splits.test and small.validation == splits.validation


def test_arithmetic_rejects_a_path() -> None:
    with pytest.raises(DataError, match="generated"):
        load_splits(DataConfigLike("arithmetic", path="/somewhere"))


# --------------------------------------------------------------------------- real assets


def _fetched(name: str) -> bool:
    try:
        from splitfed.assets import is_fetched
    except ImportError:
        return False
    try:
        return bool(is_fetched(name))
    except Exception:
        return False


@pytest.mark.skipif(not _fetched("fortunes"), reason="fortunes asset not fetched")
def test_real_fortunes_topic_counts() -> None:
    start = time.perf_counter()
    splits = load_splits(DataConfigLike("fortunes-topic"))
    assert time.perf_counter() - start < 3.0
    assert splits.label_names == ["computers", "education", "food", "law", "startrek"]
    for name, size in (("train", 136), ("validation", 17), ("test", 17)):
        assert Counter(ex["label"] for ex in getattr(splits, name)) == dict.fromkeys(range(5), size)
    _assert_disjoint(splits)
    assert not any("stardate" in ex["text"] for ex in splits.train)


@pytest.mark.skipif(not _fetched("shakespeare"), reason="shakespeare asset not fetched")
def test_real_shakespeare_genre_counts() -> None:
    start = time.perf_counter()
    splits = load_splits(DataConfigLike("shakespeare-genre"))
    assert time.perf_counter() - start < 3.0
    assert splits.label_names == ["comedy", "tragedy", "history"]
    for name, size in (("train", 1600), ("validation", 200), ("test", 200)):
        assert Counter(ex["label"] for ex in getattr(splits, name)) == dict.fromkeys(range(3), size)
    _assert_disjoint(splits)
    lm = load_splits(DataConfigLike("shakespeare"))
    assert min(lm.sizes().values()) > 1000
