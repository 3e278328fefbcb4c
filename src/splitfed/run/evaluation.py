"""Evaluation across the split: the task's metrics on a split, predicting (and generating) across it."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

from splitfed.split.front import FrontContext
from splitfed.split.parties import DataParty


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def evaluate(
    party: DataParty,
    task: Any,
    examples: Sequence[dict[str, Any]],
    batch_size: int,
    progress: Any = None,
    desc: str = "eval",
    max_new_tokens: int = 0,
) -> dict[str, float]:
    """Metrics of ``task`` on ``examples``, predicting across the split (no labels cross).

    Tasks judged on generated text (generative QA) also generate across the split, with a KV
    cache on each side, when ``max_new_tokens`` > 0.
    """
    metric = task.new_metric()
    bar = progress.add_task(desc, total=math.ceil(len(examples) / batch_size), info="") if progress else None
    context = FrontContext("eval", party.updates)
    for start in range(0, len(examples), batch_size):
        raw = examples[start : start + batch_size]
        chunk = party.front.examples(raw, task.text_fields, context)
        batch = task.collate(chunk)
        original = task.collate(list(raw)) if party.front.touches_text else None
        logits = party.predict(batch, ids=list(range(start, start + len(chunk))), original=original)
        metric.update(logits.float(), batch)
        if progress is not None:
            progress.advance(bar)
    if progress is not None:
        progress.remove_task(bar)
    metrics = {k: float(v) for k, v in metric.compute().items()}
    if max_new_tokens > 0 and hasattr(task, "evaluate_generations"):
        metrics |= _evaluate_generations(party, task, examples, batch_size, progress, desc, max_new_tokens)
    return metrics


def _evaluate_generations(
    party: DataParty,
    task: Any,
    examples: Sequence[dict[str, Any]],
    batch_size: int,
    progress: Any,
    desc: str,
    max_new_tokens: int,
) -> dict[str, float]:
    from splitfed.split.decoding import DecodingConfig
    from splitfed.split.inference import SplitGenerator

    decoding = DecodingConfig(max_new_tokens=max_new_tokens, stop=("\n\n", "Question:"))
    generator = SplitGenerator(
        party.head,
        party.channel,
        task.tokenizer,
        tail=party.tail,
        decoding=decoding,
        front=party.front,
        ground_truth=getattr(party.ground_truth, "generation", None),
    )
    bar = progress.add_task(f"{desc}: generate", total=len(examples), info="") if progress else None
    generations: list[str] = []
    for chunk in _chunks(examples, batch_size):
        generations += generator.generate([task.prompt(ex) for ex in chunk])
        if progress is not None:
            progress.advance(bar, len(chunk))
    if progress is not None:
        progress.remove_task(bar)
    return {k: float(v) for k, v in task.evaluate_generations(list(examples), generations).items()}
