"""Messages to bytes and back: protobuf envelopes, tensor codecs per direction, and framing.

A :class:`~splitfed.transport.channel.Message` becomes an ``Envelope`` whose tensors are encoded by
:mod:`splitfed.transport.codec` (raw little-endian bytes with dtype and shape, optionally
compressed); the serialized envelope is cut into ``Frame`` pieces so that a message of any size
fits under gRPC's per-message limit. Decoding validates everything against :class:`WireLimits`
before allocating: a bad message raises :class:`WireError` with what was wrong, never crashes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from google.protobuf.message import DecodeError

from splitfed.protocol import ACTIVATION_CODECS, GRADIENT_CODECS, PROTOCOL_VERSION, ErrorCode, tensor_role
from splitfed.transport.channel import Direction, Message, MetaValue
from splitfed.transport.codec import CodecError, EncodedTensor, Limits, TopKCompressor, decode, encode
from splitfed.transport.proto import splitfed_pb2 as pb

FRAME_BYTES = 4 << 20  # 4 MiB per frame (the channels allow 8 MiB messages)
__all__ = ["ACTIVATION_CODECS", "GRADIENT_CODECS", "PROTOCOL_VERSION"]  # re-exported for clients

ActivationCodec = Literal["fp32", "fp16", "bf16", "int8"]
GradientCodec = Literal["fp32", "fp16", "bf16", "topk"]
_CODEC_NAME = {"fp32": "raw", "fp16": "fp16", "bf16": "bf16", "int8": "int8", "topk": "topk"}


class WireError(ValueError):
    """A message that cannot be decoded or does not fit the session's limits."""


@dataclass(frozen=True)
class WireLimits:
    """What a receiver accepts. The model party negotiates these at the start of a session.

    Parameters
    ----------
    max_message_bytes : int, default 512 MiB
        Largest serialized envelope (after reassembly).
    max_frames : int
        Largest number of frames of one message (derived from ``max_message_bytes``).
    tensor : Limits
        Per-tensor limits (elements, dims, dtypes, finiteness) applied by the codec.
    max_tensors : int, default 1024
        (adapter averaging sends one tensor per LoRA matrix)
    max_meta : int, default 32
    """

    max_message_bytes: int = 512 * 2**20
    tensor: Limits = field(default_factory=Limits)
    max_tensors: int = 1024
    max_meta: int = 32

    @property
    def max_frames(self) -> int:
        """Frames needed for the largest message."""
        return math.ceil(self.max_message_bytes / FRAME_BYTES) + 1


@dataclass
class WireCodecs:
    """Compression per direction (configurable per run).

    Parameters
    ----------
    activations : {"fp32", "fp16", "bf16", "int8"}, default "fp32"
        Hidden states and logits, both directions.
    gradients : {"fp32", "fp16", "bf16", "topk"}, default "fp32"
        Gradients, both directions. ``topk`` keeps the largest ``topk_ratio`` share with error
        feedback (the dropped rest is added to the next gradient of the same stream).
    topk_ratio : float, default 0.1
    """

    activations: ActivationCodec = "fp32"
    gradients: GradientCodec = "fp32"
    topk_ratio: float = 0.1
    _topk: dict[str, TopKCompressor] = field(default_factory=dict, repr=False)

    def encode_tensor(
        self, direction: Direction, kind: str, name: str, tensor: torch.Tensor, view: bool = False
    ) -> EncodedTensor:
        """Encode one tensor of a message with the codec configured for it (``view``: see :func:`encode`).

        The protocol says which tensors are activations and which gradients; the rest (masks,
        labels, tokens, adapters) go raw.
        """
        codec = "raw"
        role = tensor_role(kind, name) if tensor.is_floating_point() else None
        if role == "activation":
            codec = _CODEC_NAME[self.activations]
        elif role == "gradient":
            if self.gradients == "topk":
                key = f"{direction}/{kind}/{name}"
                compressor = self._topk.setdefault(key, TopKCompressor(self.topk_ratio))
                return compressor.encode(name, tensor)
            codec = _CODEC_NAME[self.gradients]
        return encode(name, tensor, codec, view)


def _meta_to_proto(envelope: pb.Envelope, meta: dict[str, MetaValue]) -> None:
    for key, value in meta.items():
        if value is None:
            continue
        slot = envelope.meta[key]
        if isinstance(value, bool):
            slot.b = value
        elif isinstance(value, int):
            slot.i = value
        elif isinstance(value, float):
            slot.f = value
        else:
            slot.s = str(value)


def _meta_from_proto(envelope: pb.Envelope) -> dict[str, MetaValue]:
    meta: dict[str, MetaValue] = {}
    for key, slot in envelope.meta.items():
        which = slot.WhichOneof("value")
        meta[key] = getattr(slot, which) if which else None
    return meta


#: Tensor data at least this big travels in raw frames after the envelope instead of inside it.
EXTERNAL_MIN_BYTES = 64 << 10


def to_envelope(
    message: Message, seq: int, direction: Direction, codecs: WireCodecs | None = None, error: str = ""
) -> pb.Envelope:
    """Encode a message (tensors through ``codecs``; everything raw when ``None``), all data inline."""
    return _encode(message, seq, direction, codecs, error, None)[0]


def _encode(
    message: Message,
    seq: int,
    direction: Direction,
    codecs: WireCodecs | None,
    error: str,
    external_min: int | None,
    view: bool = False,
) -> tuple[pb.Envelope, list[bytes | memoryview]]:
    """The envelope, and the data of tensors of ``external_min`` bytes or more, kept out of it.

    ``view``: the external data may be views of the tensors' memory (no copy).
    """
    codecs = codecs or WireCodecs()
    envelope = pb.Envelope(kind=message.kind, seq=seq, error=error)
    externals: list[bytes | memoryview] = []
    for name, tensor in message.tensors.items():
        big = external_min is not None and tensor.numel() * tensor.element_size() >= external_min
        enc = codecs.encode_tensor(direction, message.kind, name, tensor, view and big)
        proto = envelope.tensors.add(
            name=enc.name,
            dtype=enc.dtype,
            shape=list(enc.shape),
            codec=enc.codec,
            scale=enc.scale,
            indices=enc.indices,
        )
        if external_min is not None and len(enc.data) >= external_min:
            proto.external = len(enc.data)
            externals.append(enc.data)
        else:
            proto.data = enc.data
    _meta_to_proto(envelope, message.meta)
    return envelope, externals


def from_envelope(envelope: pb.Envelope, limits: WireLimits, external: memoryview | None = None) -> Message:
    """Decode and validate an envelope's tensors; raises :class:`WireError`.

    ``external`` is the raw data of the envelope's ``external`` tensors, in order (what
    :attr:`Reassembler.external` holds after the envelope's last frame); decoded tensors may use
    that buffer's memory, which belongs to nobody else.
    """
    if len(envelope.tensors) > limits.max_tensors:
        raise WireError(
            f"message carries {len(envelope.tensors)} tensors; at most {limits.max_tensors} allowed"
        )
    if len(envelope.meta) > limits.max_meta:
        raise WireError(
            f"message carries {len(envelope.meta)} metadata entries; at most {limits.max_meta} allowed"
        )
    tensors = {}
    offset = 0
    for proto in envelope.tensors:
        if proto.name in tensors:
            raise WireError(f"tensor {proto.name!r} appears twice in one message")
        if len(proto.shape) > limits.tensor.max_dims:
            raise WireError(
                f"tensor {proto.name!r} has {len(proto.shape)} dims; at most {limits.tensor.max_dims}"
            )
        data: bytes | memoryview = proto.data
        aligned = False
        if proto.external:
            if proto.data:
                raise WireError(
                    f"tensor {proto.name!r} carries data inline and says {proto.external} bytes follow"
                )
            end = offset + int(proto.external)
            if external is None or end > len(external):
                raise WireError(
                    f"tensor {proto.name!r} says {proto.external} bytes of data follow the envelope; "
                    f"{0 if external is None else len(external) - offset} did"
                )
            aligned = offset % 8 == 0  # alias the buffer only where elements are aligned
            data, offset = external[offset:end], end
        enc = EncodedTensor(
            name=proto.name,
            dtype=proto.dtype,
            shape=tuple(int(s) for s in proto.shape),
            codec=proto.codec,
            data=data,
            scale=proto.scale,
            indices=proto.indices,
        )
        try:
            tensors[proto.name] = decode(enc, limits.tensor, owned=proto.external > 0 and aligned)
        except CodecError as err:
            raise WireError(str(err)) from None
    if external is not None and offset != len(external):
        raise WireError(
            f"{len(external) - offset} bytes of raw data follow the envelope that no tensor claims"
        )
    return Message(envelope.kind, tensors, _meta_from_proto(envelope))


def to_frames(
    envelope: pb.Envelope, message_id: int, externals: Sequence[bytes | memoryview] = ()
) -> list[pb.Frame | RawFrame]:
    """Serialize and cut into frames of at most :data:`FRAME_BYTES`; ``externals`` follow the envelope.

    The envelope's frames are protobuf ``Frame`` messages; the external data's frames are
    :class:`RawFrame` views of it (same bytes on the wire, no copy until gRPC serializes them).
    """
    payload = envelope.SerializeToString()
    header = max(1, math.ceil(len(payload) / FRAME_BYTES))
    raw = list(_chunks(externals, FRAME_BYTES))
    total = header + len(raw)
    marker = header if raw else 0
    frames: list[pb.Frame | RawFrame] = [
        pb.Frame(
            message_id=message_id,
            index=i,
            total=total,
            payload=payload[i * FRAME_BYTES : (i + 1) * FRAME_BYTES],
            header_frames=marker,
        )
        for i in range(header)
    ]
    frames += [RawFrame(message_id, header + i, total, piece, marker) for i, piece in enumerate(raw)]
    return frames


def _chunks(buffers: Sequence[bytes | memoryview], size: int) -> Iterator[bytes | memoryview]:
    """The concatenation of ``buffers`` in pieces of ``size`` bytes (the last may be shorter).

    A piece inside one buffer is a view of it; only pieces across two buffers are copied.
    """
    pending: list[memoryview] = []
    have = 0
    for buffer in buffers:
        view = memoryview(buffer).cast("B")
        while len(view):
            take = min(size - have, len(view))
            pending.append(view[:take])
            have += take
            view = view[take:]
            if have == size:
                yield pending[0] if len(pending) == 1 else b"".join(pending)
                pending, have = [], 0
    if pending:
        yield pending[0] if len(pending) == 1 else b"".join(pending)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


@dataclass(frozen=True)
class RawFrame:
    """A ``Frame`` whose payload is a view of memory in place: the same bytes on the wire as
    ``pb.Frame`` (fields in another order, which protobuf allows), without protobuf's copies.

    Received frames come back as ``RawFrame`` too (see :func:`parse_frame`).
    """

    message_id: int
    index: int
    total: int
    payload: bytes | memoryview
    header_frames: int = 0

    def _head(self) -> bytes:
        parts = [
            b"\x08",
            _varint(self.message_id),
            b"\x10",
            _varint(self.index),
            b"\x18",
            _varint(self.total),
        ]
        if self.header_frames:
            parts += [b"\x28", _varint(self.header_frames)]
        parts += [b"\x22", _varint(len(self.payload))]
        return b"".join(parts)

    def SerializeToString(self) -> bytes:
        """The protobuf encoding of this frame (protobuf's method name, so both kinds serialize alike)."""
        return b"".join((self._head(), self.payload))

    def ByteSize(self) -> int:
        """Length of :meth:`SerializeToString`."""
        return len(self._head()) + len(self.payload)


def serialize_frame(frame: pb.Frame | RawFrame) -> bytes:
    """gRPC serializer for both kinds of frame."""
    return frame.SerializeToString()


_U32 = 2**32
_U64 = 2**64


def parse_frame(data: bytes) -> pb.Frame | RawFrame:
    """gRPC deserializer: a :class:`RawFrame` viewing ``data`` when it is a plain ``Frame`` encoding,
    else whatever protobuf makes of it (``pb.Frame``, or its ``DecodeError``)."""
    fields: dict[int, int] = {}
    payload: memoryview | None = None
    pos, end = 0, len(data)
    view = memoryview(data)
    seen = 0
    while pos < end:
        seen += 1
        if seen > 5:  # a frame has 5 fields: anything longer is protobuf's (in C) to read
            return pb.Frame.FromString(data)
        tag = data[pos]
        pos += 1
        value = shift = 0
        while pos < end and shift < 70:  # a varint: the value, or the payload's length
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        else:
            return pb.Frame.FromString(data)
        if tag == 0x22:
            if pos + value > end:
                return pb.Frame.FromString(data)
            payload, pos = view[pos : pos + value], pos + value
        elif tag in (0x08, 0x10, 0x18, 0x28) and value < (_U64 if tag == 0x08 else _U32):
            fields[tag] = value
        else:
            return pb.Frame.FromString(data)
    return RawFrame(
        fields.get(0x08, 0),
        fields.get(0x10, 0),
        fields.get(0x18, 0),
        payload if payload is not None else b"",
        fields.get(0x28, 0),
    )


class Reassembler:
    """Collects frames into envelopes, enforcing order and size limits.

    After the last frame of a message, :meth:`push` returns its envelope and :attr:`external`
    holds the raw data of its ``external`` tensors (``None`` when it has none).
    """

    def __init__(self, limits: WireLimits) -> None:
        self.limits = limits
        self.external: memoryview | None = None
        self._id: int | None = None
        self._parts: list[bytes | memoryview] = []
        self._size = self._total = self._header = self._index = self._filled = self._announced = 0
        self._envelope: pb.Envelope | None = None
        self._raw: list[bytes | memoryview] = []

    def push(self, frame: pb.Frame | RawFrame) -> pb.Envelope | None:
        """Add a frame; return the envelope when its last frame arrived. Raises :class:`WireError`."""
        if frame.total < 1 or frame.total > self.limits.max_frames:
            self._reset()
            raise WireError(
                f"frame says its message has {frame.total} frames; between 1 and {self.limits.max_frames} allowed "
                f"(messages up to {self.limits.max_message_bytes} bytes)"
            )
        header = frame.header_frames or frame.total
        if self._id is None:
            if frame.index != 0:
                raise WireError(
                    f"message {frame.message_id} started at frame {frame.index}, expected frame 0"
                )
            if header > frame.total:
                raise WireError(f"frame says {header} of its message's {frame.total} frames are the envelope")
            self._id, self._total, self._header = frame.message_id, frame.total, header
        elif (
            frame.message_id != self._id
            or frame.index != self._index
            or frame.total != self._total
            or header != self._header
        ):
            expected = (self._id, self._index, self._total)
            self._reset()
            raise WireError(
                f"out-of-order frame (message {frame.message_id}, index {frame.index}/{frame.total}); "
                f"expected message {expected[0]} index {expected[1]}/{expected[2]}"
            )
        self._index += 1
        self._size += len(frame.payload)
        if self._size > self.limits.max_message_bytes:
            self._reset()
            raise WireError(f"message exceeds the session's limit of {self.limits.max_message_bytes} bytes")
        if frame.index < self._header:
            self._parts.append(frame.payload)
            if frame.index == self._header - 1:
                self._open_envelope()
        else:
            self._fill(frame.payload)
        if self._index < self._total:
            return None
        envelope, raw, filled, announced = self._envelope, self._raw, self._filled, self._announced
        self._reset()
        assert envelope is not None
        if filled != announced:
            raise WireError(f"the envelope's tensors announce {announced} bytes of raw data; {filled} came")
        self.external = None
        if announced:
            # Memory only for data that came (a peer cannot make us reserve what it announces).
            buffer = bytearray(announced)
            offset = 0
            for piece in raw:
                buffer[offset : offset + len(piece)] = piece
                offset += len(piece)
            self.external = memoryview(buffer)
        return envelope

    def _open_envelope(self) -> None:
        payload = b"".join(self._parts)
        self._parts = []
        envelope = pb.Envelope()
        try:
            envelope.ParseFromString(payload)
        except DecodeError as err:
            self._reset()
            raise WireError(f"message is not a valid protobuf Envelope: {err}") from None
        announced = sum(int(t.external) for t in envelope.tensors)
        if (announced > 0) != (self._total > self._header) or announced > self.limits.max_message_bytes:
            self._reset()
            raise WireError(
                f"the envelope announces {announced} bytes of raw data in {self._total - self._header} frames "
                f"(at most {self.limits.max_message_bytes} bytes, and frames exactly when there is data)"
            )
        self._envelope = envelope
        self._announced = announced

    def _fill(self, payload: bytes | memoryview) -> None:
        end = self._filled + len(payload)
        if end > self._announced:
            size = self._announced
            self._reset()
            raise WireError(f"more raw data than the envelope's tensors announce ({size} bytes)")
        self._raw.append(payload)
        self._filled = end

    def _reset(self) -> None:
        self._id = None
        self._parts = []
        self._size = self._total = self._header = self._index = self._filled = self._announced = 0
        self._envelope = None
        self._raw = []


def frames_of(
    message: Message,
    seq: int,
    direction: Direction,
    codecs: WireCodecs | None,
    error: str = "",
    view: bool = False,
    code: ErrorCode | None = None,
) -> Iterator[pb.Frame | RawFrame]:
    """Encode and frame a message in one go; ``seq`` doubles as the frame message id.

    Tensors of :data:`EXTERNAL_MIN_BYTES` or more travel in raw frames after the envelope; with
    ``view`` those frames view the tensors' memory, which must not change until they are sent.
    A refusal carries ``error`` (the explanation) and ``code`` (what the sender must do).
    """
    envelope, externals = _encode(message, seq, direction, codecs, error, EXTERNAL_MIN_BYTES, view)
    if error:
        envelope.code = (code or ErrorCode.BAD_MESSAGE).value
    yield from to_frames(envelope, seq, externals)
