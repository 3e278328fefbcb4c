"""CKKS blind FedAvg: key distribution through a server that cannot read, packed ciphertexts,
accuracy against plaintext FedAvg, parameter checks and rejection of bad ciphertexts."""

import json
import math

import pytest
import tenseal as ts
import torch

from splitfed.federated.aggregators import AggregationError, CKKSAggregator, Layout, Payload
from splitfed.federated.aggregators import keys as keyring
from splitfed.federated.aggregators.base import bytes_of, tensor_of
from splitfed.federated.aggregators.ckks import PUBLIC_CONTEXT, check_ckks_parameters
from splitfed.federated.fedavg import weighted_average
from splitfed.transport.wire import WireLimits, from_envelope, to_envelope

CLIENTS = ("alice", "bob", "carol")


class Setup:
    """A dealer (alice), two clients that received the context through the server, and the server."""

    def __init__(self) -> None:
        self.dealer = CKKSAggregator()
        self.dealer.create_context()
        self.server = CKKSAggregator()
        self.server.load_public_context(self.dealer.public_context())
        self.clients = {"alice": self.dealer}
        self.private_keys = {}
        self.sealed = {}
        for name in CLIENTS[1:]:
            private = keyring.new_private_key()
            client = CKKSAggregator()
            request = client.key_request(private)  # client -> server -> dealer
            self.sealed[name] = self.dealer.seal_context(
                request, recipient=name
            )  # dealer -> server -> client
            client.open_context(self.sealed[name], private_key=private, recipient=name)
            self.clients[name] = client
            self.private_keys[name] = private


@pytest.fixture(scope="module")
def setup() -> Setup:
    return Setup()


def _updates(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "q.lora_A": torch.randn(8, 576, generator=gen) * 1e-3,
            "q.lora_B": torch.randn(576, 8, generator=gen) * 1e-3,
            "v.lora_B": torch.randn(192, 8, generator=gen) * 1e-3,
        }
        for _ in CLIENTS
    ]


def _relative_error(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    num = sum(float((out[k].double() - ref[k].double()).norm() ** 2) for k in ref)
    den = sum(float(ref[k].double().norm() ** 2) for k in ref)
    return math.sqrt(num / den)


def test_server_context_holds_no_secret_key_and_cannot_decrypt(setup):
    assert setup.dealer.holds_secret_key and all(c.holds_secret_key for c in setup.clients.values())
    assert not setup.server.holds_secret_key
    server_context = setup.server._context
    assert not server_context.is_private() and not server_context.has_secret_key()
    assert not server_context.has_public_key()  # parameters only: it cannot even encrypt
    payload = setup.clients["bob"].encode(_updates()[1], 3.0)
    first = bytes_of(payload.tensors["ciphertexts"])[: int(payload.tensors["ciphertext_bytes"][0])]
    with pytest.raises(ValueError, match="secret"):
        ts.ckks_vector_from(server_context, first).decrypt()
    aggregate = setup.server.combine({"bob": payload})
    with pytest.raises(AggregationError, match="only the keyless server context"):
        setup.server.decode(aggregate)
    with pytest.raises(AggregationError, match="cannot encrypt"):
        setup.server.encode(_updates()[0], 1.0)


def test_sealed_context_opens_only_for_its_recipient(setup):
    sealed = setup.sealed["bob"]
    assert setup.server.validate(sealed) is None  # the server can check the schema of what it relays...
    intruder = CKKSAggregator()
    with pytest.raises(AggregationError, match="does not open"):  # ...but not open it
        intruder.open_context(sealed, private_key=keyring.new_private_key(), recipient="bob")
    with pytest.raises(AggregationError, match="does not open"):
        intruder.open_context(
            Payload(sealed.kind, sealed.tensors, dict(sealed.meta, recipient="carol")),
            private_key=setup.private_keys["carol"],
            recipient="carol",
        )
    tampered = bytearray(bytes_of(sealed.tensors["sealed"]))
    tampered[100] ^= 1
    with pytest.raises(AggregationError, match="modified"):
        intruder.open_context(
            Payload(sealed.kind, {"sealed": tensor_of(bytes(tampered))}, sealed.meta),
            private_key=setup.private_keys["bob"],
            recipient="bob",
        )


def test_server_refuses_a_context_that_carries_the_secret_key(setup):
    secret = setup.dealer._context.serialize(
        save_secret_key=True, save_relin_keys=False, save_galois_keys=False
    )
    leaky = Payload(PUBLIC_CONTEXT, {"context": tensor_of(secret)}, setup.dealer.public_context().meta)
    with pytest.raises(AggregationError):  # too big for the schema, or refused for its secret key
        CKKSAggregator().load_public_context(leaky)
    small = CKKSAggregator(
        poly_modulus_degree=4096, coeff_mod_bit_sizes=(49, 60), scale_bits=30, max_clients=8
    )
    small.create_context()
    secret = small._context.serialize(
        save_public_key=False, save_secret_key=True, save_relin_keys=False, save_galois_keys=False
    )
    schema_fits = Payload(PUBLIC_CONTEXT, {"context": tensor_of(secret)}, small.public_context().meta)
    with pytest.raises(AggregationError, match="carries the secret key"):
        CKKSAggregator(
            poly_modulus_degree=4096, coeff_mod_bit_sizes=(49, 60), scale_bits=30, max_clients=8
        ).load_public_context(schema_fits)


def test_blind_fedavg_matches_plaintext_within_1e_6_and_packs_densely(setup):
    updates, weights = _updates(), [40.0, 8.0, 17.0]
    payloads = {
        name: setup.clients[name].encode(u, w) for name, u, w in zip(CLIENTS, updates, weights, strict=True)
    }
    layout = Layout.of(updates[0])
    chunks = math.ceil(layout.width / 4096)
    per_tensor = sum(math.ceil(math.prod(s) / 4096) for s in layout.shapes)
    assert payloads["bob"].tensors["ciphertext_bytes"].numel() == chunks < per_tensor
    aggregate = setup.server.combine(payloads)
    ref = weighted_average(list(zip(updates, weights, strict=True)))
    for name in CLIENTS:
        out = setup.clients[name].decode(aggregate)
        assert out.keys() == ref.keys()
        assert _relative_error(out, ref) < 1e-6
    assert json.loads(aggregate.meta["clients"]) == list(CLIENTS)


def test_fractional_weights_and_partial_holders(setup):
    updates = _updates(5)
    partial = {"q.lora_A": updates[2]["q.lora_A"]}
    layout = Layout.of(updates[0])
    weights = [0.5, 0.3, 0.2]
    payloads = {
        "alice": setup.clients["alice"].encode(updates[0], weights[0], layout=layout),
        "bob": setup.clients["bob"].encode(updates[1], weights[1], layout=layout),
        "carol": setup.clients["carol"].encode(partial, weights[2], layout=layout),
    }
    out = setup.clients["carol"].decode(setup.server.combine(payloads))
    ref = weighted_average([(updates[0], 0.5), (updates[1], 0.3), (partial, 0.2)])
    assert _relative_error(out, ref) < 1e-6


def test_payloads_cross_the_wire_format_unchanged(setup):
    updates = _updates(2)
    limits = WireLimits()
    sent = {name: setup.clients[name].encode(u, 1.0) for name, u in zip(CLIENTS, updates, strict=True)}
    received = {
        name: Payload.from_message(from_envelope(to_envelope(p.to_message(), 0, "to_model"), limits))
        for name, p in sent.items()
    }
    aggregate = setup.server.combine(received)
    back = Payload.from_message(from_envelope(to_envelope(aggregate.to_message(), 1, "to_data"), limits))
    out = setup.clients["bob"].decode(back)
    assert _relative_error(out, weighted_average([(u, 1.0) for u in updates])) < 1e-6


def _with(payload: Payload, **tensors: torch.Tensor) -> Payload:
    return Payload(payload.kind, dict(payload.tensors, **tensors), payload.meta)


def test_bad_ciphertexts_are_rejected_with_a_reason(setup):
    updates = _updates(3)
    good = {name: setup.clients[name].encode(u, 2.0) for name, u in zip(CLIENTS, updates, strict=True)}
    blob, sizes = good["bob"].tensors["ciphertexts"], good["bob"].tensors["ciphertext_bytes"]
    truncated = _with(good["bob"], ciphertexts=blob[:-100])
    with pytest.raises(AggregationError, match="truncated"):
        setup.server.combine({"bob": truncated})
    short = sizes.clone()
    short[0] -= 100
    cut = torch.cat([blob[: int(short[0])], blob[int(sizes[0]) :]])
    with pytest.raises(AggregationError, match="does not parse"):
        setup.server.combine({"bob": _with(good["bob"], ciphertexts=cut, ciphertext_bytes=short)})
    garbage = blob.clone()
    garbage[: int(sizes[0])] = torch.randint(0, 256, (int(sizes[0]),), dtype=torch.uint8)
    with pytest.raises(AggregationError, match="does not parse"):
        setup.server.combine({"bob": _with(good["bob"], ciphertexts=garbage)})
    with pytest.raises(AggregationError, match="ciphertexts; its layout"):
        setup.server.combine({"bob": _with(good["bob"], ciphertext_bytes=sizes[:-1])})
    as_float = _with(good["bob"], ciphertexts=blob.to(torch.float32))
    with pytest.raises(AggregationError, match=r"schema says torch\.uint8"):
        setup.server.combine({"bob": as_float})
    # the round still completes with the valid clients, and names the rejected one
    aggregate = setup.server.combine(dict(good, bob=truncated), min_clients=2)
    assert json.loads(aggregate.meta["clients"]) == ["alice", "carol"]
    assert "truncated" in json.loads(aggregate.meta["rejected"])["bob"]
    out = setup.clients["alice"].decode(aggregate)
    assert _relative_error(out, weighted_average([(updates[0], 2.0), (updates[2], 2.0)])) < 1e-6


def test_ciphertexts_from_another_context_are_rejected(setup):
    update = _updates(4)[0]
    other = CKKSAggregator()
    other.create_context()
    foreign = other.encode(update, 1.0)
    with pytest.raises(AggregationError, match="another key setup"):
        setup.server.combine({"mallory": foreign})
    relabeled = Payload(foreign.kind, foreign.tensors, dict(foreign.meta, context_id=setup.server.context_id))
    aggregate = setup.server.combine(
        {"mallory": relabeled}
    )  # same parameters: indistinguishable to the server
    wrong = setup.clients["bob"].decode(aggregate)  # ...but only garbage decrypts
    assert wrong.keys() != update.keys() or _relative_error(wrong, update) > 1e3
    small = CKKSAggregator(
        poly_modulus_degree=4096, coeff_mod_bit_sizes=(49, 60), scale_bits=30, max_clients=8
    )
    small.create_context()
    other_parameters = small.encode(update, 1.0)
    sizes = other_parameters.tensors["ciphertext_bytes"][:3]  # as many as the layout needs at N = 8192
    forged = Payload(
        "update",
        {
            "ciphertexts": other_parameters.tensors["ciphertexts"][: int(sizes.sum())],
            "ciphertext_bytes": sizes,
        },
        dict(other_parameters.meta, context_id=setup.server.context_id),
    )
    with pytest.raises(AggregationError, match="does not parse"):
        setup.server.combine({"mallory": forged})


def test_plaintext_bounds_are_enforced_on_encoding(setup):
    alice = setup.clients["alice"]
    update = _updates(6)[0]
    with pytest.raises(AggregationError, match="above the"):
        alice.encode({k: v * 1e16 for k, v in update.items()}, 1.0)
    with pytest.raises(AggregationError, match="below"):
        alice.encode(update, 1e-9)
    update["q.lora_A"][0, 0] = float("nan")
    with pytest.raises(AggregationError, match="NaN"):
        alice.encode(update, 1.0)


def test_parameters_are_checked_for_128_bit_security():
    assert (
        check_ckks_parameters(
            poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 60), scale_bits=50, max_clients=1024
        )
        == 2.0**39
    )
    with pytest.raises(ValueError, match="128-bit security"):
        CKKSAggregator(coeff_mod_bit_sizes=(60, 60, 60, 60))
    with pytest.raises(ValueError, match="128-bit security"):
        CKKSAggregator(poly_modulus_degree=4096, coeff_mod_bit_sizes=(60, 60))
    with pytest.raises(ValueError, match="poly_modulus_degree must be one of"):
        CKKSAggregator(poly_modulus_degree=5000)
    with pytest.raises(ValueError, match="20 to 60 bits"):
        CKKSAggregator(coeff_mod_bit_sizes=(61, 60))
    with pytest.raises(ValueError, match="scale_bits"):
        CKKSAggregator(coeff_mod_bit_sizes=(40, 60), scale_bits=40)
    with pytest.raises(ValueError, match="overflow"):
        CKKSAggregator(coeff_mod_bit_sizes=(40, 60), scale_bits=38, max_clients=16)


def test_mismatched_parameters_between_parties_are_named(setup):
    other = CKKSAggregator(coeff_mod_bit_sizes=(60, 60, 60), scale_bits=50)
    with pytest.raises(AggregationError, match="same CKKS parameters"):
        other.load_public_context(setup.dealer.public_context())
