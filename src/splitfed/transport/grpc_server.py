"""The model party as a gRPC server: one bidirectional stream per data party.

The server owns no training logic and knows no models: it authenticates a data party, negotiates
limits and codecs in a ``hello`` exchange, validates every message against the protocol
(:mod:`splitfed.protocol`) and the session, and hands it to the model party's ``handle``. A bad
message gets an error reply with a code and an explanation; the server keeps serving everyone else.

Consistency: a data party's training step (from its first training ``forward`` to the message that
applies the optimizer update) holds the model party's step lock, so shared adapters see each step
applied whole; evaluation and generation of other parties do not wait for it. A data party that
errors, disconnects, reconnects or stalls mid-step (``step_timeout_s``) has its pending work and
partial gradients dropped and the lock released; an update that is not finite or too large is
refused whole, and a party refused ``max_strikes`` times is disconnected.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from splitfed.protocol import (
    PARTY_KINDS,
    PROTOCOL_VERSION,
    Direction,
    ErrorCode,
    ProtocolError,
    check_hidden,
    check_mask,
    check_meta,
    check_tensor_names,
    finishes_step,
    in_step,
)
from splitfed.transport.channel import Message
from splitfed.transport.codec import Limits
from splitfed.transport.proto import splitfed_pb2 as pb
from splitfed.transport.wire import (
    RawFrame,
    Reassembler,
    WireCodecs,
    WireError,
    WireLimits,
    frames_of,
    from_envelope,
    parse_frame,
    serialize_frame,
)

log = logging.getLogger(__name__)
METHOD = "/splitfed.v1.SplitService/Session"


class SessionError(ProtocolError):
    """A message that does not fit the negotiated session."""


class StepHost(Protocol):
    """What the server needs of the model party it hosts (:class:`splitfed.split.parties.ModelParty`)."""

    updates: int
    client_steps: dict[str, int]
    defer_updates: bool

    def handle(self, message: Message) -> Message | None: ...

    def commit(self, client: str) -> bool: ...

    def drop_pending(self, client: str) -> int: ...

    def pending_count(self, client: str) -> int: ...

    def forget_gradients(self, client: str) -> None: ...


@dataclass(frozen=True)
class ServerLimits:
    """What the model party accepts from each data party, and how long it waits for one.

    Parameters
    ----------
    max_batch : int, default 64
    max_seq : int, default 4096
    max_sessions : int, default 16
        Concurrent data parties.
    idle_timeout_s : float, default 600
        A session that sends nothing for this long is closed.
    step_timeout_s : float, default 30
        A training step (first training forward to its update) whose data party sends nothing for
        this long is dropped whole, so that the other parties' steps go on.
    step_lock_timeout_s : float, default 120
        How long a data party waits for another's step to finish before getting a ``busy`` error.
    max_message_bytes : int, default 512 MiB
    max_abs_value : float, default 1e6
        Largest magnitude accepted in a floating tensor (finite but huge values would poison an update).
    max_step_grad_norm : float | None, default 1e4
        Largest gradient norm of one data party's step on the model party's adapters; a larger
        step is refused whole (the optimizer's own clipping bounds the rest).
    max_strikes : int, default 3
        A data party whose steps are refused this many times is disconnected (counted per data
        party, across its sessions).
    max_pending : int, default 64
        Training forwards one data party may have waiting for their backward.

    The model party's own :class:`~splitfed.split.parties.StepGuard` enforces
    ``max_step_grad_norm`` (:func:`splitfed.runtime.start_server` sets it from these limits).
    """

    max_batch: int = 64
    max_seq: int = 4096
    max_sessions: int = 16
    idle_timeout_s: float = 600.0
    step_timeout_s: float = 30.0
    step_lock_timeout_s: float = 120.0
    max_message_bytes: int = 512 * 2**20
    max_abs_value: float = 1e6
    max_step_grad_norm: float | None = 1e4
    max_strikes: int = 3
    max_pending: int = 64

    def __post_init__(self) -> None:
        for name in (
            "max_batch",
            "max_seq",
            "max_sessions",
            "max_message_bytes",
            "max_strikes",
            "max_pending",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"ServerLimits.{name} must be >= 1; got {getattr(self, name)}")
        for name in ("idle_timeout_s", "step_timeout_s", "step_lock_timeout_s", "max_abs_value"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 < value < float("inf")):
                raise ValueError(f"ServerLimits.{name} must be a positive finite number; got {value!r}")

    def wire(self, hidden_size: int) -> WireLimits:
        """Wire limits implied by these limits for a model of ``hidden_size``."""
        max_elements = max(self.max_batch * self.max_seq * hidden_size, self.max_batch * self.max_seq * 4)
        return WireLimits(
            self.max_message_bytes,
            Limits(max_elements=max_elements, max_dims=3, max_abs=self.max_abs_value),
            max_tensors=1024,
        )


@dataclass
class _Session:
    client: str
    context: Any
    codecs: WireCodecs = field(default_factory=WireCodecs)
    last_seen: float = field(default_factory=time.monotonic)
    greeted: bool = False
    in_step: bool = False
    #: An update of this session's step is due once its reply is encoded.
    commit_due: bool = False
    #: Why the watchdog dropped this session's step (told at its next training message).
    dropped: str = ""
    strikes: int = 0
    closed_reason: str = ""
    replaced: bool = False
    #: Has started a training step (one training session per named data party).
    trains: bool = False
    opened: float = field(default_factory=time.monotonic)
    busy_s: float = 0.0
    #: Held while one of its messages is handled (the watchdog never drops a step mid-message).
    lock: threading.Lock = field(default_factory=threading.Lock)


class ModelPartyService:
    """Serves one model party to many data parties, none of which can damage it for the others.

    Parameters
    ----------
    model_party : StepHost
        Usually a :class:`splitfed.split.parties.ModelParty`; the service sets its ``defer_updates``.
    hidden_size : int
        The activations' width, checked on every message.
    limits : ServerLimits
    tokens : dict[str, str] | None
        ``{client_id: token}``; when given, a data party must present its token
        (``authorization: Bearer <token>`` metadata) and is known by that client id.
    labels_at : {"data", "model"}
        Whether data parties may send labels.
    on_update : Callable[[int, str], None] | None
        Called with the update count and the data party whose step it was after each applied
        step, still holding the step (the server's checkpoints hook in here, so a checkpoint
        never sees half a step).
    on_resume : Callable[[int], int] | None
        A restarted model party: called once, at the first ``hello``, with the step that data
        party resumes from; loads the matching checkpoint.
    recorder : Callable[[Direction, Message], None] | None
        The attacker's view: every data-party message that passed validation, as decoded (after
        compression and the data party's defenses), with the party's id in its ``client``
        metadata, then the model party's reply to it (direction ``"to_data"``), e.g. a
        :class:`~splitfed.privacy.recording.RecordingWriter`.

    Consistency: a training step holds the step lock from its first message to its update, so
    shared adapters see whole steps; every call into the model party holds the compute lock, so
    evaluation and generation of other parties run between a step's messages without waiting for
    it. A step's reply is encoded before its update is applied; an update whose gradients are not
    finite or too large, or whose result is not finite, is refused whole. A second session of the
    same data party replaces the first (a reconnect).
    """

    def __init__(
        self,
        model_party: StepHost,
        hidden_size: int,
        limits: ServerLimits | None = None,
        tokens: dict[str, str] | None = None,
        labels_at: str = "data",
        on_update: Callable[[int, str], None] | None = None,
        on_resume: Callable[[int], int] | None = None,
        recorder: Callable[[Direction, Message], None] | None = None,
    ) -> None:
        self.model_party = model_party
        self.recorder = recorder
        self._record_lock = threading.Lock()
        model_party.defer_updates = True
        self.on_update = on_update
        self.on_resume = on_resume
        self.hidden_size = hidden_size
        self.limits = limits or ServerLimits()
        self.wire_limits = self.limits.wire(hidden_size)
        self.tokens = tokens
        self.labels_at = labels_at
        self._step_lock = threading.Lock()
        self._compute_lock = threading.Lock()
        self._sessions: dict[int, _Session] = {}
        self._sessions_lock = threading.Lock()
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, daemon=True)
        self._watchdog.start()
        self.errors = 0
        self._strikes: dict[str, int] = {}
        #: What happened to misbehaving parties: (client, event, reason), newest last.
        self.events: list[tuple[str, str, str]] = []

    @property
    def step_lock(self) -> threading.Lock:
        """Held from a training step's first message to its update."""
        return self._step_lock

    @property
    def compute_lock(self) -> threading.Lock:
        """Held around every call into the model party (and while its adapters are saved)."""
        return self._compute_lock

    def _event(self, session: _Session, event: str, reason: str) -> None:
        self.events.append((session.client, event, reason))
        del self.events[:-1000]
        log.warning("data party %r: %s: %s", session.client, event, reason)

    # ------------------------------------------------------------------ session lifecycle
    def _authenticate(self, context: Any) -> str:
        metadata = dict(context.invocation_metadata() or ())
        claimed = str(metadata.get("splitfed-client", ""))
        if self.tokens is None:
            return claimed
        header = str(metadata.get("authorization", ""))
        token = header.removeprefix("Bearer ").strip()
        for client, expected in self.tokens.items():
            if token and hmac.compare_digest(token, expected):
                return client
        context.abort(
            grpc.StatusCode.UNAUTHENTICATED, "invalid or missing token: start the data party with --token"
        )
        raise AssertionError("unreachable")

    def _open(self, context: Any) -> _Session:
        if self._stop.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, "the model party is shutting down; reconnect later")
        client = self._authenticate(context)
        with self._sessions_lock:
            if len(self._sessions) >= self.limits.max_sessions:
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the model party already serves {self.limits.max_sessions} data parties; try again later",
                )
            session = _Session(client, context)
            session.strikes = self._strikes.get(client, 0)
            self._sessions[id(session)] = session
        return session

    def _close(self, session: _Session) -> None:
        if session.closed_reason:
            log.warning("closed the session of data party %r: %s", session.client, session.closed_reason)
        self._abandon_step(session)
        with self._sessions_lock:
            self._sessions.pop(id(session), None)

    def _replace_older(self, session: _Session) -> None:
        """One training session per data party: a newer one (a reconnect) replaces the older, whose step is dropped."""
        with self._sessions_lock:
            older = [
                s
                for s in self._sessions.values()
                if s is not session and s.trains and not s.replaced and s.client == session.client
            ]
        for old in older:
            old.replaced = True
            old.closed_reason = "replaced by a newer session of the same data party"
            self._event(old, "session replaced", "a newer session of the same data party started training")
            self._abandon_step(old)
            old.context.cancel()

    def _watch(self) -> None:
        while not self._stop.wait(0.25):
            now = time.monotonic()
            with self._sessions_lock:
                sessions = list(self._sessions.values())
            for session in sessions:
                silent = now - session.last_seen
                if silent > self.limits.idle_timeout_s:
                    session.closed_reason = f"idle for more than {self.limits.idle_timeout_s:.0f} s"
                    session.context.cancel()
                elif session.in_step and silent > self.limits.step_timeout_s and session.lock.acquire(False):
                    try:  # not while one of its messages is being handled: that is progress
                        if (
                            session.in_step
                            and time.monotonic() - session.last_seen > self.limits.step_timeout_s
                        ):
                            session.dropped = (
                                f"its step made no progress for more than {self.limits.step_timeout_s:g} s"
                            )
                            self._event(session, "step dropped", session.dropped)
                            self._abandon_step(session)
                    finally:
                        session.lock.release()

    def stop(self) -> None:
        """Refuse new sessions and messages and stop the watchdog."""
        self._stop.set()

    def quiesce(self, timeout: float = 60.0) -> bool:
        """Drop every unfinished step and hold the compute lock (saving adapters); release it with :meth:`resume`.

        Returns whether the lock was had within ``timeout`` (a handler stuck longer is not waited for).
        """
        held = self._compute_lock.acquire(timeout=timeout)
        with self._sessions_lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            if session.in_step:
                session.dropped = "the model party is saving its adapters (shutting down)"
                self._drop_step_locked(session)
        return held

    def resume(self) -> None:
        """Release what :meth:`quiesce` acquired."""
        self._compute_lock.release()

    # ------------------------------------------------------------------ steps
    def _begin_step(self, session: _Session) -> None:
        if session.in_step:
            return
        if session.client and not session.trains:
            # A data party trains through one session: a newer one that starts training replaces
            # the older (a reconnect). Sessions that only evaluate or generate coexist.
            session.trains = True
            self._replace_older(session)
        if not self._step_lock.acquire(timeout=self.limits.step_lock_timeout_s):
            raise SessionError(
                f"the model party is busy with another data party's step for more than "
                f"{self.limits.step_lock_timeout_s:.0f} s; retry",
                ErrorCode.BUSY,
            )
        session.in_step = True

    def _end_step(self, session: _Session) -> None:
        if session.in_step:
            session.in_step = False
            session.commit_due = False
            self._step_lock.release()

    def _abandon_step(self, session: _Session) -> None:
        """Drop a half-done step: its pending graphs and partial gradients never reach the adapters."""
        if not session.in_step:
            return
        with self._compute_lock:
            self._drop_step_locked(session)

    def _drop_step_locked(self, session: _Session) -> None:
        """:meth:`_abandon_step` for a caller holding the compute lock."""
        if session.in_step:
            self.model_party.drop_pending(session.client)
            self.model_party.forget_gradients(session.client)
            self._end_step(session)

    def _commit_step(self, session: _Session) -> None:
        """Apply the update of the step whose reply was just encoded; end the step.

        The reply is sent even when the checkpoint hook fails: the step is applied, and the data
        party must do its half.
        """
        if not session.commit_due:
            return
        try:
            with self._compute_lock:
                if not session.in_step:  # dropped meanwhile (replaced, shutting down): nothing to apply
                    return
                applied = self.model_party.commit(session.client)
                if applied and self.on_update is not None:
                    try:
                        self.on_update(self.model_party.updates, session.client)
                    except Exception as err:
                        log.error(
                            "the model party's update hook failed after a step of %r: %s", session.client, err
                        )
        finally:
            self._end_step(session)

    # ------------------------------------------------------------------ validation
    def _check(self, session: _Session, message: Message) -> None:
        """Kind, metadata and tensors of a data party's message against the protocol and the session."""
        if message.kind not in PARTY_KINDS:
            raise SessionError(f"unknown message kind {message.kind!r}; expected one of {list(PARTY_KINDS)}")
        message.meta = check_meta(message.kind, message.meta)
        kind, t = message.kind, message.tensors
        if kind == "fedavg":
            return  # an aggregator payload: the model party validates it by the aggregator's own schema
        allowed = None if self.labels_at == "model" else {"hidden", "attention_mask", "grad"}
        check_tensor_names(kind, t, allowed)
        limits = self.limits
        if "hidden" in t:
            batch, seq = check_hidden(
                t["hidden"], self.hidden_size, limits.max_batch, limits.max_seq, kind=kind
            )
            if kind == "gen_step" and seq != 1:
                raise SessionError(f"a gen_step carries one position per sequence; got {seq}")
            if "attention_mask" in t:
                check_mask(t["attention_mask"], batch, seq)
            if "labels" in t and t["labels"].shape[0] != batch:
                raise SessionError(
                    f"labels must be an integer tensor with batch {batch}; got {t['labels'].dtype} "
                    f"{tuple(t['labels'].shape)}"
                )
        max_length = message.meta.get("max_length")
        if kind == "gen_start" and isinstance(max_length, int) and max_length > limits.max_seq:
            raise SessionError(
                f"max_length {max_length} exceeds the session's limit of {limits.max_seq}", ErrorCode.LIMIT
            )

    def _record(self, direction: Direction, message: Message) -> None:
        if self.recorder is None:
            return
        with self._record_lock:
            try:
                self.recorder(direction, message)
            except Exception as err:  # a full disk must not refuse the parties' messages
                log.error("recording failed (%s); the model party goes on without recording", err)
                self.recorder = None

    def _handle(self, session: _Session, message: Message) -> Message | None:
        self._check(session, message)
        message.meta["client"] = session.client
        self._record("to_model", message)
        reply = self._dispatch(session, message)
        if reply is not None and self.recorder is not None:
            # Its own replies are part of the model party's view (HBT attacks run the public tail on
            # them). The recorder pairs a reply with its request by kind and batch id.
            batch_id = reply.meta.get("batch_id", message.meta.get("batch_id"))
            self._record("to_data", Message(reply.kind, reply.tensors, {**reply.meta, "batch_id": batch_id}))
        return reply

    def _dispatch(self, session: _Session, message: Message) -> Message | None:
        meta = message.meta
        if message.kind == "fedavg":
            if session.in_step:
                raise SessionError("fedavg between steps only: finish the step (its update) first")
            return self.model_party.handle(message)  # waits for the other parties: holds no lock
        if not in_step(message.kind, meta):  # evaluation and generation wait for nobody's step
            with self._compute_lock:
                return self.model_party.handle(message)
        if session.dropped:
            reason, session.dropped = session.dropped, ""
            raise SessionError(
                f"the model party dropped this party's step: {reason}; nothing of it was applied, start a new step",
                ErrorCode.STEP_DROPPED,
            )
        self._begin_step(session)
        session.last_seen = time.monotonic()  # waiting for another party's step is not this one's silence
        try:
            with self._compute_lock:
                if not session.in_step:  # the step was dropped while this message waited
                    raise SessionError(
                        f"the model party dropped this party's step ({session.dropped or 'replaced'}); "
                        "nothing of it was applied, start a new step",
                        ErrorCode.STEP_DROPPED,
                    )
                opens = (
                    message.kind == "forward" and "labels" not in message.tensors
                )  # leaves a graph pending
                if opens and self.model_party.pending_count(session.client) >= self.limits.max_pending:
                    raise SessionError(
                        f"this party has {self.limits.max_pending} training forwards without their backward; "
                        "send their backward messages first",
                        ErrorCode.LIMIT,
                    )
                reply = self.model_party.handle(message)
                session.commit_due = finishes_step(message.kind, meta, message.tensors)
        except Exception:
            self._abandon_step(session)
            raise
        return reply

    def _hello(self, session: _Session, message: Message) -> Message:
        protocol = message.meta.get("protocol")
        if protocol != PROTOCOL_VERSION:
            raise SessionError(
                f"protocol version {protocol!r} is not supported; this server speaks {PROTOCOL_VERSION}",
                ErrorCode.UNSUPPORTED,
            )
        try:
            meta = check_meta("hello", message.meta)
        except ProtocolError as err:
            raise SessionError(str(err), ErrorCode.UNSUPPORTED) from None
        if self.on_resume is not None:
            with self._step_lock:
                if self.on_resume is not None:
                    self.on_resume(int(meta["resume_step"]))  # type: ignore[arg-type]
                    self.on_resume = None  # only once it worked: a failed resume can be retried
        session.codecs = WireCodecs(
            str(meta["activations"]),  # type: ignore[arg-type]
            str(meta["gradients"]),  # type: ignore[arg-type]
            float(meta["topk_ratio"]),  # type: ignore[arg-type]
        )
        if self.tokens is None and meta["client"]:
            session.client = str(meta["client"])
        session.greeted = True
        return Message(
            "welcome",
            {},
            {
                "client": session.client,
                "hidden_size": self.hidden_size,
                "max_batch": self.limits.max_batch,
                "max_seq": self.limits.max_seq,
                "max_message_bytes": self.limits.max_message_bytes,
                "labels_at": self.labels_at,
                "updates": self.model_party.updates,
                "client_steps": self.model_party.client_steps.get(session.client, 0),
                "step_timeout_s": float(self.limits.step_timeout_s),
            },
        )

    def _stats(self, session: _Session, message: Message) -> Message:
        """How this session used the model party: time computing for it vs waiting for it."""
        check_meta("stats", message.meta)
        total = time.monotonic() - session.opened
        return Message(
            "stats_result",
            {},
            {
                "busy_s": session.busy_s,
                "session_s": total,
                "waiting_s": max(0.0, total - session.busy_s),
                "updates": self.model_party.updates,
            },
        )

    def _answer(self, session: _Session, message: Message, seq: int) -> list[pb.Frame | RawFrame]:
        """The frames answering one message; a finishing step's update is applied only after they exist."""
        if self._stop.is_set():
            raise SessionError("the model party is shutting down; reconnect later", ErrorCode.SHUTTING_DOWN)
        if message.kind == "hello":
            if session.greeted:
                raise SessionError("this session already said hello; open a new session to start over")
            reply: Message | None = self._hello(session, message)
        elif not session.greeted:
            raise SessionError("the first message of a session must be 'hello'", ErrorCode.NOT_GREETED)
        elif message.kind == "stats":
            reply = self._stats(session, message)
        else:
            started = time.monotonic()
            try:
                reply = self._handle(session, message)
            finally:
                session.busy_s += time.monotonic() - started
        try:
            # Views of the reply's tensors: gRPC serializes each frame before asking for the next,
            # and nothing touches them meanwhile (an update changes parameters, not replies).
            frames = (
                [] if reply is None else list(frames_of(reply, seq, "to_data", session.codecs, view=True))
            )
        except Exception:
            self._abandon_step(session)
            raise
        self._commit_step(session)
        return frames

    def _refuse(self, session: _Session, err: Exception) -> tuple[str, ErrorCode]:
        """Account for a refused message; its text and code."""
        self.errors += 1
        text = str(err) or type(err).__name__
        code = err.code if isinstance(err, ProtocolError) else ErrorCode.BAD_MESSAGE
        if isinstance(err, ProtocolError) and code == ErrorCode.STEP_REJECTED:
            # Per data party, not per session: reconnecting does not clear its record.
            self._strikes[session.client] = session.strikes = self._strikes.get(session.client, 0) + 1
            self._event(session, f"step rejected ({session.strikes}/{self.limits.max_strikes})", text)
        elif not isinstance(err, WireError | ProtocolError | ValueError):
            code = ErrorCode.INTERNAL
            log.warning("error handling a message from %r: %s", session.client, text, exc_info=err)
        return f"{type(err).__name__}: {text}", code

    # ------------------------------------------------------------------ the RPC
    def Session(
        self, request_iterator: Iterator[pb.Frame | RawFrame], context: Any
    ) -> Iterator[pb.Frame | RawFrame]:
        """The bidirectional stream of one data party."""
        session = self._open(context)
        reassembler = Reassembler(self.wire_limits)
        try:
            for frame in request_iterator:
                session.last_seen = time.monotonic()
                if session.replaced:
                    return
                seq = int(frame.message_id)
                with session.lock:
                    try:
                        envelope = reassembler.push(frame)
                        if envelope is None:
                            continue
                        seq = int(envelope.seq)
                        message = from_envelope(envelope, self.wire_limits, reassembler.external)
                        frames = self._answer(session, message, seq)
                        session.last_seen = time.monotonic()
                    except Exception as err:  # a client's message never crashes the server
                        # What a refusal leaves: nothing of a failed step (handle, encoding and commit
                        # drop it); a step whose message was refused before it ran stays open.
                        text, code = self._refuse(session, err)
                        frames = list(
                            frames_of(Message("error"), seq, "to_data", None, error=text, code=code)
                        )
                        if session.strikes >= self.limits.max_strikes:
                            session.closed_reason = f"{session.strikes} refused steps"
                            self._event(session, "disconnected", session.closed_reason)
                            yield from frames
                            context.abort(
                                grpc.StatusCode.PERMISSION_DENIED,
                                f"disconnected after {session.strikes} refused steps (last: {text})",
                            )
                            return
                yield from frames
        finally:
            self._close(session)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for TLS.

    Server: ``cert`` + ``key`` (and ``ca`` to require client certificates: mutual TLS).
    Client: ``ca`` to verify the server (and ``cert`` + ``key`` for mutual TLS).
    """

    cert: str | None = None
    key: str | None = None
    ca: str | None = None


def read_pem(path: str | None) -> bytes | None:
    """The bytes of a PEM file, or ``None`` for no file."""
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


_MESSAGE_OPTIONS = [
    ("grpc.max_send_message_length", 8 * 2**20),
    ("grpc.max_receive_message_length", 8 * 2**20),
]
#: Client: ping every 30 s so that idle links through NATs and proxies stay open.
GRPC_OPTIONS = [
    *_MESSAGE_OPTIONS,
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
#: Server: accept those pings (gRPC's default allows one per 5 minutes and hangs up on more).
SERVER_OPTIONS = [
    *_MESSAGE_OPTIONS,
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
]


def serve(
    service: ModelPartyService,
    host: str = "127.0.0.1",
    port: int = 50051,
    tls: TlsFiles | None = None,
    workers: int = 32,
) -> tuple[grpc.Server, int]:
    """Start a gRPC server for ``service``; returns it and the bound port (``port=0`` picks one)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=SERVER_OPTIONS)
    handler = grpc.method_handlers_generic_handler(
        "splitfed.v1.SplitService",
        {
            "Session": grpc.stream_stream_rpc_method_handler(
                service.Session,
                request_deserializer=parse_frame,
                response_serializer=serialize_frame,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    address = f"{host}:{port}"
    if tls is not None and tls.cert and tls.key:
        credentials = grpc.ssl_server_credentials(
            [(read_pem(tls.key), read_pem(tls.cert))],
            root_certificates=read_pem(tls.ca),
            require_client_auth=tls.ca is not None,
        )
        bound = server.add_secure_port(address, credentials)
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"could not bind {address}: is the port in use?")
    server.start()
    return server, bound
