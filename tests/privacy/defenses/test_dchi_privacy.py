"""dχ-privacy: each token embedding gets noise of density ∝ exp(-ε‖z‖) before the head runs."""

from __future__ import annotations

import math

import pytest
import torch

from splitfed.privacy.defenses import DefenseConfigError, build_defense
from splitfed.privacy.defenses.dchi_privacy import DChiPrivacy
from splitfed.split.front import FrontContext
from tiny import tiny_batch


def test_the_noise_norm_is_gamma_d_over_epsilon_and_its_direction_uniform() -> None:
    torch.manual_seed(0)
    d, epsilon = 16, 4.0
    dchi = build_defense({"name": "dchi_privacy", "epsilon": epsilon})
    assert isinstance(dchi, DChiPrivacy)
    x = torch.randn(200, 50, d)
    noise = (dchi.on_embeddings(x, FrontContext("train")) - x).double()
    norms = noise.norm(dim=-1)
    # Gamma(shape d, scale 1/eps): mean d/eps, standard deviation sqrt(d)/eps.
    assert float(norms.mean()) == pytest.approx(d / epsilon, rel=0.01)
    assert float(norms.std()) == pytest.approx(math.sqrt(d) / epsilon, rel=0.03)
    directions = (noise / norms[..., None]).reshape(-1, d)
    assert float(directions.mean(0).abs().max()) < 0.02
    second_moment = directions.T @ directions / directions.shape[0]
    torch.testing.assert_close(second_moment, torch.eye(d, dtype=torch.float64) / d, atol=0.01, rtol=0)


def test_the_noise_is_fresh_per_use_keeps_the_dtype_and_follows_the_phases() -> None:
    dchi = DChiPrivacy(epsilon=10.0, phases=["train", "generate"])
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    a, b = (dchi.on_embeddings(x, FrontContext("train")) for _ in range(2))
    assert a.dtype == torch.bfloat16 and not torch.equal(a, b)
    assert dchi.on_embeddings(x, FrontContext("eval")) is x


def test_the_head_runs_on_the_noisy_embeddings(split_system) -> None:  # type: ignore[no-untyped-def]
    batch = tiny_batch("classification")
    plain = split_system([]).data_party.predict(batch)
    noisy = split_system([{"name": "dchi_privacy", "epsilon": 1.0}])
    assert noisy.data_party.front.touches_embeddings
    first, second = noisy.data_party.predict(batch), noisy.data_party.predict(batch)
    assert not torch.allclose(first, plain) and not torch.allclose(first, second)
    off_in_eval = split_system([{"name": "dchi_privacy", "epsilon": 1.0, "phases": ["train"]}])
    torch.testing.assert_close(off_in_eval.data_party.predict(batch), plain)


def test_bad_parameters_name_the_key() -> None:
    with pytest.raises(DefenseConfigError, match="epsilon: Input should be greater than 0"):
        build_defense({"name": "dchi_privacy", "epsilon": -1})
    with pytest.raises(DefenseConfigError, match="phases: List should have at least 1 item"):
        build_defense({"name": "dchi_privacy", "phases": []})
