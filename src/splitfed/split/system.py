"""Assemble a data party, a model party and the channel between them from one model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from splitfed.models.partition import (
    FinetuneReport,
    FinetuneSpec,
    Segment,
    SplitSpec,
    apply_finetune,
    partition,
)
from splitfed.split.front import DataFront
from splitfed.split.parties import DataParty, LabelsAt, LossFn, ModelParty, OptimSpec
from splitfed.transport.channel import Channel, ChannelTransform, CrossingRecorder, InProcessChannel


@dataclass
class SplitSystem:
    """Both parties of one in-process split, and what joins them."""

    data_party: DataParty
    model_party: ModelParty
    channel: InProcessChannel
    segments: dict[str, Segment]
    finetune: dict[str, FinetuneReport]


def prepare_segments(
    model: nn.Module, split: SplitSpec, head: str, finetune: Mapping[str, FinetuneSpec]
) -> tuple[dict[str, Segment], dict[str, FinetuneReport]]:
    """Cut ``model`` and set up fine-tuning of every segment, in a fixed order.

    Every process of a run calls this the same way from the same seed, so adapters start identical
    on all parties. ``finetune`` maps a segment role (``head``, ``body``, ``tail``) to its spec; a
    missing role is frozen.
    """
    segments = partition(model, split, head)
    reports = {
        role: apply_finetune(seg, finetune.get(role, FinetuneSpec("frozen")))
        for role, seg in segments.items()
    }
    return segments, reports


def build_model_party(
    model: nn.Module,
    split: SplitSpec,
    head: str,
    finetune: Mapping[str, FinetuneSpec],
    optim: OptimSpec,
    loss_fn: LossFn | None = None,
    per_party_adapters: bool = False,
    fedavg_aggregation: str = "plain",
) -> tuple[ModelParty, dict[str, Segment], dict[str, FinetuneReport]]:
    """Cut ``model``, set up fine-tuning of every segment and build the model party.

    Returns the model party, all segments and what each segment trains (see :func:`prepare_segments`).
    ``per_party_adapters`` gives every data party its own copy of the model party's adapters;
    ``fedavg_aggregation`` is how it averages the data parties' adapters (``train.fedavg_aggregation``).
    """
    segments, reports = prepare_segments(model, split, head, finetune)
    model_party = ModelParty(
        segments["body"],
        optim,
        loss_fn=loss_fn,
        head_trainable=segments["head"].is_trainable,
        per_party_adapters=per_party_adapters,
        fedavg_aggregation=fedavg_aggregation,
    )
    return model_party, segments, reports


def build_split(
    model: nn.Module,
    split: SplitSpec,
    head: str,
    finetune: Mapping[str, FinetuneSpec],
    loss_fn: LossFn,
    optim: OptimSpec | None = None,
    labels_at: LabelsAt = "data",
    transforms: Sequence[ChannelTransform] = (),
    recorder: CrossingRecorder | None = None,
    cache_head: bool = False,
    front: DataFront | None = None,
) -> SplitSystem:
    """Cut ``model`` and join the two parties with an in-process channel.

    Parameters
    ----------
    model : nn.Module
        A transformers task model (``...ForCausalLM``, ``...ForSequenceClassification``, ...).
    split : SplitSpec
    head : str
        ``"causal_lm"``, ``"classification"`` or ``"span_qa"``.
    finetune : Mapping[str, FinetuneSpec]
        Per segment role; missing roles are frozen.
    loss_fn : LossFn
        ``loss_fn(logits, batch)``.
    optim : OptimSpec | None
        The same schedule drives both parties (each steps its own optimizer).
    labels_at, transforms, recorder, cache_head
        See :class:`DataParty` and :class:`~splitfed.transport.channel.Channel`.
    front : DataFront | None
        The data party's defenses; in ``segments["front"]`` too, so that adapter files and
        checkpoints carry their parameters.
    """
    optim = optim or OptimSpec()
    model_party, segments, reports = build_model_party(model, split, head, finetune, optim, loss_fn)
    channel = InProcessChannel(model_party.handle, transforms=transforms, recorder=recorder)
    data_party = build_data_party(
        segments, channel, loss_fn, optim, labels_at=labels_at, cache_head=cache_head, front=front
    )
    return SplitSystem(data_party, model_party, channel, with_front(segments, data_party.front), reports)


def build_data_party(
    segments: Mapping[str, Segment],
    channel: Channel,
    loss_fn: LossFn,
    optim: OptimSpec | None = None,
    *,
    labels_at: LabelsAt = "data",
    cache_head: bool = False,
    front: DataFront | None = None,
    client_id: str = "",
) -> DataParty:
    """The data party over ``segments`` (its head, and its tail in HBT) talking through ``channel``.

    The one way every caller builds it: :func:`build_split` (in process), ``splitfed join`` and
    ``splitfed generate`` over gRPC, and the benchmarks. See :class:`DataParty` for the arguments.
    """
    return DataParty(
        segments["head"],
        channel,
        loss_fn,
        optim or OptimSpec(),
        tail=segments.get("tail"),
        labels_at=labels_at,
        client_id=client_id,
        cache_head=cache_head,
        front=front,
    )


def with_front(segments: dict[str, Segment], front: DataFront) -> dict[str, Segment]:
    """``segments`` plus the data party's front under ``"front"`` (a data-party role of adapter files)."""
    if not len(front):
        return segments
    # The front answers named_model_parameters / trainable_parameters like a segment.
    return segments | {"front": front}  # type: ignore[dict-item,return-value]
