"""Load a model and tokenizer by asset name, local path or hub id, with the right task head."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(name: str) -> Any:
    """The tokenizer of ``name``; a tokenizer without a pad token pads with its EOS token."""
    from transformers import AutoTokenizer

    from splitfed.assets import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name: str,
    head: str,
    num_labels: int | None = None,
    pad_token_id: int | None = None,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
) -> nn.Module:
    """A transformers task model for ``head`` (``causal_lm``, ``classification``, ``span_qa``).

    A classification or span-QA head missing from the checkpoint is freshly initialised (it is
    then trained, see :class:`splitfed.models.partition.FinetuneSpec`).
    """
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForQuestionAnswering,
        AutoModelForSequenceClassification,
    )

    from splitfed.assets import resolve_model

    kwargs: dict[str, Any] = {"dtype": _DTYPES[dtype], "attn_implementation": attn_implementation}
    if head == "classification":
        if not num_labels:
            raise ValueError("a classification model needs num_labels (the dataset's number of classes)")
        kwargs["num_labels"] = num_labels
        cls: Any = AutoModelForSequenceClassification
    elif head == "span_qa":
        cls = AutoModelForQuestionAnswering
    elif head == "causal_lm":
        cls = AutoModelForCausalLM
    else:
        raise ValueError(f"unknown task head {head!r}; expected causal_lm, classification or span_qa")
    if pad_token_id is not None:
        kwargs["pad_token_id"] = pad_token_id
    model = cls.from_pretrained(resolve_model(name), **kwargs)
    return model  # type: ignore[no-any-return]
