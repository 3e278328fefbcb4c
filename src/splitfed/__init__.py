"""splitfed: split learning, split inference and federated LoRA for LLMs across parties that do not trust each other.

The public API, importable from ``splitfed`` (loaded on first use, so ``import splitfed`` stays light)::

    from splitfed import build_split, SplitSpec, FinetuneSpec, Defense, RecordingReader
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> the module that defines it.
_API = {
    # configs and runs
    "RunConfig": "splitfed.config",
    "load_config": "splitfed.config",
    "parse_config": "splitfed.config",
    "ConfigError": "splitfed.config",
    "train": "splitfed.run",
    "RunResult": "splitfed.run",
    "start_server": "splitfed.runtime",
    "join": "splitfed.runtime",
    "open_generator": "splitfed.runtime",
    # the split
    "SplitSpec": "splitfed.models.partition",
    "FinetuneSpec": "splitfed.models.partition",
    "SplitConfigError": "splitfed.models.partition",
    "build_split": "splitfed.split.system",
    "build_model_party": "splitfed.split.system",
    "DataParty": "splitfed.split.parties",
    "ModelParty": "splitfed.split.parties",
    "OptimSpec": "splitfed.split.parties",
    "StepGuard": "splitfed.split.parties",
    "SplitGenerator": "splitfed.split.inference",
    "DecodingConfig": "splitfed.split.decoding",
    # the privacy seams
    "Defense": "splitfed.split.front",
    "DataFront": "splitfed.split.front",
    "FrontContext": "splitfed.split.front",
    "DEFENSES": "splitfed.privacy.defenses",
    "RecordingWriter": "splitfed.privacy.recording",
    "RecordingReader": "splitfed.privacy.recording",
    "GroundTruthWriter": "splitfed.privacy.recording",
    "GroundTruthReader": "splitfed.privacy.recording",
    # the protocol and transports
    "Message": "splitfed.transport.channel",
    "ErrorCode": "splitfed.protocol",
    "ProtocolError": "splitfed.protocol",
    "GrpcChannel": "splitfed.transport.grpc_channel",
    "WireCodecs": "splitfed.transport.wire",
    # federated aggregation
    "AGGREGATORS": "splitfed.federated.aggregators",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'splitfed' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
