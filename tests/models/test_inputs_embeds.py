"""Every family adapter embeds from token embeddings or soft one-hot inputs as from token ids."""

from __future__ import annotations

import pytest
import torch

from splitfed.models.partition import SplitSpec, partition
from tiny import FAMILY_HEADS, tiny_batch, tiny_model

PAD_IDS = {"roberta": 1}


@pytest.mark.parametrize(("family", "head"), FAMILY_HEADS)
def test_head_output_from_embeddings_and_soft_tokens_equals_from_ids(family: str, head: str) -> None:
    model = tiny_model(family, head)
    model.eval()
    batch = tiny_batch(head, pad=PAD_IDS.get(family, 0))
    segment = partition(model, SplitSpec("ht", 1), head)["head"]
    kwargs = {k: batch[k] for k in ("attention_mask", "token_type_ids") if k in batch}
    ids = batch["input_ids"]
    with torch.no_grad():
        from_ids = segment(input_ids=ids, **kwargs)
        embeds = segment.family.token_embeddings(model, ids)
        from_embeds = segment(inputs_embeds=embeds, **kwargs)
        vocab = segment.family.token_embedding_layer(model).num_embeddings
        one_hot = torch.nn.functional.one_hot(ids, vocab).float()
        from_soft = segment(inputs_embeds=segment.family.soft_embeddings(model, one_hot), **kwargs)
        shifted = segment(inputs_embeds=embeds + 0.5, **kwargs)
    torch.testing.assert_close(from_embeds, from_ids, atol=1e-6, rtol=0)
    torch.testing.assert_close(from_soft, from_ids, atol=1e-5, rtol=0)
    assert not torch.allclose(shifted, from_ids)  # the embeddings really are what the head runs on


def test_soft_tokens_carry_gradients_to_their_weights() -> None:
    model = tiny_model("llama", "causal_lm")
    segment = partition(model, SplitSpec("ht", 1), "causal_lm")["head"]
    vocab = segment.family.token_embedding_layer(model).num_embeddings
    logits = torch.zeros(1, 4, vocab, requires_grad=True)
    out = segment(inputs_embeds=segment.family.soft_embeddings(model, logits.softmax(-1)))
    out.pow(2).sum().backward()
    assert logits.grad is not None and bool(logits.grad.abs().sum() > 0)
