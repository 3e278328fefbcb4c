"""What a run loads before the parties exist: seed, data (this party's share), task, tokenizer, model."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from splitfed.config import ConfigError, RunConfig
from splitfed.models.loading import load_model, load_tokenizer
from splitfed.models.partition import Segment
from splitfed.run.checkpoints import PARTY_ROLES


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Workload:
    """Everything a run needs before the parties exist: data, task, model and schedule length."""

    cfg: RunConfig
    splits: Any
    task: Any
    model: torch.nn.Module
    total_steps: int
    load_s: float
    tokenizer: Any = None


def party_share(cfg: RunConfig, splits: Any, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """This data party's share of the training split (``data.partition`` over ``data.num_parties``).

    Every party computes the same deterministic partition (same data, same seed) and prints the
    summary of all shares, so the operator sees the label skew each party trains on.
    """
    from splitfed.data.partition import format_summary, parse_partition, partition_examples

    scheme, alpha = parse_partition(cfg.data.partition)
    parts = partition_examples(
        splits.train,
        cfg.data.num_parties,
        scheme=scheme,
        alpha=alpha,
        seed=cfg.data.seed,
        label_key="label",
        min_per_party=cfg.train.batch_size,
    )
    log(
        f"partition {cfg.data.partition} of {len(splits.train)} training examples over {cfg.data.num_parties} parties "
        f"(this is party {cfg.data.party_index}):\n{format_summary(parts, splits.label_names)}"
    )
    return list(parts[cfg.data.party_index])


def load_run_model(cfg: RunConfig, head: str, num_labels: int | None) -> tuple[Any, torch.nn.Module]:
    """``cfg``'s tokenizer and its model with task head ``head`` (dtype and attention from ``cfg.model``)."""
    tokenizer = load_tokenizer(cfg.model.name)
    model = load_model(
        cfg.model.name,
        head,
        num_labels,
        tokenizer.pad_token_id,
        cfg.model.dtype,
        cfg.model.attn_implementation,
    )
    return tokenizer, model


def prepare(cfg: RunConfig, log: Callable[[str], None] = print) -> Workload:
    """Seed, load the data, the task, the tokenizer and the model; count the optimizer steps."""
    from splitfed.data import get_task, load_splits

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    t0 = time.perf_counter()
    splits = load_splits(cfg.data.model_copy(update={"task": cfg.task}))
    if cfg.data.num_parties > 1:
        splits.train = party_share(cfg, splits, log)
    num_labels = len(splits.label_names) if splits.label_names else None
    if cfg.model.num_labels is not None and num_labels is not None and cfg.model.num_labels != num_labels:
        raise ConfigError(
            f"model.num_labels={cfg.model.num_labels} but dataset {cfg.data.name!r} has {num_labels} classes "
            f"({splits.label_names}); fix model.num_labels"
        )
    tokenizer, model = load_run_model(cfg, cfg.head, num_labels)
    task = get_task(cfg.task, tokenizer=tokenizer, max_length=cfg.data.max_length, num_labels=num_labels)
    batch = cfg.train.batch_size
    if len(splits.train) < batch:
        raise ConfigError(
            f"the training split has {len(splits.train)} examples, fewer than train.batch_size={batch}"
        )
    per_epoch = max(1, len(splits.train) // (batch * cfg.train.grad_accum))
    total = cfg.train.steps or max(1, math.ceil(cfg.train.epochs * per_epoch))
    return Workload(cfg, splits, task, model, total, time.perf_counter() - t0, tokenizer)


def trainable_counts(segments: dict[str, Segment]) -> dict[str, int]:
    """Trainable parameters held by each party."""
    return {
        party: sum(p.numel() for r in roles if r in segments for p in segments[r].trainable_parameters())
        for party, roles in PARTY_ROLES.items()
    }


def build_run_front(cfg: RunConfig, work: Workload) -> Any:
    """The data party's front of ``cfg.defenses``, with what a defense may take from the run: the
    model's width, its tokenizer and the sampling rate of a batch (``batch_size * grad_accum``
    over this party's training examples, for DP-SGD's accountant)."""
    from splitfed.split.front import build_front

    per_update = cfg.train.batch_size * cfg.train.grad_accum
    return build_front(
        cfg.defenses,
        work.model,
        cfg.train.seed,
        tokenizer=work.tokenizer,
        sample_rate=min(1.0, per_update / max(1, len(work.splits.train))),
    )
