"""`fedtrain --record DIR`: the server's view of every round and, apart, the clients' batches."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import splitfed.federated.recording as recording_module
import splitfed.federated.simulation as simulation
from splitfed.cli import app
from splitfed.config import parse_config
from splitfed.federated.recording import (
    FederatedGroundTruth,
    FederatedRecording,
    check_new_federated_recording,
)
from splitfed.federated.simulation import fedtrain, whole_model
from splitfed.models.partition import FinetuneSpec, apply_finetune
from splitfed.privacy.attacks.gradient_inversion import client_gradient, lora_parameters
from splitfed.privacy.recording import RecordingError
from tiny import SGD_STEP, causal_lm_config, sentence_root

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
    return sentence_root(tmp_path_factory.mktemp("fedrecord"), 24)


def _raw(root: Path, out: str, **fed: object) -> dict:
    train = {"lr": LR, "batch_size": 2, **SGD_STEP}
    return causal_lm_config(root, out, max_train=12, max_eval=4, train=train, federated=FED | fed)


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
    assert (
        summary["recording"]["directory"] == str(recorded.resolve()) and summary["recording"]["updates"] == 6
    )
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


def _tamper(recording: Path, name: str, change) -> None:  # type: ignore[no-untyped-def]
    path = recording / name
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("manifest", "change", "message"),
    [
        (  # a traversal to a readable safetensors file outside the recording
            "manifest.json",
            lambda m, secret: m["rounds"][0].update({"global": "../secret/x.safetensors"}),
            r"damaged or was tampered with: its rounds\[0\] \(round 1\) global names '\.\./secret/x\.safetensors'",
        ),
        (  # an absolute path to it
            "manifest.json",
            lambda m, secret: m["rounds"][1]["updates"]["client-0"].update(
                {"file": f"{secret}/x.safetensors"}
            ),
            r"damaged or was tampered with: its rounds\[1\] \(round 2\) update of 'client-0' file names '/",
        ),
        (
            "manifest.json",
            lambda m, secret: m.update({"ground_truth": str(secret)}),
            r"damaged or was tampered with: its ground_truth names '/",
        ),
        (
            "ground_truth/manifest.json",
            lambda m, secret: m["rounds"][1]["clients"]["client-1"].update(
                {"file": "round-0002/../../../secret/x.safetensors"}
            ),
            r"damaged or was tampered with: its rounds\[1\] \(round 2\) client 'client-1' file names 'round-0002/\.\./",
        ),
        (
            "manifest.json",
            lambda m, secret: m["rounds"][1].pop("round"),
            r"damaged: rounds\[1\] has no 'round'",
        ),
        (
            "manifest.json",
            lambda m, secret: m["rounds"][1].pop("global"),
            r"damaged: rounds\[1\] \(round 2\) has no 'global'",
        ),
        ("manifest.json", lambda m, secret: m.pop("view"), r"damaged: the manifest has no 'view'"),
        (
            "manifest.json",
            lambda m, secret: m["rounds"][0].update({"round": "1"}),
            r"damaged: .*'round' is '1' \(str\), not int",
        ),
        (
            "manifest.json",
            lambda m, secret: m["rounds"].append(7),
            r"damaged: rounds\[2\] is int, not an object",
        ),
        (
            "manifest.json",
            lambda m, secret: m["rounds"][1]["updates"]["client-2"].pop("weight"),
            r"damaged: .*update of 'client-2' has no 'weight'",
        ),
        (
            "ground_truth/manifest.json",
            lambda m, secret: m["rounds"][0]["clients"]["client-0"].pop("file"),
            r"damaged: .*round 1\) client 'client-0' has no 'file'",
        ),
        (
            "ground_truth/manifest.json",
            lambda m, secret: m["rounds"][0]["clients"]["client-0"].update({"steps": "1"}),
            r"damaged: .*'steps' is '1' \(str\), not int",
        ),
    ],
)
def test_a_bad_manifest_is_refused_naming_the_manifest_and_the_entry(
    recorded: Path, tmp_path: Path, manifest: str, change: Callable[[dict, Path], object], message: str
) -> None:
    """A file outside the recording (a traversal, an absolute path), or a round entry missing a key
    or of the wrong type, is refused as the manifest is read."""
    secret = tmp_path / "secret"
    secret.mkdir()
    shutil.copy(recorded / "round-0001" / "global.safetensors", secret / "x.safetensors")
    copy = tmp_path / "rec"
    shutil.copytree(recorded, copy)
    _tamper(copy, manifest, lambda m: change(m, secret))
    with pytest.raises(RecordingError, match=rf"{re.escape(str(copy / manifest))} is {message}"):
        FederatedRecording(copy)
        FederatedGroundTruth(copy / "ground_truth")


def test_a_round_that_links_outside_the_recording_is_refused(recorded: Path, tmp_path: Path) -> None:
    copy = tmp_path / "rec"
    shutil.copytree(recorded, copy, ignore=shutil.ignore_patterns("round-0002"))
    shutil.copytree(recorded / "round-0002", tmp_path / "elsewhere")
    (copy / "round-0002").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(RecordingError, match=r"global 'round-0002/global\.safetensors' leads outside"):
        FederatedRecording(copy)


def test_a_recording_that_holds_the_output_dir_is_refused_before_anything_loads(
    root: Path, tmp_path: Path
) -> None:
    cfg = parse_config(_raw(root, str(tmp_path / "rec" / "run")))
    with pytest.raises(RecordingError, match="holds the run's output_dir"):
        fedtrain(cfg, progress=False, log=lambda s: None, record=tmp_path / "rec")
    assert not (tmp_path / "rec").exists()
    cfg = parse_config(_raw(root, str(tmp_path / "out")))
    for inside in ("global", "checkpoint/x"):  # what the run writes itself
        with pytest.raises(RecordingError, match="which the run writes itself"):
            fedtrain(cfg, progress=False, log=lambda s: None, record=tmp_path / "out" / inside)
    assert not (tmp_path / "out").exists()
    check_new_federated_recording(tmp_path / "out" / "recording", output_dir=tmp_path / "out")  # apart: fine


class _Crash(Exception):
    pass


@pytest.mark.parametrize(
    ("where", "aborted"),
    [("server", True), ("truth", True), ("server", False)],
    ids=["server", "truth", "killed"],
)
def test_an_interrupted_commit_leaves_no_temporary_or_unlisted_round(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, aborted: bool
) -> None:
    """Round 2 interrupted as it commits one side's files; ``killed``: the process died as the
    server's round was renamed into place, so nothing ran after (no abort)."""
    original = recording_module._RoundFiles.commit
    rec = tmp_path / "rec"
    side = rec if where == "server" else rec / "ground_truth"

    def commit(self) -> None:  # type: ignore[no-untyped-def]
        if self.name == "round-0002" and self.final.parent == side:
            raise _Crash
        original(self)

    monkeypatch.setattr(recording_module._RoundFiles, "commit", commit)
    if not aborted:
        monkeypatch.setattr(recording_module.FederatedRecorder, "abort", lambda self: None)
    with pytest.raises(_Crash):
        fedtrain(parse_config(_raw(root, f"crash-{where}")), progress=False, log=lambda s: None, record=rec)
    assert (
        sorted(FederatedRecording(rec).rounds)
        == [1]
        == sorted(FederatedGroundTruth(rec / "ground_truth").rounds)
    )
    truth = sorted(p.name for p in (rec / "ground_truth").iterdir())
    assert not [name for name in truth if name.endswith(".tmp")]  # the truth is committed first
    if aborted:  # abort removes what the manifests do not name
        assert sorted(p.name for p in rec.iterdir()) == ["ground_truth", "manifest.json", "round-0001"]
        assert truth == ["manifest.json", "round-0001"]


def test_recording_changes_nothing_in_the_run(root: Path, recorded: Path) -> None:
    unrecorded = fedtrain(parse_config(_raw(root, "unrecorded")), progress=False, log=lambda s: None)
    recorded_run = json.loads((root / "plain" / "results.json").read_text())
    assert [h["train_loss"] for h in unrecorded.history] == [h["train_loss"] for h in recorded_run["history"]]
    a = load_file(str(unrecorded.output_dir / "global" / "adapter.safetensors"))
    b = load_file(str(root / "plain" / "global" / "adapter.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert unrecorded.summary["metrics_after"] == recorded_run["metrics_after"]
