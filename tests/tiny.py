"""Tiny random models of every supported family, for fast unit tests."""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    BertConfig,
    DistilBertConfig,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    RobertaConfig,
)

VOCAB = 97
PAD = 0


def tiny_config(family: str, num_labels: int = 3) -> PretrainedConfig:
    """A 4-layer random config with dropout off (so split and unsplit runs are comparable)."""
    common = {
        "vocab_size": VOCAB,
        "pad_token_id": PAD,
        "num_labels": num_labels,
        "eos_token_id": 1,
        "bos_token_id": 1,
    }
    decoder = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
        **common,
    }
    encoder = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "max_position_embeddings": 64,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "classifier_dropout": 0.0,
        **common,
    }
    if family == "llama":
        return LlamaConfig(**decoder)
    if family == "qwen2":
        return Qwen2Config(**decoder)
    if family == "mistral":
        return MistralConfig(**decoder, sliding_window=4)
    if family == "gemma":
        return GemmaConfig(**decoder, head_dim=8)
    if family == "gpt2":
        return GPT2Config(
            n_embd=32,
            n_layer=4,
            n_head=4,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            summary_first_dropout=0.0,
            **common,
        )
    if family == "bert":
        return BertConfig(**encoder)
    if family == "roberta":
        return RobertaConfig(**{**encoder, "pad_token_id": 1, "max_position_embeddings": 70})
    if family == "distilbert":
        return DistilBertConfig(
            vocab_size=VOCAB,
            pad_token_id=PAD,
            num_labels=num_labels,
            dim=32,
            hidden_dim=64,
            n_layers=4,
            n_heads=4,
            max_position_embeddings=64,
            dropout=0.0,
            attention_dropout=0.0,
            seq_classif_dropout=0.0,
            qa_dropout=0.0,
        )
    raise KeyError(family)


DECODERS = ("llama", "qwen2", "mistral", "gemma", "gpt2")
ENCODERS = ("bert", "roberta", "distilbert")
FAMILY_HEADS = [(f, h) for f in DECODERS for h in ("causal_lm", "classification")] + [
    (f, h) for f in ENCODERS for h in ("classification", "span_qa")
]


def tiny_model(family: str, head: str, seed: int = 0) -> torch.nn.Module:
    """A random tiny task model in eval mode."""
    torch.manual_seed(seed)
    config = tiny_config(family, num_labels=2 if head == "span_qa" else 3)
    config._attn_implementation = "eager" if family == "gemma" else "sdpa"
    cls = {
        "causal_lm": AutoModelForCausalLM,
        "classification": AutoModelForSequenceClassification,
        "span_qa": AutoModelForQuestionAnswering,
    }[head]
    return cls.from_config(config).eval()


def tiny_batch(
    head: str, batch: int = 3, seq: int = 9, seed: int = 1, pad: int = PAD
) -> dict[str, torch.Tensor]:
    """Right-padded random batch with labels for ``head``; pad ids only where the mask is 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(1, batch):
        mask[row, seq - 2 * row :] = 0
    ids = ids.masked_fill(mask == 0, pad)
    if head == "causal_lm":
        labels = ids.masked_fill(mask == 0, -100)
    elif head == "classification":
        labels = torch.randint(0, 3, (batch,), generator=g)
    else:
        starts = torch.randint(0, 3, (batch,), generator=g)
        labels = torch.stack([starts, starts + 1], dim=-1)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def reference_logits(model: torch.nn.Module, head: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The unsplit model's logits, in the layout segments produce."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if head == "span_qa":
        return torch.stack([out.start_logits, out.end_logits], dim=-1)
    return out.logits


def simple_loss(head: str):
    """A task loss of the shape splitfed's tasks use: loss(logits, batch)."""

    def loss(logits: torch.Tensor, batch) -> torch.Tensor:
        labels = batch["labels"]
        if head == "causal_lm":
            return torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        if head == "classification":
            return torch.nn.functional.cross_entropy(logits, labels)
        start = torch.nn.functional.cross_entropy(logits[..., 0], labels[:, 0])
        end = torch.nn.functional.cross_entropy(logits[..., 1], labels[:, 1])
        return (start + end) / 2

    return loss


WORDS = [
    "the",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "mat",
    "log",
    "a",
    "big",
    "small",
    "red",
    "blue",
    "green",
    "tree",
    "house",
    "car",
    "road",
    "sun",
    "moon",
    "star",
    "sky",
    "computer",
    "program",
    "bug",
    "code",
    "food",
    "bread",
    "soup",
    "cheese",
    "law",
    "court",
    "judge",
    "crime",
    "ship",
    "space",
    "captain",
    "star",
]


def tiny_tokenizer():
    """A word-level fast tokenizer over :data:`WORDS` with pad/eos/unk tokens (ids 0, 1, 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    for i in range(VOCAB - len(vocab)):  # every id the tiny models can produce decodes to something
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def save_tiny_pretrained(directory, family: str = "llama", **overrides: Any) -> str:
    """Save a tiny random causal LM of ``family`` with :func:`tiny_tokenizer` as a local model dir
    (``overrides`` set its config's attributes, e.g. ``attention_dropout=0.1``)."""
    torch.manual_seed(0)
    config = tiny_config(family)
    config.vocab_size = VOCAB
    for key, value in overrides.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return str(directory)


TOPICS = {0: WORDS[:10], 1: WORDS[10:20], 2: WORDS[20:]}


def write_topic_csv(path, n: int = 96) -> None:
    """A 3-class CSV (columns sentence, topic) whose classes use disjoint words: learnable fast."""
    import random

    rng = random.Random(0)
    lines = ["sentence,topic"]
    for i in range(n):
        label = i % 3
        lines.append(" ".join(rng.choice(TOPICS[label]) for _ in range(rng.randint(3, 8))) + f",t{label}")
    path.write_text("\n".join(lines) + "\n")


def write_binary_csv(path, n: int = 160, positive: float = 0.25) -> None:
    """An imbalanced binary CSV (columns sentence, topic) whose classes use disjoint words."""
    import random

    rng = random.Random(0)
    lines = ["sentence,topic"]
    for _ in range(n):
        label = int(rng.random() < positive)
        lines.append(" ".join(rng.choice(TOPICS[label]) for _ in range(rng.randint(3, 8))) + f",t{label}")
    path.write_text("\n".join(lines) + "\n")


def write_sentence_csv(path, n: int, words: tuple[int, int] = (5, 5), seed: int = 0) -> None:
    """A one-column CSV (column sentence) of ``n`` sentences of :data:`WORDS`, each of
    ``words[0]`` to ``words[1]`` words: a causal LM's training text."""
    import random

    rng = random.Random(seed)
    low, high = words
    lines = ["sentence"]
    for _ in range(n):
        length = low if low == high else rng.randint(low, high)
        lines.append(" ".join(rng.choice(WORDS) for _ in range(length)))
    path.write_text("\n".join(lines) + "\n")


def sentence_root(root, n: int, words: tuple[int, int] = (5, 5), **model: Any):
    """``root`` with a tiny causal LM (``model``: its config overrides) in ``root/model`` and
    :func:`write_sentence_csv`'s ``n`` sentences in ``root/data.csv``; returns ``root``."""
    save_tiny_pretrained(root / "model", **model)
    write_sentence_csv(root / "data.csv", n, words)
    return root


#: Train settings under which each federated client's update is one plain SGD step (-lr * gradient).
SGD_STEP = {"optimizer": "sgd", "max_grad_norm": None}


def causal_lm_config(
    root, out: str, *, max_train: int, max_eval: int, train: dict, federated: dict | None = None
) -> dict:
    """A raw causal LM run config over :func:`sentence_root`'s model and sentences, without
    evaluation before training or generation (``train`` and ``federated`` fill their sections)."""
    return run_config(
        root,
        out,
        task="causal_lm",
        data={
            "task": "causal_lm",
            "columns": {"text": "sentence"},
            "max_train": max_train,
            "max_eval": max_eval,
        },
        train={"eval_before": False, "eval_max_new_tokens": 0, **train},
        **({} if federated is None else {"federated": federated}),
    )


def run_config(root, out: str, **sections) -> dict:
    """A raw run config over the tiny model and CSV in ``root`` (``sections`` update top-level keys)."""
    raw = {
        "task": "classification",
        "mode": "splitlora",
        "model": {"name": str(root / "model")},
        "data": {
            "name": "local",
            "path": str(root / "data.csv"),
            "columns": {"text": "sentence", "label": "topic"},
            "max_length": 16,
        },
        "split": {"setting": "hbt", "head_layers": 1, "tail_layers": 1},
        "train": {"steps": 6, "batch_size": 4, "lr": 5e-3, "seed": 0},
        "output_dir": str(root / out),
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw


def crash_or_finish(run: Any, attacks: Any, **kwargs: Any) -> Any:
    """A sweep worker stand-in (importable in spawned workers): the process dies on runs whose
    spec has ``"crash": True``, and finishes the others at once."""
    import os
    import time

    from splitfed.bench.sweep import RunOutcome

    if run.spec.get("crash"):
        time.sleep(1.5)  # in flight long enough to be seen running
        os._exit(3)
    return RunOutcome(run.key, {"status": "done"}, [], 0.0)


def served_run(cfg: Any, server_record, party_record, client_id: str = "clinic") -> Any:
    """``cfg`` over gRPC on this machine: a recording model party (``serve --record``) and one data
    party that joins it and records its own side (``join --record``); the join's result."""
    from splitfed.runtime import join, start_server

    server = start_server(cfg, port=0, record=server_record, log=lambda s: None)
    try:
        return join(
            cfg,
            f"127.0.0.1:{server.port}",
            client_id=client_id,
            progress=False,
            log=lambda s: None,
            record=party_record,
        )
    finally:
        server.stop()
