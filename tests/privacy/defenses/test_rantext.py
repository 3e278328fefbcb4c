"""RanText draws from a random adjacency list whose radius shrinks as the budget grows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from splitfed.privacy.defenses import build_defense
from splitfed.privacy.defenses.rantext import RanText
from splitfed.split.front import FrontContext, FrontResources
from tiny import tiny_model, tiny_tokenizer

N = 4000
CTX = FrontContext("generate")


def _rantext(epsilon: float, seed: int = 0) -> RanText:
    defense = build_defense({"name": "rantext", "epsilon": epsilon})
    assert isinstance(defense, RanText)
    defense.setup(FrontResources(tiny_model("llama", "causal_lm"), tiny_tokenizer(), seed=seed))
    return defense


def _expected_keep(token: int, epsilon: float, draws: int = 20000) -> float:
    """Keep probability of ``token`` by Monte Carlo over the radius, the mechanism written out in numpy."""
    table = tiny_model("llama", "causal_lm").model.embed_tokens.weight.detach().double().numpy()[3:]
    dist = np.linalg.norm(table - table[token - 3], axis=-1)
    scale = (table.max() - table.min()) / epsilon
    rng = np.random.default_rng(0)
    radius = np.linalg.norm(rng.laplace(0.0, scale, (draws, table.shape[1])), axis=-1)
    inside = dist[None, :] <= radius[:, None]
    weights = np.where(inside, np.exp(epsilon / 2 * (1 - dist[None, :] / radius[:, None])), 0.0)
    return float((weights[:, token - 3] / weights.sum(-1)).mean())


def _kept(sanitizer: RanText, word: str) -> float:
    tok = tiny_tokenizer()
    (text,) = sanitizer.on_text([" ".join([word] * N)], CTX)
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    assert ids.numel() == N
    return float((ids == tok.convert_tokens_to_ids(word)).double().mean())


@pytest.mark.parametrize("epsilon", [5.0, 9.0])
def test_the_kept_fraction_matches_the_mechanism(epsilon: float) -> None:
    token = tiny_tokenizer().convert_tokens_to_ids("dog")
    expected = _expected_keep(token, epsilon)
    assert 0.05 < expected < 0.95
    got = _kept(_rantext(epsilon), "dog")
    assert abs(got - expected) < 4.5 * math.sqrt(expected * (1 - expected) / N) + 0.01, (got, expected)


def test_the_radius_is_the_norm_of_a_laplace_vector_scaled_by_one_over_epsilon() -> None:
    sanitizer = _rantext(4.0)
    radii = sanitizer.radii(20000, torch.Generator().manual_seed(0)).double()
    scale = sanitizer.sensitivity / 4.0
    assert float(radii.pow(2).mean()) == pytest.approx(2 * 32 * scale**2, rel=0.03)  # E r^2 = 2 d b^2
    assert float(_rantext(8.0).radii(20000, torch.Generator().manual_seed(0)).mean()) == pytest.approx(
        float(radii.mean()) / 2, rel=0.02
    )


def test_a_large_budget_keeps_almost_every_token_and_a_small_one_replaces_almost_all() -> None:
    assert _kept(_rantext(1e4), "dog") > 0.999
    assert _kept(_rantext(1e-3), "dog") < 0.03
