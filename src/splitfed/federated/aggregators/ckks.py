"""Blind FedAvg with CKKS homomorphic encryption (Cheon, Kim, Kim and Song, 2017, "Homomorphic
Encryption for Arithmetic of Approximate Numbers"), through TenSEAL (Benaissa et al., 2021).

What improves on FedShield-LLM's use of it (Mia et al., 2025): the server never holds the secret
key, updates are sample-weighted, and every update is packed densely into as few ciphertexts as
its size needs instead of one ciphertext (or more) per tensor.

Protocol
--------
1. Every client sends an X25519 public key (:meth:`CKKSAggregator.key_request`).
2. One client, the *dealer*, creates the context (:meth:`CKKSAggregator.create_context`) and
   sends, through the server, the secret context sealed to each other client's public key
   (:meth:`~CKKSAggregator.seal_context`; the server relays bytes it cannot read) and a
   parameters-only context without any key to the server (:meth:`~CKKSAggregator.public_context`).
3. Each round, every client encrypts ``[w * delta (all tensors flattened), w per tensor]`` in
   chunks of ``poly_modulus_degree / 2`` slots (:meth:`~CKKSAggregator.encode`); the server adds the
   ciphertexts chunk by chunk (:meth:`~CKKSAggregator.combine`); clients decrypt the sums and divide
   each tensor's sum by its summed weight (:meth:`~CKKSAggregator.decode`). The weights travel
   encrypted, so the server learns neither the updates nor the clients' sample counts; it learns
   the number of clients and the layout (parameter names and shapes), which are public anyway.

Threat model
------------
The server is honest but curious: it follows the protocol and sees every byte it relays, but
holds no key and cannot decrypt a single update or the aggregate. Every client holds the same
secret key, so **a client colluding with the server can decrypt any other client's individual
update** (the server hands it that client's ciphertext). Pairwise-mask secure aggregation
(``secagg``) covers that case: there, the server and any minority of colluding clients learn only
the sum of the honest clients' updates. An actively malicious server could also replace the
dealer's sealed context by one of its own (the boxes are anonymous, and no public-key
infrastructure authenticates the dealer): authenticating the dealer's key out of band is not
implemented here. Ciphertexts are not bound to a round: the transport's round numbers and
authenticated channels reject replays.

Parameters are checked against the HE standard (Albrecht et al., 2018, Table 1: classical 128-bit
security, ternary secret): the total bits of ``coeff_mod_bit_sizes`` must not exceed the bound for
``poly_modulus_degree``. Additions need no rescaling, so one or two data primes suffice; the
default ``(60, 40, 60)`` with ``scale_bits=50`` gives about 1e-11 absolute error per value and
room for ``|weight * value|`` up to 2**39 per client with 1024 clients, at 57 bytes per value
(about 14 times fp32; FedShield's per-tensor 4-prime vectors cost 81 bytes per slot plus padding).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from splitfed.federated.aggregators import keys
from splitfed.federated.aggregators.base import (
    AGGREGATE,
    UPDATE,
    AggregationError,
    Aggregator,
    Layout,
    MetaSpec,
    Payload,
    PayloadSchema,
    TensorSpec,
    aggregate_meta,
    bytes_of,
    tensor_of,
)

#: Largest total coefficient-modulus bits per ring degree for 128-bit classical security
#: (HE standard, Albrecht et al., 2018, Table 1, ternary secret; what SEAL enforces as tc128).
HE_STANDARD_128: dict[int, int] = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}


def _tenseal() -> Any:
    """TenSEAL, imported on first use (it takes half a second; plain and secagg runs skip it)."""
    import tenseal

    return tenseal


#: Payload kinds of the key setup.
PUBLIC_KEY = "ckks_public_key"
SEALED_CONTEXT = "ckks_sealed_context"
PUBLIC_CONTEXT = "ckks_public_context"

#: Smallest accepted sample weight: CKKS noise (about 1e-11) must stay far below every weight.
MIN_WEIGHT = 1e-4


@dataclass
class _Encrypted:
    vectors: list[Any]  # ts.CKKSVector, one per chunk


class CKKSAggregator(Aggregator):
    """Sample-weighted FedAvg over CKKS ciphertexts; the server only adds.

    One instance is one party's view: the dealer's and the clients' hold the secret context
    (after :meth:`create_context` or :meth:`open_context`), the server's a context without keys
    (after :meth:`load_public_context`), which suffices to add ciphertexts but neither to encrypt
    nor to decrypt.

    Parameters
    ----------
    poly_modulus_degree : int, default 8192
        Ring degree N; a ciphertext holds N / 2 values.
    coeff_mod_bit_sizes : tuple[int, ...], default (60, 40, 60)
        Bits of each prime of the coefficient modulus; all but the last hold data, the last is
        SEAL's special prime. Each between 20 and 60 bits; their total at most
        ``HE_STANDARD_128[poly_modulus_degree]``.
    scale_bits : int, default 50
        log2 of the CKKS scale: the precision of each value is about 2**-scale_bits times the
        encryption noise (about 1e-11 absolute at 50 bits, N = 8192).
    max_clients : int, default 1024
        Most clients one aggregate sums; with the scale it bounds ``|weight * value|`` per client
        to ``2**(data bits - scale_bits - 1) / max_clients`` (:attr:`value_bound`), checked on
        encoding so that the sum cannot overflow the modulus.
    max_numel : int, default 2**22
        Most values of one update a receiver accepts.
    max_tensors : int, default 4096
        Most parameter tensors in one layout.
    """

    name = "ckks"

    def __init__(
        self,
        *,
        poly_modulus_degree: int = 8192,
        coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 60),
        scale_bits: int = 50,
        max_clients: int = 1024,
        max_numel: int = 2**22,
        max_tensors: int = 4096,
    ) -> None:
        super().__init__(max_numel=max_numel, max_tensors=max_tensors)
        self.poly_modulus_degree = poly_modulus_degree
        self.coeff_mod_bit_sizes = tuple(int(b) for b in coeff_mod_bit_sizes)
        self.scale_bits = scale_bits
        self.max_clients = max_clients
        self.value_bound = check_ckks_parameters(
            poly_modulus_degree=poly_modulus_degree,
            coeff_mod_bit_sizes=self.coeff_mod_bit_sizes,
            scale_bits=scale_bits,
            max_clients=max_clients,
        )
        self._context: Any = None  # ts.Context
        self._context_id = ""

    # ------------------------------------------------------------------ sizes

    @property
    def slots(self) -> int:
        """Values per ciphertext."""
        return self.poly_modulus_degree // 2

    @property
    def max_ciphertext_bytes(self) -> int:
        """Upper bound of one serialized ciphertext (two polynomials over the data primes)."""
        return 2 * self.poly_modulus_degree * (len(self.coeff_mod_bit_sizes) - 1) * 8 + 4096

    def _max_chunks(self) -> int:
        return math.ceil((self.max_numel + self.max_tensors) / self.slots)

    def schemas(self) -> dict[str, PayloadSchema]:
        """Setup kinds (``ckks_public_key``, ``ckks_sealed_context``, ``ckks_public_context``),
        ``update`` and ``aggregate``."""
        ciphertexts = {
            "ciphertexts": TensorSpec(torch.uint8, self._max_chunks() * self.max_ciphertext_bytes),
            "ciphertext_bytes": TensorSpec(torch.int64, self._max_chunks()),
        }
        context_id = {"context_id": MetaSpec(str, max_len=64)}
        layout = {"layout": self._layout_meta()}
        primes = len(self.coeff_mod_bit_sizes)
        secret_context_bytes = 3 * self.poly_modulus_degree * primes * 8 + 65536
        return {
            PUBLIC_KEY: PayloadSchema(
                self.name,
                PUBLIC_KEY,
                {"public_key": TensorSpec(torch.uint8, keys.PUBLIC_KEY_BYTES)},
                {"aggregator": MetaSpec(str)},
            ),
            SEALED_CONTEXT: PayloadSchema(
                self.name,
                SEALED_CONTEXT,
                {"sealed": TensorSpec(torch.uint8, secret_context_bytes + keys.SEAL_OVERHEAD)},
                {"aggregator": MetaSpec(str), "recipient": MetaSpec(str), **context_id},
            ),
            PUBLIC_CONTEXT: PayloadSchema(
                self.name,
                PUBLIC_CONTEXT,
                {"context": TensorSpec(torch.uint8, 65536)},
                {"aggregator": MetaSpec(str), **context_id},
            ),
            UPDATE: PayloadSchema(
                self.name, UPDATE, ciphertexts, {"aggregator": MetaSpec(str), **context_id, **layout}
            ),
            AGGREGATE: PayloadSchema(
                self.name, AGGREGATE, ciphertexts, {**aggregate_meta(), **context_id, **layout}
            ),
        }

    # ------------------------------------------------------------------ key setup

    @property
    def context_id(self) -> str:
        """Random id of the loaded context ("" before one is loaded): payloads name it."""
        return self._context_id

    @property
    def holds_secret_key(self) -> bool:
        """Whether this party can encrypt and decrypt (a client), not only add (the server)."""
        return self._context is not None and bool(self._context.is_private())

    def create_context(self) -> None:
        """Dealer: create the round's CKKS keys (this instance then acts as a client)."""
        ts = _tenseal()
        context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=self.poly_modulus_degree,
            coeff_mod_bit_sizes=list(self.coeff_mod_bit_sizes),
        )
        context.global_scale = 2.0**self.scale_bits
        self._context, self._context_id = context, secrets.token_hex(16)

    def key_request(self, private_key: X25519PrivateKey) -> Payload:
        """Client: the payload announcing this client's X25519 public key (to the dealer)."""
        return Payload(
            PUBLIC_KEY, {"public_key": tensor_of(keys.public_bytes(private_key))}, {"aggregator": self.name}
        )

    def seal_context(self, request: Payload, *, recipient: str) -> Payload:
        """Dealer: the secret context sealed to the client that sent ``request``."""
        self._need_secret("seal the context for another client")
        self.validate(request, sender=recipient)
        secret = self._context.serialize(
            save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
        )
        sealed = keys.seal(secret, bytes_of(request.tensors["public_key"]), info=self._seal_info(recipient))
        return Payload(
            SEALED_CONTEXT,
            {"sealed": tensor_of(sealed)},
            {"aggregator": self.name, "recipient": recipient, "context_id": self._context_id},
        )

    def open_context(self, sealed: Payload, *, private_key: X25519PrivateKey, recipient: str) -> None:
        """Client: load the secret context the dealer sealed to ``private_key``'s public key."""
        self.validate(sealed, sender="the dealer")
        if sealed.meta["recipient"] != recipient:
            raise AggregationError(
                f"ckks sealed context is addressed to {sealed.meta['recipient']!r}, not {recipient!r}"
            )
        context_id = str(sealed.meta["context_id"])
        data = keys.open_sealed(
            bytes_of(sealed.tensors["sealed"]),
            private_key,
            info=self._seal_info(recipient, context_id),
            what="ckks sealed context",
        )
        context = self._parse_context(data, what="the dealer's sealed context")
        if not context.is_private():
            raise AggregationError(
                "ckks sealed context carries no secret key; the dealer must seal the secret context"
            )
        self._context, self._context_id = context, context_id

    def export_secret(self) -> bytes:
        """Client: the secret context, serialized, to keep in the client's own local state (a Flower
        client lives one message at a time). Never send it: :meth:`seal_context` is how it travels."""
        self._need_secret("export the secret context")
        return bytes(
            self._context.serialize(
                save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
            )
        )

    def load_secret(self, data: bytes, *, context_id: str) -> None:
        """Client: reload what :meth:`export_secret` gave (from the client's own local state)."""
        context = self._parse_context(data, what="the stored secret context")
        if not context.is_private():
            raise AggregationError("ckks: the stored context carries no secret key")
        self._context, self._context_id = context, context_id

    def public_context(self) -> Payload:
        """Dealer: the context for the server: parameters only, no secret, public or evaluation key."""
        self._need_secret("export the server's context")
        data = self._context.serialize(
            save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
        )
        return Payload(
            PUBLIC_CONTEXT,
            {"context": tensor_of(data)},
            {"aggregator": self.name, "context_id": self._context_id},
        )

    def load_public_context(self, payload: Payload) -> None:
        """Server: load the dealer's keyless context; refuses one that carries the secret key."""
        self.validate(payload, sender="the dealer")
        context = self._parse_context(bytes_of(payload.tensors["context"]), what="the server's context")
        if context.is_private() or context.has_secret_key():
            raise AggregationError(
                "ckks: the context sent to the server carries the secret key; the dealer must send "
                "public_context(), which holds none"
            )
        self._context, self._context_id = context, str(payload.meta["context_id"])

    def _seal_info(self, recipient: str, context_id: str | None = None) -> bytes:
        return f"ckks context|{context_id or self._context_id}|{recipient}".encode()

    def _parse_context(self, data: bytes, *, what: str) -> Any:
        ts = _tenseal()
        try:
            context = ts.context_from(data)
        except Exception as err:  # TenSEAL raises ValueError/RuntimeError/TypeError on bad bytes
            raise AggregationError(f"ckks: {what} does not parse ({type(err).__name__}: {err})") from None
        try:
            data_ = context.seal_context().data
            degree = int(data_.key_context_data().parms().poly_modulus_degree())
            total_bits = int(data_.key_context_data().total_coeff_modulus_bit_count())
            data_bits = int(data_.first_context_data().total_coeff_modulus_bit_count())
        except Exception as err:
            raise AggregationError(f"ckks: {what} is not a CKKS context ({err})") from None
        expected = (
            self.poly_modulus_degree,
            sum(self.coeff_mod_bit_sizes),
            sum(self.coeff_mod_bit_sizes[:-1]),
        )
        if (degree, total_bits, data_bits) != expected:
            raise AggregationError(
                f"ckks: {what} has poly_modulus_degree {degree} and {total_bits} modulus bits "
                f"({data_bits} for data); this aggregator is configured for {expected[0]}, {expected[1]} "
                f"and {expected[2]}: configure every party with the same CKKS parameters"
            )
        context.global_scale = 2.0**self.scale_bits
        return context

    def _need_secret(self, action: str) -> None:
        if self._context is None:
            raise AggregationError(
                f"ckks: no context loaded, cannot {action}; call create_context() (dealer), "
                "open_context() (client) or load_public_context() (server) first"
            )
        if not self._context.is_private():
            raise AggregationError(
                f"ckks: this party holds only the keyless server context and cannot {action}; only "
                "clients that received the secret context can"
            )

    # ------------------------------------------------------------------ the three roles

    def _check_sizes(self, payload: Payload, layout: Layout, *, sender: str) -> None:
        where = f"ckks {payload.kind!r}" + (f" from {sender!r}" if sender else "")
        if self._context is None:
            raise AggregationError(
                f"{where}: no context loaded on this party yet (load_public_context first)"
            )
        if payload.meta["context_id"] != self._context_id:
            raise AggregationError(
                f"{where}: encrypted under context {payload.meta['context_id']!r}, this round uses "
                f"{self._context_id!r} (a ciphertext from another key setup)"
            )
        sizes = payload.tensors["ciphertext_bytes"]
        chunks = math.ceil(layout.width / self.slots)
        if sizes.numel() != chunks:
            raise AggregationError(
                f"{where}: {sizes.numel()} ciphertexts; its layout of {layout.width} values needs {chunks} "
                f"of {self.slots} slots"
            )
        if bool((sizes < 1).any()) or bool((sizes > self.max_ciphertext_bytes).any()):
            raise AggregationError(
                f"{where}: a ciphertext size is outside [1, {self.max_ciphertext_bytes}] bytes: "
                f"{sizes.tolist()[:8]}"
            )
        if int(sizes.sum()) != payload.tensors["ciphertexts"].numel():
            raise AggregationError(
                f"{where}: ciphertext sizes add up to {int(sizes.sum())} bytes but "
                f"{payload.tensors['ciphertexts'].numel()} were sent (truncated or padded)"
            )

    def encode(
        self, update: Mapping[str, torch.Tensor], weight: float, *, layout: Layout | None = None
    ) -> Payload:
        """Encrypt ``[weight * update, weight per tensor]`` packed into slot-sized ciphertexts."""
        self._need_secret("encrypt an update")
        if weight < MIN_WEIGHT:
            raise AggregationError(
                f"ckks: weight {weight} is below {MIN_WEIGHT}: the encryption noise would swamp it; "
                "use sample counts (or fractions of at least 1e-4)"
            )
        layout = layout or Layout.of(update)
        values, weights = layout.pack(update, weight)
        sizes = torch.tensor([math.prod(s) for s in layout.shapes], dtype=torch.long)
        vector = torch.cat([values * torch.repeat_interleave(weights, sizes), weights]).numpy()
        largest = float(np.abs(vector).max()) if vector.size else 0.0
        if largest > self.value_bound:
            raise AggregationError(
                f"ckks: |weight * value| reaches {largest:.4g}, above the {self.value_bound:.4g} that "
                f"{self.max_clients} clients may each add without overflowing {self._data_bits} data bits at "
                f"scale 2**{self.scale_bits}: pass smaller weights (e.g. sample fractions), lower "
                "max_clients or scale_bits, or add a data prime to coeff_mod_bit_sizes"
            )
        blobs = [
            self._context_vector(vector[i : i + self.slots]).serialize()
            for i in range(0, vector.size, self.slots)
        ]
        return Payload(
            UPDATE,
            {
                "ciphertexts": tensor_of(b"".join(blobs)),
                "ciphertext_bytes": torch.tensor([len(b) for b in blobs], dtype=torch.int64),
            },
            {"aggregator": self.name, "context_id": self._context_id, "layout": layout.to_json()},
        )

    @property
    def _data_bits(self) -> int:
        return sum(self.coeff_mod_bit_sizes[:-1])

    def _context_vector(self, chunk: np.ndarray) -> Any:
        ts = _tenseal()
        return ts.ckks_vector(self._context, chunk.tolist())

    def _vectors(self, payload: Payload, layout: Layout, *, sender: str) -> list[Any]:
        """Parse every ciphertext of a validated payload and check its length, scale and level."""
        ts = _tenseal()
        where = f"ckks {payload.kind!r}" + (f" from {sender!r}" if sender else "")
        data = bytes_of(payload.tensors["ciphertexts"])
        sizes = payload.tensors["ciphertext_bytes"].tolist()
        parms_id = list(self._context.seal_context().data.first_parms_id())
        vectors, offset = [], 0
        for i, size in enumerate(sizes):
            expected = min(self.slots, layout.width - i * self.slots)
            try:
                vector = ts.ckks_vector_from(self._context, data[offset : offset + size])
                ciphertext = vector.ciphertext()[0]
                facts = (vector.size(), ciphertext.size(), ciphertext.scale, list(ciphertext.parms_id()))
            except Exception as err:  # TenSEAL raises ValueError/RuntimeError on bad bytes
                raise AggregationError(
                    f"{where}: ciphertext {i} of {len(sizes)} does not parse in this round's context "
                    f"({type(err).__name__}: {err}); it is truncated, altered or from other CKKS parameters"
                ) from None
            if facts != (expected, 2, 2.0**self.scale_bits, parms_id):
                raise AggregationError(
                    f"{where}: ciphertext {i} holds {facts[0]} values in {facts[1]} polynomials at scale "
                    f"{facts[2]:.6g}; expected {expected} values, 2 polynomials, scale 2**{self.scale_bits} "
                    "at the top level of this context"
                )
            vectors.append(vector)
            offset += size
        return vectors

    def _load(self, client: str, payload: Payload, layout: Layout) -> _Encrypted:
        return _Encrypted(self._vectors(payload, layout, sender=client))

    def _add(self, total: _Encrypted, part: _Encrypted) -> _Encrypted:
        for mine, theirs in zip(total.vectors, part.vectors, strict=True):
            mine.add_(theirs)
        return total

    def _finish(self, total: _Encrypted, layout: Layout) -> Payload:
        blobs = [v.serialize() for v in total.vectors]
        return Payload(
            AGGREGATE,
            {
                "ciphertexts": tensor_of(b"".join(blobs)),
                "ciphertext_bytes": torch.tensor([len(b) for b in blobs], dtype=torch.int64),
            },
            {"context_id": self._context_id},
        )

    def decode(self, aggregate: Payload) -> dict[str, torch.Tensor]:
        """Decrypt the summed ciphertexts and divide each tensor's sum by its summed weight."""
        self._need_secret("decrypt the aggregate")
        layout = self._aggregate_layout(aggregate)
        vectors = self._vectors(aggregate, layout, sender="the server")
        flat = torch.tensor(np.concatenate([np.asarray(v.decrypt(), dtype=np.float64) for v in vectors]))
        return layout.unpack(flat[: layout.numel], flat[layout.numel :], absent_below=MIN_WEIGHT / 2)


def check_ckks_parameters(
    *, poly_modulus_degree: int, coeff_mod_bit_sizes: tuple[int, ...], scale_bits: int, max_clients: int
) -> float:
    """Refuse insecure or unusable CKKS parameters with what to change; return the largest
    ``|weight * value|`` one client may encrypt (see :class:`CKKSAggregator`)."""
    if poly_modulus_degree not in HE_STANDARD_128:
        raise ValueError(
            f"ckks: poly_modulus_degree must be one of {sorted(HE_STANDARD_128)}, got {poly_modulus_degree}"
        )
    if len(coeff_mod_bit_sizes) < 2 or any(not 20 <= b <= 60 for b in coeff_mod_bit_sizes):
        raise ValueError(
            f"ckks: coeff_mod_bit_sizes needs at least two primes (data primes, then the special prime) "
            f"of 20 to 60 bits each, got {list(coeff_mod_bit_sizes)}"
        )
    total, bound = sum(coeff_mod_bit_sizes), HE_STANDARD_128[poly_modulus_degree]
    if total > bound:
        raise ValueError(
            f"ckks: coeff_mod_bit_sizes {list(coeff_mod_bit_sizes)} total {total} bits, above the {bound} bits "
            f"that give 128-bit security at poly_modulus_degree {poly_modulus_degree} (HE standard): "
            "use fewer or smaller primes, or a larger poly_modulus_degree"
        )
    data_bits = total - coeff_mod_bit_sizes[-1]
    if not 20 <= scale_bits < data_bits:
        raise ValueError(
            f"ckks: scale_bits must be at least 20 (precision) and below the {data_bits} data bits of "
            f"coeff_mod_bit_sizes {list(coeff_mod_bit_sizes)}, got {scale_bits}"
        )
    if max_clients < 1:
        raise ValueError(f"ckks: max_clients must be >= 1, got {max_clients}")
    value_bound = 2.0 ** (data_bits - scale_bits - 1) / max_clients
    if value_bound < 1:
        raise ValueError(
            f"ckks: {data_bits} data bits at scale 2**{scale_bits} leave no room for {max_clients} clients' "
            "sums of values of magnitude 1 without overflow: lower scale_bits or max_clients, or add a "
            "data prime"
        )
    return value_bound
