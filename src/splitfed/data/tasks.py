"""Task definitions: how examples become tensors, the training loss, and the evaluation metric.

A task is a small object made by :func:`get_task` around a tokenizer::

    task = get_task("classification", tokenizer=tok, max_length=64)
    batch = task.collate(examples)                 # dict[str, torch.Tensor]
    logits = model(batch["input_ids"], batch["attention_mask"])
    loss = task.loss(logits, batch)                # scalar
    metric = task.new_metric()
    metric.update(logits.detach(), batch)
    metric.compute()                               # dict[str, float]

``Task.head`` names the output layer the model needs: ``"classification"`` (logits
``[B, C]``), ``"causal_lm"`` (logits ``[B, T, V]``) or ``"span_qa"`` (logits ``[B, T, 2]``:
start and end scores).

Conventions shared by all tasks:

* Padding is on the right only, so the last real token of row ``i`` is at
  ``attention_mask[i].sum() - 1`` (where a decoder's classification head pools).
* A tokenizer without a pad token pads with its EOS token. The tokenizer itself is not
  modified; masks and labels come from sequence lengths, never from comparing ids with the
  pad id, so a real EOS is never mistaken for padding.
* Labels that no loss should see are ``-100`` (:data:`~splitfed.data.metrics.IGNORE_INDEX`).
"""

from __future__ import annotations

import string
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from splitfed.data.errors import DataError
from splitfed.data.metrics import (
    IGNORE_INDEX,
    CausalLMMetric,
    ClassificationMetric,
    Metric,
    extract_final_number,
    shifted_nll,
    squad_exact_match,
    squad_f1,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Head = Literal["causal_lm", "classification", "span_qa"]
Example = Mapping[str, Any]
Batch = dict[str, torch.Tensor]


def _pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """Right-pad integer rows to the longest one."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            out[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
    return out


def _attention_mask(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    return (torch.arange(width)[None, :] < lengths[:, None]).long()


def _chars(text: str) -> list[int]:
    return [ord(ch) for ch in text]


def _text(codes: torch.Tensor) -> str:
    """Inverse of :func:`_chars` on a ``-1``-padded row."""
    return "".join(chr(c) for c in codes[codes >= 0].tolist())


class Task(ABC):
    """Base class of the tasks: collation, loss and metric for one example schema.

    Parameters
    ----------
    tokenizer : PreTrainedTokenizerBase | None, default None
        The model's tokenizer. Needed by :meth:`collate`; metrics that work on text (e.g.
        :meth:`GenerativeQATask.evaluate_generations`) run without one.
    max_length : int, default 128
        Tokens per sequence after truncation.
    num_labels : int | None, default None
        Number of classes (classification) or answer choices (multiple choice); other tasks
        ignore it.
    """

    name: ClassVar[str]
    head: ClassVar[Head]
    fields: ClassVar[tuple[tuple[str, ...], ...]]
    """Alternative sets of required example fields; an example must carry one of them."""
    optional_fields: ClassVar[tuple[str, ...]] = ()
    #: Free-text fields of an example that text defenses (sanitizers) may rewrite before tokenization.
    text_fields: ClassVar[tuple[str, ...]] = ("text",)

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None = None,
        max_length: int = 128,
        num_labels: int | None = None,
    ) -> None:
        if max_length < 2:
            raise DataError(f"max_length must be at least 2 tokens, got {max_length}")
        if num_labels is not None and num_labels < 1:
            raise DataError(f"num_labels must be positive, got {num_labels}")
        self._tokenizer = tokenizer
        self.max_length = max_length
        self.num_labels = num_labels

    # ----------------------------------------------------------------- tokenizer helpers

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer; a :class:`DataError` if the task was made without one."""
        if self._tokenizer is None:
            raise DataError(f"task {self.name!r} needs a tokenizer to collate: get_task(..., tokenizer=tok)")
        return self._tokenizer

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's EOS id, if it has one."""
        eos = self.tokenizer.eos_token_id
        return int(eos) if eos is not None else None

    @property
    def pad_token_id(self) -> int:
        """The pad id: the tokenizer's pad token, else its EOS token (decoders often lack a pad)."""
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        if pad is None:
            raise DataError(
                "the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token before collating"
            )
        return int(pad)

    def _encode(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _keep_tail(self, ids: list[int], keep: int) -> list[int]:
        """The last ``keep`` tokens, keeping a leading special token (BOS/CLS) in front."""
        if len(ids) <= keep:
            return ids
        if ids and ids[0] in set(self.tokenizer.all_special_ids) and keep > 1:
            return ids[:1] + ids[len(ids) - keep + 1 :]
        return ids[len(ids) - keep :]

    def _check(self, examples: Sequence[Example]) -> None:
        if not examples:
            raise DataError(f"task {self.name!r}: cannot collate an empty list of examples")
        for i, example in enumerate(examples):
            if not any(all(f in example for f in fields) for fields in self.fields):
                wanted = " or ".join("{" + ", ".join(map(repr, f)) + "}" for f in self.fields)
                raise DataError(
                    f"task {self.name!r}: example {i} has fields {sorted(example)}, needs {wanted}"
                )

    # ----------------------------------------------------------------- the task interface

    @abstractmethod
    def collate(self, examples: Sequence[Example]) -> Batch:
        """Tokenize and pad a list of examples into a batch of tensors."""

    @abstractmethod
    def loss(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The scalar training loss of the model's logits on a batch from :meth:`collate`."""

    @abstractmethod
    def new_metric(self) -> Metric:
        """A fresh evaluation metric accumulator for this task."""


# --------------------------------------------------------------------------- classification


class ClassificationTask(Task):
    """Sequence (or sequence-pair) classification.

    Examples: ``{"text": str, "label": int}`` plus optional ``"text_pair"``. The batch has
    ``input_ids``, ``attention_mask``, ``labels`` ``[B]`` and, for tokenizers that make
    them, ``token_type_ids``. Logits are ``[B, C]``; the loss is cross-entropy; the metric
    reports ``accuracy``, ``macro_f1`` and ``loss``.

    Occurrences of the pad id inside real text are dropped. They can only be special tokens
    that double as padding (an EOS borrowed as pad, a GPT-2 style BOS = EOS), and a model
    that finds the last real token by looking for the first pad id would pool the wrong
    position.
    """

    name = "classification"
    text_fields: ClassVar[tuple[str, ...]] = ("text", "text_pair")
    head = "classification"
    fields = (("text", "label"),)
    optional_fields = ("text_pair",)

    def collate(self, examples: Sequence[Example]) -> Batch:
        """Tokenize, truncate to ``max_length`` and right-pad; labels ``[B]``."""
        self._check(examples)
        texts = [str(ex["text"]) for ex in examples]
        has_pair = ["text_pair" in ex and ex["text_pair"] is not None for ex in examples]
        if any(has_pair) and not all(has_pair):
            raise DataError("classification: some examples in the batch have 'text_pair' and some do not")
        pairs = [str(ex["text_pair"]) for ex in examples] if all(has_pair) else None
        enc = self.tokenizer(
            texts, pairs, truncation=True, max_length=self.max_length, add_special_tokens=True
        )
        pad = self.pad_token_id
        ids: list[list[int]] = []
        types: list[list[int]] = []
        type_rows = enc.get("token_type_ids")
        for i, row in enumerate(enc["input_ids"]):
            keep = [j for j, token in enumerate(row) if token != pad]
            if not keep:
                raise DataError(f"classification: example {i} has no tokens (text {texts[i]!r})")
            ids.append([row[j] for j in keep])
            if type_rows is not None:
                types.append([type_rows[i][j] for j in keep])
        labels = [self._label(ex, i) for i, ex in enumerate(examples)]
        batch = {
            "input_ids": _pad(ids, pad),
            "attention_mask": _attention_mask(ids),
            "labels": torch.tensor(labels, dtype=torch.long),
        }
        if type_rows is not None:
            batch["token_type_ids"] = _pad(types, 0)
        return batch

    def _label(self, example: Example, index: int) -> int:
        try:
            label = int(example["label"])
        except (TypeError, ValueError):
            raise DataError(
                f"classification: example {index} has label {example['label']!r}; labels must be class indices"
            ) from None
        if label < 0:
            raise DataError(f"classification: example {index} has negative label {label} (unlabeled?)")
        if self.num_labels is not None and label >= self.num_labels:
            raise DataError(
                f"classification: example {index} has label {label}, outside 0..{self.num_labels - 1} "
                f"(num_labels={self.num_labels})"
            )
        return label

    def loss(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy of logits ``[B, C]``."""
        labels = batch["labels"].to(logits.device)
        if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
            raise DataError(
                f"classification loss needs logits [batch, classes] for {labels.shape[0]} labels, "
                f"got {tuple(logits.shape)} (is the model's head 'classification'?)"
            )
        return F.cross_entropy(logits.float(), labels)

    def new_metric(self) -> Metric:
        """Accuracy, macro-F1 and loss."""
        return ClassificationMetric(self.num_labels)


# --------------------------------------------------------------------------- causal LM


class CausalLMTask(Task):
    """Next-token prediction.

    Examples: ``{"text": str}`` (every token is a target) or ``{"prompt": str, "response":
    str}`` (only response tokens are targets). EOS is appended when the tokenizer has one.
    Labels are ``[B, T]`` with ``-100`` on padding and prompt; :meth:`loss` shifts the
    logits ``[B, T, V]`` itself, so labels equal input ids where they count.

    When prompt + response exceed ``max_length`` the prompt is cut from the left (keeping a
    leading BOS) down to ``max(max_length - len(response), max_length // 2)`` tokens, then the
    whole is cut on the right: a long prompt cannot squeeze the response out entirely.
    """

    name = "causal_lm"
    text_fields: ClassVar[tuple[str, ...]] = ("text", "prompt")
    head = "causal_lm"
    fields: ClassVar[tuple[tuple[str, ...], ...]] = (("text",), ("prompt", "response"))

    def _example(self, example: Example) -> tuple[list[int], list[int]]:
        eos = self.eos_token_id
        if example.get("prompt") is not None and example.get("response") is not None:
            prompt = self._encode(str(example["prompt"]), special=True)
            response = self._encode(str(example["response"]), special=False)
            if eos is not None:
                response.append(eos)
            if len(prompt) + len(response) > self.max_length:
                keep = max(self.max_length - len(response), self.max_length // 2)
                prompt = self._keep_tail(prompt, keep)
            ids = (prompt + response)[: self.max_length]
            labels = ([IGNORE_INDEX] * len(prompt) + response)[: self.max_length]
            return ids, labels
        ids = self._encode(str(example["text"]), special=True)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        ids = ids[: self.max_length]
        return ids, list(ids)

    def collate(self, examples: Sequence[Example]) -> Batch:
        """Tokenize, append EOS, truncate, right-pad; labels ``-100`` where not a target."""
        self._check(examples)
        return self._collate_causal(examples)

    def _collate_causal(self, examples: Sequence[Example]) -> Batch:
        rows = [self._example(ex) for ex in examples]
        ids = [r[0] for r in rows]
        return {
            "input_ids": _pad(ids, self.pad_token_id),
            "attention_mask": _attention_mask(ids),
            "labels": _pad([r[1] for r in rows], IGNORE_INDEX),
        }

    def loss(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token cross-entropy over the batch's target tokens (0 if there are none)."""
        labels = batch["labels"].to(logits.device)
        if logits.dim() != 3 or logits.shape[:2] != labels.shape:
            raise DataError(
                f"causal LM loss needs logits [batch, seq, vocab] matching labels {tuple(labels.shape)}, "
                f"got {tuple(logits.shape)} (is the model's head 'causal_lm'?)"
            )
        total, _, shift_labels = shifted_nll(logits, labels)
        # A batch whose responses were all truncated away has no targets: a zero loss that
        # still depends on the logits keeps backward() valid instead of producing NaN.
        return total / (shift_labels != IGNORE_INDEX).sum().clamp(min=1)

    def new_metric(self) -> Metric:
        """Token loss, perplexity and next-token accuracy over the whole evaluation set."""
        return CausalLMMetric()


class GenerativeQATask(CausalLMTask):
    """Question answering by generation, GSM8K style.

    Examples: ``{"question": str, "answer": str}``. Training is causal-LM on
    ``prompt = template.format(question=...)`` and ``response = " " + answer`` (only the
    answer is a target). Evaluation of generated text is :meth:`evaluate_generations`:
    exact match of :func:`~splitfed.data.metrics.extract_final_number` of the generation
    against that of the reference answer. :meth:`new_metric` gives teacher-forced loss,
    perplexity and token accuracy on the answers.

    Parameters
    ----------
    template : str, default ``"Question: {question}\\nAnswer:"``
        Prompt template with a ``{question}`` field; the other parameters are :class:`Task`'s.
    """

    name = "generative_qa"
    text_fields: ClassVar[tuple[str, ...]] = ("question",)
    fields = (("question", "answer"),)
    DEFAULT_TEMPLATE: ClassVar[str] = "Question: {question}\nAnswer:"

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None = None,
        max_length: int = 128,
        num_labels: int | None = None,
        template: str = DEFAULT_TEMPLATE,
    ) -> None:
        super().__init__(tokenizer, max_length, num_labels)
        if "{question}" not in template:
            raise DataError(f"generative_qa template must contain '{{question}}', got {template!r}")
        self.template = template

    def prompt(self, example: Example) -> str:
        """The generation prompt of an example (what the model continues)."""
        return self.template.format(question=str(example["question"]).strip())

    def collate(self, examples: Sequence[Example]) -> Batch:
        """Collate as causal LM on prompt + answer, with the loss on the answer only."""
        self._check(examples)
        return self._collate_causal(
            [{"prompt": self.prompt(ex), "response": " " + str(ex["answer"]).strip()} for ex in examples]
        )

    def evaluate_generations(
        self, examples: Sequence[Example], generations: Sequence[str]
    ) -> dict[str, float]:
        """Exact match of final numbers between generations and reference answers.

        Returns ``exact_match`` (fraction of examples whose generated final number equals the
        reference's) and ``answered`` (fraction of generations that contain a number at all).
        """
        if len(examples) != len(generations):
            raise DataError(f"got {len(generations)} generations for {len(examples)} examples")
        if not examples:
            return {"exact_match": 0.0, "answered": 0.0}
        correct = answered = 0
        for example, generation in zip(examples, generations, strict=True):
            predicted = extract_final_number(generation)
            answered += predicted is not None
            correct += predicted is not None and predicted == extract_final_number(str(example["answer"]))
        return {"exact_match": correct / len(examples), "answered": answered / len(examples)}


# --------------------------------------------------------------------------- multiple choice


class MultipleChoiceTask(Task):
    """Multiple-choice questions scored by the next-token logits of the answer letters (MMLU).

    Examples: ``{"question": str, "choices": list[str], "label": int}``. The prompt is::

        {question}
        A. {choice 0}
        B. {choice 1}
        ...
        Answer:

    truncated from the left (keeping a leading BOS) so that it always ends in ``"Answer:"``.
    The scores of an example are the causal-LM logits at its last real position, read at the
    token ids of ``" A"``, ``" B"``, ... (:meth:`letter_token_ids`); choices beyond the
    example's own count are masked out. Loss is cross-entropy over those scores; the metric
    reports ``accuracy``, ``macro_f1`` and ``loss``. ``num_labels`` is the number of letters
    (default 4).
    """

    name = "multiple_choice"
    text_fields: ClassVar[tuple[str, ...]] = ("question",)
    head = "causal_lm"
    fields = (("question", "choices", "label"),)

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None = None,
        max_length: int = 128,
        num_labels: int | None = None,
    ) -> None:
        super().__init__(tokenizer, max_length, num_labels)
        self.num_choices = num_labels or 4
        if self.num_choices > len(string.ascii_uppercase):
            raise DataError(f"multiple_choice supports at most 26 choices, got num_labels={num_labels}")
        self._letter_ids: list[int] | None = None

    @property
    def letters(self) -> str:
        """The answer letters, ``"ABCD"`` by default."""
        return string.ascii_uppercase[: self.num_choices]

    def letter_token_ids(self) -> list[int]:
        """Token ids of ``" A"``, ``" B"``, ... (or ``"A"`` where the spaced form is not one token)."""
        if self._letter_ids is None:
            ids: list[int] = []
            for letter in self.letters:
                for form in (" " + letter, letter):
                    encoded = self._encode(form, special=False)
                    if len(encoded) == 1:
                        ids.append(encoded[0])
                        break
                else:
                    raise DataError(
                        f"multiple_choice: the tokenizer has no single token for answer letter {letter!r}"
                    )
            if len(set(ids)) != len(ids):
                raise DataError(f"multiple_choice: answer letters map to repeated token ids {ids}")
            self._letter_ids = ids
        return self._letter_ids

    def prompt(self, example: Example) -> str:
        """The question with lettered choices, ending in ``"Answer:"``."""
        choices = [str(c) for c in example["choices"]]
        lines = [str(example["question"]).strip()]
        lines += [f"{letter}. {choice}" for letter, choice in zip(self.letters, choices, strict=False)]
        lines.append("Answer:")
        return "\n".join(lines)

    def collate(self, examples: Sequence[Example]) -> Batch:
        """Prompts right-padded; ``labels`` ``[B]`` choice indices; ``choice_mask`` ``[B, K]``."""
        self._check(examples)
        ids: list[list[int]] = []
        mask = torch.zeros(len(examples), self.num_choices, dtype=torch.bool)
        labels: list[int] = []
        for i, example in enumerate(examples):
            n = len(example["choices"])
            if not 1 <= n <= self.num_choices:
                raise DataError(
                    f"multiple_choice: example {i} has {n} choices; between 1 and {self.num_choices} "
                    "are supported (raise num_labels for more)"
                )
            label = int(example["label"])
            if not 0 <= label < n:
                raise DataError(f"multiple_choice: example {i} has label {label} for {n} choices")
            mask[i, :n] = True
            labels.append(label)
            ids.append(self._keep_tail(self._encode(self.prompt(example), special=True), self.max_length))
        self.letter_token_ids()  # fail at collate time, not in the middle of a loss
        return {
            "input_ids": _pad(ids, self.pad_token_id),
            "attention_mask": _attention_mask(ids),
            "labels": torch.tensor(labels, dtype=torch.long),
            "choice_mask": mask,
        }

    def choice_scores(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Scores ``[B, K]`` of the answer letters at each row's last real position.

        ``logits`` may be the full ``[B, T, V]`` or already the last position's ``[B, V]``.
        """
        if logits.dim() == 3:
            last = batch["attention_mask"].to(logits.device).sum(dim=1) - 1
            logits = logits[torch.arange(logits.shape[0], device=logits.device), last]
        if logits.dim() != 2:
            raise DataError(
                f"multiple_choice needs logits [batch, seq, vocab] or [batch, vocab], got {tuple(logits.shape)}"
            )
        letter_ids = torch.tensor(self.letter_token_ids(), device=logits.device)
        scores = logits.float().index_select(1, letter_ids)
        choice_mask = batch["choice_mask"].to(logits.device)
        return scores.masked_fill(~choice_mask, torch.finfo(scores.dtype).min)

    def loss(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy of :meth:`choice_scores` against the answer index."""
        return F.cross_entropy(self.choice_scores(logits, batch), batch["labels"].to(logits.device))

    def new_metric(self) -> Metric:
        """Accuracy (plus macro-F1 and loss) of the letter scores."""
        return _ChoiceMetric(self)


class _ChoiceMetric(Metric):
    def __init__(self, task: MultipleChoiceTask) -> None:
        self.task = task
        self.inner = ClassificationMetric(task.num_choices)

    def update(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> None:
        self.inner.update(self.task.choice_scores(logits, batch), batch)

    def compute(self) -> dict[str, float]:
        return self.inner.compute()


# --------------------------------------------------------------------------- extractive QA


class SpanQATask(Task):
    """Extractive question answering (SQuAD v1.1) for encoder models.

    Examples: ``{"question": str, "context": str, "answers": {"text": [...],
    "answer_start": [...]}}``. The pair is tokenized with the context truncated to fit
    ``max_length`` (one window, no document stride). ``labels`` ``[B, 2]`` hold the token
    positions of the first answer's start and end, ``(0, 0)`` when it was truncated away.
    Logits are ``[B, T, 2]`` (start, end). The batch also carries what the metric needs to
    turn a span back into text, as tensors so that it stays a plain tensor dict:
    ``offset_mapping`` ``[B, T, 2]`` (character span in the context, ``-1`` outside it),
    ``context_chars`` ``[B, C]`` and ``answer_chars`` ``[B, A, L]`` (Unicode code points,
    ``-1`` padded).

    The metric decodes the best span (``end >= start``, at most :attr:`max_answer_tokens`
    tokens, within the context) and reports SQuAD ``exact_match`` and ``f1``.
    """

    name = "span_qa"
    text_fields: ClassVar[tuple[str, ...]] = ("question",)
    head = "span_qa"
    fields = (("question", "context", "answers"),)
    max_answer_tokens: ClassVar[int] = 30

    def collate(self, examples: Sequence[Example]) -> Batch:
        """Tokenize question + context with offsets; answer token positions as labels."""
        self._check(examples)
        tokenizer = self.tokenizer
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("span_qa needs a fast tokenizer (character offsets); load it with use_fast=True")
        questions = [str(ex["question"]).lstrip() for ex in examples]
        contexts = [str(ex["context"]) for ex in examples]
        try:
            enc = tokenizer(
                questions,
                contexts,
                truncation="only_second",
                max_length=self.max_length,
                return_offsets_mapping=True,
            )
        except Exception as exc:  # tokenizers raises a bare Exception when the question alone is too long
            raise DataError(
                f"span_qa: cannot fit a question and some context in max_length={self.max_length} ({exc})"
            ) from exc
        ids: list[list[int]] = list(enc["input_ids"])
        offsets: list[list[tuple[int, int]]] = []
        labels: list[tuple[int, int]] = []
        answers: list[list[str]] = []
        for i, example in enumerate(examples):
            sequence_ids = enc.sequence_ids(i)
            row = [
                (int(s), int(e)) if sid == 1 else (-1, -1)
                for (s, e), sid in zip(enc["offset_mapping"][i], sequence_ids, strict=True)
            ]
            offsets.append(row)
            texts, starts = self._answers(example, i)
            answers.append(texts)
            labels.append(self._positions(row, starts[0], len(texts[0])) if texts else (0, 0))
        width = max(len(r) for r in ids)
        offset_tensor = torch.full((len(ids), width, 2), -1, dtype=torch.long)
        for i, row in enumerate(offsets):
            offset_tensor[i, : len(row)] = torch.tensor(row, dtype=torch.long).view(-1, 2)
        longest = max((len(t) for texts in answers for t in texts), default=0)
        answer_tensor = torch.full((len(ids), max(len(a) for a in answers), longest), -1, dtype=torch.long)
        for i, texts in enumerate(answers):
            for k, text in enumerate(texts):
                if text:
                    answer_tensor[i, k, : len(text)] = torch.tensor(_chars(text))
        batch = {
            "input_ids": _pad(ids, self.pad_token_id),
            "attention_mask": _attention_mask(ids),
            "labels": torch.tensor(labels, dtype=torch.long),
            "offset_mapping": offset_tensor,
            "context_chars": _pad([_chars(c) for c in contexts], -1),
            "answer_chars": answer_tensor,
        }
        if "token_type_ids" in enc:
            batch["token_type_ids"] = _pad(enc["token_type_ids"], 0)
        return batch

    @staticmethod
    def _answers(example: Example, index: int) -> tuple[list[str], list[int]]:
        answers = example["answers"]
        try:
            texts = [str(t) for t in answers["text"]]
            starts = [int(s) for s in answers["answer_start"]]
        except (TypeError, KeyError, ValueError):
            raise DataError(
                f"span_qa: example {index} has answers {answers!r}; expected "
                "{'text': [str, ...], 'answer_start': [int, ...]}"
            ) from None
        if len(texts) != len(starts):
            raise DataError(
                f"span_qa: example {index} has {len(texts)} answer texts but {len(starts)} starts"
            )
        return texts, starts

    @staticmethod
    def _positions(offsets: Sequence[tuple[int, int]], start_char: int, length: int) -> tuple[int, int]:
        """Token positions of a character span, or ``(0, 0)`` if it is not wholly in the window."""
        end_char = start_char + length
        inside = [j for j, (s, e) in enumerate(offsets) if s >= 0 and e > s]
        if not inside or offsets[inside[0]][0] > start_char or offsets[inside[-1]][1] < end_char:
            return 0, 0
        covering = [j for j in inside if offsets[j][1] > start_char and offsets[j][0] < end_char]
        if not covering:
            return 0, 0
        return covering[0], covering[-1]

    def loss(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean of the start and end cross-entropies, padding positions masked out."""
        labels = batch["labels"].to(logits.device)
        mask = batch["attention_mask"].to(logits.device).bool()
        if logits.dim() != 3 or logits.shape[-1] != 2 or logits.shape[:2] != mask.shape:
            raise DataError(
                f"span_qa loss needs logits [batch, seq, 2] for a batch of shape {tuple(mask.shape)}, "
                f"got {tuple(logits.shape)} (is the model's head 'span_qa'?)"
            )
        scores = logits.float().masked_fill(~mask[..., None], torch.finfo(torch.float32).min)
        start = F.cross_entropy(scores[..., 0], labels[:, 0])
        end = F.cross_entropy(scores[..., 1], labels[:, 1])
        return (start + end) / 2

    def new_metric(self) -> Metric:
        """SQuAD exact match and F1 of the best decoded spans."""
        return SpanQAMetric(self.max_answer_tokens)


def best_spans(logits: torch.Tensor, offsets: torch.Tensor, max_answer_tokens: int = 30) -> torch.Tensor:
    """The highest-scoring ``(start, end)`` token span per row, ``[B, 2]``.

    Spans lie in the context (``offsets[..., 0] >= 0``), with ``start <= end`` and at most
    ``max_answer_tokens`` tokens; the score is ``start_logit + end_logit``. Rows without any
    context token get ``(-1, -1)``.
    """
    start = logits[..., 0].float()
    end = logits[..., 1].float()
    context = offsets[..., 0].to(logits.device) >= 0
    width = start.shape[1]
    positions = torch.arange(width, device=logits.device)
    length = positions[None, :] - positions[:, None]  # end - start
    band = (length >= 0) & (length < max_answer_tokens)
    valid = band[None] & context[:, :, None] & context[:, None, :]
    scores = (start[:, :, None] + end[:, None, :]).masked_fill(~valid, float("-inf"))
    flat = scores.view(scores.shape[0], -1).argmax(dim=-1)
    spans = torch.stack([flat // width, flat % width], dim=-1)
    return spans.masked_fill(~valid.view(valid.shape[0], -1).any(dim=-1)[:, None], -1)


class SpanQAMetric(Metric):
    """SQuAD exact match and F1 of decoded spans (see :class:`SpanQATask`).

    Parameters
    ----------
    max_answer_tokens : int, default 30
        Longest span the decoder considers.
    """

    def __init__(self, max_answer_tokens: int = 30) -> None:
        self.max_answer_tokens = max_answer_tokens
        self.exact_match = 0.0
        self.f1 = 0.0
        self.count = 0
        self.predictions: list[str] = []

    def update(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> None:
        """Decode the best span of every row and score it against the reference answers."""
        offsets = batch["offset_mapping"].cpu()
        spans = best_spans(logits.detach(), offsets, self.max_answer_tokens).cpu()
        for i, (s, e) in enumerate(spans.tolist()):
            context = _text(batch["context_chars"][i].cpu())
            prediction = "" if s < 0 else context[int(offsets[i, s, 0]) : int(offsets[i, e, 1])]
            truths = [_text(row) for row in batch["answer_chars"][i].cpu() if bool((row >= 0).any())] or [""]
            self.predictions.append(prediction)
            self.exact_match += squad_exact_match(prediction, truths)
            self.f1 += squad_f1(prediction, truths)
            self.count += 1

    def compute(self) -> dict[str, float]:
        """``exact_match`` and ``f1``, each a mean over examples in ``[0, 1]``."""
        if self.count == 0:
            return {"exact_match": 0.0, "f1": 0.0}
        return {"exact_match": self.exact_match / self.count, "f1": self.f1 / self.count}


# --------------------------------------------------------------------------- registry

TASKS: dict[str, type[Task]] = {
    cls.name: cls
    for cls in (ClassificationTask, CausalLMTask, GenerativeQATask, MultipleChoiceTask, SpanQATask)
}
"""Every task by name."""


def get_task(
    name: str,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_length: int = 128,
    num_labels: int | None = None,
) -> Task:
    """Make the task ``name`` (a key of :data:`TASKS`) around a tokenizer.

    Raises
    ------
    DataError
        If no task has that name (the message lists the known ones).
    """
    try:
        cls = TASKS[name]
    except KeyError:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None
    return cls(tokenizer=tokenizer, max_length=max_length, num_labels=num_labels)
