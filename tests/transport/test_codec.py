"""Tests of the tensor wire codec (splitfed.transport.codec)."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from splitfed.transport.codec import (
    CODECS,
    DTYPES,
    CodecError,
    EncodedTensor,
    Limits,
    TopKCompressor,
    decode,
    encode,
)

_TORCH = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
FLOATS = ("float32", "float16", "bfloat16")
SHAPES = [(), (0,), (3, 0, 2), (7,), (3, 5), (2, 3, 4)]


def _sample(dtype: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype in FLOATS:
        return torch.randn(shape, generator=g).to(_TORCH[dtype])
    if dtype == "bool":
        return torch.randint(0, 2, shape, generator=g).bool()
    info = torch.iinfo(_TORCH[dtype])
    return torch.randint(info.min, info.max, shape, generator=g, dtype=_TORCH[dtype])


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A view whose equality is bit equality (NaN payloads and -0.0 included)."""
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16)
    return t


# ------------------------------------------------------------------------------------------- raw


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_raw_round_trip_is_bit_exact(dtype: str, shape: tuple[int, ...]) -> None:
    x = _sample(dtype, shape, seed=len(shape))
    enc = encode("x", x)
    assert (enc.dtype, enc.shape, enc.codec) == (dtype, shape, "raw")
    assert enc.nbytes == len(enc.data) == x.numel() * x.element_size()
    y = decode(enc)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert torch.equal(_bits(y), _bits(x))


def test_raw_keeps_special_floats_when_allowed() -> None:
    for dtype in FLOATS:
        x = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40], dtype=_TORCH[dtype])
        y = decode(encode("x", x), Limits(require_finite=False))
        assert torch.equal(_bits(y), _bits(x))


def test_raw_is_little_endian_and_handles_non_contiguous() -> None:
    assert encode("x", torch.tensor([1, 256], dtype=torch.int32)).data == b"\x01\0\0\0\0\x01\0\0"
    assert encode("m", torch.tensor([True, False, True])).data == b"\x01\x00\x01"
    assert encode("b", torch.tensor(1.0, dtype=torch.bfloat16)).data == b"\x80\x3f"
    x = torch.arange(12, dtype=torch.int64).reshape(3, 4).t()
    assert torch.equal(decode(encode("x", x)), x)


def test_int64_mask_and_bool_round_trip() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.int64)
    assert torch.equal(decode(encode("attention_mask", mask)), mask)
    flags = torch.tensor([[True, False], [False, True]])
    out = decode(encode("flags", flags))
    assert out.dtype == torch.bool and torch.equal(out, flags)


def test_decoded_tensor_is_writable_and_does_not_alias_message() -> None:
    x = torch.randn(4, 5)
    buf = bytearray(encode("x", x).data)
    enc = EncodedTensor("x", "float32", (4, 5), "raw", buf)  # type: ignore[arg-type]
    y = decode(enc)
    y.zero_()  # writable
    assert torch.equal(decode(enc), x)  # the message did not change
    z = decode(enc)
    buf[:] = bytes(len(buf))  # nor does the tensor follow the message
    assert torch.equal(z, x)


def test_encode_rejects_unsupported_inputs() -> None:
    with pytest.raises(CodecError, match=r"float64.*cast it to one of"):
        encode("x", torch.zeros(2, dtype=torch.float64))
    with pytest.raises(CodecError, match=r"unknown codec 'zstd'"):
        encode("x", torch.zeros(2), "zstd")
    with pytest.raises(CodecError, match=r"TopKCompressor"):
        encode("x", torch.zeros(2), "topk")
    for codec in ("fp16", "bf16", "int8"):
        with pytest.raises(CodecError, match=r"needs a floating tensor, got dtype int64"):
            encode("ids", torch.zeros(2, dtype=torch.int64), codec)
    with pytest.raises(CodecError, match=r"expected a torch.Tensor"):
        encode("x", [1.0, 2.0], "raw")  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------- fp16/bf16


@pytest.mark.parametrize(("codec", "unit"), [("fp16", 2.0**-11), ("bf16", 2.0**-8)])
@pytest.mark.parametrize("dtype", FLOATS)
def test_half_codecs_relative_error(codec: str, unit: float, dtype: str) -> None:
    x = (torch.randn(16, 33, generator=torch.Generator().manual_seed(1)) * 10).to(_TORCH[dtype])
    enc = encode("h", x, codec)
    assert enc.nbytes == 2 * x.numel() and enc.dtype == dtype
    y = decode(enc)
    assert y.dtype == x.dtype and y.shape == x.shape
    xf, yf = x.float(), y.float()
    # One rounding to the wire format, one back to a narrower logical dtype at most.
    back = 2.0**-8 if dtype == "bfloat16" else 2.0**-11 if dtype == "float16" else 0.0
    tiny = 2.0**-25 if codec == "fp16" or dtype == "float16" else 1e-38  # fp16 subnormals
    assert bool(((yf - xf).abs() <= (unit + back) * xf.abs() + tiny).all())


def test_half_codecs_empty_and_scalar() -> None:
    for codec in ("fp16", "bf16"):
        for shape in [(), (0, 4)]:
            x = torch.full(shape, 0.5)
            y = decode(encode("x", x, codec))
            assert y.shape == x.shape and torch.equal(y, x)


def test_fp16_overflow_is_refused_at_encode() -> None:
    with pytest.raises(CodecError, match=r"overflows.*use codec 'bf16'"):
        encode("big", torch.tensor([1.0, 1e5]), "fp16")
    # bf16 has fp32's range.
    assert decode(encode("big", torch.tensor([1.0, 1e5]), "bf16"))[1] == 99840.0


# ------------------------------------------------------------------------------------------- int8


@pytest.mark.parametrize("dtype", FLOATS)
def test_int8_error_at_most_half_a_scale(dtype: str) -> None:
    x = torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(2)).to(_TORCH[dtype])
    x[1, 2] = 0.0  # a zero row
    enc = encode("a", x, "int8")
    rows = 4 * 6
    assert len(enc.data) == x.numel() and len(enc.scale) == 4 * rows and enc.indices == b""
    scale = torch.frombuffer(bytearray(enc.scale), dtype=torch.float32)
    assert scale[1 * 6 + 2] == 1.0  # zero rows get scale 1
    expected = x.float().abs().amax(dim=-1).reshape(-1) / 127
    assert torch.allclose(scale[expected > 0], expected[expected > 0])
    y = decode(enc)
    assert y.dtype == x.dtype and y.shape == x.shape
    err = (y.float() - x.float()).abs()
    bound = scale.reshape(4, 6, 1) / 2 * (1 + 1e-6)
    if dtype != "float32":  # plus one rounding to the logical dtype
        bound = bound + x.float().abs() * (2.0**-8 if dtype == "bfloat16" else 2.0**-11)
    assert bool((err <= bound).all())
    assert torch.equal(y[1, 2], torch.zeros(32, dtype=x.dtype))


def test_int8_scalar_empty_and_non_finite() -> None:
    assert torch.equal(decode(encode("s", torch.tensor(-3.0), "int8")), torch.tensor(-3.0))
    for shape in [(0,), (3, 0), (0, 5)]:
        enc = encode("e", torch.zeros(shape), "int8")
        assert len(enc.scale) == 4 * math.prod(shape[:-1])
        assert decode(enc).shape == shape
    with pytest.raises(CodecError, match=r"'int8' cannot carry NaN"):
        encode("n", torch.tensor([1.0, float("nan")]), "int8")


def test_bytes_of_an_activation() -> None:
    x = torch.randn(8, 128, 576)
    raw = x.numel() * 4
    sizes = {codec: encode("h", x, codec).nbytes for codec in ("raw", "fp16", "bf16", "int8")}
    assert sizes["raw"] == raw
    assert sizes["fp16"] == sizes["bf16"] == raw // 2
    assert sizes["int8"] == x.numel() + 4 * 8 * 128  # a quarter plus one fp32 scale per token
    topk = TopKCompressor(0.01).encode("h", x)
    k = math.ceil(0.01 * x.numel())
    assert topk.nbytes == 8 * k


# ------------------------------------------------------------------------------------------- topk


def test_topk_keeps_the_k_largest_and_zeros_elsewhere() -> None:
    x = torch.tensor([[0.1, -5.0, 0.2], [3.0, -0.3, 0.0]])
    comp = TopKCompressor(ratio=0.3)  # ceil(0.3 * 6) = 2
    enc = comp.encode("g", x)
    assert enc.codec == "topk" and len(enc.indices) == 8 and len(enc.data) == 8 and enc.scale == b""
    y = decode(enc)
    assert torch.equal(y, torch.tensor([[0.0, -5.0, 0.0], [3.0, 0.0, 0.0]]))
    residual = comp.residual("g")
    assert residual is not None
    assert torch.equal(residual, x - y)


@pytest.mark.parametrize(("ratio", "numel", "k"), [(0.01, 100, 1), (0.07, 100, 7), (0.01, 1, 1), (1.0, 5, 5)])
def test_topk_k(ratio: float, numel: int, k: int) -> None:
    comp = TopKCompressor(ratio)
    assert comp.k_for(numel) == k
    assert len(comp.encode("x", torch.randn(numel)).indices) == 4 * k


def test_topk_error_feedback_loses_nothing() -> None:
    g = torch.Generator().manual_seed(3)
    comp = TopKCompressor(ratio=0.05)
    inputs = [torch.randint(-50, 50, (6, 40), generator=g).float() for _ in range(20)]
    decoded = []
    previous = torch.zeros(6, 40)
    for x in inputs:
        y = decode(comp.encode("grad", x))
        residual = comp.residual("grad")
        assert residual is not None
        # Each element is either sent or kept: decoded + residual is exactly input + old residual.
        assert torch.equal(y + residual, x + previous)
        previous = residual
        decoded.append(y)
    # Integer-valued inputs make every fp32 sum exact, so the telescoped identity is exact too.
    assert torch.equal(torch.stack(decoded).sum(0), torch.stack(inputs).sum(0) - previous)
    assert bool((previous != 0).any())  # something was really delayed


def test_topk_error_feedback_with_bfloat16_receiver() -> None:
    comp = TopKCompressor(ratio=0.25)
    x = torch.randn(64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    y = decode(comp.encode("a", x))
    residual = comp.residual("a")
    assert residual is not None and y.dtype == torch.bfloat16
    assert torch.equal(y.float() + residual, x.float())


def test_topk_streams_reset_and_shape_change() -> None:
    comp = TopKCompressor(ratio=0.5)
    comp.encode("a", torch.tensor([1.0, 2.0]))
    comp.encode("b", torch.tensor([3.0, 4.0]))
    a, b = comp.residual("a"), comp.residual("b")
    assert a is not None and b is not None
    assert torch.equal(a, torch.tensor([1.0, 0.0])) and torch.equal(b, torch.tensor([3.0, 0.0]))
    comp.reset("a")
    assert comp.residual("a") is None and comp.residual("b") is not None
    comp.encode("b", torch.zeros(3))  # new shape: the old residual cannot be added
    assert decode(comp.encode("b", torch.zeros(3))).abs().sum() == 0
    comp.reset()
    assert comp.residual("b") is None


def test_topk_edge_cases() -> None:
    comp = TopKCompressor(0.1)
    assert torch.equal(decode(comp.encode("s", torch.tensor(2.5))), torch.tensor(2.5))
    empty = comp.encode("e", torch.zeros(0, 3))
    assert empty.nbytes == 0 and decode(empty).shape == (0, 3)
    with pytest.raises(CodecError, match=r"needs a floating tensor"):
        comp.encode("i", torch.zeros(3, dtype=torch.int64))
    before = comp.residual("s")
    with pytest.raises(CodecError, match=r"cannot carry NaN"):
        comp.encode("s", torch.tensor(float("inf")))
    assert comp.residual("s") is before  # no half-written state
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        TopKCompressor(0.0)


# ------------------------------------------------------------------------------------- validation


def _good(codec: str = "raw") -> EncodedTensor:
    x = torch.randn(3, 4)
    return TopKCompressor(0.5).encode("act", x) if codec == "topk" else encode("act", x, codec)


def _with(enc: EncodedTensor, **changes: Any) -> EncodedTensor:
    return dataclasses.replace(enc, **changes)


@pytest.mark.parametrize(
    ("enc", "limits", "pattern"),
    [
        (_with(_good(), data=b"\0" * 47), None, r"'act'.*data has 47 bytes, expected 48 \(12 elements x 4"),
        (_with(_good(), codec="zstd"), None, r"'act'.*unknown codec 'zstd': expected one of"),
        (_with(_good(), dtype="float64"), None, r"unknown dtype 'float64': expected one of"),
        (_good(), Limits(allowed_dtypes=frozenset({"float16"})), r"dtype 'float32' not allowed here"),
        (_with(_good(), shape=(3, -4)), None, r"negative dimension: shape\[1\] = -4"),
        (_with(_good(), shape=(1, 1, 1, 1, 12)), None, r"too many dimensions: expected at most 4, got 5"),
        (_good(), Limits(max_elements=11), r"too many elements: shape \(3, 4\) has 12, limit 11"),
        (_with(_good(), shape=(2**40, 0)), None, r"dimension too large"),
        (_with(_good(), shape=(3, "4")), None, r"shape\[1\] must be an int, got str"),
        (_with(_good(), shape=None), None, r"shape must be a sequence of ints"),
        (_with(_good(), data="text"), None, r"field 'data' must be bytes, got str"),
        (_with(_good(), dtype="int64", codec="int8"), None, r"codec 'int8' needs a floating dtype"),
        (_with(_good(), scale=b"\0" * 4), None, r"scale has 4 bytes, expected 0 \(only codec 'int8'"),
        (_with(_good("int8"), scale=b"\0" * 8), None, r"scale has 8 bytes, expected 12 \(3 rows x 4 bytes"),
        (_with(_good("int8"), scale=b"\0\0\x80\xbf" * 3), None, r"negative int8 scale at row 0"),
        (_with(_good("topk"), indices=b"\0" * 5), None, r"indices has 5 bytes, expected a multiple of 4"),
        (_with(_good("topk"), data=b"\0" * 20), None, r"data has 20 bytes, expected 24 \(6 topk values"),
        (_with(_good("topk"), indices=b"\0" * 52, data=b"\0" * 52), None, r"13 indices, expected at most"),
        (
            _with(_good("topk"), indices=(12).to_bytes(4, "little") * 6),
            None,
            r"topk index 12 at position 0 out of range \[0, 12\)",
        ),
        (
            _with(_good("topk"), indices=(-1).to_bytes(4, "little", signed=True) * 6),
            None,
            r"topk index -1 at position 0 out of range",
        ),
        (_with(_good(), dtype="bool", data=b"\x02" * 12), None, r"bool byte at element 0 is 2"),
    ],
)
def test_decode_rejects_bad_input(enc: EncodedTensor, limits: Limits | None, pattern: str) -> None:
    with pytest.raises(CodecError, match=pattern):
        decode(enc, limits)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("codec", ["raw", "fp16", "bf16"])
def test_decode_rejects_non_finite(bad: float, codec: str) -> None:
    x = torch.tensor([1.0, bad, 2.0])
    enc = encode("act", x, codec)
    with pytest.raises(CodecError, match=r"'act': 1 non-finite value\(s\).*first at flat index 1"):
        decode(enc)
    kept = decode(enc, Limits(require_finite=False))[1]
    assert bool(kept.isnan()) if math.isnan(bad) else kept == bad


def test_decode_rejects_non_finite_int8_and_topk() -> None:
    enc = _with(encode("act", torch.ones(2, 2), "int8"), scale=b"\0\0\x80\x7f" * 2)  # +inf scales
    with pytest.raises(CodecError, match=r"non-finite"):
        decode(enc)
    topk = _with(_good("topk"), data=b"\0\0\xc0\x7f" * 6)  # NaN values
    with pytest.raises(CodecError, match=r"6 non-finite"):
        decode(topk)


def test_limits_validation() -> None:
    with pytest.raises(ValueError, match=r"unknown dtypes \['float64'\]"):
        Limits(allowed_dtypes=frozenset({"float64"}))
    with pytest.raises(ValueError, match=r"must be >= 0"):
        Limits(max_elements=-1)
    assert Limits(allowed_dtypes={"bool"}).allowed_dtypes == frozenset({"bool"})  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- fuzz

FUZZ_LIMITS = Limits(max_elements=4096, max_dims=4)
_JUNK_TEXT = st.one_of(st.text(max_size=12), st.sampled_from(["float64", "FLOAT32", "", "int4", "lz4"]))
_ANY_OBJ = st.one_of(st.none(), st.integers(), st.floats(), st.binary(max_size=4), st.text(max_size=4))


@st.composite
def _valid(draw: st.DrawFn) -> EncodedTensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 9), max_size=4)))
    x = _sample(dtype, shape, seed=draw(st.integers(0, 2**16)))
    codecs = ["raw", "fp16", "bf16", "int8", "topk"] if dtype in FLOATS else ["raw"]
    codec = draw(st.sampled_from(codecs))
    if codec == "topk":
        return TopKCompressor(draw(st.floats(0.01, 1.0))).encode("t", x)
    return encode("t", x, codec)


def _bytes_field(field_name: str) -> st.SearchStrategy[tuple[str, Any]]:
    def mutate(enc: EncodedTensor, how: str, blob: bytes, pos: int) -> Any:
        old = getattr(enc, field_name)
        if not isinstance(old, bytes | bytearray):  # an earlier mutation put junk here
            return old
        buf = bytearray(old)
        if how == "random":
            return blob
        if how == "same_length_random":  # reaches the deepest checks (NaN, bools, indices)
            return (blob * (len(buf) // max(len(blob), 1) + 1))[: len(buf)] if blob else bytes(len(buf))
        if how == "fill_ff":  # NaN for floats, -1 for indices, 255 for bools
            return b"\xff" * len(buf)
        if how == "truncate":
            return bytes(buf[: pos % (len(buf) + 1)])
        if how == "extend":
            return bytes(buf) + blob
        if how == "flip" and buf:
            buf[pos % len(buf)] ^= 0xFF
        return bytes(buf)

    return st.tuples(
        st.just(field_name),
        st.tuples(
            st.sampled_from(["random", "same_length_random", "fill_ff", "truncate", "extend", "flip"]),
            st.binary(max_size=64),
            st.integers(0, 2**16),
        ),
    ).map(lambda t: (t[0], lambda enc, a=t[1]: mutate(enc, *a)))


_MUTATIONS = st.one_of(
    st.tuples(st.just("name"), st.one_of(st.text(max_size=300), _ANY_OBJ)),
    st.tuples(st.just("dtype"), st.one_of(st.sampled_from(DTYPES), _JUNK_TEXT, _ANY_OBJ)),
    st.tuples(st.just("codec"), st.one_of(st.sampled_from(CODECS), _JUNK_TEXT, _ANY_OBJ)),
    st.tuples(
        st.just("shape"),
        st.one_of(
            st.lists(st.integers(-3, 70), max_size=6).map(tuple),
            st.lists(st.integers(-(2**70), 2**70), max_size=6),
            st.lists(st.one_of(st.integers(0, 5), _ANY_OBJ, st.booleans()), max_size=4),
            _ANY_OBJ,
        ),
    ),
    _bytes_field("data"),
    _bytes_field("scale"),
    _bytes_field("indices"),
    st.tuples(st.sampled_from(["data", "scale", "indices"]), _ANY_OBJ),
)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=_valid(), mutations=st.lists(_MUTATIONS, max_size=3), require_finite=st.booleans())
def test_fuzz_decode_returns_tensor_or_codec_error(
    base: EncodedTensor, mutations: list[tuple[str, Any]], require_finite: bool
) -> None:
    enc = base
    for field_name, value in mutations:
        enc = _with(enc, **{field_name: value(enc) if callable(value) else value})
    limits = dataclasses.replace(FUZZ_LIMITS, require_finite=require_finite)
    start = time.perf_counter()
    try:
        out = decode(enc, limits)
    except CodecError as err:
        assert str(err)
        event("rejected: " + " ".join(str(err).split(": ", 1)[-1].split(" ")[:2]))
    else:
        event(f"decoded: {enc.codec}")
        assert isinstance(out, torch.Tensor)
        assert out.numel() <= limits.max_elements and out.dim() <= limits.max_dims
        assert out.dtype == _TORCH[enc.dtype] and tuple(out.shape) == tuple(enc.shape)
        if not mutations:
            assert out.shape == torch.Size(base.shape)
    assert time.perf_counter() - start < 1.0


def test_an_empty_codec_is_raw_as_the_proto_documents() -> None:
    x = torch.randn(3, 4)
    enc = encode("x", x, "raw")
    assert torch.equal(decode(dataclasses.replace(enc, codec="")), x)


def test_finite_but_huge_values_are_refused_where_a_bound_is_set() -> None:
    big = encode("g", torch.full((2, 3), 3e38), "raw")
    assert torch.equal(decode(big), torch.full((2, 3), 3e38))  # no bound: fine
    with pytest.raises(CodecError, match="finite but huge"):
        decode(big, Limits(max_abs=1e6))
    with pytest.raises(CodecError, match="non-finite"):
        decode(encode("g", torch.tensor([1.0, float("nan")]), "raw"), Limits(max_abs=1e6))
    assert decode(encode("g", torch.ones(0), "raw"), Limits(max_abs=1e6)).numel() == 0
