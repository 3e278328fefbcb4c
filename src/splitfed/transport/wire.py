"""Messages to bytes and back: protobuf envelopes, tensor codecs per direction, and framing.

A :class:`~splitfed.transport.channel.Message` becomes an ``Envelope`` whose tensors are encoded by
:mod:`splitfed.transport.codec` (raw little-endian bytes with dtype and shape, optionally
compressed); the serialized envelope is cut into ``Frame`` pieces so that a message of any size
fits under gRPC's per-message limit. Decoding validates everything against :class:`WireLimits`
before allocating: a bad message raises :class:`WireError` with what was wrong, never crashes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from google.protobuf.message import DecodeError

from splitfed.transport.channel import Direction, Message, MetaValue
from splitfed.transport.codec import CodecError, EncodedTensor, Limits, TopKCompressor, decode, encode
from splitfed.transport.proto import splitfed_pb2 as pb

FRAME_BYTES = 4 << 20  # 4 MiB per frame (the channels allow 8 MiB messages)
PROTOCOL_VERSION = 1

ActivationCodec = Literal["fp32", "fp16", "bf16", "int8"]
GradientCodec = Literal["fp32", "fp16", "bf16", "topk"]
_CODEC_NAME = {"fp32": "raw", "fp16": "fp16", "bf16": "bf16", "int8": "int8", "topk": "topk"}
#: Which tensors are activations and which are gradients (the rest, masks and labels, go raw).
ACTIVATIONS = {"hidden", "logits"}
GRADIENTS = {"grad"}


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

    def encode_tensor(self, direction: Direction, kind: str, name: str, tensor: object) -> EncodedTensor:
        """Encode one tensor of a message with the codec configured for it."""
        import torch

        assert isinstance(tensor, torch.Tensor)
        if name in ACTIVATIONS and tensor.is_floating_point():
            return encode(name, tensor, _CODEC_NAME[self.activations])
        if name in GRADIENTS and tensor.is_floating_point():
            if self.gradients == "topk":
                key = f"{direction}/{kind}/{name}"
                compressor = self._topk.setdefault(key, TopKCompressor(self.topk_ratio))
                return compressor.encode(name, tensor)
            return encode(name, tensor, _CODEC_NAME[self.gradients])
        return encode(name, tensor, "raw")


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


def to_envelope(
    message: Message, seq: int, direction: Direction, codecs: WireCodecs | None = None, error: str = ""
) -> pb.Envelope:
    """Encode a message (tensors through ``codecs``; everything raw when ``None``)."""
    codecs = codecs or WireCodecs()
    envelope = pb.Envelope(kind=message.kind, seq=seq, error=error)
    for name, tensor in message.tensors.items():
        enc = codecs.encode_tensor(direction, message.kind, name, tensor)
        envelope.tensors.append(
            pb.TensorProto(
                name=enc.name,
                dtype=enc.dtype,
                shape=list(enc.shape),
                codec=enc.codec,
                data=enc.data,
                scale=enc.scale,
                indices=enc.indices,
            )
        )
    _meta_to_proto(envelope, message.meta)
    return envelope


def from_envelope(envelope: pb.Envelope, limits: WireLimits) -> Message:
    """Decode and validate an envelope's tensors; raises :class:`WireError`."""
    if len(envelope.tensors) > limits.max_tensors:
        raise WireError(
            f"message carries {len(envelope.tensors)} tensors; at most {limits.max_tensors} allowed"
        )
    if len(envelope.meta) > limits.max_meta:
        raise WireError(
            f"message carries {len(envelope.meta)} metadata entries; at most {limits.max_meta} allowed"
        )
    tensors = {}
    for proto in envelope.tensors:
        if proto.name in tensors:
            raise WireError(f"tensor {proto.name!r} appears twice in one message")
        if len(proto.shape) > limits.tensor.max_dims:
            raise WireError(
                f"tensor {proto.name!r} has {len(proto.shape)} dims; at most {limits.tensor.max_dims}"
            )
        enc = EncodedTensor(
            name=proto.name,
            dtype=proto.dtype,
            shape=tuple(int(s) for s in proto.shape),
            codec=proto.codec,
            data=proto.data,
            scale=proto.scale,
            indices=proto.indices,
        )
        try:
            tensors[proto.name] = decode(enc, limits.tensor)
        except CodecError as err:
            raise WireError(str(err)) from None
    return Message(envelope.kind, tensors, _meta_from_proto(envelope))


def to_frames(envelope: pb.Envelope, message_id: int) -> list[pb.Frame]:
    """Serialize and cut into frames of at most :data:`FRAME_BYTES`."""
    payload = envelope.SerializeToString()
    total = max(1, math.ceil(len(payload) / FRAME_BYTES))
    return [
        pb.Frame(
            message_id=message_id,
            index=i,
            total=total,
            payload=payload[i * FRAME_BYTES : (i + 1) * FRAME_BYTES],
        )
        for i in range(total)
    ]


class Reassembler:
    """Collects frames into envelopes, enforcing order and size limits."""

    def __init__(self, limits: WireLimits) -> None:
        self.limits = limits
        self._id: int | None = None
        self._parts: list[bytes] = []
        self._size = 0
        self._total = 0

    def push(self, frame: pb.Frame) -> pb.Envelope | None:
        """Add a frame; return the envelope when its last frame arrived. Raises :class:`WireError`."""
        if frame.total < 1 or frame.total > self.limits.max_frames:
            self._reset()
            raise WireError(
                f"frame says its message has {frame.total} frames; between 1 and {self.limits.max_frames} allowed "
                f"(messages up to {self.limits.max_message_bytes} bytes)"
            )
        if self._id is None:
            if frame.index != 0:
                raise WireError(
                    f"message {frame.message_id} started at frame {frame.index}, expected frame 0"
                )
            self._id, self._total = frame.message_id, frame.total
        elif frame.message_id != self._id or frame.index != len(self._parts) or frame.total != self._total:
            expected = (self._id, len(self._parts), self._total)
            self._reset()
            raise WireError(
                f"out-of-order frame (message {frame.message_id}, index {frame.index}/{frame.total}); "
                f"expected message {expected[0]} index {expected[1]}/{expected[2]}"
            )
        self._size += len(frame.payload)
        if self._size > self.limits.max_message_bytes:
            self._reset()
            raise WireError(f"message exceeds the session's limit of {self.limits.max_message_bytes} bytes")
        self._parts.append(frame.payload)
        if len(self._parts) < self._total:
            return None
        payload = b"".join(self._parts)
        self._reset()
        envelope = pb.Envelope()
        try:
            envelope.ParseFromString(payload)
        except DecodeError as err:
            raise WireError(f"message is not a valid protobuf Envelope: {err}") from None
        return envelope

    def _reset(self) -> None:
        self._id, self._parts, self._size, self._total = None, [], 0, 0


def frames_of(
    message: Message, seq: int, direction: Direction, codecs: WireCodecs | None, error: str = ""
) -> Iterator[pb.Frame]:
    """Encode and frame a message in one go; ``seq`` doubles as the frame message id."""
    yield from to_frames(to_envelope(message, seq, direction, codecs, error), seq)
