"""Secure aggregation: exact sums through dropouts, the overflow bound, and refusals that keep
every update hidden."""

import json

import numpy as np
import pytest
import torch

from splitfed.federated.aggregators import AggregationError, Payload, SecAggAggregator
from splitfed.federated.aggregators.secagg import UNMASK
from splitfed.federated.fedavg import weighted_average

NAMES = ("c0", "c1", "c2", "c3", "c4")
WEIGHTS = (10.0, 30.0, 5.0, 20.0, 7.0)


def _updates(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "lora_A": torch.randn(8, 96, generator=gen) * 1e-2,
            "lora_B": torch.randn(96, 8, generator=gen) * 1e-2,
        }
        for _ in NAMES
    ]


def _run(
    agg, updates, *, round_id=1, vanish_before_update=(), vanish_before_reveal=(), exclude=(), tamper=None
):
    """One round in process; clients in ``vanish_*`` stop answering at that stage."""
    clients = {name: agg.client(name, round_id=round_id) for name in NAMES}
    server = agg.server(round_id=round_id)
    roster = server.roster({n: c.advertise() for n, c in clients.items()})
    routed = server.route_shares({n: c.share_keys(roster) for n, c in clients.items()})
    for name, payload in routed.items():
        clients[name].receive_shares(payload)
    masked = {
        n: clients[n].encode(u, w)
        for n, u, w in zip(NAMES, updates, WEIGHTS, strict=True)
        if n not in vanish_before_update
    }
    if tamper:
        masked = tamper(masked)
    request = server.collect(masked, exclude=set(exclude))
    reveals = {n: clients[n].reveal(request) for n in server.survivors if n not in vanish_before_reveal}
    return server.unmask(reveals), server, clients, masked


def _expected(agg, updates, kept):
    return sum(agg.quantize(updates[NAMES.index(n)], WEIGHTS[NAMES.index(n)]) for n in kept)


def _sum_of(aggregate) -> np.ndarray:
    return aggregate.tensors["sum"].numpy().astype(np.int64)


@pytest.mark.parametrize("modulus_bits", [32, 64])
def test_full_round_gives_the_exact_quantized_sum_and_the_weighted_average(modulus_bits):
    agg = SecAggAggregator(modulus_bits=modulus_bits, max_weight=30.0, rounding="nearest")
    updates = _updates()
    aggregate, server, clients, masked = _run(agg, updates)
    assert server.survivors == list(NAMES) and server.dropped == []
    assert np.array_equal(_sum_of(aggregate), _expected(agg, updates, NAMES))
    ref = weighted_average(list(zip(updates, WEIGHTS, strict=True)))
    out = clients["c3"].decode(aggregate)
    step = 2.0**-agg.scale_bits * 30.0 / min(WEIGHTS)  # one quantization step of the smallest ratio
    for name in ref:  # within a quantization step (and float32's rounding of the result)
        assert (out[name] - ref[name]).abs().max() <= step + 1e-7 * ref[name].abs().max()
    # a 32-bit ring costs what fp32 costs (plus one weight per tensor)
    width = sum(t.numel() for t in updates[0].values()) + 2
    assert masked["c0"].nbytes == width * modulus_bits // 8


def test_masked_updates_reveal_nothing_alone():
    agg = SecAggAggregator(max_weight=30.0, rounding="nearest")
    updates = _updates(1)
    _, _, _, masked = _run(agg, updates)
    quantized = agg.quantize(updates[0], WEIGHTS[0])
    sent = masked["c0"].tensors["masked"].numpy().astype(np.int64)
    assert np.mean(sent == quantized) < 0.01
    assert np.abs(sent).mean() > 2**29  # uniform over the 32-bit ring, not small fixed-point values


def test_client_dropping_before_its_masked_update_leaves_the_exact_sum_of_the_others():
    """Its mask key is rebuilt from the survivors' shares to remove its pairwise masks."""
    agg = SecAggAggregator(max_weight=30.0, rounding="nearest")
    updates = _updates(2)
    aggregate, server, _clients, _ = _run(agg, updates, vanish_before_update={"c2"})
    kept = [n for n in NAMES if n != "c2"]
    assert server.dropped == ["c2"] and server.survivors == kept
    assert np.array_equal(_sum_of(aggregate), _expected(agg, updates, kept))
    assert json.loads(aggregate.meta["clients"]) == kept


def test_client_dropping_after_its_masked_update_is_still_summed():
    """It cannot reveal anymore: its self mask is rebuilt from the others' shares of its seed."""
    agg = SecAggAggregator(max_weight=30.0, rounding="nearest")
    updates = _updates(3)
    aggregate, server, _clients, _ = _run(agg, updates, vanish_before_reveal={"c1", "c4"})
    assert server.survivors == list(NAMES)
    assert np.array_equal(_sum_of(aggregate), _expected(agg, updates, NAMES))


def test_update_the_server_does_not_keep_gives_the_exact_sum_of_the_others():
    """A client whose masked update arrived is declared dropped (late, or its update is invalid):
    its mask key is rebuilt, its update left out, and the round completes with the others."""
    agg = SecAggAggregator(max_weight=30.0, rounding="nearest")
    updates = _updates(4)
    aggregate, server, _, _ = _run(agg, updates, exclude={"c3"})
    kept = [n for n in NAMES if n != "c3"]
    assert server.dropped == ["c3"]
    assert np.array_equal(_sum_of(aggregate), _expected(agg, updates, kept))
    assert "excluded" in json.loads(aggregate.meta["rejected"])["c3"]


def test_replayed_and_malformed_updates_are_dropped_with_a_reason():
    agg = SecAggAggregator(max_weight=30.0, rounding="nearest")
    updates = _updates(5)

    def tamper(masked):
        replayed = Payload("update", masked["c1"].tensors, dict(masked["c1"].meta, round=0))
        short = Payload("update", {"masked": masked["c4"].tensors["masked"][:-1]}, masked["c4"].meta)
        return dict(masked, c1=replayed, c4=short)

    aggregate, server, _, _ = _run(agg, updates, tamper=tamper)
    kept = ["c0", "c2", "c3"]
    assert server.survivors == kept
    assert np.array_equal(_sum_of(aggregate), _expected(agg, updates, kept))
    rejected = json.loads(aggregate.meta["rejected"])
    assert "replayed" in rejected["c1"] and "layout needs" in rejected["c4"]


def test_too_many_dropouts_fail_the_round_with_a_reason():
    agg = SecAggAggregator(max_weight=30.0)
    with pytest.raises(AggregationError, match="fewer than the 3 needed"):
        _run(agg, _updates(6), vanish_before_update={"c0", "c1", "c2"})
    with pytest.raises(AggregationError, match="shares received, 3 needed"):
        _run(agg, _updates(6), vanish_before_reveal={"c0", "c1", "c2"})


def test_honest_clients_refuse_requests_that_would_unmask_an_update():
    agg = SecAggAggregator(max_weight=30.0)
    updates = _updates(7)
    clients = {name: agg.client(name, round_id=3) for name in NAMES}
    server = agg.server(round_id=3)
    roster = server.roster({n: c.advertise() for n, c in clients.items()})
    for name, payload in server.route_shares({n: c.share_keys(roster) for n, c in clients.items()}).items():
        clients[name].receive_shares(payload)
    for n, u, w in zip(NAMES, updates, WEIGHTS, strict=True):
        clients[n].encode(u, w)

    def request(survivors, dropped):
        tensors = {"survivors": torch.tensor(survivors), "dropped": torch.tensor(dropped, dtype=torch.int64)}
        return Payload(UNMASK, tensors, {"aggregator": "secagg", "round": 3})

    c0 = clients["c0"]
    assert c0.index == 1
    with pytest.raises(AggregationError, match="both survivor and dropped"):
        c0.reveal(request([1, 2, 3, 4, 5], [5]))  # would reveal c4's seed and its mask key
    with pytest.raises(AggregationError, match="declares 'c0' dropped"):
        c0.reveal(request([2, 3, 4, 5], [1]))
    with pytest.raises(AggregationError, match="fewer than the threshold"):
        c0.reveal(request([1, 2], [3, 4, 5]))
    with pytest.raises(AggregationError, match="clients that shared keys"):
        c0.reveal(request([1, 2, 3], [4]))
    stale = Payload(UNMASK, request([1, 2, 3, 4, 5], []).tensors, {"aggregator": "secagg", "round": 2})
    with pytest.raises(AggregationError, match="replayed"):
        c0.reveal(stale)
    c0.reveal(request([1, 2, 3, 4, 5], []))
    with pytest.raises(AggregationError, match="already revealed"):
        c0.reveal(request([1, 2, 3, 4], [5]))


def test_tampered_shares_are_refused():
    agg = SecAggAggregator(max_weight=30.0)
    clients = {name: agg.client(name, round_id=1) for name in NAMES}
    server = agg.server(round_id=1)
    roster = server.roster({n: c.advertise() for n, c in clients.items()})
    routed = server.route_shares({n: c.share_keys(roster) for n, c in clients.items()})
    payload = routed["c2"]
    rows = payload.tensors["ciphertexts"].clone()
    rows[1, 20] ^= 1
    with pytest.raises(AggregationError, match="authentication failed"):
        clients["c2"].receive_shares(
            Payload(payload.kind, dict(payload.tensors, ciphertexts=rows), payload.meta)
        )


def test_overflow_bound_is_checked():
    agg = SecAggAggregator()  # defaults: 32-bit ring, clip 4, 128 clients
    assert agg.scale_bits == 21
    assert agg.max_clients * (agg.clip_range * 2**agg.scale_bits + 1) < 2**31
    with pytest.raises(ValueError, match="overflow a 32-bit ring"):
        SecAggAggregator(scale_bits=22)
    with pytest.raises(ValueError, match="overflow"):
        SecAggAggregator(max_clients=2**20, clip_range=2**10)
    assert SecAggAggregator(modulus_bits=64).scale_bits == 53
    with pytest.raises(AggregationError, match="exceeds max_weight"):
        SecAggAggregator(max_weight=10.0).quantize(_updates()[0], 11.0)


def test_values_beyond_the_clip_range_are_clipped_and_nan_refused():
    agg = SecAggAggregator(max_weight=1.0, clip_range=1.0, rounding="nearest")
    update = {"w": torch.tensor([0.5, 3.0, -7.0])}
    quantized = agg.quantize(update, 1.0)
    scale = 2**agg.scale_bits
    assert quantized.tolist() == [scale // 2, scale, -scale, scale]
    with pytest.raises(AggregationError, match="NaN"):
        agg.quantize({"w": torch.tensor([float("nan")])}, 1.0)


def test_a_threshold_of_half_or_less_is_refused():
    agg = SecAggAggregator(threshold=2)
    with pytest.raises(AggregationError, match="must exceed half"):
        _run(agg, _updates(8))


def test_stateless_encode_points_to_the_client_session():
    with pytest.raises(AggregationError, match=r"aggregator\.client"):
        SecAggAggregator().encode(_updates()[0], 1.0)
