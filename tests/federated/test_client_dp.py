"""Client-level DP (DP-FedAvg with distributed noise): clipping, noise shares, ε every round."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from splitfed.config import ConfigError, parse_config
from splitfed.federated.client_dp import ClientDP, clip_update
from splitfed.federated.simulation import FederatedSimulation, fedtrain
from splitfed.privacy.accounting import RDPAccountant
from splitfed.run import prepare
from tiny import run_config, save_tiny_pretrained, write_topic_csv

FED = {"clients": 4, "rounds": 3, "local_steps": 1, "sample_fraction": 0.5}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("client-dp")
    save_tiny_pretrained(root / "model")
    write_topic_csv(root / "data.csv")
    return root


def test_an_update_is_clipped_as_a_whole_and_the_shares_sum_to_the_round_s_noise() -> None:
    delta = {"a": torch.full((3,), 2.0), "b": torch.full((4,), 2.0)}  # norm sqrt(7 * 4)
    clipped, norm = clip_update(delta, 1.0)
    assert norm == pytest.approx(math.sqrt(28))
    total = math.sqrt(sum(float(t.pow(2).sum()) for t in clipped.values()))
    assert total == pytest.approx(1.0) and torch.allclose(clipped["a"] / clipped["b"][:3], torch.ones(3))
    small, _ = clip_update({"a": torch.tensor([0.1])}, 1.0)
    assert torch.equal(small["a"], torch.tensor([0.1]))  # under the bound: unchanged
    dp = ClientDP(clip=1.0, noise_multiplier=2.0, clients_per_round=4, sample_rate=0.5)
    g = torch.Generator().manual_seed(0)
    zero = {"w": torch.zeros(20_000)}
    summed = sum(dp.privatize(zero, g)[0]["w"] for _ in range(4))
    assert float(summed.std()) == pytest.approx(2.0 * 1.0, rel=0.03)  # z * C on the sum of 4 shares


def test_a_private_fedtrain_reports_epsilon_every_round_and_averages_clipped_updates(root: Path) -> None:
    raw = run_config(root, "dp", federated=FED | {"dp": {"clip": 0.01, "noise_multiplier": 1.0}})
    result = fedtrain(parse_config(raw), progress=False, log=lambda s: None)
    accountant = RDPAccountant(2 / 4, 1.0)
    assert [h["dp_epsilon"] for h in result.history] == pytest.approx(
        [accountant.epsilon(r, 1e-5) for r in (1, 2, 3)]
    )
    assert all(h["dp_clipped"] == 1.0 for h in result.history)  # a bound of 0.01 clips every update
    # Without noise, the round's average is the uniform mean of the clipped updates.
    raw = run_config(
        root, "dp0", federated=FED | {"rounds": 1, "dp": {"clip": 0.01, "noise_multiplier": 0.0}}
    )
    sim = FederatedSimulation(prepare(parse_config(raw), log=lambda s: None), log=lambda s: None)
    before = {k: v.clone() for k, v in sim.global_state.items()}
    sim.run_round(1)
    moved = math.sqrt(sum(float((sim.global_state[k] - before[k]).double().pow(2).sum()) for k in before))
    assert 0 < moved <= 0.01 + 1e-6  # FedAvg applies the mean of updates of norm <= clip


def test_client_dp_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="clip"):
        parse_config(run_config(Path("."), "x", federated=FED | {"dp": {"clip": 0, "noise_multiplier": 1.0}}))
    with pytest.raises(ConfigError, match="noise_multiplier"):
        parse_config(run_config(Path("."), "x", federated=FED | {"dp": {"clip": 1.0}}))


def test_client_dp_composes_with_secure_aggregation(root: Path) -> None:
    fed = FED | {"rounds": 1, "aggregation": "secagg", "dp": {"clip": 0.05, "noise_multiplier": 0.5}}
    result = fedtrain(
        parse_config(run_config(root, "dp-secagg", federated=fed)), progress=False, log=lambda s: None
    )
    assert result.history[0]["clients"] == 2 and result.history[0]["dp_epsilon"] > 0
