"""NoPeek: penalize the distance correlation between the raw inputs and the outgoing activations.

Vepakomma et al. 2020, "NoPeek: Information Leakage Reduction to Share Activations in Distributed
Deep Learning" (ICDM Workshops), with the sample distance correlation of Székely, Rizzo & Bakirov
2007 ("Measuring and Testing Dependence by Correlation of Distances", Ann. Statist.).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from splitfed.privacy.defenses._tokens import not_set_up, real_token_mask, require_input_ids
from splitfed.split.front import Defense, FrontContext, FrontResources


def _centered_distances(x: torch.Tensor) -> torch.Tensor:
    """The double-centered matrix of pairwise Euclidean distances between the rows of ``x``."""
    sq = x.pow(2).sum(-1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * x @ x.T).clamp_min(0.0)
    # Below the clamp the distance is (numerically) zero and so is its gradient: sqrt is not
    # differentiable at 0, and the diagonal is exactly zero.
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    d = d2.clamp_min(1e-12).sqrt().masked_fill(eye, 0.0)
    return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()


def distance_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The sample distance correlation of paired rows ``x [n, p]`` and ``y [n, q]``, in ``[0, 1]``.

    ``dCor = dCov(x, y) / sqrt(dVar(x) dVar(y))`` with the double-centered (V-statistic) estimates
    of Székely et al. 2007: 1 for ``y = a x Q + b`` (``Q`` orthogonal), and tending to 0 with
    ``n`` for independent samples. Zero where it is undefined (fewer than 2 rows, or a constant
    side). Differentiable.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"distance correlation needs paired rows; got {x.shape[0]} and {y.shape[0]}")
    if x.shape[0] < 2:
        return x.new_zeros(())
    a, b = _centered_distances(x), _centered_distances(y)
    dcov2 = (a * b).mean()
    dvar2 = (a * a).mean() * (b * b).mean()
    if bool(dvar2 <= 0):
        return x.new_zeros(())
    return (dcov2 / dvar2.sqrt()).clamp_min(1e-12).sqrt()


class NoPeek(Defense):
    """Auxiliary loss ``weight · dCor(X, Z)`` between the head's input and what crosses, per batch.

    ``X`` is the head's input token embeddings, read from the public pretrained embedding matrix
    (captured in :meth:`setup`) at ``FrontContext.input_ids``; ``Z`` is the outgoing activations.
    The head's gradient then pushes what crosses to be less (distance-)correlated with the text.
    Distance correlation is scale-invariant, so families that scale their embeddings need no care.

    Which rows are the samples of the correlation (``unit``):

    ``example`` (the paper's choice, default)
        one row per example: its ``[seq, hidden]`` embeddings and activations with padding set to
        zero in both, flattened (rows of one batch share the padded length, so they align by
        position). With few examples per batch, dCor of high-dimensional rows sits close to 1
        whatever the dependence; it is the gradient that matters.
    ``token``
        one row per real token, at most ``max_tokens`` of them drawn at random per batch: many
        more samples of lower dimension (the distance matrix is ``max_tokens²``).

    Only training is affected (the loss shapes the head); activations always pass unchanged.
    There is no formal privacy guarantee.

    Parameters
    ----------
    weight : float, default 0.1
        λ, the weight of the distance correlation.
    unit : {"example", "token"}, default "example"
    max_tokens : int, default 512
        ``unit: token``: at most this many tokens per batch.
    """

    name = "nopeek"

    class Params(BaseModel):
        """Parameters of :class:`NoPeek` (validated from the YAML)."""

        model_config = ConfigDict(extra="forbid")
        weight: float = Field(0.1, ge=0.0, description="lambda, weight of the distance correlation")
        unit: Literal["example", "token"] = Field(
            "example", description="samples of the correlation: examples (flattened) or tokens"
        )
        max_tokens: int = Field(512, ge=2, le=65536, description="unit token: tokens sampled per batch")

    def __init__(
        self, weight: float = 0.1, unit: Literal["example", "token"] = "example", max_tokens: int = 512
    ) -> None:
        params = self.Params(weight=weight, unit=unit, max_tokens=max_tokens)
        self.weight, self.unit, self.max_tokens = params.weight, params.unit, params.max_tokens
        self.embedding_matrix: torch.Tensor | None = None

    def setup(self, resources: FrontResources) -> None:
        self.embedding_matrix = resources.embedding_matrix

    def samples(self, hidden: torch.Tensor, context: FrontContext) -> tuple[torch.Tensor, torch.Tensor]:
        """The paired rows ``(X, Z)`` whose distance correlation is penalized (see ``unit``)."""
        if self.embedding_matrix is None:
            raise not_set_up(self.name, "the token embedding matrix")
        ids = require_input_ids(self.name, context)
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        z = hidden.to(dtype)
        x = self.embedding_matrix.to(device=hidden.device)[ids.to(hidden.device)].to(dtype)
        mask = real_token_mask(context, z)
        if self.unit == "example":
            return (x * mask[..., None]).flatten(1), (z * mask[..., None]).flatten(1)
        real = mask.bool()
        x, z = x[real], z[real]
        if x.shape[0] > self.max_tokens:
            pick = torch.randperm(x.shape[0], device=x.device)[: self.max_tokens]
            x, z = x[pick], z[pick]
        return x, z

    def on_activations(
        self, hidden: torch.Tensor, context: FrontContext
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if context.phase != "train":
            return hidden
        x, z = self.samples(hidden, context)
        return hidden, self.weight * distance_correlation(x, z)
