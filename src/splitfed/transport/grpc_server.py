"""The model party as a gRPC server: one bidirectional stream per data party.

The server owns no training logic: it authenticates a data party, negotiates limits and codecs in
a ``hello`` exchange, validates every message against the session, and hands it to
:meth:`splitfed.split.parties.ModelParty.handle`. A bad message gets an error reply naming what was
wrong; the server keeps serving everyone else.

Consistency: a data party's training step (from its first training ``forward`` to the message that
applies the optimizer update) holds the model party's step lock, so shared adapters see each step
applied whole. A data party that errors, disconnects or goes idle mid-step has its pending work
and partial gradients dropped and the lock released.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, get_args

import grpc
import torch

from splitfed.split.inference import GEN_KINDS
from splitfed.split.parties import ModelParty
from splitfed.transport.channel import Message
from splitfed.transport.codec import Limits
from splitfed.transport.proto import splitfed_pb2 as pb
from splitfed.transport.wire import (
    PROTOCOL_VERSION,
    ActivationCodec,
    GradientCodec,
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
_ACTIVATION_CODECS = get_args(ActivationCodec)
_GRADIENT_CODECS = get_args(GradientCodec)


class SessionError(ValueError):
    """A message that does not fit the negotiated session."""


@dataclass(frozen=True)
class ServerLimits:
    """What the model party accepts from each data party.

    Parameters
    ----------
    max_batch : int, default 64
    max_seq : int, default 4096
    max_sessions : int, default 16
        Concurrent data parties.
    idle_timeout_s : float, default 600
        A session that sends nothing for this long is closed (its step, if any, is dropped).
    step_lock_timeout_s : float, default 600
        How long a data party waits for another's step to finish before getting a busy error.
    max_message_bytes : int, default 512 MiB
    """

    max_batch: int = 64
    max_seq: int = 4096
    max_sessions: int = 16
    idle_timeout_s: float = 600.0
    step_lock_timeout_s: float = 600.0
    max_message_bytes: int = 512 * 2**20

    def wire(self, hidden_size: int) -> WireLimits:
        """Wire limits implied by these limits for a model of ``hidden_size``."""
        max_elements = max(self.max_batch * self.max_seq * hidden_size, self.max_batch * self.max_seq * 4)
        return WireLimits(
            self.max_message_bytes, Limits(max_elements=max_elements, max_dims=3), max_tensors=1024
        )


@dataclass
class _Session:
    client: str
    context: Any
    codecs: WireCodecs = field(default_factory=WireCodecs)
    last_seen: float = field(default_factory=time.monotonic)
    in_step: bool = False
    closed_reason: str = ""
    opened: float = field(default_factory=time.monotonic)
    busy_s: float = 0.0


class ModelPartyService:
    """Serves one :class:`ModelParty` to many data parties.

    Parameters
    ----------
    model_party : ModelParty
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
        step, still under the step lock (the server's checkpoints hook in here, so a checkpoint
        never sees half a step).
    on_resume : Callable[[int], int] | None
        A restarted model party: called once, at the first ``hello``, with the step that data
        party resumes from; loads the matching checkpoint.
    """

    def __init__(
        self,
        model_party: ModelParty,
        hidden_size: int,
        limits: ServerLimits | None = None,
        tokens: dict[str, str] | None = None,
        labels_at: str = "data",
        on_update: Callable[[int, str], None] | None = None,
        on_resume: Callable[[int], int] | None = None,
    ) -> None:
        self.model_party = model_party
        self.on_update = on_update
        self.on_resume = on_resume
        self.hidden_size = hidden_size
        self.limits = limits or ServerLimits()
        self.wire_limits = self.limits.wire(hidden_size)
        self.tokens = tokens
        self.labels_at = labels_at
        self._step_lock = threading.Lock()
        self._sessions: dict[int, _Session] = {}
        self._sessions_lock = threading.Lock()
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch_idle, daemon=True)
        self._watchdog.start()
        self.errors = 0

    @property
    def step_lock(self) -> threading.Lock:
        """Held from a training step's first message to its update (and around non-step work)."""
        return self._step_lock

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
        client = self._authenticate(context)
        with self._sessions_lock:
            if len(self._sessions) >= self.limits.max_sessions:
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the model party already serves {self.limits.max_sessions} data parties; try again later",
                )
            session = _Session(client, context)
            self._sessions[id(session)] = session
        return session

    def _close(self, session: _Session) -> None:
        if session.closed_reason:
            log.warning("closed the session of data party %r: %s", session.client, session.closed_reason)
        self._abandon_step(session)
        with self._sessions_lock:
            self._sessions.pop(id(session), None)

    def _watch_idle(self) -> None:
        while not self._stop.wait(0.5):
            now = time.monotonic()
            with self._sessions_lock:
                idle = [s for s in self._sessions.values() if now - s.last_seen > self.limits.idle_timeout_s]
            for session in idle:
                session.closed_reason = f"idle for more than {self.limits.idle_timeout_s:.0f} s"
                session.context.cancel()

    def stop(self) -> None:
        """Stop the idle watchdog."""
        self._stop.set()

    # ------------------------------------------------------------------ steps
    def _begin_step(self, session: _Session) -> None:
        if session.in_step:
            return
        if not self._step_lock.acquire(timeout=self.limits.step_lock_timeout_s):
            raise SessionError(
                f"the model party is busy with another data party's step for more than "
                f"{self.limits.step_lock_timeout_s:.0f} s; retry"
            )
        session.in_step = True

    def _end_step(self, session: _Session) -> None:
        if session.in_step:
            session.in_step = False
            self._step_lock.release()

    def _abandon_step(self, session: _Session) -> None:
        """Drop a half-done step: its pending graphs and partial gradients never reach the adapters."""
        if not session.in_step:
            return
        self.model_party.drop_pending(session.client)
        self.model_party.forget_gradients(session.client)
        self._end_step(session)

    # ------------------------------------------------------------------ validation
    def _check_hidden(self, hidden: torch.Tensor) -> tuple[int, int]:
        if hidden.dim() != 3 or hidden.shape[-1] != self.hidden_size or not hidden.is_floating_point():
            raise SessionError(
                f"hidden must be a floating [batch, seq, {self.hidden_size}] tensor; got {hidden.dtype} "
                f"{tuple(hidden.shape)}"
            )
        batch, seq = int(hidden.shape[0]), int(hidden.shape[1])
        if batch > self.limits.max_batch or seq > self.limits.max_seq or batch < 1 or seq < 1:
            raise SessionError(
                f"batch {batch} x seq {seq} is outside the session's limits (batch 1..{self.limits.max_batch}, "
                f"seq 1..{self.limits.max_seq})"
            )
        return batch, seq

    def _check(self, session: _Session, message: Message) -> None:
        if message.kind not in ("forward", "backward", "fedavg", *GEN_KINDS):
            raise SessionError(
                f"unknown message kind {message.kind!r}; expected forward, backward, fedavg or {GEN_KINDS}"
            )
        t = message.tensors
        if message.kind == "fedavg":
            if not t or not all(v.is_floating_point() for v in t.values()):
                raise SessionError("a fedavg message carries the sender's floating-point adapter tensors")
            return
        if message.kind in GEN_KINDS:
            expected = {"gen_start": {"hidden", "attention_mask"}, "gen_step": {"hidden"}, "gen_end": set()}[
                message.kind
            ]
            if set(t) != expected:
                raise SessionError(f"a {message.kind} message carries {sorted(expected)}; got {sorted(t)}")
            if "hidden" in t:
                batch, seq = self._check_hidden(t["hidden"])
                if message.kind == "gen_step" and seq != 1:
                    raise SessionError(f"a gen_step carries one position per sequence; got {seq}")
                if "attention_mask" in t:
                    self._check_mask(t["attention_mask"], batch, seq)
                max_length = int(message.meta.get("max_length", 0) or 0)
                if message.kind == "gen_start" and max_length > self.limits.max_seq:
                    raise SessionError(
                        f"max_length {max_length} exceeds the session's limit of {self.limits.max_seq}"
                    )
            return
        if message.kind == "backward":
            if set(t) != {"grad"} or not t["grad"].is_floating_point():
                raise SessionError(f"a backward message carries one floating tensor 'grad'; got {sorted(t)}")
            return
        allowed = {"hidden", "attention_mask"} | ({"labels"} if self.labels_at == "model" else set())
        if "hidden" not in t or "attention_mask" not in t or set(t) - allowed:
            raise SessionError(f"a forward message carries {sorted(allowed)}; got {sorted(t)}")
        batch, seq = self._check_hidden(t["hidden"])
        self._check_mask(t["attention_mask"], batch, seq)
        if "labels" in t:
            labels = t["labels"]
            if labels.is_floating_point() or labels.shape[0] != batch or labels.dim() > 2:
                raise SessionError(
                    f"labels must be an integer tensor with batch {batch}; got {tuple(labels.shape)}"
                )

    @staticmethod
    def _check_mask(mask: torch.Tensor, batch: int, seq: int) -> None:
        if (
            tuple(mask.shape) != (batch, seq)
            or mask.is_floating_point()
            or not bool(((mask == 0) | (mask == 1)).all())
        ):
            raise SessionError(
                f"attention_mask must be a 0/1 integer [{batch}, {seq}] tensor; got {tuple(mask.shape)}"
            )

    def _handle(self, session: _Session, message: Message) -> Message | None:
        self._check(session, message)
        message.meta["client"] = session.client
        if message.kind == "fedavg":
            if session.in_step:
                raise SessionError("fedavg between steps only: finish the step (its update) first")
            return self.model_party.handle(message)  # waits for the other parties: holds no lock
        train = message.kind == "backward" or (
            message.kind == "forward" and bool(message.meta.get("train", False))
        )
        if not train:
            with self._step_lock if not session.in_step else nullcontext():
                return self.model_party.handle(message)
        self._begin_step(session)
        try:
            reply = self.model_party.handle(message)
        except Exception:
            self._abandon_step(session)
            raise
        finishes = bool(message.meta.get("update", True)) and (
            message.kind == "backward" or "labels" in message.tensors
        )
        if finishes:
            try:
                if self.on_update is not None:
                    self.on_update(self.model_party.updates, session.client)
            finally:
                self._end_step(session)
        return reply

    def _hello(self, session: _Session, message: Message) -> Message:
        meta = message.meta
        if meta.get("protocol") != PROTOCOL_VERSION:
            raise SessionError(
                f"protocol version {meta.get('protocol')!r} is not supported; this server speaks {PROTOCOL_VERSION}"
            )
        activations = str(meta.get("activations", "fp32"))
        gradients = str(meta.get("gradients", "fp32"))
        if activations not in _ACTIVATION_CODECS or gradients not in _GRADIENT_CODECS:
            raise SessionError(
                f"codecs activations={activations!r} gradients={gradients!r} not supported; "
                f"activations: {_ACTIVATION_CODECS}, gradients: {_GRADIENT_CODECS}"
            )
        if self.on_resume is not None:
            with self._step_lock:
                if self.on_resume is not None:
                    self.on_resume(int(meta.get("resume_step", 0) or 0))
                    self.on_resume = None  # only once it worked: a failed resume can be retried
        ratio = float(meta.get("topk_ratio", 0.1) or 0.1)
        session.codecs = WireCodecs(activations, gradients, ratio)  # type: ignore[arg-type]
        if self.tokens is None and meta.get("client"):
            session.client = str(meta["client"])
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
            },
        )

    def _stats(self, session: _Session) -> Message:
        """How this session used the model party: time computing for it vs waiting for it."""
        total = time.monotonic() - session.opened
        return Message(
            "stats",
            {},
            {
                "busy_s": session.busy_s,
                "session_s": total,
                "waiting_s": max(0.0, total - session.busy_s),
                "updates": self.model_party.updates,
            },
        )

    # ------------------------------------------------------------------ the RPC
    def Session(
        self, request_iterator: Iterator[pb.Frame | RawFrame], context: Any
    ) -> Iterator[pb.Frame | RawFrame]:
        """The bidirectional stream of one data party."""
        session = self._open(context)
        reassembler = Reassembler(self.wire_limits)
        greeted = False
        try:
            for frame in request_iterator:
                session.last_seen = time.monotonic()
                seq = int(frame.message_id)
                try:
                    envelope = reassembler.push(frame)
                    if envelope is None:
                        continue
                    seq = int(envelope.seq)
                    message = from_envelope(envelope, self.wire_limits, reassembler.external)
                    if message.kind == "hello":
                        reply: Message | None = self._hello(session, message)
                        greeted = True
                    elif not greeted:
                        raise SessionError("the first message of a session must be 'hello'")
                    elif message.kind == "stats":
                        reply = self._stats(session)
                    else:
                        started = time.monotonic()
                        try:
                            reply = self._handle(session, message)
                        finally:
                            session.busy_s += time.monotonic() - started
                except Exception as err:  # a client's message never crashes the server
                    self.errors += 1
                    text = str(err) or type(err).__name__
                    if not isinstance(err, (WireError, SessionError, ValueError)):
                        log.warning("error handling a message from %r: %s", session.client, text)
                    yield from frames_of(
                        Message("error"), seq, "to_data", None, error=f"{type(err).__name__}: {text}"
                    )
                    continue
                if reply is not None:
                    # Views of the reply's tensors: gRPC serializes each frame before asking for
                    # the next, and nothing touches them meanwhile.
                    yield from frames_of(reply, seq, "to_data", session.codecs, view=True)
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
