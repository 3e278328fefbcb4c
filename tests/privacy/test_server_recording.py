"""The model party's tap: what it records is exactly what it decoded, codec and defenses included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from splitfed.config import parse_config
from splitfed.privacy.recording import RecordingReader
from splitfed.runtime import start_server
from splitfed.transport.channel import Message
from splitfed.transport.codec import decode, encode
from splitfed.transport.grpc_channel import GrpcChannel
from splitfed.transport.wire import WireCodecs
from tiny import run_config, save_tiny_pretrained, served_run, write_topic_csv

HIDDEN = 32


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("server-recording")
    save_tiny_pretrained(root / "model")
    write_topic_csv(root / "data.csv")
    return root


@pytest.mark.parametrize("codec", ["fp32", "bf16", "int8"])
def test_the_model_party_records_what_it_decoded_bit_for_bit(
    workspace: Path, tmp_path: Path, codec: str
) -> None:
    raw = run_config(workspace, f"rec-{codec}")
    raw["model"]["num_labels"] = 3
    raw["train"]["steps"] = 5
    server = start_server(parse_config(raw), port=0, record=tmp_path / "rec")
    hidden = torch.randn(2, 5, HIDDEN) * 3
    mask = torch.ones(2, 5, dtype=torch.long)
    try:
        party = GrpcChannel(
            f"127.0.0.1:{server.port}", client_id="hospital", codecs=WireCodecs(codec, "fp32")
        )
        out = party.request(Message("forward", {"hidden": hidden, "attention_mask": mask}, {"train": True}))
        grad = torch.randn_like(out.tensors["hidden"])
        party.request(Message("backward", {"grad": grad}, {"batch_id": 0}))
        party.close()
    finally:
        server.stop()
    reader = RecordingReader(tmp_path / "rec")
    forward, backward = list(reader.records(kinds="forward")), list(reader.records(kinds="backward"))
    assert len(forward) == 1 and len(backward) == 1
    name = {"fp32": "raw", "bf16": "bf16", "int8": "int8"}[codec]
    expected = decode(encode("hidden", hidden, name))  # what the wire delivers
    got = forward[0].tensor("hidden")
    assert got.dtype == expected.dtype and torch.equal(got.view(torch.int32), expected.view(torch.int32))
    if codec != "fp32":
        assert not torch.equal(got, hidden)  # the record is the decoded tensor, not the sender's
    assert torch.equal(forward[0].tensor("attention_mask"), mask)
    assert torch.equal(backward[0].tensor("grad"), grad)
    assert forward[0].client == "hospital" and forward[0].phase == "train"
    # Its own replies too (the model party knows what it sent), paired with their request.
    (reply,) = list(reader.records(kinds="forward_result"))
    assert reply.direction == "to_data" and reply.phase == "train" and reply.client == "hospital"
    # Recorded as computed, before the codec: encoded, it is what the data party received.
    assert torch.equal(decode(encode("hidden", reply.tensor("hidden"), name)), out.tensors["hidden"])
    assert {r.direction for r in reader} == {"to_model", "to_data"}


def test_a_server_recording_lines_up_with_the_joined_party_s_ground_truth(
    workspace: Path, tmp_path: Path
) -> None:
    from splitfed.privacy.recording import GroundTruthReader, ground_truth_dir

    raw = run_config(workspace, "rec-join")
    raw["model"]["num_labels"] = 3
    raw["train"] |= {"steps": 3, "eval_before": False}
    cfg = parse_config(raw)
    result = served_run(cfg, tmp_path / "server", tmp_path / "party")
    assert result.summary["recording"]["records"] > 0
    truth = GroundTruthReader(ground_truth_dir(tmp_path / "party"))
    forwards = list(RecordingReader(tmp_path / "server").records(kinds="forward"))
    assert {f.phase for f in forwards} == {"train", "eval"}
    for record in forwards:
        batch = truth.batch(record.batch_id, record.client)  # the pairing an attack scores by
        assert record.client == "clinic" and batch.phase == record.phase
        assert tuple(batch.tensor("attention_mask").shape) == tuple(record.tensor("hidden").shape[:2])
    # The party's own tap saw what it sent (before the codec), the same number of forwards.
    sent = list(RecordingReader(tmp_path / "party").records(kinds="forward"))
    assert len(sent) == len(forwards) and {r.direction for r in RecordingReader(tmp_path / "party")} == {
        "to_model",
        "to_data",
    }
