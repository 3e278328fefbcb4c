"""Gradient sparsification of the gradients the data party returns, with error feedback.

Sparsification as a defense against label inference from returned gradients is VFLAIR's "GS"
(Fu et al. 2022, "Label Inference Attacks Against Vertical Federated Learning", USENIX Security;
Zou et al. 2023, VFLAIR); keeping the largest entries and carrying the rest to the next step is
the residual accumulation of Aji & Heafield 2017 ("Sparse Communication for Distributed Gradient
Descent") and Lin et al. 2018 ("Deep Gradient Compression").
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from splitfed.split.front import Defense, FrontContext

#: Below this many entries a full top-k is cheap enough; above it the threshold is estimated first.
_PREFILTER_MIN = 1 << 18
#: Entries sampled to estimate the magnitude threshold of the ``k`` largest.
_SAMPLE = 1 << 15


def top_magnitude_indices(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of ``k`` entries of the 1-d ``flat`` largest in magnitude (in no particular order).

    Exactly what ``flat.abs().topk(k).indices`` selects (up to ties), faster on large tensors: a
    threshold a little below the ``k``-th largest magnitude is estimated from a fixed random
    sample, and the exact top-k runs only on the entries above it (a little more than ``k``).
    Should the candidates fall short of ``k`` (a sample far off), the full top-k runs instead.
    """
    mags = flat.abs()
    n = mags.numel()
    if k >= n:
        return torch.arange(n, device=flat.device)
    if n < _PREFILTER_MIN:
        return mags.topk(k, sorted=False).indices
    # A sample of the magnitudes from a fixed stream (the run's random state is left alone).
    g = torch.Generator(device="cpu").manual_seed(0)
    sample = mags[torch.randint(0, n, (_SAMPLE,), generator=g).to(flat.device)]
    # The k-th largest is near the (1 - k/n) quantile; go four standard deviations of the sample
    # quantile below it, so that the candidates hold all k but rarely many more.
    q = 1.0 - k / n
    below = q - 4.0 * math.sqrt(q * (1.0 - q) / _SAMPLE) - 1.0 / _SAMPLE
    rank = math.floor(below * _SAMPLE)
    if rank < 1:
        return mags.topk(k, sorted=False).indices
    threshold = sample.kthvalue(rank).values
    candidates = (mags >= threshold).nonzero().squeeze(1)
    extra = candidates.numel() - k
    if extra < 0:
        return mags.topk(k, sorted=False).indices
    # Dropping the few smallest candidates is cheaper than selecting the many largest.
    keep = torch.ones(candidates.numel(), dtype=torch.bool, device=flat.device)
    keep[mags[candidates].topk(extra, largest=False, sorted=False).indices] = False
    return candidates[keep]


class GradientSparsification(Defense):
    """Return only the largest-magnitude fraction of each gradient; carry the rest forward.

    Each returned gradient ``g`` (HBT: of the body's output; HT with labels at the data party: of
    the logits) is added to the residual ``r`` left by the previous one, and only the
    ``k = ceil(fraction · numel)`` entries of ``g + r`` largest in magnitude are sent; the others
    become the new residual (error feedback), so over the steps nothing is lost: the sum of what
    was sent plus the final residual equals the sum of the raw gradients.

    The residual is positional: gradients of later micro-batches hold other examples, so where a
    gradient's shape differs from the residual's, the residual is added where the two overlap
    (leading rows and positions) and the rest of it is dropped.

    There is no formal privacy guarantee: sparsification removes the small entries that label
    inference attacks read most of their signal from, at the cost of a biased gradient in each step.

    Parameters
    ----------
    fraction : float, default 0.1
        Fraction of each gradient's entries that is sent.
    error_feedback : bool, default True
        Carry what was not sent into the next gradient (off: it is discarded).
    """

    name = "grad_topk"

    class Params(BaseModel):
        """Parameters of :class:`GradientSparsification` (validated from the YAML)."""

        model_config = ConfigDict(extra="forbid")
        fraction: float = Field(0.1, gt=0.0, le=1.0, description="fraction of each gradient's entries sent")
        error_feedback: bool = Field(True, description="carry what is not sent into the next gradient")

    def __init__(self, fraction: float = 0.1, error_feedback: bool = True) -> None:
        params = self.Params(fraction=fraction, error_feedback=error_feedback)
        self.fraction, self.error_feedback = params.fraction, params.error_feedback
        #: What was not sent yet (``None`` before the first gradient or without error feedback).
        self.residual: torch.Tensor | None = None

    def _carried(self, like: torch.Tensor) -> torch.Tensor:
        """The residual laid onto a tensor of ``like``'s shape (zeros where it does not reach)."""
        r = self.residual
        if r is not None and r.shape == like.shape:
            return r.to(device=like.device, dtype=like.dtype)
        out = torch.zeros_like(like)
        if r is not None and r.dim() == like.dim():
            overlap = tuple(slice(0, min(a, b)) for a, b in zip(r.shape, like.shape, strict=True))
            out[overlap] = r[overlap].to(device=like.device, dtype=like.dtype)
        return out

    def extra_state(self) -> dict[str, Any]:
        return {"residual": self.residual.clone()} if self.residual is not None else {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        residual = state.get("residual")
        self.residual = residual.clone() if isinstance(residual, torch.Tensor) else None

    def on_gradients(self, grad: torch.Tensor, context: FrontContext) -> torch.Tensor:
        work = grad.detach().to(torch.promote_types(grad.dtype, torch.float32))
        if self.error_feedback and self.residual is not None:
            work = work + self._carried(work)
        flat = work.reshape(-1)
        k = min(flat.numel(), math.ceil(self.fraction * flat.numel()))
        keep = top_magnitude_indices(flat, k)
        sent = torch.zeros_like(flat)
        sent[keep] = flat[keep]
        if self.error_feedback:
            self.residual = (flat - sent).view_as(work)
        return sent.view_as(work).to(grad.dtype)
