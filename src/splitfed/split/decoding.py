"""Choosing the next token: greedy, temperature, top-k, top-p and repetition penalty.

One implementation used by whichever party holds the LM head (the model party in HT, the data
party in HBT); it applies transformers' own logits processors in the order ``generate`` uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class DecodingConfig:
    """How to pick tokens.

    Parameters
    ----------
    max_new_tokens : int, default 64
    do_sample : bool, default False
        ``False`` is greedy decoding.
    temperature, top_k, top_p : float, int, float
        Sampling filters (used when ``do_sample``); ``top_k=0`` and ``top_p=1.0`` disable them.
    repetition_penalty : float, default 1.0
        CTRL-style penalty on tokens already in the sequence (1.0 disables it). Applied over the
        tokens the choosing party has seen: in HT with tokens chosen by the model party, that is
        the generated tokens only (the prompt never crosses); request logits to include the prompt.
    seed : int, default 0
        Seeds the sampling generator, so sampled outputs are reproducible.
    stop : tuple[str, ...], default ()
        Stop strings (checked by the data party on the decoded text).
    ignore_eos : bool, default False
        Keep going after EOS until ``max_new_tokens`` (benchmarks use it for equal lengths).
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(
                f"temperature must be > 0, got {self.temperature}; use do_sample=False for greedy"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.repetition_penalty <= 0:
            raise ValueError("top_k must be >= 0 and repetition_penalty > 0")

    def to_meta(self) -> dict[str, Any]:
        """As message metadata (what the model party needs to choose tokens in HT)."""
        return {
            "do_sample": self.do_sample,
            "temperature": float(self.temperature),
            "top_k": int(self.top_k),
            "top_p": float(self.top_p),
            "repetition_penalty": float(self.repetition_penalty),
            "seed": int(self.seed),
        }

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> DecodingConfig:
        """Inverse of :meth:`to_meta` (invalid values raise ``ValueError``)."""
        return cls(
            do_sample=bool(meta.get("do_sample", False)),
            temperature=float(meta.get("temperature", 1.0) or 1.0),
            top_k=int(meta.get("top_k", 0) or 0),
            top_p=float(meta.get("top_p", 1.0) or 1.0),
            repetition_penalty=float(meta.get("repetition_penalty", 1.0) or 1.0),
            seed=int(meta.get("seed", 0) or 0),
        )


@dataclass
class TokenChooser:
    """Stateful chooser for one batch of sequences (keeps the tokens seen, for the penalty)."""

    config: DecodingConfig
    seen: torch.Tensor | None = None
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        from transformers import (
            LogitsProcessorList,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.generator = torch.Generator().manual_seed(self.config.seed)
        c = self.config
        procs: list[Any] = []
        if c.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(c.repetition_penalty))
        if c.do_sample:
            if c.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(c.temperature))
            if c.top_k > 0:
                procs.append(TopKLogitsWarper(c.top_k))
            if c.top_p < 1.0:
                procs.append(TopPLogitsWarper(c.top_p))
        self.processors = LogitsProcessorList(procs)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token per sequence from last-position logits ``[batch, vocab]``."""
        logits = logits.float()
        if len(self.processors):
            seen = self.seen if self.seen is not None else torch.zeros(logits.shape[0], 0, dtype=torch.long)
            logits = self.processors(seen, logits)  # type: ignore[arg-type]
        if self.config.do_sample:
            probs = torch.softmax(logits, dim=-1)
            token = torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
        else:
            token = logits.argmax(dim=-1)
        self.observe(token)
        return token

    def observe(self, tokens: torch.Tensor) -> None:
        """Record tokens of the sequences (prompt or chosen) for the repetition penalty."""
        tokens = tokens.reshape(tokens.shape[0], -1).long()
        self.seen = tokens if self.seen is None else torch.cat([self.seen, tokens], dim=1)
