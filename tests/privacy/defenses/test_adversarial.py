"""Adversarial training: a simulated inverter learns on its own optimizer; the head learns to foil it."""

from __future__ import annotations

import pytest
import torch

from splitfed.privacy.defenses import DefenseConfigError, build_defense
from splitfed.privacy.defenses.adversarial import AdversarialTraining, _token_cross_entropy
from splitfed.split.front import FrontContext, FrontResources
from tiny import VOCAB, tiny_batch, tiny_model


def _adversary(system) -> AdversarialTraining:  # type: ignore[no-untyped-def]
    (adv,) = system.data_party.front.defenses
    assert isinstance(adv, AdversarialTraining)
    return adv


@pytest.mark.parametrize("inverter", ["linear", "mlp"])
def test_the_adversary_learns_to_invert_on_its_own_optimizer(split_system, inverter: str) -> None:  # type: ignore[no-untyped-def]
    system = split_system(
        [{"name": "adversarial", "weight": 0.1, "lr": 0.2, "inverter": inverter, "inverter_width": 64}]
    )
    adv = _adversary(system)
    own = list(adv.parameters())
    assert own and not any(p.requires_grad for p in own)
    trained = {id(p) for p in system.data_party.trainer.params}
    assert not any(id(p) in trained for p in own)  # not the data party's optimizer's
    assert trained  # which still holds the head's LoRA
    batch = tiny_batch("classification", batch=4, seq=8)
    for _ in range(8):
        system.data_party.train_step(batch)
    assert len(adv.losses) == 8
    assert adv.losses[0] == pytest.approx(float(torch.log(torch.tensor(float(VOCAB)))), rel=0.15)
    # Measured: from 4.60 to 2.35 (linear) and 0.88 (mlp) in 8 updates.
    assert adv.losses[-1] < 0.6 * adv.losses[0]
    assert all(later < earlier for earlier, later in zip(adv.losses[:6], adv.losses[1:6], strict=False))


def test_a_head_trained_against_the_adversary_foils_it(split_system) -> None:  # type: ignore[no-untyped-def]
    batch = tiny_batch("classification", batch=4, seq=8)
    final = {}
    for weight in (0.0, 1.0):
        system = split_system([{"name": "adversarial", "weight": weight, "lr": 0.2}], lr=0.05)
        for _ in range(12):
            system.data_party.train_step(batch)
        final[weight] = _adversary(system).losses[-1]
    # Measured: about 2.2 without the adversarial loss, 7.9 with it.
    assert final[1.0] > 2 * final[0.0]


def test_the_head_gets_minus_lambda_times_the_adversary_loss_and_the_adversary_its_own(split_system) -> None:  # type: ignore[no-untyped-def]
    head_grads, inverter_grads, aux = [], [], []
    batch = tiny_batch("classification")
    for weight in (0.0, 1.0, 2.0):
        system = split_system([{"name": "adversarial", "weight": weight}])
        adv = _adversary(system)
        party = system.data_party
        hidden = party._run_head(batch, train=True)
        ctx = FrontContext("train", attention_mask=batch["attention_mask"], input_ids=batch["input_ids"])
        # What the inverter's own gradient should be: its cross-entropy on detached activations.
        assert adv.inverter is not None
        reference = adv.inverter.requires_grad_(True)
        expected = torch.autograd.grad(
            _token_cross_entropy(reference(hidden.detach()), batch["input_ids"], batch["attention_mask"]),
            list(reference.parameters()),
        )
        reference.requires_grad_(False)
        for p in adv.parameters():
            p.grad = None
        out = adv.on_activations(hidden, ctx)
        if weight:
            assert isinstance(out, tuple)
            ce = _token_cross_entropy(adv.inverter(hidden), batch["input_ids"], batch["attention_mask"])
            torch.testing.assert_close(out[1], -weight * ce)
            aux.append(out[1])
        for p, g in zip(adv.parameters(), expected, strict=True):
            torch.testing.assert_close(p.grad, g)
        # Through a whole step: the head's gradient, and the inverter's left as the adversary's alone.
        for p in adv.parameters():
            p.grad = None
        party.train_step(batch, update=False)
        inverter_grads.append(torch.cat([p.grad.flatten() for p in adv.parameters()]))
        params = system.segments["head"].trainable_parameters()
        head_grads.append(torch.cat([p.grad.flatten() for p in params if p.grad is not None]))
    g0, g1, g2 = head_grads
    assert float((g1 - g0).abs().max()) > 1e-6
    torch.testing.assert_close(g2 - g1, g1 - g0, atol=1e-6, rtol=1e-3)
    torch.testing.assert_close(inverter_grads[1], inverter_grads[0])  # lambda never reaches the inverter
    torch.testing.assert_close(inverter_grads[2], inverter_grads[0])


def test_only_training_is_affected_and_hooks_before_setup_fail_clearly() -> None:
    adv = build_defense({"name": "adversarial"}, hidden_size=32)  # config validation: no model, no setup
    assert isinstance(adv, AdversarialTraining) and adv.inverter is None
    ids = torch.randint(3, VOCAB, (2, 5))
    with pytest.raises(RuntimeError, match=r"adversarial: the vocabulary size .* setup\(\) has not run"):
        adv.on_activations(torch.randn(2, 5, 32), FrontContext("train", input_ids=ids))
    adv.setup(FrontResources(tiny_model("llama", "classification")))
    hidden = torch.randn(2, 5, 32)
    for phase in ("eval", "generate"):
        assert adv.on_activations(hidden, FrontContext(phase, input_ids=ids)) is hidden  # type: ignore[arg-type]
    adv.on_update(FrontContext("train"))
    assert adv.losses == []  # nothing to learn from yet
    with pytest.raises(ValueError, match="adversarial needs the token ids"):
        adv.on_activations(hidden, FrontContext("train"))


def test_bad_parameters_name_the_key_and_the_range() -> None:
    with pytest.raises(DefenseConfigError, match="lr: Input should be greater than 0"):
        build_defense({"name": "adversarial", "lr": 0}, hidden_size=8)
    with pytest.raises(DefenseConfigError, match="inverter: Input should be 'linear' or 'mlp'"):
        build_defense({"name": "adversarial", "inverter": "transformer"}, hidden_size=8)
