"""One client's local update: train the adapters from the global state, return the delta.

The same code serves the in-process simulation (:mod:`splitfed.federated.simulation`) and any
deployment: it knows the trainable parameters, a loss over a batch of example indices and the
round's :class:`~splitfed.federated.strategies.base.FitConfig`, nothing about the server, the
other clients or the aggregator.

A client keeps nothing between rounds: its optimizer is created at the start of each local update
and dropped at its end (Adam's moments restart every round, as in FedAvg, FedProx and FedOpt's
client side), and its batches and dropout derive from ``(seed, round, client)``, so an update is
reproducible (a resumed run repeats it exactly) without saving any client state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from splitfed.federated.strategies.base import FitConfig


@dataclass
class ClientUpdate:
    """What a client's local update produced.

    Parameters
    ----------
    delta : dict[str, torch.Tensor]
        Local minus starting adapters, float32, by parameter name.
    num_examples : int
        The client's training examples: its FedAvg weight.
    loss : float
        Mean task loss over the local steps (without FedProx's proximal term).
    steps : int
        Local optimizer steps taken.
    """

    delta: dict[str, torch.Tensor]
    num_examples: int
    loss: float
    steps: int


def client_seed(seed: int, round_id: int, client: int) -> int:
    """A 63-bit seed for one client's round, independent across ``(seed, round_id, client)``."""
    state = np.random.SeedSequence([seed % 2**63, round_id, client]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def local_batches(num_examples: int, fit: FitConfig, *, seed: int) -> Iterator[list[int]]:
    """Batches of the client's example indices (0-based) for one local update.

    Each pass over the data is a fresh permutation cut into batches of ``fit.batch_size`` (the last
    one smaller, so small clients use all their examples). ``local_steps`` batches are taken from
    consecutive passes; ``local_epochs`` takes ``round(local_epochs * batches per pass)``, at least 1.
    """
    if num_examples < 1:
        raise ValueError("a client needs at least one training example")
    size = min(fit.batch_size, num_examples)
    per_pass = math.ceil(num_examples / size)
    if fit.local_steps is not None:
        total = fit.local_steps
    else:
        assert fit.local_epochs is not None
        total = max(1, round(fit.local_epochs * per_pass))
    generator = torch.Generator().manual_seed(seed)
    produced = 0
    while produced < total:
        order = torch.randperm(num_examples, generator=generator).tolist()
        for start in range(0, num_examples, size):
            if produced == total:
                return
            yield order[start : start + size]
            produced += 1


def proximal_term(
    params: Mapping[str, nn.Parameter], reference: Mapping[str, torch.Tensor], mu: float
) -> torch.Tensor:
    """FedProx's ``mu / 2 * sum ||w - w_ref||^2`` over the trainable parameters."""
    total = torch.zeros((), dtype=torch.float32)
    for name, p in params.items():
        total = total + (p.float() - reference[name].float()).pow(2).sum()
    return 0.5 * mu * total


def _optimizer(params: Sequence[nn.Parameter], fit: FitConfig) -> torch.optim.Optimizer:
    if fit.optimizer == "sgd":
        return torch.optim.SGD(params, lr=fit.lr, weight_decay=fit.weight_decay)
    return torch.optim.AdamW(params, lr=fit.lr, weight_decay=fit.weight_decay)


def local_update(
    params: Mapping[str, nn.Parameter],
    *,
    loss_fn: Callable[[list[int]], torch.Tensor],
    num_examples: int,
    fit: FitConfig,
    seed: int,
) -> ClientUpdate:
    """Train ``params`` on the client's data for one round and return the delta.

    Parameters
    ----------
    params : Mapping[str, nn.Parameter]
        The trainable parameters (LoRA and task head), already holding the global state.
    loss_fn : Callable[[list[int]], torch.Tensor]
        The task loss of a batch of the client's example indices (runs the model forward).
    num_examples : int
        How many training examples the client holds.
    fit : FitConfig
        This round's client configuration.
    seed : int
        Seeds the batches and the dropout (see :func:`client_seed`).

    Returns
    -------
    ClientUpdate
        The delta is taken against the parameters as they were on entry; ``params`` end up
        holding the local model (the caller loads the next global state).
    """
    names = list(params)
    trainable = [params[n] for n in names]
    start = {n: params[n].detach().clone() for n in names}
    optimizer = _optimizer(trainable, fit)
    torch.manual_seed(seed)
    losses = []
    for batch in local_batches(num_examples, fit, seed=seed):
        loss = loss_fn(batch)
        objective = loss if fit.proximal_mu is None else loss + proximal_term(params, start, fit.proximal_mu)
        objective.backward()
        if fit.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable, fit.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    delta = {n: params[n].detach().float() - start[n].float() for n in names}
    return ClientUpdate(delta, num_examples, float(np.mean(losses)), len(losses))
