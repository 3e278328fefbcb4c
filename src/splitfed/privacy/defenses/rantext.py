"""RanText: text sanitization over a random adjacency list per token (from InferDPT).

Tong, Wu, Zhang, Zhang, Liang and Zhou, "InferDPT: Privacy-Preserving Inference for Black-box
Large Language Model", 2023 (arXiv:2310.12214). RANTEXT replaces each token by one drawn from a
*random adjacency list*: the tokens whose embeddings lie within a random, ``epsilon``-dependent
distance of the token's own, with an exponential mechanism inside that list.

The exact sampling implemented here (our reading of the paper, on the split model's vocabulary,
see :mod:`splitfed.privacy.defenses.text_sanitizer`), afresh for every token occurrence:

1. a Laplace vector ``z`` in the embedding space, each coordinate ``Laplace(0, Δ / epsilon)``,
   ``Δ`` the range (max - min) of the candidates' embedding coordinates (the sensitivity of one
   coordinate); the radius is ``r = ||z||`` (how far the Laplace-noised embedding moved);
2. the adjacency list ``A = {y : ||e_y - e_x|| <= r}`` (it always holds ``x``);
3. ``y`` drawn from ``A`` with ``Pr[y] ∝ exp(epsilon * u(x, y) / 2)``, ``u = 1 - ||e_y - e_x|| / r``
   in ``[0, 1]`` (1 for ``x`` itself).

So ``epsilon`` acts twice: a large budget shrinks the radius (``E r ≈ Δ / epsilon * sqrt(2 d)``)
until the list holds only ``x``, and sharpens the draw towards ``x``; a small one widens the list
to the whole vocabulary and flattens the draw towards uniform.

In a wide embedding space the radius hardly varies (the norm of ``d`` i.i.d. Laplace coordinates
concentrates around its mean), so the useful budgets lie in a narrow band, set by the vocabulary's
geometry rather than by the textbook range of 1 to 10. Measured on ``smollm2-135m`` (``d = 576``)
over fortunes text, the fraction of tokens kept is 0 at ``epsilon`` ≤ 18, 0.04 at 22, 0.16 at 24,
0.60 at 28, 0.96 at 32 and 1.00 from 40 on; on ``minilm-l6`` (``d = 384``) 0.06 at 18, 0.47 at 21,
0.88 at 24 and 1.00 from 32 on. Calibrate ``epsilon`` per model before comparing it with SanText's
or CusText's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from splitfed.privacy.defenses.text_sanitizer import SanitizerParams, TokenSanitizer

#: Elements of one ``[draws, candidates]`` block.
_BLOCK = 1 << 22


class RanText(TokenSanitizer):
    """Each ordinary token replaced by one drawn from its random adjacency list (RanText).

    See the module docstring for the exact mechanism; :meth:`radii` draws the random radii.

    Parameters
    ----------
    epsilon : float, default 3.0
        Privacy budget per token.
    cache_tokens : int, default 512
        Distinct tokens whose distance row to every candidate is cached.
    phases : list of {"train", "eval", "generate"}, default all
        Where texts are sanitized.
    """

    name = "rantext"
    #: Range of the candidates' embedding coordinates (set by setup).
    sensitivity: float = 0.0

    class Params(SanitizerParams):
        """Parameters of :class:`RanText` (validated from the YAML)."""

    def _prepare(self) -> None:
        assert self._table is not None
        self.sensitivity = float(self._table.max() - self._table.min())

    def radii(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` radii ``||z||``, ``z`` with i.i.d. ``Laplace(0, sensitivity / epsilon)`` coordinates."""
        assert self._table is not None
        scale = self.sensitivity / self.epsilon
        # Laplace as the difference of two unit exponentials (the generator reaches every draw).
        e1 = -torch.log1p(-torch.rand(n, self._table.shape[1], generator=generator, dtype=torch.float64))
        e2 = -torch.log1p(-torch.rand(n, self._table.shape[1], generator=generator, dtype=torch.float64))
        return (scale * (e1 - e2)).norm(dim=-1).float()

    def _compute(self, indices: Sequence[int]) -> list[torch.Tensor]:
        return list(self._distances(indices))

    def _draw(self, index: int, data: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
        out = []
        per_block = max(1, _BLOCK // data.numel())
        for start in range(0, n, per_block):
            radius = self.radii(min(per_block, n - start), generator)[:, None]
            inside = data[None, :] <= radius
            inside[:, index] = True
            utility = 1.0 - data[None, :] / radius.clamp_min(1e-30)
            logits = (0.5 * self.epsilon * utility).masked_fill(~inside, float("-inf"))
            out.append(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0])
        return torch.cat(out)
