"""Server strategies: FedAvg's step, FedProx's client config, FedAdam's and FedYogi's update rules
against a hand computation (Reddi et al., 2021, Algorithm 2), and their checkpointed state."""

import math

import pytest
import torch

from splitfed.federated.strategies import STRATEGIES, FedAdam, FedAvg, FedProx, FedYogi, FitConfig

BASE = FitConfig(
    local_steps=3,
    local_epochs=None,
    batch_size=4,
    optimizer="adamw",
    lr=1e-3,
    weight_decay=0.0,
    max_grad_norm=1.0,
)


def _state() -> dict[str, torch.Tensor]:
    return {"a": torch.tensor([0.5, -1.0, 2.0]), "b": torch.tensor([[0.25, 0.0]])}


DELTAS = [
    {"a": torch.tensor([0.1, -0.2, 0.0]), "b": torch.tensor([[0.05, -0.3]])},
    {"a": torch.tensor([-0.3, 0.1, 0.02]), "b": torch.tensor([[0.0, 0.4]])},
    {"a": torch.tensor([0.2, 0.2, -0.01]), "b": torch.tensor([[-0.1, 0.1]])},
]


def test_registry_names_every_strategy():
    assert set(STRATEGIES) == {"fedavg", "fedprox", "fedadam", "fedyogi"}
    assert all(cls.name == name for name, cls in STRATEGIES.items())
    assert not FedAvg.server_state and not FedProx.server_state
    assert FedAdam.server_state and FedYogi.server_state


def test_fedavg_adds_the_average_scaled_by_the_server_lr_and_keeps_unheld_tensors():
    x = _state()
    out = FedAvg(server_lr=0.5).apply(x, {"a": DELTAS[0]["a"]}, 1)
    assert torch.allclose(out["a"], x["a"] + 0.5 * DELTAS[0]["a"])
    assert torch.equal(out["b"], x["b"]) and out["b"] is not x["b"]
    assert torch.equal(x["a"], _state()["a"])  # the input is not modified


def test_fedprox_changes_only_the_client_config():
    prox = FedProx(proximal_mu=0.1)
    fit = prox.configure_fit(3, BASE)
    assert fit.proximal_mu == 0.1 and fit.local_steps == BASE.local_steps and fit.lr == BASE.lr
    assert FedAvg().configure_fit(3, BASE) is BASE and BASE.proximal_mu is None
    x = _state()
    assert all(torch.equal(prox.apply(x, DELTAS[0], 1)[k], FedAvg().apply(x, DELTAS[0], 1)[k]) for k in x)
    with pytest.raises(ValueError, match="proximal_mu"):
        FedProx(proximal_mu=-1.0)


def _hand_fedopt(
    kind: str, rounds: int, *, eta: float, b1: float, b2: float, tau: float
) -> dict[str, list[float]]:
    """Algorithm 2 of Reddi et al. element by element, in Python floats."""
    x = {k: v.flatten().tolist() for k, v in _state().items()}
    m = {k: [0.0] * len(v) for k, v in x.items()}
    v = {k: [tau**2] * len(x[k]) for k in x}
    for t in range(rounds):
        for k in x:
            for i, d in enumerate(DELTAS[t][k].flatten().tolist()):
                m[k][i] = b1 * m[k][i] + (1 - b1) * d
                if kind == "adam":
                    v[k][i] = b2 * v[k][i] + (1 - b2) * d * d
                else:
                    sign = (v[k][i] > d * d) - (v[k][i] < d * d)
                    v[k][i] = v[k][i] - (1 - b2) * d * d * sign
                x[k][i] = x[k][i] + eta * m[k][i] / (math.sqrt(v[k][i]) + tau)
    return x


@pytest.mark.parametrize(("cls", "kind"), [(FedAdam, "adam"), (FedYogi, "yogi")])
def test_server_optimizer_matches_the_hand_computed_update_rule(cls, kind):
    settings = {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.9, "tau": 1e-2}
    strategy = cls(**settings)
    x = _state()
    for t in range(3):
        x = strategy.apply(x, DELTAS[t], t + 1)
    expected = _hand_fedopt(kind, 3, eta=0.05, b1=0.8, b2=0.9, tau=1e-2)
    for k in x:
        assert x[k].flatten().tolist() == pytest.approx(expected[k], abs=1e-6)


def test_yogi_and_adam_differ_once_the_second_moment_exceeds_the_squared_delta():
    adam, yogi = FedAdam(beta_2=0.5), FedYogi(beta_2=0.5)
    xa = xy = _state()
    for t in range(3):
        xa, xy = adam.apply(xa, DELTAS[t], t + 1), yogi.apply(xy, DELTAS[t], t + 1)
    assert not torch.allclose(adam.v["a"], yogi.v["a"])
    assert not torch.allclose(xa["a"], xy["a"])


@pytest.mark.parametrize("cls", [FedAdam, FedYogi])
def test_moments_are_server_state_that_a_checkpoint_restores(cls):
    straight = cls()
    x = _state()
    for t in range(3):
        x = straight.apply(x, DELTAS[t], t + 1)
    first = cls()
    y = first.apply(first.apply(_state(), DELTAS[0], 1), DELTAS[1], 2)
    resumed = cls()
    resumed.load_state_dict(first.state_dict())
    y = resumed.apply(y, DELTAS[2], 3)
    assert all(torch.equal(x[k], y[k]) for k in x)
    assert cls().state_dict() == {"m": {}, "v": {}}


def test_bad_server_settings_are_refused():
    with pytest.raises(ValueError, match="beta_1"):
        FedAdam(beta_1=1.0)
    with pytest.raises(ValueError, match="server_lr"):
        FedAvg(server_lr=0.0)
    with pytest.raises(ValueError, match="exactly one"):
        FitConfig(3, 1.0, 4, "sgd", 0.1, 0.0, None)
