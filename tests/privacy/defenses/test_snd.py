"""Split-and-Denoise: dχ noise of mean norm d/ε on the embeddings, a denoiser that trains before the tail."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from splitfed.config import ConfigError, parse_config
from splitfed.models.partition import FinetuneSpec, SplitSpec
from splitfed.privacy.defenses import build_defense
from splitfed.privacy.defenses.snd import SplitAndDenoise, dchi_noise
from splitfed.split.decoding import DecodingConfig
from splitfed.split.front import DataFront, FrontContext, FrontResources, build_front
from splitfed.split.inference import SplitGenerator
from splitfed.split.parties import OptimSpec
from splitfed.split.system import build_split
from splitfed.transport.channel import CrossingRecorder
from tiny import run_config, simple_loss, tiny_batch, tiny_model, tiny_tokenizer

HIDDEN = 32


def _snd(**params: object) -> SplitAndDenoise:
    defense = build_defense({"name": "snd", **params}, hidden_size=HIDDEN)
    assert isinstance(defense, SplitAndDenoise)
    return defense


@pytest.mark.parametrize("epsilon", [4.0, 64.0])
def test_the_noise_norm_is_gamma_d_over_epsilon_and_its_direction_uniform(epsilon: float) -> None:
    torch.manual_seed(0)
    snd = _snd(epsilon=epsilon)
    clean = torch.randn(64, 64, HIDDEN)
    noisy = snd.on_embeddings(clean, FrontContext("train", batch_id=1))
    noise = (noisy - clean).reshape(-1, HIDDEN)
    norms = noise.norm(dim=-1)
    # Gamma(shape d, scale 1/eps): mean d/eps, standard deviation sqrt(d)/eps; 4096 draws.
    assert float(norms.mean()) == pytest.approx(HIDDEN / epsilon, rel=0.01)
    assert float(norms.std()) == pytest.approx(HIDDEN**0.5 / epsilon, rel=0.05)
    directions = noise / norms[:, None]
    assert float(directions.mean(0).norm()) < 0.12  # E v = 0 (|mean| ~ 1/sqrt(4096) per coordinate)
    assert float(directions.pow(2).mean(0).max()) < 1.5 / HIDDEN  # no favoured axis
    half = snd.on_embeddings(clean.bfloat16(), FrontContext("eval", batch_id=2))
    assert half.dtype == torch.bfloat16


def test_the_mechanism_sampler_matches_the_gamma_mean_in_high_dimension() -> None:
    torch.manual_seed(1)
    z = dchi_noise((2000, 576), epsilon=288.0)
    assert z.dtype == torch.float32 and float(z.norm(dim=-1).mean()) == pytest.approx(2.0, rel=0.01)


def _split(front: DataFront, head_mode: str = "frozen", spec: SplitSpec = SplitSpec("hbt", 1, 1), **kw):  # type: ignore[no-untyped-def]
    model = tiny_model("llama", "classification")
    ft = {
        "head": FinetuneSpec(head_mode),
        "body": FinetuneSpec("lora", r=2),
        "tail": FinetuneSpec("lora", r=2),
    }
    return build_split(
        model,
        spec,
        "classification",
        ft,  # type: ignore[arg-type]
        simple_loss("classification"),
        OptimSpec(lr=1e-2),
        front=front,
        **kw,
    )


@pytest.mark.parametrize("head_mode", ["frozen", "lora"])
def test_the_denoiser_trains_with_the_task_in_an_hbt_step(head_mode: str) -> None:
    torch.manual_seed(0)
    snd = _snd(epsilon=50.0)
    party = _split(DataFront([snd]), head_mode).data_party
    params = dict(snd.denoiser.named_parameters())
    assert all(any(p is q for q in party.trainer.params) for p in params.values())  # joins the optimizer
    before = {n: p.detach().clone() for n, p in params.items()}
    batch = tiny_batch("classification")
    result = party.train_step(batch, update=False)
    assert torch.isfinite(torch.tensor(result.loss))
    for name, p in params.items():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    party.train_step(batch)
    assert all(not torch.equal(p, before[n]) for n, p in params.items())
    assert not snd._pending  # every remembered noise was used by its reply
    logits = party.predict(batch)
    assert logits.shape == (3, 3) and not snd._pending


@pytest.mark.parametrize("head_mode", ["frozen", "lora"])
def test_with_a_frozen_head_no_gradient_is_returned_for_what_crossed_and_the_denoiser_still_trains(
    head_mode: str,
) -> None:
    """SplitFrozen + SnD in HBT: the denoiser trains from the data party's own loss, so neither
    does the model party compute the gradient of what it received nor does the head run with a
    graph; a trainable head (SplitLoRA) still gets its gradient."""
    torch.manual_seed(0)
    snd = _snd(epsilon=50.0)
    recorder = CrossingRecorder(keep_tensors=False)
    system = _split(DataFront([snd]), head_mode, recorder=recorder)
    party = system.data_party
    head_graph: list[bool] = []
    system.segments["head"].register_forward_hook(lambda m, a, out: head_graph.append(out.requires_grad))
    before = {n: p.detach().clone() for n, p in snd.denoiser.named_parameters()}
    batch = tiny_batch("classification")
    party.train_step(batch, update=False)
    party.train_step(batch)

    frozen = head_mode == "frozen"
    assert len(recorder.of_kind("backward_result")) == (0 if frozen else 2)
    assert len(recorder.of_kind("backward")) == 2  # the tail's input gradient still goes to the body
    assert [c.meta["need_input_grad"] for c in recorder.of_kind("forward")] == [not frozen] * 2
    assert party.needs_input_grad is not frozen
    assert head_graph == [not frozen] * 2
    assert party.head_tokens["backward"] == (0 if frozen else 2 * int(batch["attention_mask"].sum()))
    for name, p in snd.denoiser.named_parameters():
        assert not torch.equal(p, before[name]), f"the denoiser's {name} did not train"
    assert not snd._pending


def test_in_ht_it_is_refused_with_what_to_use_instead(tmp_path: Path) -> None:
    """In HT nothing comes back before a tail of the data party's, so there is nothing to denoise:
    a data party refuses it (its denoiser never joins an optimizer) and so does a run's config."""
    front = DataFront([_snd()])
    with pytest.raises(
        ValueError, match=r"split.setting: ht has no data-party tail; defense snd: .*use dchi_privacy"
    ):
        _split(front, spec=SplitSpec("ht", 1))
    _split(DataFront([_snd()]))  # HBT takes it
    raw = run_config(
        tmp_path, "x", defenses=[{"name": "snd"}], split={"setting": "ht", "head_layers": 1, "tail_layers": 0}
    )
    with pytest.raises(ConfigError, match=r"defense snd: snd denoises the body's output .*use dchi_privacy"):
        parse_config(raw)
    parse_config(run_config(tmp_path, "x", defenses=[{"name": "snd"}]))  # the default here: HBT


def test_the_denoiser_runs_at_prefill_and_every_decoding_step() -> None:
    torch.manual_seed(0)
    snd = _snd(epsilon=50.0)
    seen: list[tuple[str, tuple[int, ...]]] = []
    original = snd.on_received

    def spy(name, tensor, context):  # type: ignore[no-untyped-def]
        seen.append((context.phase, tuple(tensor.shape)))
        return original(name, tensor, context)

    snd.on_received = spy  # type: ignore[method-assign]
    model = tiny_model("llama", "causal_lm")
    system = build_split(
        model,
        SplitSpec("hbt", 1, 1),
        "causal_lm",
        {"body": FinetuneSpec("frozen")},
        simple_loss("causal_lm"),
        front=DataFront([snd]),
    )
    gen = SplitGenerator(
        system.segments["head"],
        system.channel,
        tiny_tokenizer(),
        tail=system.segments.get("tail"),
        decoding=DecodingConfig(max_new_tokens=4, ignore_eos=True),
        front=system.data_party.front,
    )
    gen.generate(["the captain sat"])
    assert seen == [("generate", (1, 3, HIDDEN))] + [("generate", (1, 1, HIDDEN))] * 3


def test_logits_pass_and_a_reply_without_noise_is_an_error() -> None:
    snd = _snd()
    logits = torch.randn(2, 5, 97)
    assert snd.on_received("logits", logits, FrontContext("eval", batch_id=3)) is logits
    with pytest.raises(RuntimeError, match="no noise remembered for train batch 7"):
        snd.on_received("hidden", torch.randn(2, 5, HIDDEN), FrontContext("train", batch_id=7))
    snd.on_embeddings(torch.randn(2, 5, HIDDEN), FrontContext("train", batch_id=8))
    with pytest.raises(RuntimeError, match="does not match the noised embeddings"):
        snd.on_received("hidden", torch.randn(3, 5, HIDDEN), FrontContext("train", batch_id=8))
    off = _snd(phases=["train"])
    emb = torch.randn(1, 2, HIDDEN)
    assert off.on_embeddings(emb, FrontContext("generate")) is emb


def test_it_builds_for_config_validation_and_checks_the_models_width() -> None:
    front = build_front([{"name": "snd"}], hidden_size=8)
    assert front.trains and front.touches_embeddings and not front.trains_before_crossing
    with pytest.raises(ValueError, match="hidden_size 16 but the model's token embeddings are 32 wide"):
        _snd(hidden_size=16).setup(FrontResources(tiny_model("llama", "causal_lm")))
    assert build_front([{"name": "snd"}], tiny_model("llama", "causal_lm")).trains


def test_the_denoiser_learns_to_remove_what_the_noise_did_to_a_linear_body() -> None:
    """With the noise and clean embeddings it kept among its inputs, the denoiser undoes a body's response
    to the noise (without them it cannot: the loss stays above 0.6 of its start)."""
    torch.manual_seed(0)
    snd = _snd(epsilon=8.0)  # noise norm 4 against embeddings of norm ~5.7
    body = torch.randn(HIDDEN, HIDDEN) / HIDDEN**0.5
    clean = torch.randn(16, 8, HIDDEN)
    optimizer = torch.optim.Adam(snd.parameters(), lr=2e-2)
    losses = []
    for step in range(40):
        ctx = FrontContext("train", batch_id=step)
        received = snd.on_embeddings(clean, ctx) @ body
        loss = (snd.on_received("hidden", received, ctx) - clean @ body).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.4 * losses[0], (losses[0], losses[-1])
