"""FedYogi (Reddi et al., 2021, "Adaptive Federated Optimization"; Yogi: Zaheer et al., 2018):
FedOpt whose second moment moves additively, ``v = v - (1 - beta_2) * delta ** 2 * sign(v -
delta ** 2)``, so it grows or shrinks by at most ``(1 - beta_2) * delta ** 2`` per round and
does not forget large past deltas as fast as Adam's moving average."""

from __future__ import annotations

import torch

from splitfed.federated.strategies.fedopt import FedOpt


class FedYogi(FedOpt):
    """Yogi on the server over the average client delta.

    Parameters
    ----------
    eta : float, default 1e-2
    beta_1 : float, default 0.9
    beta_2 : float, default 0.99
    tau : float, default 1e-3
        See :class:`~splitfed.federated.strategies.fedopt.FedOpt`.
    """

    name = "fedyogi"

    def second_moment(self, v: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
        """Yogi's additive, sign-controlled update of the second moment."""
        return v - (1 - self.beta_2) * squared * torch.sign(v - squared)
