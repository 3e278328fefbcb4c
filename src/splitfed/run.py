"""One split fine-tuning run in one process: load, split, train, evaluate, save.

This is what ``splitfed train`` and ``splitfed demo`` call. The step logic lives in the parties
(:mod:`splitfed.split.parties`); this module only drives them, evaluates, checkpoints and reports.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
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
from safetensors.torch import load_file, save_file

from splitfed.config import ConfigError, RunConfig
from splitfed.models.loading import load_model, load_tokenizer
from splitfed.models.partition import Segment
from splitfed.split.front import FrontContext, build_front
from splitfed.split.parties import DataParty, MicroBatch
from splitfed.split.system import build_split
from splitfed.transport.channel import ChannelTransform

CHECKPOINT = "checkpoint"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _progress(enabled: bool) -> Any:
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
        chunk = party.front.examples(examples[start : start + batch_size], task.text_fields, context)
        batch = task.collate(chunk)
        logits = party.predict(batch, ids=list(range(start, start + len(chunk))))
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


@dataclass
class RunResult:
    """What a run produced (also written to ``results.json``)."""

    output_dir: Path
    metrics_before: dict[str, float] | None
    metrics_after: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def _named_trainable(segments: dict[str, Segment], roles: Sequence[str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for role in roles:
        if role in segments:
            for name, p in segments[role].named_model_parameters(trainable_only=True).items():
                out[name] = p.detach().contiguous()
    return out


#: What each party's adapter file holds: its segments and (data party) its defenses' parameters.
PARTY_ROLES = {"data_party": ("head", "tail", "front"), "model_party": ("body",)}


def save_adapters(
    segments: dict[str, Segment], directory: Path, parties: Sequence[str] = tuple(PARTY_ROLES)
) -> dict[str, str]:
    """Write each party's trainable parameters (LoRA, task head, or all) as safetensors."""
    paths = {}
    for party in parties:
        roles = PARTY_ROLES[party]
        path = write_adapter(_named_trainable(segments, roles), directory / party, roles)
        paths[party] = str(path)
    return paths


def write_adapter(
    tensors: dict[str, torch.Tensor], directory: Path, roles: Sequence[str], **meta: str
) -> Path:
    """Write one party's parameters as ``directory/adapter.safetensors`` (what :func:`load_adapters` reads).

    Atomically: a reader (or a crash) sees the previous file or the new one, never half of one.
    """
    path = directory / "adapter.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"roles": ",".join(roles), **meta})
    os.replace(tmp, path)
    return path


def load_adapters(
    segments: dict[str, Segment], directory: Path, parties: Sequence[str] = tuple(PARTY_ROLES)
) -> None:
    """Load what :func:`save_adapters` wrote into the segments (names must match)."""
    for party in parties:
        roles = PARTY_ROLES[party]
        path = directory / party / "adapter.safetensors"
        if not path.is_file():
            continue
        saved = load_file(str(path))
        params: dict[str, torch.nn.Parameter] = {}
        for role in roles:
            if role in segments:
                params |= segments[role].named_model_parameters()
        unknown = sorted(set(saved) - set(params))
        if unknown:
            raise ValueError(f"{path} holds parameters this model does not have: {unknown[:5]}")
        with torch.no_grad():
            for name, tensor in saved.items():
                params[name].copy_(tensor)


def save_checkpoint(
    out: Path,
    segments: dict[str, Segment],
    parties: dict[str, Any],
    step: int,
    history: list[dict[str, float]],
) -> None:
    """Write a checkpoint of ``parties`` (``{"data_party": ..., "model_party": ...}``) atomically.

    Built in a temporary directory and renamed into place, so a crash leaves either the previous
    checkpoint or the new one, never a half-written one.
    """
    tmp = out / f".{CHECKPOINT}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_adapters(segments, tmp, tuple(parties))
    for name, party in parties.items():
        torch.save(party.state_dict(), tmp / name / "state.pt")
    torch.save({"torch_rng": torch.get_rng_state()}, tmp / "rng.pt")
    (tmp / "progress.json").write_text(json.dumps({"step": step, "history": history}))
    swap_into_place(tmp, out / CHECKPOINT)


def swap_into_place(tmp: Path, final: Path) -> None:
    """Replace directory ``final`` by the complete directory ``tmp`` with renames only.

    A crash leaves ``final`` as it was or as ``tmp``, or (between the two renames) the previous
    one as ``.<name>.old`` beside it, which :func:`checkpoint_dir` still finds.
    """
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_dir(out: Path) -> Path | None:
    """The complete checkpoint :func:`save_checkpoint` left in ``out``, or ``None``.

    Normally ``out/checkpoint``; ``out/.checkpoint.old`` when the process was killed between
    its two renames; never a checkpoint whose save was cut short.
    """
    for ckpt in (out / CHECKPOINT, out / f".{CHECKPOINT}.old"):
        if (ckpt / "progress.json").is_file():
            return ckpt
    return None


def checkpoint_step(out: Path) -> int:
    """The step of the checkpoint in ``out`` (0 when there is none)."""
    ckpt = checkpoint_dir(out)
    return int(json.loads((ckpt / "progress.json").read_text())["step"]) if ckpt else 0


def load_checkpoint(
    out: Path, segments: dict[str, Segment], parties: dict[str, Any]
) -> tuple[int, list[dict[str, float]]]:
    """Restore what :func:`save_checkpoint` wrote; returns the step and the loss history."""
    ckpt = checkpoint_dir(out)
    if ckpt is None:
        raise FileNotFoundError(
            f"--resume: no checkpoint in {out} (expected {out / CHECKPOINT}/progress.json); run without --resume"
        )
    load_adapters(segments, ckpt, tuple(parties))
    for name, party in parties.items():
        party.load_state_dict(torch.load(ckpt / name / "state.pt", weights_only=True))
    torch.set_rng_state(torch.load(ckpt / "rng.pt", weights_only=True)["torch_rng"])
    progress = json.loads((ckpt / "progress.json").read_text())
    return int(progress["step"]), list(progress["history"])


def _next_sync(step: int, total: int, train: Any) -> int:
    """The first step after ``step`` at which evaluation, averaging or a checkpoint is due (or ``total``)."""
    end = total
    for every in (train.eval_every, train.fedavg_every, train.checkpoint_every):
        if every:
            end = min(end, (step // every + 1) * every)
    return end


def _micro_batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless deterministic micro-batches of example indices, reshuffled each epoch."""
    epoch = 0
    while True:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]
        epoch += 1


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


def train(
    cfg: RunConfig,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    transforms: Sequence[ChannelTransform] = (),
    record: str | Path | None = None,
) -> RunResult:
    """Run ``cfg``: split fine-tuning in one process with an in-process channel.

    ``transforms`` wrap every crossing (defenses, or a codec round trip that simulates the wire).
    ``record`` names a new directory that receives every crossing as the model party received it
    (:class:`~splitfed.privacy.recording.RecordingWriter`) and, in its ``ground_truth/``, what each
    batch really held (:class:`~splitfed.privacy.recording.GroundTruthWriter`).
    """
    from splitfed.privacy.recording import (
        GroundTruthWriter,
        RecordingWriter,
        check_new_recording,
        ground_truth_dir,
    )

    if record is not None:
        check_new_recording(record)  # before minutes of loading, not after
    work = prepare(cfg, log)
    system = build_split(
        work.model,
        cfg.split.spec(),
        cfg.head,
        cfg.segment_finetune(),
        work.task.loss,
        cfg.optim(work.total_steps),
        labels_at=cfg.split.labels_at,
        transforms=transforms,
        cache_head=cfg.train.cache_head_outputs,
        front=build_front(cfg.defenses, work.model, cfg.train.seed, tokenizer=work.tokenizer),
    )
    parties = {"data_party": system.data_party, "model_party": system.model_party}
    if record is None:
        return train_loop(work, system.data_party, system.segments, parties, resume, progress, log)
    start_step = checkpoint_step(Path(cfg.output_dir)) if resume else 0
    with (
        RecordingWriter(record, start_step=start_step, tap="in_process_channel") as recording,
        GroundTruthWriter(ground_truth_dir(record), client=system.data_party.client_id) as truth,
    ):
        # Channel calls any recorder(direction, message); its annotation names only CrossingRecorder.
        system.channel.recorder = recording  # type: ignore[assignment]
        system.data_party.ground_truth = truth
        result = train_loop(work, system.data_party, system.segments, parties, resume, progress, log)
    result.summary["recording"] = recording.summary() | {"ground_truth": str(truth.directory)}
    write_results(result.output_dir, result.summary)
    return result


def train_loop(
    work: Workload,
    data_party: DataParty,
    segments: dict[str, Segment],
    parties: dict[str, Any],
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    check_resume: Callable[[int], int] | None = None,
) -> RunResult:
    """Drive ``data_party`` through the run: evaluate, train with checkpoints, evaluate, save.

    ``parties`` are the party objects this process holds (their adapters and optimizer states go
    into checkpoints): both in process, only the data party when the model party is remote.
    """
    cfg, task, splits, total = work.cfg, work.task, work.splits, work.total_steps
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {"load_s": work.load_s}
    trainable = trainable_counts(segments)
    log(
        f"model {cfg.model.name}: {segments['head'].adapter.num_layers(work.model)} layers, split {cfg.split.setting} "
        f"head={cfg.split.head_layers} tail={cfg.split.tail_layers}, mode {cfg.mode}; trainable params "
        f"data party {trainable['data_party']:,}, model party {trainable['model_party']:,}"
    )
    eval_examples = getattr(splits, cfg.data.eval_split)
    eval_bs = cfg.train.eval_batch_size or cfg.train.batch_size
    gen_tokens = cfg.train.eval_max_new_tokens
    history: list[dict[str, float]] = []
    start_step = 0
    if resume:
        start_step, history = load_checkpoint(out, segments, parties)
        if check_resume is not None:
            start_step = check_resume(start_step)
            history = [h for h in history if h["step"] <= start_step]
        log(f"resumed from {out / CHECKPOINT} at step {start_step}/{total}")

    metrics_before = None
    with _progress(progress) as bar:
        if cfg.train.eval_before and start_step == 0:
            t = time.perf_counter()
            metrics_before = evaluate(
                data_party, task, eval_examples, eval_bs, bar, "eval (before)", gen_tokens
            )
            timings["eval_before_s"] = time.perf_counter() - t
            log(f"{cfg.data.eval_split} before fine-tuning: {_fmt(metrics_before)}")
        batches = _micro_batches(len(splits.train), cfg.train.batch_size, cfg.train.seed)
        for _ in range(start_step * cfg.train.grad_accum):
            next(batches)
        step_bar = bar.add_task("train", total=total, completed=start_step, info="") if bar else None
        t_train = time.perf_counter()
        accum, window = cfg.train.grad_accum, cfg.train.window
        streaming = cfg.train.schedule == "forward-only"

        def micro_batches(first: int, last: int) -> Iterator[MicroBatch]:
            for _ in range(first, last):
                for micro in range(accum):
                    ids = next(batches)
                    examples = [splits.train[i] for i in ids]
                    examples = data_party.front.examples(examples, task.text_fields, FrontContext("train"))
                    yield MicroBatch(task.collate(examples), micro == accum - 1, 1.0 / accum, ids)

        step = start_step
        while step < total:
            # Run to the next step that needs the pipeline drained (eval, fedavg, checkpoint).
            end = _next_sync(step, total, cfg.train)
            results = data_party.train_stream(micro_batches(step, end), window, across_updates=streaming)
            for index in range(step, end):
                t_step = time.perf_counter()
                done = [next(results) for _ in range(accum)]
                record = {
                    "step": index + 1,
                    "loss": float(np.mean([r.loss for r in done])),
                    "seconds": time.perf_counter() - t_step,
                    "bytes_to_model": sum(r.bytes_to_model for r in done),
                    "bytes_to_data": sum(r.bytes_to_data for r in done),
                }
                history.append(record)
                if bar is not None:
                    bar.update(step_bar, advance=1, info=f"loss {record['loss']:.4f}")
            results.close()
            step = end
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total:
                mid = evaluate(data_party, task, eval_examples, eval_bs, bar, f"eval @{step}")
                history[-1].update({f"eval_{k}": v for k, v in mid.items()})
            if cfg.train.fedavg_every and step % cfg.train.fedavg_every == 0:
                data_party.average_adapters(
                    step // cfg.train.fedavg_every, cfg.data.num_parties, len(splits.train)
                )
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                save_checkpoint(out, segments, parties, step, history)
        timings["train_s"] = time.perf_counter() - t_train
        timings["data_party_wait_s"] = data_party.wait_s
        timings["data_party_compute_s"] = max(0.0, timings["train_s"] - data_party.wait_s)
        head_tokens = dict(data_party.head_tokens)
        t = time.perf_counter()
        metrics_after = evaluate(data_party, task, eval_examples, eval_bs, bar, "eval (after)", gen_tokens)
        timings["eval_after_s"] = time.perf_counter() - t
    log(f"{cfg.data.eval_split} after fine-tuning:  {_fmt(metrics_after)}")
    log(
        f"training: {timings['train_s']:.1f} s, of which the data party computed {timings['data_party_compute_s']:.1f} s "
        f"and waited {timings['data_party_wait_s']:.1f} s on the model party"
    )

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
        "compute_share": _compute_share(work, segments),
        # Real tokens the data party's head ran forward / backward during training (measured).
        "data_party_head_tokens": head_tokens,
        "adapters": adapters,
        "history": history,
    }
    write_results(out, summary)
    return RunResult(out, metrics_before, metrics_after, history, summary)


def write_results(out: Path, summary: dict[str, Any]) -> None:
    """Write ``out/results.json`` atomically (a reader never sees half of it)."""
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / "results.json")


def _compute_share(work: Workload, segments: dict[str, Segment]) -> dict[str, Any] | None:
    """Analytical FLOPs per training step on each party (models/flops.py), at batch x max_length."""
    from splitfed.models.flops import split_training_flops
    from splitfed.models.partition import SplitConfigError

    cfg = work.cfg
    ft = cfg.segment_finetune()
    targets = ft["body"].target_modules or segments["head"].adapter.lora_targets
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


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
