"""Learning-based inversion with optional optimization refinement (BiSR, forward direction).

Chen et al., "Unveiling the Vulnerability of Private Fine-Tuning in Split-Based Frameworks for
Large Language Models: A Bidirectionally Enhanced Attack" (CCS 2024). The attacker passes its own
auxiliary text through the public head, trains an inversion model from the activations to the
tokens (a per-position MLP, or one small transformer layer that also reads the neighbours),
applies it to the intercepted activations and, optionally, refines its output by white-box
optimization started from it (:class:`~splitfed.privacy.attacks.vmi.WhiteBoxInversion`). The
backward direction, from the gradients the data party returns (and both directions at once), is
:mod:`splitfed.privacy.attacks.bisr_backward`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from splitfed.privacy.attacks.base import (
    Attack,
    AttackContext,
    Need,
    Observation,
    chunks,
    stack_activations,
    unstack,
)
from splitfed.privacy.attacks.vmi import WhiteBoxInversion

Architecture = Literal["mlp", "transformer"]


class InversionModel(nn.Module):
    """Activations ``[batch, seq, width]`` to token logits ``[batch, seq, vocab]``.

    Parameters
    ----------
    width : int
        The activations' width.
    vocab : int
    hidden : int
        Width of the MLP (or the transformer layer's feed-forward).
    architecture : {"mlp", "transformer"}
    """

    def __init__(self, width: int, vocab: int, hidden: int, architecture: Architecture) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mixer: nn.Module | None = None
        if architecture == "transformer":
            heads = next(h for h in (8, 4, 2, 1) if width % h == 0)
            self.mixer = nn.TransformerEncoderLayer(
                width, heads, dim_feedforward=hidden, dropout=0.0, batch_first=True, norm_first=True
            )
        self.out = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, vocab))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits of every position (``mask`` 0 marks padding the mixer must not read)."""
        x = self.norm(hidden)
        if self.mixer is not None:
            x = self.mixer(x, src_key_padding_mask=~mask.bool())
        return self.out(x)  # type: ignore[no-any-return]


def train_inversion(
    model: nn.Module,
    n_batches: int,
    batch: Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    epochs: int,
    lr: float,
    context: AttackContext,
    desc: str,
) -> None:
    """Train an inversion model by cross-entropy on the real tokens of its training batches, then eval it.

    ``batch(i)`` gives training batch ``i`` of ``n_batches`` as ``(input_ids, attention_mask,
    inputs)``, and ``model(inputs, attention_mask)`` its token logits. AdamW (weight decay 0.01)
    on a one-cycle schedule peaking at ``lr``; ``epochs`` passes over the batches, shuffled by a
    generator seeded ``context.seed``.
    """
    generator = torch.Generator().manual_seed(context.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * n_batches)
    model.train()
    for _ in context.bar(range(epochs), desc=f"{desc} training"):
        for i in torch.randperm(n_batches, generator=generator).tolist():
            ids, mask, inputs = batch(i)
            logits = model(inputs, mask)
            loss = nn.functional.cross_entropy(logits[mask.bool()], ids[mask.bool()])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()


class InversionTrainingParams(BaseModel):
    """How a learned inversion model trains on the auxiliary text (``bisr`` and ``bisr_b``)."""

    model_config = ConfigDict(extra="forbid")
    architecture: Architecture = Field(
        "mlp", description="inversion model: mlp (per position) or transformer"
    )
    hidden: int = Field(512, ge=1, le=65_536, description="width of the inversion model")
    epochs: int = Field(40, ge=1, le=10_000, description="passes over the auxiliary text")
    lr: float = Field(2e-3, gt=0.0, le=10.0, description="AdamW learning rate")
    batch_size: int = Field(16, ge=1, le=65_536, description="auxiliary sequences per step")
    train_noise: float = Field(
        0.0, ge=0.0, le=100.0, description="training noise relative to each (unit-RMS) input's scale"
    )


class LearnedInversion(Attack):
    """Train an inversion model on auxiliary text through the public head; apply it, then refine.

    Parameters
    ----------
    architecture : {"mlp", "transformer"}, default "mlp"
    hidden : int, default 512
    epochs : int, default 40
        Passes over the auxiliary activations.
    lr : float, default 2e-3
        AdamW learning rate.
    batch_size : int, default 16
        Auxiliary sequences per training step.
    train_noise : float, default 0.0
        Gaussian noise added to the auxiliary activations while training, relative to each
        token's RMS (an attacker expecting a noise defense trains through it).
    refine_steps : int, default 0
        White-box refinement steps from the inversion model's soft output (0: none).
    refine_lr : float, default 0.02
    """

    name = "bisr"
    target = "tokens"
    needs = (Need("forward", "hidden"), Need("forward", "attention_mask"))
    needs_public_model = True
    needs_auxiliary = True
    reports_baseline = True

    class Params(InversionTrainingParams):
        """Parameters of :class:`LearnedInversion`."""

        refine_steps: int = Field(0, ge=0, le=100_000, description="white-box refinement steps (0: none)")
        refine_lr: float = Field(0.02, gt=0.0, le=100.0, description="refinement learning rate")

    def __init__(
        self,
        architecture: Architecture = "mlp",
        hidden: int = 512,
        epochs: int = 40,
        lr: float = 2e-3,
        batch_size: int = 16,
        train_noise: float = 0.0,
        refine_steps: int = 0,
        refine_lr: float = 0.02,
    ) -> None:
        self.architecture, self.hidden, self.epochs, self.lr = architecture, hidden, epochs, lr
        self.batch_size, self.train_noise = batch_size, train_noise
        self.refine_steps, self.refine_lr = refine_steps, refine_lr

    def fit(self, context: AttackContext) -> InversionModel:
        """The inversion model trained on the auxiliary text (cached in the context)."""
        key = (
            "bisr",
            context.head_layers,
            self.architecture,
            self.hidden,
            self.epochs,
            self.lr,
            self.batch_size,
            self.train_noise,
        )
        if key in context.cache:
            return context.cache[key]  # type: ignore[no-any-return]
        aux = context.auxiliary(self.batch_size)
        vocab = context.embedding_matrix().shape[0]
        width = aux[0][2].shape[-1]
        torch.manual_seed(context.seed)
        model = InversionModel(width, vocab, self.hidden, self.architecture).to(context.device)

        def batch(i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            ids, mask, hidden = aux[i]
            if self.train_noise > 0:
                rms = hidden.pow(2).mean(-1, keepdim=True).sqrt()
                hidden = hidden + self.train_noise * rms * torch.randn_like(hidden)
            return ids, mask, hidden

        train_inversion(
            model, len(aux), batch, epochs=self.epochs, lr=self.lr, context=context, desc=self.name
        )
        context.cache[key] = model
        return model

    def run(
        self,
        observations: Sequence[Observation],
        context: AttackContext,
        known: Mapping[int, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Apply the inversion model to every recorded activation (and refine, if asked)."""
        model = self.fit(context)
        hidden, mask, places = stack_activations(observations)
        tokens = torch.empty(hidden.shape[:2], dtype=torch.long)
        refiner = WhiteBoxInversion(steps=max(self.refine_steps, 1), lr=self.refine_lr)
        for part in context.bar(chunks(len(hidden), 64), desc=self.name):
            target, m = hidden[part].to(context.device), mask[part].to(context.device)
            with torch.no_grad():
                logits = model(target, m)
            if self.refine_steps:
                start = context.soft_embeddings(torch.softmax(logits, dim=-1)).float()
                free = refiner.optimize(start, target, m, context, self.refine_steps)
                tokens[part] = refiner.tokens(free, context).cpu()
            else:
                tokens[part] = logits.argmax(-1).cpu()
        return unstack(tokens, places)
