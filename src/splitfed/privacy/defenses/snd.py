"""Split-and-Denoise (SnD): dχ-private token embeddings, denoised at the data party.

Mai, Yan, Huang, Wang and Wei, "Split-and-Denoise: Protect Large Language Model Inference with
Local Differential Privacy", 2023 (arXiv:2310.09130; ICML 2024). The data party adds metric-DP
noise to each token embedding before its head runs, so that what crosses is computed from noisy
inputs; it knows the noise it added, and a small denoiser of its own turns the noisy output it
gets back into a cleaner one.

What this implementation does:

* noise (``on_embeddings``): per token ``z = r * v``, ``v`` uniform on the unit sphere of the
  embedding space and ``r ~ Gamma(d, 1/epsilon)`` (shape ``d``, the width; scale ``1/epsilon``),
  so the density is ``∝ exp(-epsilon * ||z||)``: ``epsilon * ||x - x'||``-dχ-privacy per token,
  ``E||z|| = d / epsilon``. Applied in training, evaluation and generation (prefill and every
  decoding step). The noise and the clean embeddings are kept per micro-batch until the reply;
* denoiser (``on_received``, ``name == "hidden"``: the body's output before the tail in HBT,
  training, evaluation and every decoding step): a per-token MLP whose input is, per position,
  the received hidden state, the noise vector added to that position's embedding and that
  position's clean token embedding (each scaled to unit RMS), and ``log(||z|| / ||x||)``; it
  outputs a correction ``h + rms(h) * mlp(...)``. The paper's denoiser is a transformer over the
  sequence pre-trained on public data against clean outputs; this one trains with the task,
  through the task loss (it sits before the tail), and sees positions independently. It trains
  from the data party's own loss, so with a frozen head (SplitFrozen) no gradient is returned
  for what crossed (:meth:`SplitAndDenoise.received_parameters`).

HBT only: in HT nothing the data party receives comes before a tail of its own (logits, or
nothing with ``labels_at: model``), so there would be nothing to denoise and the denoiser would
never train. The data party refuses it there (:meth:`~splitfed.split.front.DataFront.check_tail`,
also at config validation) rather than run the noise alone under SnD's name; ``dchi_privacy`` is
that noise alone.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from splitfed.privacy.defenses._tokens import ALL_PHASES, DefensePhase
from splitfed.split.front import Defense, FrontContext, FrontResources

#: Micro-batches whose noise is kept while their replies are pending (oldest dropped beyond).
_PENDING = 64


def dchi_noise(
    shape: torch.Size | tuple[int, ...], epsilon: float, device: torch.device | None = None
) -> torch.Tensor:
    """dχ-privacy noise ``[..., d]`` (float32): uniform directions, ``Gamma(d, 1/epsilon)`` norms."""
    *lead, d = shape
    direction = F.normalize(torch.randn(*lead, d, device=device), dim=-1)
    concentration = torch.full(tuple(lead), float(d), device=device)
    radius = torch.distributions.Gamma(concentration, torch.full_like(concentration, epsilon)).sample()
    return direction * radius[..., None]


class SplitAndDenoise(Defense, nn.Module):
    """dχ-privacy noise on the token embeddings and a trainable denoiser before the tail (SnD).

    Parameters
    ----------
    hidden_size : int
        Width of the embeddings and hidden states (the run fills it in from the model).
    epsilon : float, default 100.0
        dχ-privacy budget per unit of embedding distance; the mean noise norm is
        ``hidden_size / epsilon`` (compare it with the embeddings' norms).
    denoiser_width : int, default 0
        Width of the denoiser's hidden layers (0: ``hidden_size``).
    phases : list of {"train", "eval", "generate"}, default all
        Where noise is added (and the reply denoised).

    Needs a data-party tail (``split.setting: hbt``); the data party refuses it in HT.
    """

    name = "snd"
    needs_tail = (
        "snd denoises the body's output before the data party's tail (split.setting: hbt); "
        "for its noise alone in HT use dchi_privacy"
    )

    class Params(BaseModel):
        """Parameters of :class:`SplitAndDenoise` (validated from the YAML)."""

        model_config = ConfigDict(extra="forbid")
        hidden_size: int = Field(gt=0, description="width of the embeddings (filled in by the run)")
        epsilon: float = Field(
            100.0, gt=0.0, le=1e9, description="dχ-privacy budget; mean noise norm is hidden_size / epsilon"
        )
        denoiser_width: int = Field(
            0, ge=0, le=65536, description="width of the denoiser's hidden layers (0: hidden_size)"
        )
        phases: list[DefensePhase] = Field(
            default_factory=lambda: list(ALL_PHASES), min_length=1, description="phases it applies in"
        )

    def __init__(
        self,
        hidden_size: int,
        epsilon: float = 100.0,
        denoiser_width: int = 0,
        phases: list[DefensePhase] | tuple[DefensePhase, ...] = ALL_PHASES,
    ) -> None:
        nn.Module.__init__(self)
        self.hidden_size, self.epsilon = int(hidden_size), float(epsilon)
        self.phases = frozenset(phases)
        width = denoiser_width or hidden_size
        self.denoiser = nn.Sequential(
            nn.Linear(3 * hidden_size + 1, width),
            nn.GELU(),
            nn.Linear(width, width),
            nn.GELU(),
            nn.Linear(width, hidden_size),
        )
        last = self.denoiser[-1]
        assert isinstance(last, nn.Linear)
        with torch.no_grad():  # starts close to the identity, but every layer gets a gradient
            last.weight.mul_(0.1)
            last.bias.zero_()
        self._pending: OrderedDict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def setup(self, resources: FrontResources) -> None:
        width = int(resources.embedding_matrix.shape[1])
        if width != self.hidden_size:
            raise ValueError(
                f"defense snd: hidden_size {self.hidden_size} but the model's token embeddings are "
                f"{width} wide; leave hidden_size out so the run fills it in"
            )

    def received_parameters(self) -> list[nn.Parameter]:
        # The noise has no parameters; the denoiser acts only on what comes back.
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    def on_embeddings(self, embeddings: torch.Tensor, context: FrontContext) -> torch.Tensor:
        if context.phase not in self.phases:
            return embeddings
        if embeddings.shape[-1] != self.hidden_size:
            raise ValueError(
                f"defense snd: embeddings {tuple(embeddings.shape)} are not {self.hidden_size} wide"
            )
        noise = dchi_noise(embeddings.shape, self.epsilon, embeddings.device)
        kept = (noise, embeddings.detach().float())
        self._last = kept
        if context.phase != "generate":
            self._pending[(context.phase, context.batch_id)] = kept
            while len(self._pending) > _PENDING:
                self._pending.popitem(last=False)
        return (embeddings.float() + noise).to(embeddings.dtype)

    def _remembered(self, tensor: torch.Tensor, context: FrontContext) -> tuple[torch.Tensor, torch.Tensor]:
        if context.phase == "generate":
            kept = self._last
        else:
            kept = self._pending.pop((context.phase, context.batch_id), None)
        if kept is None:
            raise RuntimeError(
                f"defense snd: no noise remembered for {context.phase} batch {context.batch_id}; the "
                "denoiser needs on_embeddings to have run for the batch it receives (is the head "
                "embedding through the front?)"
            )
        noise, clean = kept
        batch, seq = int(tensor.shape[0]), int(tensor.shape[1])
        if noise.shape[0] != batch or noise.shape[1] < seq:
            raise RuntimeError(
                f"defense snd: received hidden {tuple(tensor.shape)} does not match the noised "
                f"embeddings {tuple(noise.shape)} of {context.phase} batch {context.batch_id}"
            )
        # A reply may cover only the newest positions (a decoding step after a replayed prefix).
        return noise[:, -seq:], clean[:, -seq:]

    def on_received(self, name: str, tensor: torch.Tensor, context: FrontContext) -> torch.Tensor:
        if name != "hidden" or context.phase not in self.phases:
            if context.phase != "generate":
                self._pending.pop((context.phase, context.batch_id), None)
            return tensor
        if tensor.shape[-1] != self.hidden_size:
            raise ValueError(
                f"defense snd: received hidden {tuple(tensor.shape)} is not {self.hidden_size} wide"
            )
        noise, clean = self._remembered(tensor, context)
        dtype = next(self.denoiser.parameters()).dtype
        h = tensor.to(dtype)
        eps = 1e-6
        rms = h.pow(2).mean(-1, keepdim=True).add(eps).sqrt()
        noise_norm = noise.norm(dim=-1, keepdim=True)
        ratio = torch.log((noise_norm + eps) / (clean.norm(dim=-1, keepdim=True) + eps))
        features = torch.cat(
            [
                h / rms,
                noise.to(dtype) / (noise_norm.to(dtype) / math.sqrt(self.hidden_size) + eps),
                F.rms_norm(clean, (self.hidden_size,), eps=eps).to(dtype),
                ratio.to(dtype),
            ],
            dim=-1,
        )
        return (h + rms * self.denoiser(features)).to(tensor.dtype)
