"""Client-level differential privacy for federated LoRA: clip each client's update, add Gaussian noise.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models",
ICLR): each sampled client's update (its whole delta, all tensors together) is clipped to L2
norm ``C`` and the server averages the clipped updates uniformly; Gaussian noise of standard
deviation ``z·C`` on their sum makes each round a sampled Gaussian mechanism with noise
multiplier ``z`` with respect to one client's whole data, and the RDP accountant
(:mod:`splitfed.privacy.accounting`) gives ε at δ after every round, with sampling rate
``clients per round / clients``.

The noise is added by the clients, in shares: each of the ``m`` clients of a round adds
``N(0, z²C²/m)`` before encoding, so the sum carries ``N(0, z²C²)`` and no party needs to be
trusted to add it (distributed DP, as in Kairouz et al. 2021, "The Distributed Discrete Gaussian
Mechanism for Federated Learning with Secure Aggregation", ICML, with continuous Gaussian
shares). Against the server, the guarantee holds with blind aggregation (``secagg``, ``ckks``),
where it sees only the sum; with ``plain`` it sees every update, each protected only by its own
share (noise multiplier ``z/√m``). A client that drops out of a round removes its share (the
round's noise is then a little smaller than intended). The accountant assumes Poisson sampling
of clients; rounds sample a fixed number uniformly, as DP-FedAvg's analysis does too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from splitfed.privacy.accounting import RDPAccountant


def clip_update(delta: Mapping[str, torch.Tensor], clip: float) -> tuple[dict[str, torch.Tensor], float]:
    """``delta`` scaled to L2 norm at most ``clip`` (over all tensors together), and its norm before."""
    norm = math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in delta.values()))
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: t.detach().float() * factor for k, t in delta.items()}, norm


class ClientDP:
    """Clipping, a noise share and the accountant of DP-FedAvg with distributed noise.

    Parameters
    ----------
    clip : float
        ``C``: the L2 bound of one client's update.
    noise_multiplier : float
        ``z``: the round's total noise is ``N(0, z²C²)`` on the sum of the clipped updates.
    clients_per_round : int
        ``m``: each client adds a share ``N(0, z²C²/m)``.
    sample_rate : float
        Clients per round over all clients (the accountant's ``q``).
    delta : float, default 1e-5
    """

    def __init__(
        self,
        clip: float,
        noise_multiplier: float,
        clients_per_round: int,
        sample_rate: float,
        delta: float = 1e-5,
    ) -> None:
        if clip <= 0 or noise_multiplier < 0 or clients_per_round < 1:
            raise ValueError(
                f"client DP needs clip > 0, noise_multiplier >= 0 and clients_per_round >= 1; got "
                f"{clip}, {noise_multiplier}, {clients_per_round}"
            )
        self.clip, self.noise_multiplier, self.delta = float(clip), float(noise_multiplier), float(delta)
        self.share_std = self.noise_multiplier * self.clip / math.sqrt(clients_per_round)
        self.accountant = RDPAccountant(sample_rate, noise_multiplier)

    def privatize(
        self, delta: Mapping[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> tuple[dict[str, torch.Tensor], float]:
        """One client's clipped update plus its noise share, and the update's norm before clipping."""
        clipped, norm = clip_update(delta, self.clip)
        if self.share_std > 0:
            clipped = {
                k: t + self.share_std * torch.randn(t.shape, generator=generator, dtype=t.dtype)
                for k, t in clipped.items()
            }
        return clipped, norm

    def epsilon(self, rounds: int) -> float:
        """ε after ``rounds`` rounds at :attr:`delta` (``inf`` without noise)."""
        return self.accountant.epsilon(rounds, self.delta)
