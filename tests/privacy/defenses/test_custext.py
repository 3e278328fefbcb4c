"""CusText draws a replacement from each token's K most similar tokens as its mechanism says."""

from __future__ import annotations

import math

import pytest
import torch

from splitfed.privacy.defenses import build_defense
from splitfed.privacy.defenses.custext import CusText
from splitfed.split.front import FrontContext, FrontResources
from tiny import tiny_model, tiny_tokenizer

N = 4000
CTX = FrontContext("eval")


def _custext(epsilon: float, k: int) -> CusText:
    defense = build_defense({"name": "custext", "epsilon": epsilon, "k": k})
    assert isinstance(defense, CusText)
    defense.setup(FrontResources(tiny_model("llama", "causal_lm"), tiny_tokenizer(), seed=0))
    return defense


def _expected(token: int, epsilon: float, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The output set (ids) of ``token`` and its probabilities, written out from the paper's rule."""
    table = tiny_model("llama", "causal_lm").model.embed_tokens.weight.detach().double()
    unit = table[3:] / table[3:].norm(dim=-1, keepdim=True)
    sim = unit @ unit[token - 3]
    top, members = sim.topk(k)
    assert int(members[0]) == token - 3  # a random embedding is its own nearest neighbour
    utility = (top - top.min()) / (top.max() - top.min())
    weights = torch.exp(epsilon * utility / 2)
    return members + 3, weights / weights.sum()


def _draws(sanitizer: CusText, word: str) -> torch.Tensor:
    tok = tiny_tokenizer()
    (text,) = sanitizer.on_text([" ".join([word] * N)], CTX)
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize(("epsilon", "k"), [(2.0, 10), (6.0, 20)])
def test_replacements_stay_in_the_output_set_with_the_mechanisms_frequencies(epsilon: float, k: int) -> None:
    token = tiny_tokenizer().convert_tokens_to_ids("cat")
    members, probs = _expected(token, epsilon, k)
    drawn = _draws(_custext(epsilon, k), "cat")
    assert drawn.numel() == N and bool(torch.isin(drawn, members).all())
    assert len(set(drawn.tolist())) == k  # every member is reachable
    for member, p in zip(members.tolist(), probs.tolist(), strict=True):
        got = float((drawn == member).double().mean())
        assert abs(got - p) < 4.5 * math.sqrt(p * (1 - p) / N) + 1e-3, (member, p, got)


def test_a_large_budget_or_k_one_keeps_the_token_and_a_small_budget_draws_uniformly() -> None:
    token = tiny_tokenizer().convert_tokens_to_ids("cat")
    assert bool((_draws(_custext(1e4, 20), "cat") == token).double().mean() > 0.999)
    assert bool((_draws(_custext(0.5, 1), "cat") == token).all())
    kept = float((_draws(_custext(1e-3, 20), "cat") == token).double().mean())
    assert abs(kept - 1 / 20) < 4.5 * math.sqrt(0.05 * 0.95 / N)


def test_k_larger_than_the_vocabulary_uses_all_of_it() -> None:
    drawn = _draws(_custext(1e-3, 5000), "cat")
    assert len(set(drawn.tolist())) > 80  # the 94 ordinary tokens, nearly uniformly
