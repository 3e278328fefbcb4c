"""`splitfed fedtrain` end to end on a tiny model: results.json, checkpoint + --resume, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import splitfed.federated.simulation as simulation
from splitfed.cli import app
from splitfed.config import ConfigError, parse_config
from splitfed.federated.simulation import fedtrain
from tiny import run_config, save_tiny_pretrained, write_topic_csv

FED = {"clients": 5, "rounds": 4, "local_steps": 2, "sample_fraction": 0.6, "partition": "quantity:2"}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fedtrain")
    save_tiny_pretrained(root / "model")
    write_topic_csv(root / "data.csv")
    return root


def _raw(root: Path, out: str, **fed: object) -> dict:
    return run_config(root, out, federated=FED | fed)


def _quiet(_: str) -> None:
    pass


def test_results_json_reports_config_metrics_history_and_bytes(root: Path) -> None:
    result = fedtrain(parse_config(_raw(root, "results", eval_every=2)), progress=False, log=_quiet)
    summary = json.loads((result.output_dir / "results.json").read_text())
    assert parse_config(summary["config"]).federated.rounds == 4  # the config round-trips
    assert set(summary["metrics_before"]) >= {"accuracy", "macro_f1", "loss"}
    assert set(summary["metrics_after"]) == set(summary["metrics_before"])
    assert [h["round"] for h in summary["history"]] == [1, 2, 3, 4]
    assert "eval_accuracy" in summary["history"][1] and "eval_accuracy" not in summary["history"][0]
    for h in summary["history"]:
        assert h["clients"] == 3 and len(h["sampled"]) == 3 and h["local_steps"] == 6
        assert h["bytes_up"] >= 3 * h["update_bytes"] > 0 and h["bytes_down"] > 0
        assert h["train_loss"] > 0 and h["seconds"] >= h["train_s"] > 0
    assert summary["strategy"] == {"name": "fedavg", "server_lr": 1.0}
    assert summary["aggregation"]["name"] == "plain"
    assert (
        summary["clients_per_round"] == 3 and sum(summary["client_examples"]) == summary["examples"]["train"]
    )
    assert summary["bytes_per_round"]["update_per_client"] >= summary["bytes_per_round"]["fp32_update"]
    assert {"load_s", "train_s", "eval_after_s", "mean_round_s", "mean_encode_s"} <= set(summary["timings"])
    adapters = load_file(summary["adapters"])
    assert adapters and all("lora_" in k or k.startswith("score") for k in adapters)
    assert summary["trainable_params"] == sum(t.numel() for t in adapters.values())


def _crash_after(cfg, rounds: int) -> None:
    """Run ``cfg`` but stop right after the checkpoint of round ``rounds``, as a crash would."""

    class Crash(Exception):
        pass

    original = simulation.save_checkpoint

    def save_then_crash(out, sim, round_id, history):  # type: ignore[no-untyped-def]
        original(out, sim, round_id, history)
        if round_id >= rounds:
            raise Crash

    simulation.save_checkpoint = save_then_crash
    try:
        with pytest.raises(Crash):
            fedtrain(cfg, progress=False, log=_quiet)
    finally:
        simulation.save_checkpoint = original


def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_run(root: Path) -> None:
    fed = {"strategy": "fedadam", "server_lr": 0.02, "checkpoint_every": 2}
    straight = fedtrain(parse_config(_raw(root, "straight", **fed)), progress=False, log=_quiet)
    cfg = parse_config(_raw(root, "resumed", **fed))
    _crash_after(cfg, 2)
    resumed = fedtrain(cfg, resume=True, progress=False, log=_quiet)
    keys = ("round", "train_loss", "sampled", "bytes_up", "bytes_down")
    assert [[h[k] for k in keys] for h in resumed.history] == [[h[k] for k in keys] for h in straight.history]
    assert resumed.metrics_after == straight.metrics_after
    a, b = load_file(straight.summary["adapters"]), load_file(resumed.summary["adapters"])
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # a checkpoint made with other settings is refused
    other = parse_config(_raw(root, "resumed", **fed, clients=4))
    with pytest.raises(ConfigError, match=r"federated\.clients 5 -> 4"):
        fedtrain(other, resume=True, progress=False, log=_quiet)


def test_cli_fedtrain_and_its_errors(root: Path, tmp_path: Path) -> None:
    path = tmp_path / "fed.yaml"
    path.write_text(yaml.safe_dump(_raw(root, "cli", rounds=1, aggregation="secagg")))
    runner = CliRunner()
    ok = runner.invoke(app, ["fedtrain", str(path), "--no-progress"])
    assert ok.exit_code == 0, ok.output
    assert (root / "cli" / "results.json").is_file() and "global adapters" in ok.output
    cases = {
        "federated.rouns=3": "federated.rouns",
        "federated.strategy=fedprox": "federated.proximal_mu",
        "federated.aggregation=rot13": "federated.aggregation",
        "federated.partition=dirichlet:-1": "federated.partition",
    }
    for override, key in cases.items():
        bad = runner.invoke(app, ["fedtrain", str(path), "--set", override])
        assert bad.exit_code == 2 and key in bad.output and "Traceback" not in bad.output, bad.output
    resume = runner.invoke(
        app, ["fedtrain", str(path), "--resume", "--set", "output_dir=" + str(tmp_path / "x")]
    )
    assert resume.exit_code == 2 and "no checkpoint" in resume.output
    plain = tmp_path / "split.yaml"
    plain.write_text(yaml.safe_dump(run_config(root, "split")))
    missing = runner.invoke(app, ["fedtrain", str(plain)])
    assert missing.exit_code == 2 and "no federated: section" in missing.output
    assert all(r.output.count("error:") == 1 for r in (resume, missing))


def test_generative_qa_is_scored_by_generation_after_the_last_round(root: Path) -> None:
    raw = run_config(
        root,
        "fed-gsm",
        task="generative_qa",
        data={
            "name": "arithmetic",
            "path": None,
            "columns": {},
            "max_train": 12,
            "max_eval": 4,
            "max_length": 32,
        },
        train={"eval_max_new_tokens": 4, "eval_before": False},
        federated=FED | {"rounds": 1, "clients": 3, "partition": "iid"},
    )
    result = fedtrain(parse_config(raw), progress=False, log=_quiet)
    assert {"exact_match", "loss"} <= set(result.metrics_after)
