"""Tensor wire codec: how one named tensor crosses the split as bytes.

An :class:`EncodedTensor` is a small header (name, logical dtype, shape, codec) plus raw
little-endian byte payloads. The gRPC runtime maps it 1:1 onto a protobuf message with the same
field names; nothing else is sent, and nothing is ever unpickled or ``torch.load``-ed.

Codecs (``codec`` field):

``"raw"``
    The tensor's own dtype bytes; decoded bit-exactly. ``bool`` is one byte per element (0 or 1),
    ``bfloat16`` is its 16-bit pattern.
``"fp16"`` / ``"bf16"``
    Floating tensors cast to float16 / bfloat16 on the wire and cast back to the logical dtype on
    decode. Relative error ≤ 2⁻¹¹ (fp16, normal range) and ≤ 2⁻⁸ (bf16) per element.
``"int8"``
    Per-row ("per-token": each row over the last dimension) symmetric quantization:
    ``scale = absmax / 127`` (fp32, one per row; 1 for all-zero rows), ``q = round(x / scale)``
    clipped to [-127, 127]. Decoded as ``q * scale``; the error per element is at most
    ``scale / 2`` (plus the rounding of the logical dtype when it is narrower than fp32).
    Bytes: ``numel + 4 * rows``, about a quarter of fp32.
``"topk"``
    Sparse: fp32 values in ``data``, int32 flat indices in ``indices``; every other element decodes
    to zero. Produced only by :class:`TopKCompressor`, which keeps the dropped part as an
    error-feedback residual. Duplicate indices are accepted and add up.

All multi-byte numbers on the wire are little-endian, whatever the host's byte order.

:func:`decode` treats every field as untrusted: it checks codec, dtype, rank, each dimension, the
element count and the exact byte lengths against :class:`Limits` *before* allocating anything, and
raises :class:`CodecError` (never another exception) for a malformed message.

Reference for top-k sparsification with error feedback: Stich, Cordonnier & Jaggi, "Sparsified SGD
with Memory", NeurIPS 2018.
"""

from __future__ import annotations

import itertools
import math
import operator
import sys
from collections.abc import Sized
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = [
    "CODECS",
    "DTYPES",
    "CodecError",
    "EncodedTensor",
    "Limits",
    "TopKCompressor",
    "decode",
    "encode",
]

# Logical dtype name -> (torch dtype, element size in bytes).
_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "float32": (torch.float32, 4),
    "float16": (torch.float16, 2),
    "bfloat16": (torch.bfloat16, 2),
    "int64": (torch.int64, 8),
    "int32": (torch.int32, 4),
    "int8": (torch.int8, 1),
    "uint8": (torch.uint8, 1),
    "bool": (torch.bool, 1),
}
_DTYPE_NAMES: dict[torch.dtype, str] = {dt: name for name, (dt, _) in _DTYPES.items()}
_FLOATING = frozenset({"float32", "float16", "bfloat16"})

DTYPES: tuple[str, ...] = tuple(_DTYPES)
"""Logical dtypes a tensor may have on the wire."""

CODECS: tuple[str, ...] = ("raw", "fp16", "bf16", "int8", "topk")
"""Known codec names."""

_WIRE_FLOAT = {"fp16": torch.float16, "bf16": torch.bfloat16}
_INT32_MAX = 2**31 - 1


class CodecError(ValueError):
    """A tensor cannot be encoded, or an encoded tensor is malformed or exceeds the limits.

    The message names the tensor, says what was wrong and gives the expected and actual values.
    """


def _label(name: object) -> str:
    text = repr(name)
    return text if len(text) <= 80 else text[:77] + "..."


def _fail(name: object, what: str) -> CodecError:
    return CodecError(f"tensor {_label(name)}: {what}")


@dataclass(repr=False)
class EncodedTensor:
    """One tensor as it crosses the wire.

    Parameters
    ----------
    name : str
        The tensor's name within its message.
    dtype : str
        Logical dtype of the decoded tensor, one of :data:`DTYPES`.
    shape : tuple[int, ...]
        Shape of the decoded tensor (``()`` for a 0-d tensor).
    codec : str
        One of :data:`CODECS`.
    data : bytes | memoryview
        Little-endian payload: the elements (``raw``/``fp16``/``bf16``), int8 codes (``int8``) or
        fp32 values (``topk``).
    scale : bytes, default b""
        ``int8`` only: one little-endian fp32 scale per row.
    indices : bytes, default b""
        ``topk`` only: little-endian int32 flat indices, one per value.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    codec: str
    data: bytes | memoryview
    scale: bytes = b""
    indices: bytes = b""

    @property
    def nbytes(self) -> int:
        """Payload bytes on the wire: ``len(data) + len(scale) + len(indices)``."""
        return len(self.data) + len(self.scale) + len(self.indices)

    def __repr__(self) -> str:
        # Never print the payload: it can be megabytes and is not meant for logs.
        return (
            f"EncodedTensor(name={self.name!r}, dtype={self.dtype!r}, shape={self.shape!r}, "
            f"codec={self.codec!r}, data=<{_safe_len(self.data)} bytes>, "
            f"scale=<{_safe_len(self.scale)} bytes>, indices=<{_safe_len(self.indices)} bytes>)"
        )


def _safe_len(buf: object) -> str:
    return str(len(buf)) if isinstance(buf, Sized) else type(buf).__name__


@dataclass(frozen=True)
class Limits:
    """What the receiving side accepts (negotiated per session).

    Parameters
    ----------
    max_elements : int, default 64 * 2**20
        Most elements of one decoded tensor (also bounds each dimension and the int8 row count).
    max_dims : int, default 4
        Most dimensions of one tensor.
    allowed_dtypes : frozenset[str], default all of :data:`DTYPES`
        Logical dtypes accepted.
    require_finite : bool, default True
        Reject floating tensors containing NaN or ±inf.
    max_abs : float | None, default None
        With ``require_finite``: also reject floating values of magnitude above this (finite but
        huge values overflow a receiver's update; a model party sets it).
    """

    max_elements: int = 64 * 2**20
    max_dims: int = 4
    allowed_dtypes: frozenset[str] = field(default_factory=lambda: frozenset(_DTYPES))
    require_finite: bool = True
    max_abs: float | None = None

    def __post_init__(self) -> None:
        if self.max_elements < 0 or self.max_dims < 0:
            raise ValueError(
                f"Limits: max_elements and max_dims must be >= 0, got {self.max_elements} and {self.max_dims}"
            )
        allowed = frozenset(self.allowed_dtypes)
        unknown = sorted(allowed - set(_DTYPES))
        if unknown:
            raise ValueError(f"Limits: unknown dtypes {unknown}; known: {list(_DTYPES)}")
        object.__setattr__(self, "allowed_dtypes", allowed)


# ----------------------------------------------------------------------------------------- bytes


def _array(t: torch.Tensor) -> np.ndarray:
    """A numpy array over a contiguous CPU copy-or-self of ``t`` (bf16 as int16, bool as uint8)."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy()
    if t.dtype == torch.bool:
        return t.numpy().view(np.uint8)
    return t.numpy()


def _to_bytes(t: torch.Tensor) -> bytes:
    """Little-endian bytes of a tensor with a supported dtype (any device, any layout)."""
    arr = _array(t)
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def _to_buffer(t: torch.Tensor, view: bool) -> bytes | memoryview:
    """:func:`_to_bytes`, or with ``view`` on a little-endian host a read-only view of the tensor's
    memory (no copy); the caller must not change the tensor while the view is in use."""
    if view and sys.byteorder == "little":
        return memoryview(_array(t)).cast("B").toreadonly()  # type: ignore[arg-type]
    return _to_bytes(t)


def _from_bytes(
    buf: Any, dtype: torch.dtype, shape: tuple[int, ...], name: str, owned: bool = False
) -> torch.Tensor:
    """A writable tensor holding ``buf`` (length already checked) as ``dtype`` elements.

    A fresh copy, unless ``owned`` (``buf`` is a writable buffer nobody else uses): then its memory.
    """
    if dtype == torch.bool:
        src = np.frombuffer(buf, dtype=np.uint8)
        if (src > 1).any():
            bad = int(np.flatnonzero(src > 1)[0])
            raise _fail(name, f"bool byte at element {bad} is {int(src[bad])}: expected 0 or 1")
    if sys.byteorder == "little":
        # One copy into memory the tensor owns: the result never aliases the message.
        if not len(buf):
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf if owned else bytearray(buf), dtype=dtype).reshape(shape)
    out = torch.empty(shape, dtype=dtype)
    target = out.view(torch.int16).numpy() if dtype == torch.bfloat16 else out.numpy()
    source = np.frombuffer(buf, dtype=np.uint8 if dtype == torch.bool else target.dtype.newbyteorder("<"))
    target[...] = source.reshape(shape)  # copies and byte-swaps
    return out


# ---------------------------------------------------------------------------------------- encode


def _dtype_name(name: str, tensor: torch.Tensor) -> str:
    if not isinstance(tensor, torch.Tensor):
        raise _fail(name, f"expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise _fail(name, f"layout {tensor.layout} is not supported: call .to_dense() first")
    dtype_name = _DTYPE_NAMES.get(tensor.dtype)
    if dtype_name is None:
        raise _fail(name, f"dtype {tensor.dtype} cannot go on the wire: cast it to one of {list(_DTYPES)}")
    return dtype_name


def _rows(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, row length) of the int8 layout: rows over the last dimension; a 0-d tensor is 1x1."""
    if not shape:
        return 1, 1
    return math.prod(shape[:-1]), shape[-1]


def _quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = _rows(tuple(x.shape))
    xf = x.detach().float().reshape(rows, cols)
    if cols == 0:
        scale = torch.ones(rows, dtype=torch.float32, device=x.device)
    else:
        scale = xf.abs().amax(dim=1) / 127.0
        # All-zero rows (and absmax so small that absmax/127 underflows) would divide by zero.
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xf / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def encode(name: str, tensor: torch.Tensor, codec: str = "raw", view: bool = False) -> EncodedTensor:
    """Encode one tensor for the wire.

    Parameters
    ----------
    name : str
        The tensor's name within its message.
    tensor : torch.Tensor
        Any device; dtype one of :data:`DTYPES`. Not modified.
    codec : str, default "raw"
        ``"raw"``, ``"fp16"``, ``"bf16"`` or ``"int8"`` (the last three for floating tensors only).
        ``"topk"`` needs state: use :class:`TopKCompressor`.
    view : bool, default False
        ``"raw"`` only: ``data`` may be a view of the tensor's memory instead of a copy (the wire
        uses it for big tensors it sends before the tensor can change).

    Returns
    -------
    EncodedTensor
        Header plus little-endian payload; ``decode(encode(name, t))`` equals ``t`` bit for bit.

    Raises
    ------
    CodecError
        Unknown codec, unsupported dtype, a lossy codec on a non-floating tensor, a value that would
        overflow the wire or logical dtype (e.g. |x| > 65504 with ``"fp16"``), or non-finite values
        with ``"int8"``.
    """
    if not isinstance(name, str):
        raise CodecError(f"tensor name must be a str, got {type(name).__name__}")
    dtype_name = _dtype_name(name, tensor)
    shape = tuple(int(d) for d in tensor.shape)
    if codec == "raw":
        return EncodedTensor(name, dtype_name, shape, "raw", _to_buffer(tensor, view))
    if codec == "topk":
        raise _fail(
            name,
            "codec 'topk' needs per-stream error-feedback state: use "
            "TopKCompressor(ratio).encode(name, tensor) instead of encode(..., 'topk')",
        )
    if codec not in CODECS:
        raise _fail(name, f"unknown codec {codec!r}: expected one of {list(CODECS)}")
    if dtype_name not in _FLOATING:
        raise _fail(name, f"codec {codec!r} needs a floating tensor, got dtype {dtype_name}: use codec 'raw'")
    x = tensor.detach()
    if codec == "int8":
        if not _all_finite(x):
            raise _fail(name, "codec 'int8' cannot carry NaN or inf: expected finite values")
        q, scale = _quantize_int8(x)
        return EncodedTensor(name, dtype_name, shape, "int8", _to_bytes(q), scale=_to_bytes(scale))
    wire = x.to(_WIRE_FLOAT[codec])
    back = wire.to(x.dtype)
    if not _all_finite(back) and bool((~torch.isfinite(back) & torch.isfinite(x)).any()):
        worst = float(x.float().abs().max())
        raise _fail(
            name,
            f"codec {codec!r} overflows: |x| up to {worst:.6g} does not fit {_WIRE_FLOAT[codec]} "
            f"and back to {dtype_name}; use codec 'bf16', 'int8' or 'raw'",
        )
    return EncodedTensor(name, dtype_name, shape, codec, _to_bytes(wire))


# ---------------------------------------------------------------------------------------- decode


def _check_str(name: str, field_name: str, value: object) -> str:
    if not isinstance(value, str):
        raise _fail(name, f"field {field_name!r} must be a str, got {type(value).__name__}")
    return value


def _check_bytes(name: str, field_name: str, value: object) -> bytes | bytearray | memoryview:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise _fail(name, f"field {field_name!r} must be bytes, got {type(value).__name__}")
    if isinstance(value, memoryview) and (value.ndim != 1 or value.itemsize != 1):
        raise _fail(name, f"field {field_name!r} must be a flat byte buffer")
    return value


def _check_shape(name: str, shape: object, limits: Limits) -> tuple[int, ...]:
    if isinstance(shape, str | bytes | bytearray) or not isinstance(shape, Sized):
        raise _fail(name, f"shape must be a sequence of ints, got {type(shape).__name__}")
    ndim = len(shape)
    if ndim > limits.max_dims:
        raise _fail(name, f"too many dimensions: expected at most {limits.max_dims}, got {ndim}")
    try:
        items = list(itertools.islice(iter(shape), ndim + 1))  # type: ignore[call-overload]
    except TypeError:
        raise _fail(name, f"shape must be a sequence of ints, got {type(shape).__name__}") from None
    if len(items) != ndim:
        raise _fail(name, f"shape yields {len(items)} items but has length {ndim}")
    dims: list[int] = []
    for i, d in enumerate(items):
        if isinstance(d, bool):
            raise _fail(name, f"shape[{i}] must be an int, got bool")
        try:
            dim = operator.index(d)
        except TypeError:
            raise _fail(name, f"shape[{i}] must be an int, got {type(d).__name__}") from None
        if dim < 0:
            raise _fail(name, f"negative dimension: shape[{i}] = {dim}, expected >= 0")
        if dim > limits.max_elements:
            raise _fail(name, f"dimension too large: shape[{i}] = {dim}, limit {limits.max_elements}")
        dims.append(dim)
    out = tuple(dims)
    numel = math.prod(out)
    if numel > limits.max_elements:
        raise _fail(name, f"too many elements: shape {out} has {numel}, limit {limits.max_elements}")
    return out


def _check_len(name: str, field_name: str, buf: Sized, expected: int, why: str) -> None:
    if len(buf) != expected:
        raise _fail(name, f"{field_name} has {len(buf)} bytes, expected {expected} ({why})")


def decode(enc: EncodedTensor, limits: Limits | None = None, owned: bool = False) -> torch.Tensor:
    """Decode an untrusted :class:`EncodedTensor` into a fresh CPU tensor.

    Everything is validated before any allocation: codec known, dtype known and allowed, at most
    ``limits.max_dims`` dimensions, every dimension ``>= 0``, at most ``limits.max_elements``
    elements, byte lengths matching shape/dtype/codec exactly, top-k indices in bounds, bool bytes
    0 or 1, and (with ``limits.require_finite``) a finite result.

    Parameters
    ----------
    enc : EncodedTensor
        As received; any field may be wrong.
    limits : Limits | None, default None
        What this side accepts; ``None`` means ``Limits()``.
    owned : bool, default False
        ``enc.data`` is a writable buffer nobody else uses (the wire's raw frames): a raw tensor
        may keep its memory instead of copying it.

    Returns
    -------
    torch.Tensor
        Writable, contiguous, not sharing memory with ``enc``; dtype ``enc.dtype``, shape
        ``enc.shape``.

    Raises
    ------
    CodecError
        For any malformed message or one exceeding ``limits``; the message says which field was
        wrong, what was expected and what was received.
    """
    limits = Limits() if limits is None else limits
    name = getattr(enc, "name", "<unnamed>")
    if not isinstance(name, str):
        raise CodecError(f"field 'name' must be a str, got {type(name).__name__}")
    # The .proto documents an empty codec as raw (protobuf's default for an unset string).
    codec = _check_str(name, "codec", getattr(enc, "codec", None)) or "raw"
    if codec not in CODECS:
        raise _fail(name, f"unknown codec {codec!r}: expected one of {list(CODECS)}")
    dtype_name = _check_str(name, "dtype", getattr(enc, "dtype", None))
    if dtype_name not in _DTYPES:
        raise _fail(name, f"unknown dtype {dtype_name!r}: expected one of {list(_DTYPES)}")
    if dtype_name not in limits.allowed_dtypes:
        raise _fail(
            name, f"dtype {dtype_name!r} not allowed here: expected one of {sorted(limits.allowed_dtypes)}"
        )
    if codec != "raw" and dtype_name not in _FLOATING:
        raise _fail(name, f"codec {codec!r} needs a floating dtype, got {dtype_name!r}")
    shape = _check_shape(name, getattr(enc, "shape", None), limits)
    data = _check_bytes(name, "data", getattr(enc, "data", None))
    scale = _check_bytes(name, "scale", getattr(enc, "scale", None))
    indices = _check_bytes(name, "indices", getattr(enc, "indices", None))
    numel = math.prod(shape)
    dtype, itemsize = _DTYPES[dtype_name]
    if codec != "int8":
        _check_len(name, "scale", scale, 0, f"only codec 'int8' carries scales, codec is {codec!r}")
    if codec != "topk":
        _check_len(name, "indices", indices, 0, f"only codec 'topk' carries indices, codec is {codec!r}")

    if codec == "raw":
        _check_len(name, "data", data, numel * itemsize, f"{numel} elements x {itemsize} bytes {dtype_name}")
        out = _from_bytes(data, dtype, shape, name, owned)
    elif codec in _WIRE_FLOAT:
        _check_len(name, "data", data, numel * 2, f"{numel} elements x 2 bytes {codec}")
        out = _from_bytes(data, _WIRE_FLOAT[codec], shape, name, owned).to(dtype)
    elif codec == "int8":
        rows, cols = _rows(shape)
        if rows > limits.max_elements:
            raise _fail(name, f"too many int8 rows: shape {shape} has {rows}, limit {limits.max_elements}")
        _check_len(name, "data", data, numel, f"{numel} elements x 1 byte int8")
        _check_len(name, "scale", scale, rows * 4, f"{rows} rows x 4 bytes fp32 scale")
        q = _from_bytes(data, torch.int8, (rows, cols), name, owned)
        scales = _from_bytes(scale, torch.float32, (rows,), name)
        if bool((scales < 0).any()):
            raise _fail(name, f"negative int8 scale at row {int((scales < 0).nonzero()[0, 0])}")
        out = (q.float() * scales[:, None]).reshape(shape).to(dtype)
    else:  # topk
        if len(indices) % 4:
            raise _fail(name, f"indices has {len(indices)} bytes, expected a multiple of 4 (int32)")
        k = len(indices) // 4
        if k > numel:
            raise _fail(name, f"topk has {k} indices, expected at most numel = {numel}")
        _check_len(name, "data", data, k * 4, f"{k} topk values x 4 bytes fp32")
        idx = _from_bytes(indices, torch.int32, (k,), name).long()
        if k and (int(idx.min()) < 0 or int(idx.max()) >= numel):
            bad = int(((idx < 0) | (idx >= numel)).nonzero()[0, 0])
            raise _fail(name, f"topk index {int(idx[bad])} at position {bad} out of range [0, {numel})")
        values = _from_bytes(data, torch.float32, (k,), name)
        flat = torch.zeros(numel, dtype=torch.float32)
        flat.index_put_((idx,), values, accumulate=True)
        out = flat.reshape(shape).to(dtype)

    if limits.require_finite and dtype_name in _FLOATING and not _finite_within(out, limits.max_abs, name):
        finite = torch.isfinite(out)
        count = int((~finite).sum())
        first = int((~finite.reshape(-1)).nonzero()[0, 0])
        raise _fail(
            name,
            f"{count} non-finite value(s) (NaN/inf), first at flat index {first}: expected all finite",
        )
    return out


def _finite_within(t: torch.Tensor, max_abs: float | None, name: str) -> bool:
    """Whether every value of ``t`` is finite; raises if one is finite but above ``max_abs``."""
    if max_abs is None or not t.numel():
        return _all_finite(t)
    low, high = torch.aminmax(t)  # one pass; NaN propagates, so in bounds means finite too
    if bool(low >= -max_abs) and bool(high <= max_abs):
        return True
    if not _all_finite(t):
        return False
    peak = max(abs(float(low)), abs(float(high)))
    raise _fail(name, f"values of magnitude up to {peak:.3g}; at most {max_abs:g} accepted (finite but huge)")


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite.

    A float32 sum is finite when every value is (or it overflowed: then look at every value);
    about 80x faster than ``isfinite`` over vocabulary-sized logits.
    """
    return bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())


# ------------------------------------------------------------------------------------------ top-k


class TopKCompressor:
    """Top-k sparsification with error feedback (residual), one instance per stream/direction.

    Each call adds the residual kept for that tensor name, sends the ``k = ceil(ratio * numel)``
    entries of largest magnitude (fp32 values + int32 indices) and keeps everything else as the new
    residual, so nothing is lost, only delayed: over any run of calls with the same shape,
    ``sum(decoded) == sum(inputs) - final residual``.

    If a name arrives with a different shape, dtype or device than its residual, the residual cannot
    be added and is discarded (that tensor starts afresh); with activations whose sequence length
    varies, use a compressor per shape or call :meth:`reset`.

    Parameters
    ----------
    ratio : float, default 0.01
        Fraction of elements sent, in (0, 1].
    """

    def __init__(self, ratio: float = 0.01) -> None:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"TopKCompressor: ratio must be in (0, 1], got {ratio}")
        self.ratio = float(ratio)
        self._residuals: dict[str, torch.Tensor] = {}

    def k_for(self, numel: int) -> int:
        """How many entries are sent for a tensor of ``numel`` elements."""
        if numel == 0:
            return 0
        # round() strips float noise such as 0.07 * 100 = 7.000000000000001.
        return max(1, min(numel, math.ceil(round(self.ratio * numel, 9))))

    def residual(self, name: str) -> torch.Tensor | None:
        """The fp32 residual currently kept for ``name`` (``None`` if none)."""
        return self._residuals.get(name)

    def encode(self, name: str, tensor: torch.Tensor) -> EncodedTensor:
        """Encode ``tensor`` plus its residual as a ``"topk"`` :class:`EncodedTensor`.

        Raises
        ------
        CodecError
            Non-floating or non-finite input, more than 2**31 - 1 elements (indices are int32), or
            kept values that overflow the logical dtype. The residual is left unchanged.
        """
        if not isinstance(name, str):
            raise CodecError(f"tensor name must be a str, got {type(name).__name__}")
        dtype_name = _dtype_name(name, tensor)
        if dtype_name not in _FLOATING:
            raise _fail(name, f"codec 'topk' needs a floating tensor, got dtype {dtype_name}")
        numel = tensor.numel()
        if numel > _INT32_MAX:
            raise _fail(name, f"codec 'topk' indexes with int32: {numel} elements > {_INT32_MAX}")
        x = tensor.detach().float()
        if not _all_finite(x):
            raise _fail(name, "codec 'topk' cannot carry NaN or inf: expected finite values")
        previous = self._residuals.get(name)
        if previous is not None and previous.shape == x.shape and previous.device == x.device:
            x = x + previous
        flat = x.reshape(-1)
        k = self.k_for(numel)
        idx = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
        values = flat[idx]
        # What the receiver will hold after casting to the logical dtype: feed back its error too.
        received = values.to(tensor.dtype).float()
        if not _all_finite(received):
            raise _fail(name, f"top-k values overflow the logical dtype {dtype_name}")
        residual = flat.clone()
        residual[idx] = values - received
        self._residuals[name] = residual.reshape(x.shape)
        return EncodedTensor(
            name,
            dtype_name,
            tuple(int(d) for d in tensor.shape),
            "topk",
            _to_bytes(values),
            indices=_to_bytes(idx.to(torch.int32)),
        )

    def reset(self, name: str | None = None) -> None:
        """Forget the residual of ``name``, or of every tensor when ``name`` is ``None``."""
        if name is None:
            self._residuals.clear()
        else:
            self._residuals.pop(name, None)
