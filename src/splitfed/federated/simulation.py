"""Federated LoRA fine-tuning simulated in one process: what ``splitfed fedtrain`` runs.

One frozen base model serves every client. The trainable parameters (LoRA on the blocks, plus a
fresh task head) exist once, inside the model's peft modules; before a client trains, the global
adapters are loaded into them, and after it trains its delta is read out, encoded by the
aggregator and added into the server's running sum. A client therefore costs, while it trains,
its optimizer state (created afresh each round) and one delta; between rounds it costs only the
list of its examples. The server keeps the global adapters (float32) and, for FedAdam and
FedYogi, the optimizer moments.

Each round:

1. the server samples ``federated.clients_per_round`` clients (:func:`sample_clients`, by seed
   and round) and configures their local training (:meth:`Strategy.configure_fit
   <splitfed.federated.strategies.base.Strategy.configure_fit>`);
2. each sampled client runs :func:`~splitfed.federated.client.local_update` from the global
   adapters on its partition of the training split;
3. the deltas go through the run's aggregator (:mod:`splitfed.federated.rounds`): encoded by the
   clients (in the clear, CKKS-encrypted or pairwise-masked), combined by a server that only sees
   payloads, decoded into the sample-weighted average;
4. the strategy applies the average to the global adapters (FedAvg, FedProx: ``x + lr * avg``;
   FedAdam, FedYogi: a server-optimizer step). Under CKKS only the clients can decrypt, so
   ``x + lr * avg`` is their computation (every client gets the same), and the strategies that
   keep server state are refused by the configuration.

With ``federated.pruning`` the deltas are pruned by magnitude on FedShield-LLM's schedule
(:func:`~splitfed.federated.aggregators.pruning.prune_ratio`): in ``per_client`` mode each client
zeros all but its own largest values (same layout and bytes); in ``shared`` mode the round's
:class:`~splitfed.federated.aggregators.SharedMask` comes from the global adapters at the start of
the round, which every client holds, and only the kept values are aggregated.

Everything a round draws (the sample, each client's batches and dropout) derives from
``(train.seed, round, client)``, so a run resumed from a checkpoint repeats the uninterrupted one.

With ``record=DIR`` (``fedtrain --record DIR``) a :class:`~splitfed.federated.recording.FederatedRecorder`
keeps the server's view of every round (the global adapters, each client's update as the server
decoded it, or under secagg and ckks only the average) and, apart, each client's batches: what
``splitfed audit`` inverts and scores gradient inversion on.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from splitfed.config import ConfigError, RunConfig
from splitfed.federated.aggregators import AGGREGATORS, Aggregator, Layout, SharedMask, prune
from splitfed.federated.aggregators.pruning import kept_count, prune_ratio
from splitfed.federated.client import ClientUpdate, client_seed, local_update
from splitfed.federated.client_dp import ClientDP
from splitfed.federated.recording import (
    FederatedRecorder,
    check_new_federated_recording,
    config_settings,
)
from splitfed.federated.rounds import SimulatedAggregation, simulated_aggregation
from splitfed.federated.strategies import STRATEGIES, FitConfig, Strategy
from splitfed.models.families import check_supported
from splitfed.models.partition import Segment, apply_finetune
from splitfed.run import (
    CHECKPOINT,
    RunResult,
    Workload,
    checkpoint_dir,
    evaluate,
    format_metrics,
    prepare,
    progress_bars,
    swap_into_place,
    write_adapter,
    write_results,
)
from splitfed.split.parties import INPUT_KEYS

Example = dict[str, Any]

#: Config keys a resumed run may change (everything else must match the checkpoint's run).
RESUMABLE_CHANGES = (
    "name",
    "output_dir",
    "federated.rounds",
    "federated.eval_every",
    "federated.checkpoint_every",
    "train.threads",
    "train.eval_before",
)


def sample_clients(num_clients: int, per_round: int, *, seed: int, round_id: int) -> list[int]:
    """The sorted indices of the ``per_round`` clients sampled in ``round_id`` (no repeats).

    Deterministic in ``(seed, round_id)``: every run with that seed samples the same clients.
    """
    if not 1 <= per_round <= num_clients:
        raise ValueError(f"cannot sample {per_round} of {num_clients} clients")
    rng = np.random.default_rng([seed % 2**63, round_id])
    return sorted(int(i) for i in rng.choice(num_clients, size=per_round, replace=False))


def whole_model(model: nn.Module, head: str) -> Segment:
    """The whole task model as one segment (embeddings, every block, final norm and task head).

    A client of federated fine-tuning holds all of it; the segment gives the logits in the layout
    the tasks' losses and metrics expect, as the split engine does.
    """
    family = check_supported(model.config, head)
    return Segment(
        "model", model, family, 0, family.num_layers(model), embed=True, finish=True, task_head=head
    )


@dataclass
class ClientResult:
    """One client's contribution to a round: what it encodes, and the local update behind it.

    Parameters
    ----------
    delta : dict[str, torch.Tensor]
        What the client encodes (its update; clipped and noised under client-level DP).
    weight : float
        Its aggregation weight (examples; 1 under client-level DP).
    update : ClientUpdate
        The local training's record (loss, examples, steps, raw delta).
    norm : float | None
        The update's norm before clipping (client-level DP only).
    """

    delta: dict[str, torch.Tensor]
    weight: float
    update: ClientUpdate
    norm: float | None = None


class _GlobalModel:
    """The global model's predictions for evaluation, on the whole-model segment.

    Tasks scored on generated text go through :func:`splitfed.run.evaluate` on a split view of
    the same modules (and adapters): a real data party whose split generation the run's
    evaluation uses, built on first use.
    """

    def __init__(self, segment: Segment, loss_fn: Callable[..., torch.Tensor]) -> None:
        self.segment = segment
        self.loss_fn = loss_fn
        self._split: Any = None

    @torch.no_grad()
    def predict(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits of a batch from :meth:`Task.collate <splitfed.data.tasks.Task.collate>`."""
        self.segment.eval()
        return self.segment(**{k: batch[k] for k in INPUT_KEYS if k in batch})  # type: ignore[no-any-return]

    def evaluate(
        self, task: Any, examples: Sequence[Example], batch_size: int, progress: Any, desc: str
    ) -> dict[str, float]:
        """The task's metrics over ``examples``."""
        metric = task.new_metric()
        bar = (
            progress.add_task(desc, total=math.ceil(len(examples) / batch_size), info="")
            if progress
            else None
        )
        for start in range(0, len(examples), batch_size):
            batch = task.collate(list(examples[start : start + batch_size]))
            metric.update(self.predict(batch).float(), batch)
            if progress is not None:
                progress.advance(bar)
        if progress is not None:
            progress.remove_task(bar)
        return {k: float(v) for k, v in metric.compute().items()}

    def split_view(self) -> Any:
        """A :class:`~splitfed.split.parties.DataParty` over the same modules, joined in process."""
        if self._split is None:
            from splitfed.models.partition import SplitSpec, partition
            from splitfed.split.parties import ModelParty, OptimSpec
            from splitfed.split.system import build_data_party
            from splitfed.transport.channel import InProcessChannel

            model: nn.Module = self.segment.model  # type: ignore[assignment]
            # Cut without touching fine-tuning: the segments share the client's modules and adapters.
            segments = partition(model, SplitSpec("ht", 1), self.segment.task_head)
            body = ModelParty(segments["body"], OptimSpec(), head_trainable=False)
            self._split = build_data_party(segments, InProcessChannel(body.handle), self.loss_fn)
        return self._split


class FederatedSimulation:
    """The clients, the server and the aggregation of one federated run, in one process.

    Parameters
    ----------
    work : Workload
        What :func:`splitfed.run.prepare` loaded (data, task, the one model).
    log : Callable[[str], None], default print
    """

    def __init__(self, work: Workload, log: Callable[[str], None] = print) -> None:
        from splitfed.data.partition import format_summary, parse_partition, partition_examples

        cfg = work.cfg
        fed = cfg.federated
        if fed is None:
            raise ConfigError("the configuration has no federated: section")
        self.cfg, self.fed, self.work = cfg, fed, work
        scheme, alpha = parse_partition(fed.partition)
        self.parts: list[list[Example]] = partition_examples(
            work.splits.train,
            fed.clients,
            scheme=scheme,
            alpha=alpha,
            seed=cfg.data.seed,
            label_key="label",
            min_per_party=1,
        )
        sizes = [len(p) for p in self.parts]
        if fed.clients <= 16:
            summary = format_summary(self.parts, work.splits.label_names)
        else:
            summary = f"examples per client: min {min(sizes)}, median {statistics.median(sizes):g}, max {max(sizes)}"
        log(
            f"partition {fed.partition} of {len(work.splits.train)} training examples over {fed.clients} "
            f"clients:\n{summary}"
        )
        self.segment = whole_model(work.model, cfg.head)
        self.report = apply_finetune(self.segment, fed.finetune.spec())
        self.params = self.segment.named_model_parameters(trainable_only=True)
        if not self.params:
            raise ConfigError("federated.finetune trains no parameter of this model")
        #: The server's global adapters (float32 master copy), by parameter name.
        self.global_state = {n: p.detach().float().clone() for n, p in self.params.items()}
        self.layout = Layout.of(self.global_state)
        self.strategy: Strategy = STRATEGIES[fed.strategy](**fed.strategy_kwargs())  # type: ignore[arg-type]
        self.aggregator_kwargs = fed.aggregator_kwargs()
        if fed.aggregation == "secagg" and "max_weight" not in self.aggregator_kwargs:
            # the largest weight any client may have; in a deployment, configure secagg.max_weight
            self.aggregator_kwargs["max_weight"] = float(max(sizes))
        self._aggregation: SimulatedAggregation | None = None
        self.base_fit = FitConfig.from_train(
            cfg.train, local_steps=fed.local_steps, local_epochs=fed.local_epochs
        )
        self.predictor = _GlobalModel(self.segment, work.task.loss)
        self.dp = (
            ClientDP(
                fed.dp.clip,
                fed.dp.noise_multiplier,
                fed.clients_per_round,
                fed.clients_per_round / fed.clients,
                fed.dp.delta,
            )
            if fed.dp is not None
            else None
        )
        self._mask: tuple[int, SharedMask] | None = None  # the shared mask of the round it was made for
        #: Records the server's view and the clients' batches (:meth:`attach`); ``None``: nothing is.
        self.recorder: FederatedRecorder | None = None

    def attach(self, recorder: FederatedRecorder) -> None:
        """Record every following round into ``recorder``: the global adapters and fit at its start,
        each client's collated batches, the uploads as the server receives them, the average."""
        self.recorder = recorder
        self.aggregation.tap = recorder.server_received

    def recording_settings(self) -> dict[str, Any]:
        """What a federated recording's manifest says about the run (all of it public to the server)."""
        return config_settings(self.cfg) | {
            "head": self.cfg.head,
            "client_examples": [len(p) for p in self.parts],
            "strategy": {"name": self.fed.strategy, **self.strategy.hyperparameters()},
        }

    @property
    def aggregation(self) -> SimulatedAggregation:
        """The in-process protocol driver of the run's aggregator (built on first use: CKKS makes
        its keys then, so a Flower client that only trains never makes any)."""
        if self._aggregation is None:
            self._aggregation = simulated_aggregation(
                self._make_aggregator, self.layout, min_clients=self.fed.min_clients, dealer=self.client_id(0)
            )
        return self._aggregation

    def _make_aggregator(self) -> Aggregator:
        return AGGREGATORS[self.fed.aggregation](**self.aggregator_kwargs)

    @staticmethod
    def client_id(index: int) -> str:
        """The name client ``index`` goes by in the aggregation protocol."""
        return f"client-{index}"

    def load_global(self) -> None:
        """Copy the global adapters into the model's trainable parameters."""
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.global_state[name])

    def prune_ratio(self, round_id: int) -> float:
        """Fraction of each delta's values pruned in ``round_id`` (0 without ``federated.pruning``)."""
        p = self.fed.pruning
        if p is None:
            return 0.0
        return prune_ratio(
            round_id,
            self.fed.rounds,
            start_round=p.start_round,
            start_ratio=p.start_ratio,
            end_ratio=p.end_ratio,
        )

    def shared_mask(self, round_id: int) -> SharedMask | None:
        """The shared mask of ``round_id`` (``pruning.mode: shared`` in a pruned round; else None).

        Ranked on the global adapters as the round starts (what every client loads), within each
        tensor (ranked together, LoRA's A matrices would crowd out its B matrices); made once per
        round and reused by all of its clients.
        """
        p, ratio = self.fed.pruning, self.prune_ratio(round_id)
        if p is None or p.mode != "shared" or ratio == 0:
            return None
        if self._mask is None or self._mask[0] != round_id:
            self._mask = (
                round_id,
                SharedMask.from_reference(self.global_state, keep_ratio=1 - ratio, per_tensor=True),
            )
        return self._mask[1]

    def client_update(self, round_id: int, index: int, fit: FitConfig) -> ClientResult:
        """Client ``index``'s local update of ``round_id`` from the global adapters, ready to encode.

        The one client computation of a round, used by the simulation and by the Flower
        :mod:`ClientApp <splitfed.federated.flower.client_app>` alike. Under ``federated.pruning``
        the delta is pruned (per client: its own largest values kept; shared: the round's
        :meth:`shared_mask` applied, whose kept values the aggregation then selects). Under
        ``federated.dp`` the (pruned) delta is clipped, carries its noise share and weighs 1
        (DP-FedAvg averages uniformly).
        """
        task, part = self.work.task, self.parts[index]
        recorder, client = self.recorder, self.client_id(index)

        def loss_fn(batch_ids: list[int]) -> torch.Tensor:
            batch = task.collate([part[i] for i in batch_ids])
            if recorder is not None:
                recorder.client_batch(round_id, client, batch_ids, batch)
            logits = self.segment(**{k: batch[k] for k in INPUT_KEYS if k in batch})
            return task.loss(logits, batch)  # type: ignore[no-any-return]

        self.load_global()
        self.segment.train()
        seed = client_seed(self.cfg.train.seed, round_id, index)
        update = local_update(self.params, loss_fn=loss_fn, num_examples=len(part), fit=fit, seed=seed)
        delta = update.delta
        ratio, mask = self.prune_ratio(round_id), self.shared_mask(round_id)
        if mask is not None:
            delta = mask.apply(delta)
        elif ratio > 0:
            delta = prune(delta, keep_ratio=1 - ratio)
        if self.dp is None:
            return ClientResult(delta, float(update.num_examples), update)
        noise = torch.Generator().manual_seed(seed + 1)
        private, norm = self.dp.privatize(delta, noise)
        return ClientResult(private, 1.0, update, norm)

    def run_round(self, round_id: int) -> dict[str, Any]:
        """Sample, train, aggregate and apply one round; returns its history record."""
        fed = self.fed
        t_round = time.perf_counter()
        sampled = sample_clients(
            fed.clients, fed.clients_per_round, seed=self.cfg.train.seed, round_id=round_id
        )
        fit = self.strategy.configure_fit(round_id, self.base_fit)
        by_id = {self.client_id(i): i for i in sampled}
        if self.recorder is not None:
            self.recorder.start_round(
                round_id,
                global_adapters=self.global_state,
                sampled=list(by_id),
                fit=fit,
                prune_ratio=self.prune_ratio(round_id),
            )
        results: dict[int, tuple[float, int, int]] = {}
        norms: dict[int, float] = {}

        def train(client: str) -> tuple[dict[str, torch.Tensor], float]:
            index = by_id[client]
            result = self.client_update(round_id, index, fit)
            update = result.update
            results[index] = (update.loss, update.num_examples, update.steps)
            if result.norm is not None:
                norms[index] = result.norm
            return result.delta, result.weight

        mask = self.shared_mask(round_id)
        outcome = self.aggregation.run(round_id, [self.client_id(i) for i in sampled], train, mask=mask)
        if self.recorder is not None:
            self.recorder.end_round(round_id, average=outcome.average, clients=outcome.clients)
        self.global_state = self.strategy.apply(self.global_state, outcome.average, round_id)
        self.load_global()
        kept = [by_id[c] for c in outcome.clients]
        weights = [results[i][1] for i in kept]
        return (
            {
                "round": round_id,
                "train_loss": float(np.average([results[i][0] for i in kept], weights=weights)),
                "clients": len(kept),
                "sampled": sampled,
                "local_steps": sum(results[i][2] for i in kept),
                "seconds": time.perf_counter() - t_round,
                "train_s": outcome.train_s,
                "encode_s": outcome.encode_s,
                "combine_s": outcome.combine_s,
                "decode_s": outcome.decode_s,
                "bytes_up": outcome.bytes_up,
                "bytes_down": outcome.bytes_down,
                "setup_bytes_up": outcome.setup_bytes_up,
                "setup_bytes_down": outcome.setup_bytes_down,
                "update_bytes": outcome.update_bytes,
            }
            | (
                {
                    "prune_ratio": self.prune_ratio(round_id),
                    "kept_values": mask.kept if mask is not None else self._kept(round_id),
                }
                if self.fed.pruning is not None
                else {}
            )
            | (
                {
                    "dp_epsilon": self.dp.epsilon(round_id),
                    "dp_clipped": sum(1 for i in kept if norms[i] > self.dp.clip) / max(1, len(kept)),
                }
                if self.dp is not None
                else {}
            )
        )

    def _kept(self, round_id: int) -> int:
        return kept_count(self.layout.numel, 1 - self.prune_ratio(round_id))

    def evaluate(self, progress: Any, desc: str, final: bool = False) -> dict[str, float]:
        """Metrics of the global model on the run's evaluation split (generating only when ``final``)."""
        cfg, task = self.cfg, self.work.task
        examples = getattr(self.work.splits, cfg.data.eval_split)
        batch = cfg.train.eval_batch_size or cfg.train.batch_size
        tokens = cfg.train.eval_max_new_tokens if final else 0
        self.load_global()
        if tokens > 0 and hasattr(task, "evaluate_generations"):
            return evaluate(self.predictor.split_view(), task, examples, batch, progress, desc, tokens)
        return self.predictor.evaluate(task, examples, batch, progress, desc)

    def adapters(self) -> dict[str, torch.Tensor]:
        """The global adapters in the parameters' dtypes (what ``global/adapter.safetensors`` holds)."""
        return {n: self.global_state[n].to(p.dtype) for n, p in self.params.items()}


# ---------------------------------------------------------------------- checkpoints


def save_checkpoint(
    out: Path, sim: FederatedSimulation, round_id: int, history: list[dict[str, Any]]
) -> None:
    """Write the server's state after ``round_id`` atomically, as :func:`splitfed.run.save_checkpoint`.

    Built in a temporary directory and renamed into place, so a crash leaves either the previous
    checkpoint or the new one. Clients hold no state between rounds, so nothing of theirs is saved.
    """
    tmp = out / f".{CHECKPOINT}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: t.contiguous() for n, t in sim.global_state.items()}, str(tmp / "global.safetensors"))
    torch.save(sim.strategy.state_dict(), tmp / "strategy.pt")
    progress = {"round": round_id, "history": history, "config": sim.cfg.model_dump(mode="json")}
    (tmp / "progress.json").write_text(json.dumps(progress))
    swap_into_place(tmp, out / CHECKPOINT)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out |= _flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def check_resumable(saved: Mapping[str, Any], cfg: RunConfig, where: Path) -> None:
    """Refuse to resume a checkpoint made with other settings (except :data:`RESUMABLE_CHANGES`)."""
    old, new = _flatten(dict(saved)), _flatten(cfg.model_dump(mode="json"))
    changed = sorted(
        k
        for k in set(old) | set(new)
        if old.get(k) != new.get(k) and not any(k == c or k.startswith(c + ".") for c in RESUMABLE_CHANGES)
    )
    if changed:
        shown = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:5])
        raise ConfigError(
            f"--resume: the checkpoint in {where} was made with other settings ({shown}); resume with "
            "the same configuration, or start a new output_dir"
        )


def load_checkpoint(out: Path, sim: FederatedSimulation) -> tuple[int, list[dict[str, Any]]]:
    """Restore what :func:`save_checkpoint` wrote into ``sim``; returns the round and the history."""
    ckpt = checkpoint_dir(out)
    if ckpt is None:
        raise FileNotFoundError(
            f"--resume: no checkpoint in {out} (expected {out / CHECKPOINT}/progress.json); run without --resume"
        )
    progress = json.loads((ckpt / "progress.json").read_text())
    check_resumable(progress["config"], sim.cfg, ckpt)
    saved = load_file(str(ckpt / "global.safetensors"))
    if set(saved) != set(sim.global_state):
        raise ConfigError(
            f"--resume: {ckpt} holds other adapters than this model and federated.finetune make"
        )
    sim.global_state = {n: saved[n].float() for n in sim.global_state}
    sim.strategy.load_state_dict(torch.load(ckpt / "strategy.pt", weights_only=True))
    sim.load_global()
    return int(progress["round"]), list(progress["history"])


# ---------------------------------------------------------------------- the run


def fedtrain(
    cfg: RunConfig,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    record: str | Path | None = None,
) -> RunResult:
    """Run ``cfg``'s federated fine-tuning in one process (``splitfed fedtrain``).

    Writes ``results.json`` (config, metrics before and after, per-round history with losses,
    evaluations, timings and aggregation bytes) and the global adapters
    (``global/adapter.safetensors``) to ``cfg.output_dir``; with ``federated.checkpoint_every``,
    checkpoints that ``resume=True`` continues from.

    With ``record``, a new directory, every round run is recorded there
    (:mod:`splitfed.federated.recording`: the server's view, and the clients' batches apart in its
    ``ground_truth/``), and ``results.json``'s ``recording`` says where, for ``splitfed audit``.
    Resumed with ``resume=True``, a new recording holds the rounds run after the checkpoint.

    Raises
    ------
    ConfigError
        Without a ``federated:`` section, with ``data.num_parties`` > 1, or when resuming a
        checkpoint made with other settings.
    FileNotFoundError
        ``resume=True`` without a checkpoint in ``output_dir``.
    RecordingError
        ``record`` exists and is not empty, is a file, is ``output_dir``, holds it, or is inside one
        of the run's own outputs there (before anything loads).
    """
    fed = cfg.federated
    if fed is None:
        raise ConfigError(
            "the configuration has no federated: section; add one (see examples/fedlora_*.yaml) or run "
            "`splitfed train` for split fine-tuning"
        )
    if cfg.data.num_parties != 1:
        raise ConfigError(
            f"data.num_parties={cfg.data.num_parties} partitions data across split data parties; "
            "fedtrain partitions with federated.clients and federated.partition (leave data.num_parties at 1)"
        )
    out = Path(cfg.output_dir)
    if resume and checkpoint_dir(out) is None:
        raise FileNotFoundError(
            f"--resume: no checkpoint in {out} (expected {out / CHECKPOINT}/progress.json); run without --resume"
        )
    if record is not None:
        check_new_federated_recording(record, output_dir=out)
    work = prepare(cfg, log)
    sim = FederatedSimulation(work, log)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {"load_s": work.load_s}
    trainable = sum(p.numel() for p in sim.params.values())
    log(
        f"model {cfg.model.name}: {len(sim.report.lora_modules)} LoRA modules, {trainable:,} trainable parameters "
        f"per client; {fed.clients} clients, {fed.clients_per_round} per round, {fed.rounds} rounds, "
        f"strategy {fed.strategy}, aggregation {fed.aggregation}"
        + (
            f", pruning {fed.pruning.mode} from round {fed.pruning.start_round} "
            f"({fed.pruning.start_ratio:.0%} -> {fed.pruning.end_ratio:.0%} zeroed)"
            if fed.pruning is not None
            else ""
        )
    )
    history: list[dict[str, Any]] = []
    start = 0
    if resume:
        start, history = load_checkpoint(out, sim)
        history = [h for h in history if h["round"] <= start]
        log(f"resumed from {out / CHECKPOINT} at round {start}/{fed.rounds}")
    recorder = None
    if record is not None:
        recorder = FederatedRecorder(
            record,
            aggregator=sim._make_aggregator(),
            aggregation=fed.aggregation,
            settings=sim.recording_settings(),
        )
        sim.attach(recorder)
    metrics_before = None
    with progress_bars(progress) as bar:
        if cfg.train.eval_before and start == 0:
            t = time.perf_counter()
            metrics_before = sim.evaluate(bar, "eval (before)", final=True)
            timings["eval_before_s"] = time.perf_counter() - t
            log(f"{cfg.data.eval_split} before federated fine-tuning: {format_metrics(metrics_before)}")
        rounds_bar = bar.add_task("rounds", total=fed.rounds, completed=start, info="") if bar else None
        t_train = time.perf_counter()
        for round_id in range(start + 1, fed.rounds + 1):
            try:
                entry = sim.run_round(round_id)
            except BaseException:
                if recorder is not None:  # no half-recorded round is left behind
                    recorder.abort()
                raise
            history.append(entry)
            if fed.eval_every and round_id % fed.eval_every == 0 and round_id < fed.rounds:
                mid = sim.evaluate(bar, f"eval @{round_id}")
                entry.update({f"eval_{k}": v for k, v in mid.items()})
            if bar is not None:
                shown = f"loss {entry['train_loss']:.4f}" + "".join(
                    f", {k} {v:.3f}" for k, v in entry.items() if k.startswith("eval_")
                )
                bar.update(rounds_bar, advance=1, info=shown)
            if fed.checkpoint_every and round_id % fed.checkpoint_every == 0:
                save_checkpoint(out, sim, round_id, history)
        timings["train_s"] = time.perf_counter() - t_train
        t = time.perf_counter()
        metrics_after = sim.evaluate(bar, "eval (after)", final=True)
        timings["eval_after_s"] = time.perf_counter() - t
    log(f"{cfg.data.eval_split} after federated fine-tuning:  {format_metrics(metrics_after)}")
    recording = None
    if recorder is not None:
        recorder.close()
        recording = recorder.summary()
        log(
            f"recording: {recording['directory']} ({recording['rounds']} rounds, {recording['updates']} client "
            f"updates, {recording['stored_bytes'] / 1e6:.1f} MB; server's view: {recording['view']}); "
            f"ground truth: {recording['ground_truth']}"
        )
    summary = _summary(sim, out, metrics_before, metrics_after, history, timings, start, recording)
    log(
        f"{len(history) - sum(1 for h in history if h['round'] <= start)} round(s) in {timings['train_s']:.1f} s; per round "
        f"{summary['bytes_per_round']['up'] / 1e6:.2f} MB up, {summary['bytes_per_round']['down'] / 1e6:.2f} MB down "
        f"({fed.aggregation}; {summary['bytes_per_round']['update_per_client'] / 1e6:.2f} MB per client update)"
    )
    return RunResult(out, metrics_before, metrics_after, history, summary)


def _mean(history: Sequence[Mapping[str, Any]], key: str) -> float:
    return float(np.mean([h[key] for h in history])) if history else 0.0


def _summary(
    sim: FederatedSimulation,
    out: Path,
    metrics_before: dict[str, float] | None,
    metrics_after: dict[str, float],
    history: list[dict[str, Any]],
    timings: dict[str, float],
    start: int,
    recording: dict[str, Any] | None = None,
) -> dict[str, Any]:
    cfg, fed = sim.cfg, sim.fed
    adapter = write_adapter(
        sim.adapters(), out / "global", ("model",), strategy=fed.strategy, aggregation=fed.aggregation
    )
    new = [h for h in history if h["round"] > start]
    aggregator = sim._make_aggregator()
    summary = {
        "config": cfg.model_dump(mode="json"),
        "metrics_before": metrics_before,
        "metrics_after": metrics_after,
        "rounds": fed.rounds,
        "clients": fed.clients,
        "clients_per_round": fed.clients_per_round,
        "strategy": {"name": fed.strategy, **sim.strategy.hyperparameters()},
        "aggregation": {
            "name": fed.aggregation,
            **{k: v for k, v in vars(aggregator).items() if not k.startswith("_") and _plain(v)},
        },
        "pruning": fed.pruning.model_dump() if fed.pruning is not None else None,
        "examples": sim.work.splits.sizes(),
        "client_examples": [len(p) for p in sim.parts],
        "eval_split": cfg.data.eval_split,
        "label_names": sim.work.splits.label_names,
        "trainable_params": sum(p.numel() for p in sim.params.values()),
        "timings": timings
        | {
            "mean_round_s": _mean(new, "seconds"),
            "mean_local_train_s": _mean(new, "train_s"),
            "mean_encode_s": _mean(new, "encode_s"),
            "mean_combine_s": _mean(new, "combine_s"),
            "mean_decode_s": _mean(new, "decode_s"),
        },
        "bytes_per_round": {
            "up": _mean(history, "bytes_up"),
            "down": _mean(history, "bytes_down"),
            "update_per_client": _mean(history, "update_bytes"),
            "fp32_update": 4 * sim.layout.numel,
        },
        "setup_bytes": {
            "up": sum(h["setup_bytes_up"] for h in history),
            "down": sum(h["setup_bytes_down"] for h in history),
        },
        "adapters": str(adapter),
        "history": history,
    }
    if recording is not None:
        summary["recording"] = recording
    write_results(out, summary)
    return summary


def _plain(value: Any) -> bool:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return True
    return isinstance(value, tuple) and all(isinstance(v, (int, float)) for v in value)
