"""What crosses the split, per setting: exactly the tensors the protocol allows, never tokens."""

from __future__ import annotations

import pytest
import torch

from splitfed.models.partition import FinetuneSpec, SplitSpec
from splitfed.split.parties import OptimSpec
from splitfed.split.system import build_split
from splitfed.transport.channel import CrossingRecorder, Message, TransformRule
from tiny import simple_loss, tiny_batch, tiny_model

LORA = FinetuneSpec("lora", r=4)
FROZEN = FinetuneSpec("frozen")


def _run(setting: SplitSpec, labels_at: str, head_ft: FinetuneSpec, head: str = "classification", **kw):
    model = tiny_model("llama", head)
    recorder = CrossingRecorder()
    batch = tiny_batch(head)
    system = build_split(
        model,
        setting,
        head,
        {"head": head_ft, "body": LORA, "tail": LORA},
        simple_loss(head),
        OptimSpec(),
        labels_at=labels_at,
        recorder=recorder,
        **kw,  # type: ignore[arg-type]
    )
    system.data_party.train_step(batch)
    return recorder, batch, system


def _shape(recorder: CrossingRecorder) -> list[tuple[str, str, tuple[str, ...]]]:
    return [(c.direction, c.kind, tuple(sorted(c.tensors))) for c in recorder.crossings]


def _assert_no_tokens(recorder: CrossingRecorder, batch: dict[str, torch.Tensor]) -> None:
    for c in recorder.crossings:
        for name, tensor in c.tensors.items():
            assert name != "input_ids"
            if tensor.shape == batch["input_ids"].shape and name != "attention_mask":
                assert not torch.equal(tensor.to(batch["input_ids"].dtype), batch["input_ids"]), name


def test_ht_labels_at_data() -> None:
    recorder, batch, _ = _run(SplitSpec("ht", 1), "data", LORA)
    assert _shape(recorder) == [
        ("to_model", "forward", ("attention_mask", "hidden")),
        ("to_data", "forward_result", ("logits",)),
        ("to_model", "backward", ("grad",)),
        ("to_data", "backward_result", ("grad",)),
    ]
    _assert_no_tokens(recorder, batch)


def test_ht_labels_at_model_sends_labels_and_gets_loss() -> None:
    recorder, batch, _ = _run(SplitSpec("ht", 1), "model", LORA)
    assert _shape(recorder) == [
        ("to_model", "forward", ("attention_mask", "hidden", "labels")),
        ("to_data", "forward_result", ("grad", "loss")),
    ]
    assert torch.equal(recorder.crossings[0].tensors["labels"], batch["labels"])
    _assert_no_tokens(recorder, batch)


def test_hbt_labels_and_logits_never_cross() -> None:
    recorder, batch, _ = _run(SplitSpec("hbt", 1, 1), "data", LORA)
    assert _shape(recorder) == [
        ("to_model", "forward", ("attention_mask", "hidden")),
        ("to_data", "forward_result", ("hidden",)),
        ("to_model", "backward", ("grad",)),
        ("to_data", "backward_result", ("grad",)),
    ]
    for c in recorder.crossings:
        assert "labels" not in c.tensors and "logits" not in c.tensors
        assert all(t.is_floating_point() or n == "attention_mask" for n, t in c.tensors.items())
    _assert_no_tokens(recorder, batch)


@pytest.mark.parametrize(
    ("setting", "labels_at"),
    [(SplitSpec("ht", 1), "data"), (SplitSpec("ht", 1), "model"), (SplitSpec("hbt", 1, 1), "data")],
)
def test_splitfrozen_sends_no_gradient_to_the_data_party(setting: SplitSpec, labels_at: str) -> None:
    recorder, _, system = _run(setting, labels_at, FROZEN)
    to_data = [c for c in recorder.crossings if c.direction == "to_data"]
    assert all("grad" not in c.tensors for c in to_data)
    assert not any(c.kind == "backward_result" for c in recorder.crossings)
    assert all(p.grad is None for p in system.segments["head"].parameters())


def test_splitfrozen_trains_the_model_party_only() -> None:
    model = tiny_model("llama", "classification")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    system = build_split(
        model,
        SplitSpec("ht", 2),
        "classification",
        {"body": LORA},
        simple_loss("classification"),
        OptimSpec(lr=1e-2),
    )
    system.data_party.train_step(tiny_batch("classification"))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before.get(n, p + 1))}
    assert changed and all(n.startswith(("model.layers.2", "model.layers.3", "score")) for n in changed)


def test_transform_applies_to_the_crossing_and_the_recording() -> None:
    doubled = TransformRule(lambda t: t * 2, kinds=("forward",), tensor_names=("hidden",))
    recorder, batch, system = _run(SplitSpec("ht", 1), "data", LORA, transforms=[doubled])
    recorder.clear()
    with torch.no_grad():
        expected = system.segments["head"](
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        )
    system.data_party.predict(batch)
    torch.testing.assert_close(recorder.of_kind("forward")[0].tensors["hidden"], expected * 2)
    # The model party computed on the transformed activations.
    with torch.no_grad():
        logits = system.segments["body"](hidden=expected * 2, attention_mask=batch["attention_mask"])
    torch.testing.assert_close(recorder.of_kind("forward_result")[0].tensors["logits"], logits)


def test_bytes_are_counted_per_step() -> None:
    recorder, batch, system = _run(SplitSpec("ht", 1), "data", LORA)
    total = sum(c.nbytes for c in recorder.crossings)
    assert system.channel.bytes_to_model + system.channel.bytes_to_data == total > 0
    step = system.data_party.train_step(batch)
    assert step.bytes_to_model + step.bytes_to_data == total


def test_same_seed_same_result() -> None:
    losses = []
    for _ in range(2):
        torch.manual_seed(3)
        model = tiny_model("gpt2", "classification", seed=3)
        system = build_split(
            model,
            SplitSpec("ht", 1),
            "classification",
            dict.fromkeys(["head", "body"], LORA),
            simple_loss("classification"),
            OptimSpec(lr=1e-2),
        )
        losses.append(
            [system.data_party.train_step(tiny_batch("classification", seed=s)).loss for s in range(4)]
        )
    assert losses[0] == losses[1]
    assert losses[0][0] != losses[0][-1]


def test_gradient_accumulation_equals_one_big_batch() -> None:
    """Two half batches with loss_scale 1/2 and one update == one full batch (classification mean loss)."""
    full = tiny_batch("classification", batch=4, seed=5)
    for row in range(4):  # no padding, so the halves are independent of each other
        full["attention_mask"][row] = 1
    halves = [{k: v[:2] for k, v in full.items()}, {k: v[2:] for k, v in full.items()}]
    results = []
    for micro_batches in ([full], halves):
        model = tiny_model("gpt2", "classification", seed=1)
        system = build_split(
            model,
            SplitSpec("ht", 1),
            "classification",
            dict.fromkeys(["head", "body"], LORA),
            simple_loss("classification"),
            OptimSpec(optimizer="sgd", lr=0.1, max_grad_norm=None),
        )
        n = len(micro_batches)
        for i, mb in enumerate(micro_batches):
            system.data_party.train_step(mb, update=i == n - 1, loss_scale=1.0 / n)
        results.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], atol=1e-6, rtol=0, msg=key)


def test_one_model_party_serves_heads_of_different_depths() -> None:
    """SplitFrozen heterogeneity: each data party picks its head_layers; the model party enters its body there."""
    from splitfed.models.partition import partition
    from splitfed.split.parties import DataParty
    from splitfed.split.system import build_model_party
    from splitfed.transport.channel import InProcessChannel

    loss = simple_loss("classification")
    model = tiny_model("llama", "classification", seed=0)
    party, segments, _ = build_model_party(
        model, SplitSpec("ht", 1), "classification", {"body": LORA}, OptimSpec()
    )
    deeper_model = tiny_model("llama", "classification", seed=0)  # a device that runs 3 blocks itself
    deeper = partition(deeper_model, SplitSpec("ht", 3), "classification")["head"]
    shallow_dp = DataParty(segments["head"], InProcessChannel(party.handle), loss, OptimSpec(), client_id="a")
    deep_dp = DataParty(deeper, InProcessChannel(party.handle), loss, OptimSpec(), client_id="b")
    batch = tiny_batch("classification")
    # LoRA starts as a no-op (B = 0), so both equal the unsplit model before any update.
    with torch.no_grad():
        reference = deeper_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(deep_dp.predict(batch), reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(shallow_dp.predict(batch), reference, atol=1e-5, rtol=0)
    for _ in range(2):
        shallow_dp.train_step(batch)
        deep_dp.train_step(batch)
    assert party.updates == 4 and set(party._views) == {3}
    with pytest.raises(ValueError, match="head_layers must be between 1 and 3"):
        party.handle(
            Message(
                "forward",
                {"hidden": torch.zeros(1, 2, 32), "attention_mask": torch.ones(1, 2, dtype=torch.long)},
                {"head_layers": 4},
            )
        )


@pytest.mark.parametrize("window", [1, 3])
@pytest.mark.parametrize(
    ("setting", "labels_at"), [(SplitSpec("ht", 1), "model"), (SplitSpec("hbt", 1, 1), "data")]
)
def test_time_in_the_model_party_counts_as_the_data_party_waiting(
    setting: SplitSpec, labels_at: str, window: int
) -> None:
    import time

    from splitfed.split.parties import MicroBatch

    _, batch, system = _run(setting, labels_at, LORA)
    handler = system.channel.handler  # type: ignore[attr-defined]

    def slow(message: Message) -> Message | None:
        time.sleep(0.02)
        return handler(message)

    system.channel.handler = slow  # type: ignore[attr-defined]
    party = system.data_party
    party.wait_s = 0.0
    messages = system.channel.messages
    micro = [MicroBatch(batch, update=i == 2, loss_scale=1 / 3) for i in range(3)]
    assert len(list(party.train_stream(micro, window))) == 3
    to_model = (system.channel.messages - messages) // 2  # every message here gets a reply
    assert to_model >= 3 and party.wait_s >= 0.02 * to_model


def test_transform_rules_receive_a_context_and_filter_by_phase() -> None:
    from splitfed.transport.channel import TransformContext

    seen: list[TransformContext] = []

    def note(tensor: torch.Tensor, context: TransformContext) -> torch.Tensor:
        seen.append(context)
        return tensor

    rule = TransformRule(
        note, kinds=("forward",), tensor_names=("hidden",), phases=("eval",), with_context=True
    )
    mask = torch.ones(1, 2, dtype=torch.long)
    message = Message("forward", {"hidden": torch.zeros(1, 2, 3), "attention_mask": mask}, {"batch_id": 4})
    rule("to_model", message)
    rule(
        "to_model", Message("forward", dict(message.tensors), {"train": True})
    )  # a training forward: skipped
    assert len(seen) == 1
    assert (seen[0].direction, seen[0].kind, seen[0].phase, seen[0].batch_id) == (
        "to_model",
        "forward",
        "eval",
        4,
    )
    assert seen[0].attention_mask is mask
