"""The Flower ServerApp and ClientApp on an in-memory grid: same result as `splitfed fedtrain`,
blind server, misbehaving clients left out, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from safetensors.torch import load_file

from flower_grid import FIRST_NODE, LocalGrid
from splitfed.config import ConfigError, load_config, parse_config
from splitfed.federated.aggregators import AggregationError, Payload
from splitfed.federated.aggregators.base import tensor_of
from splitfed.federated.flower.records import (
    FlowerProtocolError,
    get_payload,
    get_tensors,
    put_payload,
    put_tensors,
)
from splitfed.federated.flower.server_app import FlowerServer
from splitfed.federated.simulation import fedtrain
from tiny import run_config, save_tiny_pretrained, write_topic_csv

# SGD, so that CKKS's ~1e-9 noise in one round's average stays that small in the next (Adam's
# normalisation turns it into sign flips of near-zero coordinates)
FED = {"clients": 2, "rounds": 2, "local_steps": 2, "sample_fraction": 1.0, "aggregation": "ckks"}
TRAIN = {"optimizer": "sgd", "lr": 0.05, "eval_before": False}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("flower")
    save_tiny_pretrained(root / "model")
    write_topic_csv(root / "data.csv")
    return root


def _quiet(_: str) -> None:
    pass


def write_run(root: Path, name: str, **fed: object) -> Path:
    raw = run_config(root, name, federated=FED | fed, train=TRAIN)
    raw.pop("split")
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def max_relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a)


def run_flower(root: Path, path: Path, clients: int, **grid: object) -> tuple[dict, LocalGrid, FlowerServer]:
    nodes = [{"partition-id": i, "output-dir": str(root / f"{path.stem}-node{i}")} for i in range(clients)]
    local = LocalGrid(nodes, {"config": str(path)}, **grid)  # type: ignore[arg-type]
    server = FlowerServer(local, load_config(path), log=_quiet)
    return server.run(), local, server


def test_ckks_on_flower_equals_the_simulation_and_the_server_holds_no_key(root: Path) -> None:
    sim = fedtrain(load_config(write_run(root, "sim")), progress=False, log=_quiet)
    summary, grid, server = run_flower(root, write_run(root, "fl"), 2)
    expected = load_file(str(sim.output_dir / "global" / "adapter.safetensors"))
    nodes = [load_file(str(root / f"fl-node{i}" / "global" / "adapter.safetensors")) for i in range(2)]
    assert max_relative_error(expected, nodes[0]) < 1e-6
    assert all(torch.equal(nodes[0][k], nodes[1][k]) for k in nodes[0])  # every client holds the same model
    assert server.aggregator.context_id and not server.aggregator.holds_secret_key
    assert server.global_state is None  # under ckks the server never holds the model
    assert [h["round"] for h in summary["history"]] == [1, 2]
    assert all(h["clients"] == 2 and h["update_bytes"] > 0 for h in summary["history"])
    assert summary["metrics_after"]["accuracy"] == pytest.approx(sim.metrics_after["accuracy"])
    written = json.loads((root / "fl" / "results.json").read_text())
    assert written["runtime"] == "flower" and len(written["history"]) == 2
    # the secret context stays in the clients' own state; the dealer sealed it to the other one
    kinds = [t for _, t in grid.sent]
    assert kinds.count("query.ckks_dealer") == 1 and kinds.count("query.ckks_open") == 1
    for ctx in grid.contexts.values():
        assert isinstance(ctx.state["splitfed.keys"]["ckks_secret"], bytes)


def test_plain_fedadam_is_applied_by_the_server_as_in_the_simulation(root: Path) -> None:
    fed = {"aggregation": "plain", "strategy": "fedadam", "server_lr": 0.01}
    sim = fedtrain(load_config(write_run(root, "sim-adam", **fed)), progress=False, log=_quiet)
    _, _, server = run_flower(root, write_run(root, "fl-adam", **fed), 2)
    expected = load_file(str(sim.output_dir / "global" / "adapter.safetensors"))
    got = load_file(str(root / "fl-adam-node1" / "global" / "adapter.safetensors"))
    assert max_relative_error(expected, got) < 1e-6
    assert server.global_state is not None


def test_a_tampered_update_is_left_out_and_the_round_completes(root: Path) -> None:
    path = write_run(root, "fl-bad", clients=3, min_clients=2)
    other = tensor_of(b"\x00" * 64)

    def tamper(node: int, reply: Message) -> Message:
        if node == FIRST_NODE + 2 and reply.metadata.message_type == "train" and not reply.has_error():
            payload = get_payload(reply.content, "update")
            bad = Payload(payload.kind, {**payload.tensors, "ciphertexts": other}, payload.meta)
            put_payload(reply.content, "update", bad)
        return reply

    summary, grid, _ = run_flower(root, path, 3, tamper=tamper)
    assert [h["clients"] for h in summary["history"]] == [2, 2]
    # nothing half-applied: every client, the tampered one included, holds the same global model
    digests = {
        get_tensors(ctx.state, "splitfed.global")["score.weight"].sum().item()
        for ctx in grid.contexts.values()
    }
    assert len(digests) == 1


def test_a_failing_client_below_the_minimum_stops_the_run_with_its_reason(root: Path) -> None:
    path = write_run(root, "fl-fail", min_clients=2)

    def tamper(node: int, reply: Message) -> Message:
        if node == FIRST_NODE + 1 and reply.metadata.message_type == "train":
            reply.content["update.tensors"] = ArrayRecord()
        return reply

    with pytest.raises(AggregationError, match="fewer than the 2 required"):
        run_flower(root, path, 2, tamper=tamper)


def test_partitions_must_be_distinct_and_complete(root: Path) -> None:
    path = write_run(root, "fl-dup")
    grid = LocalGrid([{"partition-id": 0}, {"partition-id": 0}], {"config": str(path)})
    with pytest.raises(AggregationError, match="both train partition-id 0"):
        FlowerServer(grid, load_config(path), log=_quiet).connect()
    grid = LocalGrid([{"partition-id": 0}, {}], {"config": str(path)})
    with pytest.raises(AggregationError, match="no SuperNode trains partition-id \\[1\\]"):
        FlowerServer(grid, load_config(path), log=_quiet, timeout=5).connect()


def test_secagg_on_flower_matches_the_simulation_and_survives_a_client_lost_after_sharing_keys(
    root: Path,
) -> None:
    fed = {"aggregation": "secagg", "clients": 3, "min_clients": 2}
    sim = fedtrain(load_config(write_run(root, "sim-sa", **fed)), progress=False, log=_quiet)
    summary, grid, server = run_flower(root, write_run(root, "fl-sa", **fed), 3)
    expected = load_file(str(sim.output_dir / "global" / "adapter.safetensors"))
    got = load_file(str(root / "fl-sa-node0" / "global" / "adapter.safetensors"))
    # fixed-point quantization with stochastic rounding: equal up to a few quantization steps
    assert max(float((expected[k] - got[k]).abs().max()) for k in expected) < 1e-5
    kinds = [t for _, t in grid.sent]
    assert kinds.count("query.secagg_advertise") == 3 * 2 and kinds.count("query.secagg_reveal") == 3 * 2
    assert [h["clients"] for h in summary["history"]] == [3, 3]
    assert server.global_state is not None  # the server learns the sum, so it steps the strategy

    # client 2 shares its keys, then its masked update never arrives: the others' sum still unmasks
    def lose_update(node: int, reply: Message) -> Message:
        if node == FIRST_NODE + 2 and reply.metadata.message_type == "train":
            reply.content["update.tensors"] = ArrayRecord()
        return reply

    summary, grid, _ = run_flower(root, write_run(root, "fl-sa-drop", **fed), 3, tamper=lose_update)
    assert [h["clients"] for h in summary["history"]] == [2, 2]
    states = [get_tensors(ctx.state, "splitfed.global") for ctx in grid.contexts.values()]
    assert all(torch.equal(states[0][k], s[k]) for s in states for k in s)


def test_unsupported_settings_are_refused_with_the_reason(root: Path) -> None:
    cfg = parse_config(
        run_config(root, "x", federated=FED | {"dp": {"clip": 1.0, "noise_multiplier": 1.0}})
        | {"split": {"setting": "ht", "head_layers": 1}}
    )
    with pytest.raises(ConfigError, match="not yet on Flower"):
        FlowerServer(LocalGrid([], {}), cfg)


def test_records_round_trip_and_reject_what_does_not_fit() -> None:
    payload = Payload(
        "update", {"a": torch.arange(5, dtype=torch.uint8), "b": torch.ones(3)}, {"layout": "[]", "n": 3}
    )
    content = RecordDict()
    put_payload(content, "update", payload)
    back = get_payload(content, "update")
    assert back.kind == "update" and back.meta == payload.meta
    assert torch.equal(back.tensors["a"], payload.tensors["a"]) and back.tensors["a"].dtype == torch.uint8
    with pytest.raises(FlowerProtocolError, match="missing"):
        get_payload(content, "aggregate")
    content["update.meta"] = ConfigRecord({"kind": "update", "meta": "{not json"})
    with pytest.raises(FlowerProtocolError, match="not JSON"):
        get_payload(content, "update")
    content["update.meta"] = ConfigRecord({"kind": "update", "meta": json.dumps({"x": [1, 2]})})
    with pytest.raises(FlowerProtocolError, match="scalars"):
        get_payload(content, "update")
    import numpy as np
    from flwr.app import Array

    content = RecordDict()
    put_payload(content, "update", payload)
    content["update.tensors"]["a"] = Array(np.array(["text"]))
    with pytest.raises(FlowerProtocolError, match="dtype"):
        get_payload(content, "update")
    like = {"w": torch.zeros(2, 2)}
    put_tensors(content, "global", {"w": torch.ones(2, 2)})
    assert torch.equal(get_tensors(content, "global", like=like)["w"], torch.ones(2, 2))
    put_tensors(content, "global", {"w": torch.full((2, 2), float("nan"))})
    with pytest.raises(FlowerProtocolError, match="finite"):
        get_tensors(content, "global", like=like)
    put_tensors(content, "global", {"w": torch.ones(3)})
    with pytest.raises(FlowerProtocolError, match="shape"):
        get_tensors(content, "global", like=like)
