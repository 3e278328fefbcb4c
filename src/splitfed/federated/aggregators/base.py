"""What every blind aggregator shares: payload records, schemas, the packing layout and the interface.

An aggregator has three roles (Bonawitz et al., 2017 call them the clients' *inputs*, the server's
*sum* and the clients' *output*):

* client side :meth:`Aggregator.encode` turns one client's update and sample weight into a
  :class:`Payload`;
* server side :meth:`Aggregator.combine` adds the payloads of a round without any secret;
* client side :meth:`Aggregator.decode` turns the combined payload into the sample-weighted
  average (FedAvg, McMahan et al., 2017).

A payload is a kind, named tensors and scalar metadata, exactly what a
:class:`~splitfed.transport.channel.Message` carries, so it crosses any transport unchanged:
ciphertexts travel as ``uint8`` tensors, masked integers as ``int32``/``int64`` tensors. Every
kind an aggregator receives is declared by a :class:`PayloadSchema`, so a server validates a
message by the aggregator's own schema before it parses anything.

Every update of a round is flattened in the order of one :class:`Layout` (sorted parameter
names, shapes, dtypes) into a single vector, followed by one weight coordinate per tensor. The
per-tensor weight is the client's sample weight where it holds the tensor and 0 where it does
not, so parties holding different subsets of the layout (heads of different depths) average per
tensor over the parties that hold it, as :func:`splitfed.federated.fedavg.weighted_average` does,
and blind aggregators hide the individual weights along with the values.
"""

from __future__ import annotations

import json
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from splitfed.federated.fedavg import AggregationError
from splitfed.transport.channel import Message, MetaValue

__all__ = [
    "AggregationError",
    "Aggregator",
    "Layout",
    "MetaSpec",
    "Payload",
    "PayloadSchema",
    "TensorSpec",
    "bytes_of",
    "tensor_of",
]

#: The kind of a client's encoded update and of the server's combined aggregate.
UPDATE = "update"
AGGREGATE = "aggregate"

_FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


@dataclass(frozen=True)
class Payload:
    """What one aggregation message carries: a kind, named tensors and scalar metadata.

    Parameters
    ----------
    kind : str
        Which message of the aggregator's protocol this is, e.g. ``"update"`` or ``"aggregate"``.
    tensors : dict[str, torch.Tensor]
        Named CPU tensors (ciphertext bytes as ``uint8``, masked integers, float values).
    meta : dict[str, int | float | str | bool | None]
        Scalars (aggregator name, layout, context id, round).
    """

    kind: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, MetaValue] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Raw bytes of the tensors (what any transport carries at least)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to_message(self) -> Message:
        """The same content as a transport :class:`~splitfed.transport.channel.Message`."""
        return Message(self.kind, dict(self.tensors), dict(self.meta))

    @classmethod
    def from_message(cls, message: Message) -> Payload:
        """A payload from a received message (validate it with the aggregator before use)."""
        return cls(message.kind, dict(message.tensors), dict(message.meta))


@dataclass(frozen=True)
class TensorSpec:
    """What one named tensor of a payload may be.

    Parameters
    ----------
    dtype : torch.dtype
    max_numel : int
        Most elements accepted.
    ndim : int, default 1
        Exact number of dimensions.
    """

    dtype: torch.dtype
    max_numel: int
    ndim: int = 1


@dataclass(frozen=True)
class MetaSpec:
    """What one metadata entry of a payload must be.

    Parameters
    ----------
    type : type
        ``int``, ``float``, ``str`` or ``bool`` (an ``int`` field refuses ``bool``; a ``float``
        field accepts ``int``).
    max_len : int, default 256
        Longest accepted string (``str`` entries only).
    """

    type: type
    max_len: int = 256


@dataclass(frozen=True)
class PayloadSchema:
    """The tensors and metadata one payload kind of an aggregator carries.

    Validation checks names, dtypes, ranks and sizes before anything is parsed; entries of
    ``meta`` are required, metadata keys it does not name are ignored (a runtime may add its own).

    Parameters
    ----------
    aggregator : str
        Name of the aggregator that declares the schema.
    kind : str
    tensors : Mapping[str, TensorSpec]
        Every tensor the kind carries, no more, no less.
    meta : Mapping[str, MetaSpec]
        Required metadata entries.
    """

    aggregator: str
    kind: str
    tensors: Mapping[str, TensorSpec]
    meta: Mapping[str, MetaSpec]

    def validate(self, payload: Payload, *, sender: str = "") -> None:
        """Raise :class:`AggregationError` naming what does not fit; ``sender`` labels the message."""
        where = f"{self.aggregator} {payload.kind!r} payload" + (f" from {sender!r}" if sender else "")
        if payload.kind != self.kind:
            raise AggregationError(f"{where}: expected kind {self.kind!r}")
        missing = sorted(set(self.tensors) - set(payload.tensors))
        unexpected = sorted(set(payload.tensors) - set(self.tensors))
        if missing or unexpected:
            raise AggregationError(
                f"{where}: tensors {sorted(payload.tensors)} do not match the schema {sorted(self.tensors)}"
                f" (missing {missing}, unexpected {unexpected}); sender and receiver must use the same "
                "aggregator"
            )
        for name, spec in self.tensors.items():
            tensor = payload.tensors[name]
            if not isinstance(tensor, torch.Tensor):
                raise AggregationError(f"{where}: {name!r} is a {type(tensor).__name__}, not a tensor")
            if tensor.dtype != spec.dtype or tensor.dim() != spec.ndim:
                raise AggregationError(
                    f"{where}: tensor {name!r} is {tensor.dtype} with {tensor.dim()} dims; the schema says "
                    f"{spec.dtype} with {spec.ndim}"
                )
            if tensor.numel() > spec.max_numel:
                raise AggregationError(
                    f"{where}: tensor {name!r} has {tensor.numel()} elements; at most {spec.max_numel} "
                    "accepted (raise the aggregator's max_numel on both sides if the model is that big)"
                )
            if tensor.device.type != "cpu":
                raise AggregationError(f"{where}: tensor {name!r} is on {tensor.device}; payloads are CPU")
        for key, mspec in self.meta.items():
            if key not in payload.meta or payload.meta[key] is None:
                raise AggregationError(f"{where}: metadata {key!r} is missing")
            value = payload.meta[key]
            ok = (
                isinstance(value, (int, float)) and not isinstance(value, bool)
                if mspec.type is float
                else isinstance(value, mspec.type) and not (mspec.type is int and isinstance(value, bool))
            )
            if not ok:
                raise AggregationError(
                    f"{where}: metadata {key!r} = {value!r} is a {type(value).__name__}, "
                    f"expected {mspec.type.__name__}"
                )
            if isinstance(value, str) and len(value) > mspec.max_len:
                raise AggregationError(
                    f"{where}: metadata {key!r} has {len(value)} characters; at most {mspec.max_len}"
                )
        if payload.meta.get("aggregator") != self.aggregator:
            raise AggregationError(
                f"{where}: made by aggregator {payload.meta.get('aggregator')!r}; this round uses "
                f"{self.aggregator!r} (every party of a round must select the same aggregator)"
            )


def tensor_of(data: bytes) -> torch.Tensor:
    """Bytes as a 1-D ``uint8`` tensor (how ciphertexts and keys travel)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def bytes_of(tensor: torch.Tensor) -> bytes:
    """The bytes of a ``uint8`` tensor (inverse of :func:`tensor_of`)."""
    return tensor.detach().to("cpu").contiguous().numpy().tobytes()


@dataclass(frozen=True)
class Layout:
    """The order in which a round's updates are flattened into one vector.

    Every client of a round must use the same layout: by default the one of its own update
    (sorted names), or an explicit union layout when parties hold different subsets.

    Parameters
    ----------
    names : tuple[str, ...]
    shapes : tuple[tuple[int, ...], ...]
    dtypes : tuple[str, ...]
        ``"float32"``, ``"float16"``, ``"bfloat16"`` or ``"float64"``: what :meth:`unpack` returns.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    def __post_init__(self) -> None:
        if not (len(self.names) == len(self.shapes) == len(self.dtypes)):
            raise AggregationError(
                f"layout: {len(self.names)} names, {len(self.shapes)} shapes and {len(self.dtypes)} dtypes"
            )
        if len(set(self.names)) != len(self.names):
            raise AggregationError("layout: a parameter name appears twice")
        for name, shape, dtype in zip(self.names, self.shapes, self.dtypes, strict=True):
            if dtype not in _FLOAT_DTYPES:
                raise AggregationError(
                    f"layout: parameter {name!r} has dtype {dtype!r}; only {sorted(_FLOAT_DTYPES)} aggregate"
                )
            if any(not isinstance(s, int) or s < 0 for s in shape):
                raise AggregationError(f"layout: parameter {name!r} has an invalid shape {shape}")

    @classmethod
    def of(cls, update: Mapping[str, torch.Tensor]) -> Layout:
        """The layout of one update: its parameters sorted by name."""
        names = tuple(sorted(update))
        for name in names:
            if not update[name].is_floating_point():
                raise AggregationError(
                    f"parameter {name!r} is {update[name].dtype}; only floating-point parameters aggregate"
                )
        return cls(
            names,
            tuple(tuple(int(s) for s in update[n].shape) for n in names),
            tuple(str(update[n].dtype).removeprefix("torch.") for n in names),
        )

    @property
    def numel(self) -> int:
        """Number of values (without the per-tensor weight coordinates)."""
        return sum(math.prod(s) for s in self.shapes)

    @property
    def width(self) -> int:
        """Length of the packed vector: the values plus one weight coordinate per tensor."""
        return self.numel + len(self.names)

    def pack(self, update: Mapping[str, torch.Tensor], weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The update's values (float64, in layout order; zeros for tensors it lacks) and its
        per-tensor weights (``weight`` where held, 0 elsewhere). Non-finite values are refused."""
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not 0 < weight < math.inf:
            raise AggregationError(
                f"a contribution's weight must be a positive finite number, got {weight!r}"
            )
        unknown = sorted(set(update) - set(self.names))
        if unknown:
            raise AggregationError(
                f"update has parameters {unknown[:5]} that the round's layout does not list; "
                "pass a layout that covers every client's parameters"
            )
        values, weights = [], []
        for name, shape in zip(self.names, self.shapes, strict=True):
            tensor = update.get(name)
            if tensor is None:
                values.append(torch.zeros(math.prod(shape), dtype=torch.float64))
                weights.append(0.0)
                continue
            if tuple(tensor.shape) != shape:
                raise AggregationError(
                    f"parameter {name!r} has shape {tuple(tensor.shape)}; the round's layout says {shape}"
                )
            flat = tensor.detach().to("cpu", torch.float64).reshape(-1)
            if not bool(torch.isfinite(flat).all()):
                raise AggregationError(
                    f"parameter {name!r} contains NaN or Inf; fix the update before sending"
                )
            values.append(flat)
            weights.append(float(weight))
        if not any(weights):
            raise AggregationError("update holds none of the layout's parameters")
        return torch.cat(values) if values else torch.zeros(0, dtype=torch.float64), torch.tensor(
            weights, dtype=torch.float64
        )

    def unpack(
        self, sums: torch.Tensor, weights: torch.Tensor, *, absent_below: float = 0.0
    ) -> dict[str, torch.Tensor]:
        """Per-tensor ``sums / weights`` in each tensor's dtype; tensors whose total weight is at
        most ``absent_below`` (held by no contributor) are left out."""
        if sums.numel() != self.numel or weights.numel() != len(self.names):
            raise AggregationError(
                f"aggregate has {sums.numel()} values and {weights.numel()} weights; the layout needs "
                f"{self.numel} and {len(self.names)}"
            )
        out: dict[str, torch.Tensor] = {}
        offset = 0
        for i, (name, shape, dtype) in enumerate(zip(self.names, self.shapes, self.dtypes, strict=True)):
            size = math.prod(shape)
            total = float(weights[i])
            if total > absent_below:
                chunk = sums[offset : offset + size].to(torch.float64) / total
                out[name] = chunk.reshape(shape).to(_FLOAT_DTYPES[dtype])
            offset += size
        return out

    def to_json(self) -> str:
        """A compact JSON form for payload metadata."""
        return json.dumps(
            [[n, list(s), d] for n, s, d in zip(self.names, self.shapes, self.dtypes, strict=True)],
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str, *, max_tensors: int, max_numel: int) -> Layout:
        """Parse and bound a layout received in metadata; raises :class:`AggregationError`."""
        try:
            rows = json.loads(text)
        except (ValueError, RecursionError) as err:
            raise AggregationError(f"layout metadata is not valid JSON ({err})") from None
        if not isinstance(rows, list) or len(rows) > max_tensors:
            raise AggregationError(
                f"layout metadata must list at most {max_tensors} [name, shape, dtype] entries"
            )
        names, shapes, dtypes = [], [], []
        for row in rows:
            if not (
                isinstance(row, list)
                and len(row) == 3
                and isinstance(row[0], str)
                and isinstance(row[1], list)
                and len(row[1]) <= 8
                and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in row[1])
                and isinstance(row[2], str)
            ):
                raise AggregationError(f"layout metadata entry {str(row)[:80]} is not [name, shape, dtype]")
            names.append(row[0])
            shapes.append(tuple(row[1]))
            dtypes.append(row[2])
        layout = cls(tuple(names), tuple(shapes), tuple(dtypes))
        if layout.numel > max_numel:
            raise AggregationError(
                f"layout has {layout.numel} values; at most {max_numel} accepted (raise max_numel)"
            )
        return layout


class Aggregator(ABC):
    """One blind (or plain) aggregation algorithm: client encode, server combine, client decode.

    Subclasses declare their payload schemas and implement the three roles; the shared mechanics
    (validation, skipping invalid contributions, the layout check) live here once.

    Parameters
    ----------
    max_numel : int, default 2**22
        Most values of one update a receiver accepts.
    max_tensors : int, default 4096
        Most parameter tensors in one layout.
    """

    #: The registry name (``AGGREGATORS[name]``).
    name: ClassVar[str]

    def __init__(self, *, max_numel: int = 2**22, max_tensors: int = 4096) -> None:
        if max_numel < 1 or max_tensors < 1:
            raise ValueError(f"max_numel and max_tensors must be >= 1, got {max_numel} and {max_tensors}")
        self.max_numel = max_numel
        self.max_tensors = max_tensors

    # ------------------------------------------------------------------ schemas and validation

    @abstractmethod
    def schemas(self) -> dict[str, PayloadSchema]:
        """The schema of every payload kind this aggregator's parties receive, by kind."""

    def _layout_meta(self) -> MetaSpec:
        return MetaSpec(str, max_len=256 * self.max_tensors + 64)

    def validate(self, payload: Payload, *, sender: str = "") -> Layout | None:
        """Check ``payload`` against the schema of its kind (and, for updates and aggregates, the
        layout and sizes); return its layout if it has one. Raises :class:`AggregationError`."""
        schemas = self.schemas()
        if payload.kind not in schemas:
            raise AggregationError(
                f"{self.name}: unknown payload kind {payload.kind!r}"
                + (f" from {sender!r}" if sender else "")
                + f"; expected one of {sorted(schemas)}"
            )
        schemas[payload.kind].validate(payload, sender=sender)
        if "layout" not in payload.meta:
            return None
        layout = Layout.from_json(
            str(payload.meta["layout"]), max_tensors=self.max_tensors, max_numel=self.max_numel
        )
        self._check_sizes(payload, layout, sender=sender)
        return layout

    @abstractmethod
    def _check_sizes(self, payload: Payload, layout: Layout, *, sender: str) -> None:
        """Aggregator-specific consistency of the payload's tensor sizes with its layout."""

    # ------------------------------------------------------------------ the three roles

    @abstractmethod
    def encode(
        self, update: Mapping[str, torch.Tensor], weight: float, *, layout: Layout | None = None
    ) -> Payload:
        """Client side: the payload of one client's update with its sample ``weight`` (> 0).

        ``layout`` defaults to :meth:`Layout.of` ``(update)``; pass the round's union layout when
        parties hold different parameter subsets.
        """

    def combine(self, payloads: Mapping[str, Payload], *, min_clients: int | None = None) -> Payload:
        """Server side: add the updates of one round (by client id) into one aggregate payload.

        Works without any secret. With ``min_clients=None`` any invalid update raises
        :class:`AggregationError`; otherwise invalid updates are left out (their reasons are in
        the aggregate's ``rejected`` metadata) and the round completes if at least
        ``min_clients`` remain. Nothing is added before a contribution is fully validated.
        """
        included: list[str] = []
        rejected: dict[str, str] = {}
        layout_text: str | None = None
        round_layout: Layout | None = None
        total: object = None
        for client, payload in payloads.items():
            try:
                if payload.kind != UPDATE:
                    raise AggregationError(f"{self.name}: {client!r} sent a {payload.kind!r}, not an update")
                layout = self.validate(payload, sender=client)
                assert layout is not None
                text = str(payload.meta["layout"])
                if layout_text is not None and text != layout_text:
                    raise AggregationError(
                        f"{client!r} flattened its update with another layout than the round's first "
                        "contribution; every client of a round must use the same layout"
                    )
                part = self._load(client, payload, layout)
            except AggregationError as err:
                if min_clients is None:
                    raise
                rejected[client] = str(err)
                continue
            # the running total is local: an error anywhere leaves nothing applied
            total = part if total is None else self._add(total, part)
            layout_text, round_layout = text, layout
            included.append(client)
        if not included or (min_clients is not None and len(included) < min_clients):
            reasons = "; ".join(f"{c}: {r}" for c, r in rejected.items()) or "none were sent"
            raise AggregationError(
                f"{self.name}: {len(included)} valid updates of {len(payloads)}, fewer than the "
                f"{max(min_clients or 1, 1)} required ({reasons})"
            )
        assert layout_text is not None and round_layout is not None
        aggregate = self._finish(total, round_layout)
        meta: dict[str, MetaValue] = {
            **aggregate.meta,
            "aggregator": self.name,
            "layout": layout_text,
            "clients": json.dumps(included),
            "rejected": json.dumps(rejected),
        }
        return Payload(AGGREGATE, aggregate.tensors, meta)

    @abstractmethod
    def _load(self, client: str, payload: Payload, layout: Layout) -> Any:
        """Parse one validated update into a summable form; raise :class:`AggregationError`."""

    @abstractmethod
    def _add(self, total: Any, part: Any) -> Any:
        """The running total plus one parsed update (may update ``total`` in place)."""

    @abstractmethod
    def _finish(self, total: Any, layout: Layout) -> Payload:
        """The aggregate's tensors and extra metadata from the total of the round."""

    @abstractmethod
    def decode(self, aggregate: Payload) -> dict[str, torch.Tensor]:
        """Client side: the sample-weighted average of the round from the server's aggregate."""

    def _aggregate_layout(self, aggregate: Payload) -> Layout:
        if aggregate.kind != AGGREGATE:
            raise AggregationError(
                f"{self.name}: decode expects an {AGGREGATE!r} payload, got {aggregate.kind!r}"
            )
        layout = self.validate(aggregate)
        assert layout is not None
        return layout


def aggregate_meta() -> dict[str, MetaSpec]:
    """Metadata every aggregate carries besides the layout."""
    return {
        "aggregator": MetaSpec(str),
        "clients": MetaSpec(str, max_len=1 << 20),
        "rejected": MetaSpec(str, max_len=1 << 22),
    }
