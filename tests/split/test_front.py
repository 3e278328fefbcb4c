"""The data-party front: a trainable defense with an auxiliary loss plugs into every split run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from splitfed.config import ConfigError, parse_config
from splitfed.models.partition import FinetuneSpec, SplitSpec
from splitfed.privacy.defenses import DEFENSES, DefenseConfigError, build_defense
from splitfed.privacy.defenses.gaussian_mixer import GaussianMixer
from splitfed.run import train
from splitfed.runtime import join, start_server
from splitfed.split.front import DataFront, Defense, FrontContext
from splitfed.split.inference import SplitGenerator
from splitfed.split.parties import MicroBatch, OptimSpec
from splitfed.split.system import build_split
from splitfed.transport.channel import CrossingRecorder
from tiny import (
    run_config,
    save_tiny_pretrained,
    simple_loss,
    tiny_batch,
    tiny_model,
    tiny_tokenizer,
    write_topic_csv,
)

HIDDEN = 32
DEFENSE = {"name": "gaussian_mixer", "sigma": 0.0, "weight": 0.5}
SETTINGS = {
    "ht": {"split": {"setting": "ht", "head_layers": 1, "tail_layers": 0}},
    "hbt": {"split": {"setting": "hbt", "head_layers": 1, "tail_layers": 1}},
}


def _mixer(**kw: object) -> GaussianMixer:
    return build_defense(DEFENSE | kw, hidden_size=HIDDEN)  # type: ignore[return-value]


def _system(spec: SplitSpec, head_mode: str, front: DataFront, lr: float = 1e-2):  # type: ignore[no-untyped-def]
    model = tiny_model("llama", "classification")
    ft = {
        "head": FinetuneSpec(head_mode),
        "body": FinetuneSpec("lora", r=2),
        "tail": FinetuneSpec("lora", r=2),
    }  # type: ignore[arg-type]
    return build_split(
        model, spec, "classification", ft, simple_loss("classification"), OptimSpec(lr=lr), front=front
    )


@pytest.mark.parametrize("spec", [SplitSpec("ht", 1), SplitSpec("hbt", 1, 1)], ids=["ht", "hbt"])
@pytest.mark.parametrize("head_mode", ["lora", "frozen"], ids=["splitlora", "splitfrozen"])
def test_a_trainable_defense_trains_with_its_aux_loss_even_on_a_frozen_head(
    spec: SplitSpec, head_mode: str
) -> None:
    mixer = _mixer()
    system = _system(spec, head_mode, DataFront([mixer]))
    party = system.data_party
    assert party.needs_input_grad and not party.can_stream
    assert any(p is mixer.mix.weight for p in party.trainer.params)  # joins the data party's optimizer
    before = mixer.mix.weight.detach().clone()
    batch = tiny_batch("classification")
    party.train_step(batch, update=False)
    assert mixer.mix.weight.grad is not None and bool(mixer.mix.weight.grad.abs().sum() > 0)
    party.train_step(batch)
    assert not torch.equal(mixer.mix.weight, before)


def test_the_aux_loss_joins_the_backward_pass_scaled_by_the_loss_scale() -> None:
    """grad_accum 4 with loss_scale 1/4 equals one batch four times as large (same lengths, no padding)."""
    g = torch.Generator().manual_seed(3)
    big = {
        "input_ids": torch.randint(3, 60, (8, 6), generator=g),
        "attention_mask": torch.ones(8, 6, dtype=torch.long),
        "labels": torch.randint(0, 3, (8,), generator=g),
    }
    grads = []
    for micro in (1, 4):
        torch.manual_seed(0)
        mixer = _mixer(weight=2.0)
        with torch.no_grad():
            mixer.mix.weight.add_(0.05 * torch.randn_like(mixer.mix.weight))  # so the aux loss is not zero
        system = _system(SplitSpec("ht", 1), "lora", DataFront([mixer]))
        rows = 8 // micro
        stream = [
            MicroBatch({k: v[i * rows : (i + 1) * rows] for k, v in big.items()}, i == micro - 1, 1.0 / micro)
            for i in range(micro)
        ]
        # Measure the accumulated gradient just before the update: run all but the update.
        for m in stream:
            system.data_party.train_step(m.batch, update=False, loss_scale=m.loss_scale)
        grads.append(mixer.mix.weight.grad.detach().clone())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-4)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("front")
    save_tiny_pretrained(root / "model")
    write_topic_csv(root / "data.csv")
    return root


def _cfg(root: Path, out: str, setting: str, mode: str = "splitlora", **extra: object):  # type: ignore[no-untyped-def]
    raw = run_config(root, out, mode=mode, defenses=[DEFENSE], **SETTINGS[setting], **extra)
    raw["model"]["num_labels"] = 3
    raw["train"] |= {"steps": 4, "eval_before": False}
    return parse_config(raw)


@pytest.mark.parametrize("setting", ["ht", "hbt"])
def test_in_process_and_loopback_runs_with_a_defense_agree(workspace: Path, setting: str) -> None:
    local = train(_cfg(workspace, f"{setting}-local", setting), progress=False, log=lambda s: None)
    cfg = _cfg(workspace, f"{setting}-remote", setting)
    server = start_server(cfg, port=0)
    try:
        remote = join(cfg, f"127.0.0.1:{server.port}", client_id="a", progress=False, log=lambda s: None)
    finally:
        server.stop()
    assert [h["loss"] for h in remote.history] == pytest.approx([h["loss"] for h in local.history], abs=1e-5)
    # The defense trained and its parameters are in the data party's adapter file.
    saved = load_file(str(local.output_dir / "data_party" / "adapter.safetensors"))
    mix = [k for k in saved if k.startswith("front.")]
    assert mix and not torch.equal(saved[next(k for k in mix if k.endswith("weight"))], torch.eye(HIDDEN))
    remote_saved = load_file(str(remote.output_dir / "data_party" / "adapter.safetensors"))
    for key in mix:
        torch.testing.assert_close(remote_saved[key], saved[key], atol=1e-5, rtol=0)


def test_splitfrozen_with_a_defense_checkpoints_and_resumes_exactly(workspace: Path) -> None:
    full = train(_cfg(workspace, "frozen-full", "ht", mode="splitfrozen"), progress=False, log=lambda s: None)
    from test_run import _stop_after

    cfg = _cfg(workspace, "frozen-resumed", "ht", mode="splitfrozen")
    cfg.train.checkpoint_every = 2
    assert _stop_after(cfg, 2) == 2  # a crash right after the step-2 checkpoint
    ckpt = load_file(str(Path(cfg.output_dir) / "checkpoint" / "data_party" / "adapter.safetensors"))
    assert any(k.startswith("front.") for k in ckpt)
    resumed = train(cfg, resume=True, progress=False, log=lambda s: None)
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history], abs=1e-6)
    assert full.summary["trainable_params"]["data_party"] == HIDDEN * HIDDEN + HIDDEN  # only the defense


class _Counting(GaussianMixer):
    """The example defense, noting each phase and sequence length it saw."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__(hidden_size, sigma=0.0)
        self.seen: list[tuple[str, int]] = []

    def on_activations(self, hidden, context):  # type: ignore[no-untyped-def]
        self.seen.append((context.phase, int(hidden.shape[1])))
        return hidden + 1.0, hidden.new_zeros(())


@pytest.mark.parametrize("spec", [SplitSpec("ht", 1), SplitSpec("hbt", 1, 1)], ids=["ht", "hbt"])
def test_the_front_applies_at_prefill_and_every_decoding_step(spec: SplitSpec) -> None:
    model = tiny_model("llama", "causal_lm")
    counting = _Counting(HIDDEN)
    recorder = CrossingRecorder()
    system = build_split(
        model,
        spec,
        "causal_lm",
        {"body": FinetuneSpec("frozen")},
        simple_loss("causal_lm"),
        recorder=recorder,
        front=DataFront([counting]),
    )
    from splitfed.split.decoding import DecodingConfig

    gen = SplitGenerator(
        system.segments["head"],
        system.channel,
        tiny_tokenizer(),
        tail=system.segments.get("tail"),
        decoding=DecodingConfig(max_new_tokens=5, ignore_eos=True),
        front=system.data_party.front,
    )
    prompt = "the captain"
    gen.generate([prompt])
    prefix = len(tiny_tokenizer()(prompt)["input_ids"])
    assert counting.seen == [("generate", prefix)] + [("generate", 1)] * 4
    sent = [c for c in recorder.crossings if c.kind in ("gen_start", "gen_step")]
    assert len(sent) == 5
    with torch.no_grad():
        head_out = system.segments["head"](
            input_ids=tiny_tokenizer()([prompt], return_tensors="pt")["input_ids"]
        )
    torch.testing.assert_close(
        sent[0].tensors["hidden"], head_out + 1.0
    )  # what crossed is the defended output


def test_defense_configs_are_validated_with_the_key_and_the_range() -> None:
    assert "gaussian_mixer" in DEFENSES
    with pytest.raises(DefenseConfigError, match="sigma: Input should be greater than or equal to 0"):
        build_defense({"name": "gaussian_mixer", "sigma": -1}, hidden_size=4)
    with pytest.raises(DefenseConfigError, match=r"unknown defense 'nope'; available: .*gaussian_mixer"):
        build_defense({"name": "nope"})
    with pytest.raises(DefenseConfigError, match="colour: Extra inputs are not permitted"):
        build_defense({"name": "gaussian_mixer", "colour": "red"}, hidden_size=4)
    raw = run_config(Path("."), "x", defenses=[{"name": "gaussian_mixer", "weight": -2}])
    with pytest.raises(ConfigError, match="weight"):
        parse_config(raw)
    raw = run_config(
        Path("."),
        "x",
        mode="splitfrozen",
        defenses=[DEFENSE],
        split={"setting": "ht", "head_layers": 1, "tail_layers": 0, "labels_at": "model"},
        train={"schedule": "forward-only"},
    )
    with pytest.raises(ConfigError, match="forward-only cannot train a defense"):
        parse_config(raw)


def test_the_front_calls_only_the_hooks_a_defense_overrides() -> None:
    front = DataFront([_mixer()])
    assert not front.touches_text and not front.touches_embeddings and front.trains
    ctx = FrontContext("eval")
    assert front.text(["a"], ctx) == ["a"]
    grad = torch.randn(2, 3, HIDDEN)
    assert front.gradients(grad, ctx) is grad


class _Denoiser(Defense, torch.nn.Module):
    """A received-side defense: a learned scale on what comes back, noting each phase it saw."""

    name = "denoiser"

    def __init__(self) -> None:
        torch.nn.Module.__init__(self)
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.seen: list[tuple[str, str]] = []

    def on_received(self, name, tensor, context):  # type: ignore[no-untyped-def]
        self.seen.append((context.phase, name))
        return tensor * self.scale, (self.scale - 1.0).pow(2)


def test_what_comes_back_passes_the_front_in_training_evaluation_and_generation() -> None:
    denoiser = _Denoiser()
    system = _system(SplitSpec("hbt", 1, 1), "frozen", DataFront([denoiser]))
    batch = tiny_batch("classification")
    system.data_party.train_step(batch, update=False)
    assert denoiser.scale.grad is not None and float(denoiser.scale.grad.abs()) > 0  # trains with the task
    system.data_party.predict(batch)
    assert denoiser.seen == [("train", "hidden"), ("eval", "hidden")]

    model = tiny_model("llama", "causal_lm")
    gen_system = build_split(
        model, SplitSpec("hbt", 1, 1), "causal_lm", {}, simple_loss("causal_lm"), front=DataFront([denoiser])
    )
    from splitfed.split.decoding import DecodingConfig

    denoiser.seen.clear()
    SplitGenerator(
        gen_system.segments["head"],
        gen_system.channel,
        tiny_tokenizer(),
        tail=gen_system.segments["tail"],
        decoding=DecodingConfig(max_new_tokens=3, ignore_eos=True),
        front=gen_system.data_party.front,
    ).generate(["the captain"])
    assert denoiser.seen == [("generate", "hidden")] * 3


def test_a_defense_that_trains_only_on_what_comes_back_asks_no_returned_gradient() -> None:
    """Its parameters train from the data party's own loss; a frozen head then needs nothing back,
    while a defense whose parameters shape what crosses still does."""
    assert DataFront([_Denoiser()]).trains and not DataFront([_Denoiser()]).trains_before_crossing
    assert DataFront([_mixer()]).trains_before_crossing
    assert DataFront([_Denoiser(), _mixer()]).trains_before_crossing
    received_only = _system(SplitSpec("hbt", 1, 1), "frozen", DataFront([_Denoiser()])).data_party
    assert not received_only.needs_input_grad
    assert _system(SplitSpec("hbt", 1, 1), "frozen", DataFront([_mixer()])).data_party.needs_input_grad


class _NeedsTail(Defense):
    name = "needs_tail"
    needs_tail = "it works on the tail's input; use something else in HT"


def test_a_defense_that_needs_a_tail_is_refused_in_ht_before_anything_is_attached() -> None:
    attached: list[object] = []

    class _Tracked(_NeedsTail):
        def attach(self, head, tail):  # type: ignore[no-untyped-def]
            attached.append(tail)

    with pytest.raises(
        ValueError, match="has no data-party tail; defense needs_tail: it works on the tail's input"
    ):
        _system(SplitSpec("ht", 1), "lora", DataFront([_mixer(), _Tracked()]))
    assert attached == []
    system = _system(SplitSpec("hbt", 1, 1), "lora", DataFront([_Tracked()]))
    assert attached == [system.segments["tail"]]
    ht = _system(SplitSpec("ht", 1), "lora", DataFront())
    with pytest.raises(ValueError, match="defense needs_tail: it works on the tail's input"):
        SplitGenerator(ht.segments["head"], ht.channel, tiny_tokenizer(), front=DataFront([_NeedsTail()]))


class _Residual(Defense, torch.nn.Module):
    """A stateful defense: a buffer and an extra counter that a checkpoint must keep."""

    name = "residual"

    def __init__(self) -> None:
        torch.nn.Module.__init__(self)
        self.register_buffer("carry", torch.zeros(3))
        self.calls = 0

    def on_update(self, context):  # type: ignore[no-untyped-def]
        self.calls += 1
        self.carry += 1.0

    def extra_state(self):  # type: ignore[no-untyped-def]
        return {"calls": self.calls}

    def load_extra_state(self, state):  # type: ignore[no-untyped-def]
        self.calls = int(state["calls"])


def test_a_defense_s_buffers_and_extra_state_travel_with_the_data_party_s_checkpoint_state() -> None:
    trained = _Residual()
    system = _system(SplitSpec("ht", 1), "lora", DataFront([trained]))
    system.data_party.train_step(tiny_batch("classification"))
    system.data_party.train_step(tiny_batch("classification"))
    state = system.data_party.state_dict()
    fresh = _Residual()
    restored = _system(SplitSpec("ht", 1), "lora", DataFront([fresh]))
    restored.data_party.load_state_dict(state)
    assert fresh.calls == 2 and torch.equal(fresh.carry, torch.full((3,), 2.0))


class _Boundaries(Defense):
    """Notes the segments it was given and the gradients it saw just before each update."""

    name = "boundaries"

    def __init__(self) -> None:
        self.attached: tuple[object, object] | None = None
        self.grads_before: list[float] = []

    def attach(self, head, tail):  # type: ignore[no-untyped-def]
        self.attached = (head, tail)

    def before_update(self, context):  # type: ignore[no-untyped-def]
        head = self.attached[0]  # type: ignore[index]
        grads = [p.grad for p in head.trainable_parameters() if p.grad is not None]
        self.grads_before.append(float(sum(g.abs().sum() for g in grads)))
        for p in head.trainable_parameters():  # a defense may rewrite the gradients here
            p.grad = None


def test_a_defense_sees_its_segments_and_rewrites_gradients_before_the_update() -> None:
    boundaries = _Boundaries()
    system = _system(SplitSpec("hbt", 1, 1), "lora", DataFront([boundaries]))
    assert boundaries.attached == (system.segments["head"], system.segments["tail"])
    head = system.segments["head"]
    before = {n: p.detach().clone() for n, p in head.named_model_parameters(trainable_only=True).items()}
    system.data_party.train_step(tiny_batch("classification"))
    assert len(boundaries.grads_before) == 1 and boundaries.grads_before[0] > 0  # gradients were final
    after = head.named_model_parameters(trainable_only=True)
    assert all(torch.equal(after[n], before[n]) for n in before)  # cleared gradients: no update
