"""The split protocol in one place: every message kind, its tensors, its metadata and its errors.

Both parties, the server's validation, the wire codecs (which tensors are activations and which
gradients), the recorders' selectors and the protocol document read these declarations; nothing
else spells a kind, a tensor name or a metadata key. The module knows neither models nor
transports, so ``split/`` and ``transport/`` both import it and not each other.

A message is a kind, named tensors and scalar metadata (see
:class:`~splitfed.transport.channel.Message`). Each :class:`KindSpec` says which direction it
travels, what it carries, what it is answered with, and which phase of a run it belongs to
(training step, evaluation, generation, control). :func:`check_meta` validates every metadata
scalar (type, finiteness, range) and fills defaults; :func:`check_tensor_names` the tensors'
names, kinds and ranks. Shapes that depend on the session (the model's width, the negotiated
batch limits) are checked by the receiver with :func:`check_hidden` and :func:`check_mask`.

Errors a peer must act on carry an :class:`ErrorCode`; clients branch on the code, never on the
text.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

import torch

Direction = Literal["to_model", "to_data"]
Phase = Literal["train", "eval", "generate", "control"]
Role = Literal["activation", "gradient", "mask", "labels", "loss", "token", "parameter"]
MetaType = Literal["int", "float", "bool", "str"]
MetaValue = int | float | str | bool | None

#: Version of this protocol; a ``hello`` must name it.
PROTOCOL_VERSION = 3
#: Largest integer a metadata value may hold (protobuf int64).
INT64_MAX = 2**63 - 1


class ErrorCode(StrEnum):
    """Why a message was refused: what the sender must do differs per code."""

    #: The message does not fit the protocol or the session: a client bug; fix the client.
    BAD_MESSAGE = "bad_message"
    #: A hello the server cannot accept (protocol version, codec, option): change the client's settings.
    UNSUPPORTED = "unsupported"
    #: The first message of a session must be a hello.
    NOT_GREETED = "not_greeted"
    #: Beyond a negotiated limit (batch, sequence, cache, parties): send less.
    LIMIT = "limit"
    #: The generation session ended, expired or was evicted: restart it with ``gen_start``.
    UNKNOWN_SESSION = "unknown_session"
    #: Another data party's step holds the model party for too long: retry later.
    BUSY = "busy"
    #: The step's update was refused (non-finite or too large): the step was dropped, nothing applied.
    STEP_REJECTED = "step_rejected"
    #: This party's step made no progress for too long and was dropped: start a new step.
    STEP_DROPPED = "step_dropped"
    #: The model party is shutting down: reconnect later.
    SHUTTING_DOWN = "shutting_down"
    #: Something failed on the receiving side that the sender did not cause.
    INTERNAL = "internal"


class ProtocolError(RuntimeError):
    """A message that does not fit the protocol or the session; ``code`` says what to do about it.

    Parameters
    ----------
    message : str
        What was wrong and how to fix it.
    code : ErrorCode, default ErrorCode.BAD_MESSAGE
    """

    default_code = ErrorCode.BAD_MESSAGE

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.code = ErrorCode(code) if code is not None else self.default_code


@dataclass(frozen=True)
class TensorSpec:
    """One tensor a message kind may carry.

    Parameters
    ----------
    name : str
    role : str
        ``activation`` or ``gradient`` (what crosses the cut and what codecs compress),
        ``mask``, ``labels``, ``loss``, ``token`` or ``parameter`` (adapter averaging).
    dtype : {"float", "int", "any"}
        Floating-point or integer tensors.
    dims : tuple[int, ...]
        Allowed ranks.
    required : bool, default True
    doc : str
    """

    name: str
    role: Role
    dtype: Literal["float", "int", "any"]
    dims: tuple[int, ...]
    required: bool = True
    doc: str = ""


@dataclass(frozen=True)
class MetaSpec:
    """One metadata scalar of a message kind: its type, range and default.

    Parameters
    ----------
    name : str
    type : {"int", "float", "bool", "str"}
    default : int | float | bool | str | None
        Used when the sender omits it; ``None`` with ``required=True`` means it must be sent.
    low, high : float | None
        Inclusive bounds of a number (``low_open`` excludes ``low``).
    choices : tuple[str, ...] | None
        Allowed strings.
    max_len : int, default 256
        Longest string.
    required : bool, default False
    doc : str
    """

    name: str
    type: MetaType
    default: MetaValue = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[str, ...] | None = None
    max_len: int = 256
    required: bool = False
    doc: str = ""

    def parse(self, kind: str, value: MetaValue) -> MetaValue:
        """``value`` checked against this spec (ints are accepted for floats); raises :class:`ProtocolError`."""
        where = f"{kind} metadata {self.name!r}"
        if value is None:
            if self.required:
                raise ProtocolError(f"{where} is required ({self.describe()})")
            return self.default
        if self.type == "bool":
            if not isinstance(value, bool):
                raise ProtocolError(f"{where} must be a bool; got {type(value).__name__} {value!r}")
            return value
        if self.type == "str":
            if not isinstance(value, str):
                raise ProtocolError(f"{where} must be a string; got {type(value).__name__} {value!r}")
            if len(value) > self.max_len:
                raise ProtocolError(f"{where} is {len(value)} characters long; at most {self.max_len}")
            if self.choices is not None and value not in self.choices:
                raise ProtocolError(f"{where} is {value!r}; expected one of {list(self.choices)}")
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ProtocolError(
                f"{where} must be a number ({self.type}); got {type(value).__name__} {value!r}"
            )
        if self.type == "int" and not isinstance(value, int):
            raise ProtocolError(f"{where} must be an integer; got {value!r}")
        number: int | float = value if self.type == "int" else float(value)
        if not math.isfinite(number):
            raise ProtocolError(f"{where} must be finite; got {number!r}")
        too_low = self.low is not None and (number <= self.low if self.low_open else number < self.low)
        too_high = self.high is not None and number > self.high
        if too_low or too_high:
            raise ProtocolError(f"{where} is {number!r}; allowed: {self.describe()}")
        return number

    def describe(self) -> str:
        """The allowed values in words (for errors and the protocol document)."""
        if self.choices is not None:
            return f"one of {list(self.choices)}"
        if self.type in ("int", "float") and (self.low is not None or self.high is not None):
            lo = "-inf" if self.low is None else _num(self.low)
            hi = "inf" if self.high is None else _num(self.high)
            return f"{self.type} in {'(' if self.low_open else '['}{lo}, {hi}]"
        if self.type == "str":
            return f"string of at most {self.max_len} characters"
        return self.type


def _num(x: float) -> str:
    for bits in (63, 31):
        if x == 2**bits - 1:
            return f"2^{bits}-1"
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


@dataclass(frozen=True)
class KindSpec:
    """One message kind.

    Parameters
    ----------
    name : str
    direction : {"to_model", "to_data"}
    phase : {"train", "eval", "generate", "control"}
        ``forward`` is ``train`` or ``eval`` by its ``train`` metadata (see :func:`phase_of`).
    tensors : tuple[TensorSpec, ...]
    meta : tuple[MetaSpec, ...]
    replies : tuple[str, ...]
        Kinds it is answered with; empty for one-way messages.
    one_of : tuple[str, ...]
        Exactly one of these tensors must be present (a reply that is logits, hidden or loss).
    any_tensors : bool, default False
        Carries arbitrary named tensors (adapter averaging), checked by the receiver's schema.
    doc : str
    """

    name: str
    direction: Direction
    phase: Phase
    tensors: tuple[TensorSpec, ...] = ()
    meta: tuple[MetaSpec, ...] = ()
    replies: tuple[str, ...] = ()
    one_of: tuple[str, ...] = ()
    any_tensors: bool = False
    doc: str = ""
    _by_name: dict[str, TensorSpec] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_name.update({t.name: t for t in self.tensors})

    def tensor(self, name: str) -> TensorSpec | None:
        """The spec of tensor ``name`` of this kind, or ``None``."""
        return self._by_name.get(name)

    def meta_spec(self, name: str) -> MetaSpec | None:
        """The spec of metadata key ``name`` of this kind, or ``None``."""
        return next((m for m in self.meta if m.name == name), None)


# --------------------------------------------------------------------------- metadata shared by kinds
_CLIENT = MetaSpec("client", "str", "", max_len=128, doc="the data party's id (the server overwrites it)")
_PAYLOAD_KIND = MetaSpec("payload_kind", "str", "", max_len=64, doc="the aggregator payload's kind")
_PAYLOAD_META = MetaSpec(
    "payload_meta", "str", "{}", max_len=1 << 22, doc="the aggregator payload's metadata, as JSON"
)
_BATCH_ID = MetaSpec("batch_id", "int", 0, 0, INT64_MAX, doc="the data party's micro-batch number")
_HEAD_LAYERS = MetaSpec(
    "head_layers", "int", None, 0, 4096, doc="blocks the data party's head ran: the model party enters there"
)
_NEED_GRAD = MetaSpec(
    "need_input_grad",
    "bool",
    None,
    doc="the data party's head, or a defense before the crossing, trains: it needs its input gradient",
)
_UPDATE = MetaSpec("update", "bool", True, doc="this micro-batch ends an optimizer step")
_SESSION = MetaSpec("session", "str", None, max_len=64, required=True, doc="generation session id")
_STEP_META = (_CLIENT, _BATCH_ID, _HEAD_LAYERS, _NEED_GRAD)
ACTIVATION_CODECS = ("fp32", "fp16", "bf16", "int8")
GRADIENT_CODECS = ("fp32", "fp16", "bf16", "topk")

_HIDDEN = TensorSpec("hidden", "activation", "float", (3,), doc="[batch, seq, hidden] activations at the cut")
_MASK = TensorSpec("attention_mask", "mask", "int", (2,), doc="[batch, seq] 0/1 attention mask")

KINDS: dict[str, KindSpec] = {
    k.name: k
    for k in (
        # ------------------------------------------------------------------ session control
        KindSpec(
            "hello",
            "to_model",
            "control",
            meta=(
                MetaSpec(
                    "protocol", "int", None, 0, INT64_MAX, required=True, doc="must be PROTOCOL_VERSION"
                ),
                _CLIENT,
                MetaSpec("activations", "str", "fp32", choices=ACTIVATION_CODECS, doc="codec of activations"),
                MetaSpec("gradients", "str", "fp32", choices=GRADIENT_CODECS, doc="codec of gradients"),
                MetaSpec(
                    "topk_ratio",
                    "float",
                    0.1,
                    0.0,
                    1.0,
                    low_open=True,
                    doc="share of gradient entries topk keeps",
                ),
                MetaSpec(
                    "resume_step", "int", 0, 0, INT64_MAX, doc="the step a resuming data party continues from"
                ),
            ),
            replies=("welcome",),
            doc="first message of a session: negotiates codecs; answered with the session's limits",
        ),
        KindSpec(
            "welcome",
            "to_data",
            "control",
            meta=(
                _CLIENT,
                MetaSpec("hidden_size", "int", None, 1, INT64_MAX),
                MetaSpec("max_batch", "int", None, 1, INT64_MAX),
                MetaSpec("max_seq", "int", None, 1, INT64_MAX),
                MetaSpec("max_message_bytes", "int", None, 1, INT64_MAX),
                MetaSpec("labels_at", "str", "data", choices=("data", "model")),
                MetaSpec("updates", "int", 0, 0, INT64_MAX, doc="optimizer steps the model party applied"),
                MetaSpec("client_steps", "int", 0, 0, INT64_MAX, doc="steps of this data party it applied"),
                MetaSpec("step_timeout_s", "float", None, 0.0, None, doc="a step idle this long is dropped"),
            ),
            doc="the server's answer to hello",
        ),
        KindSpec(
            "stats",
            "to_model",
            "control",
            replies=("stats_result",),
            doc="ask how the model party's time was spent on this session",
        ),
        KindSpec(
            "stats_result",
            "to_data",
            "control",
            meta=(
                MetaSpec("busy_s", "float", 0.0, 0.0, None, doc="model-party time spent on this session"),
                MetaSpec("session_s", "float", 0.0, 0.0, None, doc="how long the session lasted"),
                MetaSpec("waiting_s", "float", 0.0, 0.0, None, doc="session time not spent on it"),
                MetaSpec("updates", "int", 0, 0, INT64_MAX),
            ),
        ),
        # ------------------------------------------------------------------ training and evaluation
        KindSpec(
            "forward",
            "to_model",
            "train",
            tensors=(
                _HIDDEN,
                _MASK,
                TensorSpec(
                    "labels", "labels", "int", (1, 2), required=False, doc="only with labels_at: model"
                ),
            ),
            meta=(
                *_STEP_META,
                MetaSpec("train", "bool", False, doc="a training forward (else evaluation: nothing trains)"),
                _UPDATE,
                MetaSpec(
                    "loss_scale",
                    "float",
                    1.0,
                    0.0,
                    1.0,
                    low_open=True,
                    doc="gradient scale of this micro-batch (1/grad_accum); with labels only",
                ),
            ),
            replies=("forward_result",),
            doc="activations of the data party's head; a training forward starts or continues a step",
        ),
        KindSpec(
            "forward_result",
            "to_data",
            "train",
            tensors=(
                TensorSpec(
                    "logits",
                    "activation",
                    "float",
                    (2, 3),
                    required=False,
                    doc="HT, labels at the data party",
                ),
                TensorSpec(
                    "hidden", "activation", "float", (3,), required=False, doc="HBT: the body's output"
                ),
                TensorSpec("loss", "loss", "float", (1,), required=False, doc="labels at the model party"),
                TensorSpec(
                    "grad",
                    "gradient",
                    "float",
                    (3,),
                    required=False,
                    doc="input gradient (labels at the model party)",
                ),
            ),
            meta=(_BATCH_ID,),
            one_of=("logits", "hidden", "loss"),
        ),
        KindSpec(
            "backward",
            "to_model",
            "train",
            tensors=(
                TensorSpec("grad", "gradient", "float", (2, 3), doc="gradient of the model party's output"),
            ),
            meta=(*_STEP_META, _UPDATE),
            replies=("backward_result",),
            doc="the gradient of a training forward's output; answered only when the head trains",
        ),
        KindSpec(
            "backward_result",
            "to_data",
            "train",
            tensors=(TensorSpec("grad", "gradient", "float", (3,), doc="gradient of the head's output"),),
            meta=(_BATCH_ID,),
        ),
        KindSpec(
            "fedavg",
            "to_model",
            "control",
            meta=(
                _CLIENT,
                MetaSpec("round", "int", None, 0, INT64_MAX, required=True),
                MetaSpec("parties", "int", None, 1, 4096, required=True, doc="data parties in the round"),
                MetaSpec(
                    "samples", "float", None, 0.0, 1e15, low_open=True, required=True, doc="FedAvg weight"
                ),
                MetaSpec(
                    "stage",
                    "str",
                    "update",
                    choices=("layout", "update", "setup", "seal", "advertise", "share", "reveal"),
                    doc="the averaging stage (splitfed.federated.split_averaging)",
                ),
                _PAYLOAD_KIND,
                _PAYLOAD_META,
            ),
            replies=("fedavg_result",),
            any_tensors=True,
            doc="one stage of averaging the data parties' adapters (SplitLoRA) by the run's aggregator; answered with its reply (the aggregate at the last stage)",
        ),
        KindSpec(
            "fedavg_result",
            "to_data",
            "control",
            meta=(MetaSpec("round", "int", 0, 0, INT64_MAX), _PAYLOAD_KIND, _PAYLOAD_META),
            any_tensors=True,
        ),
        # ------------------------------------------------------------------ generation
        KindSpec(
            "gen_start",
            "to_model",
            "generate",
            tensors=(_HIDDEN, _MASK),
            meta=(
                _CLIENT,
                _SESSION,
                _HEAD_LAYERS,
                MetaSpec("max_length", "int", None, 1, INT64_MAX, required=True, doc="prefix + new tokens"),
                MetaSpec("return_logits", "bool", False, doc="HT: return last-position logits, not a token"),
                MetaSpec("do_sample", "bool", False),
                MetaSpec("temperature", "float", 1.0, 0.0, 1e4, low_open=True),
                MetaSpec("top_k", "int", 0, 0, 2**31 - 1),
                MetaSpec("top_p", "float", 1.0, 0.0, 1.0, low_open=True),
                MetaSpec("repetition_penalty", "float", 1.0, 0.0, 1e4, low_open=True),
                MetaSpec("seed", "int", 0, -INT64_MAX - 1, INT64_MAX),
            ),
            replies=("gen_result",),
            doc="the prompt's activations: opens a generation session with a KV cache",
        ),
        KindSpec(
            "gen_step",
            "to_model",
            "generate",
            tensors=(_HIDDEN,),
            meta=(_CLIENT, _SESSION),
            replies=("gen_result",),
            doc="one new position per sequence ([batch, 1, hidden])",
        ),
        KindSpec(
            "gen_end", "to_model", "generate", meta=(_CLIENT, _SESSION), doc="closes a session (one-way)"
        ),
        KindSpec(
            "gen_result",
            "to_data",
            "generate",
            tensors=(
                TensorSpec(
                    "token", "token", "int", (1,), required=False, doc="HT: the chosen token per sequence"
                ),
                TensorSpec(
                    "logits", "activation", "float", (2,), required=False, doc="HT with return_logits"
                ),
                TensorSpec(
                    "hidden", "activation", "float", (3,), required=False, doc="HBT: the body's output"
                ),
            ),
            one_of=("token", "logits", "hidden"),
        ),
        KindSpec("error", "to_data", "control", doc="a refusal: the envelope's error text and code"),
    )
}

#: Kinds of the generation protocol.
GEN_KINDS = tuple(k for k, s in KINDS.items() if s.phase == "generate" and s.direction == "to_model")
#: Kinds a data party sends once greeted (what the model party's ``handle`` answers).
PARTY_KINDS = ("forward", "backward", "fedavg", *GEN_KINDS)


def spec(kind: str) -> KindSpec:
    """The declaration of ``kind``; :class:`ProtocolError` listing the known kinds otherwise."""
    try:
        return KINDS[kind]
    except KeyError:
        raise ProtocolError(f"unknown message kind {kind!r}; expected one of {sorted(KINDS)}") from None


def check_meta(kind: str, meta: Mapping[str, MetaValue]) -> dict[str, MetaValue]:
    """Every metadata scalar of a ``kind`` message validated, defaults filled in (keys without one stay absent).

    Unknown keys are refused (they would be silently ignored otherwise). Raises
    :class:`ProtocolError` naming the key, the value and what is allowed.
    """
    declared = spec(kind)
    known = {m.name for m in declared.meta}
    unknown = sorted(set(meta) - known)
    if unknown:
        raise ProtocolError(
            f"{kind} messages carry no metadata {unknown}; they carry {sorted(known) or 'none'}"
        )
    parsed = {m.name: m.parse(kind, meta.get(m.name)) for m in declared.meta}
    # A key without a value and without a default stays absent: its receiver decides.
    return {k: v for k, v in parsed.items() if v is not None}


def check_tensor_names(
    kind: str, tensors: Mapping[str, torch.Tensor], allowed: set[str] | None = None
) -> None:
    """The tensors of a ``kind`` message: the declared names (``allowed`` narrows them), kinds and ranks."""
    declared = spec(kind)
    if declared.any_tensors:
        return
    names = {t.name for t in declared.tensors if allowed is None or t.name in allowed}
    required = {t.name for t in declared.tensors if t.required}
    extra, missing = sorted(set(tensors) - names), sorted(required - set(tensors))
    if extra or missing:
        raise ProtocolError(
            f"a {kind} message carries tensors {sorted(required)}"
            + (f" (optionally {sorted(names - required)})" if names - required else "")
            + f"; got {sorted(tensors)}"
        )
    if declared.one_of and sum(name in tensors for name in declared.one_of) != 1:
        raise ProtocolError(
            f"a {kind} message carries exactly one of {list(declared.one_of)}; got {sorted(tensors)}"
        )
    for name, tensor in tensors.items():
        t = declared._by_name[name]
        floating = tensor.is_floating_point()
        if (t.dtype == "float" and not floating) or (t.dtype == "int" and (floating or tensor.is_complex())):
            raise ProtocolError(
                f"tensor {name!r} of a {kind} message must be {'floating' if t.dtype == 'float' else 'an integer'}; "
                f"got {tensor.dtype}"
            )
        if tensor.dim() not in t.dims:
            raise ProtocolError(
                f"tensor {name!r} of a {kind} message has {tensor.dim()} dims {tuple(tensor.shape)}; expected "
                f"{' or '.join(map(str, t.dims))}"
            )


def tensor_role(kind: str, name: str) -> Role | None:
    """The role of tensor ``name`` in a ``kind`` message (``None`` for unknown kinds or names)."""
    declared = KINDS.get(kind)
    tensor = declared.tensor(name) if declared is not None else None
    return tensor.role if tensor is not None else None


def phase_of(kind: str, meta: Mapping[str, MetaValue]) -> Phase:
    """The phase a message belongs to: a ``forward`` is ``train`` or ``eval`` by its ``train`` flag.

    Replies have the phase of their kind (a ``forward_result`` is ``train``; recorders that need
    the request's phase look it up by the reply's ``batch_id``).
    """
    declared = KINDS.get(kind)
    if declared is None:
        return "control"
    if kind == "forward":
        return "train" if bool(meta.get("train", False)) else "eval"
    return declared.phase


def in_step(kind: str, meta: Mapping[str, MetaValue]) -> bool:
    """Whether a data-party message belongs to a training step (it holds the model party's step)."""
    return kind == "backward" or (kind == "forward" and bool(meta.get("train", False)))


def finishes_step(kind: str, meta: Mapping[str, MetaValue], tensors: Mapping[str, Any]) -> bool:
    """Whether a training message applies the step's update (its last micro-batch's last message)."""
    return bool(meta.get("update", True)) and (
        kind == "backward" or (kind == "forward" and "labels" in tensors)
    )


# --------------------------------------------------------------------------- session-dependent shapes
def check_hidden(
    hidden: torch.Tensor, width: int, max_batch: int, max_seq: int, *, kind: str = ""
) -> tuple[int, int]:
    """A ``[batch, seq, width]`` floating activation within the limits; returns ``(batch, seq)``."""
    where = f" (in a {kind} message)" if kind else ""
    if hidden.dim() != 3 or hidden.shape[-1] != width or not hidden.is_floating_point():
        raise ProtocolError(
            f"hidden must be a floating [batch, seq, {width}] tensor; got {hidden.dtype} {tuple(hidden.shape)}{where}"
        )
    batch, seq = int(hidden.shape[0]), int(hidden.shape[1])
    if not (1 <= batch <= max_batch and 1 <= seq <= max_seq):
        raise ProtocolError(
            f"batch {batch} x seq {seq} is outside the session's limits (batch 1..{max_batch}, "
            f"seq 1..{max_seq}){where}",
            ErrorCode.LIMIT,
        )
    return batch, seq


def check_mask(mask: torch.Tensor, batch: int, seq: int) -> None:
    """A 0/1 integer ``[batch, seq]`` attention mask; the error shows dtype, shape and offending values."""
    bad_shape = tuple(mask.shape) != (batch, seq)
    bad_dtype = mask.is_floating_point() or mask.is_complex()
    offending: list[Any] = []
    if not bad_shape and not mask.is_complex():
        offending = mask[(mask != 0) & (mask != 1)].unique()[:5].tolist()
    if bad_shape or bad_dtype or offending:
        detail = f"; offending values {offending}" if offending else ""
        raise ProtocolError(
            f"attention_mask must be a 0/1 integer [{batch}, {seq}] tensor; got {mask.dtype} "
            f"{tuple(mask.shape)}{detail}"
        )


# --------------------------------------------------------------------------- the document
def describe_markdown() -> str:
    """The protocol as a Markdown document (kinds, tensors, metadata, error codes).

    ``docs/protocol.md`` is this text; a test keeps them equal.
    """
    lines = [
        "# The splitfed wire protocol",
        "",
        "Generated from `src/splitfed/protocol.py` (`python -m splitfed.protocol > docs/protocol.md`);",
        "the transport is `src/splitfed/transport/proto/splitfed.proto`.",
        "",
        f"Protocol version: **{PROTOCOL_VERSION}**. A data party opens one bidirectional `Session` stream,",
        "sends `hello` first and then any of the data-party kinds below. Every message is an `Envelope`",
        "(kind, tensors, metadata, sequence number) cut into `Frame`s; a reply echoes its request's `seq`.",
        "Tensors are raw little-endian bytes with dtype and shape (`codec` `raw` or empty), or compressed:",
        "activations by the codec negotiated in `hello.activations` (`fp16`, `bf16`, `int8` with per-row",
        "fp32 scales), gradients by `hello.gradients` (`fp16`, `bf16`, `topk` with int32 indices).",
        "Tensors of 64 KiB or more may travel in raw frames after the envelope (`external` bytes).",
        "",
        "A refused message is answered by an envelope of kind `error` whose `error` says what was wrong",
        "and whose `code` is one of the error codes below; the session goes on unless the code says",
        "otherwise. Unknown metadata keys are refused. Numbers must be finite; ranges are inclusive",
        "unless written with `(`.",
        "",
        "## Connecting",
        "",
        "One gRPC stream per data party: `splitfed.v1.SplitService/Session`, frames of at most 4 MiB",
        "(gRPC messages up to 8 MiB are accepted). Call metadata: `authorization: Bearer <token>` when",
        "the server was given tokens (the token then fixes the data party's id), else",
        "`splitfed-client: <id>` or `hello.client` names it. A second session of the same data party",
        "that starts training replaces the first (a reconnect): the first is cancelled and its unfinished",
        "step dropped; sessions that only evaluate or generate coexist.",
        "",
        "## Limits",
        "",
        "Sent in `welcome`: `max_batch`, `max_seq`, `max_message_bytes` (after reassembly), `hidden_size`",
        "(the activations' width) and `step_timeout_s`: a training step (from its first training",
        "`forward` to the message with `update: true` that ends it) whose data party sends nothing for",
        "that long is dropped whole. At most 1024 tensors and 32 metadata entries per message, 3 dims per",
        "tensor. Floating tensors must be finite and of magnitude at most the server's `max_abs_value`",
        "(default 1e6). A step is applied only when its gradient is finite with a norm of at most the",
        "server's bound (default 1e4) and the update leaves the parameters finite; otherwise it is",
        "refused with `step_rejected`, and a data party refused `max_strikes` times (default 3) is",
        "disconnected (status `PERMISSION_DENIED`). The reply of a step's last message is encoded",
        "before its update is applied: a step is never half-applied.",
        "",
        "## Error codes",
        "",
        "| code | meaning |",
        "|---|---|",
    ]
    docs = _enum_docs()
    lines += [f"| `{code.value}` | {docs.get(code.name, '')} |" for code in ErrorCode]
    for kind in KINDS.values():
        arrow = "data party → model party" if kind.direction == "to_model" else "model party → data party"
        lines += ["", f"## `{kind.name}` ({arrow}; phase {kind.phase})", ""]
        if kind.doc:
            lines += [kind.doc[0].upper() + kind.doc[1:] + ".", ""]
        if kind.replies:
            lines += [f"Answered with: {', '.join(f'`{r}`' for r in kind.replies)}.", ""]
        if kind.any_tensors:
            lines += [
                "Tensors: an aggregator payload's named tensors, checked by that aggregator's schema (float adapters, ciphertext bytes as uint8, masked integers).",
                "",
            ]
        elif kind.tensors:
            lines += ["| tensor | role | dtype | dims | required | notes |", "|---|---|---|---|---|---|"]
            lines += [
                f"| `{t.name}` | {t.role} | {t.dtype} | {' or '.join(map(str, t.dims))} | "
                f"{'yes' if t.required else 'no'} | {t.doc} |"
                for t in kind.tensors
            ]
            if kind.one_of:
                lines += ["", f"Exactly one of {', '.join(f'`{n}`' for n in kind.one_of)}."]
            lines.append("")
        if kind.meta:
            lines += ["| metadata | allowed | default | notes |", "|---|---|---|---|"]
            lines += [
                f"| `{m.name}` | {m.describe()} | "
                f"{'required' if m.required else ('—' if m.default is None else repr(m.default))} | {m.doc} |"
                for m in kind.meta
            ]
    return "\n".join(lines) + "\n"


def _enum_docs() -> dict[str, str]:
    """The ``#:`` comments above each :class:`ErrorCode` member."""
    import inspect

    docs: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(ErrorCode).splitlines():
        text = line.strip()
        if text.startswith("#:"):
            pending.append(text[2:].strip())
        elif "=" in text and pending:
            docs[text.split("=")[0].strip()] = " ".join(pending)
            pending = []
    return docs


if __name__ == "__main__":
    print(describe_markdown(), end="")
