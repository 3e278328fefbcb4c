"""Fuzz the model party's server handler: generated frames never crash it or hang it."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitfed.models.partition import FinetuneSpec, SplitSpec
from splitfed.protocol import KINDS
from splitfed.split.parties import OptimSpec
from splitfed.split.system import build_model_party
from splitfed.transport.channel import Message
from splitfed.transport.grpc_server import ModelPartyService, ServerLimits
from splitfed.transport.proto import splitfed_pb2 as pb
from splitfed.transport.wire import PROTOCOL_VERSION, Reassembler, WireLimits, frames_of, to_envelope
from tiny import tiny_model

HIDDEN = 32


class FakeContext:
    """The two calls the service makes on a gRPC context."""

    def invocation_metadata(self):
        return (("splitfed-client", "fuzzer"),)

    def cancel(self) -> None:
        pass

    def abort(self, code, details):  # pragma: no cover - no tokens configured here
        raise RuntimeError(details)


@pytest.fixture(scope="module")
def service() -> ModelPartyService:
    model = tiny_model("llama", "classification")
    party, _, _ = build_model_party(
        model, SplitSpec("ht", 1), "classification", {"body": FinetuneSpec("lora", r=2)}, OptimSpec()
    )
    svc = ModelPartyService(party, HIDDEN, ServerLimits(max_batch=4, max_seq=16, step_lock_timeout_s=1.0))
    yield svc
    svc.stop()


dtypes = st.sampled_from(
    ["float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool", "complex64", ""]
)
codecs = st.sampled_from(["raw", "fp16", "bf16", "int8", "topk", "zip"])
shapes = st.lists(st.integers(min_value=-2, max_value=40), max_size=5)
tensors = st.builds(
    pb.TensorProto,
    name=st.sampled_from(["hidden", "attention_mask", "labels", "grad", "logits", "x"]),
    dtype=dtypes,
    shape=shapes,
    codec=codecs,
    data=st.binary(max_size=4096),
    scale=st.binary(max_size=64),
    indices=st.binary(max_size=64),
)
#: Every metadata key the protocol declares, and one it does not.
META_KEYS = sorted({m.name for k in KINDS.values() for m in k.meta} | {"x"})
meta_values = st.one_of(
    st.builds(pb.MetaValue, i=st.integers(min_value=-(2**63), max_value=2**63 - 1)),
    st.builds(pb.MetaValue, f=st.floats(allow_nan=True)),
    st.builds(pb.MetaValue, f=st.sampled_from([1e38, -1e38, 3e38, 1e-45, float("inf"), float("nan")])),
    st.builds(pb.MetaValue, s=st.text(max_size=20)),
    st.builds(pb.MetaValue, b=st.booleans()),
)


@st.composite
def envelopes(draw: st.DrawFn) -> pb.Envelope:
    env = pb.Envelope(
        kind=draw(st.sampled_from(["forward", "backward", "hello", "bogus", ""])),
        seq=draw(st.integers(min_value=0, max_value=2**64 - 1)),
    )
    env.tensors.extend(draw(st.lists(tensors, max_size=4)))
    for key, value in draw(st.dictionaries(st.sampled_from(META_KEYS), meta_values, max_size=4)).items():
        env.meta[key].CopyFrom(value)
    return env


@st.composite
def valid_ish(draw: st.DrawFn) -> pb.Envelope:
    """Well-formed tensors with plausible and implausible shapes, so checks past the codec run too."""
    batch = draw(st.integers(1, 5))
    seq = draw(st.integers(1, 17))
    width = draw(st.sampled_from([HIDDEN, HIDDEN - 1]))
    # Finite but huge values too: they must never reach the adapters.
    hidden = torch.randn(batch, seq, width) * draw(st.sampled_from([1.0, 1e3, 1e7, 1e30, 3e38]))
    mask = torch.ones(batch, seq, dtype=torch.long)
    kind = draw(st.sampled_from(["forward", "backward"]))
    tensors = {"hidden": hidden, "attention_mask": mask} if kind == "forward" else {"grad": hidden}
    meta = {"train": draw(st.booleans()), "batch_id": draw(st.integers(0, 3)), "update": draw(st.booleans())}
    if draw(st.booleans()):
        meta["loss_scale"] = draw(st.sampled_from([float("nan"), float("inf"), 1e38, -1.0, 0.0, 0.5]))
    return to_envelope(Message(kind, tensors, meta), draw(st.integers(1, 100)), "to_model")


def _frames_for(env: pb.Envelope, mode: int, seq: int) -> list[pb.Frame]:
    payload = env.SerializeToString()
    if mode == 0:
        return [pb.Frame(message_id=seq, index=0, total=1, payload=payload)]
    if mode == 1:  # truncated
        return [pb.Frame(message_id=seq, index=0, total=1, payload=payload[: len(payload) // 2])]
    half = max(1, len(payload) // 2)  # split in two, maybe out of order
    first = pb.Frame(message_id=seq, index=0, total=2, payload=payload[:half])
    second = pb.Frame(message_id=seq, index=1, total=2, payload=payload[half:])
    return [second, first] if mode == 3 else [first, second]


def _run_session(service: ModelPartyService, frames: list[pb.Frame]) -> list[pb.Envelope]:
    hello = list(frames_of(Message("hello", {}, {"protocol": PROTOCOL_VERSION}), 0, "to_model", None))
    out: list[pb.Envelope] = []
    reassembler = Reassembler(WireLimits())
    done = threading.Event()

    def consume() -> None:
        for frame in service.Session(iter(hello + frames), FakeContext()):
            env = reassembler.push(frame)
            if env is not None:
                out.append(env)
        done.set()

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    assert done.wait(10), "the server hung on a generated message"
    return out


@settings(
    max_examples=1200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(env=envelopes(), mode=st.integers(0, 3))
def test_random_envelopes_never_crash_the_server(
    service: ModelPartyService, env: pb.Envelope, mode: int
) -> None:
    replies = _run_session(service, _frames_for(env, mode, 1))
    assert replies and replies[0].kind == "welcome"
    for reply in replies[1:]:
        assert reply.error or reply.kind in ("forward_result", "backward_result")
        assert not reply.error or reply.code  # every refusal carries a code


@settings(
    max_examples=800,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(envs=st.lists(valid_ish(), min_size=1, max_size=3))
def test_plausible_message_sequences_never_crash_the_server(
    service: ModelPartyService, envs: list[pb.Envelope]
) -> None:
    frames = [f for i, env in enumerate(envs) for f in _frames_for(env, 0, i + 1)]
    replies = _run_session(service, frames)
    assert replies[0].kind == "welcome"
    for reply in replies[1:]:
        assert reply.error or reply.kind in ("forward_result", "backward_result")
    # After any session ends, no step is left holding the lock, and the adapters are finite.
    assert not service._step_lock.locked()
    assert all(bool(torch.isfinite(p).all()) for p in service.model_party.trainer.params)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    cut=st.integers(0, 8),
    header=st.integers(0, 4),
    drop=st.integers(-1, 4),
    trim=st.integers(0, 3),
    announce=st.integers(-2, 2),
)
def test_mangled_raw_frames_never_crash_the_server(
    service: ModelPartyService, cut: int, header: int, drop: int, trim: int, announce: int
) -> None:
    """Big tensors travel after the envelope in raw frames: lie about them in every way."""
    hidden = torch.randn(2, 200, HIDDEN)  # 51 KiB
    grad = Message("backward", {"grad": torch.cat([hidden, hidden], 1)}, {"batch_id": 0})  # 102 KiB
    frames = list(frames_of(grad, 1, "to_model", None))
    assert frames[0].header_frames == 1 and len(frames) == 2
    mangled = [pb.Frame.FromString(f.SerializeToString()) for f in frames]  # editable copies
    if announce:
        env = pb.Envelope()
        env.ParseFromString(mangled[0].payload)
        env.tensors[0].external = max(0, env.tensors[0].external + announce * 7)
        mangled[0].payload = env.SerializeToString()
    if header:
        mangled[min(cut, len(mangled) - 1) % len(mangled)].header_frames = header
    if trim:
        mangled[-1].payload = mangled[-1].payload[: -trim * 5]
    if 0 <= drop < len(mangled):
        del mangled[drop]
    replies = _run_session(service, mangled)
    assert replies[0].kind == "welcome"
    for reply in replies[1:]:
        assert reply.error or reply.kind == "backward_result"
    assert not service._step_lock.locked()


@settings(max_examples=500, deadline=None)
@given(
    message_id=st.integers(0, 2**64 - 1),
    index=st.integers(0, 2**32 - 1),
    total=st.integers(0, 2**32 - 1),
    header=st.integers(0, 2**32 - 1),
    payload=st.binary(max_size=300),
)
def test_raw_frames_encode_as_protobuf_frames(
    message_id: int, index: int, total: int, header: int, payload: bytes
) -> None:
    from splitfed.transport.wire import RawFrame, parse_frame

    raw = RawFrame(message_id, index, total, memoryview(payload), header)
    data = raw.SerializeToString()
    assert raw.ByteSize() == len(data)
    proto = pb.Frame.FromString(data)  # protobuf reads our encoding...
    assert (proto.message_id, proto.index, proto.total, proto.header_frames, proto.payload) == (
        message_id,
        index,
        total,
        header,
        payload,
    )
    for encoded in (data, proto.SerializeToString()):  # ...and we read ours and protobuf's
        back = parse_frame(encoded)
        assert (back.message_id, back.index, back.total, back.header_frames, bytes(back.payload)) == (
            message_id,
            index,
            total,
            header,
            payload,
        )


@settings(max_examples=1000, deadline=None)
@given(data=st.binary(max_size=200))
def test_parse_frame_reads_garbage_as_protobuf_does(data: bytes) -> None:
    from google.protobuf.message import DecodeError

    from splitfed.transport.wire import parse_frame

    try:
        expected = pb.Frame.FromString(data)
    except DecodeError:
        with pytest.raises(DecodeError):
            parse_frame(data)
        return
    got = parse_frame(data)
    assert (got.message_id, got.index, got.total, got.header_frames, bytes(got.payload)) == (
        expected.message_id,
        expected.index,
        expected.total,
        expected.header_frames,
        expected.payload,
    )
