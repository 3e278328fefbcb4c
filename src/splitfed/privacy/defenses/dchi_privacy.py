"""dχ-privacy (metric differential privacy) on the input token embeddings.

The multivariate Laplace-like mechanism of Feyisetan et al. 2020 ("Privacy- and Utility-Preserving
Textual Analysis via Calibrated Multivariate Perturbations", WSDM), after the dχ-privacy notion of
Chatzikokolakis et al. 2013 ("Broadening the Scope of Differential Privacy Using Metrics"), applied
to the embeddings the head runs on rather than snapped back to words, as split inference defenses
do (Mai et al. 2023, "Split-and-Denoise: Protect Large Language Model Inference with Local
Differential Privacy"; VFLAIR-LLM).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from splitfed.privacy.defenses._tokens import ALL_PHASES, DefensePhase
from splitfed.privacy.defenses.snd import dchi_noise
from splitfed.split.front import Defense, FrontContext


class DChiPrivacy(Defense):
    """Add metric-DP noise to every token embedding before the head runs on it.

    Each embedding ``x`` becomes ``x + z`` with ``z`` drawn afresh per token and use, with density
    ∝ ``exp(-ε ‖z‖)`` in ``d = hidden`` dimensions. In polar form that density factorizes: the
    direction is uniform on the sphere and the norm has density ∝ ``r^(d-1) exp(-ε r)``, a
    ``Gamma(shape=d, scale=1/ε)`` (mean ``d/ε``, so ε must grow with the width for the same
    utility). Unlike :class:`~splitfed.privacy.defenses.snd.SplitAndDenoise` nothing is denoised.

    Privacy guarantee (dχ-privacy): for any two token embeddings ``x, x'`` and any set ``S`` of
    outputs, ``P[x + z ∈ S] ≤ exp(ε ‖x − x'‖) P[x' + z ∈ S]``, per token and release; releases
    compose (epochs, evaluation, every decoding step). Whatever the head computes from the noisy
    embeddings is covered by post-processing.

    Choosing ε: what matters is the noise norm against the distance between token embeddings.
    Measured on the offline models, the median distance from a token embedding to its nearest
    other is 2.06 on smollm2-135m (width 576; median norm 3.15) and 0.999 on minilm-l6 (width
    384), so ε = 28 / 280 / 2800 (smollm2) and 38 / 384 / 3844 (minilm) put the mean noise norm at
    10x / 1x / 0.1x that distance: strong, moderate and weak (the sweeps use 30 / 300 / 3000). The
    default 10 is strong on both (noise 28x and 38x the distance).

    Parameters
    ----------
    epsilon : float, default 10.0
        Privacy parameter per unit of L2 distance between embeddings.
    phases : list of {"train", "eval", "generate"}, default all
        Where the noise applies.
    """

    name = "dchi_privacy"

    class Params(BaseModel):
        """Parameters of :class:`DChiPrivacy` (validated from the YAML)."""

        model_config = ConfigDict(extra="forbid")
        epsilon: float = Field(
            10.0, gt=0.0, le=1e6, description="privacy per unit of embedding distance (noise norm mean d/eps)"
        )
        phases: list[DefensePhase] = Field(list(ALL_PHASES), min_length=1, description="phases it applies in")

    def __init__(
        self, epsilon: float = 10.0, phases: list[DefensePhase] | tuple[DefensePhase, ...] = ALL_PHASES
    ) -> None:
        params = self.Params(epsilon=epsilon, phases=list(phases))
        self.epsilon = params.epsilon
        self.phases = frozenset(params.phases)

    def on_embeddings(self, embeddings: torch.Tensor, context: FrontContext) -> torch.Tensor:
        if context.phase not in self.phases:
            return embeddings
        # One sampler of the mechanism for the package: SnD's, which draws the same noise.
        noise = dchi_noise(embeddings.shape, self.epsilon, device=embeddings.device)
        dtype = torch.promote_types(embeddings.dtype, noise.dtype)
        return (embeddings.to(dtype) + noise.to(dtype)).to(embeddings.dtype)
