"""The scores of reconstructions and inferred labels, on hand-made examples."""

from __future__ import annotations

import math

import pytest
import torch

from splitfed.privacy.attacks.metrics import (
    binary_auc,
    label_scores,
    majority_label_share,
    majority_token_share,
    token_scores,
)


def test_token_scores_count_tokens_as_a_multiset_over_real_positions() -> None:
    truth = torch.tensor([[5, 6, 7, 0], [8, 8, 9, 9]])
    guess = torch.tensor([[7, 6, 5, 3], [8, 9, 9, 9]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    scores = token_scores([guess], [truth], [mask])
    # row 0: same bag {5,6,7}, one position right; row 1: bag overlap {8,9,9} = 3 of 4, three positions right
    assert scores["token_f1"] == pytest.approx((1.0 + 0.75) / 2)
    assert scores["token_precision"] == scores["token_recall"] == pytest.approx(0.875)
    assert scores["token_accuracy"] == pytest.approx(4 / 7)
    assert scores["sequences"] == 2
    assert majority_token_share([truth], [mask]) == pytest.approx(2 / 7)
    with pytest.raises(ValueError, match="do not match"):
        token_scores([guess[:, :2]], [truth], [mask])


def test_label_scores_skip_ignored_truth_and_count_no_guess_as_wrong() -> None:
    truth = [torch.tensor([1, 0, -100, 1]), torch.tensor([[0, 2, -100]])]
    guess = [torch.tensor([1, 1, 0, -100]), torch.tensor([[0, 2, 2]])]
    scores = label_scores(guess, truth)
    assert scores["labels"] == 5 and scores["label_accuracy"] == pytest.approx(3 / 5)
    assert majority_label_share(truth) == pytest.approx(2 / 5)


def test_binary_auc() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    assert binary_auc(torch.tensor([0.1, 0.2, 0.8, 0.9]), labels) == 1.0
    assert binary_auc(torch.tensor([0.9, 0.8, 0.2, 0.1]), labels) == 0.0
    assert binary_auc(torch.tensor([0.5, 0.5, 0.5, 0.5]), labels) == 0.5
    assert math.isnan(binary_auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1])))


def test_token_f1_chance_is_what_a_frequency_only_guess_scores() -> None:
    from splitfed.privacy.attacks.metrics import majority_token_share, token_f1_chance, token_scores

    true = torch.tensor([[5, 5, 6, 7], [5, 8, 5, 9]])
    mask = torch.ones_like(true)
    constant = token_scores([torch.full_like(true, 5)], [true], [mask])["token_f1"]
    assert constant == pytest.approx(0.5)  # two 5s of four tokens per row: p 0.5, r 0.5
    chance = token_f1_chance([true], [mask])
    assert chance >= constant > majority_token_share([true], [mask]) - 1e-9  # F1 credits a 5 anywhere
    assert token_f1_chance([true], [mask], seed=0) == chance  # seeded


def test_rouge_l_is_the_f1_of_the_longest_common_subsequence() -> None:
    from splitfed.privacy.attacks.metrics import lcs_length, rouge_l, token_scores

    assert lcs_length([1, 2, 3, 4], [2, 4, 1]) == 2
    assert rouge_l([1, 2, 3], [1, 2, 3]) == 1.0
    assert rouge_l([3, 2, 1], [1, 2, 3]) == pytest.approx(1 / 3)  # a bag match, out of order
    assert rouge_l([], [1]) == 0.0 and rouge_l([5], [1]) == 0.0
    truth = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    guess = torch.tensor([[1, 2, 3, 4], [7, 6, 5, 9]])
    scores = token_scores([guess], [truth], [mask])
    assert scores["token_f1"] == 1.0  # both bags are right
    assert scores["rouge_l"] == pytest.approx((1 + 1 / 3) / 2)
    assert scores["exact_sequences"] == 0.5
