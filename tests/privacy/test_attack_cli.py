"""`splitfed attack`: attack a recorded run from its config, scored against its ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from splitfed.cli import app
from tiny import run_config, save_tiny_pretrained, served_run, write_topic_csv


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("attack-cli")
    save_tiny_pretrained(root / "model")
    write_topic_csv(root / "data.csv")
    raw = run_config(root, "run", split={"setting": "ht", "head_layers": 1, "tail_layers": 0})
    raw["model"]["num_labels"] = 3
    raw["train"] |= {"steps": 2, "eval_before": False}
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["train", str(path), "--no-progress", "--record", str(root / "rec")])
    assert result.exit_code == 0, result.output
    return path, root / "rec"


def test_attack_prints_each_attack_beside_the_linear_baseline_and_writes_json(
    recorded: tuple[Path, Path], tmp_path: Path
) -> None:
    config, recording = recorded
    out = tmp_path / "attacks.json"
    args = ["attack", str(recording), "--config", str(config), "--attack", "vmi", "--param", "steps=30"]
    result = CliRunner().invoke(app, [*args, "--aux", "validation", "--no-progress", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "baseline" in result.output and "token_f1" in result.output
    (summary,) = json.loads(out.read_text())
    assert summary["attack"] == "vmi" and summary["params"]["steps"] == 30
    # The undefended first layer of a tiny model is nearly invertible: the attack must find it.
    assert summary["metrics"]["token_f1"] > 0.8 and summary["metrics"]["token_f1"] > summary["chance"]


def test_attack_prints_its_noise_control_beside_its_score(
    recorded: tuple[Path, Path], tmp_path: Path
) -> None:
    config, recording = recorded
    out = tmp_path / "attacks.json"
    args = ["attack", str(recording), "--config", str(config), "--attack", "linear", "--aux", "validation"]
    result = CliRunner().invoke(app, [*args, "--noise-control", "--no-progress", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "control" in result.output
    (summary,) = json.loads(out.read_text())
    # measured: token F1 1.00 on the activations, 0.08 on noise of their shape and scale
    assert summary["metrics"]["token_f1"] > 0.8 and summary["control"]["token_f1"] < 0.3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--attack", "nope"], "unknown attack 'nope'"),
        (["--attack", "vmi", "--param", "colour=red"], "no chosen attack takes it"),
        (["--attack", "vmi", "--param", "steps=0"], "steps"),
        (["--attack", "bisr", "--aux", "missing.txt"], "no such file"),
    ],
)
def test_attack_refuses_bad_input_with_one_clear_line(
    recorded: tuple[Path, Path], extra: list[str], message: str
) -> None:
    config, recording = recorded
    result = CliRunner().invoke(
        app, ["attack", str(recording), "--config", str(config), *extra, "--no-progress"]
    )
    assert result.exit_code != 0 and message in result.output


def test_attacks_lists_every_registered_attack() -> None:
    from splitfed.privacy.attacks import ATTACKS

    result = CliRunner().invoke(app, ["attacks"])
    assert result.exit_code == 0 and all(name in result.output for name in ATTACKS)


def test_attack_recovers_prompts_from_a_generate_recording(tmp_path: Path) -> None:
    save_tiny_pretrained(tmp_path / "model")
    write_topic_csv(tmp_path / "data.csv")
    raw = run_config(
        tmp_path,
        "gen",
        task="causal_lm",
        split={"setting": "hbt", "head_layers": 1, "tail_layers": 1},
        data={"name": "local", "task": "causal_lm", "columns": {"text": "sentence"}},
    )
    config = tmp_path / "gen.yaml"
    config.write_text(yaml.safe_dump(raw))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the small tree\nblue moon house\n")
    runner = CliRunner()
    generated = runner.invoke(
        app,
        [
            "generate",
            str(config),
            "--prompts",
            str(prompts),
            "--max-new-tokens",
            "3",
            "--record",
            str(tmp_path / "rec"),
        ],
    )
    assert generated.exit_code == 0, generated.output
    out = tmp_path / "gen.json"
    result = runner.invoke(
        app,
        [
            "attack",
            str(tmp_path / "rec"),
            "--config",
            str(config),
            "--attack",
            "vmi",
            "--phase",
            "generate",
            "--noise-control",
            "--no-progress",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    (summary,) = json.loads(out.read_text())
    assert summary["metrics"]["prompt_token_f1"] > 0.8  # prompts leak from the prefill activations
    assert summary["control"]["prompt_token_f1"] < 0.3  # measured 0.00 on noise: from nothing else


def test_attack_scores_a_model_party_recording_with_the_joined_party_s_ground_truth(tmp_path: Path) -> None:
    from splitfed.config import parse_config

    save_tiny_pretrained(tmp_path / "model")
    write_topic_csv(tmp_path / "data.csv")
    raw = run_config(tmp_path, "remote", split={"setting": "ht", "head_layers": 1, "tail_layers": 0})
    raw["model"]["num_labels"] = 3
    raw["train"] |= {"steps": 2, "eval_before": False}
    config = tmp_path / "remote.yaml"
    config.write_text(yaml.safe_dump(raw))
    cfg = parse_config(raw)
    served_run(cfg, tmp_path / "server", tmp_path / "party")
    out = tmp_path / "remote.json"
    args = ["attack", str(tmp_path / "server"), "--config", str(config), "--attack", "vmi", "--attack", "bli"]
    result = CliRunner().invoke(
        app, [*args, "--ground-truth", str(tmp_path / "party"), "--no-progress", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    vmi, bli = json.loads(out.read_text())
    assert vmi["metrics"]["token_f1"] > 0.8 and bli["metrics"]["label_accuracy"] == 1.0
    without = CliRunner().invoke(app, [*args, "--no-progress"])  # the server has no ground truth
    assert without.exit_code != 0 and "ground" in without.output.lower()


def test_attack_prints_reconstructions_as_text_not_markup(
    recorded: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import splitfed.privacy.attack_runs as runs
    from splitfed.privacy.attacks import AttackResult, Reconstruction

    odd = "a [/b] token [bold]"  # rich markup would fail on the closing tag, or style the rest

    def fake(*args: object, **kwargs: object) -> list[AttackResult]:
        result = AttackResult("vmi", {"token_f1": 0.5}, chance=0.1, n_examples=1)
        result.examples = [Reconstruction(odd, odd)]
        return [result]

    monkeypatch.setattr(runs, "attack_recording", fake)
    config, recording = recorded
    result = CliRunner().invoke(app, ["attack", str(recording), "--config", str(config), "--attack", "vmi"])
    assert result.exit_code == 0, result.output
    assert f"vmi original:      {odd}" in result.output and f"vmi reconstructed: {odd}" in result.output
