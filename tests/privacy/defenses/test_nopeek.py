"""NoPeek: the distance correlation between the head's input and what crosses trains the head."""

from __future__ import annotations

import pytest
import torch

from splitfed.privacy.defenses import build_defense
from splitfed.privacy.defenses.nopeek import NoPeek, distance_correlation
from splitfed.split.front import FrontContext, FrontResources
from tiny import tiny_batch, tiny_model


def test_distance_correlation_is_one_for_similar_copies_and_small_for_independent_samples() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 5, generator=g)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g))
    assert float(distance_correlation(x, x)) == pytest.approx(1.0, abs=1e-5)
    assert float(distance_correlation(x, 3 * x @ q + 1)) == pytest.approx(1.0, abs=1e-4)
    independent = float(distance_correlation(x, torch.randn(1000, 5, generator=g)))
    assert independent < 0.2  # the V-statistic's bias: about 0.13 at n = 1000, 0.4 at n = 100
    few = float(distance_correlation(x[:100], torch.randn(100, 5, generator=g)))
    assert independent < few  # and it shrinks with n
    # Dependence that (Pearson) correlation misses is seen: y = x^2 is uncorrelated with x.
    assert float(distance_correlation(x, x**2)) > 2 * independent
    assert float(distance_correlation(x[:1], x[:1])) == 0.0  # undefined for one sample


def test_distance_correlation_is_differentiable_with_finite_gradients() -> None:
    x = torch.randn(16, 4, dtype=torch.float64)
    z = torch.cat([x[:8], x[:8]]).requires_grad_(True)  # repeated rows: zero distances off the diagonal
    distance_correlation(x, z).backward()
    assert z.grad is not None and bool(torch.isfinite(z.grad).all()) and float(z.grad.abs().sum()) > 0


def _nopeek(model: torch.nn.Module, **params: object) -> NoPeek:
    nopeek = build_defense({"name": "nopeek", **params})
    assert isinstance(nopeek, NoPeek)
    nopeek.setup(FrontResources(model))
    return nopeek


def test_the_loss_correlates_the_input_embeddings_with_the_activations_over_real_tokens() -> None:
    model = tiny_model("llama", "classification")
    nopeek = _nopeek(model, weight=0.5)
    batch = tiny_batch("classification", batch=5, seq=7)
    hidden = torch.randn(5, 7, 32)
    ctx = FrontContext("train", attention_mask=batch["attention_mask"], input_ids=batch["input_ids"])
    out, aux = nopeek.on_activations(hidden, ctx)
    assert out is hidden
    mask = batch["attention_mask"][..., None].float()
    embeds = model.get_input_embeddings().weight.detach()[batch["input_ids"]]
    expected = distance_correlation((embeds * mask).flatten(1), (hidden * mask).flatten(1))
    torch.testing.assert_close(aux, 0.5 * expected)
    # Activations that are the embeddings themselves are maximally correlated.
    _, same = nopeek.on_activations(embeds * 2.0, ctx)
    assert float(same) == pytest.approx(0.5, abs=1e-5)
    assert nopeek.on_activations(hidden, FrontContext("eval", input_ids=batch["input_ids"])) is hidden


def test_token_unit_uses_at_most_max_tokens_real_tokens() -> None:
    nopeek = _nopeek(tiny_model("llama", "classification"), unit="token", max_tokens=10)
    batch = tiny_batch("classification", batch=4, seq=9)
    ctx = FrontContext("train", attention_mask=batch["attention_mask"], input_ids=batch["input_ids"])
    x, z = nopeek.samples(torch.randn(4, 9, 32), ctx)
    assert x.shape == (10, 32) and z.shape == (10, 32)
    everything = _nopeek(tiny_model("llama", "classification"), unit="token", max_tokens=1000)
    x, _ = everything.samples(torch.randn(4, 9, 32), ctx)
    assert x.shape[0] == int(batch["attention_mask"].sum())


def test_a_hook_before_setup_or_without_token_ids_fails_clearly() -> None:
    ctx = FrontContext("train", input_ids=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"nopeek: the token embedding matrix .* setup\(\) has not run"):
        NoPeek().on_activations(torch.randn(1, 3, 32), ctx)
    nopeek = _nopeek(tiny_model("llama", "classification"))
    with pytest.raises(ValueError, match="nopeek needs the token ids"):
        nopeek.on_activations(torch.randn(1, 3, 32), FrontContext("train"))


def test_the_loss_reaches_the_head_in_proportion_to_its_weight(split_system) -> None:  # type: ignore[no-untyped-def]
    grads = []
    for weight in (0.0, 1.0, 2.0):
        system = split_system([{"name": "nopeek", "weight": weight}])
        system.data_party.train_step(tiny_batch("classification"), update=False)
        params = system.segments["head"].trainable_parameters()
        grads.append(torch.cat([p.grad.flatten() for p in params if p.grad is not None]))
    assert float((grads[1] - grads[0]).abs().max()) > 1e-6
    torch.testing.assert_close(grads[2] - grads[1], grads[1] - grads[0], atol=1e-6, rtol=1e-3)
