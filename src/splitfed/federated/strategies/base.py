"""What every federated strategy shares: the per-round client configuration and the interface.

A strategy is what the server does around the (blind) aggregate, in two hooks (Flower's shape):

* :meth:`Strategy.configure_fit` says what each sampled client runs this round (local steps,
  learning rate, FedProx's proximal term);
* :meth:`Strategy.apply` turns the round's sample-weighted average of the client deltas into the
  next global adapters (FedAvg adds it; FedAdam and FedYogi feed it to a server optimizer).

The average itself comes out of an aggregator (:mod:`splitfed.federated.aggregators`): the
strategy never sees an individual client's update.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch


@dataclass(frozen=True)
class FitConfig:
    """What one client runs in one round (Flower's ``ConfigRecord`` for training).

    Parameters
    ----------
    local_steps : int | None
        Optimizer steps on the client's data; ``None``: ``local_epochs`` passes instead.
    local_epochs : float | None
        Passes over the client's data (used when ``local_steps`` is ``None``).
    batch_size : int
        Examples per step (a client with fewer examples uses all of them each step).
    optimizer : {"adamw", "sgd"}
        The client's optimizer, created afresh every round (no optimizer state persists on a
        client between rounds, so a client costs nothing while it is not training).
    lr : float
        The client's learning rate (constant within a round).
    weight_decay : float
    max_grad_norm : float | None
        Clip each local step's gradient norm (``None``: no clipping).
    proximal_mu : float | None, default None
        FedProx: add ``mu / 2 * ||w - w_global||^2`` to the local loss (``None``: no term; ``0.0``
        adds a zero term).
    """

    local_steps: int | None
    local_epochs: float | None
    batch_size: int
    optimizer: Literal["adamw", "sgd"]
    lr: float
    weight_decay: float
    max_grad_norm: float | None
    proximal_mu: float | None = None

    @classmethod
    def from_train(
        cls, train: Any, *, local_steps: int | None, local_epochs: float | None = None
    ) -> FitConfig:
        """A client's round with the optimizer settings of a run's ``train:`` section
        (:class:`~splitfed.config.TrainConfig`) and the given amount of local work."""
        return cls(
            local_steps=local_steps,
            local_epochs=local_epochs,
            batch_size=train.batch_size,
            optimizer=train.optimizer,
            lr=train.lr,
            weight_decay=train.weight_decay,
            max_grad_norm=train.max_grad_norm,
        )

    def __post_init__(self) -> None:
        if (self.local_steps is None) == (self.local_epochs is None):
            raise ValueError(
                f"FitConfig needs exactly one of local_steps and local_epochs, got {self.local_steps} and "
                f"{self.local_epochs}"
            )


class Strategy(ABC):
    """A server strategy: configures the clients' round and applies the aggregated delta.

    Subclasses implement :meth:`apply`; :meth:`configure_fit` passes the run's client
    configuration through unchanged unless a variant overrides it (FedProx).
    """

    #: The registry name (``STRATEGIES[name]``).
    name: ClassVar[str]
    #: Whether :meth:`apply` keeps state that only the server can hold (a server optimizer): such a
    #: strategy needs an aggregate the server can read, so it cannot run behind CKKS, where only
    #: the clients can decrypt.
    server_state: ClassVar[bool] = False

    def configure_fit(self, round_id: int, base: FitConfig) -> FitConfig:
        """What every sampled client runs in round ``round_id`` (1-based); by default ``base``."""
        return base

    @abstractmethod
    def apply(
        self, global_state: Mapping[str, torch.Tensor], average: Mapping[str, torch.Tensor], round_id: int
    ) -> dict[str, torch.Tensor]:
        """The next global adapters from the current ones and the round's average client delta.

        ``average`` may lack tensors no client held this round; those stay as they are. Returns
        new tensors (``global_state`` is not modified).
        """

    def hyperparameters(self) -> dict[str, float]:
        """The strategy's settings, for ``results.json``."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Server state to checkpoint (tensors and numbers only)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (nothing to restore by default)."""
        return None
