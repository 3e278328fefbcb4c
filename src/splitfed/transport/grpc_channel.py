"""The data party's side of the gRPC runtime: a :class:`Channel` over one bidirectional stream."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import grpc

from splitfed.transport.channel import Channel, ChannelTransform, CrossingRecorder, Message
from splitfed.transport.grpc_server import GRPC_OPTIONS, METHOD, TlsFiles, read_pem
from splitfed.transport.proto import splitfed_pb2 as pb
from splitfed.transport.wire import (
    PROTOCOL_VERSION,
    Reassembler,
    WireCodecs,
    WireLimits,
    from_envelope,
    to_envelope,
    to_frames,
)


class TransportError(ConnectionError):
    """The connection to the model party failed or was refused."""


class RemoteError(RuntimeError):
    """The model party refused a message; the text is its explanation."""


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
    ) -> None:
        super().__init__(transforms, recorder)
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
        self._outbox: queue.Queue[pb.Frame | None] = queue.Queue()
        self._replies: queue.Queue[Any] = queue.Queue()
        stream = self._grpc.stream_stream(
            METHOD, request_serializer=pb.Frame.SerializeToString, response_deserializer=pb.Frame.FromString
        )
        self._call = stream(self._requests(), metadata=metadata)
        self._reader = threading.Thread(target=self._read_loop, daemon=True)
        self._reader.start()
        self._reassembler = Reassembler(self.limits)
        self._seq = 0
        self._closed = False
        welcome = self._exchange(
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
        assert welcome is not None
        self.session = dict(welcome.meta)
        self.client_id = str(self.session.get("client", client_id))

    def _requests(self) -> Iterator[pb.Frame]:
        while True:
            frame = self._outbox.get()
            if frame is None:
                return
            yield frame

    def _read_loop(self) -> None:
        try:
            for frame in self._call:
                self._replies.put(frame)
        except grpc.RpcError as err:
            self._replies.put(err)
        self._replies.put(None)

    def _next_frame(self) -> pb.Frame:
        try:
            item = self._replies.get(timeout=self.timeout_s)
        except queue.Empty:
            raise TransportError(
                f"no reply from the model party at {self.target} within {self.timeout_s:.0f} s"
            ) from None
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

    def _exchange(self, message: Message, expect_reply: bool) -> Message | None:
        if self._closed:
            raise TransportError("the channel is closed")
        self._seq += 1
        seq = self._seq
        for frame in to_frames(to_envelope(message, seq, "to_model", self.codecs), seq):
            self.bytes_to_model += frame.ByteSize()
            self._outbox.put(frame)
        if not expect_reply:
            return None
        while True:
            frame = self._next_frame()
            self.bytes_to_data += frame.ByteSize()
            envelope = self._reassembler.push(frame)
            if envelope is None:
                continue
            if envelope.error:
                raise RemoteError(
                    f"the model party refused message {envelope.seq} ({message.kind if envelope.seq == seq else 'earlier'}): {envelope.error}"
                )
            if envelope.seq != seq:
                raise TransportError(f"reply to message {envelope.seq} arrived while waiting for {seq}")
            return from_envelope(envelope, self.limits)

    def _deliver(self, message: Message, expect_reply: bool) -> Message | None:
        return self._exchange(message, expect_reply)

    def close(self) -> None:
        """End the session and the connection."""
        if not self._closed:
            self._closed = True
            self._outbox.put(None)
            self._grpc.close()
