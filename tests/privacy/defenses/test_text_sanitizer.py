"""What every token-level text sanitizer shares: candidates, text layout, seeding, set-up errors."""

from __future__ import annotations

import re

import pytest

from splitfed.privacy.defenses import DefenseConfigError, build_defense
from splitfed.privacy.defenses.text_sanitizer import TokenSanitizer
from splitfed.split.front import FrontContext, FrontResources, build_front
from tiny import tiny_model, tiny_tokenizer

NAMES = ["santext", "custext", "rantext"]
#: Small budgets: nearly every ordinary token is replaced.
LOW = {"santext": {"epsilon": 1e-3}, "custext": {"epsilon": 1e-3, "k": 50}, "rantext": {"epsilon": 1e-3}}
CTX = FrontContext("train")


def _sanitizer(name: str, seed: int = 0, **params: object) -> TokenSanitizer:
    defense = build_defense({"name": name, **(LOW[name] | params)}, hidden_size=8)
    assert isinstance(defense, TokenSanitizer)
    defense.setup(FrontResources(tiny_model("llama", "causal_lm"), tiny_tokenizer(), seed))
    return defense


@pytest.mark.parametrize("name", NAMES)
def test_special_tokens_unknown_words_and_whitespace_are_kept(name: str) -> None:
    sanitizer = _sanitizer(name)
    assert sanitizer.num_candidates == 94  # the tiny vocabulary less <pad>, </s>, <unk>
    text = "</s> the  cat <unk> xyzzy\tsat <pad> on\nthe mat"
    words = text.split()
    for out in sanitizer.on_text([text] * 20, CTX):
        got = out.split()
        assert [w for w in got if w in ("</s>", "<unk>", "xyzzy", "<pad>")] == [
            "</s>",
            "<unk>",
            "xyzzy",
            "<pad>",
        ]
        assert [i for i, w in enumerate(got) if w in ("</s>", "<unk>", "xyzzy", "<pad>")] == [0, 3, 4, 6]
        assert len(got) == len(words)
        # The whitespace between the words is the original's, character for character.
        assert re.split(r"\S+", out) == re.split(r"\S+", text)
    changed = sum(
        a != b for out in sanitizer.on_text([text] * 20, CTX) for a, b in zip(out.split(), words, strict=True)
    )
    assert changed > 0.8 * 20 * 6  # of the 6 ordinary words per text, almost all replaced


@pytest.mark.parametrize("name", NAMES)
def test_a_fixed_seed_gives_the_same_texts_and_another_seed_others(name: str) -> None:
    texts = ["the cat sat on the mat", "a big red car on the road"] * 5
    first = _sanitizer(name, seed=1).on_text(texts, CTX)
    assert _sanitizer(name, seed=1).on_text(texts, CTX) == first
    assert _sanitizer(name, seed=2).on_text(texts, CTX) != first
    assert first != texts


@pytest.mark.parametrize("name", NAMES)
def test_the_sanitized_text_tokenizes_to_the_drawn_ids(name: str) -> None:
    tok = tiny_tokenizer()
    sanitizer = _sanitizer(name)
    ids = tok("the cat sat on the mat w5 w17", add_special_tokens=False)["input_ids"]
    sanitizer._generator.manual_seed(5)  # type: ignore[union-attr]
    drawn = sanitizer.sanitize_ids(ids)
    sanitizer._generator.manual_seed(5)  # type: ignore[union-attr]
    (text,) = sanitizer.on_text([tok.decode(ids)], CTX)
    assert tok(text, add_special_tokens=False)["input_ids"] == drawn
    assert sanitizer.sanitize_ids([]) == []


@pytest.mark.parametrize("name", NAMES)
def test_it_builds_without_the_model_and_refuses_to_run_before_setup(name: str) -> None:
    front = build_front([{"name": name}], hidden_size=8)  # what config validation does
    assert front.touches_text and not front.trains
    with pytest.raises(RuntimeError, match="setup\\(\\) has not run"):
        front.text(["the cat"], CTX)
    with pytest.raises(ValueError, match="needs the run's tokenizer"):
        build_front([{"name": name}], tiny_model("llama", "causal_lm"))
    front = build_front([{"name": name}], tiny_model("llama", "causal_lm"), tokenizer=tiny_tokenizer())
    assert len(front.text(["the cat"], FrontContext("generate"))[0].split()) == 2
    with pytest.raises(DefenseConfigError, match="epsilon: Input should be greater than 0"):
        build_defense({"name": name, "epsilon": 0})
    with pytest.raises(DefenseConfigError, match="colour: Extra inputs are not permitted"):
        build_defense({"name": name, "colour": 1})
