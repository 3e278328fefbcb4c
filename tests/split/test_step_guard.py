"""A model-party update is applied only when its gradients and its result are finite and bounded."""

from __future__ import annotations

import pytest
import torch

from splitfed.models.partition import FinetuneSpec, SplitSpec
from splitfed.split.parties import OptimSpec, StepGuard, StepRejected
from splitfed.split.system import build_model_party
from splitfed.transport.channel import Message
from tiny import tiny_model

HIDDEN = 32


def _party(optim: OptimSpec | None = None, guard: StepGuard | None = None, per_party: bool = False):  # type: ignore[no-untyped-def]
    party, segments, _ = build_model_party(
        tiny_model("llama", "classification"),
        SplitSpec("hbt", 1, 1),
        "classification",
        {"body": FinetuneSpec("lora", r=2), "head": FinetuneSpec("lora", r=2)},
        optim or OptimSpec(lr=1e-2),
        per_party_adapters=per_party,
    )
    if guard is not None:
        party.guard = guard
    return party, segments["body"]


def _snapshot(body) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return {n: p.detach().clone() for n, p in body.named_model_parameters(trainable_only=True).items()}


def _step(party, grad_value: float | None, client: str = "a", batch_id: int = 1) -> Message | None:  # type: ignore[no-untyped-def]
    hidden = torch.randn(2, 5, HIDDEN)
    mask = torch.ones(2, 5, dtype=torch.long)
    meta = {"client": client, "batch_id": batch_id, "train": True}
    out = party.handle(Message("forward", {"hidden": hidden, "attention_mask": mask}, meta))
    grad = (
        torch.randn_like(out.tensors["hidden"])
        if grad_value is None
        else torch.full_like(out.tensors["hidden"], grad_value)
    )
    return party.handle(
        Message("backward", {"grad": grad}, {"client": client, "batch_id": batch_id, "update": True})
    )


def test_a_step_with_a_huge_gradient_norm_is_refused_whole() -> None:
    party, body = _party(guard=StepGuard(max_grad_norm=100.0))
    before = _snapshot(body)
    with pytest.raises(StepRejected, match=r"gradient norm .* exceeds"):
        _step(party, 1e6)
    assert party.updates == 0
    assert all(torch.equal(p, before[n]) for n, p in _snapshot(body).items())
    assert all(p.grad is None for p in party.trainer.params)
    _step(party, None)  # the next honest step is applied
    assert party.updates == 1


def test_a_gradient_that_overflows_float32_is_refused_even_without_a_bound() -> None:
    party, body = _party()
    before = _snapshot(body)
    with pytest.raises(StepRejected, match="not finite"):
        _step(party, 3e38)  # finite, but the parameters' gradients overflow
    assert party.updates == 0
    assert all(torch.equal(p, before[n]) for n, p in _snapshot(body).items())


def test_an_update_that_leaves_parameters_non_finite_is_rolled_back() -> None:
    party, body = _party(optim=OptimSpec(optimizer="sgd", lr=1e38, max_grad_norm=None))
    party.defer_updates = True  # as a server runs it: reply first, then the update
    before = _snapshot(body)
    state = party.trainer.state_dict()
    _step(party, 1e3)
    with pytest.raises(StepRejected, match="it was rolled back"):
        party.commit("a")
    assert party.updates == 0
    assert all(torch.equal(p, before[n]) for n, p in _snapshot(body).items())
    assert party.trainer.scheduler.state_dict() == state["scheduler"]


def test_deferred_updates_apply_only_at_commit_and_forgetting_cancels_them() -> None:
    party, body = _party()
    party.defer_updates = True
    before = _snapshot(body)
    _step(party, None)
    assert party.updates == 0 and all(torch.equal(p, before[n]) for n, p in _snapshot(body).items())
    assert party.commit("a") and party.updates == 1
    assert not party.commit("a")
    _step(party, None, batch_id=2)
    party.forget_gradients("a")  # e.g. the reply could not be sent
    assert not party.commit("a") and party.updates == 1


def test_per_party_adapters_are_guarded_too() -> None:
    party, _ = _party(guard=StepGuard(max_grad_norm=100.0), per_party=True)
    with pytest.raises(StepRejected):
        _step(party, 1e6, client="mallory")
    _step(party, None, client="alice")
    assert party.client_steps == {"alice": 1}
