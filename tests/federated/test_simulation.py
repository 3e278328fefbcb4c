"""The federated simulation on a tiny model: a round equals hand-computed FedAvg, the blind
aggregators give plain's adapters within their precision, FedProx(mu=0) is FedAvg, and the server
only ever holds payloads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from splitfed.config import parse_config
from splitfed.federated.client import client_seed, local_update
from splitfed.federated.simulation import FederatedSimulation
from splitfed.run import prepare
from splitfed.split.parties import INPUT_KEYS
from tiny import run_config, save_tiny_pretrained, write_topic_csv

FED = {"clients": 6, "rounds": 2, "local_steps": 2, "sample_fraction": 0.5, "partition": "dirichlet:0.5"}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fedsim")
    save_tiny_pretrained(root / "model")
    write_topic_csv(root / "data.csv")
    return root


def _sim(root: Path, **fed: object) -> FederatedSimulation:
    cfg = parse_config(run_config(root, "sim", federated=FED | fed))
    return FederatedSimulation(prepare(cfg, log=lambda s: None), log=lambda s: None)


def test_a_plain_round_equals_hand_computed_sample_weighted_fedavg(root: Path) -> None:
    sim = _sim(root, aggregation="plain")
    x0 = {n: t.clone() for n, t in sim.global_state.items()}
    record = sim.run_round(1)
    assert record["clients"] == 3 and len(record["sampled"]) == 3
    assert all(torch.equal(p.detach(), sim.global_state[n]) for n, p in sim.params.items())  # loaded
    task, fit = sim.work.task, sim.strategy.configure_fit(1, sim.base_fit)
    total = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in x0.items()}
    weight_sum = 0.0
    for index in record["sampled"]:  # each client again, by hand, from the same global state
        part = sim.parts[index]
        with torch.no_grad():
            for n, p in sim.params.items():
                p.copy_(x0[n])
        sim.segment.train()

        def loss_fn(ids, part=part):
            batch = task.collate([part[i] for i in ids])
            return task.loss(sim.segment(**{k: batch[k] for k in INPUT_KEYS if k in batch}), batch)

        update = local_update(
            sim.params, loss_fn=loss_fn, num_examples=len(part), fit=fit, seed=client_seed(0, 1, index)
        )
        for n in total:
            total[n] += len(part) * update.delta[n].double()
        weight_sum += len(part)
    for n, x in x0.items():
        expected = (x.double() + total[n] / weight_sum).float()
        assert torch.allclose(sim.global_state[n], expected, atol=1e-7), n
    assert any(not torch.equal(sim.global_state[n], x0[n]) for n in x0)
    assert set(sim.global_state) == set(sim.params) and any("score" in n for n in sim.params)
    assert all("lora_" in n or "score" in n for n in sim.params)


def _one_round(root: Path, **fed: object) -> tuple[FederatedSimulation, dict]:
    sim = _sim(root, **fed)
    return sim, sim.run_round(1)


def test_ckks_and_secagg_give_plain_adapters_within_their_precision(root: Path) -> None:
    plain, plain_record = _one_round(root, aggregation="plain")
    ckks, ckks_record = _one_round(root, aggregation="ckks")
    secagg, secagg_record = _one_round(root, aggregation="secagg", secagg={"rounding": "nearest"})
    for n, ref in plain.global_state.items():
        delta = (ref - _sim_x0(root)[n]).abs().max()
        assert (ckks.global_state[n] - ref).abs().max() <= 1e-7 + 1e-6 * delta, n
        assert (secagg.global_state[n] - ref).abs().max() <= 1e-5, n
    # the server held a keyless context; CKKS costs many times plain's bytes, secagg about the same
    assert not ckks.aggregation.server.holds_secret_key
    assert ckks_record["update_bytes"] > 10 * plain_record["update_bytes"]
    assert secagg_record["update_bytes"] <= 1.1 * plain_record["update_bytes"]
    assert ckks_record["setup_bytes_down"] > 0 and plain_record["setup_bytes_down"] == 0
    assert ckks_record["bytes_down"] > 2.5 * ckks_record["update_bytes"]  # the aggregate goes to each client


_X0: dict = {}


def _sim_x0(root: Path) -> dict[str, torch.Tensor]:
    if not _X0:
        _X0.update(_sim(root).global_state)
    return _X0


def test_fedprox_with_mu_zero_is_fedavg_and_a_large_mu_stays_near_the_global(root: Path) -> None:
    avg, prox0, prox = (
        _sim(root),
        _sim(root, strategy="fedprox", proximal_mu=0.0),
        _sim(root, strategy="fedprox", proximal_mu=50.0),
    )
    x0 = {n: t.clone() for n, t in avg.global_state.items()}
    for round_id in (1, 2):
        losses = [s.run_round(round_id)["train_loss"] for s in (avg, prox0, prox)]
    assert losses[0] == losses[1]
    assert all(torch.equal(avg.global_state[n], prox0.global_state[n]) for n in x0)

    def moved(sim):
        return sum(float((sim.global_state[n] - x0[n]).norm() ** 2) for n in x0)

    assert 0 < moved(prox) < moved(avg)


def test_sampling_fraction_picks_that_many_clients_deterministically_by_seed(root: Path) -> None:
    runs = {}
    for seed in (0, 0, 5):
        cfg = parse_config(
            run_config(
                root, "s", federated=FED | {"clients": 10, "sample_fraction": 0.3}, train={"seed": seed}
            )
        )
        sim = FederatedSimulation(prepare(cfg, log=lambda s: None), log=lambda s: None)
        runs.setdefault(seed, []).append([sim.run_round(r)["sampled"] for r in (1, 2)])
    assert all(len(s) == 3 for s in runs[0][0])
    assert runs[0][0] == runs[0][1] and runs[0][0][0] != runs[0][0][1]
    assert runs[5][0] != runs[0][0]


def test_fedadam_runs_behind_secagg_and_keeps_its_moments_on_the_server(root: Path) -> None:
    sim = _sim(root, strategy="fedadam", aggregation="secagg", server_lr=0.01)
    sim.run_round(1)
    state = sim.strategy.state_dict()
    assert set(state["m"]) == set(sim.global_state) and set(state["v"]) == set(sim.global_state)
