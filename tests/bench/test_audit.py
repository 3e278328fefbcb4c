"""`splitfed audit`: every attack that applies to a recorded run, with a verdict against chance."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from splitfed.bench.audit import Finding, audit_run
from splitfed.cli import app
from splitfed.config import ConfigError, parse_config
from splitfed.run import train
from tiny import SGD_STEP, causal_lm_config, run_config, save_tiny_pretrained, sentence_root, write_topic_csv


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


def test_membership_is_audited_on_the_fine_tuned_model_and_gradient_inversion_says_why_not(
    recorded_run: Path,
) -> None:
    report = audit_run(recorded_run, attacks=["membership", "gradient_inversion"])
    assert report.kind == "split"
    member, inversion = report.findings
    assert member.metric == "loss_auc" and member.chance == 0.5
    assert member.verdict.startswith("at chance")  # two steps of training fit nothing
    assert {"loss_auc", "loss_tpr@0.01fpr", "loss_tpr@0.1fpr", "member_loss"} <= set(member.metrics)
    assert "every party's adapters" in member.crossing
    assert "training examples (members)" in (member.detail or "")
    assert inversion.verdict == "not applicable: a split run exchanges no federated client updates"
    with pytest.raises(ConfigError, match="membership takes references"):
        audit_run(recorded_run, attacks=[{"name": "membership", "steps": 3}])


@pytest.fixture(scope="module")
def federated_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fedtrain of a tiny causal LM on 16 sentences: two clients, two rounds of 4 steps fit them."""
    from splitfed.federated.simulation import fedtrain

    root = sentence_root(tmp_path_factory.mktemp("audit_fed"), 80, (5, 8))
    raw = causal_lm_config(
        root,
        "fed",
        max_train=16,
        max_eval=16,
        train={"lr": 1e-2, "batch_size": 8},
        federated={"clients": 2, "rounds": 2, "local_steps": 4},
    )
    return fedtrain(parse_config(raw), progress=False, log=lambda s: None).output_dir


def test_a_federated_run_is_audited_for_membership_and_says_it_kept_no_client_updates(
    federated_run: Path, tmp_path: Path
) -> None:
    import json

    report = audit_run(federated_run)
    assert report.kind == "federated" and report.recording is None
    assert [f.attack for f in report.findings] == ["membership", "gradient_inversion"]
    member, inversion = report.findings
    assert member.verdict.startswith("LEAKS") and member.score > 0.8  # type: ignore[operator]
    assert "global adapters" in member.crossing
    assert inversion.verdict == "not applicable: fedtrain records no client updates"
    assert "the global adapters the clients started from" in (inversion.detail or "")
    assert "4 local steps" in (inversion.detail or "") and "adamw" in (inversion.detail or "")

    calibrated = audit_run(
        federated_run, attacks=[{"name": "membership", "references": 1, "reference_steps": 10}]
    ).findings[0]
    assert calibrated.metric == "lira_auc" and "reference_auc" in calibrated.metrics
    assert "1 reference model(s)" in (calibrated.detail or "")

    # With secure aggregation the server never sees one client's update; the split attacks have no recording.
    blind = tmp_path / "blind"
    blind.mkdir()
    summary = json.loads((federated_run / "results.json").read_text())
    summary["config"]["federated"]["aggregation"] = "secagg"
    (blind / "results.json").write_text(json.dumps(summary))
    found = {f.attack: f for f in audit_run(blind, attacks=["gradient_inversion", "vmi"]).findings}
    assert found["gradient_inversion"].verdict == (
        "not applicable: secagg aggregation shows the server no client's update"
    )
    assert found["vmi"].verdict.startswith("not applicable: a federated run crosses no split")


def test_cli_audit_of_a_federated_run_prints_and_writes_membership(
    federated_run: Path, tmp_path: Path
) -> None:
    import json

    out = tmp_path / "audit.json"
    result = CliRunner().invoke(app, ["audit", str(federated_run), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "federated run" in result.output and "membership" in result.output and "LEAKS" in result.output
    text = " ".join(result.output.split())  # the table wraps its cells; the detail lines wrap too
    assert "fedtrain keeps only per-round losses" in text and "training examples (members)" in text
    written = json.loads(out.read_text())
    assert written["kind"] == "federated" and written["recording"] is None
    member = next(f for f in written["findings"] if f["attack"] == "membership")
    assert member["metric"] == "loss_auc" and member["metrics"]["loss_auc"] == member["score"]
    inversion = next(f for f in written["findings"] if f["attack"] == "gradient_inversion")
    assert inversion["verdict"].startswith("not applicable") and inversion["detail"]


def test_cli_audit_prints_reconstructions_as_text_not_markup(
    recorded_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import splitfed.bench.audit as audit

    def fake(*args: object, **kwargs: object) -> audit.Audit:
        odd = "a [/b] token [bold]"  # rich markup would fail on the closing tag, or style the rest
        finding = audit.Finding(
            "vmi",
            "forward.hidden",
            "token_f1",
            0.9,
            None,
            0.1,
            "LEAKS: [/x]",
            [{"original": odd, "reconstructed": odd}],
            detail="[/y]",
        )
        return audit.Audit(recorded_run, None, [finding])

    monkeypatch.setattr(audit, "audit_run", fake)
    result = CliRunner().invoke(app, ["audit", str(recorded_run)])
    assert result.exit_code == 0, result.output
    assert "original:      a [/b] token [bold]" in result.output and "[/y]" in result.output


def test_an_attack_that_refuses_the_run_is_reported_and_the_others_still_run(tmp_path: Path) -> None:
    save_tiny_pretrained(tmp_path / "model")
    write_topic_csv(tmp_path / "data.csv")
    raw = run_config(tmp_path, "hbt", split={"setting": "hbt", "head_layers": 1, "tail_layers": 1})
    raw["train"] |= {"steps": 2, "eval_before": False}
    run_dir = train(parse_config(raw), progress=False, log=lambda s: None, record=tmp_path / "rec").output_dir
    report = audit_run(run_dir, attacks=["bli", "ds"], aux="validation", max_examples=8)
    found = {f.attack: f for f in report.findings}
    assert (
        found["bli"].verdict.startswith("not applicable:") and "ds" in found["bli"].verdict
    )  # names what to use
    assert found["ds"].score is not None


#: A budget of the inversion search that a tiny model's update yields to in about 2 s.
QUICK_INVERSION = {"name": "gradient_inversion", "steps": 20, "refine_passes": 0}


@pytest.fixture(scope="module")
def inversion_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sentence_root(tmp_path_factory.mktemp("audit_inversion"), 40)


def _recorded_fedtrain(root: Path, name: str, **fed: object) -> Path:
    """fedtrain of a tiny causal LM with one SGD step per client (batch 1, 6 tokens), recorded."""
    from splitfed.federated.simulation import fedtrain

    raw = causal_lm_config(
        root,
        name,
        max_train=16,
        max_eval=8,
        train={"lr": 0.5, "batch_size": 1, **SGD_STEP},
        federated={
            "clients": 4,
            "rounds": 2,
            "local_steps": 1,
            "finetune": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
        }
        | fed,
    )
    record = root / f"{name}_rec"
    return fedtrain(parse_config(raw), progress=False, log=lambda s: None, record=record).output_dir


@pytest.fixture(scope="module")
def plain_inversion(inversion_root: Path) -> Finding:
    run = _recorded_fedtrain(inversion_root, "plain")
    return audit_run(run, attacks=[QUICK_INVERSION], max_updates=2).findings[0]


def test_the_audit_inverts_recorded_client_updates_back_to_their_tokens(plain_inversion: Finding) -> None:
    found = plain_inversion
    print(found.verdict, found.metrics, found.examples)
    # measured: token F1 0.67 and 0.83 on round 2's clients 0 and 1 (bag F1 0.73, 0.83); chance 6 / 97
    assert found.metric == "token_f1" and found.metrics["updates"] == 2 and len(found.examples) == 2
    assert found.chance is not None and found.chance < 0.1
    assert found.score is not None and found.score >= 0.5 and found.verdict.startswith("LEAKS")
    assert found.metrics["bag_f1"] >= 0.6
    assert "round 2 client-0" in (found.detail or "") and "2 more recorded update(s) not attacked" in (
        found.detail or ""
    )
    assert found.examples[0]["original"].startswith("[round 2 client-0]")


def test_under_secure_aggregation_the_audit_attacks_the_average_and_recovers_far_less(
    inversion_root: Path, plain_inversion: Finding
) -> None:
    run = _recorded_fedtrain(inversion_root, "secagg", aggregation="secagg")
    found = audit_run(run, attacks=[QUICK_INVERSION]).findings[0]
    print(found.verdict, found.metrics, found.examples)
    # measured: token F1 0.33 or 0.50 against the best-matching of the round's 4 clients (chance 0.13
    # so scored; which of the two depends on the process, cause not found: CI drew 0.50), against
    # 0.75 (chance 0.06) on one client's update. Compared above each one's chance.
    assert "average" in found.crossing and found.metrics["updates"] == 1  # one round after the first
    assert "best-matching client" in (found.detail or "")
    assert found.score is not None and plain_inversion.score is not None
    assert found.chance is not None and found.chance > plain_inversion.chance  # type: ignore[operator]
    assert found.score - found.chance <= plain_inversion.score - plain_inversion.chance - 0.25  # type: ignore[operator]


def test_the_audit_says_why_a_recorded_run_cannot_be_inverted(inversion_root: Path) -> None:
    import json

    steps = _recorded_fedtrain(inversion_root, "steps", local_steps=2)
    found = audit_run(steps, attacks=["gradient_inversion"]).findings[0]
    assert found.verdict == "not applicable: its clients took 2 local steps, the attack inverts one"
    first = _recorded_fedtrain(inversion_root, "first", rounds=1)
    # the CLI names the recording explicitly, here where results.json says it is anyway
    out = inversion_root / "first_audit.json"
    args = ["audit", str(first), "--attack", "gradient_inversion", "--json", str(out)]
    result = CliRunner().invoke(app, [*args, "--recording", str(inversion_root / "first_rec")])
    assert result.exit_code == 0, result.output
    assert "peft" in " ".join(result.output.split())  # the detail says why round 1 gives nothing
    (written,) = json.loads(out.read_text())["findings"]
    assert written["verdict"] == "not applicable: the recording holds no round after the first"


def test_the_audit_of_a_damaged_recording_names_the_file(inversion_root: Path, tmp_path: Path) -> None:
    import shutil

    run = inversion_root / "plain"
    damaged = tmp_path / "rec"
    shutil.copytree(inversion_root / "plain_rec", damaged)
    (damaged / "round-0002" / "global.safetensors").write_bytes(b"\0" * 16)
    (found,) = audit_run(run, attacks=[QUICK_INVERSION], recording=damaged).findings
    assert found.verdict.startswith("failed: RecordingError: ") and found.score is None
    assert "round-0002/global.safetensors is damaged" in found.verdict
    result = CliRunner().invoke(app, ["audit", str(run), "--recording", str(tmp_path / "nowhere")])
    assert result.exit_code != 0 and "manifest.json is missing" in result.output


def test_a_recording_gone_since_the_run_loses_no_other_finding(inversion_root: Path) -> None:
    import json
    import shutil

    run = _recorded_fedtrain(inversion_root, "gone")
    named = json.loads((run / "results.json").read_text())["recording"]["directory"]
    assert Path(named).is_absolute() and Path(named) == (inversion_root / "gone_rec").resolve()
    shutil.rmtree(named)
    member, inversion = audit_run(run, membership_examples=8).findings
    assert member.attack == "membership" and member.score is not None
    assert inversion.attack == "gradient_inversion" and inversion.verdict.startswith("failed: RecordingError")
    assert f"{named}/manifest.json is missing" in inversion.verdict


def test_a_recording_of_another_run_is_refused_naming_the_difference(
    inversion_root: Path, tmp_path: Path
) -> None:
    import json
    import shutil

    from splitfed.privacy.recording import RecordingError

    other = tmp_path / "other_rec"
    shutil.copytree(inversion_root / "plain_rec", other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["settings"] |= {"seed": 7, "aggregation": "secagg"}
    (other / "manifest.json").write_text(json.dumps(manifest))
    run = inversion_root / "plain"
    with pytest.raises(
        RecordingError, match=r"aggregation: recorded 'secagg', the run's 'plain'; seed: recorded 7"
    ):
        audit_run(run, attacks=[QUICK_INVERSION], recording=other)
    result = CliRunner().invoke(app, ["audit", str(run), "--recording", str(other)])
    assert result.exit_code != 0 and "was not made by the run" in " ".join(result.output.split())
    # named by results.json (moved, then another put in its place): a finding, not an abort
    moved = tmp_path / "run"
    moved.mkdir()
    summary = json.loads((run / "results.json").read_text())
    summary["recording"]["directory"] = str(other)
    (moved / "results.json").write_text(json.dumps(summary))
    (found,) = audit_run(moved, attacks=[QUICK_INVERSION]).findings
    assert (
        found.verdict.startswith("failed: RecordingError")
        and "seed: recorded 7, the run's 0" in found.verdict
    )


def test_dropout_in_the_model_makes_inversion_not_applicable(inversion_root: Path, tmp_path: Path) -> None:
    import json

    from transformers import GPT2Config, LlamaConfig

    from splitfed.bench.audit import model_dropout

    assert model_dropout(LlamaConfig()) == {}
    # GPT-2's summary head's dropout does not act on a causal LM
    assert model_dropout(GPT2Config()) == {"attn_pdrop": 0.1, "embd_pdrop": 0.1, "resid_pdrop": 0.1}
    save_tiny_pretrained(tmp_path / "model", attention_dropout=0.25)
    run = tmp_path / "run"
    run.mkdir()
    summary = json.loads((inversion_root / "plain" / "results.json").read_text())
    summary["config"]["model"]["name"] = str(tmp_path / "model")
    (run / "results.json").write_text(json.dumps(summary))
    (found,) = audit_run(run, attacks=["gradient_inversion"]).findings
    assert (
        found.verdict.startswith("not applicable: its model ") and "attention_dropout 0.25" in found.verdict
    )
    assert "dropout in the model" in (found.detail or "")
