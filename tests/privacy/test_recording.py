"""Recordings on disk: bit-exact, bounded, filtered, lazy; ground truth that lines up and never crosses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from splitfed.cli import app
from splitfed.config import parse_config
from splitfed.models.partition import FinetuneSpec, SplitSpec
from splitfed.privacy.recording import (
    GroundTruthReader,
    GroundTruthWriter,
    RecordingError,
    RecordingReader,
    RecordingWriter,
    ground_truth_dir,
    phase_of,
)
from splitfed.run import train
from splitfed.split.decoding import DecodingConfig
from splitfed.split.inference import SplitGenerator
from splitfed.split.parties import MicroBatch, OptimSpec
from splitfed.split.system import build_split
from splitfed.transport.channel import Message
from tiny import (
    run_config,
    save_tiny_pretrained,
    simple_loss,
    tiny_batch,
    tiny_model,
    tiny_tokenizer,
    write_topic_csv,
)

LORA = FinetuneSpec("lora", r=4)


def _bits(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _random(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bits of ``dtype`` (floats include NaNs and infinities with arbitrary payloads)."""
    g = torch.Generator().manual_seed(seed)
    size = torch.tensor([], dtype=dtype).element_size()
    numel = 1
    for n in shape:
        numel *= n
    raw = torch.randint(0, 256, (numel * size,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


# ---------------------------------------------------------------------- the format


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.int64, torch.bool]
)
def test_tensors_come_back_bit_for_bit_in_their_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    sent = {
        "a": _random(dtype, (3, 5, 7), seed=1),
        "odd": _random(dtype, (3,), seed=2),  # leaves the next tensor unaligned unless padded
        "strided": _random(dtype, (6, 4), seed=3).t(),  # not contiguous
        "scalar": _random(dtype, (), seed=4),
        "empty": _random(dtype, (0, 4), seed=5),
    }
    with RecordingWriter(tmp_path / "rec", shard_bytes=1 << 12) as writer:
        writer("to_model", Message("forward", sent, {"train": True, "batch_id": 1}))
    (record,) = RecordingReader(tmp_path / "rec")
    got = record.tensors()
    assert set(got) == set(sent)
    for name, tensor in sent.items():
        assert got[name].dtype == dtype and got[name].shape == tensor.shape, name
        assert _bits(got[name]) == _bits(tensor), name
    assert record.tensor_info["a"].nbytes == sent["a"].numel() * sent["a"].element_size()


def test_shards_roll_over_and_a_large_tensor_gets_its_own(tmp_path: Path) -> None:
    shard_bytes = 1000
    sent = [torch.randn(60) for _ in range(10)] + [torch.randn(600)]  # 240 B each, then 2400 B
    with RecordingWriter(tmp_path / "rec", shard_bytes=shard_bytes) as writer:
        for i, tensor in enumerate(sent):
            writer("to_model", Message("forward", {"hidden": tensor}, {"batch_id": i}))
            assert writer._shards._buffer is None or writer._shards._buffer.numel() == shard_bytes
    reader = RecordingReader(tmp_path / "rec")
    shards = reader.manifest["shards"]
    assert len(shards) >= 4
    assert [s["tensors"] for s in shards[:2]] == [4, 4]  # four 240-byte tensors fit 1000 bytes
    assert sorted(p.name for p in (tmp_path / "rec").glob("shard-*")) == [s["file"] for s in shards]
    big = reader[10].tensor_info["hidden"]
    assert [r.tensor_info["hidden"].shard for r in reader].count(big.shard) == 1
    for record, tensor in zip(reader, sent, strict=True):
        assert torch.equal(record.tensor("hidden"), tensor)
    assert reader.stored_bytes == sum(t.numel() * 4 for t in sent)


def test_a_byte_budget_stops_storing_tensors_and_counts_what_was_dropped(tmp_path: Path) -> None:
    tensors = [torch.randn(100) for _ in range(5)]  # 400 bytes each
    with RecordingWriter(tmp_path / "rec", byte_budget=1000, shard_bytes=512) as writer:
        for i, tensor in enumerate(tensors):
            writer("to_model", Message("forward", {"hidden": tensor}, {"batch_id": i}))
        assert writer.exhausted
    reader = RecordingReader(tmp_path / "rec")
    assert len(reader) == 5  # every crossing keeps its metadata
    assert [r.stored for r in reader] == [True, True, False, False, False]
    assert reader.stored_bytes == 800 and reader.dropped_bytes == 1200
    assert reader.manifest["dropped_tensors"] == 3 and reader.manifest["dropped_records"] == 3
    assert torch.equal(reader[1].tensor("hidden"), tensors[1])
    assert reader[3].tensor_info["hidden"].shape == (100,)
    with pytest.raises(RecordingError, match="byte_budget"):
        reader[3].tensor("hidden")


def test_the_writer_filters_by_kind_phase_and_direction(tmp_path: Path) -> None:
    messages = [
        ("to_model", Message("forward", {"hidden": torch.ones(2)}, {"train": True, "batch_id": 1})),
        ("to_data", Message("forward_result", {"logits": torch.ones(2)}, {"batch_id": 1})),
        ("to_model", Message("forward", {"hidden": torch.ones(2)}, {"train": False, "batch_id": 2})),
        ("to_data", Message("forward_result", {"logits": torch.ones(2)}, {})),
        ("to_model", Message("gen_start", {"hidden": torch.ones(2)}, {"session": "s"})),
        ("to_data", Message("gen_result", {"token": torch.ones(2)}, {})),
    ]

    def record(name: str, **filters: object) -> list[tuple[str, str, str]]:
        with RecordingWriter(tmp_path / name, **filters) as writer:  # type: ignore[arg-type]
            for direction, message in messages:
                writer(direction, message)  # type: ignore[arg-type]
        return [(r.direction, r.kind, r.phase) for r in RecordingReader(tmp_path / name)]

    assert record("all") == [
        ("to_model", "forward", "train"),
        ("to_data", "forward_result", "train"),
        ("to_model", "forward", "eval"),
        ("to_data", "forward_result", "eval"),
        ("to_model", "gen_start", "generate"),
        ("to_data", "gen_result", "generate"),
    ]
    assert record("eval", phases="eval") == [
        ("to_model", "forward", "eval"),
        ("to_data", "forward_result", "eval"),
    ]
    assert record("sent", directions="to_model", kinds=["forward"]) == [
        ("to_model", "forward", "train"),
        ("to_model", "forward", "eval"),
    ]
    assert RecordingReader(tmp_path / "eval").manifest["skipped_records"] == 4
    reader = RecordingReader(tmp_path / "all")
    assert [r.kind for r in reader.records(phases="generate", directions="to_data")] == ["gen_result"]
    assert len(list(reader.records(clients="nobody"))) == 0
    with pytest.raises(ValueError, match="unknown phases"):
        RecordingWriter(tmp_path / "bad", phases="training")


def test_phase_of_reads_kind_and_metadata() -> None:
    assert phase_of("forward", {"train": True}) == "train"
    assert phase_of("forward", {"train": False}) == "eval"
    assert phase_of("forward", {}) == "eval"  # as the model party reads a forward without the flag
    assert phase_of("backward", {}) == "train"
    assert phase_of("gen_step", {"session": "x"}) == "generate"
    assert phase_of("forward_result", {"batch_id": 3}) == "other"  # the writer lets replies inherit
    assert phase_of("fedavg", {}) == "other"


def test_the_reader_loads_tensors_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors

    with RecordingWriter(tmp_path / "rec", shard_bytes=256) as writer:
        for i in range(6):
            writer("to_model", Message("forward", {"hidden": torch.full((16,), float(i))}, {"batch_id": i}))
    opened: list[str] = []
    real = safetensors.safe_open

    def counting(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", counting)
    reader = RecordingReader(tmp_path / "rec")
    records = list(reader)
    assert len(reader) == 6 and [r.batch_id for r in records] == list(range(6))
    assert opened == []
    assert torch.equal(records[4].tensor("hidden"), torch.full((16,), 4.0))
    assert opened == [reader.manifest["shards"][records[4].tensor_info["hidden"].shard]["file"]]


def test_missing_or_corrupt_recordings_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(RecordingError, match="holds no recording"):
        RecordingReader(tmp_path / "nothing")
    with RecordingWriter(tmp_path / "rec", shard_bytes=256) as writer:
        for i in range(3):
            writer("to_model", Message("forward", {"hidden": torch.randn(40)}, {"batch_id": i}))
    rec = tmp_path / "rec"
    manifest = (rec / "manifest.json").read_text()
    with pytest.raises(RecordingError, match="already holds a recording"):
        RecordingWriter(rec)

    (rec / "manifest.json").write_text(manifest[: len(manifest) // 2])
    with pytest.raises(RecordingError, match=r"manifest .* is corrupt"):
        RecordingReader(rec)
    (rec / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(RecordingError, match="not a splitfed recording"):
        RecordingReader(rec)
    (rec / "manifest.json").write_text(manifest)

    shard = rec / "shard-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(RecordingError, match=r"shard-00001\.safetensors .* expected"):
        RecordingReader(rec)
    shard.write_bytes(b"\xff" * len(data))  # right size, garbage header
    reader = RecordingReader(rec)
    with pytest.raises(RecordingError, match=r"shard-00001\.safetensors .* is corrupt"):
        reader[1].tensor("hidden")
    assert reader[0].tensor("hidden").shape == (40,)  # the other shards still read
    shard.unlink()
    with pytest.raises(RecordingError, match=r"shard-00001\.safetensors .* is missing"):
        RecordingReader(rec)
    with pytest.raises(RecordingError, match="GroundTruthReader"):
        GroundTruthWriter(tmp_path / "gt").close()
        RecordingReader(tmp_path / "gt")


def test_a_crashed_writer_leaves_every_completed_shard_readable(tmp_path: Path) -> None:
    writer = RecordingWriter(tmp_path / "rec", shard_bytes=400)
    tensors = [torch.randn(50) for _ in range(7)]  # 200 bytes: two per shard
    for i, tensor in enumerate(tensors):
        writer("to_model", Message("forward", {"hidden": tensor}, {"batch_id": i}))
    # no close(): as if the process died here, with the seventh tensor still buffered
    reader = RecordingReader(tmp_path / "rec")
    assert not reader.closed
    assert len(reader) == 6
    for record in reader:
        assert torch.equal(record.tensor("hidden"), tensors[record.index])
    writer.close()
    reader = RecordingReader(tmp_path / "rec")
    assert reader.closed and len(reader) == 7
    with pytest.raises(RecordingError, match="closed"):
        writer("to_model", Message("forward", {"hidden": tensors[0]}, {}))


# ---------------------------------------------------------------------- in a split


def _system(tmp_path: Path, spec: SplitSpec, head: str = "causal_lm", **kw: object):
    writer = RecordingWriter(tmp_path / "rec", shard_bytes=1 << 14)
    truth = GroundTruthWriter(ground_truth_dir(tmp_path / "rec"))
    system = build_split(
        tiny_model("llama", head),
        spec,
        head,
        {"head": LORA, "body": LORA, "tail": LORA},
        simple_loss(head),
        OptimSpec(),
        recorder=writer,  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )
    system.data_party.ground_truth = truth
    return system, writer, truth


def test_replies_inherit_phase_step_and_batch_of_their_request(tmp_path: Path) -> None:
    system, writer, truth = _system(tmp_path, SplitSpec("ht", 1))
    batches = [tiny_batch("causal_lm", seed=s) for s in range(4)]
    micro = [
        MicroBatch(b, update=i % 2 == 1, loss_scale=0.5, ids=[3 * i, 3 * i + 1, 3 * i + 2])
        for i, b in enumerate(batches)
    ]
    list(system.data_party.train_stream(micro, window=2))  # pipelined: two forwards in flight
    system.data_party.predict(batches[0])
    decoding = DecodingConfig(max_new_tokens=3, ignore_eos=True)
    head, channel = system.segments["head"], system.channel
    with SplitGenerator(
        head, channel, tiny_tokenizer(), decoding=decoding, ground_truth=truth.generation
    ) as gen:
        gen.generate(["the cat sat", "a dog"])
    writer.close()
    truth.close()
    got = [(r.kind, r.phase, r.step, r.batch_id) for r in RecordingReader(tmp_path / "rec")]
    train = [g for g in got if g[1] == "train"]
    assert sorted(train) == sorted(
        (kind, "train", 1 + (b - 1) // 2, b)
        for b in range(1, 5)
        for kind in ("forward", "forward_result", "backward", "backward_result")
    )
    assert ("forward", "eval", 2, 5) in got and ("forward_result", "eval", 2, 5) in got
    generation = [g for g in got if g[1] == "generate"]
    assert [g[0] for g in generation] == [
        "gen_start",
        "gen_result",
        "gen_step",
        "gen_result",
        "gen_step",
        "gen_result",
        "gen_end",
    ]
    assert all(g[2] == 2 for g in generation)  # two steps done before generating
    reader = RecordingReader(tmp_path / "rec")
    assert {r.session for r in reader.records(phases="generate")} == {gen.session_id}
    session = GroundTruthReader(ground_truth_dir(tmp_path / "rec")).generation(gen.session_id)
    assert session.generated_ids == gen.generated and all(len(row) == 3 for row in session.generated_ids)
    start = next(reader.records(kinds="gen_start"))
    assert tuple(session.tensor("prompt_ids").shape) == tuple(start.tensor("attention_mask").shape)
    assert torch.equal(session.tensor("attention_mask"), start.tensor("attention_mask"))


def test_steps_count_on_from_a_resumed_run(tmp_path: Path) -> None:
    with RecordingWriter(tmp_path / "rec", start_step=7) as writer:
        writer("to_model", Message("forward", {}, {"train": True, "batch_id": 1, "update": True}))
        writer("to_model", Message("backward", {}, {"batch_id": 1, "update": True}))
        writer("to_model", Message("forward", {}, {"train": False, "batch_id": 2}))
    assert [r.step for r in RecordingReader(tmp_path / "rec")] == [8, 8, 8]


def test_in_process_the_recording_is_what_the_model_party_received(tmp_path: Path) -> None:
    received: list[Message] = []
    system, writer, _ = _system(tmp_path, SplitSpec("hbt", 1, 1))
    handle = system.model_party.handle

    def spy(message: Message) -> Message | None:
        received.append(
            Message(message.kind, {k: v.clone() for k, v in message.tensors.items()}, dict(message.meta))
        )
        return handle(message)

    system.channel.handler = spy
    system.data_party.train_step(tiny_batch("causal_lm"))
    writer.close()
    recorded = list(RecordingReader(tmp_path / "rec").records(directions="to_model"))
    assert [r.kind for r in recorded] == [m.kind for m in received] == ["forward", "backward"]
    for record, message in zip(recorded, received, strict=True):
        assert record.meta == message.meta
        for name, tensor in message.tensors.items():
            assert _bits(record.tensor(name)) == _bits(tensor) and record.tensor(name).dtype == tensor.dtype


# ---------------------------------------------------------------------- a whole run


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("recorded-run")
    save_tiny_pretrained(root / "model")
    write_topic_csv(root / "data.csv")
    return root


SETTINGS = {
    "hbt": {"task": "classification", "split": {"setting": "hbt", "head_layers": 1, "tail_layers": 1}},
    "ht_labels_at_data": {
        "task": "causal_lm",
        "split": {"setting": "ht", "head_layers": 1, "tail_layers": 0, "labels_at": "data"},
    },
    "ht_labels_at_model": {
        "task": "causal_lm",
        "split": {"setting": "ht", "head_layers": 1, "tail_layers": 0, "labels_at": "model"},
    },
}


def _run_config(workspace: Path, name: str, setting: str) -> dict:
    sections = dict(SETTINGS[setting])
    if sections["task"] == "causal_lm":
        sections["data"] = {"name": "local", "task": "causal_lm", "columns": {"text": "sentence"}}
    raw = run_config(
        workspace, name, train={"steps": 3, "grad_accum": 2, "eval_max_new_tokens": 0}, **sections
    )
    raw["data"]["max_eval"] = 8
    return raw


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_every_recorded_forward_has_ground_truth_and_no_tokens_or_labels_cross(
    workspace: Path, setting: str
) -> None:
    record = workspace / f"rec-{setting}"
    result = train(
        parse_config(_run_config(workspace, f"run-{setting}", setting)),
        progress=False,
        log=lambda s: None,
        record=record,
    )
    assert result.summary["recording"]["records"] > 0
    reader = RecordingReader(record)
    truth = GroundTruthReader(ground_truth_dir(record))
    forwards = list(reader.records(kinds="forward"))
    assert {r.phase for r in forwards} == {"train", "eval"}
    assert len([r for r in forwards if r.phase == "train"]) == 3 * 2  # steps x grad_accum
    assert sorted(r.batch_id for r in forwards) == sorted(truth.batch_ids)
    labels_cross = setting == "ht_labels_at_model"
    for forward in forwards:
        assert forward.batch_id is not None
        batch = truth.batch(forward.batch_id)
        mask = forward.tensor("attention_mask")
        assert batch.phase == forward.phase
        assert (
            (batch.batch_size, batch.seq_len)
            == tuple(mask.shape)
            == tuple(forward.tensor("hidden").shape[:2])
        )
        assert torch.equal(batch.tensor("attention_mask"), mask)
        if forward.phase == "train":
            assert batch.example_ids is not None and len(batch.example_ids) == batch.batch_size
            assert len(set(batch.example_ids)) == batch.batch_size
        assert ("labels" in forward.tensor_info) == (labels_cross and forward.phase == "train")
        if "labels" in forward.tensor_info:  # labels_at: model sends them, exactly
            assert torch.equal(forward.tensor("labels"), batch.tensor("labels"))
    for crossing in reader:
        assert "input_ids" not in crossing.tensor_info
        if crossing.batch_id is None:
            continue
        batch = truth.batch(crossing.batch_id)
        private = {"input_ids": batch.tensor("input_ids"), "labels": batch.tensor("labels")}
        for name, tensor in crossing.tensors().items():
            if name == "attention_mask" or (name == "labels" and labels_cross):
                continue
            assert name != "labels", (crossing.kind, crossing.phase)
            for what, secret in private.items():
                if tensor.shape == secret.shape:
                    assert not torch.equal(tensor.to(secret.dtype), secret), (crossing.kind, name, what)


def test_cli_train_records_and_refuses_a_used_directory(workspace: Path, tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_run_config(workspace, "cli-rec", "hbt")))
    runner = CliRunner()
    record = tmp_path / "rec"
    ok = runner.invoke(
        app, ["train", str(path), "--no-progress", "--set", "train.steps=1", "--record", str(record)]
    )
    assert ok.exit_code == 0, ok.output
    assert "recording:" in ok.output and RecordingReader(record).closed
    assert GroundTruthReader(ground_truth_dir(record)).batch_ids
    again = runner.invoke(app, ["train", str(path), "--no-progress", "--record", str(record)])
    assert again.exit_code == 2 and "already holds a recording" in again.output
