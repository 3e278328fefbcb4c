"""Loading refuses a model that cannot be split before reading its weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitfed.models.loading import load_model
from splitfed.models.partition import SplitConfigError


@pytest.mark.parametrize(
    ("model_type", "head", "match"),
    [
        ("gpt_neox", "causal_lm", "'gpt_neox' cannot be split.*supported model types: bert"),
        ("gemma2", "causal_lm", "'gemma2' cannot be split"),
        ("t5", "classification", "'t5' cannot be split"),
        (
            "bert",
            "causal_lm",
            "'causal_lm' is not available for bert-family.*available: classification, span_qa",
        ),
    ],
)
def test_unsupported_family_or_head_fails_before_the_weights_load(
    tmp_path: Path, model_type: str, head: str, match: str
) -> None:
    from transformers import AutoConfig

    AutoConfig.for_model(model_type).save_pretrained(tmp_path)  # a config and no weights at all
    with pytest.raises(SplitConfigError, match=match):
        load_model(str(tmp_path), head, num_labels=3)
