"""The noise control: what an attack scores when what it intercepted carries no information.

Every intercepted tensor an attack reads (each tensor the protocol declares an activation or a
gradient: ``forward.hidden``, ``forward_result.logits`` / ``hidden``, ``backward.grad``) is
replaced by Gaussian noise of the same shape, dtype and scale; masks and everything the attacker
knows besides the recording stay as they are. An attack that still scores above its chance level
on the control reads something other than the crossing (the auxiliary text's token frequencies,
the attention mask, a bug in the scoring), so the gap between an attack's score and its control
is what the crossing itself leaks. :func:`~splitfed.privacy.attacks.runner.run_attack` runs the
control beside the attack with ``noise_control=True`` (``splitfed attack --noise-control``).

Scale ``"tensor"`` (the default) keeps each tensor's mean and standard deviation, one pair per
tensor of a batch: it keeps nothing of any one example. Scale ``"position"`` keeps them per
position (each token's activation vector, each example's row of a logits gradient): closer to
the real tensors' look (a decoder's first position is far larger than the rest), but each
position's scale is itself a signal (norm scoring reads exactly the per-example gradient norm,
which it keeps), so it is the stricter test only for attacks that do not read norms.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from splitfed.privacy.attacks.base import AttackError, Observation
from splitfed.protocol import KINDS

Scale = Literal["tensor", "position"]
SCALES: tuple[Scale, ...] = ("tensor", "position")
#: The protocol roles of what an attack intercepts (masks, labels and token ids are not replaced).
NOISED_ROLES = ("activation", "gradient")


def noise_like(tensor: torch.Tensor, *, scale: Scale = "tensor", generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise of ``tensor``'s shape and dtype, with its mean and standard deviation.

    ``scale="tensor"``: one mean and one standard deviation over the whole tensor;
    ``"position"``: over its last dimension, at every position (row) of the others.
    """
    if scale not in SCALES:
        raise AttackError(f"noise control scale {scale!r}: expected one of {list(SCALES)}")
    values = tensor.detach().float()
    if scale == "tensor" or values.dim() < 2:
        mean, std = values.mean(), values.std(unbiased=False)
    else:
        mean = values.mean(-1, keepdim=True)
        std = values.std(-1, keepdim=True, unbiased=False)
    noise = torch.randn(values.shape, generator=generator, dtype=torch.float32)
    return (mean + std * noise.to(values.device)).to(tensor.dtype)


def intercepted(kind: str, tensor: str) -> bool:
    """Whether the protocol declares ``kind.tensor`` an activation or a gradient (what noise replaces)."""
    spec = KINDS[kind].tensor(tensor)
    return spec is not None and spec.role in NOISED_ROLES


def noise_observations(
    observations: Sequence[Observation], *, scale: Scale = "tensor", seed: int = 0
) -> list[Observation]:
    """Copies of ``observations`` whose intercepted tensors are noise (:func:`noise_like`); masks kept.

    The noise is drawn in the observations' order from one generator seeded ``seed``, so a
    control is reproducible.
    """
    generator = torch.Generator().manual_seed(seed)
    out = []
    for obs in observations:
        tensors = {
            key: noise_like(t, scale=scale, generator=generator) if intercepted(*key) else t
            for key, t in obs.tensors.items()
        }
        out.append(Observation(obs.client, obs.batch_id, obs.phase, obs.step, tensors))
    return out


def noise_update(
    tensors: Mapping[str, torch.Tensor], *, scale: Scale = "tensor", seed: int = 0
) -> dict[str, torch.Tensor]:
    """A federated client's update (or gradient) by parameter name with each tensor replaced by
    noise of its shape and scale: the control of gradient inversion."""
    generator = torch.Generator().manual_seed(seed)
    return {name: noise_like(t, scale=scale, generator=generator) for name, t in tensors.items()}


__all__ = [
    "NOISED_ROLES",
    "SCALES",
    "Scale",
    "intercepted",
    "noise_like",
    "noise_observations",
    "noise_update",
]
