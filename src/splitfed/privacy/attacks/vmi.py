"""White-box model inversion (VFLAIR-LLM's ``VanillaModelInversion_WhiteBox``, "VMI").

The model party knows the public pretrained weights of the data party's head. It optimizes free
input embeddings, one vector per position, so that the public head maps them onto the
intercepted activations, and reads each position's token as the nearest token embedding (cosine).
Many sequences are inverted at once, as one batch. He et al., "Model inversion attacks against
collaborative inference" (ACSAC 2019) introduced the white-box attack on split models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from splitfed.privacy.attacks.base import (
    Attack,
    AttackContext,
    Need,
    Observation,
    chunks,
    head_loss,
    nearest_tokens,
    stack_activations,
    unstack,
)

Init = Literal["target", "mean", "random"]


class WhiteBoxInversion(Attack):
    """Optimize per-position input embeddings until the public head reproduces the activations.

    Parameters
    ----------
    steps : int, default 300
        Adam steps per batch of sequences.
    lr : float, default 0.05
        Adam learning rate, relative to the embeddings' root-mean-square (cosine-decayed).
    cosine : float, default 0.5
        Weight of the cosine distance added to the normalised squared error.
    init : {"target", "mean", "random"}, default "target"
        Start from the intercepted activations themselves (the residual stream keeps the input
        embedding in it), from the mean token embedding, or at random.
    batch_size : int, default 64
        Sequences optimized together.
    """

    name = "vmi"
    target = "tokens"
    needs = (Need("forward", "hidden"), Need("forward", "attention_mask"))
    needs_public_model = True
    reports_baseline = True

    class Params(BaseModel):
        """Parameters of :class:`WhiteBoxInversion`."""

        model_config = ConfigDict(extra="forbid")
        steps: int = Field(300, ge=1, le=100_000, description="optimizer steps per batch of sequences")
        lr: float = Field(
            0.05, gt=0.0, le=100.0, description="Adam learning rate (relative to the embeddings' RMS)"
        )
        cosine: float = Field(0.5, ge=0.0, le=100.0, description="weight of the cosine distance")
        init: Init = Field("target", description="start point: target, mean or random")
        batch_size: int = Field(64, ge=1, le=65_536, description="sequences optimized together")

    def __init__(
        self,
        steps: int = 300,
        lr: float = 0.05,
        cosine: float = 0.5,
        init: Init = "target",
        batch_size: int = 64,
    ) -> None:
        self.steps, self.lr, self.cosine, self.init, self.batch_size = steps, lr, cosine, init, batch_size

    # ------------------------------------------------------------------ what a variant overrides
    def start(self, target: torch.Tensor, context: AttackContext) -> torch.Tensor:
        """The free variables' starting point for ``target [n, seq, width]`` activations."""
        table = context.embedding_matrix().float()
        if self.init == "target" and target.shape[-1] == table.shape[-1]:
            # Rescaled to the embeddings' norm: deeper blocks grow the residual stream.
            norm = table.norm(dim=-1).mean()
            return target * (norm / target.norm(dim=-1, keepdim=True).clamp(min=1e-12))
        generator = torch.Generator(device="cpu").manual_seed(context.seed)
        if self.init == "random":
            noise = torch.randn(*target.shape[:-1], table.shape[-1], generator=generator)
            return noise.to(target.device) * table.pow(2).mean().sqrt()
        return table.mean(0).expand(*target.shape[:-1], -1).clone()

    def embeds(self, free: torch.Tensor, context: AttackContext) -> torch.Tensor:
        """``inputs_embeds`` of the public head for the free variables."""
        return free

    def tokens(self, free: torch.Tensor, context: AttackContext) -> torch.Tensor:
        """The tokens the free variables stand for."""
        return nearest_tokens(free.detach(), context.embedding_matrix())

    def step_size(self, free: torch.Tensor, context: AttackContext) -> float:
        """Adam's learning rate for the free variables (``lr`` in the embeddings' units)."""
        return self.lr * float(context.embedding_matrix().float().pow(2).mean().sqrt())

    # ------------------------------------------------------------------ the optimization
    def optimize(
        self, free: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, context: AttackContext, steps: int
    ) -> torch.Tensor:
        """Adam on ``free`` so that the public head maps :meth:`embeds` of it onto ``target``."""
        head = context.public_head()
        free = free.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([free], lr=self.step_size(free, context))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=0.0)
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            produced = head(inputs_embeds=self.embeds(free, context), attention_mask=mask)
            loss = head_loss(produced.float(), target, mask, self.cosine)
            loss.backward()
            optimizer.step()
            schedule.step()
        return free.detach()

    def run(
        self,
        observations: Sequence[Observation],
        context: AttackContext,
        known: Mapping[int, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Invert every recorded forward's activations, ``batch_size`` sequences at a time."""
        context.require_model(self.name)
        hidden, mask, places = stack_activations(observations)
        tokens = torch.empty(hidden.shape[:2], dtype=torch.long)
        torch.manual_seed(context.seed)
        for part in context.bar(chunks(len(hidden), self.batch_size), desc=self.name):
            target, m = hidden[part].to(context.device), mask[part].to(context.device)
            free = self.optimize(self.start(target, context), target, m, context, self.steps)
            tokens[part] = self.tokens(free, context).cpu()
        return unstack(tokens, places)
