"""MID: the Mutual Information regularization Defense, a variational information bottleneck.

Zou et al. 2023, "Mutual Information Regularization for Vertical Federated Learning" (the MID of
VFLAIR and VFLAIR-LLM), built on the variational information bottleneck of Alemi et al. 2017
("Deep Variational Information Bottleneck", ICLR). The activations pass through a stochastic
bottleneck whose KL divergence to a standard normal, an upper bound on the mutual information
between what enters and what leaves it, is penalized with the task loss.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from splitfed.privacy.defenses._tokens import real_token_mask
from splitfed.split.front import Defense, FrontContext

# A principal direction counts as spanned by the fitted batch when its singular value is at least
# this fraction of the largest (float32 rounding leaves the others near 1e-7 of it).
RANK_RTOL = 1e-3


class Bottleneck(nn.Module):
    """``hidden -> (mu, logvar) -> sample -> hidden``: one variational bottleneck.

    With ``init="pca"`` the first batch it sees (:meth:`fit`) sets it to the best linear
    autoencoder of that batch's real tokens: ``mu`` is their coordinates along the top
    ``bottleneck`` principal directions, scaled to unit variance, the decoder maps them back, and
    ``log σ²`` starts at ``init_logvar`` everywhere. Only the directions the batch spans are
    used (a batch of ``n`` distinct tokens spans at most ``n - 1``): code dimensions beyond them
    start unused, carrying nothing until training gives them weight. A randomly initialized bottleneck instead sends
    the body noise until it has trained (on smollm2-135m with 40 LoRA steps, MP at chance for every
    ``weight``), so that the sweep measured the initialization, not the KL weight.

    Parameters
    ----------
    hidden_size : int
    bottleneck : int
        Width of the stochastic code.
    init : {"pca", "random"}, default "pca"
    init_logvar : float, default -4.0
        Starting ``log σ²`` of the code (with ``init="pca"``), relative to its unit-variance mean.
    """

    fitted: torch.Tensor

    def __init__(
        self,
        hidden_size: int,
        bottleneck: int,
        init: Literal["pca", "random"] = "pca",
        init_logvar: float = -4.0,
    ) -> None:
        super().__init__()
        self.encoder = nn.Linear(hidden_size, 2 * bottleneck)
        self.decoder = nn.Linear(bottleneck, hidden_size)
        self.init_logvar = init_logvar
        # Saved with the defense's state: a loaded bottleneck is not refitted.
        self.register_buffer("fitted", torch.tensor(init == "random"))

    @torch.no_grad()
    def fit(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        """Set the bottleneck to the PCA autoencoder of ``x``'s real tokens (``mask`` ``[batch, seq]``)."""
        points = x.detach().float()[mask.to(x.device).bool()]
        if points.shape[0] < 2:
            return  # nothing to fit on; the next batch tries again
        width, mean = self.decoder.in_features, points.mean(0)
        _, values, vectors = torch.linalg.svd(points - mean, full_matrices=False)
        # Only the directions the batch actually spans: with fewer real tokens than the code is
        # wide (or repeated tokens), the trailing singular values are rounding noise, and scaling
        # them to unit variance multiplied a fresh token's coordinate there by ~1e5 (a KL of 1e10
        # per token on smollm2-135m at width 256 from a batch of 146 tokens).
        spanned = int((values > RANK_RTOL * values[0]).sum()) if values[0] > 0 else 0
        rank = min(width, spanned)
        if rank == 0:
            return  # every real token alike: nothing to fit on; the next batch tries again
        std = values[:rank] / (points.shape[0] - 1) ** 0.5
        directions = vectors[:rank]  # [rank, hidden]
        dtype = self.encoder.weight.dtype
        encoder, bias = torch.zeros_like(self.encoder.weight), torch.zeros_like(self.encoder.bias)
        encoder[:rank] = (directions / std[:, None]).to(dtype)
        bias[:rank] = -(encoder[:rank] @ mean.to(dtype))
        bias[width:] = self.init_logvar  # log σ² (its weights stay 0)
        decoder = torch.zeros_like(self.decoder.weight)
        decoder[:, :rank] = (directions.T * std[None, :]).to(dtype)  # code dims past the rank: unused
        self.encoder.weight.copy_(encoder)
        self.encoder.bias.copy_(bias)
        self.decoder.weight.copy_(decoder)
        self.decoder.bias.copy_(mean.to(dtype))
        self.fitted.fill_(True)

    def forward(self, x: torch.Tensor, sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoded code (``x``'s shape and dtype) and each token's ``KL(N(mu, σ²) || N(0, I))``."""
        dtype = self.encoder.weight.dtype
        mu, logvar = self.encoder(x.to(dtype)).chunk(2, dim=-1)
        # Bounded so that exp() stays finite; the bound is far outside what training reaches.
        logvar = logvar.clamp(-30.0, 20.0)
        code = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if sample else mu
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)
        return self.decoder(code).to(x.dtype), kl


class MID(Defense, nn.Module):
    """A variational information bottleneck on the outgoing activations (and/or the tail's input).

    Every token's vector ``h`` is encoded to ``(mu, log σ²)`` of width ``bottleneck``; in training a
    code ``mu + σ ε`` (``ε ~ N(0, I)``, reparameterized so the head trains through it) is decoded
    back to ``hidden_size``, and the auxiliary loss ``weight · KL(N(mu, σ²) || N(0, I))``, averaged
    over real tokens (``FrontContext.attention_mask``), joins the task loss. In evaluation and
    generation the code is ``mu`` unless ``sample_at_eval``. The bottleneck's parameters join the
    data party's optimizer, checkpoints and adapter files.

    ``where: tail`` puts a second, separate bottleneck at the tail's input (HBT: the body's output
    as received, :meth:`on_received` of ``"hidden"``), which limits what the data party's tail,
    and so the returned gradient, depends on; ``both`` uses both. HT has no data-party tail, so
    ``tail`` and ``both`` are refused there (the bottleneck would never train).

    Privacy: no formal guarantee; the KL term bounds the mutual information between a token's
    activation and what crosses (Alemi et al. 2017), traded against the task loss by ``weight``.

    Parameters
    ----------
    hidden_size : int
        Width of the activations (the run fills it in from the model).
    bottleneck : int, default 64
        Width of the stochastic code.
    weight : float, default 1e-3
        λ, the weight of the KL term.
    where : {"head", "tail", "both"}, default "head"
    sample_at_eval : bool, default False
        Also sample the code in evaluation and generation (otherwise its mean).
    init : {"pca", "random"}, default "pca"
        ``pca``: each bottleneck starts as the PCA autoencoder of the first batch it sees (see
        :class:`Bottleneck`), so the task starts from the undefended model and the KL term then
        trades information away; ``random``: PyTorch's default initialization.
    init_logvar : float, default -4.0
        Starting ``log σ²`` of the code under ``init: pca`` (the code's mean has unit variance).
    """

    name = "mid"

    class Params(BaseModel):
        """Parameters of :class:`MID` (validated from the YAML)."""

        model_config = ConfigDict(extra="forbid")
        hidden_size: int = Field(gt=0, description="width of the activations (filled in by the run)")
        bottleneck: int = Field(64, gt=0, le=65536, description="width of the stochastic code")
        weight: float = Field(1e-3, ge=0.0, description="lambda, weight of the KL term")
        where: Literal["head", "tail", "both"] = Field(
            "head", description="outgoing activations, the tail's input (HBT), or both"
        )
        sample_at_eval: bool = Field(
            False, description="sample the code in eval/generate too (else its mean)"
        )
        init: Literal["pca", "random"] = Field(
            "pca", description="fit the bottleneck to the first batch's principal directions, or random"
        )
        init_logvar: float = Field(
            -4.0, ge=-20.0, le=5.0, description="starting log variance of the code (pca)"
        )

    def __init__(
        self,
        hidden_size: int,
        bottleneck: int = 64,
        weight: float = 1e-3,
        where: Literal["head", "tail", "both"] = "head",
        sample_at_eval: bool = False,
        init: Literal["pca", "random"] = "pca",
        init_logvar: float = -4.0,
    ) -> None:
        nn.Module.__init__(self)
        params = self.Params(
            hidden_size=hidden_size,
            bottleneck=bottleneck,
            weight=weight,
            where=where,
            sample_at_eval=sample_at_eval,
            init=init,
            init_logvar=init_logvar,
        )
        self.weight, self.where, self.sample_at_eval = params.weight, params.where, params.sample_at_eval
        made = (hidden_size, bottleneck, params.init, params.init_logvar)
        self.head_bottleneck = Bottleneck(*made) if where != "tail" else None
        self.tail_bottleneck = Bottleneck(*made) if where != "head" else None
        if where != "head":
            # In HT the tail's bottleneck would see nothing and never train: the front refuses HT.
            self.needs_tail = (
                f"mid where: {where} puts a bottleneck at the data party's tail input (split.setting: hbt); "
                "in HT use where: head"
            )

    def _through(
        self, bottleneck: Bottleneck, x: torch.Tensor, context: FrontContext
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        train = context.phase == "train"
        mask = real_token_mask(context, x)
        if not bool(bottleneck.fitted):
            bottleneck.fit(x, mask)  # the data party's own batch: nothing of it crosses
        out, kl = bottleneck(x, sample=train or self.sample_at_eval)
        if not train:
            return out
        mask = mask.to(kl.dtype)
        return out, self.weight * (kl * mask).sum() / mask.sum().clamp_min(1.0)

    def on_loaded(self) -> None:
        for bottleneck in (self.head_bottleneck, self.tail_bottleneck):
            if bottleneck is not None:
                bottleneck.fitted.fill_(True)  # trained parameters, not to be refitted

    def received_parameters(self) -> list[nn.Parameter]:
        # The tail's bottleneck trains from the data party's loss: no returned gradient needed.
        if self.tail_bottleneck is None:
            return []
        return [p for p in self.tail_bottleneck.parameters() if p.requires_grad]

    def on_activations(
        self, hidden: torch.Tensor, context: FrontContext
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.head_bottleneck is None:
            return hidden
        return self._through(self.head_bottleneck, hidden, context)

    def on_received(
        self, name: str, tensor: torch.Tensor, context: FrontContext
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.tail_bottleneck is None or name != "hidden":
            return tensor
        return self._through(self.tail_bottleneck, tensor, context)
