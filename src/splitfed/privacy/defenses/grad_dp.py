"""Differentially private returned gradients: per-example clipping plus Gaussian noise.

The clip-and-noise step of DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy",
CCS) applied to the gradient the data party sends back, per example, as label-protection defenses
of split learning do (VFLAIR's "GaussianDP"; Li et al. 2022, "Label Leakage and Protection in
Two-party Split Learning", ICLR, compare noise on the returned gradients). The privacy of one
release follows the exact analytic Gaussian profile (Balle & Wang 2018).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from splitfed.privacy.defenses.activation_dp import gaussian_delta
from splitfed.split.front import Defense, FrontContext


class GradientDP(Defense):
    """Clip each example's returned gradient to L2 norm ``clip`` and add Gaussian noise.

    Row ``i`` of the gradient (one example: ``[seq, hidden]`` in HBT, its logits' gradient in HT)
    is scaled to norm at most ``C = clip``, then ``N(0, (noise_multiplier · C)²)`` noise is added
    to each of its entries at real tokens (``FrontContext.attention_mask``, where it matches the
    gradient's first two dimensions; padding positions carry a zero gradient that reveals nothing,
    and stay zero). Noise is drawn afresh for every gradient.

    Privacy guarantee: replacing one example changes its clipped row by at most ``Δ = 2C`` in L2,
    so every returned row is a Gaussian mechanism with ``σ/Δ = noise_multiplier / 2``, (ε, δ)-DP
    for the labels and inputs that determined it with ε given by :meth:`epsilon`; the rows of
    several steps (every time the example is trained on) compose.

    Parameters
    ----------
    clip : float, default 1.0
        Per-example L2 bound ``C``.
    noise_multiplier : float, default 1.0
        Noise standard deviation in units of ``C`` (0: clipping only, no privacy).
    """

    name = "grad_dp"

    class Params(BaseModel):
        """Parameters of :class:`GradientDP` (validated from the YAML)."""

        model_config = ConfigDict(extra="forbid")
        clip: float = Field(1.0, gt=0.0, description="per-example L2 bound C of the returned gradient")
        noise_multiplier: float = Field(
            1.0, ge=0.0, le=1e4, description="noise standard deviation in units of clip"
        )

    def __init__(self, clip: float = 1.0, noise_multiplier: float = 1.0) -> None:
        params = self.Params(clip=clip, noise_multiplier=noise_multiplier)
        self.clip, self.noise_multiplier = params.clip, params.noise_multiplier
        self.sigma = self.noise_multiplier * self.clip

    def epsilon(self, delta: float) -> float:
        """The ε of one returned row at ``delta`` (``inf`` without noise), by bisection on the exact profile."""
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if self.sigma == 0:
            return float("inf")
        sensitivity = 2.0 * self.clip
        lo, hi = 0.0, 1.0
        while gaussian_delta(self.sigma, hi, sensitivity) > delta:
            lo, hi = hi, 2.0 * hi
        while hi - lo > 1e-10 * hi:
            mid = 0.5 * (lo + hi)
            if gaussian_delta(self.sigma, mid, sensitivity) > delta:
                lo = mid
            else:
                hi = mid
        return hi

    def on_gradients(self, grad: torch.Tensor, context: FrontContext) -> torch.Tensor:
        work = grad.detach().to(torch.promote_types(grad.dtype, torch.float32))
        rows = work.reshape(work.shape[0], -1)
        norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
        clipped = (rows * (self.clip / norms.clamp_min(1e-12)).clamp(max=1.0)).view_as(work)
        if self.sigma == 0:
            return clipped.to(grad.dtype)
        noise = self.sigma * torch.randn_like(clipped)
        mask = context.attention_mask
        if mask is not None and work.dim() >= 2 and tuple(mask.shape) == tuple(work.shape[:2]):
            noise = noise * mask.to(noise).reshape(*mask.shape, *([1] * (work.dim() - 2)))
        return (clipped + noise).to(grad.dtype)
