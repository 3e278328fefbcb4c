"""Greedy split generation on the real smollm2-135m equals its cached `generate` (integration)."""

from __future__ import annotations

import pytest

from splitfed.assets import is_fetched
from splitfed.models.loading import load_model, load_tokenizer
from splitfed.models.partition import SplitSpec
from splitfed.split.decoding import DecodingConfig
from splitfed.split.inference import SplitGenerator
from splitfed.split.parties import OptimSpec
from splitfed.split.system import build_split

pytestmark = pytest.mark.integration
PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived"]


@pytest.mark.parametrize("spec", [SplitSpec("ht", 2), SplitSpec("hbt", 2, 2)], ids=["ht", "hbt"])
def test_smollm2_split_generation_equals_generate(spec: SplitSpec) -> None:
    if not is_fetched("smollm2-135m"):
        pytest.skip("asset smollm2-135m not fetched (run: splitfed assets fetch smollm2-135m)")
    tokenizer = load_tokenizer("smollm2-135m")
    model = load_model("smollm2-135m", "causal_lm").eval()
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = []
    for row in out[:, enc["input_ids"].shape[1] :].tolist():
        eos = model.generation_config.eos_token_id
        expected.append(row[: row.index(eos) + 1] if eos in row else row)
    system = build_split(model, spec, "causal_lm", {}, lambda lg, b: lg.sum(), OptimSpec())
    with SplitGenerator(
        system.segments["head"],
        system.channel,
        tokenizer,
        tail=system.segments.get("tail"),
        decoding=DecodingConfig(max_new_tokens=16),
    ) as gen:
        assert gen.generate_ids(PROMPTS) == expected
