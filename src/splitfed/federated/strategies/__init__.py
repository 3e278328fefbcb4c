"""Federated strategies: what the server does with the (blind) aggregate of the clients' deltas.

One algorithm per module, named after it: :mod:`.fedavg` (McMahan et al., 2017), :mod:`.fedprox`
(Li et al., 2020), :mod:`.fedadam` and :mod:`.fedyogi` (Reddi et al., 2021, on the shared
:mod:`.fedopt`). This registry maps the names a run's ``federated.strategy`` selects to the classes.
"""

from __future__ import annotations

from splitfed.federated.strategies.base import FitConfig, Strategy
from splitfed.federated.strategies.fedadam import FedAdam
from splitfed.federated.strategies.fedavg import FedAvg
from splitfed.federated.strategies.fedopt import FedOpt
from splitfed.federated.strategies.fedprox import FedProx
from splitfed.federated.strategies.fedyogi import FedYogi

#: Strategy classes by the name a run selects.
STRATEGIES: dict[str, type[Strategy]] = {
    FedAvg.name: FedAvg,
    FedProx.name: FedProx,
    FedAdam.name: FedAdam,
    FedYogi.name: FedYogi,
}

__all__ = ["STRATEGIES", "FedAdam", "FedAvg", "FedOpt", "FedProx", "FedYogi", "FitConfig", "Strategy"]
