"""The gRPC runtime on loopback: same losses as in process, validation, auth, faults."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest
import torch

from splitfed.config import parse_config
from splitfed.run import train
from splitfed.runtime import join, start_server
from splitfed.transport.channel import Message
from splitfed.transport.grpc_channel import GrpcChannel, RemoteError, TransportError
from splitfed.transport.grpc_server import METHOD
from splitfed.transport.proto import splitfed_pb2 as pb
from splitfed.transport.wire import (
    FRAME_BYTES,
    Reassembler,
    WireError,
    WireLimits,
    frames_of,
    from_envelope,
    to_envelope,
    to_frames,
)
from tiny import run_config, save_tiny_pretrained, write_topic_csv

HIDDEN = 32


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("grpc")
    save_tiny_pretrained(root / "model")
    write_topic_csv(root / "data.csv")
    return root


def _cfg(root: Path, out: str, **sections: object):
    raw = run_config(root, out, **sections)
    raw["model"]["num_labels"] = 3
    raw["train"]["steps"] = 5
    return parse_config(raw)


CASES = {
    "hbt-splitlora": {},
    "ht-labels-at-data": {"split": {"setting": "ht", "head_layers": 2, "tail_layers": 0}},
    "ht-splitfrozen-labels-at-model": {
        "mode": "splitfrozen",
        "split": {"setting": "ht", "head_layers": 1, "tail_layers": 0, "labels_at": "model"},
    },
}


@pytest.mark.parametrize("case", list(CASES))
def test_loopback_reproduces_in_process_losses(workspace: Path, case: str) -> None:
    local = train(_cfg(workspace, f"{case}-local", **CASES[case]), progress=False, log=lambda s: None)
    cfg = _cfg(workspace, f"{case}-remote", **CASES[case])
    server = start_server(cfg, port=0)
    try:
        remote = join(
            cfg, f"127.0.0.1:{server.port}", client_id="hospital", progress=False, log=lambda s: None
        )
    finally:
        server.stop()
    local_losses = [h["loss"] for h in local.history]
    remote_losses = [h["loss"] for h in remote.history]
    assert remote_losses == pytest.approx(local_losses, abs=1e-5)
    assert remote.metrics_after == pytest.approx(local.metrics_after, abs=1e-5)
    wire = remote.summary["wire"]
    assert wire["bytes_to_model"] >= wire["payload_to_model"] > 0
    timings = json.loads((remote.output_dir / "results.json").read_text())["timings"]
    assert timings["model_party_busy_s"] > 0 and timings["model_party_wait_s"] > 0
    assert 0 < timings["data_party_wait_s"] <= timings["train_s"]


@pytest.fixture
def server(workspace: Path):
    srv = start_server(_cfg(workspace, "served"), port=0, tokens=None)
    yield srv
    srv.stop()


def _forward(batch: int = 2, seq: int = 5, hidden: int = HIDDEN, train_: bool = False) -> Message:
    return Message(
        "forward",
        {
            "hidden": torch.randn(batch, seq, hidden),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        },
        {"train": train_, "batch_id": 1},
    )


@pytest.mark.parametrize(
    ("message", "needle"),
    [
        (_forward(hidden=7), "hidden must be a floating [batch, seq, 32]"),
        (Message("forward", {"hidden": torch.randn(2, 5, HIDDEN)}), "forward message carries"),
        (
            Message(
                "forward", {"hidden": torch.randn(2, 5, HIDDEN), "attention_mask": torch.full((2, 5), 3)}
            ),
            "0/1",
        ),
        (Message("launch", {}), "unknown message kind"),
        (Message("backward", {"grad": torch.randn(2, 5, HIDDEN)}, {"batch_id": 99}), "no forward pending"),
        (
            Message(
                "forward",
                {
                    "hidden": torch.full((1, 2, HIDDEN), float("nan")),
                    "attention_mask": torch.ones(1, 2, dtype=torch.long),
                },
            ),
            "finite",
        ),
        (_forward(batch=1000), "outside the session's limits"),
    ],
)
def test_bad_messages_get_an_error_and_the_server_keeps_serving(
    server, message: Message, needle: str
) -> None:
    bad = GrpcChannel(f"127.0.0.1:{server.port}", client_id="mallory")
    good = GrpcChannel(f"127.0.0.1:{server.port}", client_id="alice")
    try:
        with pytest.raises(RemoteError, match=needle.replace("[", r"\[")):
            bad.request(message)
        # The same session and another one still work.
        assert bad.request(_forward()).tensors["hidden"].shape == (2, 5, HIDDEN)
        assert good.request(_forward()).tensors["hidden"].shape == (2, 5, HIDDEN)
    finally:
        bad.close()
        good.close()


def test_garbage_frames_are_answered_with_an_error(server) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stream = channel.stream_stream(
        METHOD, request_serializer=pb.Frame.SerializeToString, response_deserializer=pb.Frame.FromString
    )
    frames = [
        pb.Frame(message_id=1, index=0, total=1, payload=b"\xff\x00 not a protobuf"),
        pb.Frame(message_id=2, index=5, total=2, payload=b"x"),
        pb.Frame(message_id=3, index=0, total=10**9, payload=b"x"),
    ]
    replies = list(stream(iter(frames)))
    errors = []
    reassembler = Reassembler(WireLimits())
    for frame in replies:
        envelope = reassembler.push(frame)
        if envelope is not None:
            errors.append(envelope.error)
    assert len(errors) == 3 and all(errors)
    assert "protobuf" in errors[0] or "hello" in errors[0]
    channel.close()
    ok = GrpcChannel(f"127.0.0.1:{server.port}")
    assert ok.request(_forward()).kind == "forward_result"
    ok.close()


def test_tokens_are_required_when_configured(workspace: Path) -> None:
    srv = start_server(_cfg(workspace, "auth"), port=0, tokens={"hospital-a": "s3cret-a"})
    try:
        with pytest.raises(TransportError, match="UNAUTHENTICATED"):
            GrpcChannel(f"127.0.0.1:{srv.port}", token="wrong", timeout_s=10)
        with pytest.raises(TransportError, match="UNAUTHENTICATED"):
            GrpcChannel(f"127.0.0.1:{srv.port}", timeout_s=10)
        ok = GrpcChannel(f"127.0.0.1:{srv.port}", client_id="ignored", token="s3cret-a")
        assert ok.client_id == "hospital-a"
        ok.close()
    finally:
        srv.stop()


def test_client_disconnecting_mid_step_leaves_adapters_untouched(server) -> None:
    before = {
        n: p.detach().clone()
        for n, p in server.segments["body"].named_model_parameters(trainable_only=True).items()
    }
    dying = GrpcChannel(f"127.0.0.1:{server.port}", client_id="dying")
    reply = dying.request(_forward(train_=True))  # takes the step lock, leaves a pending graph
    assert reply.kind == "forward_result"
    dying.close()  # gone before its backward
    other = GrpcChannel(f"127.0.0.1:{server.port}", client_id="other", timeout_s=20)
    try:
        assert other.request(_forward()).kind == "forward_result"  # the lock was released
    finally:
        other.close()
    after = server.segments["body"].named_model_parameters(trainable_only=True)
    for name, value in before.items():
        assert torch.equal(after[name], value), name
        assert after[name].grad is None
    assert server.model_party.updates == 0


def test_big_tensors_travel_in_raw_frames_after_the_envelope() -> None:
    logits = torch.randn(2, 64, 1000)  # 512 KB: raw frames, not inside the envelope
    mask = torch.ones(2, 64, dtype=torch.long)  # 1 KB: inline
    message = Message("forward_result", {"logits": logits, "attention_mask": mask}, {"batch_id": 3})
    frames = list(frames_of(message, 9, "to_data", None))
    envelope = pb.Envelope()
    envelope.ParseFromString(frames[0].payload)
    assert frames[0].header_frames == 1 and len(frames) == 2
    assert envelope.tensors[0].external == logits.numel() * 4 and not envelope.tensors[0].data
    assert envelope.tensors[1].data and not envelope.tensors[1].external
    reassembler = Reassembler(WireLimits())
    out = [reassembler.push(f) for f in frames]
    decoded = from_envelope(out[-1], WireLimits(), reassembler.external)
    assert torch.equal(decoded.tensors["logits"], logits) and torch.equal(
        decoded.tensors["attention_mask"], mask
    )
    decoded.tensors["logits"].add_(1)  # writable, and nobody else's memory
    with pytest.raises(WireError, match="follow the envelope"):
        from_envelope(out[-1], WireLimits())  # the raw data is missing
    short = pb.Frame.FromString(frames[1].SerializeToString())
    short.payload = short.payload[:-4]
    with pytest.raises(WireError, match="raw data"):
        fresh = Reassembler(WireLimits())
        for f in (frames[0], short):
            fresh.push(f)


def test_announced_raw_data_costs_no_memory_until_it_comes() -> None:
    import tracemalloc

    envelope = pb.Envelope(kind="backward", seq=1)
    envelope.tensors.add(
        name="grad", dtype="float32", shape=[1, 1, 100 << 20], codec="raw", external=400 << 20
    )
    header = pb.Frame(message_id=1, index=0, total=2, header_frames=1, payload=envelope.SerializeToString())
    reassembler = Reassembler(WireLimits())
    tracemalloc.start()
    try:
        assert reassembler.push(header) is None  # 400 MiB announced in a 60-byte frame...
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # ...and nothing reserved for it
    with pytest.raises(WireError, match="announce 419430400 bytes of raw data; 3 came"):
        reassembler.push(pb.Frame(message_id=1, index=1, total=2, header_frames=1, payload=b"abc"))


def test_messages_larger_than_grpc_default_limit_are_framed() -> None:
    big = Message("forward", {"hidden": torch.randn(8, 1024, 384)}, {"batch_id": 1})  # 12 MiB
    frames = to_frames(to_envelope(big, 7, "to_model"), 7)
    assert len(frames) > 1 and all(len(f.payload) <= FRAME_BYTES for f in frames)
    reassembler = Reassembler(WireLimits())
    out = [reassembler.push(f) for f in frames]
    assert all(o is None for o in out[:-1]) and out[-1] is not None
    torch.testing.assert_close(from_envelope(out[-1], WireLimits()).tensors["hidden"], big.tensors["hidden"])
    small = Reassembler(WireLimits(max_message_bytes=2 * FRAME_BYTES))
    with pytest.raises(WireError, match="frames"):
        for f in frames:
            small.push(f)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma", "gpt2"])
def test_generation_over_grpc_equals_generate(tmp_path: Path, family: str) -> None:
    from splitfed.runtime import open_generator
    from splitfed.split.decoding import DecodingConfig

    save_tiny_pretrained(tmp_path / "model", family)
    write_topic_csv(tmp_path / "data.csv")
    prompts = ["the cat sat on the mat", "a big red car"]
    decoding = DecodingConfig(max_new_tokens=10)
    for setting in (
        {"setting": "ht", "head_layers": 1, "tail_layers": 0},
        {"setting": "hbt", "head_layers": 1, "tail_layers": 1},
    ):
        cfg = _cfg(tmp_path, "gen", task="causal_lm", data={"name": "shakespeare"}, split=setting)
        with open_generator(cfg, decoding=decoding) as local:
            expected = local.generate_ids(prompts)
            model = local.head.model
        tok = local.tokenizer
        enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
        ref = model.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=0)[
            :, enc["input_ids"].shape[1] :
        ]
        eos = model.generation_config.eos_token_id
        assert expected == [r[: r.index(eos) + 1] if eos in r else r for r in ref.tolist()]
        server = start_server(cfg, port=0)
        try:
            with open_generator(cfg, target=f"127.0.0.1:{server.port}", decoding=decoding) as remote:
                assert remote.generate_ids(prompts) == expected
            deadline = time.monotonic() + 5  # gen_end is one-way: give the server a moment
            while server.model_party.inference.sessions and time.monotonic() < deadline:
                time.sleep(0.01)
            assert server.model_party.inference.sessions == {}
        finally:
            server.stop()


def test_a_decoding_step_costs_one_hidden_vector_plus_a_small_envelope() -> None:
    for hidden in (32, 576):
        step = Message("gen_step", {"hidden": torch.randn(1, 1, hidden)}, {"session": "0123456789abcdef"})
        size = sum(f.ByteSize() for f in to_frames(to_envelope(step, 2**40, "to_model"), 2**40))
        assert size - hidden * 4 <= 96, size
        reply = Message("gen_result", {"token": torch.tensor([5])})
        assert sum(f.ByteSize() for f in to_frames(to_envelope(reply, 2**40, "to_data"), 2**40)) <= 64


def test_tls_and_mutual_tls(workspace: Path, tmp_path: Path) -> None:
    from splitfed.transport.certs import make_test_ca
    from splitfed.transport.grpc_server import TlsFiles

    p = make_test_ca(tmp_path, clients=["hospital"])
    cfg = _cfg(workspace, "tls")
    srv = start_server(cfg, port=0, tls=TlsFiles(str(p["server_cert"]), str(p["server_key"])))
    try:
        ok = GrpcChannel(f"localhost:{srv.port}", tls=TlsFiles(ca=str(p["ca"])))
        assert ok.request(_forward()).kind == "forward_result"
        ok.close()
        with pytest.raises(TransportError):
            GrpcChannel(f"localhost:{srv.port}", timeout_s=5)  # plaintext to a TLS server
    finally:
        srv.stop()
    mtls = TlsFiles(str(p["server_cert"]), str(p["server_key"]), ca=str(p["ca"]))
    srv = start_server(cfg, port=0, tls=mtls)
    try:
        with pytest.raises(TransportError):
            GrpcChannel(f"localhost:{srv.port}", tls=TlsFiles(ca=str(p["ca"])), timeout_s=5)  # no client cert
        client = TlsFiles(str(p["hospital_cert"]), str(p["hospital_key"]), str(p["ca"]))
        ok = GrpcChannel(f"localhost:{srv.port}", tls=client)
        assert ok.request(_forward()).kind == "forward_result"
        ok.close()
    finally:
        srv.stop()


def _join_concurrently(
    cfg, server, workspace: Path, name: str, parties: int, log=lambda s: None, also=()
) -> dict[int, object]:
    """Run data parties 0..parties-1 of ``cfg`` (and the callables in ``also``) in threads; stop the server."""
    import threading

    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def party(index: int) -> None:
        try:
            mine = cfg.model_copy(deep=True)
            mine.data.party_index = index
            mine.output_dir = str(workspace / f"{name}-{index}")
            results[index] = join(
                mine, f"127.0.0.1:{server.port}", client_id=f"{name}{index}", progress=False, log=log
            )
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=party, args=(i,)) for i in range(parties)]
    threads += [threading.Thread(target=fn) for fn in also]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        server.stop()
    assert not errors, errors
    return results


def test_three_data_parties_train_concurrently_and_survive_a_dying_one(workspace: Path) -> None:
    cfg = _cfg(workspace, "multi", data={"partition": "dirichlet:1.0", "num_parties": 3})
    server = start_server(cfg, port=0)
    logs: list[str] = []

    def dying() -> None:
        channel = GrpcChannel(f"127.0.0.1:{server.port}", client_id="dying")
        channel.request(_forward(train_=True))  # holds the step lock with a pending graph...
        channel.close()  # ...and dies before its backward

    results = _join_concurrently(cfg, server, workspace, "multi", 2, logs.append, also=[dying])
    assert set(results) == {0, 1}
    for index in (0, 1):
        assert len(results[index].history) == 5  # type: ignore[attr-defined]
    assert server.model_party.updates == 10  # every completed step applied, the dying one's not
    assert any("partition dirichlet:1.0" in line and "party 0" in line for line in logs)


def test_both_sides_killed_and_resumed_lose_no_checkpointed_step(workspace: Path) -> None:
    import splitfed.run.callbacks as run_module  # where Checkpointing looks save_checkpoint up
    from splitfed.config import ConfigError

    straight = train(_cfg(workspace, "straight-6"), progress=False, log=lambda s: None)
    cfg = _cfg(workspace, "crash", train={"checkpoint_every": 3})
    server = start_server(cfg, port=0)

    class Crash(Exception):
        pass

    original = run_module.save_checkpoint

    def save_then_crash(out, segments, parties, step, history):  # type: ignore[no-untyped-def]
        original(out, segments, parties, step, history)
        raise Crash  # the data party dies right after its step-3 checkpoint

    run_module.save_checkpoint = save_then_crash
    try:
        with pytest.raises(Crash):
            join(cfg, f"127.0.0.1:{server.port}", progress=False, log=lambda s: None)
    finally:
        run_module.save_checkpoint = original
        server.stop()  # the model party dies too
    fresh = start_server(cfg, port=0)  # not resumed: the data party's resume is refused clearly
    try:
        with pytest.raises(ConfigError, match="model party has applied 0 steps"):
            join(cfg, f"127.0.0.1:{fresh.port}", resume=True, progress=False, log=lambda s: None)
    finally:
        fresh.stop()
    resumed_server = start_server(cfg, port=0, resume=True, log=lambda s: None)
    try:
        resumed = join(
            cfg, f"127.0.0.1:{resumed_server.port}", resume=True, progress=False, log=lambda s: None
        )
    finally:
        resumed_server.stop()
    assert [h["loss"] for h in resumed.history] == pytest.approx(
        [h["loss"] for h in straight.history], abs=1e-5
    )
    assert resumed.metrics_after == pytest.approx(straight.metrics_after, abs=1e-5)


def test_a_data_party_with_a_deeper_head_is_served_from_its_block(workspace: Path) -> None:
    served = _cfg(
        workspace,
        "hetero-server",
        mode="splitfrozen",
        split={"setting": "ht", "head_layers": 1, "tail_layers": 0},
    )
    cfg = _cfg(
        workspace, "hetero-2", mode="splitfrozen", split={"setting": "ht", "head_layers": 2, "tail_layers": 0}
    )
    local = train(cfg, progress=False, log=lambda s: None)
    server = start_server(served, port=0)
    try:
        remote = join(cfg, f"127.0.0.1:{server.port}", client_id="deep", progress=False, log=lambda s: None)
    finally:
        server.stop()
    # before any update LoRA is a no-op (B = 0): the first loss is the same model either way
    assert remote.history[0]["loss"] == pytest.approx(local.history[0]["loss"], abs=1e-5)
    assert server.model_party.updates == 5 and set(server.model_party._views) == {2}


@pytest.mark.parametrize("aggregation", ["plain", "ckks", "secagg"])
def test_three_data_parties_federate_their_adapters(workspace: Path, aggregation: str) -> None:
    from safetensors.torch import load_file

    name = f"fed-{aggregation}"
    cfg = _cfg(
        workspace,
        name,
        data={"partition": "dirichlet:0.5", "num_parties": 3},
        train={"fedavg_every": 2, "fedavg_aggregation": aggregation},
    )
    cfg.train.steps = 4  # the last step averages
    server = start_server(cfg, port=0)
    _join_concurrently(cfg, server, workspace, name, 3)
    averaging = server.model_party.averaging
    assert averaging.completed == 2
    if aggregation == "ckks":  # the model party added ciphertexts with a keyless context
        assert averaging.aggregator.context_id and not averaging.aggregator.holds_secret_key
    adapters = [
        load_file(str(workspace / f"{name}-{i}" / "data_party" / "adapter.safetensors")) for i in range(3)
    ]
    assert adapters[0] and all(set(a) == set(adapters[0]) for a in adapters)
    for key in adapters[0]:  # the last step averaged: every party ends with the same adapters
        assert torch.equal(adapters[0][key], adapters[1][key]) and torch.equal(
            adapters[0][key], adapters[2][key]
        )


def test_weighted_average() -> None:
    from splitfed.federated.fedavg import AggregationError, RoundAggregator, weighted_average

    avg = weighted_average(
        [({"a": torch.tensor([1.0]), "b": torch.tensor([4.0])}, 1.0), ({"a": torch.tensor([4.0])}, 2.0)]
    )
    assert avg["a"].item() == pytest.approx(3.0) and avg["b"].item() == pytest.approx(4.0)
    with pytest.raises(AggregationError, match="shape"):
        weighted_average([({"a": torch.zeros(2)}, 1.0), ({"a": torch.zeros(3)}, 1.0)])
    with pytest.raises(AggregationError, match="1 of 2 parties"):
        RoundAggregator(timeout_s=0.1).contribute(1, "x", {"a": torch.zeros(1)}, 1.0, expected=2)


SCHEDULES = {
    "hbt-splitlora-pipelined": ({}, "pipelined"),
    "ht-labels-at-data-pipelined": (CASES["ht-labels-at-data"], "pipelined"),
    "ht-splitfrozen-forward-only": (CASES["ht-splitfrozen-labels-at-model"], "forward-only"),
}


@pytest.mark.parametrize("case", list(SCHEDULES))
def test_pipelined_schedules_over_a_slow_link_reproduce_sequential_losses(workspace: Path, case: str) -> None:
    sections, schedule = SCHEDULES[case]
    train_section = {"grad_accum": 3, "batch_size": 4}
    local = train(
        _cfg(workspace, f"{case}-seq", **sections, train=train_section), progress=False, log=lambda s: None
    )
    cfg = _cfg(
        workspace,
        f"{case}-remote",
        **sections,
        train=train_section | {"schedule": schedule, "pipeline_depth": 3},
    )
    server = start_server(cfg, port=0)
    try:
        remote = join(cfg, f"127.0.0.1:{server.port}", progress=False, log=lambda s: None, latency_ms=10)
    finally:
        server.stop()
    assert [h["loss"] for h in remote.history] == pytest.approx([h["loss"] for h in local.history], abs=1e-5)
    assert remote.metrics_after == pytest.approx(local.metrics_after, abs=1e-5)


def test_injected_latency_delays_each_round_trip(server) -> None:
    channel = GrpcChannel(f"127.0.0.1:{server.port}", latency_ms=60)
    try:
        start = time.perf_counter()
        channel.request(_forward())
        one = time.perf_counter() - start
        start = time.perf_counter()
        tickets = [channel.submit(_forward()) for _ in range(4)]
        replies = [channel.result(t) for t in tickets]
        four = time.perf_counter() - start
    finally:
        channel.close()
    assert one >= 0.06
    assert all("logits" in r.tensors or "hidden" in r.tensors for r in replies)
    # Four messages in flight share one round trip instead of paying four.
    assert four < 0.06 * 4


def test_per_party_model_adapters_make_each_party_train_as_if_alone(workspace: Path) -> None:
    from safetensors.torch import load_file

    # SplitFrozen, labels at the model party: the data parties (threads of this process) draw no
    # random numbers, so their concurrent start cannot change what they compute.
    cfg = _cfg(
        workspace,
        "own",
        **CASES["ht-splitfrozen-labels-at-model"],
        data={"partition": "dirichlet:0.5", "num_parties": 2},
        finetune={"body_adapters": "per_party"},
        train={"schedule": "forward-only", "grad_accum": 2, "pipeline_depth": 3},
    )
    alone = {}
    for index in (0, 1):
        mine = cfg.model_copy(deep=True)
        mine.data.party_index = index
        mine.output_dir = str(workspace / f"own-alone-{index}")
        alone[index] = train(mine, progress=False, log=lambda s: None)
    server = start_server(cfg, port=0)
    together = _join_concurrently(cfg, server, workspace, "own", 2)
    # Concurrent parties, interleaved steps, yet each one's losses are its solo in-process run's:
    # nobody else touched its model-party adapters.
    for index in (0, 1):
        assert [h["loss"] for h in together[index].history] == pytest.approx(  # type: ignore[attr-defined]
            [h["loss"] for h in alone[index].history], abs=1e-5
        )
    final = server.save_adapters()
    own = [
        load_file(str(final / "parties" / f"own{i}" / "model_party" / "adapter.safetensors")) for i in (0, 1)
    ]
    solo = [
        load_file(str(workspace / f"own-alone-{i}" / "model_party" / "adapter.safetensors")) for i in (0, 1)
    ]
    assert own[0] and set(own[0]) == set(solo[0])
    for name in own[0]:
        assert torch.allclose(own[0][name], solo[0][name], atol=1e-5)
        assert torch.allclose(own[1][name], solo[1][name], atol=1e-5)
    assert any(not torch.equal(own[0][n], own[1][n]) for n in own[0])


def test_several_data_parties_resume_with_the_model_party(workspace: Path) -> None:
    import splitfed.run.callbacks as run_module  # where Checkpointing looks save_checkpoint up

    cfg = _cfg(
        workspace,
        "multi-resume",
        **CASES["ht-splitfrozen-labels-at-model"],
        data={"partition": "iid", "num_parties": 2},
        train={"checkpoint_every": 2, "schedule": "forward-only"},
    )
    cfg.train.steps = 6
    server = start_server(cfg, port=0)

    class Crash(Exception):
        pass

    original = run_module.save_checkpoint

    def crash_party_0_at_step_4(out, segments, parties, step, history):  # type: ignore[no-untyped-def]
        if str(out).endswith("multi-resume-0") and step == 4:
            raise Crash  # killed before its own step-4 checkpoint; the model party has step 4
        original(out, segments, parties, step, history)

    run_module.save_checkpoint = crash_party_0_at_step_4
    try:
        with pytest.raises(AssertionError, match="Crash"):
            _join_concurrently(cfg, server, workspace, "multi-resume", 2)  # stops the server too
    finally:
        run_module.save_checkpoint = original
    assert server.model_party.client_steps == {"multi-resume0": 4, "multi-resume1": 6}

    logs: list[str] = []
    resumed = start_server(cfg, port=0, resume=True, log=logs.append)
    assert resumed.model_party.client_steps == {"multi-resume0": 4, "multi-resume1": 6}
    mine = cfg.model_copy(deep=True)
    mine.output_dir = str(workspace / "multi-resume-0")
    try:
        result = join(
            mine,
            f"127.0.0.1:{resumed.port}",
            client_id="multi-resume0",
            resume=True,
            progress=False,
            log=logs.append,
        )
    finally:
        resumed.stop()
    # Its checkpoint said 2, the model party held 4: a frozen head skips ahead, nothing applied twice.
    assert any("continues from step 4" in line for line in logs)
    assert [h["step"] for h in result.history] == [1, 2, 5, 6]
    assert resumed.model_party.client_steps == {"multi-resume0": 6, "multi-resume1": 6}
