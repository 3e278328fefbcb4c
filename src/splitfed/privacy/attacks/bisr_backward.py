"""Learning-based inversion of the gradients that cross back to the model party (BiSR, backward direction).

Chen et al., "Unveiling the Vulnerability of Private Fine-Tuning in Split-Based Frameworks for
Large Language Models: A Bidirectionally Enhanced Attack" (CCS 2024): besides the activations
(:mod:`splitfed.privacy.attacks.bisr`), the model party sees the gradient the data party returns
in every training step, and a model trained to map those gradients to tokens inverts them
(VFLAIR-LLM's BiSR(b)). What it receives (``backward.grad``):

- **HT, labels at the data party**: the gradient of the logits it sent. For causal-LM
  cross-entropy it is ``(softmax(z_t) - onehot(x_{t+1})) / n`` at every target position ``t``
  and zero elsewhere: position ``t`` names the *next* input token, all but exactly.
- **HBT**: the gradient of its body's output, the same loss pulled back through the data party's
  tail (its last blocks, final norm and LM head), which for a causal LM is public up to its
  fine-tuning. Position ``t`` carries mostly token ``t + 1`` (along the residual stream) and a
  little of the later ones (through the tail's attention).

**Training by simulation.** The attacker runs its public copy of the model on auxiliary text
through the same split, the public head, the public body up to where the gradient crosses (the
logits in HT, the body's output in HBT; the model party's own fine-tuned body is not in the
context) and the data party's rest (HT: nothing but the loss; HBT: the public tail and its final
norm and LM head), takes the task's causal-LM loss (every real token a target) and the gradient
of it at the split: what the data party would have returned for that text. An inversion model
(per-position MLP, or one transformer layer that also reads the neighbours) is trained on those
gradients and applied to the intercepted ones. In HT its input is as wide as the vocabulary: on
smollm2-135m (split 2, 256 auxiliary texts, 10 epochs of width 256) training took 13 min on two
CPU cores for token F1 0.74 (the linear baseline on the activations 0.64, chance 0.08); in HBT
(tail 2) 3 min for 0.70.

**Alignment.** Position ``t``'s gradient is of the prediction of token ``t + 1``, so the model
reads the gradient of position ``t - 1`` to guess token ``t``. The first token of a sequence (no
position before it) and tokens that are no target (a prompt's, masked out of the loss) get
nothing from the gradient and are guessed from what the model learned of the auxiliary text (its
first tokens, its frequencies). Every real input token is scored, as for every token attack.

**Bidirectional** (``direction: bidirectional``): per position, the head's activation at ``t``
and the gradient at ``t - 1``, each normalised to unit RMS, concatenated; an attacker that sees
both needs only one of them to survive a defense. A model trained on clean auxiliary crossings
leans on whichever is cleaner there; ``train_noise`` teaches it not to trust either alone.

A sequence-classification gradient (``[batch, classes]``) carries the label, not the tokens (use
``bli``); a classifier's task head is the data party's own, so in HBT classification there is no
public tail to simulate, and this attack refuses both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from splitfed.privacy.attacks.base import (
    Attack,
    AttackContext,
    AttackError,
    Need,
    Observation,
    chunks,
    stack_activations,
    unstack,
)
from splitfed.privacy.attacks.bisr import Architecture, InversionTrainingParams, train_inversion
from splitfed.privacy.attacks.metrics import IGNORE

Direction = Literal["backward", "bidirectional"]

_GRAD = Need("backward", "grad")
_HIDDEN = Need("forward", "hidden")
_MASK = Need("forward", "attention_mask")
# What the model party sent (absent from a serve --record recording): which gradient it got back.
_LOGITS = Need("forward_result", "logits", required=False)
_BODY = Need("forward_result", "hidden", required=False)


class GradientInversionModel(nn.Module):
    """Per-position features ``[batch, seq, sum(widths)]`` to token logits ``[batch, seq, vocab]``.

    Each part of the features (the activation, the gradient) has its own LayerNorm, so neither's
    scale drowns the other; then a linear map to ``hidden``, optionally one transformer layer
    over the positions, and a GELU MLP to the vocabulary.

    Parameters
    ----------
    widths : Sequence[int]
        Widths of the parts, in the order they are concatenated.
    vocab : int
    hidden : int
    architecture : {"mlp", "transformer"}
    """

    def __init__(self, widths: Sequence[int], vocab: int, hidden: int, architecture: Architecture) -> None:
        super().__init__()
        self.widths = list(widths)
        self.norms = nn.ModuleList(nn.LayerNorm(w) for w in self.widths)
        self.project = nn.Linear(sum(self.widths), hidden)
        self.mixer: nn.Module | None = None
        if architecture == "transformer":
            heads = next(h for h in (8, 4, 2, 1) if hidden % h == 0)
            self.mixer = nn.TransformerEncoderLayer(
                hidden, heads, dim_feedforward=hidden, dropout=0.0, batch_first=True, norm_first=True
            )
        self.out = nn.Sequential(nn.GELU(), nn.Linear(hidden, vocab))

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits of every position (``mask`` 0 marks padding the mixer must not read)."""
        parts = features.split(self.widths, dim=-1)
        x = self.project(torch.cat([norm(p) for norm, p in zip(self.norms, parts, strict=True)], dim=-1))
        if self.mixer is not None:
            x = self.mixer(x, src_key_padding_mask=~mask.bool())
        return self.out(x)  # type: ignore[no-any-return]


def unit_rms(x: torch.Tensor) -> torch.Tensor:
    """Every position's vector of ``x [..., width]`` scaled to RMS 1 (a zero vector stays zero).

    A returned gradient's scale is ``1 / n`` of the batch's target tokens, the loss scale of
    gradient accumulation and whatever clipping did: nothing of the tokens.
    """
    rms = x.float().pow(2).mean(-1, keepdim=True).sqrt()
    return x.float() / torch.where(rms > 0, rms, torch.ones_like(rms))


def next_token_aligned(grad: torch.Tensor) -> torch.Tensor:
    """``grad [batch, seq, width]`` moved one position right: position ``t`` holds the gradient of ``t - 1``,
    whose target is token ``t``; position 0 is zero."""
    return nn.functional.pad(grad[:, :-1], (0, 0, 1, 0))


class SimulatedCrossings:
    """The auxiliary text through the attacker's public copy of the whole split, and each batch's gradient.

    What :meth:`gradient` gives for auxiliary batch ``i`` is what the data party would return for
    it: the gradient of the causal-LM loss with respect to the logits (``of_logits``: HT) or to
    the body's output (HBT, the last ``context.tail_layers`` blocks being the data party's).
    HBT's gradients (as wide as the model) are computed once; HT's (as wide as the vocabulary)
    are computed when asked, from the last block's output, so that only that is held.

    Parameters
    ----------
    context : AttackContext
        Its public causal LM, tokenizer, auxiliary text, ``head_layers`` and, for HBT, ``tail_layers``.
    of_logits : bool
    batch_size : int
        Auxiliary sequences per batch.
    """

    def __init__(self, context: AttackContext, *, of_logits: bool, batch_size: int) -> None:
        from splitfed.data.tasks import get_task
        from splitfed.models.families import family_for
        from splitfed.models.partition import Segment

        model = context.require_model(BackwardInversion.name)
        if getattr(model, "lm_head", None) is None:
            raise AttackError(
                f"{BackwardInversion.name} simulates the data party's causal-LM loss, so it needs the public "
                f"causal LM (with its LM head); got {type(model).__name__}. A classifier's task head is the "
                "data party's own (never public): use bli, ns or ds on classification gradients"
            )
        self.aux = context.auxiliary(batch_size)
        self.vocab: int = model.get_output_embeddings().weight.shape[0]  # type: ignore[operator]
        adapter = family_for(model.config)
        blocks = adapter.num_layers(model)
        head = context.head_layers if context.head_layers is not None else 0
        if of_logits:
            split = blocks
        else:
            if context.tail_layers is None:
                raise AttackError(
                    "the gradient is of the body's output (HBT): simulating it needs the tail's depth, "
                    "AttackContext.tail_layers (the run's split.tail_layers)"
                )
            split = blocks - context.tail_layers
            if not head <= split < blocks:
                raise AttackError(
                    f"tail_layers={context.tail_layers} with head_layers={head} does not fit the public "
                    f"model's {blocks} blocks"
                )
        body = Segment("body", model, adapter, head, split, embed=False, finish=False, task_head="causal_lm")
        self.rest = Segment(
            "tail", model, adapter, split, blocks, embed=False, finish=True, task_head="causal_lm"
        )
        self.of_logits, self.task = of_logits, get_task("causal_lm")
        dtype = next(model.parameters()).dtype
        with torch.no_grad():
            self.states = [body(hidden=h.to(dtype), attention_mask=m) for _, m, h in self.aux]
        self.grads: list[torch.Tensor] | None = None
        if not of_logits:
            self.grads = [self._simulate(i) for i in range(len(self.aux))]
            self.states = []

    def gradient(self, i: int) -> torch.Tensor:
        """The gradient ``[batch, seq, width or vocab]`` (float32) of auxiliary batch ``i``."""
        return self.grads[i] if self.grads is not None else self._simulate(i)

    def _simulate(self, i: int) -> torch.Tensor:
        ids, mask, _ = self.aux[i]
        labels = {"labels": ids.masked_fill(mask == 0, IGNORE)}
        with torch.enable_grad():
            if self.of_logits:
                with torch.no_grad():
                    logits = self.rest(hidden=self.states[i], attention_mask=mask)
                at = logits.detach().float().requires_grad_(True)
                loss = self.task.loss(at, labels)
            else:
                at = self.states[i].detach().requires_grad_(True)
                loss = self.task.loss(self.rest(hidden=at, attention_mask=mask), labels)
            (grad,) = torch.autograd.grad(loss, at)
        return grad.float()


class BackwardInversion(Attack):
    """Train an inversion model on simulated returned gradients of auxiliary text; apply it to the intercepted ones.

    Parameters
    ----------
    direction : {"backward", "bidirectional"}, default "backward"
        Read the returned gradients only, or also the head's activations (BiSR's bidirectional
        attack: both, per position, concatenated).
    architecture : {"mlp", "transformer"}, default "mlp"
    hidden : int, default 512
    epochs : int, default 40
        Passes over the auxiliary batches.
    lr : float, default 2e-3
        AdamW learning rate.
    batch_size : int, default 16
        Auxiliary sequences per training step.
    train_noise : float, default 0.0
        Gaussian noise added to every (unit-RMS) part of the auxiliary features while training.
    """

    name = "bisr_b"
    target = "tokens"
    needs = (_GRAD, _HIDDEN, _MASK, _LOGITS, _BODY)
    needs_public_model = True
    needs_auxiliary = True
    reports_baseline = True

    class Params(InversionTrainingParams):
        """Parameters of :class:`BackwardInversion`."""

        direction: Direction = Field(
            "backward", description="read the returned gradients (backward) or also the activations"
        )

    def __init__(
        self,
        direction: Direction = "backward",
        architecture: Architecture = "mlp",
        hidden: int = 512,
        epochs: int = 40,
        lr: float = 2e-3,
        batch_size: int = 16,
        train_noise: float = 0.0,
    ) -> None:
        self.direction, self.architecture, self.hidden = direction, architecture, hidden
        self.epochs, self.lr, self.batch_size, self.train_noise = epochs, lr, batch_size, train_noise

    def features(self, hidden: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """What the inversion model reads at each position: the gradient of ``t - 1`` (after the
        head's activation at ``t``, bidirectional), each part at unit RMS."""
        parts = [unit_rms(next_token_aligned(grad))]
        if self.direction == "bidirectional":
            parts.insert(0, unit_rms(hidden))
        return torch.cat(parts, dim=-1)

    def fit(self, context: AttackContext, *, of_logits: bool) -> GradientInversionModel:
        """The inversion model trained on the simulated crossings of the auxiliary text (cached)."""
        split = None if of_logits else context.tail_layers
        key = (self.name, context.head_layers, split, *self.params().values())
        if key in context.cache:
            return context.cache[key]  # type: ignore[no-any-return]
        simulation_key = ("bisr_b simulation", context.head_layers, split, self.batch_size)
        if simulation_key not in context.cache:
            context.cache[simulation_key] = SimulatedCrossings(
                context, of_logits=of_logits, batch_size=self.batch_size
            )
        simulation: SimulatedCrossings = context.cache[simulation_key]
        width = simulation.aux[0][2].shape[-1]
        widths = [simulation.vocab if of_logits else width]
        if self.direction == "bidirectional":
            widths.insert(0, width)
        torch.manual_seed(context.seed)
        model = GradientInversionModel(widths, simulation.vocab, self.hidden, self.architecture).to(
            context.device
        )

        def batch(i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            ids, mask, hidden = simulation.aux[i]
            x = self.features(hidden, simulation.gradient(i))
            if self.train_noise > 0:
                present = torch.cat(
                    [p.abs().amax(-1, keepdim=True).gt(0).expand_as(p) for p in x.split(widths, dim=-1)], -1
                )
                x = x + self.train_noise * torch.randn_like(x) * present
            return ids, mask, x

        train_inversion(
            model, len(simulation.aux), batch, epochs=self.epochs, lr=self.lr, context=context, desc=self.name
        )
        context.cache[key] = model
        return model

    def run(
        self,
        observations: Sequence[Observation],
        context: AttackContext,
        known: Mapping[int, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Apply the inversion model to every intercepted gradient (and activation, bidirectional)."""
        of_logits = self._of_logits(observations, context)
        model = self.fit(context, of_logits=of_logits)
        hidden, mask, places = stack_activations(observations)
        seq = hidden.shape[1]
        grad = torch.cat(
            [
                nn.functional.pad(
                    obs["backward", "grad"].float(), (0, 0, 0, seq - obs["backward", "grad"].shape[1])
                )
                for obs in observations
            ]
        )
        tokens = torch.empty(hidden.shape[:2], dtype=torch.long)
        for part in context.bar(chunks(len(hidden), 64), desc=self.name):
            x = self.features(hidden[part], grad[part]).to(context.device)
            with torch.no_grad():
                tokens[part] = model(x, mask[part].to(context.device)).argmax(-1).cpu()
        return unstack(tokens, places)

    def _of_logits(self, observations: Sequence[Observation], context: AttackContext) -> bool:
        """Whether the intercepted gradients are of the logits (HT) or of the body's output (HBT).

        What the model party sent says it; a recording of only what it received (``serve
        --record``) has no replies, and then the gradient's width does (the vocabulary's or the
        model's).
        """
        model = context.require_model(self.name)
        out = getattr(model, "get_output_embeddings", lambda: None)()
        vocab = None if out is None else out.weight.shape[0]
        kinds = set()
        for obs in observations:
            grad, hidden = obs["backward", "grad"], obs["forward", "hidden"]
            if grad.dim() != 3:
                raise AttackError(
                    f"batch {obs.batch_id}: the gradient {tuple(grad.shape)} is of a classifier's logits, "
                    "one row per example: it carries the label, not the tokens (use bli, ns or ds)"
                )
            if obs.get("forward_result", "logits") is not None:
                kinds.add(True)
            elif obs.get("forward_result", "hidden") is not None:
                kinds.add(False)
            elif grad.shape[-1] == vocab and vocab != hidden.shape[-1]:
                kinds.add(True)
            elif grad.shape[-1] == hidden.shape[-1] and vocab != hidden.shape[-1]:
                kinds.add(False)
            else:
                raise AttackError(
                    f"batch {obs.batch_id}: the gradient's width {grad.shape[-1]} is neither the public "
                    f"model's vocabulary ({vocab}, HT) nor its width ({hidden.shape[-1]}, HBT), and the "
                    "recording holds no reply that says which; is the public model the run's?"
                )
        if len(kinds) > 1:
            raise AttackError("the recording mixes gradients of logits (HT) and of body outputs (HBT)")
        return kinds.pop()


__all__ = [
    "BackwardInversion",
    "GradientInversionModel",
    "SimulatedCrossings",
    "next_token_aligned",
    "unit_rms",
]
