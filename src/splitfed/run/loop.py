"""The training loop of a split run: evaluate, train through the data party with callbacks, evaluate, save.

The step logic lives in the parties (:mod:`splitfed.split.parties`); periodic work (evaluation,
adapter averaging, checkpoints) lives in callbacks (:mod:`splitfed.run.callbacks`); this module
drives the steps and reports.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from splitfed.atomic import replace_json
from splitfed.models.partition import Segment
from splitfed.run.callbacks import Callback, LoopState, default_callbacks, next_sync
from splitfed.run.checkpoints import CHECKPOINT, load_checkpoint, save_adapters
from splitfed.run.evaluation import evaluate
from splitfed.run.workload import Workload, trainable_counts
from splitfed.split.front import FrontContext
from splitfed.split.parties import DataParty, MicroBatch


def progress_bars(enabled: bool) -> Any:
    """A rich progress display for a run (a null context when ``enabled`` is false)."""
    if not enabled:
        return nullcontext(None)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
    )


@dataclass
class RunResult:
    """What a run produced (also written to ``results.json``)."""

    output_dir: Path
    metrics_before: dict[str, float] | None
    metrics_after: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def _micro_batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless deterministic micro-batches of example indices, reshuffled each epoch."""
    epoch = 0
    while True:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]
        epoch += 1


def train_loop(
    work: Workload,
    data_party: DataParty,
    segments: dict[str, Segment],
    parties: dict[str, Any],
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    check_resume: Callable[[int], int] | None = None,
    callbacks: Sequence[Callback] | None = None,
) -> RunResult:
    """Drive ``data_party`` through the run: evaluate, train with callbacks, evaluate, save.

    ``parties`` are the party objects this process holds (their adapters and optimizer states go
    into checkpoints): both in process, only the data party when the model party is remote.
    ``callbacks`` run in order after :func:`~splitfed.run.callbacks.default_callbacks` (evaluation,
    averaging and checkpoints as ``train:`` asks); ``check_resume`` lets a remote run agree on the
    step to resume from with its model party.
    """
    cfg, task, splits, total = work.cfg, work.task, work.splits, work.total_steps
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    callbacks = default_callbacks(work) + list(callbacks or ())
    timings: dict[str, float] = {"load_s": work.load_s}
    trainable = trainable_counts(segments)
    log(
        f"model {cfg.model.name}: {segments['head'].family.num_layers(work.model)} layers, split {cfg.split.setting} "
        f"head={cfg.split.head_layers} tail={cfg.split.tail_layers}, mode {cfg.mode}; trainable params "
        f"data party {trainable['data_party']:,}, model party {trainable['model_party']:,}"
    )
    eval_examples = getattr(splits, cfg.data.eval_split)
    eval_bs = cfg.train.eval_batch_size or cfg.train.batch_size
    gen_tokens = cfg.train.eval_max_new_tokens
    state = LoopState(work, data_party, segments, parties, out, total, log=log)
    if resume:
        state.step, state.history = load_checkpoint(out, segments, parties)
        if check_resume is not None:
            state.step = check_resume(state.step)
            state.history = [h for h in state.history if h["step"] <= state.step]
        log(f"resumed from {out / CHECKPOINT} at step {state.step}/{total}")
    start_step, history = state.step, state.history

    def evaluated(name: str, metrics: dict[str, float]) -> dict[str, float]:
        for callback in callbacks:
            callback.on_evaluation(state, name, metrics)
        return metrics

    metrics_before = None
    with progress_bars(progress) as bar:
        state.progress = bar
        if cfg.train.eval_before and start_step == 0:
            t = time.perf_counter()
            metrics_before = evaluated(
                "before",
                evaluate(data_party, task, eval_examples, eval_bs, bar, "eval (before)", gen_tokens),
            )
            timings["eval_before_s"] = time.perf_counter() - t
            log(f"{cfg.data.eval_split} before fine-tuning: {format_metrics(metrics_before)}")
        accum, window = cfg.train.grad_accum, cfg.train.window
        per_epoch = max(1, len(splits.train) // cfg.train.batch_size)  # micro-batches per epoch
        batches = _micro_batches(len(splits.train), cfg.train.batch_size, cfg.train.seed)
        for _ in range(start_step * accum):
            next(batches)
        step_bar = bar.add_task("train", total=total, completed=start_step, info="") if bar else None
        t_train = time.perf_counter()
        streaming = cfg.train.schedule == "forward-only"

        def micro_batches(first: int, last: int) -> Iterator[MicroBatch]:
            for _ in range(first, last):
                for micro in range(accum):
                    ids = next(batches)
                    raw = [splits.train[i] for i in ids]
                    examples = data_party.front.examples(raw, task.text_fields, FrontContext("train"))
                    original = task.collate(raw) if data_party.front.touches_text else None
                    yield MicroBatch(task.collate(examples), micro == accum - 1, 1.0 / accum, ids, original)

        while state.step < total:
            # Run to the next step at which a callback needs the pipeline drained.
            end = next_sync(state.step, total, callbacks)
            results = data_party.train_stream(
                micro_batches(state.step, end), window, across_updates=streaming
            )
            for index in range(state.step, end):
                t_step = time.perf_counter()
                done = [next(results) for _ in range(accum)]
                record = {
                    "step": index + 1,
                    "loss": float(np.mean([r.loss for r in done])),
                    "seconds": time.perf_counter() - t_step,
                    "bytes_to_model": sum(r.bytes_to_model for r in done),
                    "bytes_to_data": sum(r.bytes_to_data for r in done),
                }
                record |= data_party.front.step_metrics()  # e.g. DP-SGD's epsilon so far
                history.append(record)
                if bar is not None:
                    bar.update(step_bar, advance=1, info=f"loss {record['loss']:.4f}")
                for callback in callbacks:
                    callback.on_step(state, record)
                epoch = (index + 1) * accum // per_epoch
                if epoch > index * accum // per_epoch:
                    for callback in callbacks:
                        callback.on_epoch(state, epoch)
            results.close()
            state.step = end
            for callback in callbacks:
                if callback.every and end % callback.every == 0:
                    callback.on_sync(state)
        timings["train_s"] = time.perf_counter() - t_train
        timings["data_party_wait_s"] = data_party.wait_s
        timings["data_party_compute_s"] = max(0.0, timings["train_s"] - data_party.wait_s)
        head_tokens = dict(data_party.head_tokens)
        t = time.perf_counter()
        metrics_after = evaluated(
            "after", evaluate(data_party, task, eval_examples, eval_bs, bar, "eval (after)", gen_tokens)
        )
        timings["eval_after_s"] = time.perf_counter() - t
    log(f"{cfg.data.eval_split} after fine-tuning:  {format_metrics(metrics_after)}")
    log(
        f"training: {timings['train_s']:.1f} s, of which the data party computed {timings['data_party_compute_s']:.1f} s "
        f"and waited {timings['data_party_wait_s']:.1f} s on the model party"
    )
    for callback in callbacks:
        callback.on_end(state)

    adapters = save_adapters(segments, out, tuple(parties))
    new_steps = [h for h in history if h["step"] > start_step]
    summary = {
        "config": cfg.model_dump(mode="json"),
        "metrics_before": metrics_before,
        "metrics_after": metrics_after,
        "steps": total,
        "examples": splits.sizes(),
        "eval_split": cfg.data.eval_split,
        "label_names": splits.label_names,
        "trainable_params": trainable,
        "timings": timings
        | {"mean_step_s": float(np.mean([h["seconds"] for h in new_steps])) if new_steps else 0.0},
        "bytes_per_step": {
            "to_model": float(np.mean([h["bytes_to_model"] for h in history])) if history else 0.0,
            "to_data": float(np.mean([h["bytes_to_data"] for h in history])) if history else 0.0,
        },
        "compute_share": compute_share(work, segments),
        # Real tokens the data party's head ran forward / backward during training (measured).
        "data_party_head_tokens": head_tokens,
        "adapters": adapters,
        "history": history,
    }
    write_results(out, summary)
    return RunResult(out, metrics_before, metrics_after, history, summary)


def write_results(out: Path, summary: dict[str, Any]) -> None:
    """Write ``out/results.json`` atomically (a reader never sees half of it)."""
    replace_json(out / "results.json", summary, indent=2)


def compute_share(work: Workload, segments: dict[str, Segment]) -> dict[str, Any] | None:
    """Analytical FLOPs per training step on each party (models/flops.py), at batch x max_length."""
    from splitfed.models.flops import split_training_flops
    from splitfed.models.partition import SplitConfigError

    cfg = work.cfg
    ft = cfg.segment_finetune()
    targets = ft["body"].target_modules or segments["head"].family.lora_targets
    try:
        flops = split_training_flops(
            work.model.config,
            cfg.split.spec(),
            cfg.train.batch_size,
            cfg.data.max_length,
            cfg.head,
            ft["head"].mode,
            ft["body"].mode,
            ft["tail"].mode,
            lora_r=ft["body"].r,
            lora_targets=targets,
        )
    except (SplitConfigError, ValueError):
        return None
    return {
        "data_party_flops": flops.data_party,
        "model_party_flops": flops.model_party,
        "data_share": flops.data_share,
    }


def format_metrics(metrics: dict[str, float]) -> str:
    """``name value`` pairs of a metrics dict, for logs."""
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
