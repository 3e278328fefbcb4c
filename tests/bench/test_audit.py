"""`splitfed audit`: every attack that applies to a recorded run, with a verdict against chance."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from splitfed.bench.audit import audit_run
from splitfed.cli import app
from splitfed.config import ConfigError, parse_config
from splitfed.run import train
from tiny import run_config, save_tiny_pretrained, write_topic_csv


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("audit")
    save_tiny_pretrained(root / "model")
    write_topic_csv(root / "data.csv")
    raw = run_config(root, "run", split={"setting": "ht", "head_layers": 1, "tail_layers": 0})
    raw["train"] |= {"steps": 2, "eval_before": False}
    result = train(parse_config(raw), progress=False, log=lambda s: None, record=root / "rec")
    (root / "run.yaml").write_text(yaml.safe_dump(raw))
    return result.output_dir


def test_audit_finds_what_leaks_and_says_why_an_attack_does_not_apply(
    recorded_run: Path, tmp_path: Path
) -> None:
    from test_scores import _store  # a hand-made sweep store with activation_dp at two strengths

    _store(tmp_path).close()
    report = audit_run(
        recorded_run,
        attacks=[{"name": "vmi", "steps": 20}, "bli"],
        store=tmp_path / "results.sqlite",
        aux="validation",
        max_examples=8,
    )
    found = {f.attack: f for f in report.findings}
    assert found["vmi"].verdict.startswith("LEAKS") and found["vmi"].score > 0.8  # type: ignore[operator]
    assert (
        found["bli"].verdict.startswith("LEAKS") and found["bli"].score == 1.0
    )  # exact from logit gradients
    assert "activation_dp" in (found["vmi"].suggestion or "")
    assert "forward.hidden (to_model)" in found["vmi"].crossing


def test_audit_of_an_unrecorded_run_says_how_to_record_it(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text('{"config": {}}')
    with pytest.raises(ConfigError, match="--record"):
        audit_run(tmp_path)
    result = CliRunner().invoke(app, ["audit", str(tmp_path / "nowhere")])
    assert result.exit_code != 0 and "no results.json" in result.output


def test_cli_audit_prints_a_verdict_per_attack(recorded_run: Path) -> None:
    result = CliRunner().invoke(
        app, ["audit", str(recorded_run), "--attack", "bli", "--aux", "validation", "--max-examples", "8"]
    )
    assert result.exit_code == 0, result.output
    assert "bli" in result.output and "LEAKS" in result.output
