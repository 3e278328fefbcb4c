"""Split training across processes and machines: ``splitfed serve`` and ``splitfed join``.

Both sides read the same run config. Each builds the model the same way from the same seed (so
adapters start identical to an in-process run) and keeps only its own segments' work: the model
party serves its body over gRPC, the data party trains through a
:class:`~splitfed.transport.grpc_channel.GrpcChannel` with the same loop as ``splitfed train``.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from splitfed.config import ConfigError, RunConfig
from splitfed.models.partition import Segment
from splitfed.run import (
    PARTY_ROLES,
    Callback,
    RunResult,
    build_run_front,
    checkpoint_dir,
    checkpoint_step,
    load_adapters,
    load_checkpoint,
    load_run_model,
    prepare,
    save_adapters,
    save_checkpoint,
    seed_everything,
    train_loop,
    write_adapter,
    write_results,
)
from splitfed.split.decoding import DecodingConfig
from splitfed.split.front import build_front
from splitfed.split.inference import SplitGenerator
from splitfed.split.parties import DataParty, ModelParty, StepGuard
from splitfed.split.system import (
    build_data_party,
    build_model_party,
    build_split,
    prepare_segments,
    with_front,
)
from splitfed.transport.channel import Channel, ChannelTransform, Message
from splitfed.transport.grpc_channel import GrpcChannel
from splitfed.transport.grpc_server import ModelPartyService, ServerLimits, TlsFiles, serve
from splitfed.transport.wire import WireCodecs


@dataclass
class ModelPartyServer:
    """A running model-party server (stop it with :meth:`stop`)."""

    server: grpc.Server
    service: ModelPartyService
    port: int
    model_party: ModelParty
    segments: dict[str, Segment]
    output_dir: Path
    recording: Any = None

    def stop(self, grace: float = 0.5) -> bool:
        """Stop serving: refuse new sessions and messages, give running calls ``grace`` seconds, end them.

        Returns within ``grace`` plus a few seconds whatever the clients did (a call gRPC leaves
        open is not waited for); ``False`` when some call had not ended by then. A recording is
        closed (its manifest complete).
        """
        self.service.stop()
        ended = bool(self.server.stop(grace).wait(timeout=grace + 3.0))
        if self.recording is not None:
            with self.service._record_lock:
                self.recording.close()
        return ended

    def save_adapters(self) -> Path:
        """Write the model party's adapters under ``<output_dir>/model_party_server/final``.

        Shared adapters go to ``final/model_party/adapter.safetensors``; per-party adapters to
        ``final/parties/<client>/model_party/adapter.safetensors``. Either directory loads with
        ``splitfed serve --adapters DIR`` (or in process with ``splitfed generate --adapters``).
        Returns ``final``.
        """
        final = self.output_dir / "model_party_server" / "final"
        bank = self.model_party.bank
        # Unfinished steps are dropped (their gradients were never applied) and no update runs
        # while the files are written; each file is written atomically.
        held = self.service.quiesce(timeout=30.0)
        if not held:
            logging.getLogger(__name__).warning(
                "a model-party computation did not finish within 30 s; saving the adapters as they are"
            )
        try:
            if bank is None:
                save_adapters(self.segments, final, ("model_party",))
            else:
                for client in bank.parties:
                    directory = final / "parties" / _safe_name(client) / "model_party"
                    write_adapter(
                        bank.named_parameters(client), directory, PARTY_ROLES["model_party"], client=client
                    )
        finally:
            if held:
                self.service.resume()
        return final


def _complete_checkpoints(root: Path) -> list[Path]:
    """The model party's checkpoint directories that hold a whole checkpoint, oldest first.

    A directory whose save was cut short (killed mid-save) holds only a temporary directory.
    """
    return [where for where in sorted(root.glob("step-*")) if checkpoint_dir(where) is not None]


def _safe_name(client: str) -> str:
    """A data party's id as a directory name, different for different ids (ids come from the
    network or a token file): the id itself when it is a plain name, else a cleaned-up form
    with a hash of the id."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in client).strip(".")
    if name == client and name:
        return name
    return f"{name or 'anonymous'}-{hashlib.sha256(client.encode()).hexdigest()[:10]}"


def build_serving_party(
    cfg: RunConfig, guard: StepGuard | None = None
) -> tuple[ModelParty, dict[str, Segment], Any]:
    """The model party of ``cfg``, built exactly as the in-process run builds it (same seed, same init).

    ``guard``: what each data party's update must satisfy (see :class:`StepGuard`).
    """
    from splitfed.data import get_task

    if cfg.train.steps is None:
        raise ConfigError(
            "splitfed serve needs train.steps: the model party cannot count the data party's examples "
            "to size its learning-rate schedule"
        )
    if cfg.head == "classification" and cfg.model.num_labels is None:
        raise ConfigError("splitfed serve needs model.num_labels for a classification task (it sees no data)")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    tokenizer, model = load_run_model(cfg, cfg.head, cfg.model.num_labels)
    loss_fn = None
    if cfg.split.labels_at == "model":
        task = get_task(
            cfg.task, tokenizer=tokenizer, max_length=cfg.data.max_length, num_labels=cfg.model.num_labels
        )
        loss_fn = task.loss
    party, segments, _ = build_model_party(
        model,
        cfg.split.spec(),
        cfg.head,
        cfg.segment_finetune(),
        cfg.optim(cfg.train.steps),
        loss_fn,
        per_party_adapters=cfg.finetune.body_adapters == "per_party",
        fedavg_aggregation=cfg.train.fedavg_aggregation,
    )
    party.guard = guard or party.guard
    return party, segments, model


def start_server(
    cfg: RunConfig,
    host: str = "127.0.0.1",
    port: int = 50051,
    tls: TlsFiles | None = None,
    tokens: dict[str, str] | None = None,
    limits: ServerLimits | None = None,
    adapters: str | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
    record: str | Path | None = None,
) -> ModelPartyServer:
    """Build the model party of ``cfg`` and serve it on ``host:port`` (``port=0`` picks a free one).

    ``record``: a new directory where the model party records every data-party message it
    receives, as decoded, and each reply it sends (the honest-but-curious model party's view; see
    :class:`~splitfed.privacy.recording.RecordingWriter`).

    ``adapters``: a ``splitfed train`` output directory whose model-party adapters to load.
    With ``train.checkpoint_every: N`` the model party checkpoints itself into
    ``<output_dir>/model_party_server/step-K`` (K: updates applied) whenever a data party completes
    a multiple of N steps, keeping the last two; a checkpoint records each data party's steps.
    With ``resume``, a single data party (``data.num_parties: 1``): the server waits for its
    ``hello`` and loads the checkpoint of the step it resumes from. Several data parties: the server
    loads its newest checkpoint at once; each resuming data party then compares its own
    checkpoint with the steps of it that the model party holds (see :func:`join`).
    """
    limits = limits or ServerLimits()
    party, segments, model = build_serving_party(cfg, StepGuard(max_grad_norm=limits.max_step_grad_norm))
    if adapters:
        load_adapters(segments, Path(adapters), ("model_party",))
    root = Path(cfg.output_dir) / "model_party_server"
    every = cfg.train.checkpoint_every

    multi = cfg.data.num_parties > 1

    def checkpoint(updates: int, client: str) -> None:
        # Keep the last two: a data party killed between the model party's checkpoint and its own
        # resumes one checkpoint back, and the model party must be able to follow it there.
        # Several parties: checkpoint when the updating party reaches one of its own checkpoint
        # steps, so the newest checkpoint always holds every step a data party has checkpointed.
        steps = party.client_steps.get(client, 0) if multi else updates
        if every and steps % every == 0:
            save_checkpoint(root / f"step-{updates:09d}", segments, {"model_party": party}, updates, [])
            for old in _complete_checkpoints(root)[:-2]:
                shutil.rmtree(old, ignore_errors=True)

    def resume_at(step: int) -> int:
        """Load the checkpoint of ``step`` (the resuming data party's); returns the update count."""
        if step == 0:
            return 0
        where = root / f"step-{step:09d}"
        if where not in _complete_checkpoints(root):
            have = [int(p.name.split("-")[1]) for p in _complete_checkpoints(root)]
            raise ConfigError(
                f"the data party resumes at step {step} but the model party has no checkpoint of that step "
                f"in {root} (it has {have or 'none'}); restart both without --resume"
            )
        loaded, _ = load_checkpoint(where, segments, {"model_party": party})
        log(f"model party resumed from {where} at update {loaded}")
        return loaded

    if resume and multi:
        newest = _complete_checkpoints(root)
        if not newest:
            raise ConfigError(
                f"--resume: the model party has no checkpoint in {root}; start it without --resume"
            )
        loaded, _ = load_checkpoint(newest[-1], segments, {"model_party": party})
        log(
            f"model party resumed from {newest[-1]} at update {loaded}; steps per data party: {party.client_steps}"
        )
    recording = None
    if record is not None:
        from splitfed.privacy.recording import RecordingWriter

        recording = RecordingWriter(record, tap="model_party")
    hidden = int(model.config.hidden_size)
    service = ModelPartyService(
        party,
        hidden,
        limits,
        tokens,
        cfg.split.labels_at,
        checkpoint,
        on_resume=resume_at if resume and not multi else None,
        recorder=recording,
    )
    server, bound = serve(service, host, port, tls)
    return ModelPartyServer(server, service, bound, party, segments, Path(cfg.output_dir), recording)


def join(
    cfg: RunConfig,
    target: str,
    client_id: str = "",
    token: str | None = None,
    tls: TlsFiles | None = None,
    codecs: WireCodecs | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    latency_ms: float = 0.0,
    transforms: Sequence[ChannelTransform] = (),
    callbacks: Sequence[Callback] = (),
    record: str | Path | None = None,
) -> RunResult:
    """Train ``cfg``'s data party against the model party served at ``target``.

    ``latency_ms`` injects that much round-trip latency into the link (emulating a distant server);
    ``transforms`` are stateless channel transforms, as :func:`splitfed.run.train` takes them
    (defenses belong in ``cfg.defenses``); ``callbacks`` join the training loop's. ``record``
    names a new directory that receives what this data party sent and got back (before the
    codec: ``splitfed serve --record`` keeps what the model party decoded) and, in its
    ``ground_truth/``, what each batch held, under this party's client id, so that a server-side
    recording can be scored against it.
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
    segments, _ = prepare_segments(work.model, cfg.split.spec(), cfg.head, cfg.segment_finetune())
    front = build_run_front(cfg, work)
    if cfg.train.steps is None:
        log(
            f"note: train.steps is unset; this data party runs {work.total_steps} steps (the server needs the same)"
        )
    resume_step = checkpoint_step(Path(cfg.output_dir)) if resume else 0
    recording = (
        RecordingWriter(record, start_step=resume_step, tap="data_party_grpc") if record is not None else None
    )
    channel = GrpcChannel(
        target,
        client_id=client_id,
        token=token,
        tls=tls,
        codecs=codecs,
        hello={"resume_step": resume_step},
        latency_ms=latency_ms,
        transforms=transforms,
        recorder=recording,  # type: ignore[arg-type]
    )
    truth = None
    try:
        party = build_data_party(
            segments,
            channel,
            work.task.loss,
            cfg.optim(work.total_steps),
            labels_at=cfg.split.labels_at,
            cache_head=cfg.train.cache_head_outputs,
            front=front,
            client_id=channel.client_id,
        )
        if record is not None:
            truth = GroundTruthWriter(ground_truth_dir(record), client=channel.client_id)
            party.ground_truth = truth
        log(f"joined the model party at {target} as {channel.client_id or '(anonymous)'}")
        result = train_loop(
            work,
            party,
            with_front(segments, front),
            {"data_party": party},
            resume,
            progress,
            log,
            check_resume=lambda step: _check_in_step(step, channel, cfg, party, log),
            callbacks=callbacks,
        )
        stats = channel.request(Message("stats")).meta  # a stats_result
        result.summary["timings"] |= {
            "model_party_busy_s": float(stats.get("busy_s") or 0.0),
            "model_party_wait_s": float(stats.get("waiting_s") or 0.0),
        }
        result.summary["wire"] = {
            "bytes_to_model": channel.bytes_to_model,
            "bytes_to_data": channel.bytes_to_data,
            "payload_to_model": channel.payload_to_model,
            "payload_to_data": channel.payload_to_data,
        }
        if recording is not None and truth is not None:
            recording.close()
            truth.close()
            result.summary["recording"] = recording.summary() | {"ground_truth": str(truth.directory)}
        write_results(result.output_dir, result.summary)  # with what only the remote run knows
        return result
    finally:
        channel.close()
        for writer in (recording, truth):
            if writer is not None:
                writer.close()


def _check_in_step(
    step: int, channel: GrpcChannel, cfg: RunConfig, party: DataParty, log: Callable[[str], None]
) -> int:
    """Where a resumed data party continues, given the steps of it the model party holds.

    One data party: both sides must stand at the same step. Several: the model party's newest
    checkpoint holds ``held >= step`` of this party's steps. A party with nothing to train
    (SplitFrozen's frozen head, HT) skips ahead to ``held``: nothing is lost or applied twice.
    Otherwise it re-runs steps ``step+1..held`` from its checkpoint (its own adapters lost those
    updates); the model party sees those batches twice, which is logged.
    """
    if cfg.data.num_parties == 1:
        server_updates = int(channel.session.get("updates", 0) or 0)
        if server_updates != step:
            raise ConfigError(
                f"the data party resumes at step {step} but the model party has applied {server_updates} steps; "
                f"restart the model party with --resume from its checkpoint at step {step} (both sides checkpoint "
                f"every train.checkpoint_every={cfg.train.checkpoint_every} steps), or start both afresh"
            )
        return step
    held = int(channel.session.get("client_steps", 0) or 0)
    if held < step:
        raise ConfigError(
            f"this data party resumes at step {step} but the model party holds only {held} of its steps; was the "
            "model party restarted with --resume from its own newest checkpoint (same output_dir)?"
        )
    if held == step:
        return step
    if not party.trainer.params:
        party.updates = held
        log(
            f"the model party holds {held} steps of this party (its checkpoint: {step}); nothing trains here, "
            f"so it continues from step {held}"
        )
        return held
    log(
        f"warning: the model party holds {held} steps of this party, its own checkpoint {step}: steps "
        f"{step + 1}..{held} run again (the model party sees those batches twice)"
    )
    return step


def open_generator(
    cfg: RunConfig,
    target: str | None = None,
    adapters: str | None = None,
    decoding: DecodingConfig | None = None,
    client_id: str = "",
    token: str | None = None,
    tls: TlsFiles | None = None,
    codecs: WireCodecs | None = None,
    return_logits: bool = False,
    chat: bool = False,
    recorder: Any = None,
    ground_truth: Any = None,
) -> SplitGenerator:
    """A :class:`SplitGenerator` for ``cfg``'s model: in process, or against ``splitfed serve`` at ``target``.

    ``adapters`` is the output directory of a ``splitfed train`` run whose adapters to load (in
    process both parties'; remote, the data party's, while the server loads its own).
    ``recorder`` records what crosses (in process: what the model party receives; remote: what
    this data party sends, before the codec); ``ground_truth`` receives each session's prompt and
    output ids (e.g. a :class:`~splitfed.privacy.recording.GroundTruthWriter`'s ``generation``).
    """

    if cfg.head != "causal_lm":
        raise ConfigError(
            f"generation needs a causal-LM task (causal_lm, generative_qa, ...); task is {cfg.task!r}"
        )
    seed_everything(cfg.train.seed)
    tokenizer, model = load_run_model(cfg, "causal_lm", None)
    # Nothing trains here: a training defense's sampling rate (DP-SGD) is a placeholder.
    front = build_front(cfg.defenses, model, cfg.train.seed, tokenizer=tokenizer, sample_rate=1.0)
    channel: Channel
    if target is None:
        system = build_split(
            model,
            cfg.split.spec(),
            "causal_lm",
            cfg.segment_finetune(),
            lambda lg, b: lg.sum(),
            front=front,
            recorder=recorder,
        )
        segments, channel = system.segments, system.channel
        parties: tuple[str, ...] = ("data_party", "model_party")
    else:
        segments, _ = prepare_segments(model, cfg.split.spec(), "causal_lm", cfg.segment_finetune())
        segments = with_front(segments, front)
        channel = GrpcChannel(
            target, client_id=client_id, token=token, tls=tls, codecs=codecs, recorder=recorder
        )
        parties = ("data_party",)
    if adapters:
        load_adapters(segments, Path(adapters), parties)
    return SplitGenerator(
        segments["head"],
        channel,
        tokenizer,
        tail=segments.get("tail"),
        decoding=decoding,
        return_logits=return_logits,
        chat=chat,
        front=front,
        ground_truth=ground_truth,
    )
