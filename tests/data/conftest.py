"""Fixtures for splitfed.data tests: tiny word-level tokenizers (no downloads)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

# The vocabulary: every word of these lines (anything else becomes [UNK]).
CORPUS = (
    "the a an cat dog sat on mat hat black down red blue green is was what where who why how",
    "question answer Answer Question : . , ? ! ' - A B C D E 0 1 2 3 4 5 6 7 8 9 10 12",
    "has apples buys more many does Tom have now good bad movie great awful film sky color of in and",
)
WORDS = tuple(dict.fromkeys(word for line in CORPUS for word in line.split()))


def make_tokenizer(pad: bool = True, style: str = "decoder") -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over :data:`WORDS`.

    ``style="decoder"`` prefixes ``[BOS]`` (a Llama-like decoder); ``style="encoder"`` wraps
    pairs as ``[CLS] a [SEP] b [SEP]`` with token type ids (BERT-like). ``pad=False`` leaves
    the pad token unset so tasks must fall back to EOS.
    """
    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[CLS]", "[SEP]"]
    vocab = {tok: i for i, tok in enumerate(specials + list(dict.fromkeys(WORDS)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if style == "decoder":
        backend.post_processor = processors.TemplateProcessing(
            single="[BOS] $A",
            pair="[BOS] $A $B:1",
            special_tokens=[("[BOS]", vocab["[BOS]"])],
        )
    else:
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
    kwargs: dict[str, str] = {"unk_token": "[UNK]", "eos_token": "[EOS]"}
    if style == "decoder":
        kwargs["bos_token"] = "[BOS]"
    else:
        kwargs.update(cls_token="[CLS]", sep_token="[SEP]")
    if pad:
        kwargs["pad_token"] = "[PAD]"
    names = (
        ["input_ids", "attention_mask"]
        if style == "decoder"
        else ["input_ids", "token_type_ids", "attention_mask"]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_input_names=names, **kwargs)


@pytest.fixture(scope="session")
def tok() -> PreTrainedTokenizerFast:
    """Decoder-style tokenizer with a pad token."""
    return make_tokenizer()


@pytest.fixture(scope="session")
def tok_no_pad() -> PreTrainedTokenizerFast:
    """Decoder-style tokenizer without a pad token (EOS doubles as pad)."""
    return make_tokenizer(pad=False)


@pytest.fixture(scope="session")
def enc_tok() -> PreTrainedTokenizerFast:
    """Encoder-style (BERT-like) tokenizer."""
    return make_tokenizer(style="encoder")


@pytest.fixture(scope="session")
def tokenizer_factory() -> Callable[..., PreTrainedTokenizerFast]:
    """:func:`make_tokenizer` itself, for tests that need a variant."""
    return make_tokenizer
