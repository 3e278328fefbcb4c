"""FedAdam (Reddi et al., 2021, "Adaptive Federated Optimization"): FedOpt with Adam's second
moment on the server, ``v = beta_2 * v + (1 - beta_2) * delta ** 2``."""

from __future__ import annotations

import torch

from splitfed.federated.strategies.fedopt import FedOpt


class FedAdam(FedOpt):
    """Adam on the server over the average client delta.

    Parameters
    ----------
    eta : float, default 1e-2
    beta_1 : float, default 0.9
    beta_2 : float, default 0.99
    tau : float, default 1e-3
        See :class:`~splitfed.federated.strategies.fedopt.FedOpt`.
    """

    name = "fedadam"

    def second_moment(self, v: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
        """Exponential moving average of the squared delta."""
        return self.beta_2 * v + (1 - self.beta_2) * squared
