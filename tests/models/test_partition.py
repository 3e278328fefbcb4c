"""Split forward and gradients equal the unsplit model's, for every family x setting x head."""

from __future__ import annotations

import pytest
import torch

from splitfed.models.partition import FinetuneSpec, PrivacyWarning, SplitConfigError, SplitSpec, partition
from splitfed.split.parties import OptimSpec
from splitfed.split.system import build_split
from tiny import FAMILY_HEADS, reference_logits, simple_loss, tiny_batch, tiny_model

SETTINGS = [SplitSpec("ht", 1), SplitSpec("ht", 3), SplitSpec("hbt", 1, 1), SplitSpec("hbt", 2, 1)]
PAD_IDS = {"roberta": 1}


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("family", "head"), FAMILY_HEADS)
@pytest.mark.parametrize("spec", SETTINGS, ids=lambda s: f"{s.setting}{s.head_layers}{s.tail_layers}")
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_split_equals_unsplit(family: str, head: str, spec: SplitSpec, mode: str) -> None:
    model = tiny_model(family, head)
    batch = tiny_batch(head, pad=PAD_IDS.get(family, 0))
    ft = FinetuneSpec(mode, r=4, init_lora_weights=False)  # type: ignore[arg-type]
    loss_fn = simple_loss(head)
    system = build_split(
        model, spec, head, dict.fromkeys(["head", "body", "tail"], ft), loss_fn, OptimSpec(lr=0.0)
    )
    model.eval()

    split_logits = system.data_party.predict(batch)
    torch.testing.assert_close(split_logits, reference_logits(model, head, batch), atol=1e-5, rtol=0)

    # Dropout is off in the tiny configs, so train mode changes nothing but makes the step real.
    step = system.data_party.train_step(batch, update=False)
    split_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    ref_loss = loss_fn(reference_logits(model, head, batch), batch)
    ref_loss.backward()
    ref_grads = _grads(model)

    assert step.loss == pytest.approx(ref_loss.item(), abs=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(split_grads) == set(ref_grads) == trainable
    if mode == "lora":
        assert trainable and all(
            "lora_" in n or n.split(".")[0] in {"score", "classifier", "qa_outputs", "pre_classifier"}
            for n in trainable
        )
    for name in trainable:
        torch.testing.assert_close(split_grads[name], ref_grads[name], atol=1e-5, rtol=0, msg=name)


def test_split_point_out_of_range_names_layer_count() -> None:
    model = tiny_model("llama", "causal_lm")
    with pytest.raises(SplitConfigError, match="4 layers"):
        partition(model, SplitSpec("ht", 4), "causal_lm")
    with pytest.raises(SplitConfigError, match="at most 3"):
        partition(model, SplitSpec("hbt", 2, 2), "causal_lm")
    with pytest.raises(SplitConfigError, match="hbt"):
        partition(model, SplitSpec("ht", 1, 1), "causal_lm")


def test_unsupported_head_is_a_clear_error() -> None:
    with pytest.raises(
        SplitConfigError, match=r"'span_qa' is not available .* available: causal_lm, classification"
    ):
        partition(tiny_model("llama", "causal_lm"), SplitSpec("ht", 1), "span_qa")


def _unsupported_config(model_type: str):
    from transformers import Gemma2Config, GPTNeoXConfig, T5Config

    small = {"vocab_size": 50, "num_attention_heads": 4}
    if model_type == "gpt_neox":
        return GPTNeoXConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, **small)
    if model_type == "gemma2":
        return Gemma2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=2, head_dim=4, **small)
    return T5Config(d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4, vocab_size=50)


@pytest.mark.parametrize("model_type", ["gpt_neox", "t5", "gemma2"])
def test_unsupported_family_is_a_split_config_error_listing_the_supported(model_type: str) -> None:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_config(_unsupported_config(model_type))
    with pytest.raises(
        SplitConfigError, match=f"'{model_type}' cannot be split.*supported model types: bert,.*llama"
    ):
        partition(model, SplitSpec("ht", 1), "classification")


@pytest.mark.parametrize(
    ("built", "head", "needs"),
    [
        ("causal_lm", "classification", "AutoModelForSequenceClassification"),
        ("classification", "causal_lm", "AutoModelForCausalLM"),
        ("base", "causal_lm", "AutoModelForCausalLM"),
    ],
)
def test_a_model_without_the_task_head_is_a_split_config_error(built: str, head: str, needs: str) -> None:
    from transformers import AutoModel

    from tiny import tiny_config

    model = AutoModel.from_config(tiny_config("llama")) if built == "base" else tiny_model("llama", built)
    with pytest.raises(
        SplitConfigError, match=f"a {head} split needs a task model .*{needs}.*got {type(model).__name__}"
    ):
        partition(model, SplitSpec("ht", 1), head)


def test_head_layers_zero_needs_the_raw_embeddings_opt_in() -> None:
    model = tiny_model("gpt2", "causal_lm")
    with pytest.raises(SplitConfigError, match=r"raw token embeddings.*split\.allow_raw_embeddings: true"):
        partition(model, SplitSpec("ht", 0), "causal_lm")
    with pytest.warns(PrivacyWarning, match="raw token embeddings cross"):
        segments = partition(model, SplitSpec("ht", 0, allow_raw_embeddings=True), "causal_lm")
    assert len(segments["head"].blocks) == 0 and segments["head"].has_embed
    batch = tiny_batch("causal_lm")
    logits = segments["body"](hidden=segments["head"](input_ids=batch["input_ids"]))
    torch.testing.assert_close(logits, model(input_ids=batch["input_ids"]).logits)


def test_lora_target_that_does_not_exist() -> None:
    model = tiny_model("llama", "causal_lm")
    with pytest.raises(SplitConfigError, match="nope"):
        build_split(
            model,
            SplitSpec("ht", 1),
            "causal_lm",
            {"body": FinetuneSpec("lora", target_modules=("nope",))},
            simple_loss("causal_lm"),
        )


def test_tied_embeddings_are_untied_across_parties() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            tie_word_embeddings=True,
        )
    )
    assert model.lm_head.weight is model.model.embed_tokens.weight
    segments = partition(model, SplitSpec("ht", 1), "causal_lm")
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    torch.testing.assert_close(model.lm_head.weight, model.model.embed_tokens.weight)
    head_ids = {id(p) for p in segments["head"].parameters()}
    assert not head_ids & {id(p) for p in segments["body"].parameters()}
    # HBT keeps both on the data party: still tied.
    model2 = LlamaForCausalLM(model.config)
    partition(model2, SplitSpec("hbt", 1, 1), "causal_lm")
    assert model2.lm_head.weight is model2.model.embed_tokens.weight
