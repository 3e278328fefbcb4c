"""Aggregator payloads and adapters carried in Flower messages, and read back with the receiver's checks.

A :class:`~splitfed.federated.aggregators.Payload` becomes two records of a Flower
:class:`~flwr.app.RecordDict`: ``<key>.tensors`` (an :class:`~flwr.app.ArrayRecord`, one array
per tensor: ciphertext bytes as ``uint8``, masked integers, floats) and ``<key>.meta`` (a
:class:`~flwr.app.ConfigRecord` with the kind and the metadata as one JSON string). Arrays cross
as NumPy's ``.npy`` format, which Flower reads with ``allow_pickle=False``; the receiver checks
every array's dtype against a short allow-list before reading it, and the aggregator's own schema
then checks names, sizes and metadata (:meth:`Aggregator.validate
<splitfed.federated.aggregators.Aggregator.validate>`), exactly as for the split runtime's
messages. Nothing here unpickles.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from splitfed.federated.aggregators import AggregationError, Payload

__all__ = ["FlowerProtocolError", "digest", "get_payload", "get_tensors", "put_payload", "put_tensors"]

#: Dtypes a payload or adapter array may have on the wire.
_DTYPES: dict[str, torch.dtype] = {
    "bool": torch.bool,
    "uint8": torch.uint8,
    "int32": torch.int32,
    "int64": torch.int64,
    "float32": torch.float32,
    "float64": torch.float64,
}
_MAX_META_CHARS = 1 << 24


class FlowerProtocolError(AggregationError):
    """A Flower message that does not hold what this protocol's step expects."""


def _array(tensor: torch.Tensor) -> Array:
    t = tensor.detach().to("cpu").contiguous()
    if str(t.dtype).removeprefix("torch.") not in _DTYPES:
        raise FlowerProtocolError(f"a {t.dtype} tensor cannot cross; only {sorted(_DTYPES)} do")
    return Array(t.numpy())


def _tensor(array: Array, *, where: str) -> torch.Tensor:
    if array.stype != "numpy.ndarray" or array.dtype not in _DTYPES:
        raise FlowerProtocolError(
            f"{where}: array of type {array.stype!r}, dtype {array.dtype!r}; only NumPy arrays of "
            f"{sorted(_DTYPES)} are read"
        )
    try:
        value = array.numpy()
    except (ValueError, TypeError, OSError) as err:
        raise FlowerProtocolError(f"{where}: array does not parse ({err})") from None
    if str(value.dtype) != array.dtype or list(value.shape) != list(array.shape):
        raise FlowerProtocolError(f"{where}: array content disagrees with its declared dtype and shape")
    return torch.from_numpy(np.ascontiguousarray(value).copy())


def put_payload(content: RecordDict, key: str, payload: Payload) -> None:
    """Store ``payload`` under ``key`` in ``content``."""
    content[f"{key}.tensors"] = ArrayRecord(
        array_dict={name: _array(t) for name, t in payload.tensors.items()}, keep_input=True
    )
    content[f"{key}.meta"] = ConfigRecord({"kind": payload.kind, "meta": json.dumps(payload.meta)})


def get_payload(content: RecordDict, key: str, *, sender: str = "") -> Payload:
    """The payload stored under ``key``; raises :class:`FlowerProtocolError` if it is not one.

    Validate the result with the aggregator (its schema) before use.
    """
    where = f"payload {key!r}" + (f" from {sender}" if sender else "")
    tensors_record, meta_record = content.get(f"{key}.tensors"), content.get(f"{key}.meta")
    if not isinstance(tensors_record, ArrayRecord) or not isinstance(meta_record, ConfigRecord):
        raise FlowerProtocolError(f"{where}: missing (the message carries {sorted(content.keys())})")
    kind, meta_text = meta_record.get("kind"), meta_record.get("meta")
    if not isinstance(kind, str) or not isinstance(meta_text, str) or len(meta_text) > _MAX_META_CHARS:
        raise FlowerProtocolError(f"{where}: kind and metadata must be strings (metadata under 16 MiB)")
    try:
        meta = json.loads(meta_text)
    except (ValueError, RecursionError) as err:
        raise FlowerProtocolError(f"{where}: metadata is not JSON ({err})") from None
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and (v is None or isinstance(v, (bool, int, float, str))) for k, v in meta.items()
    ):
        raise FlowerProtocolError(f"{where}: metadata must map names to scalars")
    tensors = {name: _tensor(array, where=f"{where}, {name!r}") for name, array in tensors_record.items()}
    return Payload(kind, tensors, meta)


def put_tensors(content: RecordDict, key: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Store named float tensors (adapters) under ``key``."""
    content[key] = ArrayRecord(
        array_dict={n: _array(t.detach().float()) for n, t in tensors.items()}, keep_input=True
    )


def get_tensors(
    content: RecordDict, key: str, *, like: Mapping[str, torch.Tensor] | None = None, sender: str = ""
) -> dict[str, torch.Tensor]:
    """Float tensors stored under ``key``; with ``like``, exactly its names and shapes, finite."""
    where = f"tensors {key!r}" + (f" from {sender}" if sender else "")
    record = content.get(key)
    if not isinstance(record, ArrayRecord):
        raise FlowerProtocolError(f"{where}: missing (the message carries {sorted(content.keys())})")
    out = {name: _tensor(array, where=f"{where}, {name!r}") for name, array in record.items()}
    if like is not None:
        if set(out) != set(like):
            raise FlowerProtocolError(
                f"{where}: names differ from the model's adapters ({len(out)} vs {len(like)} tensors)"
            )
        for name, t in out.items():
            if t.shape != like[name].shape or not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise FlowerProtocolError(
                    f"{where}: {name!r} must be a finite float tensor of shape {tuple(like[name].shape)}"
                )
    return out


def digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """A short fingerprint of named tensors (order-independent), to check that parties agree."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]
