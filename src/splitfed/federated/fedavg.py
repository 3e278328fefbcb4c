"""Federated averaging of data-party adapters (SplitLoRA: McMahan et al., 2017, applied to the heads).

Every K steps each data party sends its trainable head (and tail) parameters with its number of
training samples; once all expected parties of the round have sent theirs, each receives the
sample-weighted average. Parameters held by only some parties (heads of different depths) are
averaged over the parties that hold them.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch


class AggregationError(RuntimeError):
    """A round that cannot complete (inconsistent parties, timeout)."""


def weighted_average(
    contributions: list[tuple[Mapping[str, torch.Tensor], float]],
) -> dict[str, torch.Tensor]:
    """Per-name average of the tensors, weighted by each contribution's weight."""
    sums: dict[str, torch.Tensor] = {}
    weights: dict[str, float] = {}
    for tensors, weight in contributions:
        if weight <= 0:
            raise AggregationError(f"a contribution's weight must be positive, got {weight}")
        for name, tensor in tensors.items():
            value = tensor.detach().to(torch.float64) * weight
            if name in sums:
                if sums[name].shape != value.shape:
                    raise AggregationError(
                        f"parameter {name!r} has shape {tuple(value.shape)} in one party and "
                        f"{tuple(sums[name].shape)} in another"
                    )
                sums[name] += value
            else:
                sums[name] = value
            weights[name] = weights.get(name, 0.0) + weight
    dtypes = {name: t.dtype for tensors, _ in contributions for name, t in tensors.items()}
    return {name: (total / weights[name]).to(dtypes[name]) for name, total in sums.items()}


@dataclass
class _Round:
    expected: int
    contributions: dict[str, tuple[Mapping[str, torch.Tensor], float]] = field(default_factory=dict)
    result: dict[str, torch.Tensor] | None = None
    collected: int = 0


class RoundAggregator:
    """Collects one contribution per party per round and hands everyone the average.

    Thread-safe: each party's request blocks (up to ``timeout_s``) until the round is complete.

    Parameters
    ----------
    timeout_s : float, default 600
        How long a party waits for the others.
    """

    def __init__(self, timeout_s: float = 600.0) -> None:
        self.timeout_s = timeout_s
        self._rounds: dict[int, _Round] = {}
        self._cond = threading.Condition()
        self.completed = 0

    def contribute(
        self, round_id: int, client: str, tensors: Mapping[str, torch.Tensor], weight: float, expected: int
    ) -> dict[str, torch.Tensor]:
        """Add ``client``'s parameters to ``round_id`` and return the round's average once complete."""
        with self._cond:
            current = self._rounds.setdefault(round_id, _Round(expected))
            if current.expected != expected:
                raise AggregationError(
                    f"round {round_id}: this party expects {expected} parties, another said {current.expected}"
                )
            if client in current.contributions:
                raise AggregationError(f"round {round_id}: party {client!r} contributed twice")
            current.contributions[client] = (dict(tensors), float(weight))
            if len(current.contributions) == expected:
                current.result = weighted_average(list(current.contributions.values()))
                self.completed += 1
                self._cond.notify_all()
            elif not self._cond.wait_for(lambda: current.result is not None, timeout=self.timeout_s):
                arrived = len(current.contributions)
                del current.contributions[client]  # a later retry of this party can still complete the round
                raise AggregationError(
                    f"round {round_id} incomplete after {self.timeout_s:g} s: {arrived} of {expected} parties "
                    "contributed (a party finished early, died, or uses another fedavg_every or num_parties)"
                )
            assert current.result is not None
            current.collected += 1
            result = current.result
            if current.collected == expected:
                del self._rounds[round_id]
            return result
