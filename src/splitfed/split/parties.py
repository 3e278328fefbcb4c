"""The two sides of a split: :class:`DataParty` and :class:`ModelParty`.

A party knows its segments and its optimizer, never the transport: the data party talks through a
:class:`~splitfed.transport.channel.Channel`, the model party answers messages in
:meth:`ModelParty.handle`. One training step runs exactly one backward pass per segment: the
gradient that crosses back and the parameter gradients come from the same pass.

Message kinds (data party → model party, and the reply):

``forward``  {hidden, attention_mask[, labels]} → ``forward_result`` {logits | hidden | loss[, grad]}
``backward`` {grad} → ``backward_result`` {grad} (one-way, no reply, when the head is frozen)
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from splitfed.federated.split_averaging import (
    AveragingClient,
    AveragingServer,
    averaging_aggregator,
)
from splitfed.federated.split_averaging import from_message as averaging_payload
from splitfed.models.partition import Segment
from splitfed.protocol import GEN_KINDS, ErrorCode, ProtocolError
from splitfed.split.front import DataFront, FrontContext
from splitfed.split.inference import InferenceHost
from splitfed.transport.channel import Channel, Message

LossFn = Callable[[torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]
LabelsAt = Literal["data", "model"]
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
#: What ``labels_at: model`` sends; everything else in a batch (e.g. span-QA offsets) stays home.
LABEL_KEYS = ("labels",)


class StepRejected(ProtocolError):
    """A model-party update that was not applied: its gradients or its result were not acceptable."""

    default_code = ErrorCode.STEP_REJECTED


@dataclass(frozen=True)
class StepGuard:
    """What a model-party update must satisfy before it touches parameters other parties share.

    A step is refused whole when its accumulated gradient is not finite or its norm (computed in
    float64, before clipping, so finite but huge values cannot overflow it) exceeds
    ``max_grad_norm``, and rolled back when the update leaves a parameter non-finite.

    Parameters
    ----------
    max_grad_norm : float | None, default None
        Largest accepted gradient norm of one step; ``None``: only finiteness is required. The
        optimizer's own clipping (``OptimSpec.max_grad_norm``) then bounds how far it moves.
    rollback_max_elements : int, default 2**26
        Snapshot parameters and optimizer state before each update (to roll back a non-finite
        result) when the trainable parameters hold at most this many elements; larger ones (full
        fine-tuning) rely on the gradient check alone.
    """

    max_grad_norm: float | None = None
    rollback_max_elements: int = 2**26

    def check_gradients(self, params: Sequence[nn.Parameter]) -> float:
        """The step's gradient norm; raises :class:`StepRejected` when it is not acceptable."""
        squares = 0.0
        for p in params:
            if p.grad is not None:
                squares += float(p.grad.detach().double().pow(2).sum())
        norm = math.sqrt(squares) if math.isfinite(squares) else math.inf
        if not math.isfinite(norm):
            raise StepRejected("the step's gradient is not finite; the update was not applied")
        if self.max_grad_norm is not None and norm > self.max_grad_norm:
            raise StepRejected(
                f"the step's gradient norm {norm:.4g} exceeds the model party's bound {self.max_grad_norm:g}; "
                "the update was not applied"
            )
        return norm


@dataclass(frozen=True)
class OptimSpec:
    """Optimizer and learning-rate schedule of one party.

    Parameters
    ----------
    optimizer : {"adamw", "sgd"}, default "adamw"
    lr : float, default 2e-4
    weight_decay : float, default 0.0
    scheduler : {"constant", "linear", "cosine"}, default "linear"
    warmup_steps : int, default 0
    total_steps : int, default 100
        Number of optimizer updates (for the schedule).
    max_grad_norm : float | None, default 1.0
        Clip each party's own gradients to this norm (``None``: no clipping).
    """

    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 2e-4
    weight_decay: float = 0.0
    scheduler: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: int = 0
    total_steps: int = 100
    max_grad_norm: float | None = 1.0


class _Trainer:
    """Optimizer + schedule over a set of parameters (shared by both parties)."""

    def __init__(self, params: list[nn.Parameter], spec: OptimSpec) -> None:
        from transformers import get_scheduler

        self.params = params
        self.spec = spec
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        if params:
            if spec.optimizer == "sgd":
                self.optimizer = torch.optim.SGD(params, lr=spec.lr, weight_decay=spec.weight_decay)
            else:
                self.optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
            self.scheduler = get_scheduler(
                spec.scheduler if spec.scheduler != "constant" else "constant_with_warmup",
                self.optimizer,
                num_warmup_steps=spec.warmup_steps,
                num_training_steps=max(spec.total_steps, 1),
            )

    def update(self, guard: StepGuard | None = None, checked: bool = False, rollback: bool = True) -> None:
        """Clip, step the optimizer and the schedule; with ``guard``, refuse or roll back a bad step.

        ``checked``: the guard already accepted these gradients (skip that pass). ``rollback``:
        snapshot before the update so a non-finite result can be undone (a shared model party; a
        party of one's own only refuses it).
        """
        if self.optimizer is None:
            return
        snapshot = None
        if guard is not None:
            if not checked:
                guard.check_gradients(self.params)
            if rollback and sum(p.numel() for p in self.params) <= guard.rollback_max_elements:
                snapshot = (
                    [p.detach().clone() for p in self.params],
                    copy.deepcopy(self.optimizer.state_dict()),
                )
        if self.spec.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.spec.max_grad_norm)
        self.optimizer.step()
        if guard is not None and not all(bool(torch.isfinite(p).all()) for p in self.params):
            if snapshot is not None:
                with torch.no_grad():
                    for p, saved in zip(self.params, snapshot[0], strict=True):
                        p.copy_(saved)
                self.optimizer.load_state_dict(snapshot[1])
            self.optimizer.zero_grad(set_to_none=True)
            raise StepRejected(
                "the update left parameters non-finite"
                + ("; it was rolled back" if snapshot is not None else "; it was not rolled back")
            )
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def zero_grad(self) -> None:
        """Forget accumulated gradients (a step that will not be applied)."""
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {}
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.optimizer is not None and state:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])


def _params(segments: Mapping[str, Segment]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for segment in segments.values():
        for p in segment.trainable_parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def _require(message: Message, *names: str) -> None:
    missing = [n for n in names if n not in message.tensors]
    if missing:
        raise ProtocolError(
            f"{message.kind!r} message lacks tensor(s) {missing}; it carries {sorted(message.tensors)}"
        )


@dataclass
class _Pending:
    inputs: torch.Tensor
    outputs: torch.Tensor


class AdapterBank:
    """One copy of the model party's trainable parameters and optimizer per data party.

    The segment's modules stay shared (the frozen base weights exist once); :meth:`activate` puts a
    data party's own parameter objects into the modules' slots, so its forward and backward use
    and train only its copy. Swapping is a pointer assignment, not a copy. Graphs already built
    keep the parameters they were built with, so a pending backward is never redirected.

    Parameters
    ----------
    body : Segment
        The model party's segment; its trainable parameters at the first activation are every
        party's start.
    optim : OptimSpec
    max_parties : int, default 64
        How many data parties may have their own adapters (each costs a copy of the adapters and
        the optimizer state); a new party beyond that is refused.
    """

    def __init__(self, body: Segment, optim: OptimSpec, max_parties: int = 64) -> None:
        self.optim = optim
        self.max_parties = max_parties
        seen: set[int] = set()
        self.slots: list[tuple[nn.Module, str]] = []
        for module in body.modules():
            for name, param in module.named_parameters(recurse=False):
                if param.requires_grad and id(param) not in seen:
                    seen.add(id(param))
                    self.slots.append((module, name))
        #: Every party's starting point: the parameters in the modules at the first activation
        #: (so adapters loaded after construction, e.g. ``serve --adapters``, count).
        self.initial: list[torch.Tensor] | None = None
        model: nn.Module = body.model  # type: ignore[assignment]
        paths = {id(m): path for path, m in model.named_modules(remove_duplicate=False)}
        self.names = [f"{paths[id(m)]}.{n}" for m, n in self.slots]
        self.parties: dict[str, tuple[list[nn.Parameter], _Trainer]] = {}
        self.active: str | None = None

    def _get(self, client: str) -> tuple[list[nn.Parameter], _Trainer]:
        if client not in self.parties:
            if len(self.parties) >= self.max_parties:
                raise ProtocolError(
                    f"the model party already keeps adapters for {self.max_parties} data parties; "
                    "a new data party cannot join this run"
                )
            if self.initial is None:
                self.initial = [getattr(m, n).detach().clone() for m, n in self.slots]
            params = [nn.Parameter(t.clone()) for t in self.initial]
            self.parties[client] = (params, _Trainer(params, self.optim))
        return self.parties[client]

    def activate(self, client: str) -> _Trainer:
        """Put ``client``'s parameters into the modules (creating them on first use); its trainer."""
        params, trainer = self._get(client)
        if self.active != client:
            for (module, name), param in zip(self.slots, params, strict=True):
                setattr(module, name, param)
            self.active = client
        return trainer

    def trainer(self, client: str) -> _Trainer:
        """``client``'s optimizer (without activating its parameters)."""
        return self._get(client)[1]

    def state_dict(self) -> dict[str, Any]:
        parties = {
            client: {"params": [p.detach() for p in params], "trainer": trainer.state_dict()}
            for client, (params, trainer) in self.parties.items()
        }
        return {"initial": self.initial, "parties": parties}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.parties.clear()
        self.active = None
        # The starting point travels with the checkpoint: what the modules hold after a load is
        # some party's trained adapters, not where a new party starts.
        if state.get("initial") is not None:
            self.initial = [t.clone() for t in state["initial"]]
        for client, entry in state.get("parties", {}).items():
            params, trainer = self._get(client)
            with torch.no_grad():
                for param, saved in zip(params, entry["params"], strict=True):
                    param.copy_(saved)
            trainer.load_state_dict(entry["trainer"])

    def named_parameters(self, client: str) -> dict[str, torch.Tensor]:
        """``client``'s parameters under their names in the whole model (as adapters are saved)."""
        params, _ = self._get(client)
        return {name: p.detach() for name, p in zip(self.names, params, strict=True)}


class ModelParty:
    """The party that runs the middle of the model (HBT) or everything after the head (HT).

    Parameters
    ----------
    body : Segment
        Its segment. In HT it ends with the final norm and task head.
    optim : OptimSpec
    loss_fn : LossFn | None, default None
        Needed only when the data party sends labels (``labels_at: model``).
    head_trainable : bool, default True
        Default for data parties that do not say (``need_input_grad`` in a message's metadata)
        whether their head trains. When it does not (SplitFrozen), the model party computes no
        gradient for its input and sends none back.
    per_party_adapters : bool, default False
        Train one copy of the adapters per data party (:class:`AdapterBank`) instead of one
        shared by all (SplitLoRA / SplitFrozen).
    guard : StepGuard | None, default None
        What an update must satisfy (default: finite gradients and parameters).
    fedavg_aggregation : {"plain", "ckks", "secagg"}, default "plain"
        How the data parties' adapters are averaged here (``train.fedavg_every``): in the clear,
        encrypted or masked (:mod:`splitfed.federated.split_averaging`).
    """

    def __init__(
        self,
        body: Segment,
        optim: OptimSpec,
        loss_fn: LossFn | None = None,
        head_trainable: bool = True,
        per_party_adapters: bool = False,
        guard: StepGuard | None = None,
        fedavg_aggregation: str = "plain",
    ) -> None:
        self.body = body
        self.guard = guard or StepGuard()
        #: Leave each step's update for :meth:`commit` (a server encodes a step's reply before its
        #: update is applied, so a reply that fails to encode never leaves half a step behind).
        self.defer_updates = False
        self._due: set[str] = set()
        self.loss_fn = loss_fn
        self.head_trainable = head_trainable
        self.bank = AdapterBank(body, optim) if per_party_adapters else None
        self.trainer = _Trainer(_params({"body": body}), optim)
        self._pending: dict[tuple[str, int], _Pending] = {}
        self.updates = 0
        #: Optimizer steps applied per data party (checkpointed; a resuming party compares its own).
        self.client_steps: dict[str, int] = {}
        self._views: dict[int, Segment] = {}
        self.inference = InferenceHost(body, select=self.body_for)
        #: SplitLoRA's adapter averaging (``train.fedavg_every``), run by the federated aggregators.
        self.averaging = AveragingServer(averaging_aggregator(fedavg_aggregation))

    def body_for(self, message: Message) -> Segment:
        """The segment serving a message: entered at the sender's ``head_layers`` (heterogeneous heads)."""
        start = message.meta.get("head_layers")
        if start is None or int(start) == self.body.start:
            return self.body
        start = int(start)
        if start not in self._views:
            self._views[start] = self.body.starting_at(start)
        return self._views[start]

    def trainer_for(self, client: str) -> _Trainer:
        """The optimizer that trains ``client``'s steps (the shared one unless adapters are per party)."""
        return self.bank.trainer(client) if self.bank is not None else self.trainer

    def forget_gradients(self, client: str) -> None:
        """Drop the gradients a step of ``client`` accumulated (a step that will not be applied)."""
        self._due.discard(client)
        if self.bank is None:
            self.trainer.zero_grad()
        elif client in self.bank.parties:
            self.bank.parties[client][1].zero_grad()

    def handle(self, message: Message) -> Message | None:
        """Answer one message from a data party (the only entry point a transport calls)."""
        if self.bank is not None and message.kind != "fedavg":
            self.bank.activate(str(message.meta.get("client", "")))
        if message.kind in GEN_KINDS:
            return self.inference.handle(message)
        if message.kind == "forward":
            return self._forward(message)
        if message.kind == "backward":
            return self._backward(message)
        if message.kind == "fedavg":
            return self._fedavg(message)
        raise ProtocolError(
            f"unknown message kind {message.kind!r}; expected 'forward', 'backward' or one of {GEN_KINDS}"
        )

    def _fedavg(self, message: Message) -> Message:
        """Aggregate data-party adapters (SplitLoRA); blocks until the round's parties all sent theirs."""
        meta = message.meta
        try:
            round_id, parties, samples = (
                int(meta["round"] or 0),
                int(meta["parties"] or 0),
                float(meta["samples"] or 0),
            )
        except (KeyError, TypeError, ValueError):
            raise ProtocolError("a fedavg message carries meta round, parties and samples") from None
        if parties < 1 or samples <= 0:
            raise ProtocolError(f"fedavg needs parties >= 1 and samples > 0; got {parties}, {samples}")
        client = str(meta.get("client", ""))
        stage = str(meta.get("stage") or "update")
        reply = self.averaging.handle(client, round_id, parties, stage, averaging_payload(message))
        return Message(
            "fedavg_result",
            dict(reply.tensors),
            {"round": round_id, "payload_kind": reply.kind, "payload_meta": json.dumps(reply.meta)},
        )

    def _wants_grad(self, message: Message) -> bool:
        """Whether the sender trains its head (SplitLoRA) or runs it forward-only (SplitFrozen)."""
        return bool(message.meta.get("need_input_grad", self.head_trainable))

    def _key(self, message: Message) -> tuple[str, int]:
        return (str(message.meta.get("client", "")), int(message.meta.get("batch_id", 0) or 0))

    def _forward(self, message: Message) -> Message:
        _require(message, "hidden", "attention_mask")
        train = bool(message.meta.get("train", False))
        hidden = message.tensors["hidden"]
        mask = message.tensors["attention_mask"]
        body = self.body_for(message)
        if not train:
            body.eval()
            with torch.no_grad():
                out = body(hidden=hidden, attention_mask=mask)
            return Message("forward_result", {"logits" if body.has_finish else "hidden": out}, {})
        body.train()
        inputs = hidden.requires_grad_(self._wants_grad(message))
        out = body(hidden=inputs, attention_mask=mask)
        if "labels" in message.tensors:
            return self._loss_and_backward(message, inputs, out)
        self._pending[self._key(message)] = _Pending(inputs, out)
        kind = "logits" if body.has_finish else "hidden"
        return Message("forward_result", {kind: out.detach()}, {"batch_id": message.meta.get("batch_id")})

    def _loss_and_backward(self, message: Message, inputs: torch.Tensor, logits: torch.Tensor) -> Message:
        if self.loss_fn is None or not self.body.has_finish:
            raise ProtocolError("labels were sent to a model party that does not compute the loss")
        batch = {k: v for k, v in message.tensors.items() if k != "hidden"}
        labels = batch.get("labels")
        classes = int(logits.shape[-1])
        per_position = labels is not None and tuple(logits.shape[:-1]) == tuple(labels.shape)
        if (
            per_position
            and labels is not None
            and labels.numel()
            and not bool(((labels == -100) | ((labels >= 0) & (labels < classes))).all())
        ):
            bad = labels[(labels != -100) & ((labels < 0) | (labels >= classes))].unique()[:5].tolist()
            raise ProtocolError(f"labels must be -100 (ignored) or in [0, {classes}); got {bad}")
        loss = self.loss_fn(logits, batch)
        scale = float(message.meta.get("loss_scale", 1.0) or 1.0)
        (loss * scale).backward()
        if message.meta.get("update", True):
            self._apply(str(message.meta.get("client", "")))
        tensors = {"loss": loss.detach().reshape(1)}
        if self._wants_grad(message) and inputs.grad is not None:
            tensors["grad"] = inputs.grad
        return Message("forward_result", tensors, {"batch_id": message.meta.get("batch_id")})

    def _backward(self, message: Message) -> Message | None:
        _require(message, "grad")
        key = self._key(message)
        pending = self._pending.pop(key, None)
        if pending is None:
            raise ProtocolError(
                f"backward for unknown batch {key[1]} (client {key[0]!r}): no forward pending"
            )
        grad = message.tensors["grad"]
        if grad.shape != pending.outputs.shape:
            raise ProtocolError(
                f"gradient shape {tuple(grad.shape)} does not match the forward output {tuple(pending.outputs.shape)}"
            )
        pending.outputs.backward(grad.to(pending.outputs.dtype))
        if message.meta.get("update", True):
            self._apply(key[0])
        if not pending.inputs.requires_grad:
            return None
        assert pending.inputs.grad is not None
        return Message(
            "backward_result", {"grad": pending.inputs.grad}, {"batch_id": message.meta.get("batch_id")}
        )

    def _apply(self, client: str) -> None:
        """End ``client``'s step: check its gradients, then update now or at :meth:`commit`."""
        try:
            self.guard.check_gradients(self.trainer_for(client).params)
        except StepRejected:
            self.forget_gradients(client)
            raise
        if self.defer_updates:
            self._due.add(client)
        else:
            self._update(client)

    def commit(self, client: str) -> bool:
        """Apply the update of ``client``'s step that :attr:`defer_updates` left due; whether there was one.

        Raises :class:`StepRejected` (nothing applied) when the update leaves parameters non-finite.
        """
        if client not in self._due:
            return False
        self._due.discard(client)
        self._update(client)
        return True

    def _update(self, client: str) -> None:
        trainer = self.trainer_for(client)
        try:
            trainer.update(self.guard, checked=True, rollback=self.defer_updates)
        except StepRejected:
            trainer.zero_grad()
            raise
        self.updates += 1
        self.client_steps[client] = self.client_steps.get(client, 0) + 1

    def pending_count(self, client: str) -> int:
        """Training forwards of ``client`` waiting for their backward."""
        return sum(1 for key in self._pending if key[0] == client)

    def drop_pending(self, client: str) -> int:
        """Forget the forward passes a data party left unfinished; returns how many."""
        keys = [k for k in self._pending if k[0] == client]
        for key in keys:
            del self._pending[key]
        return len(keys)

    def state_dict(self) -> dict[str, Any]:
        """Optimizer/scheduler state and the update count (for checkpoints)."""
        state: dict[str, Any] = {
            "trainer": self.trainer.state_dict(),
            "updates": self.updates,
            "client_steps": dict(self.client_steps),
        }
        if self.bank is not None:
            state["per_party"] = self.bank.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.trainer.load_state_dict(state.get("trainer", {}))
        self.updates = int(state.get("updates", 0))
        self.client_steps = {str(k): int(v) for k, v in state.get("client_steps", {}).items()}
        if self.bank is not None:
            self.bank.load_state_dict(state.get("per_party", {}))


@dataclass
class StepResult:
    """What one training micro-batch produced."""

    loss: float
    batch_size: int
    bytes_to_model: int = 0
    bytes_to_data: int = 0


@dataclass
class MicroBatch:
    """One micro-batch of a training stream: the batch, whether it ends an optimizer step, its loss scale."""

    batch: Mapping[str, torch.Tensor]
    update: bool = True
    loss_scale: float = 1.0
    #: The examples' indices in the training set (lets a frozen head reuse its outputs).
    ids: Sequence[int] | None = None
    #: The batch as collated before a text defense rewrote it (only for the ground truth; never sent).
    original: Mapping[str, torch.Tensor] | None = None


@dataclass
class _InFlight:
    """A micro-batch between its forward message and its last reply."""

    micro: MicroBatch
    batch_id: int
    stage: Literal["forward", "backward"] = "forward"
    hidden: torch.Tensor | None = None
    #: The front's auxiliary loss for this micro-batch (joins the head's backward pass).
    aux_loss: torch.Tensor | None = None
    ticket: int = 0
    loss: float = 0.0
    tokens: int = 0
    bytes_to_model: int = 0
    bytes_to_data: int = 0
    result: StepResult | None = None


#: ``(batch_id, phase, batch, ids)``: what a data party tells its ground-truth observer per batch.
BatchObserver = Callable[
    [int, str, Mapping[str, torch.Tensor], Sequence[int] | None, Mapping[str, torch.Tensor] | None], None
]


class DataParty:
    """The party that owns the raw data, the labels and the first (and, in HBT, last) layers.

    Parameters
    ----------
    head : Segment
        Embeddings + first blocks.
    channel : Channel
        Its only way to the model party.
    loss_fn : LossFn
        ``loss_fn(logits, batch)``; used here unless ``labels_at == "model"``.
    optim : OptimSpec
    tail : Segment | None, default None
        HBT: last blocks + final norm + task head.
    labels_at : {"data", "model"}, default "data"
        HT only: ``"model"`` sends the labels and lets the model party compute the loss
        (SplitLoRA / SplitFrozen style: no logits cross).
    client_id : str, default ""
        Names this data party in messages (the model party may serve several).
    cache_head : bool, default False
        A frozen head (SplitFrozen) computes each training example's output once and reuses it
        in later epochs, running in eval mode (no dropout) so that the output is the same every
        time. Micro-batches must carry their examples' ``ids``; batches must be right-padded.
        Costs the memory of one hidden state per training token.
    ground_truth : BatchObserver | None, default None
        Called as ``ground_truth(batch_id, phase, batch, ids, original)`` for every training
        micro-batch (``"train"``) and evaluation batch (``"eval"``) before it leaves (``original``:
        the batch before text defenses, or ``None``): the data party's private record of what
        each batch id held, for scoring attacks (e.g.
        :class:`~splitfed.privacy.recording.GroundTruthWriter`). Nothing it sees crosses.
    """

    def __init__(
        self,
        head: Segment,
        channel: Channel,
        loss_fn: LossFn,
        optim: OptimSpec,
        tail: Segment | None = None,
        labels_at: LabelsAt = "data",
        client_id: str = "",
        cache_head: bool = False,
        ground_truth: BatchObserver | None = None,
        front: DataFront | None = None,
    ) -> None:
        if labels_at not in ("data", "model"):
            raise ValueError(f"labels_at must be 'data' or 'model', got {labels_at!r}")
        if tail is not None and labels_at == "model":
            raise ValueError(
                "labels_at: model is an HT option; in HBT the data party's tail computes the loss"
            )
        self.head, self.tail, self.channel = head, tail, channel
        self.loss_fn = loss_fn
        self.labels_at = labels_at
        self.client_id = client_id
        self._averaging: AveragingClient | None = None
        self.front = front if front is not None else DataFront()
        self.front.attach(head, tail)
        segments = {"head": head} | ({"tail": tail} if tail is not None else {})
        self.trainer = _Trainer(_params(segments) + self.front.trainable_parameters(), optim)
        self.head_trainable = head.is_trainable
        #: A gradient must come back for what this party sent: its head trains, or a defense
        #: whose parameters shape what it sends (one that trains only on what comes back needs none).
        self.needs_input_grad = self.head_trainable or self.front.trains_before_crossing
        if cache_head and self.head_trainable:
            raise ValueError("cache_head needs a frozen head (its outputs change while it trains)")
        if cache_head and self.front.touches_embeddings:
            raise ValueError(
                "cache_head reuses head outputs, but a defense perturbs the embeddings the head runs on; "
                "turn train.cache_head_outputs off"
            )
        self._head_cache: dict[int, torch.Tensor] | None = {} if cache_head else None
        self.ground_truth = ground_truth
        #: Real (unpadded) tokens the head processed in training: its device-side work, measured.
        self.head_tokens = {"forward": 0, "backward": 0}
        self._batch_id = 0
        self.updates = 0
        #: Seconds spent waiting on the model party (its compute plus transfer) during training.
        self.wait_s = 0.0

    def _meta(self, batch_id: int | None = None, **extra: Any) -> dict[str, Any]:
        # head_layers lets one model party serve data parties with heads of different depths.
        return {
            "client": self.client_id,
            "batch_id": self._batch_id if batch_id is None else batch_id,
            "head_layers": self.head.end,
            "need_input_grad": self.needs_input_grad,
            **extra,
        }

    def _run_head(
        self,
        batch: Mapping[str, torch.Tensor],
        train: bool,
        ids: Sequence[int] | None = None,
        tokens: int = 0,
    ) -> torch.Tensor:
        """The head's output; in training ``tokens`` (real tokens of the batch) count as its work."""
        kwargs = {k: batch[k] for k in INPUT_KEYS if k in batch}
        if train and self._head_cache is not None and ids is not None:
            cached = self._cached_head(batch, ids)
            if cached is not None:
                return cached
        self.head.train(train and self._head_cache is None)
        if train:
            self.head_tokens["forward"] += tokens
        context = FrontContext(
            "train" if train else "eval",
            self.updates,
            self._batch_id,
            batch["attention_mask"],
            input_ids=batch.get("input_ids"),
        )
        # A defense that trains before the crossing and perturbs the embeddings needs the graph
        # through a frozen head too.
        if train and (
            self.head_trainable or (self.front.trains_before_crossing and self.front.touches_embeddings)
        ):
            return self.front.run_head(self.head, context, **kwargs)
        # SplitFrozen: the head runs forward-only, keeping no graph.
        with torch.no_grad():
            return self.front.run_head(self.head, context, **kwargs)

    def _cached_head(self, batch: Mapping[str, torch.Tensor], ids: Sequence[int]) -> torch.Tensor | None:
        """The frozen head's output from the cache, computing only the examples not seen yet.

        ``None`` when the batch does not fit the cache (rows are not one per example, or not
        right-padded); the caller computes it as usual.
        """
        assert self._head_cache is not None
        mask = batch["attention_mask"]
        if mask.dim() != 2 or mask.shape[0] != len(ids):
            return None
        lengths = mask.sum(1)
        positions = torch.arange(mask.shape[1])
        if not bool((mask == (positions[None, :] < lengths[:, None])).all()):
            return None
        missing = [i for i, example in enumerate(ids) if example not in self._head_cache]
        if missing:
            width = int(lengths[missing].max())
            sub = {k: batch[k][missing, :width] for k in INPUT_KEYS if k in batch}
            self.head.eval()
            with torch.no_grad():
                out = self.head(**sub)
            self.head_tokens["forward"] += int(lengths[missing].sum())
            for row, i in enumerate(missing):
                self._head_cache[ids[i]] = out[row, : int(lengths[i])].clone()
        first = self._head_cache[ids[0]]
        hidden = torch.zeros(mask.shape[0], mask.shape[1], first.shape[-1], dtype=first.dtype)
        for i, example in enumerate(ids):
            hidden[i, : int(lengths[i])] = self._head_cache[example]
        return hidden

    @property
    def can_stream(self) -> bool:
        """Whether micro-batches may run ahead across optimizer updates (the forward-only schedule).

        True for SplitFrozen with labels at the model party: the head is frozen and nothing
        trains here, so the activations of later steps do not depend on earlier replies, and the
        model party applies the micro-batches in the order they were sent.
        """
        return not self.needs_input_grad and self.tail is None and self.labels_at == "model"

    def train_step(
        self, batch: Mapping[str, torch.Tensor], update: bool = True, loss_scale: float = 1.0
    ) -> StepResult:
        """One micro-batch across the split: forward, loss, one backward per segment.

        ``update=False`` accumulates gradients (both parties step on the next ``update=True``);
        ``loss_scale`` scales the gradients (``1/accumulation_steps``).
        """
        return next(iter(self.train_stream([MicroBatch(batch, update, loss_scale)])))

    def train_stream(
        self, micro_batches: Iterable[MicroBatch], window: int = 1, across_updates: bool = False
    ) -> Generator[StepResult, None, None]:
        """Train on ``micro_batches`` with up to ``window`` of them in flight; yields results in order.

        ``window=1`` is the sequential schedule. With a larger window the data party sends the
        next micro-batches' activations while the model party works on earlier ones (pipelined
        schedule); all micro-batches of one optimizer step use the same weights, so the result
        equals the sequential schedule (up to the order dropout masks are drawn in). A micro-batch
        with ``update=True`` is a barrier: nothing after it starts before its update is applied,
        unless ``across_updates`` is set, which only a party that :attr:`can_stream` accepts
        (SplitFrozen's forward-only schedule).
        """
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if across_updates and not self.can_stream:
            raise ValueError(
                "the forward-only schedule needs a frozen data-party head, no tail and labels at the model "
                "party (SplitFrozen, HT, split.labels_at: model); use the pipelined schedule"
            )
        source = iter(micro_batches)
        flight: deque[_InFlight] = deque()
        barrier = exhausted = False
        while True:
            while not exhausted and not barrier and len(flight) < window:
                micro = next(source, None)
                if micro is None:
                    exhausted = True
                    break
                flight.append(self._start(micro))
                barrier = micro.update and not across_updates
            if not flight:
                return
            item = flight[0]
            self._advance(item)
            if item.result is None:
                continue
            flight.popleft()
            if item.micro.update:
                self.front.before_update(FrontContext("train", self.updates, item.batch_id))
                self.trainer.update()
                self.updates += 1
                self.front.update(FrontContext("train", self.updates, item.batch_id))
                barrier = False
            yield item.result

    def _start(self, micro: MicroBatch) -> _InFlight:
        self._batch_id += 1
        item = _InFlight(micro, self._batch_id)
        batch = micro.batch
        if self.ground_truth is not None:
            self.ground_truth(item.batch_id, "train", batch, micro.ids, micro.original)
        item.tokens = int(batch["attention_mask"].sum())
        self.front.train(True)
        hidden = self._run_head(batch, train=True, ids=micro.ids, tokens=item.tokens)
        # The front's graph joins the head's: one backward pass through both (and the aux loss).
        context = FrontContext(
            "train",
            self.updates,
            item.batch_id,
            batch["attention_mask"],
            micro.loss_scale,
            input_ids=batch.get("input_ids"),
        )
        item.hidden, item.aux_loss = self.front.activations(hidden, context)
        tensors = {"hidden": item.hidden, "attention_mask": batch["attention_mask"]}
        if self.labels_at == "model":
            tensors |= {k: batch[k] for k in LABEL_KEYS if k in batch}
            meta = self._meta(item.batch_id, train=True, update=micro.update, loss_scale=micro.loss_scale)
        else:
            meta = self._meta(item.batch_id, train=True)
        item.ticket = self._submit(item, Message("forward", tensors, meta))
        return item

    def _advance(self, item: _InFlight) -> None:
        """Take ``item`` one stage further: wait for its next reply and act on it."""
        reply = self._collect(item)
        if item.stage == "backward":
            _require(reply, "grad")
            self._head_backward(item, reply.tensors["grad"])
            self._finish(item, item.loss)
            return
        micro, batch = item.micro, item.micro.batch
        if self.labels_at == "model":
            _require(reply, "loss")
            self._head_backward(item, reply.tensors.get("grad"))
            self._finish(item, float(reply.tensors["loss"].item()))
            return
        mask = batch["attention_mask"]
        name = "hidden" if self.tail is not None else "logits"
        _require(reply, name)
        received = reply.tensors[name].requires_grad_(True)
        context = FrontContext(
            "train",
            self.updates,
            item.batch_id,
            mask,
            micro.loss_scale,
            input_ids=batch.get("input_ids"),
            owns_gradient=True,  # ``received.grad`` below is handed to the hooks and read by nothing else
        )
        used, aux = self.front.received(name, received, context)
        if self.tail is not None:
            self.tail.train()
            logits = self.tail(hidden=used, attention_mask=mask)
        else:
            logits = used
        loss = self.loss_fn(logits, batch)
        total = loss if aux is None else loss + aux
        (total * micro.loss_scale).backward()
        item.loss = float(loss.detach().item())
        assert received.grad is not None
        grad = self.front.gradients(received.grad, context)
        message = Message("backward", {"grad": grad}, self._meta(item.batch_id, update=micro.update))
        if self.needs_input_grad:
            item.stage = "backward"
            item.ticket = self._submit(item, message)
        else:
            with self._waiting(item):
                self.channel.send(message)
            self._finish(item, item.loss)

    def _submit(self, item: _InFlight, message: Message) -> int:
        with self._waiting(item):
            return self.channel.submit(message)

    def _collect(self, item: _InFlight) -> Message:
        with self._waiting(item):
            return self.channel.result(item.ticket)

    @contextmanager
    def _waiting(self, item: _InFlight | None = None) -> Iterator[None]:
        """Time a channel call as waiting on the model party, and charge its bytes to ``item``.

        Sending counts too: it is transport work, and in process the model party answers there.
        """
        to_model, to_data = self.channel.bytes_to_model, self.channel.bytes_to_data
        start = time.perf_counter()
        try:
            yield
        finally:
            self.wait_s += time.perf_counter() - start
            if item is not None:
                item.bytes_to_model += self.channel.bytes_to_model - to_model
                item.bytes_to_data += self.channel.bytes_to_data - to_data

    @staticmethod
    def _finish(item: _InFlight, loss: float) -> None:
        item.result = StepResult(
            loss=loss,
            batch_size=int(item.micro.batch["attention_mask"].shape[0]),
            bytes_to_model=item.bytes_to_model,
            bytes_to_data=item.bytes_to_data,
        )

    def average_adapters(
        self, round_id: int, parties: int, samples: int, *, aggregation: str = "plain", dealer: bool = False
    ) -> int:
        """Federated-average this party's trainable head/tail parameters with the other data parties'.

        Sends them with the party's sample count through the run's ``aggregation`` (``plain``,
        ``ckks``: encrypted, the keys dealt by the party with ``dealer``; ``secagg``: masked), waits
        for the average of the round and loads it. Returns how many tensors were averaged.
        """
        params = self.head.named_model_parameters(trainable_only=True)
        if self.tail is not None:
            params |= self.tail.named_model_parameters(trainable_only=True)
        if not params:
            return 0
        if (
            self._averaging is None
            or self._averaging.aggregator.name != averaging_aggregator(aggregation).name
        ):
            self._averaging = AveragingClient(averaging_aggregator(aggregation), dealer=dealer)
        averaging = self._averaging
        with self._waiting():
            average = averaging.average(
                self.channel.request,
                self.client_id,
                round_id,
                parties,
                {n: p.detach() for n, p in params.items()},
                float(samples),
            )
        unknown = set(average) - set(params)
        if unknown:
            raise ProtocolError(
                f"the averaged adapters hold parameters this party does not have: {sorted(unknown)[:3]}"
            )
        with torch.no_grad():
            for name, tensor in average.items():
                params[name].copy_(tensor)
        return len(average)

    def _head_backward(self, item: _InFlight, grad: torch.Tensor | None) -> None:
        """One backward pass through the front and the head: the returned gradient and the front's aux loss."""
        if not self.needs_input_grad:
            return
        sent = item.hidden
        assert sent is not None
        if grad is None:
            raise ProtocolError(
                "the model party sent no gradient for what this party sent (its head or a defense "
                "before the crossing trains)"
            )
        if grad.shape != sent.shape:
            raise ProtocolError(f"gradient shape {tuple(grad.shape)} != what was sent {tuple(sent.shape)}")
        outputs, grads = [sent], [grad.to(sent.dtype)]
        if item.aux_loss is not None and item.aux_loss.requires_grad:
            outputs.append(item.aux_loss * item.micro.loss_scale)
            grads.append(torch.ones_like(item.aux_loss))
        if sent.requires_grad:
            torch.autograd.backward(outputs, grads)
        if self.head_trainable:
            self.head_tokens["backward"] += int(item.tokens)

    @torch.no_grad()
    def predict(
        self,
        batch: Mapping[str, torch.Tensor],
        ids: Sequence[int] | None = None,
        original: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Logits for a batch across the split (evaluation; nothing is trained, no labels cross).

        ``ids`` (the examples' indices in the evaluated split) and ``original`` (the batch before
        text defenses) only reach the ground-truth observer.
        """
        self._batch_id += 1
        if self.ground_truth is not None:
            self.ground_truth(self._batch_id, "eval", batch, ids, original)
        mask = batch["attention_mask"]
        self.front.train(False)
        context = FrontContext("eval", self.updates, self._batch_id, mask, input_ids=batch.get("input_ids"))
        hidden, _ = self.front.activations(self._run_head(batch, train=False), context)
        reply = self.channel.request(
            Message("forward", {"hidden": hidden, "attention_mask": mask}, self._meta(train=False))
        )
        name = "hidden" if self.tail is not None else "logits"
        _require(reply, name)
        used, _ = self.front.received(name, reply.tensors[name], context)
        if self.tail is None:
            return used
        self.tail.eval()
        return self.tail(hidden=used, attention_mask=mask)  # type: ignore[no-any-return]

    def state_dict(self) -> dict[str, Any]:
        """Optimizer/scheduler state, counters and the defenses' state (for checkpoints)."""
        state = {"trainer": self.trainer.state_dict(), "updates": self.updates, "batch_id": self._batch_id}
        front = self.front.checkpoint_state()
        return state | ({"front": front} if front else {})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.trainer.load_state_dict(state.get("trainer", {}))
        self.updates = int(state.get("updates", 0))
        self._batch_id = int(state.get("batch_id", 0))
        self.front.load_checkpoint_state(state.get("front", {}))
