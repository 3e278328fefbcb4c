"""Secure aggregation is listed with the defenses but set where federated runs aggregate."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from splitfed.cli import app
from splitfed.config import ConfigError, FederatedConfig, parse_config
from splitfed.privacy.defenses import DEFENSES, DefenseConfigError, build_defense
from splitfed.privacy.defenses.secure_aggregation import CKKSAggregation, SecureAggregation
from tiny import run_config


@pytest.mark.parametrize("name", ["secagg", "ckks"])
def test_a_split_run_naming_secure_aggregation_is_told_to_set_federated_aggregation(name: str) -> None:
    assert name in DEFENSES
    assert name in FederatedConfig.model_fields["aggregation"].annotation.__args__  # type: ignore[union-attr]
    where = rf"set federated\.aggregation: {name} \(options under federated\.{name}\) in a `splitfed fedtrain` config"
    with pytest.raises(DefenseConfigError, match=rf"defenses: {name}: {name} is secure aggregation.*{where}"):
        build_defense({"name": name})
    with pytest.raises(DefenseConfigError, match=where):  # also with keys meant for the aggregator
        build_defense({"name": name, "threshold": 3})
    with pytest.raises(ConfigError, match=rf"defenses: .*not a data-party defense of a split run.*{where}"):
        parse_config(run_config(Path("."), "x", defenses=[{"name": name}]))
    cls = DEFENSES[name]
    with pytest.raises(ValueError, match=where):  # constructed directly, bypassing the registry
        cls()


def test_the_docstrings_say_what_they_defend_against() -> None:
    for cls in (SecureAggregation, CKKSAggregation):
        doc = " ".join((cls.__doc__ or "").split())
        assert "gradient inversion" in doc and "membership inference" in doc
        assert "federated.aggregation" in doc


def test_splitfed_defenses_lists_them() -> None:
    result = CliRunner().invoke(app, ["defenses"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("│")]
    names = {line.split("│")[1].strip() for line in rows}
    assert {"secagg", "ckks", "dp_sgd"} <= names
