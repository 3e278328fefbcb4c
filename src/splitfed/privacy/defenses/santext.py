"""SanText: input text sanitization with the exponential mechanism over embedding distances.

Yue, Du, Wang, Yiu and Chow, "Differential Privacy for Text Analytics via Natural Text
Sanitization", Findings of ACL 2021. Each token ``x`` is replaced by ``y`` drawn with probability
``exp(-epsilon * d(x, y) / 2) / Z(x)``, ``d`` the Euclidean distance of their embeddings, over the
whole (ordinary) vocabulary: the mechanism is ``epsilon * max d``-DP per token (metric local DP).

Here the vocabulary and embeddings are the split model's own (see
:mod:`splitfed.privacy.defenses.text_sanitizer`). SanText+ (sanitizing only the rarest tokens
always, the others with probability ``p``) needs corpus word frequencies and is not implemented.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from splitfed.privacy.defenses.text_sanitizer import SanitizerParams, TokenSanitizer


class SanText(TokenSanitizer):
    """Each ordinary token replaced by one drawn ``∝ exp(-epsilon * ||e_x - e_y|| / 2)`` (SanText).

    The token is kept with probability ``1 / sum_y exp(-epsilon * ||e_x - e_y|| / 2)``; large
    ``epsilon`` keeps almost every token, small ``epsilon`` draws almost uniformly. The scale of
    ``epsilon`` is that of the embedding distances (e.g. ``epsilon * typical distance / 2`` of a
    few keeps most tokens).

    Parameters
    ----------
    epsilon : float, default 3.0
        Privacy budget per token.
    cache_tokens : int, default 512
        Distinct tokens whose probability row over the vocabulary is cached.
    phases : list of {"train", "eval", "generate"}, default all
        Where texts are sanitized.
    """

    name = "santext"

    class Params(SanitizerParams):
        """Parameters of :class:`SanText` (validated from the YAML)."""

    def _compute(self, indices: Sequence[int]) -> list[torch.Tensor]:
        probs = torch.softmax(-0.5 * self.epsilon * self._distances(indices), dim=-1)
        return list(probs)

    def _draw(self, index: int, data: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.multinomial(data, n, replacement=True, generator=generator)
