"""CusText: text sanitization over a small customized output set per token.

Chen, Li, Zhang, Zhang, Zhao and Sun, "A Customized Text Sanitization Mechanism with Differential
Privacy", Findings of ACL 2023. Each token maps to an output set of ``K`` similar tokens and is
replaced by one drawn from that set with the exponential mechanism on a utility normalized to
``[0, 1]``: ``Pr[y] ∝ exp(epsilon * u(x, y) / 2)``.

What this implementation does (on the split model's own vocabulary, see
:mod:`splitfed.privacy.defenses.text_sanitizer`): the output set of ``x`` is ``x`` and its
``K - 1`` nearest ordinary tokens by cosine similarity of their embeddings, and
``u(x, y) = (s(x, y) - min_S s) / (max_S s - min_S s)`` over that set, so ``u(x, x) = 1``.
The paper builds the sets by a greedy partition of the vocabulary, so that tokens of a set share
it (which gives ``epsilon``-DP among them); per-token nearest neighbours are computed lazily
instead, and are not symmetric in general.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from splitfed.privacy.defenses._tokens import ALL_PHASES, DefensePhase
from splitfed.privacy.defenses.text_sanitizer import SanitizerParams, TokenSanitizer


class CusText(TokenSanitizer):
    """Each ordinary token replaced by one of its ``k`` most similar tokens (CusText).

    With the normalized utility ``u`` (1 for the token itself, 0 for the least similar of its
    set), the token is kept with probability ``exp(epsilon / 2) / sum_{y in S} exp(epsilon * u_y / 2)``;
    ``k = 1`` keeps every token, small ``epsilon`` draws uniformly from the set.

    Parameters
    ----------
    epsilon : float, default 3.0
        Privacy budget per token.
    k : int, default 20
        Size of each token's output set (itself included; at most the number of candidates).
    cache_tokens : int, default 50000
        Distinct tokens whose output set is cached (``k`` ids and probabilities each).
    phases : list of {"train", "eval", "generate"}, default all
        Where texts are sanitized.
    """

    name = "custext"

    class Params(SanitizerParams):
        """Parameters of :class:`CusText` (validated from the YAML)."""

        k: int = Field(20, ge=1, le=100_000, description="size of each token's output set (itself included)")
        cache_tokens: int = Field(
            50_000, ge=0, le=1_000_000, description="distinct tokens whose output set is cached (LRU)"
        )

    def __init__(
        self,
        epsilon: float = 3.0,
        k: int = 20,
        cache_tokens: int = 50_000,
        phases: list[DefensePhase] | tuple[DefensePhase, ...] = ALL_PHASES,
    ) -> None:
        super().__init__(epsilon=epsilon, cache_tokens=cache_tokens, phases=phases)
        self.k = int(k)
        self._unit: torch.Tensor | None = None

    def _prepare(self) -> None:
        assert self._table is not None
        self._unit = torch.nn.functional.normalize(self._table, dim=-1)

    def _compute(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        assert self._unit is not None
        rows = torch.tensor(list(indices), dtype=torch.long)
        sim = self._unit[rows] @ self._unit.T
        sim[torch.arange(rows.numel()), rows] = 1.0  # the token itself, exactly (ties with duplicates)
        k = min(self.k, sim.shape[1])
        top, members = sim.topk(k, dim=-1)
        # The token itself must be in its set even if duplicates of its embedding tie with it.
        missing = (members != rows[:, None]).all(-1)
        members[missing, -1] = rows[missing]
        top[missing, -1] = 1.0
        lo, hi = top.min(-1, keepdim=True).values, top.max(-1, keepdim=True).values
        utility = torch.where(hi > lo, (top - lo) / (hi - lo).clamp_min(1e-12), torch.ones_like(top))
        probs = torch.softmax(0.5 * self.epsilon * utility, dim=-1)
        return list(zip(members, probs, strict=True))

    def _draw(
        self, index: int, data: tuple[torch.Tensor, torch.Tensor], n: int, generator: torch.Generator
    ) -> torch.Tensor:
        members, probs = data
        return members[torch.multinomial(probs, n, replacement=True, generator=generator)]
