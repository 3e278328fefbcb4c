"""Gradient inversion of a LoRA update on a tiny llama (LoRA r=4 on q, v; batch 1; 6 tokens): one
client's gradient gives its words back (the first block's lora_A rows span the present tokens), and
neither the sum of 8 clients' updates, all that secure aggregation shows the server, nor noise of a
gradient's shape and scale (the noise control) does."""

from __future__ import annotations

import random

import pytest
import torch

from splitfed.federated.simulation import whole_model
from splitfed.models.partition import FinetuneSpec, apply_finetune
from splitfed.privacy.attacks.control import noise_update
from splitfed.privacy.attacks.gradient_inversion import (
    bag_of_words,
    client_gradient,
    gradient_from_update,
    lora_parameters,
    run_gradient_inversion,
)
from tiny import WORDS, tiny_model, tiny_tokenizer

SEQ = 6
OPTIONS = {"steps": 60, "refine_passes": 1}


@pytest.fixture(scope="module")
def setup() -> dict:
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", "causal_lm")
    torch.manual_seed(0)
    # init_lora_weights=False: B != 0, the global adapters of any round after the first
    apply_finetune(
        whole_model(model, "causal_lm"),
        FinetuneSpec("lora", 4, 8, 0.0, ("q_proj", "v_proj"), init_lora_weights=False),
    )
    params = lora_parameters(model, [n for n, p in model.named_parameters() if p.requires_grad])
    texts = []
    for i in range(8):
        rng = random.Random(i)
        ids = tokenizer(" ".join(rng.choice(WORDS) for _ in range(SEQ - 1)))["input_ids"]
        texts.append(torch.tensor([[*ids, tokenizer.eos_token_id]]))
    grads = [client_gradient(model, params, t) for t in texts]
    return {"model": model, "tokenizer": tokenizer, "texts": texts, "grads": grads}


def test_one_clients_gradient_reveals_its_words(setup: dict) -> None:
    f1 = []
    for k in range(2):
        result = run_gradient_inversion(
            setup["model"], setup["grads"][k], setup["texts"][k], tokenizer=setup["tokenizer"], **OPTIONS
        )
        print({m: round(v, 3) for m, v in result.metrics.items()}, result.examples[0], result.chance)
        f1.append(result.metrics["token_f1"])
        assert result.metrics["bag_f1"] >= 0.8
    assert sum(f1) / len(f1) >= 0.6  # chance: 6 / 97 ~ 0.06


def test_the_bag_of_words_is_exact_for_present_tokens(setup: dict) -> None:
    residuals = bag_of_words(setup["model"], setup["grads"][0])
    assert residuals is not None
    present = setup["texts"][0][0, :-1]  # the last token feeds no loss: invisible to the bag
    absent = torch.ones_like(residuals, dtype=torch.bool)
    absent[setup["texts"][0][0]] = False
    assert residuals[present].max() < 0.05 < 0.5 < residuals[absent].min()


def test_fresh_adapters_leak_no_bag_of_words(setup: dict) -> None:
    model = tiny_model("llama", "causal_lm")
    apply_finetune(whole_model(model, "causal_lm"), FinetuneSpec("lora", 4, 8, 0.0, ("q_proj", "v_proj")))
    params = lora_parameters(model, [n for n, p in model.named_parameters() if p.requires_grad])
    grads = client_gradient(model, params, setup["texts"][0])
    assert bag_of_words(model, grads) is None  # B = 0 makes every lora_A gradient zero


def test_secure_aggregation_of_8_clients_defeats_the_attack(setup: dict) -> None:
    single = run_gradient_inversion(setup["model"], setup["grads"][0], setup["texts"][0], **OPTIONS)
    # a one-step SGD update per client, summed: what the server of secure aggregation decodes
    lr = 0.05
    summed = {n: sum(-lr * g[n] for g in setup["grads"]) for n in setup["grads"][0]}
    attacked = run_gradient_inversion(
        setup["model"], gradient_from_update(summed, lr), setup["texts"], **OPTIONS
    )
    print("single", single.metrics["token_f1"], "sum of 8", attacked.metrics)
    # scored against whichever of the 8 clients' texts it matches best, in the attacker's favour
    assert attacked.metrics["token_f1"] <= single.metrics["token_f1"] - 0.3
    assert attacked.metrics["bag_f1"] <= single.metrics["bag_f1"] - 0.3


def test_a_gradient_of_noise_gives_no_words_back(setup: dict) -> None:
    # The noise control: every LoRA gradient tensor replaced by Gaussian noise of its shape, mean and
    # standard deviation. No vocabulary token lies in the span of noise rows, so the bag of words is
    # empty and the search matches nothing. Measured on clients 0-2: token F1 0.00 on noise (1.00,
    # 0.33, 0.83 on their gradients); chance (uniform tokens) 6 / 97 = 0.06.
    noised = noise_update(setup["grads"][0], seed=0)
    assert {n: t.shape for n, t in noised.items()} == {n: t.shape for n, t in setup["grads"][0].items()}
    result = run_gradient_inversion(setup["model"], noised, setup["texts"][0], **OPTIONS)
    residuals = bag_of_words(setup["model"], noised)
    assert residuals is not None and residuals.min() > 0.3  # nothing is taken as present
    assert result.metrics["token_f1"] <= result.chance + 0.15
    assert result.metrics["bag_f1"] <= 0.2


def test_a_clipped_gradient_is_matched_in_direction_with_scale_free(setup: dict) -> None:
    # max_grad_norm rescales a client's gradient by a factor the server does not know: the plain
    # distance then prefers other tokens, the scale-free one compares directions. Measured on client
    # 0 scaled by 0.05: token F1 0.83 scale-free, 0.33 plain (bag F1 0.83 both: the bag is scale-free).
    clipped = {n: 0.05 * g for n, g in setup["grads"][0].items()}
    free = run_gradient_inversion(setup["model"], clipped, setup["texts"][0], scale_free=True, **OPTIONS)
    scaled = run_gradient_inversion(setup["model"], clipped, setup["texts"][0], **OPTIONS)
    print("scale-free", free.metrics, "plain distance", scaled.metrics)
    assert free.metrics["token_f1"] >= 0.7
    assert free.metrics["token_f1"] >= scaled.metrics["token_f1"] + 0.3


def test_the_last_token_is_scored_exactly_over_the_whole_vocabulary(setup: dict) -> None:
    """The bag of words cannot see the last token (only a label): the gradient is affine in its
    one-hot, so the distance's change for every vocabulary token there comes at once, equal to
    recomputing the gradient per token, and its best is the true one."""
    from splitfed.privacy.attacks.gradient_inversion import _Matcher

    for k in range(2):
        text = setup["texts"][k]
        matcher = _Matcher(setup["model"], setup["grads"][k], alpha=0.0)
        wrong = text.clone()
        wrong[0, -1] = 5 if int(text[0, -1]) != 5 else 6
        changes = matcher.last_changes(wrong)
        assert changes.shape == (1, 97)
        base = matcher.hard(wrong)
        for c in (int(text[0, -1]), 7, 20, 40):
            trial = wrong.clone()
            trial[0, -1] = c
            assert float(changes[0, c]) == pytest.approx(matcher.hard(trial) - base, rel=1e-3, abs=1e-4)
        assert int(changes.argmin()) == int(text[0, -1])


def test_the_vocabulary_runs_only_as_far_as_the_first_lora_block(setup: dict) -> None:
    from splitfed.privacy.attacks.gradient_inversion import _first_block_inputs

    model = setup["model"]
    names = list(setup["grads"][0])
    later = [
        m
        for n, m in model.named_modules()
        if n.endswith(("lm_head", "layers.1", ".norm")) and "layers.0" not in n
    ]
    ran: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: ran.append(type(mod).__name__)) for m in later]
    try:
        found = _first_block_inputs(model, names)
    finally:
        for h in hooks:
            h.remove()
    assert found is not None and ran == []  # no final norm, no [V, V] logits
    inputs, a_names = found
    assert a_names and all(".layers.0." in n and ".lora_A." in n for n in a_names)
    vocab = model.get_input_embeddings().weight.shape[0]
    assert inputs.shape == (vocab, model.config.hidden_size)
    # What the first block's projections see: its input norm of each token's embedding.
    block = next(m for n, m in model.named_modules() if n.endswith("layers.0"))
    with torch.no_grad():
        expected = block.input_layernorm(model.get_input_embeddings().weight[:, None])[:, 0]
    torch.testing.assert_close(inputs, expected.float())
