"""The data party's side of the gRPC runtime: a :class:`Channel` over one bidirectional stream."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import grpc

from splitfed.protocol import PROTOCOL_VERSION, ErrorCode, ProtocolError
from splitfed.transport.channel import Channel, ChannelTransform, CrossingRecorder, Message
from splitfed.transport.grpc_server import GRPC_OPTIONS, METHOD, TlsFiles, read_pem
from splitfed.transport.proto import splitfed_pb2 as pb
from splitfed.transport.wire import (
    RawFrame,
    Reassembler,
    WireCodecs,
    WireLimits,
    frames_of,
    from_envelope,
    parse_frame,
    serialize_frame,
)


class TransportError(ConnectionError):
    """The connection to the model party failed or was refused."""


class RemoteError(ProtocolError):
    """The model party refused a message; the text is its explanation, ``code`` what to do about it."""


class GrpcChannel(Channel):
    """A channel to a model party served by ``splitfed serve``.

    Parameters
    ----------
    target : str
        ``HOST:PORT`` of the model party.
    client_id : str, default ""
        How this data party names itself (ignored when the server assigns ids by token).
    token : str | None
        Per-data-party token (sent as ``authorization: Bearer``).
    tls : TlsFiles | None
        ``ca`` verifies the server; ``cert`` + ``key`` add a client certificate (mutual TLS).
        ``None``: plaintext (loopback and tests only).
    codecs : WireCodecs | None
        Compression per direction, announced to the server in the ``hello``.
    timeout_s : float, default 600
        How long to wait for a reply.
    keepalive_ms : int, default 30000
        Interval of keepalive pings on an idle connection.
    hello : dict | None
        Extra metadata for the session's ``hello`` (e.g. ``resume_step``).
    latency_ms : float, default 0
        Round-trip latency to inject, half on the way out and half on the way back (benchmarks
        emulate a wide-area link with it where ``tc netem`` is unavailable). It delays frames; it
        never blocks the sender, so messages in flight overlap as on a real link.
    transforms, recorder
        See :class:`Channel`.
    """

    counts_payload_as_wire = False

    def __init__(
        self,
        target: str,
        client_id: str = "",
        token: str | None = None,
        tls: TlsFiles | None = None,
        codecs: WireCodecs | None = None,
        timeout_s: float = 600.0,
        transforms: Sequence[ChannelTransform] = (),
        recorder: CrossingRecorder | None = None,
        limits: WireLimits | None = None,
        keepalive_ms: int = 30_000,
        hello: dict[str, Any] | None = None,
        latency_ms: float = 0.0,
    ) -> None:
        super().__init__(transforms, recorder)
        if latency_ms < 0:
            raise ValueError(f"latency_ms must be >= 0, got {latency_ms}")
        self._one_way_s = latency_ms / 2000.0
        self.target = target
        self.codecs = codecs or WireCodecs()
        self.timeout_s = timeout_s
        self.limits = limits or WireLimits()
        options = [(k, keepalive_ms if k == "grpc.keepalive_time_ms" else v) for k, v in GRPC_OPTIONS]
        if tls is not None and tls.ca:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=read_pem(tls.ca),
                private_key=read_pem(tls.key),
                certificate_chain=read_pem(tls.cert),
            )
            self._grpc = grpc.secure_channel(target, credentials, options=options)
        else:
            self._grpc = grpc.insecure_channel(target, options=options)
        metadata = [("splitfed-client", client_id)]
        if token:
            metadata.append(("authorization", f"Bearer {token}"))
        self._outbox: queue.Queue[tuple[float, pb.Frame | RawFrame] | None] = queue.Queue()
        self._replies: queue.Queue[tuple[float, Any]] = queue.Queue()
        self._done: dict[int, Message] = {}
        stream = self._grpc.stream_stream(
            METHOD, request_serializer=serialize_frame, response_deserializer=parse_frame
        )
        self._call = stream(self._requests(), metadata=metadata)
        self._reader = threading.Thread(target=self._read_loop, daemon=True)
        self._reader.start()
        self._reassembler = Reassembler(self.limits)
        self._seq = 0
        self._kinds: dict[int, str] = {}
        self._closed = False
        # The session's own handshake: not a crossing of the split (no transforms, not recorded).
        ticket = self._post(
            Message(
                "hello",
                {},
                {
                    "protocol": PROTOCOL_VERSION,
                    "client": client_id,
                    "activations": self.codecs.activations,
                    "gradients": self.codecs.gradients,
                    "topk_ratio": self.codecs.topk_ratio,
                    **(hello or {}),
                },
            ),
            expect_reply=True,
        )
        assert ticket is not None
        welcome = self._collect(ticket)
        assert welcome is not None
        self.session = dict(welcome.meta)
        self.client_id = str(self.session.get("client", client_id))

    def _requests(self) -> Iterator[pb.Frame | RawFrame]:
        while True:
            item = self._outbox.get()
            if item is None:
                return
            due, frame = item
            _sleep_until(due)
            yield frame

    def _read_loop(self) -> None:
        try:
            for frame in self._call:
                self._replies.put((time.monotonic() + self._one_way_s, frame))
        except grpc.RpcError as err:
            self._replies.put((0.0, err))
        self._replies.put((0.0, None))

    def _next_frame(self) -> pb.Frame | RawFrame:
        try:
            due, item = self._replies.get(timeout=self.timeout_s)
        except queue.Empty:
            raise TransportError(
                f"no reply from the model party at {self.target} within {self.timeout_s:.0f} s"
            ) from None
        _sleep_until(due)
        if item is None:
            raise TransportError(f"the model party at {self.target} closed the session")
        if isinstance(item, grpc.RpcError):
            code = item.code() if hasattr(item, "code") else None
            details = item.details() if hasattr(item, "details") else str(item)
            name = code.name if code is not None else "UNKNOWN"
            hint = ""
            if code == grpc.StatusCode.UNAVAILABLE:
                hint = (
                    " (is `splitfed serve` running there, and do both sides agree on TLS: --tls-ca, and a client "
                    "certificate when the server requires mutual TLS?)"
                )
            raise TransportError(f"model party at {self.target}: {name}: {details}{hint}")
        return item  # type: ignore[no-any-return]

    def _post(self, message: Message, expect_reply: bool) -> int | None:
        if self._closed:
            raise TransportError("the channel is closed")
        self._seq += 1
        seq = self._seq
        due = time.monotonic() + self._one_way_s
        # A request's frames may view its tensors (no copy): the data party keeps them unchanged
        # until the reply, which comes after the model party has read them all. One-way: copies.
        for frame in frames_of(message, seq, "to_model", self.codecs, view=expect_reply):
            self.bytes_to_model += frame.ByteSize()
            self._outbox.put((due, frame))
        self._kinds[seq] = message.kind
        return seq if expect_reply else None

    def _collect(self, ticket: int) -> Message | None:
        # Replies come back in the order the messages were sent; keep those that finish before
        # the one asked for (a pipelined data party collects them later).
        while ticket not in self._done:
            frame = self._next_frame()
            self.bytes_to_data += frame.ByteSize()
            envelope = self._reassembler.push(frame)
            if envelope is None:
                continue
            if envelope.error:
                kind = self._kinds.get(int(envelope.seq), "?")
                try:
                    code = ErrorCode(envelope.code or ErrorCode.BAD_MESSAGE)
                except ValueError:  # a newer server's code: still a refusal
                    code = ErrorCode.BAD_MESSAGE
                raise RemoteError(
                    f"the model party refused message {envelope.seq} ({kind}): {envelope.error}", code
                )
            self._done[int(envelope.seq)] = from_envelope(envelope, self.limits, self._reassembler.external)
        for seq in [s for s in self._kinds if s <= ticket]:
            del self._kinds[seq]
        return self._done.pop(ticket)

    def close(self) -> None:
        """End the session and the connection."""
        if not self._closed:
            self._closed = True
            self._outbox.put(None)
            self._grpc.close()


def _sleep_until(due: float) -> None:
    wait = due - time.monotonic()
    if wait > 0:
        time.sleep(wait)
