"""Every defense that acts on activations or embeddings applies at prefill and at every decoding step.

Split generation (in process, HBT) sends the head's output of the prompt (``gen_start``) and then
of each new token (``gen_step``). What crossed at each of them is compared with the undefended
head's output of the same tokens, recomputed without cache from the generated sequence:

* noisy defenses must have changed every crossing;
* defenses deterministic outside training must equal the defense applied to the undefended
  output (so it is their generation behaviour, not noise, that is seen);
* ``nopeek`` and ``adversarial`` only add training losses and deliberately leave generation
  untouched: every crossing must equal the undefended output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from splitfed.models.partition import FinetuneSpec, SplitSpec
from splitfed.privacy.defenses.gaussian_mixer import GaussianMixer
from splitfed.privacy.defenses.mid import MID
from splitfed.split.decoding import DecodingConfig
from splitfed.split.front import Defense, build_front
from splitfed.split.inference import SplitGenerator
from splitfed.split.system import build_split
from splitfed.transport.channel import CrossingRecorder
from tiny import simple_loss, tiny_model, tiny_tokenizer

PROMPT = "the captain sat on the"
NEW_TOKENS = 4

Expected = Callable[[Defense, torch.Tensor], torch.Tensor] | None


def _mid(defense: Defense, clean: torch.Tensor) -> torch.Tensor:
    assert isinstance(defense, MID) and defense.head_bottleneck is not None
    return defense.head_bottleneck(clean, sample=False)[0]  # the code's mean, decoded


def _mixer(defense: Defense, clean: torch.Tensor) -> torch.Tensor:
    assert isinstance(defense, GaussianMixer)
    return defense.mix(clean)


def _unchanged(defense: Defense, clean: torch.Tensor) -> torch.Tensor:
    return clean


#: ``(spec, expected)``: ``expected(defense, undefended)`` for a defense deterministic in
#: generation, ``None`` for a noisy one (then every crossing must differ from the undefended one).
CASES: dict[str, tuple[dict[str, Any], Expected]] = {
    "activation_dp": ({"name": "activation_dp", "epsilon": 1.0}, None),
    "dchi_privacy": ({"name": "dchi_privacy", "epsilon": 10.0}, None),
    "snd": ({"name": "snd", "epsilon": 50.0}, None),
    "textobfuscator": ({"name": "textobfuscator", "n_clusters": 8, "noise_scale": 0.1}, None),
    "gaussian_mixer": ({"name": "gaussian_mixer", "sigma": 0.5}, None),
    "gaussian_mixer-noise_at_eval_false": (
        {"name": "gaussian_mixer", "sigma": 0.5, "noise_at_eval": False},
        _mixer,
    ),
    "mid": ({"name": "mid", "bottleneck": 8}, _mid),
    "mid-sample_at_eval": ({"name": "mid", "bottleneck": 8, "sample_at_eval": True}, None),
    # Training-only: an auxiliary loss (distance correlation; a simulated inverter) and nothing else.
    "nopeek": ({"name": "nopeek"}, _unchanged),
    "adversarial": ({"name": "adversarial"}, _unchanged),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_defense_applies_at_prefill_and_every_decoding_step(case: str) -> None:
    spec, expected = CASES[case]
    model = tiny_model("llama", "causal_lm")
    tokenizer = tiny_tokenizer()
    front = build_front([spec], model, 0, tokenizer=tokenizer)
    defense = front.defenses[0]
    if isinstance(defense, GaussianMixer):  # away from the identity, so that mixing is visible
        with torch.no_grad():
            defense.mix.weight.add_(0.1 * torch.randn_like(defense.mix.weight))
    recorder = CrossingRecorder()
    system = build_split(
        model,
        SplitSpec("hbt", 1, 1),
        "causal_lm",
        {"body": FinetuneSpec("frozen")},
        simple_loss("causal_lm"),
        recorder=recorder,
        front=front,
    )
    head = system.segments["head"]
    generator = SplitGenerator(
        head,
        system.channel,
        tokenizer,
        tail=system.segments["tail"],
        decoding=DecodingConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True),
        front=front,
    )
    generated = generator.generate_ids([PROMPT])[0]
    prompt_ids = tokenizer([PROMPT], return_tensors="pt")["input_ids"]
    prefix = int(prompt_ids.shape[1])
    sent = [c.tensors["hidden"] for c in recorder.crossings if c.kind in ("gen_start", "gen_step")]
    assert [int(h.shape[1]) for h in sent] == [prefix] + [1] * (NEW_TOKENS - 1)

    # The undefended head's output of every position, without cache; a decoding step sent the last.
    ids = torch.cat([prompt_ids, torch.tensor([generated[: NEW_TOKENS - 1]])], dim=1)
    head.eval()
    with torch.no_grad():
        clean = head(input_ids=ids)
        steps = [clean[:, :prefix]] + [clean[:, prefix + k : prefix + k + 1] for k in range(NEW_TOKENS - 1)]
        for step, (crossed, undefended) in enumerate(zip(sent, steps, strict=True)):
            if expected is None:
                change = float((crossed - undefended).abs().max())
                assert change > 1e-3, f"step {step}: the defense left the activations unchanged"
            else:
                torch.testing.assert_close(
                    crossed,
                    expected(defense, undefended),
                    atol=1e-5,
                    rtol=1e-4,
                    msg=lambda m, s=step: f"step {s}: {m}",
                )
