"""A shared model party that no data party can poison, stall or stop from saving (issue 13)."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
import yaml
from safetensors.torch import load_file

from splitfed.config import parse_config
from splitfed.protocol import PROTOCOL_VERSION, ErrorCode
from splitfed.runtime import ModelPartyServer, start_server
from splitfed.transport.channel import Message
from splitfed.transport.grpc_channel import GrpcChannel, RemoteError, TransportError
from splitfed.transport.grpc_server import METHOD, ServerLimits
from splitfed.transport.wire import WireCodecs, frames_of, serialize_frame
from tiny import run_config, save_tiny_pretrained, write_topic_csv

HIDDEN = 32
HT_LABELS_AT_MODEL = {"split": {"setting": "ht", "head_layers": 1, "tail_layers": 0, "labels_at": "model"}}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hardening")
    save_tiny_pretrained(root / "model")
    write_topic_csv(root / "data.csv")
    return root


def _raw(root: Path, out: str, **sections: object) -> dict:
    raw = run_config(root, out, **sections)
    raw["model"]["num_labels"] = 3
    raw["train"]["steps"] = 5
    return raw


def _start(root: Path, out: str, limits: ServerLimits | None = None, **sections: object) -> ModelPartyServer:
    return start_server(parse_config(_raw(root, out, **sections)), port=0, limits=limits)


def _adapters(server: ModelPartyServer) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().clone()
        for n, p in server.segments["body"].named_model_parameters(trainable_only=True).items()
    }


def _hidden(batch: int = 2, seq: int = 5) -> dict[str, torch.Tensor]:
    return {
        "hidden": torch.randn(batch, seq, HIDDEN),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
    }


def _labelled_step(batch_id: int, **meta: object) -> Message:
    tensors = _hidden() | {"labels": torch.tensor([0, 1])}
    return Message("forward", tensors, {"train": True, "update": True, "batch_id": batch_id, **meta})


def _code(err: pytest.ExceptionInfo[RemoteError]) -> ErrorCode:
    return err.value.code


# ----------------------------------------------------------------------------------- poisoning
@pytest.mark.parametrize("loss_scale", [math.nan, math.inf, 1e38])
def test_poisoned_loss_scale_is_refused_and_the_shared_adapters_stay_as_they_were(
    workspace: Path, loss_scale: float
) -> None:
    server = _start(workspace, "poison-scale", **HT_LABELS_AT_MODEL)
    mallory = GrpcChannel(f"127.0.0.1:{server.port}", client_id="mallory")
    alice = GrpcChannel(f"127.0.0.1:{server.port}", client_id="alice")
    try:
        before = _adapters(server)
        with pytest.raises(RemoteError, match="loss_scale") as err:
            mallory.request(_labelled_step(1, loss_scale=loss_scale))
        assert _code(err) == ErrorCode.BAD_MESSAGE
        assert server.model_party.updates == 0
        for name, value in _adapters(server).items():
            assert torch.equal(value, before[name]), name
        # The honest party's next step is served normally and applied.
        reply = alice.request(_labelled_step(1, loss_scale=0.5))
        assert math.isfinite(float(reply.tensors["loss"]))
        assert server.model_party.updates == 1
        after = _adapters(server)
        assert all(bool(torch.isfinite(v).all()) for v in after.values())
        assert any(not torch.equal(after[n], before[n]) for n in before)
        evaluation = alice.request(Message("forward", _hidden(), {"train": False}))
        assert bool(torch.isfinite(evaluation.tensors["logits"]).all())
    finally:
        mallory.close()
        alice.close()
        server.stop()


def test_finite_but_huge_gradients_are_refused_and_repeated_offenders_disconnected(workspace: Path) -> None:
    limits = ServerLimits(max_strikes=2, max_step_grad_norm=1e3)
    server = _start(workspace, "poison-grad", limits)  # HBT: the data party returns the body's gradient
    mallory = GrpcChannel(f"127.0.0.1:{server.port}", client_id="mallory", timeout_s=20)
    alice = GrpcChannel(f"127.0.0.1:{server.port}", client_id="alice", timeout_s=20)
    try:
        before = _adapters(server)
        # 3e38 everywhere: finite, but beyond what any honest gradient holds; refused on arrival.
        mallory.request(Message("forward", _hidden(), {"train": True, "batch_id": 1}))
        with pytest.raises(RemoteError, match="finite but huge"):
            mallory.request(Message("backward", {"grad": torch.full((2, 5, HIDDEN), 3e38)}, {"batch_id": 1}))
        # Within the value bound, but the step's gradient norm is not: refused whole, a strike.
        for strike in (1, 2):
            batch = 1 + strike
            mallory.request(Message("forward", _hidden(), {"train": True, "batch_id": batch}))
            with pytest.raises(RemoteError) as err:
                mallory.request(
                    Message("backward", {"grad": torch.full((2, 5, HIDDEN), 1e5)}, {"batch_id": batch})
                )
            assert _code(err) == ErrorCode.STEP_REJECTED
            assert "gradient norm" in str(err.value)
        assert server.model_party.updates == 0
        for name, value in _adapters(server).items():
            assert torch.equal(value, before[name]), name
            assert bool(torch.isfinite(value).all())
        # Two strikes: mallory is out.
        with pytest.raises(TransportError):
            mallory.request(Message("forward", _hidden(), {"train": False}))
        assert ("mallory", "disconnected", "2 refused steps") in server.service.events
        # Alice trains as if nothing happened.
        out = alice.request(Message("forward", _hidden(), {"train": True, "batch_id": 1}))
        alice.request(Message("backward", {"grad": torch.randn_like(out.tensors["hidden"])}, {"batch_id": 1}))
        assert server.model_party.updates == 1
    finally:
        mallory.close()
        alice.close()
        server.stop()


def test_hello_options_are_checked_and_a_reply_that_cannot_be_encoded_applies_nothing(
    workspace: Path,
) -> None:
    server = _start(workspace, "half-applied", split={"setting": "hbt", "head_layers": 1, "tail_layers": 1})
    try:
        for ratio in (5.0, -1.0, 0.0):
            with pytest.raises(RemoteError, match="topk_ratio") as err:
                GrpcChannel(f"127.0.0.1:{server.port}", codecs=WireCodecs("fp32", "topk", ratio))
            assert _code(err) == ErrorCode.UNSUPPORTED
        # A session whose reply encoding fails (a codec broken after the hello): the step is dropped.
        party = GrpcChannel(f"127.0.0.1:{server.port}", client_id="p", codecs=WireCodecs("fp32", "topk", 0.5))
        try:
            with server.service._sessions_lock:
                (session,) = [s for s in server.service._sessions.values() if s.client == "p"]
            session.codecs = WireCodecs("fp32", "topk", 5.0)
            before = _adapters(server)
            out = party.request(Message("forward", _hidden(), {"train": True, "batch_id": 1}))
            with pytest.raises(RemoteError):
                party.request(
                    Message("backward", {"grad": torch.randn_like(out.tensors["hidden"])}, {"batch_id": 1})
                )
            assert server.model_party.updates == 0
            for name, value in _adapters(server).items():
                assert torch.equal(value, before[name]), name
            assert not server.service.step_lock.locked()
        finally:
            party.close()
    finally:
        server.stop()


# ----------------------------------------------------------------------------------- stalls
def test_a_stalled_step_is_dropped_and_others_do_not_wait_for_it(workspace: Path) -> None:
    limits = ServerLimits(step_timeout_s=3.0, step_lock_timeout_s=30.0)
    server = _start(workspace, "stall", limits)
    staller = GrpcChannel(f"127.0.0.1:{server.port}", client_id="staller", timeout_s=20)
    other = GrpcChannel(f"127.0.0.1:{server.port}", client_id="other", timeout_s=20)
    try:
        out = staller.request(Message("forward", _hidden(), {"train": True, "batch_id": 1}))  # holds the step
        t0 = time.monotonic()
        other.request(Message("forward", _hidden(), {"train": False}))  # evaluation waits for nobody
        assert time.monotonic() - t0 < 2.5
        reply = other.request(Message("forward", _hidden(), {"train": True, "batch_id": 1}))
        waited = time.monotonic() - t0
        assert 1.5 < waited < 15.0, waited  # until the stalled step was dropped
        other.request(
            Message("backward", {"grad": torch.randn_like(reply.tensors["hidden"])}, {"batch_id": 1})
        )
        assert server.model_party.updates == 1
        with pytest.raises(RemoteError) as err:
            staller.request(
                Message("backward", {"grad": torch.randn_like(out.tensors["hidden"])}, {"batch_id": 1})
            )
        assert _code(err) == ErrorCode.STEP_DROPPED
        assert server.model_party.updates == 1
        assert any(e[:2] == ("staller", "step dropped") for e in server.service.events)
    finally:
        staller.close()
        other.close()
        server.stop()


def test_a_second_session_of_the_same_party_replaces_the_first(workspace: Path) -> None:
    server = _start(workspace, "reconnect")
    first = GrpcChannel(f"127.0.0.1:{server.port}", client_id="hospital", timeout_s=10)
    try:
        first.request(Message("forward", _hidden(), {"train": True, "batch_id": 1}))  # mid-step
        # A session of the same party that only evaluates (e.g. `generate` with the same token) coexists.
        viewer = GrpcChannel(f"127.0.0.1:{server.port}", client_id="hospital", timeout_s=10)
        viewer.request(Message("forward", _hidden(), {"train": False}))
        viewer.close()
        assert server.service.step_lock.locked()
        second = GrpcChannel(f"127.0.0.1:{server.port}", client_id="hospital", timeout_s=10)
        try:
            # Its first training message replaces the first session, whose step is dropped.
            out = second.request(Message("forward", _hidden(), {"train": True, "batch_id": 1}))
            with pytest.raises(TransportError):
                first.request(Message("forward", _hidden(), {"train": False}))
            second.request(
                Message("backward", {"grad": torch.randn_like(out.tensors["hidden"])}, {"batch_id": 1})
            )
            assert server.model_party.updates == 1
            deadline = time.monotonic() + 5
            while len(server.service._sessions) > 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            with server.service._sessions_lock:
                assert [s.client for s in server.service._sessions.values()] == ["hospital"]
        finally:
            second.close()
    finally:
        first.close()
        server.stop()


# ----------------------------------------------------------------------------------- shutdown
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_garbage_streams_then_sigterm_exit_in_time_with_final_adapters(
    workspace: Path, tmp_path: Path
) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(_raw(workspace, str(tmp_path / "out"))))
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "splitfed.cli", "serve", str(config), "--port", str(port), "--grace", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    hold = threading.Event()
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                GrpcChannel(f"127.0.0.1:{port}", client_id="probe", timeout_s=5).close()
                break
            except TransportError:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                time.sleep(0.5)
        # A real step, so the final adapters differ from the start.
        party = GrpcChannel(f"127.0.0.1:{port}", client_id="honest")
        out = party.request(Message("forward", _hidden(), {"train": True, "batch_id": 1}))
        party.request(Message("backward", {"grad": torch.randn_like(out.tensors["hidden"])}, {"batch_id": 1}))
        hello = [
            serialize_frame(f)
            for f in frames_of(Message("hello", {}, {"protocol": PROTOCOL_VERSION}), 1, "to_model", None)
        ]

        def requests(i: int):
            if i % 2:
                yield from hello
            yield b"\xff\xfe not a frame" * 3
            hold.wait(60)  # the stream stays open

        def garbage(i: int) -> None:
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            stream = channel.stream_stream(
                METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b
            )
            try:
                for _ in stream(requests(i)):
                    pass
            except grpc.RpcError:
                pass

        threads = [threading.Thread(target=garbage, args=(i,), daemon=True) for i in range(6)]
        for t in threads:
            t.start()
        time.sleep(2)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=1 + 10)
        assert time.monotonic() - start < 1 + 10
        assert proc.returncode == 0, (tmp_path / "serve.log").read_text()
        party.close()
    finally:
        hold.set()
        if proc.poll() is None:
            proc.kill()
    saved = load_file(
        str(tmp_path / "out" / "model_party_server" / "final" / "model_party" / "adapter.safetensors")
    )
    assert saved and all(bool(torch.isfinite(v).all()) for v in saved.values())
    assert not list((tmp_path / "out" / "model_party_server" / "final").rglob(".*.tmp"))


def test_anonymous_parties_coexist_and_a_session_says_hello_once(workspace: Path) -> None:
    server = _start(workspace, "anonymous")
    a = GrpcChannel(f"127.0.0.1:{server.port}", timeout_s=10)
    b = GrpcChannel(f"127.0.0.1:{server.port}", timeout_s=10)
    try:
        out = a.request(Message("forward", _hidden(), {"train": True, "batch_id": 1}))
        a.request(Message("backward", {"grad": torch.randn_like(out.tensors["hidden"])}, {"batch_id": 1}))
        out = b.request(Message("forward", _hidden(), {"train": True, "batch_id": 1}))
        b.request(Message("backward", {"grad": torch.randn_like(out.tensors["hidden"])}, {"batch_id": 1}))
        assert server.model_party.updates == 2
        a.request(Message("forward", _hidden(), {"train": False}))  # a was not replaced by b
        with pytest.raises(RemoteError, match="already said hello"):
            a.request(Message("hello", {}, {"protocol": PROTOCOL_VERSION}))
    finally:
        a.close()
        b.close()
        server.stop()


def test_waiting_for_another_partys_step_is_not_silence(workspace: Path) -> None:
    limits = ServerLimits(step_timeout_s=1.5, step_lock_timeout_s=30.0)
    server = _start(workspace, "waiting", limits)
    first = GrpcChannel(f"127.0.0.1:{server.port}", client_id="first", timeout_s=20)
    second = GrpcChannel(f"127.0.0.1:{server.port}", client_id="second", timeout_s=20)
    try:
        out = first.request(Message("forward", _hidden(), {"train": True, "batch_id": 1}))
        ticket = second.submit(
            Message("forward", _hidden(), {"train": True, "batch_id": 1})
        )  # waits for first
        time.sleep(1.0)
        first.request(Message("forward", _hidden(), {"train": True, "batch_id": 2}))  # first is alive
        time.sleep(1.0)
        first.request(
            Message(
                "backward",
                {"grad": torch.randn_like(out.tensors["hidden"])},
                {"batch_id": 1, "update": False},
            )
        )
        first.request(Message("backward", {"grad": torch.randn_like(out.tensors["hidden"])}, {"batch_id": 2}))
        reply = second.result(ticket)  # got the step after waiting 2 s > step_timeout_s
        time.sleep(0.5)
        second.request(
            Message("backward", {"grad": torch.randn_like(reply.tensors["hidden"])}, {"batch_id": 1})
        )
        assert server.model_party.updates == 2
        assert not any(e[1] == "step dropped" for e in server.service.events)
    finally:
        first.close()
        second.close()
        server.stop()


def test_out_of_range_labels_and_unanswered_forwards_are_refused(workspace: Path) -> None:
    server = _start(workspace, "labels", ServerLimits(max_pending=2), **HT_LABELS_AT_MODEL)
    party = GrpcChannel(f"127.0.0.1:{server.port}", client_id="p", timeout_s=10)
    try:
        bad = Message("forward", _hidden() | {"labels": torch.tensor([0, 7])}, {"train": True, "batch_id": 1})
        with pytest.raises(
            RemoteError, match=r"labels must be -100 \(ignored\) or in \[0, 3\); got \[7\]"
        ) as err:
            party.request(bad)
        assert _code(err) == ErrorCode.BAD_MESSAGE
        assert server.model_party.updates == 0 and not server.service.step_lock.locked()
        for batch_id in (1, 2):
            party.request(Message("forward", _hidden(), {"train": True, "batch_id": batch_id}))
        with pytest.raises(RemoteError, match="without their backward") as err:
            party.request(Message("forward", _hidden(), {"train": True, "batch_id": 3}))
        assert _code(err) == ErrorCode.LIMIT
    finally:
        party.close()
        server.stop()
