"""What the token-level text sanitizers (SanText, CusText, RanText) share.

A sanitizer rewrites each input text before the data party tokenizes it: every *ordinary* token
of the model's own vocabulary is replaced by a token drawn from a distribution that depends on the
privacy budget ``epsilon`` and on distances in the model's token embedding space. The published
mechanisms work on words of a word-level vocabulary (GloVe, BERT's WordPiece); here they work on
the run's tokenizer, so that every candidate has an embedding in the model being split and the
mechanism needs no external vocabulary. What a subclass defines is only the distribution
(:meth:`TokenSanitizer._draw`); tokenization, candidate selection, the per-token cache and the
text reconstruction live here.

Text reconstruction keeps the original text outside the replaced tokens byte for byte: whitespace,
special tokens written in the text, and characters the tokenizer maps to its unknown token stay as
they were; a replaced token's characters (without its surrounding whitespace) become the
replacement's surface form without its surrounding whitespace. The head re-tokenizes the result,
so with a subword vocabulary adjacent replacements may merge into other tokens than the ones
drawn; with a word-level vocabulary the ids it sees are exactly the drawn ones.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from splitfed.privacy.defenses._tokens import ALL_PHASES, DefensePhase, not_set_up
from splitfed.split.front import Defense, FrontContext, FrontResources

#: Rows of the candidate table compared against at once (bounds the memory of a distance block).
_CHUNK = 256


class SanitizerParams(BaseModel):
    """Parameters every text sanitizer takes."""

    model_config = ConfigDict(extra="forbid")
    epsilon: float = Field(
        3.0, gt=0.0, le=1e6, description="privacy budget per token (larger: fewer replacements)"
    )
    cache_tokens: int = Field(
        512,
        ge=0,
        le=1_000_000,
        description="distinct tokens whose sampling distribution is kept between texts (LRU)",
    )
    phases: list[DefensePhase] = Field(
        default_factory=lambda: list(ALL_PHASES), min_length=1, description="phases it applies in"
    )


class TokenSanitizer(Defense):
    """Base of the token-level text sanitizers: replaces each ordinary token by a drawn one.

    Candidates (the tokens that are replaced and that replacements are drawn from) are the
    tokenizer's ids that have a row in the token embedding matrix, are not special tokens, and
    decode to visible characters (not only whitespace, no undecodable bytes). Any other token in
    a text is left as it is.

    Each hook call draws from the defense's own generator, seeded from the run's seed and the
    defense's name, so a run is reproducible and adding a sanitizer shifts no other random stream.

    Parameters
    ----------
    epsilon : float, default 3.0
        Privacy budget per token.
    cache_tokens : int, default 512
        How many distinct tokens' distributions (or distances) are cached. Each is one row over
        the candidates (``4 * |candidates|`` bytes); distances are computed on the fly for the
        distinct tokens of a batch that are not cached, never as a vocabulary-square matrix.
    phases : list of {"train", "eval", "generate"}, default all
        Where texts are sanitized.
    """

    def __init__(
        self,
        epsilon: float = 3.0,
        cache_tokens: int = 512,
        phases: list[DefensePhase] | tuple[DefensePhase, ...] = ALL_PHASES,
    ) -> None:
        self.epsilon = float(epsilon)
        self.cache_tokens = int(cache_tokens)
        self.phases = frozenset(phases)
        self._tokenizer: Any = None
        self._table: torch.Tensor | None = None  # [candidates, hidden] float32 embeddings
        self._candidates: torch.Tensor | None = None  # candidate index -> token id
        self._index: torch.Tensor | None = None  # token id -> candidate index (-1: not a candidate)
        self._surface: list[str] = []  # candidate index -> visible text of the token
        self._cache: OrderedDict[int, Any] = OrderedDict()
        self._generator: torch.Generator | None = None

    # ------------------------------------------------------------------ setup
    def setup(self, resources: FrontResources) -> None:
        tokenizer = resources.tokenizer
        if tokenizer is None:
            raise ValueError(
                f"defense {self.name}: rewrites input text and needs the run's tokenizer; "
                "build the front with tokenizer=..."
            )
        table = resources.embedding_matrix.float().cpu()
        vocab = min(int(table.shape[0]), len(tokenizer))
        special = set(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
        ids = [i for i in range(vocab) if i not in special]
        surfaces = tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
        keep = [(i, s.strip()) for i, s in zip(ids, surfaces, strict=True) if s.strip() and "\ufffd" not in s]
        if len(keep) < 2:
            raise ValueError(
                f"defense {self.name}: the tokenizer has {len(keep)} ordinary tokens with embeddings; "
                "a sanitizer needs at least 2 to draw replacements from"
            )
        self._candidates = torch.tensor([i for i, _ in keep], dtype=torch.long)
        self._surface = [s for _, s in keep]
        self._index = torch.full((max(int(table.shape[0]), len(tokenizer)),), -1, dtype=torch.long)
        self._index[self._candidates] = torch.arange(len(keep))
        self._table = table[self._candidates].contiguous()
        self._tokenizer = tokenizer
        self._cache.clear()
        self._generator = torch.Generator().manual_seed(
            (int(resources.seed) * 1_000_003 + zlib.crc32(self.name.encode())) % (2**63)
        )
        self._prepare()

    def _prepare(self) -> None:
        """Anything a subclass precomputes over the candidate table once (after setup)."""

    def _require_setup(self) -> None:
        if self._table is None:
            raise not_set_up(self.name, "the token embedding matrix (with the tokenizer)")

    # ------------------------------------------------------------------ mechanism
    @property
    def num_candidates(self) -> int:
        """How many tokens replacements are drawn from (after setup)."""
        self._require_setup()
        assert self._candidates is not None
        return int(self._candidates.numel())

    def _cached(self, index: int) -> Any:
        """The cached per-token data of candidate ``index`` (computing it when missing)."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        value = self._compute([index])[0]
        self._store(index, value)
        return value

    def _store(self, index: int, value: Any) -> None:
        if self.cache_tokens <= 0:
            return
        self._cache[index] = value
        self._cache.move_to_end(index)
        while len(self._cache) > self.cache_tokens:
            self._cache.popitem(last=False)

    def _warm(self, indices: Sequence[int]) -> dict[int, Any]:
        """Per-token data of every candidate in ``indices``, computing the missing ones in blocks."""
        out = {i: self._cache[i] for i in indices if i in self._cache}
        missing = [i for i in indices if i not in out]
        for start in range(0, len(missing), _CHUNK):
            block = missing[start : start + _CHUNK]
            for i, value in zip(block, self._compute(block), strict=True):
                out[i] = value
                self._store(i, value)
        return out

    def _distances(self, indices: Sequence[int]) -> torch.Tensor:
        """Euclidean distances ``[len(indices), candidates]`` from the given candidates to all."""
        assert self._table is not None
        rows = torch.tensor(list(indices), dtype=torch.long)
        dist = torch.cdist(self._table[rows], self._table).clamp_min_(0.0)
        # cdist's matrix-product form leaves rounding noise where it should be exactly 0.
        dist[torch.arange(rows.numel()), rows] = 0.0
        return dist

    def _compute(self, indices: Sequence[int]) -> list[Any]:
        """Per-token data (e.g. a probability row) for each candidate in ``indices``."""
        raise NotImplementedError

    def _draw(self, index: int, data: Any, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` candidate indices drawn for candidate ``index`` (``data``: what :meth:`_compute` gave)."""
        raise NotImplementedError

    def sanitize_ids(self, ids: Sequence[int]) -> list[int]:
        """The token ids ``ids`` with every candidate replaced by a drawn token (the mechanism alone)."""
        return self._sanitize([list(ids)])[0]

    def _sanitize(self, rows: list[list[int]]) -> list[list[int]]:
        self._require_setup()
        assert self._index is not None and self._candidates is not None and self._generator is not None
        flat = torch.tensor([t for row in rows for t in row], dtype=torch.long)
        if flat.numel() == 0:
            return [list(r) for r in rows]
        inside = (flat >= 0) & (flat < self._index.numel())
        positions = torch.full_like(flat, -1)
        positions[inside] = self._index[flat[inside]]
        new = flat.clone()
        todo = positions >= 0
        distinct = sorted(set(positions[todo].tolist()))
        data = self._warm(distinct)
        for index in distinct:
            where = (positions == index).nonzero().flatten()
            drawn = self._draw(index, data[index], int(where.numel()), self._generator)
            new[where] = self._candidates[drawn]
        out, at = [], 0
        for row in rows:
            out.append(new[at : at + len(row)].tolist())
            at += len(row)
        return out

    # ------------------------------------------------------------------ text
    def on_text(self, texts: list[str], context: FrontContext) -> list[str]:
        """``texts`` with their ordinary tokens replaced (in the configured phases)."""
        self._require_setup()
        if context.phase not in self.phases:
            return texts
        tok = self._tokenizer
        if not getattr(tok, "is_fast", False):  # no offsets: decode the whole sanitized sequence
            rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
            return [tok.decode(r) for r in self._sanitize(rows)]
        encs = [tok(t, add_special_tokens=False, return_offsets_mapping=True) for t in texts]
        rows = [list(e["input_ids"]) for e in encs]
        new_rows = self._sanitize(rows)
        return [
            self._rebuild(text, enc["offset_mapping"], old, new)
            for text, enc, old, new in zip(texts, encs, rows, new_rows, strict=True)
        ]

    def _rebuild(self, text: str, offsets: Sequence[tuple[int, int]], old: list[int], new: list[int]) -> str:
        assert self._index is not None
        pieces, at = [], 0
        for (start, end), before, after in zip(offsets, old, new, strict=True):
            if before == after or end <= start or start < at:
                continue  # unchanged, zero-width or overlapping spans keep the original characters
            span = text[start:end]
            core = span.strip()
            lead = span[: len(span) - len(span.lstrip())]
            trail = span[len(span.rstrip()) :]
            if not core:
                continue
            pieces.append(text[at:start])
            pieces.append(lead + self._surface[int(self._index[after])] + trail)
            at = end
        pieces.append(text[at:])
        return "".join(pieces)


__all__ = ["SanitizerParams", "TokenSanitizer"]
