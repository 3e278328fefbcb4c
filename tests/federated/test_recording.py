"""`fedtrain --record DIR`: the server's view of every round and, apart, the clients' batches."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import splitfed.federated.simulation as simulation
from splitfed.cli import app
from splitfed.config import parse_config
from splitfed.federated.recording import FederatedGroundTruth, FederatedRecording
from splitfed.federated.simulation import fedtrain, whole_model
from splitfed.models.partition import FinetuneSpec, apply_finetune
from splitfed.privacy.attacks.gradient_inversion import client_gradient, lora_parameters
from splitfed.privacy.recording import RecordingError
from tiny import WORDS, run_config, save_tiny_pretrained

LR = 0.5
#: One SGD step of a causal LM per client: each update is -lr * the gradient of its batch.
FED = {
    "clients": 3,
    "rounds": 2,
    "local_steps": 1,
    "finetune": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fedrecord")
    save_tiny_pretrained(root / "model")
    rng = random.Random(0)
    lines = ["sentence"] + [" ".join(rng.choice(WORDS) for _ in range(5)) for _ in range(24)]
    (root / "data.csv").write_text("\n".join(lines) + "\n")
    return root


def _raw(root: Path, out: str, **fed: object) -> dict:
    return run_config(
        root,
        out,
        task="causal_lm",
        data={"task": "causal_lm", "columns": {"text": "sentence"}, "max_train": 12, "max_eval": 4},
        train={
            "lr": LR,
            "batch_size": 2,
            "optimizer": "sgd",
            "max_grad_norm": None,
            "eval_before": False,
            "eval_max_new_tokens": 0,
        },
        federated=FED | fed,
    )


@pytest.fixture(scope="module")
def recorded(root: Path) -> Path:
    """A plain-aggregation run recorded through the CLI."""
    (root / "plain.yaml").write_text(yaml.safe_dump(_raw(root, "plain")))
    result = CliRunner().invoke(
        app, ["fedtrain", str(root / "plain.yaml"), "--record", str(root / "rec"), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert "recording:" in result.output and "client_updates" in result.output
    return root / "rec"


def test_the_recording_holds_each_round_s_global_adapters_updates_and_average(
    root: Path, recorded: Path
) -> None:
    summary = json.loads((root / "plain" / "results.json").read_text())
    assert summary["recording"]["directory"] == str(recorded) and summary["recording"]["updates"] == 6
    rec = FederatedRecording(recorded)
    assert rec.complete and rec.view == "client_updates" and sorted(rec.rounds) == [1, 2]
    assert rec.settings["aggregation"] == "plain" and rec.settings["finetune"]["r"] == 4
    fit = rec.fit(2)
    assert (fit["lr"], fit["optimizer"], fit["local_steps"], fit["max_grad_norm"]) == (LR, "sgd", 1, None)
    start = rec.global_adapters(1)
    assert all(not t.any() for n, t in start.items() if "lora_B" in n)  # peft starts B at zero
    for round_id in (1, 2):
        clients = rec.clients(round_id)
        assert clients == ["client-0", "client-1", "client-2"]
        weights = [rec.rounds[round_id]["updates"][c]["weight"] for c in clients]
        updates = [rec.update(round_id, c) for c in clients]
        average = rec.average(round_id)
        for name, value in average.items():  # the average is the weighted mean of the recorded updates
            mean = sum(w * u[name] for w, u in zip(weights, updates, strict=True)) / sum(weights)
            torch.testing.assert_close(value, mean, rtol=1e-5, atol=1e-7)
    # FedAvg: round 2 starts from round 1's start plus round 1's average
    after = rec.global_adapters(2)
    for name, value in rec.average(1).items():
        torch.testing.assert_close(after[name], start[name] + value, rtol=1e-5, atol=1e-7)
    # only safetensors and JSON, nothing half-written left behind
    files = [p for p in recorded.rglob("*") if p.is_file()]
    assert files and all(p.suffix in (".safetensors", ".json") for p in files)
    assert not [p for p in recorded.rglob(".*")]


def test_the_ground_truth_is_apart_and_each_update_is_minus_lr_times_its_batch_gradient(
    root: Path, recorded: Path
) -> None:
    rec = FederatedRecording(recorded)
    truth = FederatedGroundTruth(recorded / "ground_truth")
    assert not any("ground_truth" in json.dumps(r) for r in rec.manifest["rounds"])  # the view names none
    steps = truth.steps(2, "client-1")
    assert len(steps) == 1 and steps[0]["input_ids"].shape == (2, 6)  # batch 2 of 5 words + EOS
    assert (
        steps[0]["attention_mask"].all()
        and steps[0]["example_ids"].tolist() == truth.rounds[2]["clients"]["client-1"]["examples"][0]
    )
    # recompute the client's step from the recorded global adapters and batch: it is the update
    model = AutoModelForCausalLM.from_pretrained(root / "model").eval()
    segment = whole_model(model, "causal_lm")
    apply_finetune(segment, FinetuneSpec("lora", 4, 16.0, 0.0, ("q_proj", "v_proj")))
    params = lora_parameters(model, sorted(rec.global_adapters(2)))
    with torch.no_grad():
        for name, tensor in rec.global_adapters(2).items():
            params[name].copy_(tensor)
    grads = client_gradient(model, params, steps[0]["input_ids"])
    update = rec.update(2, "client-1")
    for name, grad in grads.items():
        torch.testing.assert_close(update[name], -LR * grad, rtol=1e-4, atol=1e-6)


def test_secure_aggregation_records_only_the_average(root: Path, tmp_path: Path) -> None:
    fedtrain(
        parse_config(_raw(root, "secagg", aggregation="secagg")),
        progress=False,
        log=lambda s: None,
        record=tmp_path / "rec",
    )
    rec = FederatedRecording(tmp_path / "rec")
    assert rec.view == "aggregate" and "sum of the round's masked updates" in rec.manifest["view_note"]
    assert rec.clients(2) == [] and not list((tmp_path / "rec").rglob("update-*"))
    assert set(rec.average(2)) == set(rec.global_adapters(2))
    with pytest.raises(RecordingError, match="server's view is aggregate"):
        rec.update(2, "client-0")
    assert FederatedGroundTruth(tmp_path / "rec" / "ground_truth").steps(2, "client-0")


def test_an_existing_recording_directory_is_refused_before_anything_loads(
    root: Path, recorded: Path, tmp_path: Path
) -> None:
    cfg = parse_config(_raw(root, "again"))
    with pytest.raises(RecordingError, match="already holds a recording"):
        fedtrain(cfg, progress=False, log=lambda s: None, record=recorded)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(RecordingError, match=r"not empty \(1 entries, e.g. 'notes.txt'\)"):
        fedtrain(cfg, progress=False, log=lambda s: None, record=busy)
    with pytest.raises(RecordingError, match="is a file"):
        fedtrain(cfg, progress=False, log=lambda s: None, record=busy / "notes.txt")
    with pytest.raises(RecordingError, match="output_dir"):
        fedtrain(cfg, progress=False, log=lambda s: None, record=cfg.output_dir)
    assert not Path(cfg.output_dir).exists() and (busy / "notes.txt").read_text() == "mine"
    (root / "again.yaml").write_text(yaml.safe_dump(_raw(root, "again")))
    result = CliRunner().invoke(app, ["fedtrain", str(root / "again.yaml"), "--record", str(busy)])
    assert result.exit_code != 0 and "not empty" in result.output


def test_a_missing_or_damaged_file_is_named(recorded: Path, tmp_path: Path) -> None:
    copy = tmp_path / "rec"
    shutil.copytree(recorded, copy)
    update = copy / "round-0002" / "update-client-0.safetensors"
    update.write_bytes(update.read_bytes()[:100])
    rec = FederatedRecording(copy)
    with pytest.raises(RecordingError, match=r"update-client-0\.safetensors is damaged"):
        rec.update(2, "client-0")
    (copy / "round-0001" / "global.safetensors").unlink()
    with pytest.raises(RecordingError, match=r"round-0001/global\.safetensors is missing"):
        rec.global_adapters(1)
    (copy / "ground_truth" / "round-0002" / "client-2.safetensors").unlink()
    with pytest.raises(RecordingError, match=r"client-2\.safetensors is missing"):
        FederatedGroundTruth(copy / "ground_truth").steps(2, "client-2")
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(RecordingError, match=r"manifest\.json is damaged"):
        FederatedRecording(copy)
    with pytest.raises(RecordingError, match=r"manifest\.json is missing"):
        FederatedRecording(tmp_path)


def test_an_interrupted_run_leaves_its_finished_rounds_and_no_half_round(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Crash(Exception):
        pass

    original = simulation.FederatedSimulation.client_update

    def crash_in_round_2(self, round_id, index, fit):  # type: ignore[no-untyped-def]
        if round_id == 2 and index == 1:
            raise Crash
        return original(self, round_id, index, fit)

    monkeypatch.setattr(simulation.FederatedSimulation, "client_update", crash_in_round_2)
    with pytest.raises(Crash):
        fedtrain(
            parse_config(_raw(root, "crash")), progress=False, log=lambda s: None, record=tmp_path / "rec"
        )
    rec = FederatedRecording(tmp_path / "rec")
    assert not rec.complete and sorted(rec.rounds) == [1]
    assert sorted(p.name for p in (tmp_path / "rec").iterdir()) == [
        "ground_truth",
        "manifest.json",
        "round-0001",
    ]
    assert sorted(FederatedGroundTruth(tmp_path / "rec" / "ground_truth").rounds) == [1]
