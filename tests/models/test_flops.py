"""Analytical FLOP counts: hand-checked blocks, the training cost model, SplitFrozen vs SplitLoRA."""

from __future__ import annotations

from itertools import pairwise

import pytest
from transformers import BertConfig, DistilBertConfig, GemmaConfig, GPT2Config, LlamaConfig, T5Config

from splitfed.models.flops import (
    LayerShape,
    PartyFlops,
    block_forward_flops,
    embed_flops,
    head_flops,
    layer_shape,
    lora_flops,
    split_training_flops,
)
from splitfed.models.partition import SplitConfigError, SplitSpec

B, S = 1, 128


def gpt2_small() -> GPT2Config:
    """GPT-2 small: 12 layers, 768 wide, 12 heads, vocab 50257 (transformers' defaults)."""
    return GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, num_labels=2)


def smollm2_like() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
    )


def test_layer_shapes_of_each_family() -> None:
    assert layer_shape(gpt2_small()) == LayerShape(768, 3072, 12, 12, 64, 50257, False, 12)
    assert layer_shape(smollm2_like()) == LayerShape(576, 1536, 9, 3, 64, 49152, True, 30)
    gemma = GemmaConfig(hidden_size=3072, intermediate_size=24576, num_attention_heads=16, head_dim=256)
    assert layer_shape(gemma).head_dim == 256  # heads * head_dim = 4096 != hidden
    bert = layer_shape(BertConfig())
    assert (bert.hidden, bert.intermediate, bert.num_layers, bert.pooler) == (768, 3072, 12, True)
    distil = layer_shape(DistilBertConfig())
    assert (distil.hidden, distil.intermediate, distil.heads, distil.num_layers) == (768, 3072, 12, 6)


def test_unknown_model_type_is_a_clear_error() -> None:
    with pytest.raises(SplitConfigError, match=r"model type 't5'.*supported: llama"):
        layer_shape(T5Config())


def test_gpt2_block_matches_hand_count() -> None:
    h, s = 768, S
    # Per token: q,k,v,o 4h^2 MACs, MLP 2 * h * 4h MACs -> 24 s h^2 FLOPs; attention 2 * s^2 h MACs.
    assert block_forward_flops(layer_shape(gpt2_small()), B, s) == 24 * s * h * h + 4 * s * s * h
    assert block_forward_flops(layer_shape(gpt2_small()), 3, s) == 3 * (24 * s * h * h + 4 * s * s * h)


def test_gqa_gated_block_matches_hand_count() -> None:
    h, q, kv, inter, s = 576, 9 * 64, 3 * 64, 1536, S
    macs_per_token = h * q + 2 * h * kv + q * h + 3 * h * inter
    expected = 2 * s * macs_per_token + 2 * 2 * s * s * q
    assert block_forward_flops(layer_shape(smollm2_like()), 1, s) == expected
    # Fewer kv heads, fewer FLOPs.
    mha = layer_shape(LlamaConfig(**{**smollm2_like().to_dict(), "num_key_value_heads": 9}))
    assert block_forward_flops(mha, 1, s) > expected


def test_heads_embeddings_and_lora() -> None:
    shape = layer_shape(gpt2_small())
    assert embed_flops(shape, B, S) == 0
    assert head_flops(shape, 2, S, "causal_lm") == 2 * 2 * S * 768 * 50257
    assert head_flops(shape, 2, S, "classification", num_labels=3) == 2 * 2 * 768 * 3
    assert head_flops(shape, 2, S, "span_qa") == 2 * 2 * S * 768 * 2
    assert head_flops(layer_shape(BertConfig()), 1, S, "classification") == 2 * 768 * 2 + 2 * 768 * 768
    with pytest.raises(SplitConfigError, match="unknown task head"):
        head_flops(shape, 1, S, "regression")
    assert lora_flops(shape, B, S, 8, ("q", "v")) == 2 * 2 * 8 * (768 + 768) * S
    # GPT-2's fused c_attn is 768 -> 2304.
    assert lora_flops(shape, B, S, 8, ("c_attn",)) == 2 * 8 * (768 + 2304) * S
    with pytest.raises(SplitConfigError, match="unknown LoRA target"):
        lora_flops(shape, B, S, 8, ("gate_proj",))  # GPT-2's MLP is not gated


def test_cost_model_per_segment_by_hand() -> None:
    cfg = gpt2_small()
    shape = layer_shape(cfg)
    f = block_forward_flops(shape, B, S)
    lm = head_flops(shape, B, S, "causal_lm")
    lora = lora_flops(shape, B, S, 8, ("q", "v"))
    ht2 = SplitSpec("ht", 2)

    frozen = split_training_flops(cfg, ht2, B, S, "causal_lm", "frozen", "lora")
    assert frozen.data_party == 2 * f  # forward only
    # LoRA body: forward, input grads through everything (its adapters included), adapter weight grads.
    assert frozen.model_party == 2 * (10 * f + lm + 10 * lora) + 10 * lora

    full = split_training_flops(cfg, ht2, B, S, "causal_lm", "full", "full")
    assert full.data_party == 3 * 2 * f
    assert full.model_party == 3 * (10 * f + lm)

    # A frozen segment behind a trainable one must still pass the gradient back: F + F.
    hbt = split_training_flops(cfg, SplitSpec("hbt", 2, 2), B, S, "causal_lm", "lora", "frozen", "frozen")
    assert hbt.model_party == 2 * 8 * f
    assert hbt.data_party == (2 * (2 * f + 2 * lora) + 2 * lora) + 2 * (2 * f + lm)

    # Everything frozen: nothing to backpropagate anywhere.
    idle = split_training_flops(cfg, SplitSpec("hbt", 2, 2), B, S, "causal_lm", "frozen", "frozen", "frozen")
    assert idle.total == 12 * f + lm


def test_trained_classification_head_counts_its_weight_gradient() -> None:
    cfg = gpt2_small()
    shape = layer_shape(cfg)
    cls = head_flops(shape, B, S, "classification", num_labels=2)
    with_head = split_training_flops(cfg, SplitSpec("ht", 2), B, S, "classification", "frozen", "lora")
    without = split_training_flops(
        cfg, SplitSpec("ht", 2), B, S, "classification", "frozen", "lora", train_task_head=False
    )
    assert with_head.model_party - without.model_party == cls


def splitfrozen_vs_splitlora(head_layers: int, head: str = "causal_lm") -> tuple[PartyFlops, PartyFlops]:
    cfg, spec = gpt2_small(), SplitSpec("ht", head_layers, allow_raw_embeddings=head_layers == 0)
    frozen = split_training_flops(cfg, spec, 8, S, head, "frozen", "lora")
    lora = split_training_flops(cfg, spec, 8, S, head, "lora", "lora")
    return frozen, lora


def test_splitfrozen_vs_splitlora_data_party_reduction_gpt2_small() -> None:
    frozen, lora = splitfrozen_vs_splitlora(2)
    reduction = 1 - frozen.data_party / lora.data_party
    # The whole model trained on the device with LoRA (FedLoRA) is SplitLoRA's total.
    vs_fedlora = 1 - frozen.data_party / lora.total
    print(
        f"\nGPT-2 small, HT after layer 2, seq {S}: data-party FLOPs SplitFrozen {frozen.data_party:.3e}, "
        f"SplitLoRA {lora.data_party:.3e} -> reduction {reduction:.1%}; vs FedLoRA (whole model on device) "
        f"{vs_fedlora:.1%}; data share SplitFrozen {frozen.data_share:.1%}, SplitLoRA {lora.data_share:.1%}"
    )
    # At the same split point a frozen, forward-only head saves its backward pass: F out of
    # 2F + LoRA terms, a little over half. Nothing in the cost model makes it 80 %.
    shape = layer_shape(gpt2_small())
    f, ad = block_forward_flops(shape, 8, S), lora_flops(shape, 8, S, 8, ("q", "v"))
    assert reduction == pytest.approx(1 - 2 * f / (2 * (2 * f + 2 * ad) + 2 * ad))
    assert 0.50 < reduction < 0.52
    # Against on-device training of the whole model the saving is above the paper's 86.8 %.
    assert vs_fedlora > 0.868


@pytest.mark.parametrize("head", ["causal_lm", "classification"])
def test_more_head_layers_more_data_party_share(head: str) -> None:
    for method in (0, 1):  # SplitFrozen, SplitLoRA
        shares = [splitfrozen_vs_splitlora(k, head)[method].data_share for k in range(0, 12)]
        assert all(a < b for a, b in pairwise(shares)), shares


def test_more_tail_layers_more_data_party_share() -> None:
    cfg = gpt2_small()
    shares = [
        split_training_flops(
            cfg, SplitSpec("hbt", 2, t), 1, S, "classification", "frozen", "lora", "lora"
        ).data_share
        for t in range(1, 10)
    ]
    assert all(a < b for a, b in pairwise(shares)), shares


def test_bad_arguments() -> None:
    cfg = gpt2_small()
    with pytest.raises(SplitConfigError, match="head_layers \\+ tail_layers must be at most 11"):
        split_training_flops(cfg, SplitSpec("ht", 12), 1, S, "causal_lm", "frozen", "lora")
    with pytest.raises(SplitConfigError, match="body_mode must be one of"):
        split_training_flops(cfg, SplitSpec("ht", 2), 1, S, "causal_lm", "frozen", "adapter")
    with pytest.raises(SplitConfigError, match="unknown task head"):
        split_training_flops(cfg, SplitSpec("ht", 2), 1, S, "seq2seq", "frozen", "lora")
    with pytest.raises(SplitConfigError, match=">= 1"):
        split_training_flops(cfg, SplitSpec("ht", 2), 0, S, "causal_lm", "frozen", "lora")


def test_data_share_of_an_empty_step_is_zero() -> None:
    assert PartyFlops(0.0, 0.0).data_share == 0.0
    assert PartyFlops(1.0, 3.0).data_share == 0.25
