"""Differential privacy on the outgoing activations: per-token clipping plus Laplace or Gaussian noise.

The Laplace and Gaussian mechanisms (Dwork & Roth 2014, "The Algorithmic Foundations of
Differential Privacy", Thm. 3.6 and Thm. A.1) applied to each token's activation vector, as
activation-perturbation defenses of split learning do (e.g. Titcombe et al. 2021, "Practical
Defences Against Model Inversion Attacks for Split Neural Networks"; VFLAIR-LLM's DP defenses).
Clipping every token's vector first bounds the sensitivity by construction. The Gaussian noise is
calibrated either with the classic bound (valid for ε < 1) or with the exact analytic Gaussian
mechanism of Balle & Wang 2018 ("Improving the Gaussian Mechanism for Differential Privacy:
Analytical Calibration and Optimal Denoising", ICML, Thm. 8), found here by bisection.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from splitfed.privacy.defenses._tokens import ALL_PHASES, DefensePhase
from splitfed.split.front import Defense, FrontContext

_SQRT2 = math.sqrt(2.0)


def _normal_cdf(x: float) -> float:
    # erfc keeps relative precision in the lower tail, where the privacy profile lives.
    return 0.5 * math.erfc(-x / _SQRT2)


def _log_normal_cdf(x: float) -> float:
    if x > -30.0:
        return math.log(_normal_cdf(x))
    # Far in the tail erfc underflows; the asymptotic series is exact to float precision there.
    return -0.5 * x * x - math.log(-x) - 0.5 * math.log(2 * math.pi) + math.log1p(-1 / x**2 + 3 / x**4)


def gaussian_delta(sigma: float, epsilon: float, sensitivity: float) -> float:
    """The smallest δ for which adding ``N(0, sigma²)`` noise to an L2-``sensitivity`` query is (ε, δ)-DP.

    The exact privacy profile of the Gaussian mechanism (Balle & Wang 2018, Thm. 8):
    ``Φ(Δ/2σ − εσ/Δ) − e^ε Φ(−Δ/2σ − εσ/Δ)``.
    """
    if sigma <= 0:
        return 1.0
    a = sensitivity / (2.0 * sigma)
    b = epsilon * sigma / sensitivity
    # e^ε Φ(−a−b) in log space: e^ε alone overflows for large ε although the product is <= 1.
    return max(0.0, _normal_cdf(a - b) - math.exp(epsilon + _log_normal_cdf(-a - b)))


def gaussian_sigma_classic(epsilon: float, delta: float, sensitivity: float) -> float:
    """``sqrt(2 ln(1.25/δ)) Δ / ε``: the classic calibration (Dwork & Roth, Thm. A.1), valid for ε < 1."""
    if not 0 < epsilon < 1:
        raise ValueError(f"the classic Gaussian calibration holds for 0 < epsilon < 1, got {epsilon}")
    return math.sqrt(2.0 * math.log(1.25 / delta)) * sensitivity / epsilon


def gaussian_sigma_analytic(
    epsilon: float, delta: float, sensitivity: float, rel_tol: float = 1e-10
) -> float:
    """The smallest noise scale of an (ε, δ)-DP Gaussian mechanism (Balle & Wang 2018), by bisection.

    :func:`gaussian_delta` decreases in σ, so the answer is bracketed and halved until the bracket
    is ``rel_tol`` wide; the upper end is returned (its δ never exceeds the target). Valid for
    every ε > 0, and never larger than the classic calibration.
    """
    if epsilon <= 0 or not 0 < delta < 1 or sensitivity <= 0:
        raise ValueError(
            f"need epsilon > 0, 0 < delta < 1 and sensitivity > 0; got {epsilon}, {delta}, {sensitivity}"
        )
    lo, hi = 0.0, sensitivity
    while gaussian_delta(hi, epsilon, sensitivity) > delta:
        lo, hi = hi, 2.0 * hi
    while hi - lo > rel_tol * hi:
        mid = 0.5 * (lo + hi)
        if gaussian_delta(mid, epsilon, sensitivity) > delta:
            lo = mid
        else:
            hi = mid
    return hi


class ActivationDP(Defense):
    """Clip each token's outgoing activation vector, then add Laplace or Gaussian noise.

    Each token's vector is scaled down to norm at most ``clip`` (L1 for Laplace, L2 for Gaussian),
    so replacing one token's activation by any other moves it by at most ``Δ = 2 clip``: the
    sensitivity is bounded by construction, whatever the head computes. Then

    * Laplace: i.i.d. ``Laplace(0, Δ/ε)`` per coordinate, ε-DP per released token vector;
    * Gaussian: i.i.d. ``N(0, σ²)`` per coordinate, (ε, δ)-DP per released token vector, with
      ``σ = sqrt(2 ln(1.25/δ)) Δ/ε`` (classic; valid only for ε < 1) or the exact analytic σ of
      Balle & Wang 2018 (valid for every ε, and smaller).

    Privacy guarantee: each *release of one position's activation vector* is ε- (Laplace) or
    (ε, δ)-DP (Gaussian) with respect to any change of that vector. One input token influences the
    activations of every later position through attention, so for a token of the text the
    guarantee composes over the positions it reaches (at most ``seq_len · ε`` by basic
    composition), and over every release of the same text (epochs, evaluation, each decoding
    step, where noise is drawn afresh). Padding positions are noised too.

    Parameters
    ----------
    mechanism : {"gaussian", "laplace"}, default "gaussian"
    epsilon : float, default 1.0
        Privacy budget per released token vector, at most 10000. Per-token noise in hundreds of
        dimensions swamps the activation long before ε reaches a budget that means anything
        formally: on smollm2-135m (576 wide) the task survives only at ε in the hundreds or
        thousands (benchmarks/defense_monotonicity.py), where the guarantee is vacuous; such
        budgets are allowed so that the trade-off can be measured.
    delta : float | None, default None
        Gaussian only: the δ of (ε, δ)-DP; ``None`` means ``1e-5``.
    clip : float, default 1.0
        Bound on each token vector's norm (L2 for Gaussian, L1 for Laplace) after clipping.
    calibration : {"auto", "classic", "analytic"}, default "auto"
        Gaussian only: ``auto`` is classic for ε < 1 and analytic otherwise.
    phases : list of {"train", "eval", "generate"}, default all
        Where the mechanism applies; elsewhere activations pass unchanged (and unclipped).
    """

    name = "activation_dp"

    class Params(BaseModel):
        """Parameters of :class:`ActivationDP` (validated from the YAML)."""

        model_config = ConfigDict(extra="forbid")
        mechanism: Literal["gaussian", "laplace"] = Field("gaussian", description="noise distribution")
        epsilon: float = Field(
            1.0, gt=0.0, le=10_000.0, description="privacy budget per released token vector (at most 10000)"
        )
        delta: float | None = Field(
            None, gt=0.0, lt=1.0, description="gaussian only: delta of (epsilon, delta)-DP (None: 1e-5)"
        )
        clip: float = Field(1.0, gt=0.0, description="per-token norm bound (L2 gaussian, L1 laplace)")
        calibration: Literal["auto", "classic", "analytic"] = Field(
            "auto", description="gaussian sigma: classic (epsilon < 1), analytic, or auto"
        )
        phases: list[DefensePhase] = Field(list(ALL_PHASES), min_length=1, description="phases it applies in")

        @model_validator(mode="after")
        def _consistent(self) -> ActivationDP.Params:
            if self.mechanism == "laplace" and self.delta is not None:
                raise ValueError("delta: applies to the gaussian mechanism only (laplace is pure epsilon-DP)")
            if self.mechanism == "gaussian" and self.calibration == "classic" and self.epsilon >= 1:
                raise ValueError(
                    f"calibration: classic holds for epsilon < 1, got epsilon {self.epsilon}; "
                    "use calibration: analytic (or auto)"
                )
            return self

    def __init__(
        self,
        mechanism: Literal["gaussian", "laplace"] = "gaussian",
        epsilon: float = 1.0,
        delta: float | None = None,
        clip: float = 1.0,
        calibration: Literal["auto", "classic", "analytic"] = "auto",
        phases: list[DefensePhase] | tuple[DefensePhase, ...] = ALL_PHASES,
    ) -> None:
        params = self.Params(
            mechanism=mechanism,
            epsilon=epsilon,
            delta=delta,
            clip=clip,
            calibration=calibration,
            phases=list(phases),
        )
        self.mechanism, self.epsilon, self.clip = params.mechanism, params.epsilon, params.clip
        self.phases = frozenset(params.phases)
        self.sensitivity = 2.0 * self.clip
        if self.mechanism == "laplace":
            self.delta = 0.0
            #: Laplace: the scale ``b``; Gaussian: the standard deviation ``σ`` of the noise.
            self.noise_scale = self.sensitivity / self.epsilon
        else:
            self.delta = params.delta if params.delta is not None else 1e-5
            classic = params.calibration == "classic" or (params.calibration == "auto" and self.epsilon < 1)
            calibrate = gaussian_sigma_classic if classic else gaussian_sigma_analytic
            self.noise_scale = calibrate(self.epsilon, self.delta, self.sensitivity)

    def clipped(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` with every token vector (last dimension) scaled to norm at most ``clip``."""
        order = 1 if self.mechanism == "laplace" else 2
        norms = torch.linalg.vector_norm(hidden, ord=order, dim=-1, keepdim=True)
        return hidden * (self.clip / norms.clamp_min(1e-12)).clamp(max=1.0)

    def on_activations(self, hidden: torch.Tensor, context: FrontContext) -> torch.Tensor:
        if context.phase not in self.phases:
            return hidden
        x = self.clipped(hidden.to(torch.promote_types(hidden.dtype, torch.float32)))
        if self.mechanism == "laplace":
            # Laplace(0, b) as the difference of two Exponential(1/b): one uniform draw each.
            noise = torch.empty_like(x).exponential_() - torch.empty_like(x).exponential_()
        else:
            noise = torch.randn_like(x)
        return (x + self.noise_scale * noise).to(hidden.dtype)
