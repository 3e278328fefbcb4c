"""Adversarial training against an inversion adversary that the data party simulates and trains.

The adversarial-learning defense of Li, Baldwin & Cohn 2018 ("Towards Robust and
Privacy-preserving Text Representations", ACL), Xiao et al. 2020 ("Adversarial Learning of
Privacy-Preserving and Task-Oriented Representations", AAAI) and Song & Raghunathan 2020
("Information Leakage in Embedding Models", CCS), as VFLAIR-LLM applies it to split LLMs: a
simulated inverter learns to recover the input tokens from what crosses, and the head learns to
make it fail.

The inverter and its optimizer are state outside the data party's trainable parameters: adapter
files do not hold them (the adversary is a training device, not part of the model), the data
party's checkpoint does (:meth:`AdversarialTraining.extra_state`), so ``--resume`` continues the
same adversary.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.func import functional_call

from splitfed.privacy.defenses._tokens import not_set_up, real_token_mask, require_input_ids
from splitfed.split.front import Defense, FrontContext, FrontResources


def _token_cross_entropy(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting ``ids`` over the real tokens of ``mask``."""
    per_token = F.cross_entropy(logits.flatten(0, -2).float(), ids.reshape(-1), reduction="none")
    weights = mask.reshape(-1).float()
    return (per_token * weights).sum() / weights.sum().clamp_min(1.0)


class AdversarialTraining(Defense, nn.Module):
    """A simulated inverter predicts the input tokens from the activations; the head learns to foil it.

    In every training micro-batch:

    * the **inverter** (``linear``: ``hidden -> vocab``; ``mlp``: ``hidden -> width -> vocab``)
      computes its cross-entropy ``CE_adv`` of predicting ``FrontContext.input_ids`` from the
      *detached* outgoing activations, over real tokens, and accumulates its gradient; at each
      optimizer-update boundary (:meth:`on_update`) its **own** Adam optimizer steps (``lr``);
    * the **head** gets the auxiliary loss ``-weight · CE`` of the inverter applied to the live
      activations with the inverter *frozen*, so this loss moves only the head.

    The inverter's parameters never join the data party's optimizer: they keep
    ``requires_grad=False`` (the data party collects only trainable parameters, and the head's
    backward pass leaves them alone), and the inverter's own gradient is computed on detached
    copies (:func:`torch.func.functional_call`) and written to their ``.grad``. So they are also
    not in adapter files or checkpoints: a resumed run restarts the inverter.

    The vocabulary size comes from the model (:meth:`setup`). ``-CE`` is unbounded below: keep
    ``weight`` small against the task loss. With a frozen head nothing trains the head, and the
    inverter only measures what an adversary of this capacity recovers (:attr:`losses`).
    There is no formal privacy guarantee.

    Parameters
    ----------
    hidden_size : int
        Width of the activations (the run fills it in from the model).
    weight : float, default 0.1
        λ, the weight of the adversary's loss in the head's loss (with a minus sign).
    lr : float, default 1e-3
        The inverter's Adam learning rate.
    inverter : {"linear", "mlp"}, default "linear"
    inverter_width : int, default 256
        ``mlp``: width of its hidden layer.
    """

    name = "adversarial"

    class Params(BaseModel):
        """Parameters of :class:`AdversarialTraining` (validated from the YAML)."""

        model_config = ConfigDict(extra="forbid")
        hidden_size: int = Field(gt=0, description="width of the activations (filled in by the run)")
        weight: float = Field(0.1, ge=0.0, description="lambda: the head's loss gets -lambda * inverter CE")
        lr: float = Field(1e-3, gt=0.0, le=10.0, description="learning rate of the inverter's own Adam")
        inverter: Literal["linear", "mlp"] = Field("linear", description="the simulated inverter's shape")
        inverter_width: int = Field(256, gt=0, le=65536, description="mlp: width of its hidden layer")

    def __init__(
        self,
        hidden_size: int,
        weight: float = 0.1,
        lr: float = 1e-3,
        inverter: Literal["linear", "mlp"] = "linear",
        inverter_width: int = 256,
    ) -> None:
        nn.Module.__init__(self)
        params = self.Params(
            hidden_size=hidden_size, weight=weight, lr=lr, inverter=inverter, inverter_width=inverter_width
        )
        self.hidden_size, self.weight, self.lr = params.hidden_size, params.weight, params.lr
        self.kind, self.width = params.inverter, params.inverter_width
        #: Built in :meth:`setup`, once the vocabulary size is known.
        self.inverter: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        #: The inverter's cross-entropy at each of its updates (the adversary's learning curve).
        self.losses: list[float] = []
        self._pending: float | None = None

    def setup(self, resources: FrontResources) -> None:
        vocab = int(resources.embedding_matrix.shape[0])
        if self.kind == "linear":
            inverter: nn.Module = nn.Linear(self.hidden_size, vocab)
        else:
            inverter = nn.Sequential(
                nn.Linear(self.hidden_size, self.width), nn.GELU(), nn.Linear(self.width, vocab)
            )
        inverter.requires_grad_(False)  # never one of the data party's trainable parameters
        self.inverter = inverter
        self.optimizer = torch.optim.Adam(inverter.parameters(), lr=self.lr)

    def _inverter(self, like: torch.Tensor) -> nn.Module:
        if self.inverter is None:
            raise not_set_up(self.name, "the vocabulary size")
        first = next(self.inverter.parameters())
        if first.device != like.device:
            self.inverter.to(like.device)
        return self.inverter

    def on_activations(
        self, hidden: torch.Tensor, context: FrontContext
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if context.phase != "train":
            return hidden
        inverter = self._inverter(hidden)
        ids = require_input_ids(self.name, context).to(hidden.device)
        mask = real_token_mask(context, hidden)
        dtype = next(inverter.parameters()).dtype

        # The adversary's step: its own graph, on detached activations and live copies of its weights.
        params = dict(inverter.named_parameters())
        live = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        with torch.enable_grad():
            logits = functional_call(inverter, live, (hidden.detach().to(dtype),))
            ce = _token_cross_entropy(logits, ids, mask)
            grads = torch.autograd.grad(ce * context.loss_scale, list(live.values()))
        for p, g in zip(params.values(), grads, strict=True):
            p.grad = g if p.grad is None else p.grad + g
        self._pending = (self._pending or 0.0) + float(ce.detach()) * context.loss_scale

        # The head's part: the same loss through the frozen inverter, with the opposite sign.
        if self.weight == 0 or not hidden.requires_grad:
            return hidden
        head_ce = _token_cross_entropy(inverter(hidden.to(dtype)), ids, mask)
        return hidden, -self.weight * head_ce

    def extra_state(self) -> dict[str, Any]:
        if self.inverter is None or self.optimizer is None:
            return {}
        return {
            "inverter": {k: v.detach().clone() for k, v in self.inverter.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "losses": list(self.losses),
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self.inverter is None or self.optimizer is None:
            raise not_set_up(self.name, "the inverter")
        self.inverter.load_state_dict(state["inverter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.losses = [float(x) for x in state.get("losses", [])]

    def on_update(self, context: FrontContext) -> None:
        if self.optimizer is None or self._pending is None:
            return
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(self._pending)
        self._pending = None
