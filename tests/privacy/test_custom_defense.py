"""The README's custom defense: one class and one registry line make it usable from a run's YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import BaseModel, Field

from splitfed import Defense
from splitfed.config import parse_config
from splitfed.privacy import defenses
from splitfed.privacy.recording import RecordingReader
from splitfed.run import train
from tiny import run_config, save_tiny_pretrained, write_topic_csv


class TokenNoise(Defense):
    """Gaussian noise on every outgoing activation, relative to its token's RMS."""

    name = "token_noise"

    class Params(BaseModel):
        sigma: float = Field(0.1, ge=0, description="noise relative to each token's RMS")

    def __init__(self, sigma: float = 0.1) -> None:
        self.sigma = sigma

    def on_activations(self, hidden, context):  # type: ignore[no-untyped-def]
        rms = hidden.pow(2).mean(-1, keepdim=True).sqrt()
        return hidden + self.sigma * rms * torch.randn_like(hidden)


def test_a_registered_defense_reaches_what_the_model_party_receives(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(defenses.DEFENSES, TokenNoise.name, TokenNoise)  # the one registry line
    save_tiny_pretrained(tmp_path / "model")
    write_topic_csv(tmp_path / "data.csv")
    outputs = {}
    for name, specs in (("plain", []), ("noisy", [{"name": "token_noise", "sigma": 0.5}])):
        raw = run_config(tmp_path, name, defenses=specs)
        raw["train"] |= {"steps": 1, "eval_before": False}
        train(parse_config(raw), progress=False, log=lambda s: None, record=tmp_path / f"rec-{name}")
        first = next(iter(RecordingReader(tmp_path / f"rec-{name}").records(kinds="forward", phases="train")))
        outputs[name] = first.tensor("hidden")
    difference = (outputs["noisy"] - outputs["plain"]).pow(2).mean().sqrt()
    rms = outputs["plain"].pow(2).mean().sqrt()
    assert 0.3 < float(difference / rms) < 0.7  # sigma 0.5 of each token's RMS reached the model party
    with pytest.raises(Exception, match="sigma"):
        parse_config(run_config(tmp_path, "bad", defenses=[{"name": "token_noise", "sigma": -1}]))


class Redact(Defense):
    """A text defense: every text field becomes one repeated word."""

    name = "redact"

    def on_text(self, texts, context):  # type: ignore[no-untyped-def]
        return ["the the the" for _ in texts]


def test_ground_truth_keeps_the_batch_before_a_text_defense_rewrote_it(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from splitfed.privacy.recording import GroundTruthReader, ground_truth_dir

    monkeypatch.setitem(defenses.DEFENSES, Redact.name, Redact)
    save_tiny_pretrained(tmp_path / "model")
    write_topic_csv(tmp_path / "data.csv")
    raw = run_config(tmp_path, "redacted", defenses=[{"name": "redact"}])
    raw["train"] |= {"steps": 1, "eval_before": False}
    train(parse_config(raw), progress=False, log=lambda s: None, record=tmp_path / "rec")
    truth = GroundTruthReader(ground_truth_dir(tmp_path / "rec"))
    phases = set()
    for batch in truth.batches():
        phases.add(batch.phase)
        sent, original = batch.tensor("input_ids"), batch.tensor("original_input_ids")
        hidden_rows = sent.shape[0]
        assert original.shape[0] == hidden_rows
        # What the head ran on is the redacted text; the original is what an attack must recover.
        assert len(set(sent[batch.tensor("attention_mask").bool()].tolist())) <= 3
        assert len(set(original[batch.tensor("original_attention_mask").bool()].tolist())) > 5
    assert phases == {"train", "eval"}
