"""FedOpt (Reddi et al., 2021, "Adaptive Federated Optimization", Algorithm 2): the server treats
the round's average client delta as a pseudo-gradient and feeds it to an adaptive optimizer.

For every tensor, with ``delta`` the sample-weighted average of the client deltas::

    m = beta_1 * m + (1 - beta_1) * delta
    v = second_moment(v, delta ** 2)          # FedAdam, FedYogi: see their modules
    x = x + eta * m / (sqrt(v) + tau)

with ``m`` starting at 0 and ``v`` at ``tau ** 2`` (the paper's ``v_{-1} >= tau^2``) and no bias
correction, as in the paper. ``m`` and ``v`` are the server's state: they live on the server only
(clients are stateless between rounds) and go into the run's checkpoints.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

import torch

from splitfed.federated.strategies.base import Strategy


class FedOpt(Strategy):
    """The shared mechanics of FedAdam and FedYogi; subclasses define the second moment.

    Parameters
    ----------
    eta : float, default 1e-2
        Server learning rate.
    beta_1 : float, default 0.9
        First-moment decay.
    beta_2 : float, default 0.99
        Second-moment decay.
    tau : float, default 1e-3
        Adaptivity: the smallest denominator (and ``sqrt`` of the initial second moment).
    """

    server_state = True

    def __init__(
        self, *, eta: float = 1e-2, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3
    ) -> None:
        if not (eta > 0 and tau > 0 and 0 <= beta_1 < 1 and 0 <= beta_2 < 1):
            raise ValueError(
                f"{self.name}: needs eta > 0, tau > 0 and beta_1, beta_2 in [0, 1); got eta={eta}, tau={tau}, "
                f"beta_1={beta_1}, beta_2={beta_2}"
            )
        self.eta, self.beta_1, self.beta_2, self.tau = float(eta), float(beta_1), float(beta_2), float(tau)
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    @abstractmethod
    def second_moment(self, v: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
        """The new second moment from the previous one and the squared delta."""

    def apply(
        self, global_state: Mapping[str, torch.Tensor], average: Mapping[str, torch.Tensor], round_id: int
    ) -> dict[str, torch.Tensor]:
        """One server-optimizer step on every tensor some client held this round."""
        out = {}
        for name, x in global_state.items():
            delta = average.get(name)
            if delta is None:
                out[name] = x.clone()
                continue
            delta = delta.to(x.dtype)
            m = self.m.get(name, torch.zeros_like(x))
            v = self.v.get(name, torch.full_like(x, self.tau**2))
            m = self.beta_1 * m + (1 - self.beta_1) * delta
            v = self.second_moment(v, delta * delta)
            self.m[name], self.v[name] = m, v
            out[name] = x + self.eta * m / (v.sqrt() + self.tau)
        return out

    def hyperparameters(self) -> dict[str, float]:
        """``eta``, ``beta_1``, ``beta_2`` and ``tau``."""
        return {"eta": self.eta, "beta_1": self.beta_1, "beta_2": self.beta_2, "tau": self.tau}

    def state_dict(self) -> dict[str, Any]:
        """The moments, by parameter name."""
        return {"m": dict(self.m), "v": dict(self.v)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the moments."""
        self.m = {k: v.clone() for k, v in state.get("m", {}).items()}
        self.v = {k: v.clone() for k, v in state.get("v", {}).items()}
