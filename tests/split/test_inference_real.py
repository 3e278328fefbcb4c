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


@pytest.mark.parametrize(
    "setting", [{"setting": "ht", "head_layers": 2}, {"setting": "hbt", "head_layers": 2, "tail_layers": 2}]
)
def test_smollm2_split_generation_over_grpc(setting: dict, tmp_path) -> None:
    if not is_fetched("smollm2-135m"):
        pytest.skip("asset smollm2-135m not fetched (run: splitfed assets fetch smollm2-135m)")
    from splitfed.config import parse_config
    from splitfed.runtime import open_generator, start_server

    cfg = parse_config(
        {
            "task": "causal_lm",
            "model": {"name": "smollm2-135m"},
            "data": {"name": "shakespeare"},
            "split": setting,
            "train": {"steps": 1},
            "output_dir": str(tmp_path),
        }
    )
    decoding = DecodingConfig(max_new_tokens=12)
    with open_generator(cfg, decoding=decoding) as local:
        expected = local.generate_ids(PROMPTS)
    server = start_server(cfg, port=0)
    try:
        with open_generator(cfg, target=f"127.0.0.1:{server.port}", decoding=decoding) as remote:
            assert remote.generate_ids(PROMPTS) == expected
    finally:
        server.stop()
