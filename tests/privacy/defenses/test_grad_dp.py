"""Gradient DP: every example's returned gradient is clipped to C and gets N(0, (zC)^2) noise."""

from __future__ import annotations

import pytest
import torch

from splitfed.privacy.defenses import DefenseConfigError, build_defense
from splitfed.privacy.defenses.activation_dp import gaussian_delta
from splitfed.privacy.defenses.grad_dp import GradientDP
from splitfed.split.front import FrontContext
from tiny import tiny_batch

TRAIN = FrontContext("train")


def test_each_example_row_is_clipped_to_the_bound() -> None:
    torch.manual_seed(0)
    dp = build_defense({"name": "grad_dp", "clip": 2.0, "noise_multiplier": 0.0})
    assert isinstance(dp, GradientDP)
    grad = torch.randn(6, 5, 4) * torch.tensor([0.05, 0.1, 1.0, 2.0, 0.01, 3.0])[:, None, None]
    out = dp.on_gradients(grad, TRAIN)
    norms, out_norms = grad.flatten(1).norm(dim=1), out.flatten(1).norm(dim=1)
    assert bool((norms > 2).any()) and bool((norms < 2).any())
    torch.testing.assert_close(out_norms, norms.clamp(max=2.0))
    torch.testing.assert_close(out[norms <= 2], grad[norms <= 2])
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), grad.flatten(1), dim=1)
    torch.testing.assert_close(cos, torch.ones_like(cos))  # clipping keeps each row's direction


def test_the_noise_has_standard_deviation_multiplier_times_clip_at_real_tokens_only() -> None:
    torch.manual_seed(0)
    dp = GradientDP(clip=0.5, noise_multiplier=1.5)
    mask = torch.ones(400, 12, dtype=torch.long)
    mask[:, 9:] = 0
    out = dp.on_gradients(torch.zeros(400, 12, 16), FrontContext("train", attention_mask=mask))
    real = out[:, :9]
    assert float(real.std()) == pytest.approx(0.75, rel=0.02)
    assert float(real.mean()) == pytest.approx(0.0, abs=0.01)
    assert float(out[:, 9:].abs().max()) == 0.0  # padding positions stay zero
    # A gradient whose shape the mask does not describe (HT classification logits) is noised everywhere.
    logits_grad = dp.on_gradients(torch.zeros(400, 3), FrontContext("train", attention_mask=mask))
    assert float(logits_grad.std()) == pytest.approx(0.75, rel=0.05)


def test_the_noise_is_fresh_and_the_dtype_kept() -> None:
    dp = GradientDP(clip=1.0, noise_multiplier=1.0)
    grad = torch.randn(2, 3, 4, dtype=torch.bfloat16)
    a, b = dp.on_gradients(grad, TRAIN), dp.on_gradients(grad, TRAIN)
    assert a.dtype == torch.bfloat16 and not torch.equal(a, b)


def test_epsilon_is_the_exact_gaussian_profile_inverted() -> None:
    for z in (0.5, 1.0, 4.0):
        dp = GradientDP(clip=3.0, noise_multiplier=z)
        eps = dp.epsilon(1e-5)
        # Sensitivity 2C under replacement of one example's row.
        assert gaussian_delta(z * 3.0, eps, 6.0) == pytest.approx(1e-5, rel=1e-6)
        assert gaussian_delta(z * 3.0, 0.99 * eps, 6.0) > 1e-5
    assert GradientDP(noise_multiplier=1.0).epsilon(1e-5) > GradientDP(noise_multiplier=2.0).epsilon(1e-5)
    assert GradientDP(noise_multiplier=0.0).epsilon(1e-5) == float("inf")


def test_what_the_data_party_returns_is_clipped_per_example(split_system) -> None:  # type: ignore[no-untyped-def]
    system = split_system([{"name": "grad_dp", "clip": 1e-4, "noise_multiplier": 0.0}])
    returned: list[torch.Tensor] = []
    submit = system.channel.submit

    def spy(message):  # type: ignore[no-untyped-def]
        if message.kind == "backward":
            returned.append(message.tensors["grad"])
        return submit(message)

    system.channel.submit = spy  # type: ignore[method-assign]
    system.data_party.train_step(tiny_batch("classification"))
    norms = returned[0].flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, 1e-4))  # tiny C: every row was clipped


def test_bad_parameters_name_the_key_and_the_range() -> None:
    with pytest.raises(DefenseConfigError, match="clip: Input should be greater than 0"):
        build_defense({"name": "grad_dp", "clip": 0})
    with pytest.raises(
        DefenseConfigError, match="noise_multiplier: Input should be greater than or equal to 0"
    ):
        build_defense({"name": "grad_dp", "noise_multiplier": -1})
