"""One split fine-tuning run in one process: both parties joined by an in-process channel.

This is what ``splitfed train`` and ``splitfed demo`` call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from splitfed.config import RunConfig
from splitfed.run.callbacks import Callback
from splitfed.run.checkpoints import checkpoint_step
from splitfed.run.loop import RunResult, train_loop, write_results
from splitfed.run.workload import build_run_front, prepare
from splitfed.split.system import build_split
from splitfed.transport.channel import ChannelTransform


def train(
    cfg: RunConfig,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    transforms: Sequence[ChannelTransform] = (),
    record: str | Path | None = None,
    callbacks: Sequence[Callback] = (),
) -> RunResult:
    """Run ``cfg``: split fine-tuning in one process with an in-process channel.

    ``transforms`` wrap every crossing (stateless per-tensor work, or a codec round trip that
    simulates the wire; defenses belong in ``cfg.defenses``). ``callbacks`` join the loop's
    (:mod:`splitfed.run.callbacks`).
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
        front=build_run_front(cfg, work),
    )
    parties = {"data_party": system.data_party, "model_party": system.model_party}
    if record is None:
        return train_loop(
            work, system.data_party, system.segments, parties, resume, progress, log, callbacks=callbacks
        )
    start_step = checkpoint_step(Path(cfg.output_dir)) if resume else 0
    with (
        RecordingWriter(record, start_step=start_step, tap="in_process_channel") as recording,
        GroundTruthWriter(ground_truth_dir(record), client=system.data_party.client_id) as truth,
    ):
        # Channel calls any recorder(direction, message); its annotation names only CrossingRecorder.
        system.channel.recorder = recording  # type: ignore[assignment]
        system.data_party.ground_truth = truth
        result = train_loop(
            work, system.data_party, system.segments, parties, resume, progress, log, callbacks=callbacks
        )
    result.summary["recording"] = recording.summary() | {"ground_truth": str(truth.directory)}
    write_results(result.output_dir, result.summary)
    return result
