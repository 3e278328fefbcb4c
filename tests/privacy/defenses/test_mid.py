"""MID: a variational bottleneck whose KL term trains the head (and itself) with the task."""

from __future__ import annotations

import pytest
import torch

from splitfed.privacy.defenses import DefenseConfigError, build_defense
from splitfed.privacy.defenses.mid import MID
from splitfed.split.front import FrontContext
from splitfed.transport.channel import CrossingRecorder
from tiny import tiny_batch


def _head_grads(split_system, weight: float, where: str) -> torch.Tensor:  # type: ignore[no-untyped-def]
    system = split_system([{"name": "mid", "bottleneck": 8, "weight": weight, "where": where}])
    torch.manual_seed(1)  # the same bottleneck samples for every weight
    system.data_party.train_step(tiny_batch("classification"), update=False)
    params = system.segments["head"].trainable_parameters()
    assert params
    return torch.cat([p.grad.flatten() for p in params if p.grad is not None])


@pytest.mark.parametrize("where", ["head", "tail"])
def test_the_kl_term_reaches_the_head_in_proportion_to_its_weight(split_system, where: str) -> None:  # type: ignore[no-untyped-def]
    g0, g1, g2 = (_head_grads(split_system, w, where) for w in (0.0, 1.0, 2.0))
    assert float((g1 - g0).abs().max()) > 1e-6  # the KL term moves the head's LoRA
    torch.testing.assert_close(g2 - g1, g1 - g0, atol=1e-6, rtol=1e-3)  # linearly in lambda


def test_its_parameters_join_the_data_party_optimizer_and_train(split_system) -> None:  # type: ignore[no-untyped-def]
    system = split_system([{"name": "mid", "bottleneck": 8, "weight": 0.1, "where": "both"}])
    (mid,) = system.data_party.front.defenses
    assert isinstance(mid, MID)
    own = list(mid.parameters())
    assert len(own) == 8  # two bottlenecks of encoder + decoder
    trained = {id(p) for p in system.data_party.trainer.params}
    assert all(id(p) in trained for p in own)
    before = [p.detach().clone() for p in own]
    system.data_party.train_step(tiny_batch("classification"))
    assert all(not torch.equal(p, b) for p, b in zip(own, before, strict=True))


@pytest.mark.parametrize("where", ["head", "tail", "both"])
def test_on_a_frozen_head_a_gradient_is_returned_only_for_a_bottleneck_before_the_crossing(
    split_system,
    where: str,  # type: ignore[no-untyped-def]
) -> None:
    """The tail's bottleneck trains from the data party's own loss: alone, it needs nothing back."""
    system = split_system(
        [{"name": "mid", "bottleneck": 8, "weight": 0.1, "where": where}], head_mode="frozen"
    )
    recorder = CrossingRecorder(keep_tensors=False)
    system.channel.recorder = recorder
    (mid,) = system.data_party.front.defenses
    before = [p.detach().clone() for p in mid.parameters()]
    system.data_party.train_step(tiny_batch("classification"))
    assert len(recorder.of_kind("backward_result")) == (0 if where == "tail" else 1)
    assert system.data_party.front.trains_before_crossing is (where != "tail")
    assert all(not torch.equal(p, b) for p, b in zip(mid.parameters(), before, strict=True))


def test_the_kl_is_averaged_over_real_tokens_only() -> None:
    torch.manual_seed(0)
    mid = MID(hidden_size=6, bottleneck=3, weight=0.5)
    hidden = torch.randn(2, 4, 6)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    _, aux = mid.on_activations(hidden, FrontContext("train", attention_mask=mask))
    assert mid.head_bottleneck is not None
    mu, logvar = mid.head_bottleneck.encoder(hidden).chunk(2, dim=-1)
    per_token = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(-1)
    expected = 0.5 * per_token[mask.bool()].mean()
    torch.testing.assert_close(aux, expected)
    assert not torch.allclose(aux, 0.5 * per_token.mean())  # padding would change it


def test_it_samples_in_training_and_uses_the_mean_elsewhere() -> None:
    mid = MID(hidden_size=6, bottleneck=3)
    x = torch.randn(2, 4, 6, dtype=torch.bfloat16)
    train = [mid.on_activations(x, FrontContext("train"))[0] for _ in range(2)]
    assert train[0].dtype == torch.bfloat16 and not torch.equal(train[0], train[1])
    evals = [mid.on_activations(x, FrontContext(phase)) for phase in ("eval", "eval", "generate")]
    assert all(isinstance(e, torch.Tensor) for e in evals)  # no aux loss outside training
    assert torch.equal(evals[0], evals[1]) and torch.equal(evals[0], evals[2])  # type: ignore[arg-type]
    sampling = MID(hidden_size=6, bottleneck=3, sample_at_eval=True)
    assert not torch.equal(
        sampling.on_activations(x, FrontContext("eval")), sampling.on_activations(x, FrontContext("eval"))
    )  # type: ignore[arg-type]


def test_where_tail_bottlenecks_only_the_received_hidden_state() -> None:
    mid = MID(hidden_size=6, bottleneck=3, where="tail")
    assert mid.head_bottleneck is None and mid.tail_bottleneck is not None
    x = torch.randn(2, 4, 6)
    ctx = FrontContext("eval")
    assert mid.on_activations(x, ctx) is x
    assert mid.on_received("logits", x, ctx) is x
    torch.testing.assert_close(mid.on_received("hidden", x, ctx), mid.tail_bottleneck(x, sample=False)[0])


def test_bad_parameters_name_the_key() -> None:
    with pytest.raises(DefenseConfigError, match="where: Input should be 'head', 'tail' or 'both'"):
        build_defense({"name": "mid", "where": "body"}, hidden_size=8)
    with pytest.raises(DefenseConfigError, match="bottleneck: Input should be greater than 0"):
        build_defense({"name": "mid", "bottleneck": 0}, hidden_size=8)
    with pytest.raises(DefenseConfigError, match="weight: Input should be greater than or equal to 0"):
        build_defense({"name": "mid", "weight": -1}, hidden_size=8)


@pytest.mark.parametrize("where", ["tail", "both"])
def test_a_tail_bottleneck_is_refused_in_ht_and_head_alone_is_not(split_system, where: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=f"mid where: {where} .*in HT use where: head"):
        split_system([{"name": "mid", "where": where}], setting="ht")
    system = split_system([{"name": "mid", "where": "head"}], setting="ht")
    assert system.data_party.front.trains_before_crossing


def test_the_pca_start_passes_the_first_batch_s_principal_subspace_through() -> None:
    torch.manual_seed(0)
    basis = torch.randn(3, 10)
    x = torch.randn(2, 6, 3) @ basis + 5.0  # rank 3 around an offset: a width-3 code holds it all
    mid = MID(hidden_size=10, bottleneck=3)
    out = mid.on_activations(x, FrontContext("eval"))
    torch.testing.assert_close(out, x, atol=1e-4, rtol=1e-4)  # the task starts undefended
    assert mid.head_bottleneck is not None
    mu, logvar = mid.head_bottleneck.encoder(x).chunk(2, dim=-1)
    torch.testing.assert_close(mu.reshape(-1, 3).var(0), torch.ones(3), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logvar, torch.full_like(logvar, -4.0))
    # Fitted once: a later batch goes through the same bottleneck, it does not refit.
    weight = mid.head_bottleneck.encoder.weight.detach().clone()
    mid.on_activations(torch.randn(2, 6, 10), FrontContext("train"))
    assert torch.equal(mid.head_bottleneck.encoder.weight, weight)
    random = MID(hidden_size=10, bottleneck=3, init="random")
    assert not torch.allclose(random.on_activations(x, FrontContext("eval")), x, atol=0.5)


def test_a_code_wider_than_the_batch_spans_uses_only_what_it_spans() -> None:
    # 5 distinct tokens (one repeated) span 4 directions of 10: a width-8 code fitted on them must
    # not scale the unspanned directions, where a fresh token's coordinate is not rounding noise.
    torch.manual_seed(0)
    tokens = torch.randn(5, 10)
    first = torch.cat([tokens, tokens[:1]]).reshape(1, 6, 10)
    mid = MID(hidden_size=10, bottleneck=8, init_logvar=-4.0)
    out = mid.on_activations(first, FrontContext("eval"))
    torch.testing.assert_close(out, first, atol=1e-4, rtol=1e-4)  # the batch itself passes whole
    assert mid.head_bottleneck is not None
    fresh = torch.randn(4, 6, 10)
    _, kl = mid.head_bottleneck(fresh, sample=False)
    # 4 used dimensions at a few units of variance each, 4 unused at about 1.5 nats each: a few
    # tens of nats. Scaling the unspanned directions to unit variance gave about 1e12.
    assert float(kl.max()) < 200.0
    mu, _ = mid.head_bottleneck.encoder(fresh).chunk(2, dim=-1)
    assert torch.count_nonzero(mu.reshape(-1, 8).abs().amax(0)) == 4


def test_loaded_adapters_are_not_refitted_and_padding_is_not_fitted(split_system, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from splitfed.run.checkpoints import load_adapters, save_adapters

    system = split_system([{"name": "mid", "bottleneck": 4, "weight": 0.1}])
    system.data_party.train_step(tiny_batch("classification"))
    save_adapters(system.segments, tmp_path, ("data_party",))
    fresh = split_system([{"name": "mid", "bottleneck": 4, "weight": 0.1}])
    load_adapters(fresh.segments, tmp_path, ("data_party",))
    (mid,) = fresh.data_party.front.defenses
    assert mid.head_bottleneck is not None and bool(mid.head_bottleneck.fitted)
    (trained,) = system.data_party.front.defenses
    mid.on_activations(torch.randn(2, 5, mid.head_bottleneck.decoder.out_features), FrontContext("eval"))
    assert torch.equal(mid.head_bottleneck.encoder.weight, trained.head_bottleneck.encoder.weight)
    # Padding does not enter the fit: the same real tokens under more padding fit the same.
    x, mask = torch.randn(1, 5, 6), torch.tensor([[1, 1, 1, 1, 1]])
    padded = torch.cat([x, torch.full((1, 3, 6), 100.0)], 1)
    a, b = MID(hidden_size=6, bottleneck=2), MID(hidden_size=6, bottleneck=2)
    a.on_activations(x, FrontContext("eval", attention_mask=mask))
    b.on_activations(
        padded, FrontContext("eval", attention_mask=torch.cat([mask, torch.zeros(1, 3)], 1).long())
    )
    assert a.head_bottleneck is not None and b.head_bottleneck is not None
    torch.testing.assert_close(a.head_bottleneck.decoder.bias, b.head_bottleneck.decoder.bias)
