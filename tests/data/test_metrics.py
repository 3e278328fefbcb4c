"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from splitfed.data.metrics import (
    CausalLMMetric,
    ClassificationMetric,
    extract_final_number,
    macro_f1,
    normalize_answer,
    squad_exact_match,
    squad_f1,
    token_f1,
)


def _confusion(true: list[int], pred: list[int], n: int) -> torch.Tensor:
    cm = torch.zeros(n, n, dtype=torch.long)
    for t, p in zip(true, pred, strict=True):
        cm[t, p] += 1
    return cm


def test_macro_f1_hand_computed() -> None:
    # class 0: TP 2, FN 1 -> P 1, R 2/3, F1 0.8; class 1: TP 1, FP 1, FN 1 -> 0.5;
    # class 2: TP 1, FP 1 -> P 0.5, R 1, F1 2/3.
    cm = _confusion([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], 3)
    assert macro_f1(cm) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_macro_f1_skips_classes_that_never_occur() -> None:
    three = _confusion([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], 3)
    four = _confusion([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], 4)
    assert macro_f1(four) == pytest.approx(macro_f1(three))


def test_macro_f1_counts_a_class_never_predicted_as_zero() -> None:
    cm = _confusion([0, 1], [0, 0], 2)  # class 0: P 1/2, R 1 -> 2/3; class 1: 0
    assert macro_f1(cm) == pytest.approx((2 / 3 + 0) / 2)


def test_classification_metric_is_independent_of_batching() -> None:
    logits = torch.tensor([[3.0, 0, 0], [2, 1, 0], [0, 5, 0], [0, 1, 2], [0, 0, 1], [1, 0, 4]])
    labels = torch.tensor([0, 0, 1, 1, 2, 0])
    whole = ClassificationMetric(3)
    whole.update(logits, {"labels": labels})
    split = ClassificationMetric()
    split.update(logits[:2], {"labels": labels[:2]})
    split.update(logits[2:], {"labels": labels[2:]})
    a, b = whole.compute(), split.compute()
    assert a == pytest.approx(b)
    assert a["accuracy"] == pytest.approx(4 / 6)
    expected_loss = torch.nn.functional.cross_entropy(logits, labels).item()
    assert a["loss"] == pytest.approx(expected_loss, rel=1e-5)


def _lm_batch(
    target_logit: float, tokens: int, vocab: int = 4
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One row whose every target token has probability e^x / (e^x + V - 1)."""
    labels = torch.full((1, tokens + 1), -100, dtype=torch.long)
    labels[0, 1:] = 1
    logits = torch.zeros(1, tokens + 1, vocab)
    logits[0, :, 1] = target_logit
    return logits, {"labels": labels}


def test_perplexity_is_exp_of_token_mean_over_the_whole_set() -> None:
    metric = CausalLMMetric()
    x1, n1, x2, n2 = 2.0, 3, -1.0, 9
    for x, n in ((x1, n1), (x2, n2)):
        metric.update(*_lm_batch(x, n))
    nll1 = -math.log(math.exp(x1) / (math.exp(x1) + 3))
    nll2 = -math.log(math.exp(x2) / (math.exp(x2) + 3))
    token_mean = (n1 * nll1 + n2 * nll2) / (n1 + n2)
    result = metric.compute()
    assert result["loss"] == pytest.approx(token_mean, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(token_mean), rel=1e-6)
    mean_of_batch_ppl = (math.exp(nll1) + math.exp(nll2)) / 2
    assert result["perplexity"] != pytest.approx(mean_of_batch_ppl, rel=1e-3)
    # Target 1 is the argmax only where its logit beats the zeros: the first batch.
    assert result["accuracy"] == pytest.approx(n1 / (n1 + n2))


def test_causal_metric_ignores_masked_positions() -> None:
    logits, batch = _lm_batch(2.0, 4)
    batch["labels"][0, 3:] = -100
    metric = CausalLMMetric()
    metric.update(logits, batch)
    assert metric.tokens == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The  Cat's, hat!", "cats hat"),
        ("an apple a day", "apple day"),
        ("  Theory  of   the Mind. ", "theory of mind"),
        ("ATHENS", "athens"),
    ],
)
def test_squad_normalization(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_squad_exact_match_and_f1() -> None:
    assert squad_exact_match("the Cat!", ["a cat", "dog"]) == 1.0
    assert squad_exact_match("black cat", ["cat"]) == 0.0
    # normalized: [black, cat, sat] vs [cat, sat, down]: overlap 2 -> P = R = 2/3
    assert token_f1("the black cat sat", "a cat sat down") == pytest.approx(2 / 3)
    assert squad_f1("the black cat sat", ["dog", "a cat sat down", "black"]) == pytest.approx(2 / 3)
    assert squad_f1("", ["cat"]) == 0.0
    # repeated tokens count with multiplicity: [cat, cat] vs [cat]: P 1/2, R 1
    assert token_f1("cat cat", "cat") == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),
        ("so 5 + 3 = 8 apples\n#### 1,000", "1000"),
        ("The answer is 1,234,567.", "1234567"),
        ("The temperature fell to -12 degrees.", "-12"),
        ("It costs $3.50 in total.", "3.5"),
        ("1000.00", "1000"),
        ("#### -0.0", "0"),
        ("pages 3-5", "5"),
        ("one, two, 1, 2, 3", "3"),
        ("#### 7 and later 9", "7"),
        ("12 then #### nothing", "12"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_final_number(text: str, expected: str | None) -> None:
    assert extract_final_number(text) == expected
