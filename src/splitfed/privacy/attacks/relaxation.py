"""Relaxation inversion ("RI"): optimize a distribution over the vocabulary at every position.

A continuous relaxation of the discrete search for the input tokens: free logits over the
vocabulary, ``softmax(logits / temperature)`` times the public embedding matrix as the head's
``inputs_embeds``, fit to the intercepted activations; each position's token is the argmax.
Unlike :class:`~splitfed.privacy.attacks.vmi.WhiteBoxInversion`'s free vectors, every candidate
stays a mixture of real tokens (VFLAIR-LLM's ``RelaxationBasedWhiteBoxInversion``). On a causal
decoder the same left-to-right discrete search as VMI's follows, its candidates the tokens of
highest logit (:func:`~splitfed.privacy.attacks.vmi.causal_search`).
"""

from __future__ import annotations

import torch
from pydantic import ConfigDict, Field

from splitfed.privacy.attacks.base import AttackContext
from splitfed.privacy.attacks.vmi import Init, SearchParams, WhiteBoxInversion


class RelaxationInversion(WhiteBoxInversion):
    """Optimize logits over the vocabulary per position; softmax times the embeddings enters the head.

    Parameters
    ----------
    steps : int, default 300
    lr : float, default 0.1
        Adam learning rate on the logits.
    temperature : float, default 1.0
        Softmax temperature.
    cosine : float, default 0.5
    init : {"target", "mean", "random"}, default "target"
        ``target``: logits from the cosine similarity of the activations to each token embedding;
        ``mean``: uniform; ``random``: small Gaussian logits.
    init_scale : float, default 10.0
        Multiplies the cosine similarities of the ``target`` start.
    batch_size : int, default 16
        Sequences optimized together (memory grows with the vocabulary).
    search : bool, default True
        Causal decoders: choose tokens left to right by discrete search.
    candidates : int, default 128
    shortlist : int, default 16
    accept : float, default 0.02
    search_steps : int, default 0
    lookup : int, default 32
        As :class:`~splitfed.privacy.attacks.vmi.WhiteBoxInversion`'s (the shortlist's first
        source is the highest logits).
    """

    name = "ri"

    class Params(SearchParams):
        """Parameters of :class:`RelaxationInversion`."""

        model_config = ConfigDict(extra="forbid")
        steps: int = Field(300, ge=1, le=100_000, description="optimizer steps per batch of sequences")
        lr: float = Field(0.1, gt=0.0, le=100.0, description="Adam learning rate on the logits")
        temperature: float = Field(1.0, gt=0.0, le=100.0, description="softmax temperature")
        cosine: float = Field(0.5, ge=0.0, le=100.0, description="weight of the cosine distance")
        init: Init = Field("target", description="start point: target, mean (uniform) or random")
        init_scale: float = Field(10.0, ge=0.0, le=1000.0, description="scale of the target start's logits")
        batch_size: int = Field(16, ge=1, le=65_536, description="sequences optimized together")

    def __init__(
        self,
        steps: int = 300,
        lr: float = 0.1,
        temperature: float = 1.0,
        cosine: float = 0.5,
        init: Init = "target",
        init_scale: float = 10.0,
        batch_size: int = 16,
        search: bool = True,
        candidates: int = 128,
        shortlist: int = 16,
        accept: float = 0.02,
        search_steps: int = 0,
        lookup: int = 32,
    ) -> None:
        super().__init__(
            steps=steps,
            lr=lr,
            cosine=cosine,
            init=init,
            batch_size=batch_size,
            search=search,
            candidates=candidates,
            shortlist=shortlist,
            accept=accept,
            search_steps=search_steps,
            lookup=lookup,
        )
        self.temperature, self.init_scale = temperature, init_scale

    def start(self, target: torch.Tensor, context: AttackContext) -> torch.Tensor:
        """Starting logits ``[n, seq, vocab]`` (see ``init``)."""
        table = context.embedding_matrix().float()
        shape = (*target.shape[:-1], table.shape[0])
        if self.init == "target" and target.shape[-1] == table.shape[-1]:
            cos = (
                torch.nn.functional.normalize(target, dim=-1) @ torch.nn.functional.normalize(table, dim=-1).T
            )
            return self.init_scale * cos
        if self.init == "random":
            generator = torch.Generator(device="cpu").manual_seed(context.seed)
            return torch.randn(shape, generator=generator).to(target.device) * 0.01
        return torch.zeros(shape, device=target.device)

    def embeds(self, free: torch.Tensor, context: AttackContext) -> torch.Tensor:
        """The soft tokens' embeddings: ``softmax(logits / temperature) @ E``."""
        return context.soft_embeddings(torch.softmax(free / self.temperature, dim=-1))

    def tokens(self, free: torch.Tensor, context: AttackContext) -> torch.Tensor:
        """The most likely token of every position."""
        return free.argmax(-1)

    def token_scores(self, free: torch.Tensor, context: AttackContext) -> torch.Tensor:
        """The logits themselves."""
        return free.detach()

    def step_size(self, free: torch.Tensor, context: AttackContext) -> float:
        """``lr`` itself: logits have no embedding scale."""
        return self.lr
