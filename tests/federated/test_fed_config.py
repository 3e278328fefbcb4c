"""The `federated:` section: defaults, and errors that name the key."""

import pytest

from splitfed.config import ConfigError, parse_config


def _fed(**fed):
    return parse_config({"federated": fed}).federated


def test_defaults_and_epochs_replacing_steps():
    assert parse_config({}).federated is None
    fed = _fed()
    assert (fed.strategy, fed.aggregation, fed.local_steps, fed.local_epochs) == ("fedavg", "plain", 10, None)
    assert fed.finetune.mode == "lora" and fed.strategy_kwargs() == {} and fed.aggregator_kwargs() == {}
    epochs = _fed(local_epochs=2)
    assert epochs.local_steps is None and epochs.local_epochs == 2


def test_strategy_and_aggregator_settings_pass_only_what_is_set():
    assert _fed(strategy="fedyogi", server_lr=0.1, tau=1e-2).strategy_kwargs() == {"eta": 0.1, "tau": 1e-2}
    assert _fed(strategy="fedprox", proximal_mu=0.0).strategy_kwargs() == {"proximal_mu": 0.0}
    ckks = _fed(aggregation="ckks", ckks={"coeff_mod_bit_sizes": [60, 40, 40, 60]})
    assert ckks.aggregator_kwargs() == {"coeff_mod_bit_sizes": (60, 40, 40, 60)}


@pytest.mark.parametrize(
    ("fed", "message"),
    [
        ({"clinets": 3}, "federated.clinets: unknown key"),
        ({"local_steps": 3, "local_epochs": 1}, "federated.local_steps and federated.local_epochs"),
        ({"strategy": "fedprox"}, "federated.proximal_mu"),
        ({"proximal_mu": 0.1}, "federated.proximal_mu is FedProx's"),
        ({"tau": 0.1}, "federated.tau is a server-optimizer setting"),
        ({"strategy": "fedadam", "aggregation": "ckks"}, "cannot read under aggregation ckks"),
        (
            {"aggregation": "ckks", "ckks": {"poly_modulus_degree": 1000}},
            "federated.ckks: ckks: poly_modulus_degree",
        ),
        (
            {"aggregation": "secagg", "clients": 1000, "sample_fraction": 0.2},
            "federated.secagg.max_clients=128",
        ),
        ({"aggregation": "secagg", "clients": 1}, "secagg needs at least 2 clients per round"),
        ({"partition": "zipf:1"}, "federated.partition"),
        ({"finetune": {"mode": "frozen"}}, "federated.finetune.mode must be lora"),
        ({"min_clients": 9}, "federated.min_clients=9 exceeds federated.clients=8"),
        ({"sample_fraction": 0}, "federated.sample_fraction"),
    ],
)
def test_bad_settings_are_errors_naming_the_key(fed, message):
    with pytest.raises(ConfigError) as err:
        parse_config({"federated": fed})
    assert message in str(err.value) and "Value error" not in str(err.value)
