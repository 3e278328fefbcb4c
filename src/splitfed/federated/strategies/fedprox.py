"""FedProx (Li et al., 2020, "Federated Optimization in Heterogeneous Networks"): FedAvg whose
clients add a proximal term ``mu / 2 * ||w - w_global||^2`` to their local loss, which keeps
local models near the global one when client data are heterogeneous (non-IID).

The server side is FedAvg's; only the clients' configuration changes (as Flower's FedProx, which
injects ``proximal-mu`` into the training config).
"""

from __future__ import annotations

import dataclasses

from splitfed.federated.strategies.base import FitConfig
from splitfed.federated.strategies.fedavg import FedAvg


class FedProx(FedAvg):
    """FedAvg with a proximal term in every client's local loss.

    Parameters
    ----------
    proximal_mu : float
        Weight ``mu`` of the proximal term (>= 0; 0 gives FedAvg's updates).
    server_lr : float, default 1.0
        As :class:`~splitfed.federated.strategies.fedavg.FedAvg`.
    """

    name = "fedprox"

    def __init__(self, *, proximal_mu: float, server_lr: float = 1.0) -> None:
        super().__init__(server_lr=server_lr)
        if not proximal_mu >= 0:
            raise ValueError(f"fedprox: proximal_mu must be >= 0, got {proximal_mu}")
        self.proximal_mu = float(proximal_mu)

    def configure_fit(self, round_id: int, base: FitConfig) -> FitConfig:
        """``base`` with the proximal term's ``mu``."""
        return dataclasses.replace(base, proximal_mu=self.proximal_mu)

    def hyperparameters(self) -> dict[str, float]:
        """``server_lr`` and ``proximal_mu``."""
        return super().hyperparameters() | {"proximal_mu": self.proximal_mu}
