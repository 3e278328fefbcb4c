"""Scores of reconstructed tokens and inferred labels against the data party's ground truth.

Token scores follow the text-reconstruction literature (VFLAIR-LLM, BiSR): per sequence, the
precision, recall and F1 of the recovered tokens as a multiset over the real (attended) positions,
averaged over sequences; and the position-wise exact-token accuracy over all real positions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

IGNORE = -100


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence of two token lists (dynamic programming)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(predicted: Sequence[int], truth: Sequence[int]) -> float:
    """ROUGE-L F-measure of two token lists: the LCS's F1 of its precision and recall (Lin 2004)."""
    if not predicted or not truth:
        return 0.0
    lcs = lcs_length(predicted, truth)
    if not lcs:
        return 0.0
    p, r = lcs / len(predicted), lcs / len(truth)
    return 2 * p * r / (p + r)


def token_scores(
    predicted: Sequence[torch.Tensor], truth: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]
) -> dict[str, float]:
    """Token precision, recall, F1, ROUGE-L and exact-sequence rate (per sequence, averaged) and
    exact-token accuracy.

    Parameters
    ----------
    predicted, truth : sequences of LongTensor ``[batch, seq]``
        Recovered and true token ids, one pair per batch.
    masks : sequence of Tensor ``[batch, seq]``
        1 at real tokens; only these are scored.

    Returns
    -------
    dict
        ``token_precision``, ``token_recall``, ``token_f1``, ``token_accuracy``, ``rouge_l``,
        ``exact_sequences`` (the share of sequences recovered token for token) and ``sequences``.
    """
    precision, recall, f1, rouge, exact = [], [], [], [], []
    hits = total = 0
    for pred, true, mask in zip(predicted, truth, masks, strict=True):
        if pred.shape != true.shape:
            raise ValueError(
                f"predicted tokens {tuple(pred.shape)} do not match the truth {tuple(true.shape)}"
            )
        real = mask.bool()
        hits += int(((pred == true) & real).sum())
        total += int(real.sum())
        for p_row, t_row, m_row in zip(pred, true, real, strict=True):
            p_tokens, t_tokens = p_row[m_row].tolist(), t_row[m_row].tolist()
            if not t_tokens:
                continue
            common = sum((Counter(p_tokens) & Counter(t_tokens)).values())
            p = common / len(p_tokens) if p_tokens else 0.0
            r = common / len(t_tokens)
            precision.append(p)
            recall.append(r)
            f1.append(2 * p * r / (p + r) if p + r else 0.0)
            rouge.append(rouge_l(p_tokens, t_tokens))
            exact.append(float(p_tokens == t_tokens))
    n = max(len(f1), 1)
    return {
        "token_precision": sum(precision) / n,
        "token_recall": sum(recall) / n,
        "token_f1": sum(f1) / n,
        "token_accuracy": hits / max(total, 1),
        "rouge_l": sum(rouge) / n,
        "exact_sequences": sum(exact) / n,
        "sequences": float(len(f1)),
    }


def text_scores(
    predicted: Sequence[torch.Tensor],
    predicted_masks: Sequence[torch.Tensor],
    truth: Sequence[torch.Tensor],
    truth_masks: Sequence[torch.Tensor],
) -> dict[str, float]:
    """Token scores against a text of another length (the original before a text defense rewrote it).

    Precision, recall and F1 are of the bags of tokens (the recovered tokens at ``predicted_masks``,
    the true ones at ``truth_masks``), per sequence and averaged. ``token_accuracy`` is position-wise
    over the rows whose real lengths agree (real tokens compared in order); ``aligned_rows`` is the
    share of such rows (0 when no row's length agrees, and then the accuracy is 0).

    Returns
    -------
    dict
        ``token_precision``, ``token_recall``, ``token_f1``, ``token_accuracy``, ``aligned_rows``,
        ``rouge_l``, ``exact_sequences`` (as :func:`token_scores`) and ``sequences``.
    """
    precision, recall, f1, rouge, exact = [], [], [], [], []
    hits = total = aligned = 0
    for pred, p_mask, true, t_mask in zip(predicted, predicted_masks, truth, truth_masks, strict=True):
        if pred.shape[0] != true.shape[0]:
            raise ValueError(f"predicted rows {pred.shape[0]} do not match the truth's {true.shape[0]}")
        for p_row, pm, t_row, tm in zip(pred, p_mask.bool(), true, t_mask.bool(), strict=True):
            p_tokens, t_tokens = p_row[pm].tolist(), t_row[tm].tolist()
            if not t_tokens:
                continue
            common = sum((Counter(p_tokens) & Counter(t_tokens)).values())
            p = common / len(p_tokens) if p_tokens else 0.0
            r = common / len(t_tokens)
            precision.append(p)
            recall.append(r)
            f1.append(2 * p * r / (p + r) if p + r else 0.0)
            rouge.append(rouge_l(p_tokens, t_tokens))
            exact.append(float(p_tokens == t_tokens))
            if len(p_tokens) == len(t_tokens):
                aligned += 1
                hits += sum(a == b for a, b in zip(p_tokens, t_tokens, strict=True))
                total += len(t_tokens)
    n = max(len(f1), 1)
    return {
        "token_precision": sum(precision) / n,
        "token_recall": sum(recall) / n,
        "token_f1": sum(f1) / n,
        "token_accuracy": hits / max(total, 1),
        "aligned_rows": aligned / n,
        "rouge_l": sum(rouge) / n,
        "exact_sequences": sum(exact) / n,
        "sequences": float(len(f1)),
    }


def majority_token_share(truth: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> float:
    """Chance level of token recovery: the accuracy of always guessing the most frequent true token."""
    counts: Counter[int] = Counter()
    for true, mask in zip(truth, masks, strict=True):
        counts.update(true[mask.bool()].tolist())
    total = sum(counts.values())
    return counts.most_common(1)[0][1] / total if total else 0.0


def token_f1_chance(truth: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], seed: int = 0) -> float:
    """Chance level of token F1: the better of two guesses that know only the true tokens'
    frequencies, the most frequent token at every position and tokens drawn from their pooled
    unigram distribution (seeded). Bag-of-tokens F1 credits a frequent token wherever it stands,
    so this lies above :func:`majority_token_share` (the chance of exact-token accuracy)."""
    counts: Counter[int] = Counter()
    for true, mask in zip(truth, masks, strict=True):
        counts.update(true[mask.bool()].tolist())
    if not counts:
        return 0.0
    ids = torch.tensor(list(counts))
    weights = torch.tensor([float(c) for c in counts.values()])
    generator = torch.Generator().manual_seed(seed)
    constant, drawn = [], []
    for true in truth:
        constant.append(torch.full_like(true, counts.most_common(1)[0][0]))
        picks = torch.multinomial(weights, true.numel(), replacement=True, generator=generator)
        drawn.append(ids[picks].reshape(true.shape).to(true.dtype))
    return max(token_scores(guess, truth, masks)["token_f1"] for guess in (constant, drawn))


def label_scores(predicted: Sequence[torch.Tensor], truth: Sequence[torch.Tensor]) -> dict[str, float]:
    """Label accuracy over every true label (``-100`` in the truth is skipped; a guess of ``-100`` is wrong).

    Returns
    -------
    dict
        ``label_accuracy`` and ``labels`` (how many were scored).
    """
    hits = total = 0
    for pred, true in zip(predicted, truth, strict=True):
        if pred.shape != true.shape:
            raise ValueError(
                f"predicted labels {tuple(pred.shape)} do not match the truth {tuple(true.shape)}"
            )
        scored = true != IGNORE
        hits += int(((pred == true) & scored).sum())
        total += int(scored.sum())
    return {"label_accuracy": hits / max(total, 1), "labels": float(total)}


def majority_label_share(truth: Sequence[torch.Tensor]) -> float:
    """Chance level of label inference: the share of the most frequent true label."""
    counts: Counter[int] = Counter()
    for true in truth:
        counts.update(true[true != IGNORE].tolist())
    total = sum(counts.values())
    return counts.most_common(1)[0][1] / total if total else 0.0


def binary_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` for ``labels`` in {0, 1} (ties count half)."""
    scores, labels = scores.float().flatten(), labels.flatten()
    pos, neg = scores[labels == 1], scores[labels == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).float().sum()
    ties = (pos[:, None] == neg[None, :]).float().sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def decode_examples(
    tokenizer: Any,
    predicted: Sequence[torch.Tensor],
    truth: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    count: int = 3,
    truth_masks: Sequence[torch.Tensor] | None = None,
) -> list[tuple[str, str]]:
    """The first ``count`` sequences as ``(original, reconstructed)`` text over their real tokens.

    ``masks`` select the reconstruction's real tokens, ``truth_masks`` (default: ``masks``) the truth's.
    """
    out: list[tuple[str, str]] = []
    truth_masks = masks if truth_masks is None else truth_masks
    for pred, true, mask, t_mask in zip(predicted, truth, masks, truth_masks, strict=True):
        for p_row, t_row, m_row, t_row_mask in zip(pred, true, mask.bool(), t_mask.bool(), strict=True):
            if len(out) >= count:
                return out
            original, guess = t_row[t_row_mask].tolist(), p_row[m_row].tolist()
            if tokenizer is None:
                out.append((" ".join(map(str, original)), " ".join(map(str, guess))))
            else:
                out.append((tokenizer.decode(original), tokenizer.decode(guess)))
    return out


def tpr_at_fpr(scores: torch.Tensor, labels: torch.Tensor, fpr: float) -> float:
    """The highest true-positive rate of a threshold on ``scores`` whose false-positive rate is at most ``fpr``.

    The low-FPR operating point membership inference is judged at (Carlini et al. 2022, "Membership
    Inference Attacks From First Principles"): an example is called positive when its score is
    strictly above the threshold; every distinct score (and +inf) is tried.
    """
    scores, labels = scores.double().flatten(), labels.flatten()
    pos, neg = scores[labels == 1], scores[labels == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    thresholds = torch.cat([torch.unique(scores), torch.tensor([float("inf")], dtype=scores.dtype)])
    neg_sorted, pos_sorted = torch.sort(neg).values, torch.sort(pos).values
    false_pos = (len(neg) - torch.searchsorted(neg_sorted, thresholds, right=True)).double() / len(neg)
    true_pos = (len(pos) - torch.searchsorted(pos_sorted, thresholds, right=True)).double() / len(pos)
    return float(true_pos[false_pos <= fpr + 1e-12].max())
