"""Load a model and tokenizer by asset name, local path or hub id, with the right task head."""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn

from splitfed.models.families import HEADS, SplitConfigError, check_supported


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message says what was tried."""


#: transformers' loading is not thread-safe: it swaps module-level state (weight-init functions,
#: default dtype) in and out, so two threads loading at once can leave it swapped for good.
_LOAD_LOCK = threading.Lock()


def _load(what: str, name: str, loader: Any, **kwargs: Any) -> Any:
    from splitfed.assets import ASSETS, resolve_model

    source = resolve_model(name)
    try:
        with _LOAD_LOCK:
            return loader(source, **kwargs)
    except OSError as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")
        raise ModelLoadError(
            f"could not load the {what} {name!r}: it is not an offline model asset ({', '.join(sorted(n for n, a in ASSETS.items() if a.kind == 'model'))}), "
            f"not a local model directory, and loading it as a hub id failed: {first}. "
            "Use an asset name (`splitfed assets list`), a local path, or a hub id on a machine with network."
        ) from None


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(name: str) -> Any:
    """The tokenizer of ``name``; a tokenizer without a pad token pads with its EOS token."""
    from transformers import AutoTokenizer

    tokenizer = _load("tokenizer", name, AutoTokenizer.from_pretrained)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_config(name: str) -> Any:
    """The transformers config of the model ``name`` (an asset, a local directory or a hub id),
    without its weights."""
    from transformers import AutoConfig

    return _load("model", name, AutoConfig.from_pretrained)


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

    Raises
    ------
    SplitConfigError
        Before any weights load, if the model's family cannot be split or lacks ``head``.
    ModelLoadError
        If ``name`` is neither an asset, a local model directory nor a reachable hub id.
    """
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForQuestionAnswering,
        AutoModelForSequenceClassification,
    )

    check_supported(load_model_config(name), head)
    kwargs: dict[str, Any] = {"dtype": _DTYPES[dtype], "attn_implementation": attn_implementation}
    if head == "classification":
        if not num_labels:
            raise SplitConfigError(
                "a classification model needs num_labels (the dataset's number of classes; model.num_labels)"
            )
        kwargs["num_labels"] = num_labels
        cls: Any = AutoModelForSequenceClassification
    elif head == "span_qa":
        cls = AutoModelForQuestionAnswering
    elif head == "causal_lm":
        cls = AutoModelForCausalLM
    else:
        raise SplitConfigError(f"unknown task head {head!r}; expected one of {', '.join(HEADS)}")
    if pad_token_id is not None:
        kwargs["pad_token_id"] = pad_token_id
    model = _load("model", name, cls.from_pretrained, **kwargs)
    return model  # type: ignore[no-any-return]
