"""Building blocks of the aggregators: Shamir shares, sealed boxes, key agreement, the PRG,
payload schemas and layouts."""

import numpy as np
import pytest
import torch

from splitfed.federated.aggregators import (
    AGGREGATORS,
    AggregationError,
    Layout,
    Payload,
    PlainAggregator,
    SecAggAggregator,
    keys,
    shamir,
)
from splitfed.federated.aggregators.pruning import SharedMask, prune
from splitfed.federated.fedavg import weighted_average
from splitfed.transport.wire import WireLimits, from_envelope, to_envelope


def test_any_threshold_shares_rebuild_the_secret_and_fewer_do_not():
    secret = bytes(range(32))
    shares = shamir.split(secret, threshold=3, xs=range(1, 6))
    for subset in ([1, 2, 3], [2, 4, 5], [1, 3, 4, 5]):
        assert (
            shamir.combine({x: shares[x] for x in subset}, threshold=3, secret_bytes=32, what="t") == secret
        )
    with pytest.raises(AggregationError, match="2 shares received, 3 needed"):
        shamir.combine({1: shares[1], 2: shares[2]}, threshold=3, secret_bytes=32, what="t")
    altered = dict(shares)
    altered[2] = (2**400 + 12345).to_bytes(shamir.SHARE_BYTES, "big")  # (SecAgg also checks what it rebuilds)
    with pytest.raises(AggregationError, match="altered"):
        shamir.combine({x: altered[x] for x in (1, 2, 3)}, threshold=3, secret_bytes=32, what="t")
    with pytest.raises(ValueError, match="threshold"):
        shamir.split(secret, threshold=6, xs=range(1, 6))


def test_sealed_box_opens_only_with_the_recipient_key_and_context():
    alice = keys.new_private_key()
    sealed = keys.seal(b"secret context", keys.public_bytes(alice), info=b"ctx|alice")
    assert keys.open_sealed(sealed, alice, info=b"ctx|alice", what="t") == b"secret context"
    with pytest.raises(AggregationError, match="does not open"):
        keys.open_sealed(sealed, keys.new_private_key(), info=b"ctx|alice", what="t")
    with pytest.raises(AggregationError, match="does not open"):
        keys.open_sealed(sealed, alice, info=b"ctx|bob", what="t")
    with pytest.raises(AggregationError, match="shorter"):
        keys.open_sealed(sealed[:20], alice, info=b"ctx|alice", what="t")


def test_key_agreement_is_symmetric_and_bound_to_its_context():
    a, b = keys.new_private_key(), keys.new_private_key()
    ab = keys.agree(a, keys.public_bytes(b), info=b"round 1", what="t")
    assert ab == keys.agree(b, keys.public_bytes(a), info=b"round 1", what="t")
    assert ab != keys.agree(a, keys.public_bytes(b), info=b"round 2", what="t")
    with pytest.raises(AggregationError, match="32 bytes"):
        keys.agree(a, b"short", info=b"", what="t")
    with pytest.raises(AggregationError, match="low order"):
        keys.agree(a, bytes(32), info=b"", what="t")


def test_prg_is_deterministic_and_uniform():
    seed = bytes(range(32))
    first = keys.prg(seed, 100_000, np.uint32)
    assert np.array_equal(first, keys.prg(seed, 100_000, np.uint32))
    assert not np.array_equal(first, keys.prg(bytes(32), 100_000, np.uint32))
    assert abs(first.mean() / 2**32 - 0.5) < 0.01
    assert keys.prg(seed, 10, np.uint64).dtype == np.uint64


def test_schemas_refuse_foreign_or_malformed_payloads():
    agg = PlainAggregator(max_numel=1000)
    update = agg.encode({"w": torch.ones(10)}, 1.0)
    agg.validate(update)
    with pytest.raises(AggregationError, match="unknown payload kind"):
        agg.validate(Payload("forward", update.tensors, update.meta))
    with pytest.raises(AggregationError, match="unexpected"):
        agg.validate(Payload("update", dict(update.tensors, extra=torch.ones(1)), update.meta))
    with pytest.raises(AggregationError, match="made by aggregator 'ckks'"):
        agg.validate(Payload("update", update.tensors, dict(update.meta, aggregator="ckks")))
    with pytest.raises(AggregationError, match="at most 1000"):
        agg.validate(agg.encode({"w": torch.ones(1001)}, 1.0))
    with pytest.raises(AggregationError, match="metadata 'weight' is missing"):
        agg.validate(
            Payload("update", update.tensors, {k: v for k, v in update.meta.items() if k != "weight"})
        )
    with pytest.raises(AggregationError, match="not valid JSON"):
        agg.validate(Payload("update", update.tensors, dict(update.meta, layout="[[")))
    with pytest.raises(AggregationError, match="layout needs"):
        agg.validate(Payload("update", dict(update.tensors, values=torch.ones(9)), update.meta))
    with pytest.raises(AggregationError, match="only"):
        Layout.from_json('[["w", [3], "int64"]]', max_tensors=4, max_numel=10)
    with pytest.raises(AggregationError, match="at most 10"):
        Layout.from_json('[["w", [11], "float32"]]', max_tensors=4, max_numel=10)


def test_every_registered_aggregator_declares_update_and_aggregate_schemas():
    for name, cls in AGGREGATORS.items():
        schemas = cls().schemas()
        assert {"update", "aggregate"} <= set(schemas), name
        for schema in schemas.values():
            assert all(spec.max_numel > 0 for spec in schema.tensors.values())


def test_stochastic_rounding_keeps_small_values_on_average():
    agg = SecAggAggregator(max_weight=1.0, modulus_bits=32)
    tiny = 0.3 * 2.0**-agg.scale_bits  # a third of a quantization step: nearest rounding loses it
    total = sum(
        agg.quantize({"w": torch.full((1000,), tiny, dtype=torch.float64)}, 1.0)[:-1].sum() for _ in range(20)
    )
    assert abs(total / 20_000 - 0.3) < 0.05
    nearest = SecAggAggregator(max_weight=1.0, rounding="nearest")
    assert nearest.quantize({"w": torch.full((10,), tiny, dtype=torch.float64)}, 1.0)[:-1].sum() == 0


def test_shared_mask_aggregates_only_the_kept_positions():
    gen = torch.Generator().manual_seed(0)
    global_model = {"a": torch.randn(40, 8, generator=gen), "b": torch.randn(8, 40, generator=gen)}
    updates = [{k: torch.randn(v.shape, generator=gen) for k, v in global_model.items()} for _ in range(3)]
    weights = [3.0, 1.0, 2.0]
    masks = [
        SharedMask.from_reference(global_model, keep_ratio=0.5) for _ in updates
    ]  # each client derives it
    assert all(torch.equal(m.masks[k], masks[0].masks[k]) for m in masks for k in global_model)
    mask = masks[0]
    assert mask.kept == 320
    agg = PlainAggregator()
    payloads = {
        f"c{i}": agg.encode(mask.select(u), w) for i, (u, w) in enumerate(zip(updates, weights, strict=True))
    }
    assert payloads["c0"].tensors["values"].numel() == 320  # half of the 640 values cross
    out = mask.scatter(agg.decode(agg.combine(payloads)))
    ref = weighted_average(list(zip(updates, weights, strict=True)))
    for name in ref:
        kept = mask.masks[name]
        assert torch.allclose(out[name][kept], ref[name][kept])
        assert not out[name][~kept].any()
    magnitude = torch.cat([global_model[k].abs().reshape(-1) for k in sorted(global_model)])
    kept_all = torch.cat([mask.masks[k].reshape(-1) for k in sorted(global_model)])
    assert magnitude[kept_all].min() >= magnitude[~kept_all].max()


def test_per_client_pruning_zeros_all_but_the_largest_values():
    update = {"w": torch.tensor([0.1, -3.0, 0.2, 2.0]), "v": torch.tensor([[-0.5, 1.0]])}
    pruned = prune(update, 0.5)
    assert pruned["w"].tolist() == [0.0, -3.0, 0.0, 2.0] and pruned["v"].tolist() == [[0.0, 1.0]]
    with pytest.raises(ValueError, match="keep_ratio"):
        prune(update, 0.0)


def test_plain_and_secagg_payloads_cross_the_wire_format():
    limits = WireLimits()

    def wire(payload: Payload) -> Payload:
        return Payload.from_message(from_envelope(to_envelope(payload.to_message(), 0, "to_model"), limits))

    plain = PlainAggregator()
    update = {"w": torch.randn(50), "b": torch.randn(3, 4, dtype=torch.bfloat16)}
    sent = wire(plain.encode(update, 2.0))
    assert torch.equal(plain.decode(wire(plain.combine({"c": sent})))["w"], update["w"])
    agg = SecAggAggregator(max_weight=1.0)
    clients = {n: agg.client(n, round_id=7) for n in ("a", "b", "c")}
    server = agg.server(round_id=7)
    roster = wire(server.roster({n: wire(c.advertise()) for n, c in clients.items()}))
    routed = server.route_shares({n: wire(c.share_keys(roster)) for n, c in clients.items()})
    for n, p in routed.items():
        clients[n].receive_shares(wire(p))
    request = wire(server.collect({n: wire(c.encode(update, 1.0)) for n, c in clients.items()}))
    aggregate = wire(server.unmask({n: wire(clients[n].reveal(request)) for n in server.survivors}))
    out = clients["a"].decode(aggregate)
    assert (out["w"] - update["w"]).abs().max() < 1e-5
