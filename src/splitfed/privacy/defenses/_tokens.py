"""What several defenses share: the phases a defense may act in and the mask of real tokens."""

from __future__ import annotations

from typing import Literal

import torch

from splitfed.split.front import FrontContext

#: The phases a defense can act in (``phases:`` of a defense's parameters).
DefensePhase = Literal["train", "eval", "generate"]
ALL_PHASES: tuple[DefensePhase, ...] = ("train", "eval", "generate")


def real_token_mask(context: FrontContext, like: torch.Tensor) -> torch.Tensor:
    """``[batch, seq]`` weights (1 real token, 0 padding) for ``like`` (``[batch, seq, ...]``), in its dtype.

    In a decoding step the context's mask covers every position so far while ``like`` holds only
    the newest ones: the mask's last columns are the ones that match. Without a mask every
    position counts.
    """
    batch, seq = like.shape[0], like.shape[1]
    mask = context.attention_mask
    if mask is None:
        return torch.ones(batch, seq, dtype=like.dtype, device=like.device)
    if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] < seq:
        raise ValueError(
            f"attention mask of shape {tuple(mask.shape)} does not fit a tensor of shape {tuple(like.shape)}"
        )
    return mask[:, mask.shape[1] - seq :].to(device=like.device, dtype=like.dtype)


def not_set_up(defense: str, what: str) -> RuntimeError:
    """The error of a hook that ran before :meth:`~splitfed.split.front.Defense.setup`."""
    return RuntimeError(
        f"{defense}: {what} comes from the model, but setup() has not run; build the front with "
        f"build_front(specs, model) (or call defense.setup(FrontResources(model)) first)"
    )


def require_input_ids(defense: str, context: FrontContext) -> torch.Tensor:
    """The context's token ids, or an error saying why the defense needs them."""
    if context.input_ids is None:
        raise ValueError(
            f"{defense} needs the token ids the activations came from (FrontContext.input_ids), "
            "but the head ran on embeddings the caller supplied"
        )
    return context.input_ids
