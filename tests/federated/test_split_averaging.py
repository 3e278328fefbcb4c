"""SplitLoRA's adapter averaging through the model party by the aggregators (plain, ckks, secagg)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import pytest
import torch

from splitfed.federated.aggregators import AggregationError
from splitfed.federated.fedavg import weighted_average
from splitfed.federated.split_averaging import (
    AveragingClient,
    AveragingServer,
    averaging_aggregator,
    from_message,
)
from splitfed.transport.channel import Message


def _ask(server: AveragingServer, tamper: Callable[[Message], Message] | None = None):
    def ask(message: Message) -> Message:
        if tamper is not None:
            message = tamper(message)
        meta = message.meta
        reply = server.handle(
            str(meta["client"]),
            int(meta["round"]),
            int(meta["parties"]),
            str(meta["stage"]),
            from_message(message),
        )
        return Message(
            "fedavg_result",
            dict(reply.tensors),
            {"payload_kind": reply.kind, "payload_meta": json.dumps(reply.meta)},
        )

    return ask


def _run(
    aggregation: str, params: list[dict[str, torch.Tensor]], samples: list[float], rounds: int = 1, **kw
):
    server = AveragingServer(averaging_aggregator(aggregation), timeout_s=kw.pop("timeout_s", 30.0))
    clients = [AveragingClient(averaging_aggregator(aggregation), dealer=i == 0) for i in range(len(params))]
    results: dict[int, list[dict[str, torch.Tensor]]] = {i: [] for i in range(len(params))}
    errors: list[BaseException] = []
    tamper = kw.pop("tamper", None)

    def party(i: int) -> None:
        try:
            for r in range(1, rounds + 1):
                results[i].append(
                    clients[i].average(
                        _ask(server, tamper), f"party{i}", r, len(params), params[i], samples[i]
                    )
                )
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=party, args=(i,)) for i in range(len(params))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return server, results, errors


def _params(seed: int, names=("a", "b")) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(3, 4, generator=g) * 0.1 for n in names}


@pytest.mark.parametrize("aggregation", ["plain", "ckks", "secagg"])
def test_every_party_gets_the_sample_weighted_average(aggregation: str) -> None:
    params = [_params(i) for i in range(3)]
    samples = [10.0, 30.0, 60.0]
    server, results, errors = _run(aggregation, params, samples, rounds=2)
    assert not errors, errors
    expected = weighted_average(list(zip(params, samples, strict=True)))
    for i in range(3):
        for got in results[i]:
            for name in expected:
                assert torch.allclose(got[name], expected[name], rtol=0, atol=1e-6), (aggregation, name)
    assert server.completed == 2
    if aggregation == "ckks":
        assert not server.aggregator.holds_secret_key  # it added ciphertexts with a keyless context


def test_parties_holding_different_parameters_average_per_tensor() -> None:
    params = [_params(0, ("a", "b")), _params(1, ("a",)), _params(2, ("a", "b"))]
    samples = [1.0, 1.0, 2.0]
    _, results, errors = _run("ckks", params, samples)
    assert not errors, errors
    b = (params[0]["b"] + 2 * params[2]["b"]) / 3  # averaged over the parties holding it
    assert torch.allclose(results[0][0]["b"], b, atol=1e-6) and torch.allclose(
        results[2][0]["b"], b, atol=1e-6
    )
    assert set(results[1][0]) == {"a"}  # a party loads only what it holds
    a = (params[0]["a"] + params[1]["a"] + 2 * params[2]["a"]) / 4
    assert all(torch.allclose(results[i][0]["a"], a, atol=1e-6) for i in range(3))


def test_a_party_using_another_aggregation_gets_a_clear_error() -> None:
    server = AveragingServer(averaging_aggregator("plain"), timeout_s=5)
    client = AveragingClient(averaging_aggregator("secagg"), dealer=True)
    with pytest.raises(AggregationError, match="not a stage of plain averaging"):
        client.average(_ask(server), "p0", 1, 1, _params(0), 1.0)


def test_a_forged_ciphertext_fails_the_round_for_everyone_and_applies_nothing() -> None:
    def tamper(message: Message) -> Message:
        if message.meta["client"] == "party2" and message.meta["stage"] == "update":
            message.tensors["ciphertexts"] = torch.zeros(100, dtype=torch.uint8)
        return message

    params = [_params(i) for i in range(3)]
    _, results, errors = _run("ckks", params, [1.0, 1.0, 1.0], tamper=tamper)
    assert len(errors) == 3 and all("ckks" in str(e) for e in errors)
    assert all(not r for r in results.values())


def test_secagg_completes_without_a_party_lost_after_sharing_keys() -> None:
    def tamper(message: Message) -> Message:
        if message.meta["client"] == "party2" and message.meta["stage"] == "update":
            raise ConnectionError("party2 went away")
        return message

    params = [_params(i) for i in range(3)]
    samples = [1.0, 2.0, 3.0]
    server, results, errors = _run("secagg", params, samples, tamper=tamper, timeout_s=3.0)
    assert len(errors) == 1 and isinstance(errors[0], ConnectionError)
    expected = weighted_average([(params[0], 1.0), (params[1], 2.0)])
    for i in (0, 1):
        for name in expected:
            assert torch.allclose(results[i][0][name], expected[name], atol=1e-6)
    assert server.completed == 1
