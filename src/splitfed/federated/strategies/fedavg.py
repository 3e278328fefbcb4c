"""FedAvg (McMahan et al., 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data"): clients train locally from the global model, the server averages their
updates weighted by their sample counts.

Here the average is of the clients' *deltas* (local minus global adapters), which is what blind
aggregators encrypt or mask; ``x + 1.0 * average delta`` is the sample-weighted average of the
client models. A server learning rate other than 1 gives the "FedAvg with server step size" of
Reddi et al. (2021), their FedOpt with plain SGD on the server.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from splitfed.federated.strategies.base import Strategy


class FedAvg(Strategy):
    """Sample-weighted federated averaging of LoRA deltas.

    Stateless, so it also runs behind CKKS: the clients decrypt the average and apply it.

    Parameters
    ----------
    server_lr : float, default 1.0
        Step size of the averaged delta (1.0: the new global is the clients' average).
    """

    name = "fedavg"

    def __init__(self, *, server_lr: float = 1.0) -> None:
        if not server_lr > 0:
            raise ValueError(f"{self.name}: server_lr must be positive, got {server_lr}")
        self.server_lr = float(server_lr)

    def apply(
        self, global_state: Mapping[str, torch.Tensor], average: Mapping[str, torch.Tensor], round_id: int
    ) -> dict[str, torch.Tensor]:
        """``x + server_lr * average`` per tensor."""
        out = {}
        for name, value in global_state.items():
            delta = average.get(name)
            out[name] = value.clone() if delta is None else value + self.server_lr * delta.to(value.dtype)
        return out

    def hyperparameters(self) -> dict[str, float]:
        """``server_lr``."""
        return {"server_lr": self.server_lr}
