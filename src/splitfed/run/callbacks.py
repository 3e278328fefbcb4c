"""Hooks of the training loop: what happens at steps, syncs, epochs, evaluations and the end.

The loop (:func:`splitfed.run.loop.train_loop`) only trains; periodic evaluation, adapter
averaging and checkpoints are callbacks, and so is anything a caller adds (an attack that
watches training, a custom logger). A callback overrides only the hooks it needs::

    class PrintLoss(Callback):
        def on_step(self, state, record):
            print(state.step, record["loss"])

    train(cfg, callbacks=[PrintLoss()])

A callback with ``every = n`` gets :meth:`Callback.on_sync` after every n-th step, with the data
party's pipeline drained (no micro-batch in flight), which is what evaluation, averaging and
checkpoints need; callbacks run in the order given (the built-in ones: evaluation, averaging,
checkpoint, so a checkpoint includes the step's averaging and evaluation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splitfed.run.checkpoints import save_checkpoint
from splitfed.run.evaluation import evaluate

if TYPE_CHECKING:
    from splitfed.models.partition import Segment
    from splitfed.run.workload import Workload
    from splitfed.split.parties import DataParty


@dataclass
class LoopState:
    """Where the training loop is, as callbacks see it.

    Parameters
    ----------
    work : Workload
        The run's config, data, task and model.
    data_party : DataParty
    segments : dict[str, Segment]
        Every segment this process holds (and the data party's front under ``"front"``).
    parties : dict[str, Any]
        The party objects whose state checkpoints keep.
    out : Path
        The run's output directory.
    total : int
        Optimizer steps of the whole run.
    step : int
        Optimizer steps done so far.
    history : list[dict[str, float]]
        One record per step (loss, seconds, bytes; evaluations add ``eval_*`` keys).
    progress : Any
        The rich progress display (``None`` without progress bars).
    log : Callable[[str], None]
    """

    work: Workload
    data_party: DataParty
    segments: dict[str, Segment]
    parties: dict[str, Any]
    out: Path
    total: int
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    progress: Any = None
    log: Callable[[str], None] = print


class Callback:
    """Base of a training-loop callback; every hook does nothing by default.

    Attributes
    ----------
    every : int
        Call :meth:`on_sync` after every ``every``-th step with the pipeline drained (0: never).
    """

    every: int = 0

    def on_step(self, state: LoopState, record: dict[str, float]) -> None:
        """After each optimizer step (``record`` is the step's history entry, already appended)."""

    def on_sync(self, state: LoopState) -> None:
        """After each ``every``-th step, with no micro-batch in flight."""

    def on_epoch(self, state: LoopState, epoch: int) -> None:
        """When the training data has been gone through ``epoch`` times (checked after each step)."""

    def on_evaluation(self, state: LoopState, name: str, metrics: dict[str, float]) -> None:
        """After an evaluation (``name``: ``"before"``, ``"after"`` or ``"step <n>"``)."""

    def on_end(self, state: LoopState) -> None:
        """After the last step and the final evaluation, before the adapters are saved."""


class PeriodicEvaluation(Callback):
    """Evaluate every ``every`` steps (not after the last one: the final evaluation covers it).

    Parameters
    ----------
    every : int
    """

    def __init__(self, every: int) -> None:
        self.every = every

    def on_sync(self, state: LoopState) -> None:
        if state.step >= state.total:
            return
        cfg = state.work.cfg
        metrics = evaluate(
            state.data_party,
            state.work.task,
            getattr(state.work.splits, cfg.data.eval_split),
            cfg.train.eval_batch_size or cfg.train.batch_size,
            state.progress,
            f"eval @{state.step}",
        )
        state.history[-1].update({f"eval_{k}": v for k, v in metrics.items()})


class AdapterAveraging(Callback):
    """SplitLoRA: federated-average the data parties' adapters through the model party every ``every`` steps.

    Parameters
    ----------
    every : int
    parties : int
        How many data parties take part (the model party waits for all of them).
    aggregation : {"plain", "ckks", "secagg"}, default "plain"
        ``train.fedavg_aggregation``: the adapters cross in the clear, encrypted or masked.
    dealer : bool, default True
        Whether this party deals the CKKS keys (the one with ``data.party_index`` 0).
    """

    def __init__(self, every: int, parties: int, aggregation: str = "plain", dealer: bool = True) -> None:
        self.every, self.parties, self.aggregation, self.dealer = every, parties, aggregation, dealer

    def on_sync(self, state: LoopState) -> None:
        state.data_party.average_adapters(
            state.step // self.every,
            self.parties,
            len(state.work.splits.train),
            aggregation=self.aggregation,
            dealer=self.dealer,
        )


class Checkpointing(Callback):
    """Write an atomic checkpoint every ``every`` steps (what ``--resume`` restarts from).

    Parameters
    ----------
    every : int
    """

    def __init__(self, every: int) -> None:
        self.every = every

    def on_sync(self, state: LoopState) -> None:
        save_checkpoint(state.out, state.segments, state.parties, state.step, state.history)


def default_callbacks(work: Workload) -> list[Callback]:
    """The callbacks ``train:`` asks for: evaluation, adapter averaging and checkpoints, in that order."""
    train = work.cfg.train
    callbacks: list[Callback] = []
    if train.eval_every:
        callbacks.append(PeriodicEvaluation(train.eval_every))
    if train.fedavg_every:
        callbacks.append(
            AdapterAveraging(
                train.fedavg_every,
                work.cfg.data.num_parties,
                train.fedavg_aggregation,
                dealer=work.cfg.data.party_index == 0,
            )
        )
    if train.checkpoint_every:
        callbacks.append(Checkpointing(train.checkpoint_every))
    return callbacks


def next_sync(step: int, total: int, callbacks: Sequence[Callback]) -> int:
    """The first step after ``step`` at which a callback needs the pipeline drained (or ``total``)."""
    end = total
    for callback in callbacks:
        if callback.every:
            end = min(end, (step // callback.every + 1) * callback.every)
    return end
