"""Evaluation metrics of the tasks: pure functions plus streaming accumulators.

Every value is a fraction in ``[0, 1]`` (not a percentage), except losses and perplexity.
Accumulators sum over the whole evaluation set and divide once in :meth:`Metric.compute`,
so a metric never depends on how the set was cut into batches (perplexity is the exponent
of the token-mean loss over all tokens, not the mean of per-batch perplexities).

* :func:`macro_f1` — mean per-class F1 over the classes that occur (sklearn's convention).
* :func:`normalize_answer`, :func:`squad_exact_match`, :func:`squad_f1` — the official SQuAD
  v1.1 evaluation (Rajpurkar et al., 2016).
* :func:`extract_final_number` — the final-answer number of a GSM8K-style solution
  (Cobbe et al., 2021), after its ``####`` marker when there is one.
"""

from __future__ import annotations

import math
import re
import string
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
"""Label value that losses and metrics skip (padding, prompt tokens)."""


# --------------------------------------------------------------------------- pure functions


def macro_f1(confusion: torch.Tensor) -> float:
    """Macro-averaged F1 of a confusion matrix ``confusion[true, predicted]``.

    Classes that appear neither as a target nor as a prediction are left out of the mean
    (they have no defined F1), as scikit-learn's ``f1_score(average="macro")`` does. A class
    that occurs but is never predicted correctly counts as F1 = 0.
    """
    cm = confusion.to(torch.float64)
    true_positive = cm.diagonal()
    support = cm.sum(dim=1)
    predicted = cm.sum(dim=0)
    present = (support + predicted) > 0
    if not bool(present.any()):
        return 0.0
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (support + predicted); avoids 0/0 in precision/recall.
    f1 = 2 * true_positive / (support + predicted).clamp(min=1)
    return float(f1[present].mean())


_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD answer normalization: lowercase, drop punctuation and articles, squeeze spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(prediction: str, truth: str) -> float:
    """Bag-of-tokens F1 between two answers after :func:`normalize_answer`."""
    pred_tokens = normalize_answer(prediction).split()
    truth_tokens = normalize_answer(truth).split()
    common = Counter(pred_tokens) & Counter(truth_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_exact_match(prediction: str, truths: Iterable[str]) -> float:
    """1.0 if the normalized prediction equals any normalized reference answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(t) for t in truths))


def squad_f1(prediction: str, truths: Iterable[str]) -> float:
    """The best :func:`token_f1` of the prediction against the reference answers."""
    return max((token_f1(prediction, t) for t in truths), default=0.0)


# A number: optional sign (not when glued to a preceding word/digit, as in "3-5"), digits
# with optional thousands separators, optional decimals. "1, 2" stays two numbers because a
# thousands group must be exactly three digits right after the comma.
_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_GSM8K_MARKER = "####"


def _canonical_number(token: str) -> str | None:
    try:
        value = Decimal(token.replace(",", ""))
    except InvalidOperation:
        return None
    if value == 0:
        return "0"  # not "-0" or "0.00"
    if value == value.to_integral_value():
        return str(value.to_integral_value())
    return format(value.normalize(), "f")


def extract_final_number(text: str) -> str | None:
    """The final-answer number of a solution, in canonical form, or ``None`` if there is none.

    After a GSM8K ``####`` marker the first number following the last marker is the answer;
    otherwise the last number in the text is. Thousands separators are dropped, trailing
    zeros of decimals removed, and integral values printed without a decimal point, so
    ``"#### 1,000"``, ``"1000.00"`` and ``"$1000"`` all give ``"1000"``; ``"-3.50"`` gives
    ``"-3.5"``.
    """
    if _GSM8K_MARKER in text:
        found = _NUMBER.findall(text.rsplit(_GSM8K_MARKER, 1)[1])
        if found:
            return _canonical_number(found[0])
    found = _NUMBER.findall(text)
    return _canonical_number(found[-1]) if found else None


# --------------------------------------------------------------------------- accumulators


class Metric(ABC):
    """A streaming evaluation metric: :meth:`update` per batch, :meth:`compute` at the end."""

    @abstractmethod
    def update(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> None:
        """Add one batch: the model's (detached) logits and the batch from ``Task.collate``."""

    @abstractmethod
    def compute(self) -> dict[str, float]:
        """The metric values over everything added so far."""


class ClassificationMetric(Metric):
    """Accuracy, macro-F1 and mean cross-entropy of logits ``[B, C]`` against ``labels [B]``.

    Parameters
    ----------
    num_labels : int | None, default None
        Number of classes; ``None`` takes it from the logits of the first batch.
    """

    def __init__(self, num_labels: int | None = None) -> None:
        self.num_labels = num_labels
        self.confusion: torch.Tensor | None = None
        self.loss_sum = 0.0
        self.count = 0

    def update(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> None:
        """Add a batch of class logits ``[B, C]`` with targets ``batch["labels"]`` ``[B]``."""
        labels = batch["labels"].to(logits.device)
        if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
            raise ValueError(
                f"classification logits must be [batch, classes] matching labels {tuple(labels.shape)}; "
                f"got {tuple(logits.shape)}"
            )
        num = self.num_labels or logits.shape[-1]
        if self.confusion is None:
            self.confusion = torch.zeros(num, num, dtype=torch.long)
        predicted = logits.argmax(dim=-1).cpu()
        index = labels.cpu() * num + predicted
        self.confusion += torch.bincount(index, minlength=num * num).view(num, num)
        self.loss_sum += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
        self.count += int(labels.numel())

    def compute(self) -> dict[str, float]:
        """``accuracy``, ``macro_f1`` and ``loss`` (mean cross-entropy per example)."""
        if self.confusion is None or self.count == 0:
            return {"accuracy": 0.0, "macro_f1": 0.0, "loss": math.nan}
        correct = int(self.confusion.diagonal().sum())
        return {
            "accuracy": correct / self.count,
            "macro_f1": macro_f1(self.confusion),
            "loss": self.loss_sum / self.count,
        }


def shifted_nll(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed next-token NLL (position t predicts label t+1, ``IGNORE_INDEX`` skipped), in fp32.

    Returns the sum and the shifted logits and labels it was computed from.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total, shift_logits, shift_labels


class CausalLMMetric(Metric):
    """Token-level loss, perplexity and next-token accuracy of logits ``[B, T, V]``.

    The labels are the batch's ``labels`` ``[B, T]`` (``-100`` where no target); logits are
    shifted here, as in ``CausalLMTask.loss``. Sums run over all target tokens of the whole
    evaluation set, so ``perplexity = exp(total_nll / total_tokens)``.
    """

    def __init__(self) -> None:
        self.nll_sum = 0.0
        self.tokens = 0
        self.correct = 0

    def update(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> None:
        """Add a batch of next-token logits ``[B, T, V]``."""
        nll, shift_logits, shift_labels = shifted_nll(logits, batch["labels"].to(logits.device))
        self.nll_sum += float(nll)
        mask = shift_labels != IGNORE_INDEX
        self.tokens += int(mask.sum())
        self.correct += int(((shift_logits.argmax(dim=-1) == shift_labels) & mask).sum())

    def compute(self) -> dict[str, float]:
        """``loss`` (mean NLL per token), ``perplexity`` and ``accuracy`` (next-token)."""
        if self.tokens == 0:
            return {"loss": math.nan, "perplexity": math.nan, "accuracy": 0.0}
        loss = self.nll_sum / self.tokens
        return {"loss": loss, "perplexity": math.exp(loss), "accuracy": self.correct / self.tokens}
