"""Plain federated averaging (FedAvg: McMahan et al., 2017, "Communication-Efficient Learning of
Deep Networks from Decentralized Data"): the server sees every update and averages them weighted
by the clients' sample counts. The baseline that ``ckks`` and ``secagg`` make blind; registered
as both ``"plain"`` and ``"none"`` (no blind aggregation).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from splitfed.federated.aggregators.base import (
    AGGREGATE,
    UPDATE,
    AggregationError,
    Aggregator,
    Layout,
    MetaSpec,
    Payload,
    PayloadSchema,
    TensorSpec,
    aggregate_meta,
)


@dataclass
class _Weighted:
    values: torch.Tensor  # float64, already multiplied by the weight
    weights: torch.Tensor  # float64 per tensor


class PlainAggregator(Aggregator):
    """Sample-weighted FedAvg of float tensors, in the clear.

    An update carries the client's values as ``float32`` (the wire has no float64), which tensors
    of the layout it holds, and its weight; the server computes in float64 exactly as
    :func:`splitfed.federated.fedavg.weighted_average` does, so both give the same result.

    Parameters
    ----------
    max_numel : int, default 2**22
        Most values of one update a receiver accepts.
    max_tensors : int, default 4096
        Most parameter tensors in one layout.
    """

    name = "plain"

    def schemas(self) -> dict[str, PayloadSchema]:
        """``update`` (client to server) and ``aggregate`` (server to clients)."""
        layout = {"layout": self._layout_meta()}
        return {
            UPDATE: PayloadSchema(
                self.name,
                UPDATE,
                {
                    "values": TensorSpec(torch.float32, self.max_numel),
                    "held": TensorSpec(torch.bool, self.max_tensors),
                },
                {"aggregator": MetaSpec(str), "weight": MetaSpec(float), **layout},
            ),
            AGGREGATE: PayloadSchema(
                self.name,
                AGGREGATE,
                {
                    "average": TensorSpec(torch.float32, self.max_numel),
                    "held": TensorSpec(torch.bool, self.max_tensors),
                },
                {**aggregate_meta(), **layout},
            ),
        }

    def _check_sizes(self, payload: Payload, layout: Layout, *, sender: str) -> None:
        values = payload.tensors["values" if payload.kind == UPDATE else "average"]
        held = payload.tensors["held"]
        if values.numel() != layout.numel or held.numel() != len(layout.names):
            raise AggregationError(
                f"plain {payload.kind!r}{' from ' + repr(sender) if sender else ''}: {values.numel()} values "
                f"and {held.numel()} held flags; its layout needs {layout.numel} and {len(layout.names)}"
            )
        if not bool(torch.isfinite(values).all()):
            raise AggregationError(f"plain {payload.kind!r} from {sender!r}: values contain NaN or Inf")
        if payload.kind == UPDATE:
            weight = float(payload.meta["weight"])  # type: ignore[arg-type]
            if not (weight > 0 and weight < float("inf")):
                raise AggregationError(f"plain update from {sender!r}: weight must be positive, got {weight}")
            if not bool(held.any()):
                raise AggregationError(f"plain update from {sender!r} holds none of the layout's tensors")

    def encode(
        self, update: Mapping[str, torch.Tensor], weight: float, *, layout: Layout | None = None
    ) -> Payload:
        """The client's values, held tensors and weight, in the clear."""
        layout = layout or Layout.of(update)
        values, weights = layout.pack(update, weight)
        return Payload(
            UPDATE,
            {"values": values.to(torch.float32), "held": weights > 0},
            {"aggregator": self.name, "weight": float(weight), "layout": layout.to_json()},
        )

    def _load(self, client: str, payload: Payload, layout: Layout) -> _Weighted:
        weight = float(payload.meta["weight"])  # type: ignore[arg-type]
        held = payload.tensors["held"].to(torch.float64)
        return _Weighted(payload.tensors["values"].to(torch.float64) * weight, held * weight)

    def _add(self, total: _Weighted, part: _Weighted) -> _Weighted:
        total.values += part.values
        total.weights += part.weights
        return total

    def _finish(self, total: _Weighted, layout: Layout) -> Payload:
        sizes = torch.tensor([math.prod(s) for s in layout.shapes], dtype=torch.long)
        weights = total.weights
        per_value = torch.repeat_interleave(torch.where(weights > 0, weights, 1.0), sizes)
        average = total.values / per_value
        return Payload(AGGREGATE, {"average": average.to(torch.float32), "held": weights > 0}, {})

    def decode(self, aggregate: Payload) -> dict[str, torch.Tensor]:
        """The average of the parameters some contributor held, in their layout dtypes."""
        layout = self._aggregate_layout(aggregate)
        held = aggregate.tensors["held"].to(torch.float64)
        return layout.unpack(aggregate.tensors["average"], held, absent_below=0.5)
