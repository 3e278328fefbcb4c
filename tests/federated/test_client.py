"""A client's local update: its batches, FedProx's proximal term, and the server's client sampling."""

import pytest
import torch

from splitfed.config import parse_config
from splitfed.federated.client import client_seed, local_batches, local_update, proximal_term
from splitfed.federated.simulation import sample_clients
from splitfed.federated.strategies import FitConfig


def _fit(**kw) -> FitConfig:
    base = {
        "local_steps": 5,
        "local_epochs": None,
        "batch_size": 4,
        "optimizer": "sgd",
        "lr": 0.1,
        "weight_decay": 0.0,
        "max_grad_norm": None,
    }
    return FitConfig(**(base | kw))


def test_local_steps_cycle_through_fresh_permutations():
    batches = list(local_batches(6, _fit(local_steps=5), seed=3))
    assert [len(b) for b in batches] == [4, 2, 4, 2, 4]
    assert sorted(batches[0] + batches[1]) == list(range(6)) == sorted(batches[2] + batches[3])
    assert batches == list(local_batches(6, _fit(local_steps=5), seed=3))
    assert batches != list(local_batches(6, _fit(local_steps=5), seed=4))


def test_local_epochs_and_clients_smaller_than_a_batch():
    assert len(list(local_batches(10, _fit(local_steps=None, local_epochs=2.0), seed=0))) == 6
    assert len(list(local_batches(10, _fit(local_steps=None, local_epochs=0.1), seed=0))) == 1
    assert list(map(sorted, local_batches(3, _fit(local_steps=2), seed=0))) == [[0, 1, 2]] * 2


def test_client_seeds_differ_across_rounds_and_clients():
    seeds = {client_seed(0, r, c) for r in range(1, 4) for c in range(50)}
    assert len(seeds) == 150 and client_seed(0, 1, 2) == client_seed(0, 1, 2)
    assert client_seed(1, 1, 2) != client_seed(0, 1, 2)


def test_proximal_term_gradient_pulls_towards_the_reference():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    ref = torch.tensor([0.5, 0.5])
    term = proximal_term({"w": w}, {"w": ref}, 0.3)
    term.backward()
    assert float(term.detach()) == pytest.approx(0.15 * (0.25 + 6.25))
    assert w.grad.tolist() == pytest.approx([0.3 * 0.5, 0.3 * -2.5])


def test_local_update_returns_the_delta_and_the_weight():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    data = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])

    def loss_fn(ids):
        return (data[ids] @ w).pow(2).mean()

    update = local_update({"w": w}, loss_fn=loss_fn, num_examples=3, fit=_fit(local_steps=2), seed=0)
    assert update.num_examples == 3 and update.steps == 2
    assert torch.allclose(update.delta["w"], w.detach() - torch.tensor([1.0, 2.0]))
    assert float(update.delta["w"].abs().sum()) > 0
    # the proximal term with mu = 0 changes nothing
    w2 = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    prox = local_update(
        {"w": w2},
        loss_fn=lambda ids: (data[ids] @ w2).pow(2).mean(),
        num_examples=3,
        fit=_fit(local_steps=2, proximal_mu=0.0),
        seed=0,
    )
    assert torch.equal(prox.delta["w"], update.delta["w"]) and prox.loss == update.loss


def test_sampling_is_deterministic_by_seed_and_sized_by_the_fraction():
    fed = parse_config({"federated": {"clients": 1000, "sample_fraction": 0.1}}).federated
    assert fed.clients_per_round == 100
    assert (
        parse_config({"federated": {"clients": 10, "sample_fraction": 0.29}}).federated.clients_per_round == 2
    )
    fed_min = parse_config({"federated": {"clients": 10, "sample_fraction": 0.1, "min_clients": 3}}).federated
    assert fed_min.clients_per_round == 3
    first = sample_clients(1000, 100, seed=0, round_id=1)
    assert len(first) == len(set(first)) == 100 and first == sorted(first)
    assert first == sample_clients(1000, 100, seed=0, round_id=1)
    assert first != sample_clients(1000, 100, seed=0, round_id=2)
    assert first != sample_clients(1000, 100, seed=1, round_id=1)
    assert sample_clients(5, 5, seed=0, round_id=1) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="cannot sample"):
        sample_clients(5, 6, seed=0, round_id=1)
