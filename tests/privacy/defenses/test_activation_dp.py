"""Activation DP: per-token clipping bounds the sensitivity, and the noise has the calibrated scale."""

from __future__ import annotations

import math

import pytest
import torch

from splitfed.privacy.defenses import DefenseConfigError, build_defense
from splitfed.privacy.defenses.activation_dp import (
    ActivationDP,
    gaussian_delta,
    gaussian_sigma_analytic,
    gaussian_sigma_classic,
)
from splitfed.split.front import FrontContext

TRAIN = FrontContext("train")


def _noise(defense: ActivationDP, shape: tuple[int, ...] = (64, 64, 32)) -> torch.Tensor:
    # Zero activations are never clipped: what comes out is the noise alone.
    return defense.on_activations(torch.zeros(shape), TRAIN)


@pytest.mark.parametrize(("epsilon", "calibration"), [(0.5, "classic"), (3.0, "analytic")])
def test_the_gaussian_noise_has_the_calibrated_standard_deviation(epsilon: float, calibration: str) -> None:
    torch.manual_seed(0)
    dp = build_defense({"name": "activation_dp", "epsilon": epsilon, "delta": 1e-5, "clip": 2.0})
    assert isinstance(dp, ActivationDP)
    sensitivity = 4.0  # replace-one-token: two vectors of norm <= clip
    expected = (
        math.sqrt(2 * math.log(1.25 / 1e-5)) * sensitivity / epsilon
        if calibration == "classic"
        else gaussian_sigma_analytic(epsilon, 1e-5, sensitivity)
    )
    assert dp.noise_scale == pytest.approx(expected, rel=1e-9)
    noise = _noise(dp)
    assert float(noise.std()) == pytest.approx(expected, rel=0.02)
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.02 * expected)
    # Gaussian, not Laplace: E|x| / std = sqrt(2/pi) (Laplace: 1/sqrt(2)).
    assert float(noise.abs().mean() / noise.std()) == pytest.approx(math.sqrt(2 / math.pi), rel=0.01)


def test_the_laplace_noise_has_scale_sensitivity_over_epsilon() -> None:
    torch.manual_seed(0)
    dp = ActivationDP(mechanism="laplace", epsilon=2.0, clip=0.5)
    scale = 2 * 0.5 / 2.0
    assert dp.noise_scale == pytest.approx(scale)
    noise = _noise(dp)
    assert float(noise.abs().mean()) == pytest.approx(scale, rel=0.02)  # E|x| = b
    assert float(noise.std()) == pytest.approx(math.sqrt(2) * scale, rel=0.02)
    assert float(noise.abs().mean() / noise.std()) == pytest.approx(1 / math.sqrt(2), rel=0.01)


@pytest.mark.parametrize(("mechanism", "order"), [("gaussian", 2), ("laplace", 1)])
def test_every_token_is_clipped_to_the_bound_in_its_mechanism_norm(mechanism: str, order: int) -> None:
    torch.manual_seed(0)
    dp = ActivationDP(mechanism=mechanism, epsilon=1.0 if mechanism == "laplace" else 0.5, clip=1.5)  # type: ignore[arg-type]
    hidden = torch.randn(4, 10, 16) * torch.rand(4, 10, 1) * 0.6
    clipped = dp.clipped(hidden)
    norms = torch.linalg.vector_norm(hidden, ord=order, dim=-1)
    out_norms = torch.linalg.vector_norm(clipped, ord=order, dim=-1)
    assert bool((norms > 1.5).any()) and bool((norms < 1.5).any())  # both cases occur
    assert bool((out_norms <= 1.5 + 1e-5).all())
    torch.testing.assert_close(out_norms[norms > 1.5], torch.full_like(out_norms[norms > 1.5], 1.5))
    small = norms <= 1.5
    torch.testing.assert_close(clipped[small], hidden[small])  # below the bound: unchanged
    # Directions are kept.
    cos = torch.nn.functional.cosine_similarity(clipped, hidden, dim=-1)
    torch.testing.assert_close(cos, torch.ones_like(cos))


def test_noise_is_fresh_at_every_use_in_every_phase_and_keeps_the_dtype() -> None:
    dp = ActivationDP(epsilon=0.5)
    hidden = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    for phase in ("train", "eval", "generate"):
        first = dp.on_activations(hidden, FrontContext(phase))  # type: ignore[arg-type]
        second = dp.on_activations(hidden, FrontContext(phase))  # type: ignore[arg-type]
        assert first.dtype == torch.bfloat16 and first.shape == hidden.shape
        assert not torch.equal(first, second)
        assert not torch.equal(first, hidden)
    only_train = ActivationDP(epsilon=0.5, phases=["train"])
    assert only_train.on_activations(hidden, FrontContext("eval")) is hidden
    assert only_train.on_activations(hidden, FrontContext("generate")) is hidden


def test_the_analytic_calibration_is_the_smallest_sigma_meeting_delta() -> None:
    for epsilon in (0.1, 0.5, 0.9):
        assert gaussian_sigma_analytic(epsilon, 1e-5, 1.0) < gaussian_sigma_classic(epsilon, 1e-5, 1.0)
    for epsilon, delta in ((0.5, 1e-6), (1.0, 1e-5), (4.0, 1e-3), (50.0, 1e-9)):
        sigma = gaussian_sigma_analytic(epsilon, delta, 2.0)
        assert gaussian_delta(sigma, epsilon, 2.0) <= delta
        assert gaussian_delta(sigma, epsilon, 2.0) == pytest.approx(delta, rel=1e-6)
        assert gaussian_delta(0.999 * sigma, epsilon, 2.0) > delta  # minimal
    # Balle & Wang 2018 report sigma ~ 3.73 for epsilon 1, delta 1e-5, sensitivity 1.
    assert gaussian_sigma_analytic(1.0, 1e-5, 1.0) == pytest.approx(3.73, abs=0.01)


@pytest.mark.parametrize(("sigma", "epsilon"), [(3.0, 1.0), (1.0, 2.5), (0.7, 0.3)])
def test_the_privacy_profile_equals_the_numerical_hockey_stick_divergence(
    sigma: float, epsilon: float
) -> None:
    """delta(eps) = integral of max(0, p - e^eps q) for p = N(0, s^2), q = N(Delta, s^2)."""
    sensitivity = 1.0
    x = torch.linspace(-20 * sigma, sensitivity + 20 * sigma, 400_001, dtype=torch.float64)
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), sigma)
    p, q = normal.log_prob(x).exp(), normal.log_prob(x - sensitivity).exp()
    numeric = float(torch.trapezoid((p - math.exp(epsilon) * q).clamp_min(0), x))
    assert gaussian_delta(sigma, epsilon, sensitivity) == pytest.approx(numeric, rel=1e-4)


def test_bad_parameters_name_the_key_and_what_is_allowed() -> None:
    with pytest.raises(DefenseConfigError, match="epsilon: Input should be greater than 0"):
        build_defense({"name": "activation_dp", "epsilon": 0})
    with pytest.raises(DefenseConfigError, match=r"delta: Input should be less than 1"):
        build_defense({"name": "activation_dp", "delta": 1.5})
    with pytest.raises(DefenseConfigError, match="delta: applies to the gaussian mechanism only"):
        build_defense({"name": "activation_dp", "mechanism": "laplace", "delta": 1e-5})
    with pytest.raises(DefenseConfigError, match="calibration: classic holds for epsilon < 1"):
        build_defense({"name": "activation_dp", "epsilon": 2, "calibration": "classic"})
    with pytest.raises(DefenseConfigError, match="clip: Input should be greater than 0"):
        build_defense({"name": "activation_dp", "clip": -1})
    with pytest.raises(DefenseConfigError, match="sigma: Extra inputs are not permitted"):
        build_defense({"name": "activation_dp", "sigma": 1})


def test_budgets_up_to_ten_thousand_calibrate_and_beyond_is_refused() -> None:
    loose = build_defense({"name": "activation_dp", "epsilon": 1600, "clip": 10.0})
    tight = build_defense({"name": "activation_dp", "epsilon": 16, "clip": 10.0})
    assert 0 < loose.noise_scale < tight.noise_scale  # type: ignore[attr-defined]
    with pytest.raises(DefenseConfigError, match="epsilon: Input should be less than or equal to 10000"):
        build_defense({"name": "activation_dp", "epsilon": 20000})
