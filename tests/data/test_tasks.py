"""Collation, losses and metrics of each task, with a tiny word-level tokenizer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from splitfed.data import TASKS, DataError, get_task
from splitfed.data.tasks import (
    ClassificationTask,
    GenerativeQATask,
    MultipleChoiceTask,
    SpanQATask,
    best_spans,
)


def test_registry_has_every_task_with_its_head() -> None:
    heads = {name: cls.head for name, cls in TASKS.items()}
    assert heads == {
        "classification": "classification",
        "causal_lm": "causal_lm",
        "generative_qa": "causal_lm",
        "multiple_choice": "causal_lm",
        "span_qa": "span_qa",
    }


def test_get_task_errors() -> None:
    with pytest.raises(DataError, match=r"unknown task 'nope'.*classification"):
        get_task("nope")
    with pytest.raises(DataError, match="needs a tokenizer"):
        get_task("classification").collate([{"text": "a", "label": 0}])


# --------------------------------------------------------------------------- classification


def test_classification_collate_pads_right_and_truncates(tok) -> None:
    task = get_task("classification", tokenizer=tok, max_length=4)
    batch = task.collate(
        [
            {"text": "the cat", "label": 1},
            {"text": "the cat sat on the mat", "label": 0},
            {"text": "dog", "label": 2},
        ]
    )
    assert batch["input_ids"].shape == (3, 4)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0, 2]
    assert batch["input_ids"][0, 3] == tok.pad_token_id
    assert batch["input_ids"][0, 0] == tok.bos_token_id
    assert "token_type_ids" not in batch


def test_classification_never_puts_the_pad_id_inside_text(tok_no_pad) -> None:
    # Without a pad token EOS pads; an EOS that is part of the text must not stay inside it,
    # or a model looking for the first pad id would pool the wrong position.
    task = get_task("classification", tokenizer=tok_no_pad, max_length=16)
    assert task.pad_token_id == tok_no_pad.eos_token_id
    batch = task.collate([{"text": "the cat [EOS] sat", "label": 0}, {"text": "a dog", "label": 1}])
    real = batch["attention_mask"].bool()
    assert (batch["input_ids"][real] != task.pad_token_id).all()
    lengths = batch["attention_mask"].sum(dim=1)
    assert lengths.tolist() == [4, 3]  # [BOS] the cat sat / [BOS] a dog
    assert (batch["input_ids"][~real] == task.pad_token_id).all()
    assert tok_no_pad.pad_token is None  # the tokenizer is left alone


def test_classification_pairs_with_token_types(enc_tok) -> None:
    task = get_task("classification", tokenizer=enc_tok, max_length=32)
    batch = task.collate(
        [
            {"text": "what is the cat", "text_pair": "a cat", "label": 0},
            {"text": "who", "text_pair": "the dog sat on the mat", "label": 1},
        ]
    )
    assert batch["token_type_ids"].shape == batch["input_ids"].shape
    assert batch["token_type_ids"][0].tolist()[:8] == [0, 0, 0, 0, 0, 0, 1, 1]
    with pytest.raises(DataError, match="text_pair"):
        task.collate([{"text": "a", "label": 0}, {"text": "b", "text_pair": "c", "label": 0}])


def test_classification_loss_and_label_checks(tok) -> None:
    task = get_task("classification", tokenizer=tok, num_labels=3)
    batch = task.collate([{"text": "the cat", "label": 1}, {"text": "dog", "label": 2}])
    logits = torch.tensor([[0.1, 2.0, -1.0], [0.5, 0.2, 0.3]], requires_grad=True)
    loss = task.loss(logits, batch)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, batch["labels"]).item())
    loss.backward()
    with pytest.raises(DataError, match=r"outside 0\.\.2"):
        task.collate([{"text": "cat", "label": 3}])
    with pytest.raises(DataError, match=r"logits \[batch, classes\]"):
        task.loss(torch.zeros(2, 5, 3), batch)
    with pytest.raises(DataError, match="needs"):
        task.collate([{"sentence": "cat", "label": 0}])
    metric = task.new_metric()
    metric.update(logits.detach(), batch)
    assert metric.compute()["accuracy"] == pytest.approx(0.5)


# --------------------------------------------------------------------------- causal LM


def test_causal_lm_appends_eos_and_masks_padding(tok) -> None:
    task = get_task("causal_lm", tokenizer=tok, max_length=16)
    batch = task.collate([{"text": "the cat sat"}, {"text": "a dog"}])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids[0].tolist() == [
        tok.bos_token_id,
        *tok.convert_tokens_to_ids(["the", "cat", "sat"]),
        tok.eos_token_id,
    ]
    assert mask.sum(dim=1).tolist() == [5, 4]
    assert labels[1, 4] == -100 and ids[1, 4] == tok.pad_token_id
    assert torch.equal(labels[mask.bool()], ids[mask.bool()])


def test_causal_lm_with_eos_as_pad_keeps_the_real_eos_as_target(tok_no_pad) -> None:
    task = get_task("causal_lm", tokenizer=tok_no_pad, max_length=16)
    batch = task.collate([{"text": "the cat sat"}, {"text": "a"}])
    eos = tok_no_pad.eos_token_id
    assert batch["labels"][1].tolist() == [
        tok_no_pad.bos_token_id,
        tok_no_pad.convert_tokens_to_ids("a"),
        eos,
        -100,
        -100,
    ]
    assert batch["input_ids"][1, 3] == eos  # padding, with the same id


def test_causal_lm_truncates_after_eos(tok) -> None:
    task = get_task("causal_lm", tokenizer=tok, max_length=3)
    batch = task.collate([{"text": "the cat sat on the mat"}])
    assert batch["input_ids"].shape == (1, 3)
    assert tok.eos_token_id not in batch["input_ids"][0].tolist()


def test_prompt_response_masks_the_prompt(tok) -> None:
    task = get_task("causal_lm", tokenizer=tok, max_length=32)
    batch = task.collate([{"prompt": "what is the cat", "response": "black"}])
    labels = batch["labels"][0].tolist()
    assert labels == [-100] * 5 + [tok.convert_tokens_to_ids("black"), tok.eos_token_id]


def test_long_prompt_is_cut_from_the_left_and_keeps_bos(tok) -> None:
    task = get_task("causal_lm", tokenizer=tok, max_length=8)
    prompt = "the cat sat on the mat the dog sat on the mat"
    batch = task.collate([{"prompt": prompt, "response": "red blue green"}])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert len(ids) == 8
    assert ids[0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(ids[1:4]) == ["on", "the", "mat"]  # the prompt's tail
    assert labels[4:] == [*tok.convert_tokens_to_ids(["red", "blue", "green"]), tok.eos_token_id]


def test_causal_loss_matches_shifted_cross_entropy(tok) -> None:
    task = get_task("causal_lm", tokenizer=tok, max_length=16)
    batch = task.collate([{"text": "the cat sat"}, {"text": "a dog"}])
    torch.manual_seed(0)
    logits = torch.randn(*batch["input_ids"].shape, len(tok), requires_grad=True)
    loss = task.loss(logits, batch)
    expected = F.cross_entropy(
        logits[:, :-1].reshape(-1, len(tok)), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    metric = task.new_metric()
    metric.update(logits.detach(), batch)
    assert metric.compute()["loss"] == pytest.approx(expected.item(), rel=1e-6)


def test_causal_loss_without_targets_is_zero_not_nan(tok) -> None:
    task = get_task("causal_lm", tokenizer=tok)
    batch = {"labels": torch.full((2, 3), -100)}
    logits = torch.randn(2, 3, 7, requires_grad=True)
    loss = task.loss(logits, batch)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None


# --------------------------------------------------------------------------- generative QA


def test_generative_qa_trains_on_the_answer_only(tok) -> None:
    task = get_task("generative_qa", tokenizer=tok, max_length=64)
    assert isinstance(task, GenerativeQATask)
    example = {"question": "Tom has 3 apples", "answer": "5 + 3 = 8\n#### 8"}
    assert task.prompt(example) == "Question: Tom has 3 apples\nAnswer:"
    batch = task.collate([example])
    targets = batch["labels"][0][batch["labels"][0] != -100].tolist()
    answer_ids = tok(" 5 + 3 = 8\n#### 8", add_special_tokens=False)["input_ids"]
    assert targets == [*answer_ids, tok.eos_token_id]


def test_evaluate_generations_exact_match() -> None:
    task = get_task("generative_qa")
    assert isinstance(task, GenerativeQATask)
    examples = [
        {"question": "q", "answer": "3 + 5 = 8\n#### 8"},
        {"question": "q", "answer": "#### 1,200"},
        {"question": "q", "answer": "#### -3"},
        {"question": "q", "answer": "#### 2"},
    ]
    generations = ["so 8 apples.", "The total is 1200.00", "It is 3.", "no idea"]
    result = task.evaluate_generations(examples, generations)
    assert result == {"exact_match": pytest.approx(0.5), "answered": pytest.approx(0.75)}
    with pytest.raises(DataError, match="3 generations for 4 examples"):
        task.evaluate_generations(examples, generations[:3])


# --------------------------------------------------------------------------- multiple choice

MC = [
    {"question": "what color is the sky", "choices": ["red", "blue", "green", "black"], "label": 1},
    {"question": "where is the cat", "choices": ["on the mat", "down"], "label": 0},
]


def test_multiple_choice_prompt_and_batch(tok) -> None:
    task = get_task("multiple_choice", tokenizer=tok, max_length=64)
    assert isinstance(task, MultipleChoiceTask)
    assert task.prompt(MC[0]) == "what color is the sky\nA. red\nB. blue\nC. green\nD. black\nAnswer:"
    batch = task.collate(MC)
    assert batch["labels"].tolist() == [1, 0]
    assert batch["choice_mask"].tolist() == [[True] * 4, [True, True, False, False]]
    last = batch["attention_mask"].sum(dim=1) - 1
    for row, position in enumerate(last.tolist()):
        assert tok.convert_ids_to_tokens(int(batch["input_ids"][row, position])) == ":"
    assert task.letter_token_ids() == tok.convert_tokens_to_ids(["A", "B", "C", "D"])


def test_multiple_choice_scores_the_letters_at_the_last_position(tok) -> None:
    task = get_task("multiple_choice", tokenizer=tok, max_length=64)
    assert isinstance(task, MultipleChoiceTask)
    batch = task.collate(MC)
    letters = task.letter_token_ids()
    logits = torch.zeros(*batch["input_ids"].shape, len(tok))
    last = batch["attention_mask"].sum(dim=1) - 1
    logits[0, last[0], letters[1]] = 5.0  # right: B
    logits[1, last[1], letters[2]] = 9.0  # C is masked out for a 2-choice question...
    logits[1, last[1], letters[1]] = 1.0  # ...so B wins: wrong
    logits[1, 0, letters[0]] = 50.0  # not the last position: ignored
    scores = task.choice_scores(logits, batch)
    assert scores.argmax(dim=-1).tolist() == [1, 1]
    metric = task.new_metric()
    metric.update(logits, batch)
    assert metric.compute()["accuracy"] == pytest.approx(0.5)
    loss = task.loss(logits, batch)
    assert torch.isfinite(loss)
    last_only = logits[torch.arange(2), last]
    assert torch.allclose(task.choice_scores(last_only, batch), scores)


def test_multiple_choice_truncates_from_the_left(tok) -> None:
    task = get_task("multiple_choice", tokenizer=tok, max_length=12)
    batch = task.collate([MC[0]])
    ids = batch["input_ids"][0].tolist()
    assert len(ids) == 12
    assert ids[0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(ids[-2:]) == ["Answer", ":"]
    with pytest.raises(DataError, match="5 choices"):
        task.collate([{"question": "q", "choices": list("abcde"), "label": 0}])


# --------------------------------------------------------------------------- span QA

SQUAD = [
    {
        "question": "where is the cat",
        "context": "the black cat sat on the mat",
        "answers": {"text": ["on the mat", "the mat"], "answer_start": [17, 20]},
    },
    {
        "question": "what is the color",
        "context": "the sky is blue and the mat is red",
        "answers": {"text": ["red"], "answer_start": [31]},
    },
]


def test_span_qa_positions_and_truncation(enc_tok) -> None:
    task = get_task("span_qa", tokenizer=enc_tok, max_length=32)
    batch = task.collate(SQUAD)
    ids = batch["input_ids"]
    for row, (start, end) in enumerate(batch["labels"].tolist()):
        span = enc_tok.decode(ids[row, start : end + 1])
        assert span == SQUAD[row]["answers"]["text"][0]
    assert batch["offset_mapping"].shape == (*ids.shape, 2)
    assert batch["token_type_ids"].shape == ids.shape
    # 7 context tokens fit: all of the first context, not the second's last word "red".
    short = get_task("span_qa", tokenizer=enc_tok, max_length=14).collate(SQUAD)
    assert short["labels"][1].tolist() == [0, 0]
    assert short["labels"][0].tolist() != [0, 0]


def test_span_qa_metric_and_loss(enc_tok) -> None:
    task = get_task("span_qa", tokenizer=enc_tok, max_length=32)
    assert isinstance(task, SpanQATask)
    batch = task.collate(SQUAD)
    logits = torch.zeros(*batch["input_ids"].shape, 2)
    (s0, e0), (s1, _) = batch["labels"].tolist()
    logits[0, s0 + 1, 0] = 5.0  # "the mat": exact match with the second reference
    logits[0, e0, 1] = 5.0
    logits[1, s1 - 1, 0] = 5.0  # "is red" against "red": F1 2/3
    logits[1, s1, 1] = 5.0
    logits[1, 0, 0] = 100.0  # the [CLS] position is outside the context: never decoded
    metric = task.new_metric()
    metric.update(logits, batch)
    result = metric.compute()
    assert metric.predictions == ["the mat", "is red"]  # type: ignore[attr-defined]
    assert result["exact_match"] == pytest.approx(0.5)
    assert result["f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert torch.isfinite(task.loss(logits, batch))


def test_best_spans_respects_order_and_length() -> None:
    logits = torch.zeros(1, 41, 2)
    offsets = torch.zeros(1, 41, 2, dtype=torch.long)
    logits[0, 10, 0] = 3.0
    logits[0, 5, 1] = 4.0  # end before start: not allowed
    logits[0, 40, 1] = 3.5  # 10..40 is 31 tokens: too long
    logits[0, 12, 1] = 2.0  # 5.0 beats any start before 5 ending at 5 (4.0)
    assert best_spans(logits, offsets, max_answer_tokens=30).tolist() == [[10, 12]]
    offsets[:] = -1
    assert best_spans(logits, offsets).tolist() == [[-1, -1]]


def test_span_qa_needs_answers_in_shape(enc_tok) -> None:
    task = get_task("span_qa", tokenizer=enc_tok)
    with pytest.raises(DataError, match="answers"):
        task.collate([{"question": "q", "context": "c", "answers": ["x"]}])


def test_classification_task_class_is_registered() -> None:
    assert TASKS["classification"] is ClassificationTask
