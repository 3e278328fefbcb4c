"""The channel between a data party and a model party.

Every crossing of the split goes through one :class:`Channel`: the data party sends a
:class:`Message` (one-way with :meth:`Channel.send`, or waiting for the model party's reply
with :meth:`Channel.request`). A channel can

* record every crossing (:class:`CrossingRecorder`), which is what attacks read, and
* wrap any crossing with a :class:`ChannelTransform`, which is where defenses plug in.

Parties know nothing about transport; a transport knows nothing about models. The in-process
channel here hands messages straight to a handler; the network runtime implements the same
interface over gRPC.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

Direction = Literal["to_model", "to_data"]
MetaValue = int | float | str | bool | None


@dataclass
class Message:
    """What crosses the split: a kind, named tensors, and small scalar metadata.

    Parameters
    ----------
    kind : str
        What the message is, e.g. ``"forward"``, ``"forward_result"``, ``"backward"``.
    tensors : dict[str, torch.Tensor]
        Named tensors. Only tensors cross: no tokens (unless a caller puts them here, which
        tests forbid), no pickled objects.
    meta : dict[str, int | float | str | bool | None]
        Scalars such as the step number or whether to apply an optimizer update.
    """

    kind: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, MetaValue] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Raw bytes of the tensor payload (what a wire format must carry at least)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass
class Crossing:
    """One recorded crossing of the split."""

    index: int
    direction: Direction
    kind: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, MetaValue]
    nbytes: int


class CrossingRecorder:
    """Keeps every crossing a channel carries, or just its size.

    Parameters
    ----------
    keep_tensors : bool, default True
        Keep (detached, CPU) copies of the tensors. Attacks need them; byte accounting does not.
    kinds : Iterable[str] | None, default None
        Record only these message kinds; ``None`` records all.
    """

    def __init__(self, keep_tensors: bool = True, kinds: Iterable[str] | None = None) -> None:
        self.keep_tensors = keep_tensors
        self.kinds = set(kinds) if kinds is not None else None
        self.crossings: list[Crossing] = []

    def __call__(self, direction: Direction, message: Message) -> None:
        if self.kinds is not None and message.kind not in self.kinds:
            return
        tensors = (
            {k: v.detach().to("cpu", copy=True) for k, v in message.tensors.items()}
            if self.keep_tensors
            else {}
        )
        self.crossings.append(
            Crossing(
                len(self.crossings), direction, message.kind, tensors, dict(message.meta), message.nbytes
            )
        )

    def clear(self) -> None:
        """Forget every recorded crossing."""
        self.crossings.clear()

    def of_kind(self, kind: str) -> list[Crossing]:
        """The recorded crossings of one message kind, in order."""
        return [c for c in self.crossings if c.kind == kind]


class ChannelTransform(Protocol):
    """A function applied to a message as it crosses (defenses, compression, tests).

    It receives the direction and the message and returns the message to deliver. It must not
    modify the tensors in place: the sender may still need them.
    """

    def __call__(self, direction: Direction, message: Message) -> Message: ...


@dataclass(frozen=True)
class TransformContext:
    """Where a crossing is: what a context-aware :class:`TransformRule` receives with each tensor.

    Parameters
    ----------
    direction : {"to_model", "to_data"}
    kind : str
    phase : {"train", "eval", "generate", "control"}
        From the protocol (a ``forward`` is ``train`` or ``eval`` by its ``train`` flag).
    batch_id : int | None
        The data party's micro-batch number, where the message carries one.
    attention_mask : torch.Tensor | None
        The message's mask, where it carries one.
    """

    direction: Direction
    kind: str
    phase: str
    batch_id: int | None = None
    attention_mask: torch.Tensor | None = None

    @classmethod
    def of(cls, direction: Direction, message: Message) -> TransformContext:
        """The context of ``message`` crossing in ``direction``."""
        from splitfed.protocol import phase_of

        batch_id = message.meta.get("batch_id")
        return cls(
            direction,
            message.kind,
            phase_of(message.kind, message.meta),
            batch_id if isinstance(batch_id, int) and not isinstance(batch_id, bool) else None,
            message.tensors.get("attention_mask"),
        )


@dataclass
class TransformRule:
    """Apply ``transform`` to messages of the given kinds and tensor names: stateless per-tensor work.

    Defenses with state, parameters or an auxiliary loss belong in the data party's front
    (:mod:`splitfed.split.front`), which also reaches text and embeddings.

    Parameters
    ----------
    transform : Callable
        Maps one tensor to the tensor that crosses instead: ``transform(tensor)``, or with
        ``with_context`` ``transform(tensor, context)`` (a :class:`TransformContext`).
    kinds : Sequence[str]
        Message kinds it applies to, e.g. ``("forward",)`` for activations sent to the model party.
    tensor_names : Sequence[str] | None, default None
        Which tensors of those messages; ``None`` means all floating-point tensors.
    phases : Sequence[str] | None, default None
        Only messages of these phases (``train``, ``eval``, ``generate``); ``None``: all.
    with_context : bool, default False
    """

    transform: Callable[..., torch.Tensor]
    kinds: Sequence[str]
    tensor_names: Sequence[str] | None = None
    phases: Sequence[str] | None = None
    with_context: bool = False

    def __call__(self, direction: Direction, message: Message) -> Message:
        if message.kind not in self.kinds:
            return message
        context = TransformContext.of(direction, message) if self.with_context or self.phases else None
        if self.phases is not None and context is not None and context.phase not in self.phases:
            return message
        out = dict(message.tensors)
        for name, tensor in message.tensors.items():
            wanted = (
                name in self.tensor_names if self.tensor_names is not None else tensor.is_floating_point()
            )
            if wanted:
                out[name] = self.transform(tensor, context) if self.with_context else self.transform(tensor)
        return Message(message.kind, out, dict(message.meta))


Handler = Callable[[Message], Message | None]


class Channel:
    """Base class of every transport: transforms, recording and byte accounting live here once.

    Subclasses implement :meth:`_post`, which carries a message to the model party and returns a
    ticket for its reply, and :meth:`_collect`, which waits for the reply of a ticket.

    Parameters
    ----------
    transforms : Sequence[ChannelTransform], default ()
        Applied in order to every message in both directions (each decides what it touches).
    recorder : CrossingRecorder | None, default None
        Receives every message after the transforms, i.e. exactly what crossed.
    """

    def __init__(
        self, transforms: Sequence[ChannelTransform] = (), recorder: CrossingRecorder | None = None
    ) -> None:
        self.transforms = list(transforms)
        self.recorder = recorder
        #: Bytes that crossed: on a network, what the transport sent; in process, the raw payload.
        self.bytes_to_model = 0
        self.bytes_to_data = 0
        #: Raw tensor bytes (before any compression) of what crossed.
        self.payload_to_model = 0
        self.payload_to_data = 0
        self.messages = 0

    #: Whether :attr:`bytes_to_model` / :attr:`bytes_to_data` are the raw payload (no wire format).
    counts_payload_as_wire = True

    def _cross(self, direction: Direction, message: Message) -> Message:
        for transform in self.transforms:
            message = transform(direction, message)
        if direction == "to_model":
            self.payload_to_model += message.nbytes
            if self.counts_payload_as_wire:
                self.bytes_to_model += message.nbytes
        else:
            self.payload_to_data += message.nbytes
            if self.counts_payload_as_wire:
                self.bytes_to_data += message.nbytes
        self.messages += 1
        if self.recorder is not None:
            self.recorder(direction, message)
        return message

    def request(self, message: Message) -> Message:
        """Send ``message`` to the model party and return its reply."""
        return self.result(self.submit(message))

    def submit(self, message: Message) -> int:
        """Send ``message`` and return a ticket for its reply, without waiting (pipelined schedules).

        The model party answers a data party's messages in the order they were sent; collect each
        reply with :meth:`result`. Several messages may be in flight at once.
        """
        ticket = self._post(self._cross("to_model", message), expect_reply=True)
        assert ticket is not None
        return ticket

    def result(self, ticket: int) -> Message:
        """The reply to the message :meth:`submit` returned ``ticket`` for (waits for it)."""
        reply = self._collect(ticket)
        if reply is None:
            raise RuntimeError(f"model party sent no reply to message {ticket}")
        return self._cross("to_data", reply)

    def send(self, message: Message) -> None:
        """Send ``message`` to the model party without waiting for a reply."""
        self._post(self._cross("to_model", message), expect_reply=False)

    def reset_counters(self) -> None:
        """Zero the byte and message counters."""
        self.bytes_to_model = self.bytes_to_data = self.messages = 0
        self.payload_to_model = self.payload_to_data = 0

    def _post(self, message: Message, expect_reply: bool) -> int | None:
        """Carry ``message`` to the model party; a ticket for its reply when ``expect_reply``."""
        raise NotImplementedError

    def _collect(self, ticket: int) -> Message | None:
        """The reply for ``ticket`` (blocks until it arrives)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release transport resources (nothing for the in-process channel)."""


class InProcessChannel(Channel):
    """Delivers messages to a handler in the same process.

    Tensors are detached on the way (the autograd graph never spans the cut, exactly as over a
    network) but not copied, so the simulator costs no extra memory traffic.

    Parameters
    ----------
    handler : Callable[[Message], Message | None]
        Usually :meth:`splitfed.split.ModelParty.handle`.
    transforms, recorder
        See :class:`Channel`.
    """

    def __init__(
        self,
        handler: Handler,
        transforms: Sequence[ChannelTransform] = (),
        recorder: CrossingRecorder | None = None,
    ) -> None:
        super().__init__(transforms, recorder)
        self.handler = handler
        self._replies: dict[int, Message | None] = {}
        self._next_ticket = 0

    def _cross(self, direction: Direction, message: Message) -> Message:
        detached = Message(message.kind, {k: v.detach() for k, v in message.tensors.items()}, message.meta)
        return super()._cross(direction, detached)

    def _post(self, message: Message, expect_reply: bool) -> int | None:
        # The handler runs now: in one process a pipelined schedule degenerates to the sequential
        # order of work, which is what makes it a reference for the network runs.
        reply = self.handler(message)
        if not expect_reply:
            if reply is not None:
                self._cross("to_data", reply)
            return None
        self._next_ticket += 1
        self._replies[self._next_ticket] = reply
        return self._next_ticket

    def _collect(self, ticket: int) -> Message | None:
        try:
            return self._replies.pop(ticket)
        except KeyError:
            raise RuntimeError(f"no reply is pending for ticket {ticket}") from None
