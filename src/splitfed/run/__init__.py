"""A split fine-tuning run: load, split, train, evaluate, checkpoint, save.

One concern per module:

:mod:`~splitfed.run.workload`
    what a run loads before the parties exist (seed, data share, task, tokenizer, model);
:mod:`~splitfed.run.loop`
    the training loop (:func:`train_loop`) and the results file;
:mod:`~splitfed.run.callbacks`
    what happens at steps, syncs, epochs, evaluations (periodic evaluation, adapter averaging,
    checkpoints, and any :class:`Callback` a caller adds);
:mod:`~splitfed.run.evaluation`
    the task's metrics across the split;
:mod:`~splitfed.run.checkpoints`
    adapter files and atomic checkpoints;
:mod:`~splitfed.run.local`
    :func:`train`, both parties in one process (``splitfed train``).

The gRPC runtime (:mod:`splitfed.runtime`) drives the same loop with a remote model party.
"""

from splitfed.run.callbacks import (
    AdapterAveraging,
    Callback,
    Checkpointing,
    LoopState,
    PeriodicEvaluation,
    default_callbacks,
)
from splitfed.run.checkpoints import (
    CHECKPOINT,
    PARTY_ROLES,
    checkpoint_dir,
    checkpoint_step,
    load_adapters,
    load_checkpoint,
    save_adapters,
    save_checkpoint,
    swap_into_place,
    write_adapter,
)
from splitfed.run.evaluation import evaluate
from splitfed.run.local import train
from splitfed.run.loop import (
    RunResult,
    compute_share,
    format_metrics,
    progress_bars,
    train_loop,
    write_results,
)
from splitfed.run.workload import (
    Workload,
    build_run_front,
    load_run_model,
    party_share,
    prepare,
    seed_everything,
    trainable_counts,
)

__all__ = [
    "CHECKPOINT",
    "PARTY_ROLES",
    "AdapterAveraging",
    "Callback",
    "Checkpointing",
    "LoopState",
    "PeriodicEvaluation",
    "RunResult",
    "Workload",
    "build_run_front",
    "checkpoint_dir",
    "checkpoint_step",
    "compute_share",
    "default_callbacks",
    "evaluate",
    "format_metrics",
    "load_adapters",
    "load_checkpoint",
    "load_run_model",
    "party_share",
    "prepare",
    "progress_bars",
    "save_adapters",
    "save_checkpoint",
    "seed_everything",
    "swap_into_place",
    "train",
    "train_loop",
    "trainable_counts",
    "write_adapter",
    "write_results",
]
