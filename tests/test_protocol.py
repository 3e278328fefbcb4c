"""The protocol in one place: every declared metadata scalar is validated, the document is current."""

from __future__ import annotations

import math
from pathlib import Path
from typing import get_args

import pytest
import torch

from splitfed import protocol
from splitfed.protocol import KINDS, ErrorCode, MetaSpec, ProtocolError, check_meta, check_tensor_names
from splitfed.transport.wire import ActivationCodec, GradientCodec, WireCodecs

ALL_META = [(kind.name, m) for kind in KINDS.values() for m in kind.meta]


def _valid(m: MetaSpec) -> object:
    if m.type == "bool":
        return True
    if m.type == "str":
        return m.choices[0] if m.choices else "x"
    low = m.low if m.low is not None else 0.0
    value = low + (1 if m.low_open or m.type == "int" else 0)
    if m.high is not None:
        value = min(value, m.high)
    return int(value) if m.type == "int" else float(value)


def _required(kind: str) -> dict[str, object]:
    return {m.name: _valid(m) for m in KINDS[kind].meta if m.required}


@pytest.mark.parametrize(("kind", "meta"), ALL_META, ids=[f"{k}.{m.name}" for k, m in ALL_META])
def test_every_metadata_scalar_is_checked_for_type_finiteness_and_range(kind: str, meta: MetaSpec) -> None:
    base = _required(kind)
    assert check_meta(kind, base | {meta.name: _valid(meta)})[meta.name] == _valid(meta)
    wrong_type = "text" if meta.type != "str" else 12
    bad = [wrong_type]
    if meta.type == "float":
        bad += [math.nan, math.inf, -math.inf]
    if meta.type in ("int", "float"):
        if meta.low is not None:
            bad.append(meta.low if meta.low_open else meta.low - 1)
        if meta.high is not None:
            bad.append(meta.high * 2 + 1)
        if meta.type == "int":
            bad.append(1.5)
    if meta.choices:
        bad.append("not-a-choice")
    for value in bad:
        if meta.type == "int" and isinstance(value, float) and not math.isfinite(value):
            continue
        with pytest.raises(ProtocolError, match=meta.name):
            check_meta(kind, base | {meta.name: value})


def test_unknown_metadata_and_missing_required_metadata_are_refused() -> None:
    with pytest.raises(ProtocolError, match=r"carry no metadata \['launch_codes'\]"):
        check_meta("forward", {"launch_codes": 1})
    with pytest.raises(ProtocolError, match="'session' is required"):
        check_meta("gen_step", {})
    with pytest.raises(ProtocolError, match="unknown message kind"):
        check_meta("teleport", {})


def test_defaults_are_filled_and_keys_without_default_stay_absent() -> None:
    meta = check_meta("forward", {"train": True})
    assert meta["loss_scale"] == 1.0 and meta["update"] is True
    assert "need_input_grad" not in meta and "head_layers" not in meta


def test_tensor_names_kinds_and_ranks() -> None:
    hidden, mask = torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.long)
    check_tensor_names("forward", {"hidden": hidden, "attention_mask": mask})
    with pytest.raises(ProtocolError, match="carries tensors"):
        check_tensor_names("forward", {"hidden": hidden})
    with pytest.raises(ProtocolError, match="must be an integer"):
        check_tensor_names("forward", {"hidden": hidden, "attention_mask": mask.float()})
    with pytest.raises(ProtocolError, match="2 dims"):
        check_tensor_names("forward", {"hidden": hidden[0], "attention_mask": mask})
    with pytest.raises(ProtocolError, match="carries tensors"):
        labels = {"labels": torch.zeros(2, dtype=torch.long)}
        check_tensor_names(
            "forward", {"hidden": hidden, "attention_mask": mask} | labels, {"hidden", "attention_mask"}
        )
    with pytest.raises(ProtocolError, match="exactly one of"):
        check_tensor_names("forward_result", {"logits": hidden, "hidden": hidden})


def test_mask_errors_show_dtype_shape_and_offending_values() -> None:
    with pytest.raises(ProtocolError, match=r"torch.int64 \(2, 3\); offending values \[3, 7\]"):
        protocol.check_mask(torch.tensor([[1, 3, 0], [7, 1, 1]]), 2, 3)
    with pytest.raises(ProtocolError, match=r"got torch.float32 \(2, 3\)"):
        protocol.check_mask(torch.ones(2, 3), 2, 3)


def test_codecs_follow_the_declared_roles() -> None:
    assert get_args(ActivationCodec) == protocol.ACTIVATION_CODECS
    assert get_args(GradientCodec) == protocol.GRADIENT_CODECS
    codecs = WireCodecs("bf16", "fp16")
    x = torch.randn(2, 3, 4)
    assert codecs.encode_tensor("to_model", "forward", "hidden", x).codec == "bf16"
    assert codecs.encode_tensor("to_model", "gen_step", "hidden", x).codec == "bf16"
    assert codecs.encode_tensor("to_model", "backward", "grad", x).codec == "fp16"
    assert codecs.encode_tensor("to_data", "forward_result", "loss", x[0, 0, :1]).codec == "raw"
    assert codecs.encode_tensor("to_model", "fedavg", "hidden", x).codec == "raw"  # adapters travel exact
    assert protocol.phase_of("forward", {"train": True}) == "train"
    assert protocol.phase_of("forward", {}) == "eval"
    assert protocol.phase_of("gen_step", {}) == "generate"


def test_error_codes_survive_as_exceptions() -> None:
    from splitfed.split.inference import InferenceError
    from splitfed.split.parties import StepRejected
    from splitfed.transport.grpc_channel import RemoteError

    assert StepRejected("x").code == ErrorCode.STEP_REJECTED
    assert InferenceError("x", ErrorCode.UNKNOWN_SESSION).code == ErrorCode.UNKNOWN_SESSION
    assert isinstance(RemoteError("x", ErrorCode.BUSY), ProtocolError)


def test_the_protocol_document_is_current() -> None:
    doc = Path(__file__).parents[1] / "docs" / "protocol.md"
    assert doc.read_text() == protocol.describe_markdown(), (
        "docs/protocol.md is stale: regenerate it with `python -m splitfed.protocol > docs/protocol.md`"
    )
    for kind in KINDS:
        assert f"## `{kind}`" in doc.read_text()
    for code in ErrorCode:
        assert f"`{code.value}`" in doc.read_text()
