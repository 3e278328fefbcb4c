"""Split generation with a KV cache on each side equals the unsplit model's cached `generate`."""

from __future__ import annotations

import pytest
import torch

from splitfed.models.partition import SplitSpec
from splitfed.split.decoding import DecodingConfig
from splitfed.split.inference import InferenceError, SplitGenerator
from splitfed.split.parties import OptimSpec
from splitfed.split.system import build_split
from splitfed.transport.channel import CrossingRecorder, TransformRule
from tiny import DECODERS, tiny_model, tiny_tokenizer

PROMPTS = ["the cat sat on the mat", "a big red car", "moon"]
SETTINGS = [SplitSpec("ht", 1), SplitSpec("hbt", 1, 1), SplitSpec("hbt", 2, 1)]


def _system(family: str, spec: SplitSpec, **kw):
    model = tiny_model(family, "causal_lm")
    system = build_split(model, spec, "causal_lm", {}, lambda logits, batch: logits.sum(), OptimSpec(), **kw)
    return model, system


def _generator(system, **kw) -> SplitGenerator:
    return SplitGenerator(
        system.segments["head"], system.channel, tiny_tokenizer(), tail=system.segments.get("tail"), **kw
    )


def _reference(model, prompts, max_new_tokens: int) -> list[list[int]]:
    tok = tiny_tokenizer()
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    eos = model.generation_config.eos_token_id
    stops = set() if eos is None else set(torch.as_tensor(eos).reshape(-1).tolist())
    rows = []
    for row in out[:, enc["input_ids"].shape[1] :].tolist():
        kept = []
        for t in row:
            kept.append(t)
            if t in stops:
                break
        rows.append(kept)
    return rows


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("spec", SETTINGS, ids=lambda s: f"{s.setting}{s.head_layers}{s.tail_layers}")
def test_greedy_split_generation_equals_generate(family: str, spec: SplitSpec) -> None:
    model, system = _system(family, spec)
    expected = _reference(model, PROMPTS, 12)
    with _generator(system, decoding=DecodingConfig(max_new_tokens=12)) as gen:
        assert gen.generate_ids(PROMPTS) == expected
    assert system.model_party.inference.sessions == {}  # closed


def test_one_hidden_vector_per_sequence_per_step_crosses() -> None:
    recorder = CrossingRecorder()
    model, system = _system("llama", SplitSpec("ht", 1), recorder=recorder)
    with _generator(system, decoding=DecodingConfig(max_new_tokens=8)) as gen:
        gen.generate_ids(["the cat sat on the mat"])
    steps = recorder.of_kind("gen_step")
    hidden = model.config.hidden_size
    assert len(recorder.of_kind("gen_start")) == 1 and len(steps) >= 1
    for crossing in steps:
        assert list(crossing.tensors) == ["hidden"] and crossing.tensors["hidden"].shape == (1, 1, hidden)
        assert crossing.nbytes == hidden * 4
    results = [c for c in recorder.crossings if c.kind == "gen_result"]
    assert all(list(c.tensors) == ["token"] and c.nbytes == 8 for c in results)  # HT returns the token only


def test_hbt_outputs_never_leave_the_data_party() -> None:
    recorder = CrossingRecorder()
    _, system = _system("qwen2", SplitSpec("hbt", 1, 1), recorder=recorder)
    with _generator(system, decoding=DecodingConfig(max_new_tokens=5)) as gen:
        gen.generate(["a big red car"])
    for crossing in recorder.crossings:
        assert set(crossing.tensors) <= {"hidden", "attention_mask"}


def test_noise_transform_applies_at_every_decoding_step() -> None:
    seen = []

    def noisy(t: torch.Tensor) -> torch.Tensor:
        seen.append(t.shape[1])
        return t + 0.5 * torch.randn_like(t)

    model, system = _system(
        "llama",
        SplitSpec("ht", 1),
        transforms=[TransformRule(noisy, kinds=("gen_start", "gen_step"), tensor_names=("hidden",))],
    )
    torch.manual_seed(0)
    with _generator(system, decoding=DecodingConfig(max_new_tokens=10)) as gen:
        noisy_ids = gen.generate_ids(["the cat sat on the mat"])
    assert seen[0] > 1 and seen[1:] == [1] * (len(seen) - 1) and len(seen) == len(noisy_ids[0])
    assert noisy_ids != _reference(model, ["the cat sat on the mat"], 10)


def test_sampling_is_reproducible_and_logits_mode_matches_token_mode() -> None:
    _, system = _system("gpt2", SplitSpec("ht", 2))
    config = DecodingConfig(max_new_tokens=10, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=7)
    with _generator(system, decoding=config) as gen:
        first = gen.generate_ids(PROMPTS)
        second = gen.generate_ids(PROMPTS)
    with _generator(system, decoding=config, return_logits=True) as gen:
        here = gen.generate_ids(PROMPTS)
    assert first == second == here


def test_evicted_session_is_replayed_transparently() -> None:
    model, system = _system("llama", SplitSpec("hbt", 1, 1))
    host = system.model_party.inference
    gen = _generator(system, decoding=DecodingConfig(max_new_tokens=10))
    events = gen.stream(PROMPTS[:2])
    for _ in range(6):
        next(events)
    host.sessions.clear()  # the model party lost the session (eviction, restart)
    rest = list(events)
    assert gen.restarts == 1 and rest
    assert gen.generated == _reference(model, PROMPTS[:2], 10)


def test_limits_are_clear_errors() -> None:
    _, system = _system("llama", SplitSpec("ht", 1))
    system.model_party.inference.max_cached_tokens = 16
    with (
        pytest.raises(InferenceError, match="at most 16"),
        _generator(system, decoding=DecodingConfig(max_new_tokens=30)) as gen,
    ):
        gen.generate(PROMPTS)
    with pytest.raises(ValueError, match="temperature"):
        DecodingConfig(temperature=0)


@pytest.mark.parametrize("spec", SETTINGS[:2], ids=["ht", "hbt"])
@pytest.mark.parametrize("eos", [None, [5, 1]], ids=["no-eos", "eos-list"])
def test_stop_rule_follows_the_generation_config_as_generate_does(spec: SplitSpec, eos) -> None:
    """No EOS in the generation config: ``generate`` ignores the tokenizer's EOS, and so must we."""
    model = tiny_model("llama", "causal_lm")
    first = _reference(model, PROMPTS, 1)[0][0]
    with torch.no_grad():  # the tokenizer's EOS (id 1) takes the place of prompt 0's first greedy token
        rows = model.lm_head.weight
        rows[[1, first]] = rows[[first, 1]]
    model.generation_config.eos_token_id = eos
    expected = _reference(model, PROMPTS, 12)
    if eos is None:
        assert expected[0][0] == tiny_tokenizer().eos_token_id and len(expected[0]) == 12
    else:
        assert expected[0] == [1]
    system = build_split(model, spec, "causal_lm", {}, lambda logits, batch: logits.sum(), OptimSpec())
    with _generator(system, decoding=DecodingConfig(max_new_tokens=12)) as gen:
        assert gen.generate_ids(PROMPTS) == expected
