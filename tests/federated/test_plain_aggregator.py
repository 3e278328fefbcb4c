"""Plain FedAvg: the same result as the model party's RoundAggregator averaging."""

import json

import pytest
import torch

from splitfed.federated.aggregators import AGGREGATORS, AggregationError, Layout, Payload, PlainAggregator
from splitfed.federated.fedavg import weighted_average


def _updates(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "layers.0.lora_A": torch.randn(8, 64, generator=gen),
            "layers.0.lora_B": torch.randn(64, 8, generator=gen) * 1e-3,
        }
        for _ in range(3)
    ]


def test_plain_equals_fedavg_weighted_average_bitwise():
    updates, weights = _updates(), [12.0, 40.0, 3.0]
    agg = PlainAggregator()
    out = agg.decode(
        agg.combine(
            {f"c{i}": agg.encode(u, w) for i, (u, w) in enumerate(zip(updates, weights, strict=True))}
        )
    )
    ref = weighted_average(list(zip(updates, weights, strict=True)))
    assert out.keys() == ref.keys()
    for name in ref:
        assert out[name].dtype == ref[name].dtype
        assert torch.equal(out[name], ref[name]), name


def test_plain_averages_partial_holders_per_tensor_like_fedavg():
    """Parties holding different subsets (heads of different depths) average per tensor."""
    full, shallow = _updates(1)[:2]
    shallow = {"layers.0.lora_A": shallow["layers.0.lora_A"]}
    layout = Layout.of(full)
    agg = PlainAggregator()
    payloads = {
        "deep": agg.encode(full, 5.0, layout=layout),
        "shallow": agg.encode(shallow, 7.0, layout=layout),
    }
    out = agg.decode(agg.combine(payloads))
    ref = weighted_average([(full, 5.0), (shallow, 7.0)])
    for name in ref:
        assert torch.equal(out[name], ref[name]), name
    assert torch.equal(out["layers.0.lora_B"], full["layers.0.lora_B"])


def test_none_is_plain_in_the_registry():
    assert AGGREGATORS["none"] is PlainAggregator
    assert set(AGGREGATORS) == {"none", "plain", "ckks", "secagg"}


def test_invalid_updates_are_left_out_with_a_reason_or_raise():
    updates = _updates(2)
    agg = PlainAggregator()
    good = {f"c{i}": agg.encode(u, 1.0 + i) for i, u in enumerate(updates)}
    nan = good["c1"].tensors["values"].clone()
    nan[3] = float("nan")
    bad = dict(good, c1=Payload("update", dict(good["c1"].tensors, values=nan), good["c1"].meta))
    with pytest.raises(AggregationError, match="NaN"):
        agg.combine(bad)
    aggregate = agg.combine(bad, min_clients=2)
    assert json.loads(aggregate.meta["clients"]) == ["c0", "c2"]
    assert "NaN" in json.loads(aggregate.meta["rejected"])["c1"]
    ref = weighted_average([(updates[0], 1.0), (updates[2], 3.0)])
    out = agg.decode(aggregate)
    assert all(torch.equal(out[k], ref[k]) for k in ref)
    with pytest.raises(AggregationError, match="fewer than the 3 required"):
        agg.combine(bad, min_clients=3)


def test_a_client_with_another_layout_is_rejected():
    updates = _updates(3)
    agg = PlainAggregator()
    other = {"layers.0.lora_A": updates[1]["layers.0.lora_A"]}
    payloads = {
        "c0": agg.encode(updates[0], 1.0),
        "c1": agg.encode(other, 1.0),
        "c2": agg.encode(updates[2], 1.0),
    }
    aggregate = agg.combine(payloads, min_clients=2)
    assert "another layout" in json.loads(aggregate.meta["rejected"])["c1"]


def test_bad_weights_and_values_are_refused_on_encoding():
    agg = PlainAggregator()
    update = _updates()[0]
    for weight in (0.0, -1.0, float("nan")):
        with pytest.raises(AggregationError, match="weight"):
            agg.encode(update, weight)
    update["layers.0.lora_A"][0, 0] = float("inf")
    with pytest.raises(AggregationError, match="NaN or Inf"):
        agg.encode(update, 1.0)
