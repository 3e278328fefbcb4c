"""The simplest inversion: a linear map from head activations to tokens, fit in closed form.

Ridge regression from the public head's activations of auxiliary text onto the one-hot tokens,
``W = (XᵀX + λI)⁻¹ XᵀY`` (with a bias column), read by argmax. It needs no optimization and no
training loop, so every inversion attack reports it beside its own score
(:attr:`AttackResult.baseline`): an attack that does not beat it is not doing its job.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from splitfed.privacy.attacks.base import (
    Attack,
    AttackContext,
    Need,
    Observation,
    chunks,
    stack_activations,
    unstack,
)


def _with_bias(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)], dim=-1)


def fit_ridge(context: AttackContext, ridge: float) -> torch.Tensor:
    """The ridge map ``[width + 1, vocab]`` fit on the auxiliary text (cached in the context)."""
    key = ("linear_baseline", context.head_layers, ridge)
    if key in context.cache:
        return context.cache[key]  # type: ignore[no-any-return]
    context.require_model(LinearBaseline.name)
    vocab, width = context.embedding_matrix().shape
    gram = torch.zeros(width + 1, width + 1, dtype=torch.float64, device=context.device)
    cross = torch.zeros(vocab, width + 1, dtype=torch.float64, device=context.device)
    for ids, mask, hidden in context.auxiliary():
        real = mask.bool()
        x = _with_bias(hidden[real].double())
        gram += x.T @ x
        cross.index_add_(0, ids[real], x)
    # λ relative to the mean activation energy, so one value fits every model's scale.
    lam = ridge * gram.diagonal()[:-1].mean().clamp(min=1e-12)
    eye = torch.eye(width + 1, dtype=gram.dtype, device=gram.device)
    eye[-1, -1] = 0  # the bias is not penalised
    weight = torch.linalg.solve(gram + lam * eye, cross.T).float()
    context.cache[key] = weight
    return weight


def ridge_logits(context: AttackContext, hidden: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """The ridge map's token scores ``[..., vocab]`` of activations ``hidden [..., width]``.

    Other attacks use them as a prior (e.g. candidates of a discrete search).
    """
    weight = fit_ridge(context, ridge)
    flat = hidden.reshape(-1, hidden.shape[-1]).float().to(weight.device)
    return (_with_bias(flat) @ weight).reshape(*hidden.shape[:-1], -1)


class LinearBaseline(Attack):
    """Ridge regression from head activations to one-hot tokens, fit on auxiliary text (closed form).

    Parameters
    ----------
    ridge : float, default 1e-3
        Ridge penalty relative to the mean squared activation.
    """

    name = "linear"
    target = "tokens"
    needs = (Need("forward", "hidden"), Need("forward", "attention_mask"))
    needs_public_model = True
    needs_auxiliary = True

    class Params(BaseModel):
        """Parameters of :class:`LinearBaseline`."""

        model_config = ConfigDict(extra="forbid")
        ridge: float = Field(
            1e-3, gt=0.0, le=1e6, description="ridge penalty relative to the activations' energy"
        )

    def __init__(self, ridge: float = 1e-3) -> None:
        self.ridge = ridge

    def run(
        self,
        observations: Sequence[Observation],
        context: AttackContext,
        known: Mapping[int, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Argmax of the ridge map on every recorded activation."""
        weight = fit_ridge(context, self.ridge)
        hidden, _, places = stack_activations(observations)
        flat = hidden.reshape(-1, hidden.shape[-1]).to(context.device)
        tokens = torch.empty(flat.shape[0], dtype=torch.long)
        for part in chunks(flat.shape[0], 1024):
            tokens[part] = (_with_bias(flat[part]) @ weight).argmax(-1).cpu()
        return unstack(tokens.reshape(hidden.shape[:2]), places)
