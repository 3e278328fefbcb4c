"""Blind aggregation of federated updates behind one interface (client encode, server combine,
client decode): ``plain`` (alias ``none``), ``ckks`` (homomorphic encryption) and ``secagg``
(pairwise-mask secure aggregation). Each algorithm lives in its own module; this registry maps
the names a run's configuration selects to the classes.
"""

from __future__ import annotations

from splitfed.federated.aggregators.base import (
    AggregationError,
    Aggregator,
    Layout,
    MetaSpec,
    Payload,
    PayloadSchema,
    TensorSpec,
)
from splitfed.federated.aggregators.ckks import CKKSAggregator
from splitfed.federated.aggregators.plain import PlainAggregator
from splitfed.federated.aggregators.pruning import SharedMask, prune
from splitfed.federated.aggregators.secagg import SecAggAggregator, SecAggClient, SecAggServer

#: Aggregator classes by the name a run selects; ``"none"`` means no blind aggregation.
AGGREGATORS: dict[str, type[Aggregator]] = {
    "none": PlainAggregator,
    "plain": PlainAggregator,
    "ckks": CKKSAggregator,
    "secagg": SecAggAggregator,
}

__all__ = [
    "AGGREGATORS",
    "AggregationError",
    "Aggregator",
    "CKKSAggregator",
    "Layout",
    "MetaSpec",
    "Payload",
    "PayloadSchema",
    "PlainAggregator",
    "SecAggAggregator",
    "SecAggClient",
    "SecAggServer",
    "SharedMask",
    "TensorSpec",
    "prune",
]
