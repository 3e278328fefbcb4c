"""SanText replaces a token as often as its exponential mechanism over embedding distances says."""

from __future__ import annotations

import math

import pytest
import torch

from splitfed.privacy.defenses import build_defense
from splitfed.privacy.defenses.santext import SanText
from splitfed.split.front import FrontContext, FrontResources
from tiny import tiny_model, tiny_tokenizer

N = 4000
CTX = FrontContext("train")


def _santext(epsilon: float) -> SanText:
    defense = build_defense({"name": "santext", "epsilon": epsilon})
    assert isinstance(defense, SanText)
    defense.setup(FrontResources(tiny_model("llama", "causal_lm"), tiny_tokenizer(), seed=0))
    return defense


def _probabilities(token: int, epsilon: float) -> torch.Tensor:
    """The mechanism's distribution over the tiny vocabulary's ordinary ids 3..96, written out."""
    table = tiny_model("llama", "causal_lm").model.embed_tokens.weight.detach().double()
    dist = (table[3:] - table[token]).norm(dim=-1)
    weights = torch.exp(-epsilon * dist / 2)
    return weights / weights.sum()


def _fractions(sanitizer: SanText, word: str) -> torch.Tensor:
    tok = tiny_tokenizer()
    (text,) = sanitizer.on_text([" ".join([word] * N)], CTX)
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    assert ids.numel() == N
    return torch.bincount(ids - 3, minlength=94).double() / N


@pytest.mark.parametrize("epsilon", [30.0, 60.0])
def test_the_kept_fraction_and_the_likeliest_replacements_match_the_mechanism(epsilon: float) -> None:
    token = tiny_tokenizer().convert_tokens_to_ids("dog")
    expected = _probabilities(token, epsilon)
    got = _fractions(_santext(epsilon), "dog")
    keep = float(expected[token - 3])
    assert 0.05 < keep < 0.95  # a budget where the test can tell the mechanism from others
    for index in [token - 3, *expected.topk(4).indices.tolist()]:
        p = float(expected[index])
        assert abs(float(got[index]) - p) < 4.5 * math.sqrt(p * (1 - p) / N) + 1e-3, (index, p, got[index])
    assert 0.5 * float((got - expected).abs().sum()) < 0.08  # total variation of the whole draw


def test_a_large_budget_keeps_almost_every_token_and_a_small_one_replaces_almost_all() -> None:
    token = tiny_tokenizer().convert_tokens_to_ids("dog")
    assert float(_fractions(_santext(1e4), "dog")[token - 3]) > 0.999
    kept = float(_fractions(_santext(1e-3), "dog")[token - 3])
    assert kept < 0.03  # uniform over 94 tokens keeps 1/94


def test_distances_are_cached_per_token_and_bounded() -> None:
    sanitizer = build_defense({"name": "santext", "epsilon": 30, "cache_tokens": 3})
    assert isinstance(sanitizer, SanText)
    sanitizer.setup(FrontResources(tiny_model("llama", "causal_lm"), tiny_tokenizer()))
    sanitizer.on_text(["the cat sat on the mat"], CTX)
    assert len(sanitizer._cache) == 3  # five distinct tokens, the last three kept
    row = next(iter(sanitizer._cache.values()))
    assert row.shape == (94,) and abs(float(row.sum()) - 1) < 1e-5
