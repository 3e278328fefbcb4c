"""Secure aggregation with pairwise masks and dropout recovery (Bonawitz et al., 2017, "Practical
Secure Aggregation for Privacy-Preserving Machine Learning"; the SecAgg+ variant of Bell et al.,
2020, shares the same rounds over a sparser graph).

Each round, every client

1. advertises two fresh X25519 public keys (one to encrypt shares to peers, one to agree on masks)
   and a hash commitment to a fresh self-mask seed (:meth:`SecAggClient.advertise`);
2. splits its mask private key and its self-mask seed into ``threshold``-of-``n`` Shamir shares,
   one per client of the roster, encrypted to each peer (:meth:`SecAggClient.share_keys`; the
   server relays them, :meth:`SecAggServer.route_shares`);
3. sends its quantized, sample-weighted update plus, for every peer ``v`` that shared keys, the
   pairwise mask ``PRG(agree(u, v))`` (added by the lower index, subtracted by the higher) and its
   own self mask ``PRG(seed)``, all modulo ``2**modulus_bits`` (:meth:`SecAggClient.encode`);
   the server adds the masked vectors (:meth:`SecAggAggregator.combine`, no secret involved);
4. reveals, for the server's declared *survivors* (whose masked updates the server keeps), its
   shares of their self-mask seeds, and for the *dropped* (who shared keys but whose masked update
   the server does not have or does not keep), its shares of their mask keys
   (:meth:`SecAggClient.reveal`). The server rebuilds the dropped clients' pairwise masks with the
   survivors and the survivors' self masks, removes them, and obtains exactly the sum of the
   survivors' quantized updates (:meth:`SecAggServer.unmask`); clients divide by the summed
   weights (:meth:`SecAggAggregator.decode`).

Which seeds are rebuilt for which case: a client that drops **before** sending its masked update
is *dropped*: its mask key is rebuilt so that its pairwise masks leave the others' sum. A client
that drops **after** sending it (and so cannot reveal anything) is still a *survivor*: its self
mask is rebuilt from the others' shares and its update is part of the sum. If the server does
not keep an update it received (rejected or late), it declares that client dropped: its pairwise
masks are removed, and its self mask, whose seed is never revealed, keeps the discarded update
hidden. An honest client reveals only for a request that lists it as a survivor and splits the
round's clients into survivors and dropped without overlap, so no client's mask key and seed are
ever both revealed; with ``threshold > n / 2`` no two disjoint groups of responders can each
rebuild one of them, even if the server tells different clients different stories.

Fixed-point quantization and its overflow bound: a client's weight ``w`` becomes the ratio
``r = w / max_weight`` in (0, 1]; each value ``x`` is clipped to ``[-clip_range, clip_range]``
and encoded as ``round(r * x * 2**scale_bits)`` (stochastic rounding by default, so that small
values are not rounded away on average), each held tensor's weight as ``round(r * 2**scale_bits)``.
Every coordinate is then at most ``max(clip_range, 1) * 2**scale_bits + 1`` in magnitude, so the
sum of ``max_clients`` clients fits the signed range of the ring if
``max_clients * (max(clip_range, 1) * 2**scale_bits + 1) < 2**(modulus_bits - 1)``; the
constructor refuses parameters that break it, and ``scale_bits=None`` picks the largest that
satisfies it. The default 32-bit ring sends 4 bytes per value, as fp32 does.

Threat model: the server is honest but curious, or colludes with fewer than ``threshold`` clients;
it learns the sum of the survivors' updates and their number, nothing about any one update or
weight. The consistency check and signatures with which Bonawitz et al. also resist an actively
malicious server that forges keys are not implemented; neither are SecAgg+'s sparse graphs (every
pair of clients shares a mask here, ``O(n)`` masks per client).
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import struct
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from splitfed.federated.aggregators import keys, shamir
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
)
from splitfed.transport.channel import MetaValue

#: Payload kinds of one round, in order (``update`` and ``aggregate`` are shared with every aggregator).
ADVERTISE = "secagg_advertise"  # client -> server
ROSTER = "secagg_roster"  # server -> clients
SHARES = "secagg_shares"  # client -> server
SHARES_FOR = "secagg_shares_for"  # server -> one client
UNMASK = "secagg_unmask"  # server -> clients
REVEAL = "secagg_reveal"  # client -> server

_SEED_BYTES = 32
#: One encrypted share: sender and recipient index, a mask-key share, a self-mask-seed share, GCM tag.
_SHARE_PLAIN = 8 + 2 * shamir.SHARE_BYTES
_SHARE_CIPHER = _SHARE_PLAIN + 16


class SecAggAggregator(Aggregator):
    """Configuration of secure aggregation; the server's stateless sum and the clients' decode.

    A round's key exchange needs per-round state on both sides: :meth:`client` gives a client's
    :class:`SecAggClient` (which encodes), :meth:`server` the server's :class:`SecAggServer`.

    Parameters
    ----------
    modulus_bits : {32, 64}, default 32
        The ring ``Z / 2**modulus_bits`` of masked values (``int32`` or ``int64`` on the wire).
    clip_range : float, default 4.0
        Values are clipped to ``[-clip_range, clip_range]`` before quantization.
    max_weight : float, default 1000.0
        Largest sample weight a client may have; weights are encoded as ``weight / max_weight``
        (set it to the largest client's sample count for the best precision).
    max_clients : int, default 128
        Most clients of one round; bounds the sum (see the module docstring).
    scale_bits : int | None, default None
        Fixed-point fraction bits; ``None``: the largest that cannot overflow.
    threshold : int | None, default None
        Shares needed to rebuild a seed; ``None``: ``n // 2 + 1`` for a roster of ``n`` clients.
        Must exceed ``n / 2``.
    rounding : {"stochastic", "nearest"}, default "stochastic"
    self_masks : bool, default True
        Add self masks (needed to keep an update hidden that the server received but declared
        dropped); without them a late update of a dropped client would be exposed.
    max_numel : int, default 2**22
    max_tensors : int, default 4096
    """

    name = "secagg"

    def __init__(
        self,
        *,
        modulus_bits: Literal[32, 64] = 32,
        clip_range: float = 4.0,
        max_weight: float = 1000.0,
        max_clients: int = 128,
        scale_bits: int | None = None,
        threshold: int | None = None,
        rounding: Literal["stochastic", "nearest"] = "stochastic",
        self_masks: bool = True,
        max_numel: int = 2**22,
        max_tensors: int = 4096,
    ) -> None:
        super().__init__(max_numel=max_numel, max_tensors=max_tensors)
        if modulus_bits not in (32, 64):
            raise ValueError(f"secagg: modulus_bits must be 32 or 64, got {modulus_bits}")
        if not (
            math.isfinite(clip_range) and clip_range > 0 and math.isfinite(max_weight) and max_weight > 0
        ):
            raise ValueError(
                f"secagg: clip_range and max_weight must be positive, got {clip_range} and {max_weight}"
            )
        if max_clients < 2:
            raise ValueError(
                f"secagg: max_clients must be >= 2 (a sum of one is the update), got {max_clients}"
            )
        if rounding not in ("stochastic", "nearest"):
            raise ValueError(f"secagg: rounding must be 'stochastic' or 'nearest', got {rounding!r}")
        self.modulus_bits = modulus_bits
        self.clip_range = float(clip_range)
        self.max_weight = float(max_weight)
        self.max_clients = max_clients
        self.threshold = threshold
        self.rounding = rounding
        self.self_masks = self_masks
        limit = 2 ** (modulus_bits - 1)
        magnitude = max(self.clip_range, 1.0)

        def fits(bits: int) -> bool:
            return max_clients * (magnitude * 2.0**bits + 1) < limit

        largest = max((b for b in range(0, modulus_bits) if fits(b)), default=-1)
        if scale_bits is None:
            scale_bits = largest
        if scale_bits < 8 or not fits(scale_bits):
            raise ValueError(
                f"secagg: {max_clients} clients with values clipped to ±{clip_range} at scale 2**{scale_bits} "
                f"can overflow a {modulus_bits}-bit ring (the largest safe scale is 2**{largest}, and at least "
                "2**8 is needed for precision): lower scale_bits, clip_range or max_clients, or use modulus_bits=64"
            )
        self.scale_bits = scale_bits
        self._ring = np.uint32 if modulus_bits == 32 else np.uint64
        self._signed = np.int32 if modulus_bits == 32 else np.int64
        self._wire = torch.int32 if modulus_bits == 32 else torch.int64

    # ------------------------------------------------------------------ sessions

    def client(self, client_id: str, *, round_id: int) -> SecAggClient:
        """A client's state for one round (fresh keys and self-mask seed)."""
        return SecAggClient(self, client_id, round_id=round_id)

    def server(self, *, round_id: int) -> SecAggServer:
        """The server's state for one round."""
        return SecAggServer(self, round_id=round_id)

    def threshold_for(self, clients: int) -> int:
        """Shares needed to rebuild a seed in a round of ``clients`` clients."""
        return self.threshold if self.threshold is not None else clients // 2 + 1

    # ------------------------------------------------------------------ schemas

    def schemas(self) -> dict[str, PayloadSchema]:
        """Every kind of the round: advertise, roster, shares, shares_for, update, unmask, reveal, aggregate."""
        n = self.max_clients
        vector = self.max_numel + self.max_tensors
        base = {"aggregator": MetaSpec(str), "round": MetaSpec(int)}
        sender = {**base, "client": MetaSpec(str)}
        key = TensorSpec(torch.uint8, keys.PUBLIC_KEY_BYTES)
        keys_table = TensorSpec(torch.uint8, n * keys.PUBLIC_KEY_BYTES, ndim=2)
        shares = TensorSpec(torch.uint8, n * _SHARE_CIPHER, ndim=2)
        indices = TensorSpec(torch.int64, n)
        share_values = TensorSpec(torch.uint8, n * shamir.SHARE_BYTES, ndim=2)
        aggregate = {
            **aggregate_meta(),
            "layout": self._layout_meta(),
            "unmasked": MetaSpec(bool),
        }

        def schema(kind: str, tensors: dict[str, TensorSpec], meta: dict[str, MetaSpec]) -> PayloadSchema:
            return PayloadSchema(self.name, kind, tensors, meta)

        return {
            ADVERTISE: schema(
                ADVERTISE, {"cipher_public_key": key, "mask_public_key": key, "commitment": key}, sender
            ),
            ROSTER: schema(
                ROSTER,
                {"cipher_public_keys": keys_table, "mask_public_keys": keys_table, "commitments": keys_table},
                {**base, "clients": MetaSpec(str, max_len=n * 300), "threshold": MetaSpec(int)},
            ),
            SHARES: schema(SHARES, {"recipients": indices, "ciphertexts": shares}, sender),
            SHARES_FOR: schema(
                SHARES_FOR, {"senders": indices, "ciphertexts": shares}, {**base, "client": MetaSpec(str)}
            ),
            UPDATE: schema(
                UPDATE, {"masked": TensorSpec(self._wire, vector)}, {**sender, "layout": self._layout_meta()}
            ),
            UNMASK: schema(UNMASK, {"survivors": indices, "dropped": indices}, base),
            REVEAL: schema(
                REVEAL,
                {
                    "self_mask_owners": indices,
                    "self_mask_shares": share_values,
                    "mask_key_owners": indices,
                    "mask_key_shares": share_values,
                },
                sender,
            ),
            AGGREGATE: schema(AGGREGATE, {"sum": TensorSpec(self._wire, vector)}, aggregate),
        }

    def _check_sizes(self, payload: Payload, layout: Layout, *, sender: str) -> None:
        tensor = payload.tensors["masked" if payload.kind == UPDATE else "sum"]
        if tensor.numel() != layout.width:
            raise AggregationError(
                f"secagg {payload.kind!r}{' from ' + repr(sender) if sender else ''}: {tensor.numel()} values; "
                f"its layout needs {layout.width} ({layout.numel} values and {len(layout.names)} weights)"
            )

    # ------------------------------------------------------------------ quantization

    def quantize(
        self, update: Mapping[str, torch.Tensor], weight: float, *, layout: Layout | None = None
    ) -> np.ndarray:
        """The signed fixed-point vector of one update (values, then weights) before masking."""
        if weight > self.max_weight:
            raise AggregationError(
                f"secagg: weight {weight} exceeds max_weight {self.max_weight}; configure max_weight as the "
                "largest sample count of any client"
            )
        layout = layout or Layout.of(update)
        values, weights = layout.pack(update, weight)
        ratio = float(weight) / self.max_weight
        scale = 2.0**self.scale_bits
        clipped = values.numpy().clip(-self.clip_range, self.clip_range) * (ratio * scale)
        if self.rounding == "stochastic":
            rng = np.random.default_rng(secrets.randbits(128))
            quantized = np.floor(clipped + rng.random(clipped.shape))
        else:
            quantized = np.rint(clipped)
        weight_units = np.rint(weights.numpy() / self.max_weight * scale)
        if ratio * scale < 1:
            raise AggregationError(
                f"secagg: weight {weight} is below one quantization step of max_weight {self.max_weight} at "
                f"scale 2**{self.scale_bits}; lower max_weight"
            )
        return np.concatenate([quantized, weight_units]).astype(np.int64)

    def _to_ring(self, signed: np.ndarray) -> np.ndarray:
        return (
            (signed % (1 << self.modulus_bits)).astype(self._ring)
            if self.modulus_bits == 32
            else signed.view(np.uint64)
        )

    def _ring_of(self, tensor: torch.Tensor) -> np.ndarray:
        return tensor.detach().contiguous().numpy().view(self._ring).copy()

    def _wire_of(self, ring: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(ring.view(self._signed).copy())

    # ------------------------------------------------------------------ the three roles

    def encode(
        self, update: Mapping[str, torch.Tensor], weight: float, *, layout: Layout | None = None
    ) -> Payload:
        """Not available without a round's keys: use ``client(...)`` and its :meth:`SecAggClient.encode`."""
        raise AggregationError(
            "secagg: masking needs the round's pairwise keys; create aggregator.client(client_id, round_id=...) "
            "and call its advertise(), share_keys(), receive_shares() and encode()"
        )

    def _load(self, client: str, payload: Payload, layout: Layout) -> np.ndarray:
        return self._ring_of(payload.tensors["masked"])

    def _add(self, total: np.ndarray, part: np.ndarray) -> np.ndarray:
        total += part  # unsigned: wraps modulo 2**modulus_bits
        return total

    def _finish(self, total: np.ndarray, layout: Layout) -> Payload:
        return Payload(AGGREGATE, {"sum": self._wire_of(total)}, {"unmasked": False})

    def decode(self, aggregate: Payload) -> dict[str, torch.Tensor]:
        """The weighted average from the server's unmasked sum of quantized updates."""
        layout = self._aggregate_layout(aggregate)
        if not aggregate.meta["unmasked"]:
            raise AggregationError(
                "secagg: this sum still carries the clients' masks; the server must finish unmasking first"
            )
        total = aggregate.tensors["sum"].to(torch.int64).to(torch.float64)
        return layout.unpack(total[: layout.numel], total[layout.numel :], absent_below=0.5)

    def _round_check(self, payload: Payload, round_id: int, *, sender: str) -> None:
        if payload.meta.get("round") != round_id:
            raise AggregationError(
                f"secagg {payload.kind!r} from {sender!r} belongs to round {payload.meta.get('round')}, this is round "
                f"{round_id} (a replayed or late message)"
            )


def _share_info(round_id: int, a: int, b: int) -> bytes:
    low, high = sorted((a, b))
    return f"secagg shares|{round_id}|{low}|{high}".encode()


def _mask_info(round_id: int, a: int, b: int) -> bytes:
    low, high = sorted((a, b))
    return f"secagg mask|{round_id}|{low}|{high}".encode()


def _nonce(sender: int, recipient: int) -> bytes:
    return struct.pack(">II", sender, recipient) + bytes(4)


class SecAggClient:
    """One client's side of one secure-aggregation round (create with :meth:`SecAggAggregator.client`).

    Call in order: :meth:`advertise`, :meth:`share_keys`, :meth:`receive_shares`, :meth:`encode`,
    :meth:`reveal`; then :meth:`decode` the server's aggregate.
    """

    def __init__(self, aggregator: SecAggAggregator, client_id: str, *, round_id: int) -> None:
        self.aggregator = aggregator
        self.client_id = client_id
        self.round_id = round_id
        self._cipher_key = keys.new_private_key()
        self._mask_key = keys.new_private_key()
        self._seed = secrets.token_bytes(_SEED_BYTES)
        self._index = 0
        self._threshold = 0
        self._clients: list[str] = []
        self._cipher_publics: list[bytes] = []
        self._mask_publics: list[bytes] = []
        self._peers: set[int] = set()  # indices that shared keys with us (and ourselves)
        self._held: dict[int, tuple[bytes, bytes]] = {}  # owner index -> (mask key share, seed share)
        self._sent_update = False
        self._revealed = False

    def export_state(self) -> dict[str, bytes | int | bool | str | list[int] | list[str] | list[bytes]]:
        """Everything this round's session holds, for a client that lives one message at a time
        (a Flower ClientApp keeps it in its own local state between the stages). It holds this
        round's private keys and self-mask seed: never send it anywhere."""
        held = sorted(self._held)
        return {
            "client_id": self.client_id,
            "round_id": self.round_id,
            "cipher_key": keys.private_bytes(self._cipher_key),
            "mask_key": keys.private_bytes(self._mask_key),
            "seed": self._seed,
            "index": self._index,
            "threshold": self._threshold,
            "clients": list(self._clients),
            "cipher_publics": list(self._cipher_publics),
            "mask_publics": list(self._mask_publics),
            "peers": sorted(self._peers),
            "held_owners": held,
            "held_key_shares": [self._held[u][0] for u in held],
            "held_seed_shares": [self._held[u][1] for u in held],
            "sent_update": self._sent_update,
            "revealed": self._revealed,
        }

    @classmethod
    def from_state(cls, aggregator: SecAggAggregator, state: Mapping[str, Any]) -> SecAggClient:
        """The session :meth:`export_state` saved; raises :class:`AggregationError` if it is not one."""
        try:
            session = cls(aggregator, str(state["client_id"]), round_id=int(state["round_id"]))
            session._cipher_key = keys.load_private(bytes(state["cipher_key"]))
            session._mask_key = keys.load_private(bytes(state["mask_key"]))
            session._seed = bytes(state["seed"])
            session._index = int(state["index"])
            session._threshold = int(state["threshold"])
            session._clients = [str(c) for c in state["clients"]]
            session._cipher_publics = [bytes(k) for k in state["cipher_publics"]]
            session._mask_publics = [bytes(k) for k in state["mask_publics"]]
            session._peers = {int(i) for i in state["peers"]}
            owners, key_shares, seed_shares = (
                list(state["held_owners"]),
                list(state["held_key_shares"]),
                list(state["held_seed_shares"]),
            )
            if not len(owners) == len(key_shares) == len(seed_shares):
                raise ValueError("held shares do not line up")
            session._held = {
                int(u): (bytes(k), bytes(v)) for u, k, v in zip(owners, key_shares, seed_shares, strict=True)
            }
            session._sent_update = bool(state["sent_update"])
            session._revealed = bool(state["revealed"])
        except (KeyError, TypeError, ValueError) as err:
            raise AggregationError(f"secagg: the stored session state is not valid ({err})") from None
        return session

    @property
    def index(self) -> int:
        """This client's index in the roster (its Shamir point), 0 before the roster arrives."""
        return self._index

    def _meta(self) -> dict[str, MetaValue]:
        return {"aggregator": self.aggregator.name, "round": self.round_id, "client": self.client_id}

    def advertise(self) -> Payload:
        """Stage 1: this round's public keys and the commitment to the self-mask seed."""
        return Payload(
            ADVERTISE,
            {
                "cipher_public_key": _bytes_tensor(keys.public_bytes(self._cipher_key)),
                "mask_public_key": _bytes_tensor(keys.public_bytes(self._mask_key)),
                "commitment": _bytes_tensor(hashlib.sha256(self._seed).digest()),
            },
            self._meta(),
        )

    def share_keys(self, roster: Payload) -> Payload:
        """Stage 2: check the roster and send shares of the mask key and seed, encrypted per peer."""
        agg = self.aggregator
        agg.validate(roster, sender="the server")
        agg._round_check(roster, self.round_id, sender="the server")
        clients = _json_list(roster.meta["clients"], what="secagg roster")
        n = len(clients)
        cipher = [bytes_of(r) for r in roster.tensors["cipher_public_keys"]]
        masks = [bytes_of(r) for r in roster.tensors["mask_public_keys"]]
        if not (len(cipher) == len(masks) == roster.tensors["commitments"].shape[0] == n):
            raise AggregationError(f"secagg roster lists {n} clients but carries keys for a different number")
        if any(len(k) != keys.PUBLIC_KEY_BYTES for k in cipher + masks):
            raise AggregationError("secagg roster: public keys must have 32 bytes each")
        if len(set(clients)) != n or clients.count(self.client_id) != 1:
            raise AggregationError(
                f"secagg roster must list every client once and {self.client_id!r} exactly once, got {clients[:8]}"
            )
        if n > agg.max_clients:
            raise AggregationError(
                f"secagg roster has {n} clients; this configuration allows {agg.max_clients}"
            )
        if len(set(cipher)) != n or len(set(masks)) != n:
            raise AggregationError("secagg roster repeats a public key (a replayed advertisement)")
        threshold = int(roster.meta["threshold"])  # type: ignore[arg-type]
        if not (n / 2 < threshold <= n):
            raise AggregationError(
                f"secagg roster asks for threshold {threshold} of {n}; it must exceed n / 2 and be at most n"
            )
        index = clients.index(self.client_id) + 1
        if cipher[index - 1] != keys.public_bytes(self._cipher_key) or masks[index - 1] != keys.public_bytes(
            self._mask_key
        ):
            raise AggregationError(
                "secagg roster carries other public keys for this client than it advertised"
            )
        self._clients, self._cipher_publics, self._mask_publics = clients, cipher, masks
        self._index, self._threshold = index, threshold
        points = range(1, n + 1)
        key_shares = shamir.split(keys.private_bytes(self._mask_key), threshold=threshold, xs=points)
        seed_shares = (
            shamir.split(self._seed, threshold=threshold, xs=points)
            if agg.self_masks
            else dict.fromkeys(points, bytes(shamir.SHARE_BYTES))
        )
        self._held[index] = (key_shares[index], seed_shares[index])
        recipients, rows = [], []
        for peer in points:
            if peer == index:
                continue
            key = keys.agree(
                self._cipher_key,
                cipher[peer - 1],
                info=_share_info(self.round_id, index, peer),
                what=f"secagg share key with {clients[peer - 1]!r}",
            )
            plain = struct.pack(">II", index, peer) + key_shares[peer] + seed_shares[peer]
            associated = _share_info(self.round_id, index, peer) + struct.pack(">II", index, peer)
            rows.append(
                np.frombuffer(keys.aead_encrypt(key, _nonce(index, peer), plain, associated), np.uint8)
            )
            recipients.append(peer)
        return Payload(
            SHARES,
            {
                "recipients": torch.tensor(recipients, dtype=torch.int64),
                "ciphertexts": torch.from_numpy(
                    np.stack(rows) if rows else np.zeros((0, _SHARE_CIPHER), np.uint8)
                ),
            },
            self._meta(),
        )

    def receive_shares(self, shares_for: Payload) -> None:
        """Stage 2b: decrypt and keep the peers' shares; the senders are the peers this client masks with."""
        agg = self.aggregator
        agg.validate(shares_for, sender="the server")
        agg._round_check(shares_for, self.round_id, sender="the server")
        if not self._index:
            raise AggregationError("secagg: receive_shares before share_keys (the roster is unknown)")
        if shares_for.meta["client"] != self.client_id:
            raise AggregationError(
                f"secagg shares addressed to {shares_for.meta['client']!r}, not {self.client_id!r}"
            )
        senders = shares_for.tensors["senders"].tolist()
        rows = shares_for.tensors["ciphertexts"]
        if rows.shape != (len(senders), _SHARE_CIPHER) or len(set(senders)) != len(senders):
            raise AggregationError(
                f"secagg shares: {len(senders)} distinct senders expected with rows of {_SHARE_CIPHER} bytes, "
                f"got shape {tuple(rows.shape)}"
            )
        n = len(self._clients)
        peers = {self._index}
        for sender, row in zip(senders, rows, strict=True):
            if not 1 <= sender <= n or sender == self._index:
                raise AggregationError(
                    f"secagg shares: sender index {sender} is not a peer in the roster of {n}"
                )
            what = f"secagg share from {self._clients[sender - 1]!r}"
            key = keys.agree(
                self._cipher_key,
                self._cipher_publics[sender - 1],
                info=_share_info(self.round_id, sender, self._index),
                what=what,
            )
            associated = _share_info(self.round_id, sender, self._index) + struct.pack(
                ">II", sender, self._index
            )
            plain = keys.aead_decrypt(key, _nonce(sender, self._index), bytes_of(row), associated, what=what)
            self._held[sender] = (plain[8 : 8 + shamir.SHARE_BYTES], plain[8 + shamir.SHARE_BYTES :])
            peers.add(sender)
        if len(peers) < self._threshold:
            raise AggregationError(
                f"secagg: only {len(peers)} clients shared keys, fewer than the threshold {self._threshold}; "
                "the round cannot tolerate dropouts and is abandoned"
            )
        self._peers = peers

    def encode(
        self, update: Mapping[str, torch.Tensor], weight: float, *, layout: Layout | None = None
    ) -> Payload:
        """Stage 3: the quantized weighted update plus pairwise and self masks, modulo the ring."""
        agg = self.aggregator
        if not self._peers:
            raise AggregationError("secagg: encode before receive_shares (the peers are unknown)")
        layout = layout or Layout.of(update)
        masked = agg._to_ring(agg.quantize(update, weight, layout=layout))
        for peer in sorted(self._peers - {self._index}):
            mask = self._pair_mask(peer, masked.size)
            if self._index < peer:
                masked += mask
            else:
                masked -= mask
        if agg.self_masks:
            masked += keys.prg(self._seed, masked.size, agg._ring)
        self._sent_update = True
        return Payload(UPDATE, {"masked": agg._wire_of(masked)}, {**self._meta(), "layout": layout.to_json()})

    def _pair_mask(self, peer: int, count: int) -> np.ndarray:
        seed = keys.agree(
            self._mask_key,
            self._mask_publics[peer - 1],
            info=_mask_info(self.round_id, self._index, peer),
            what=f"secagg mask key of {self._clients[peer - 1]!r}",
        )
        return keys.prg(seed, count, self.aggregator._ring)

    def reveal(self, request: Payload) -> Payload:
        """Stage 4: shares of the survivors' seeds and the dropped clients' mask keys, never both for one."""
        agg = self.aggregator
        agg.validate(request, sender="the server")
        agg._round_check(request, self.round_id, sender="the server")
        survivors = request.tensors["survivors"].tolist()
        dropped = request.tensors["dropped"].tolist()
        if not self._sent_update:
            raise AggregationError("secagg: reveal before this client sent its masked update")
        if self._revealed:
            raise AggregationError("secagg: this client already revealed its shares for this round")
        if self._index not in survivors:
            raise AggregationError(
                f"secagg: the unmasking request declares {self.client_id!r} dropped; it reveals nothing"
            )
        if (
            set(survivors) & set(dropped)
            or len(set(survivors)) != len(survivors)
            or len(set(dropped)) != len(dropped)
        ):
            raise AggregationError(
                "secagg: the unmasking request lists a client as both survivor and dropped"
            )
        if set(survivors) | set(dropped) != self._peers:
            raise AggregationError(
                f"secagg: the unmasking request covers clients {sorted(set(survivors) | set(dropped))}, but the clients "
                f"that shared keys are {sorted(self._peers)}"
            )
        if len(survivors) < self._threshold:
            raise AggregationError(
                f"secagg: {len(survivors)} survivors, fewer than the threshold {self._threshold}; refusing to unmask"
            )
        self._revealed = True
        seed_owners = sorted(survivors) if agg.self_masks else []
        key_owners = sorted(dropped)
        return Payload(
            REVEAL,
            {
                "self_mask_owners": torch.tensor(seed_owners, dtype=torch.int64),
                "self_mask_shares": _rows([self._held[u][1] for u in seed_owners]),
                "mask_key_owners": torch.tensor(key_owners, dtype=torch.int64),
                "mask_key_shares": _rows([self._held[u][0] for u in key_owners]),
            },
            self._meta(),
        )

    def decode(self, aggregate: Payload) -> dict[str, torch.Tensor]:
        """The round's weighted average (see :meth:`SecAggAggregator.decode`)."""
        self.aggregator._round_check(aggregate, self.round_id, sender="the server")
        return self.aggregator.decode(aggregate)


class SecAggServer:
    """The server's side of one secure-aggregation round (create with :meth:`SecAggAggregator.server`).

    Call in order: :meth:`roster`, :meth:`route_shares`, :meth:`collect`, :meth:`unmask`. Invalid
    messages are left out with their reason in :attr:`rejected`; the round fails only when fewer
    clients than the reconstruction threshold remain.
    """

    def __init__(self, aggregator: SecAggAggregator, *, round_id: int) -> None:
        self.aggregator = aggregator
        self.round_id = round_id
        self.clients: list[str] = []
        self.threshold = 0
        self.rejected: dict[str, str] = {}
        self._mask_publics: list[bytes] = []
        self._commitments: list[bytes] = []
        self._shared: list[int] = []  # indices that shared keys (U2)
        self._survivors: list[int] = []
        self._masked_sum: Payload | None = None

    @property
    def survivors(self) -> list[str]:
        """Clients whose masked updates the sum keeps."""
        return [self.clients[i - 1] for i in self._survivors]

    @property
    def shared(self) -> list[str]:
        """Clients whose shares the server routed (those a masked update is due from)."""
        return [self.clients[i - 1] for i in self._shared]

    @property
    def dropped(self) -> list[str]:
        """Clients that shared keys but whose updates the sum does not keep."""
        return [self.clients[i - 1] for i in self._shared if i not in self._survivors]

    def _accept(self, kind: str, payloads: Mapping[str, Payload], allowed: set[str]) -> dict[str, Payload]:
        agg = self.aggregator
        good = {}
        for client, payload in payloads.items():
            try:
                if payload.kind != kind:
                    raise AggregationError(f"secagg: {client!r} sent {payload.kind!r} where {kind!r} was due")
                agg.validate(payload, sender=client)
                agg._round_check(payload, self.round_id, sender=client)
                if payload.meta["client"] != client:
                    raise AggregationError(
                        f"secagg {kind!r} from {client!r} claims to be from {payload.meta['client']!r}"
                    )
                if client not in allowed:
                    raise AggregationError(
                        f"secagg {kind!r} from {client!r}, who is not part of this stage of the round"
                    )
            except AggregationError as err:
                self.rejected[client] = str(err)
                continue
            good[client] = payload
        return good

    def _need(self, count: int, stage: str) -> None:
        if count < max(self.threshold, 2):
            reasons = "; ".join(f"{c}: {r}" for c, r in self.rejected.items())
            raise AggregationError(
                f"secagg round {self.round_id}: {count} clients left at {stage}, fewer than the "
                f"{max(self.threshold, 2)} needed" + (f" ({reasons})" if reasons else "")
            )

    def roster(self, advertisements: Mapping[str, Payload]) -> Payload:
        """Stage 1: index the clients that advertised keys and broadcast their keys."""
        agg = self.aggregator
        good = self._accept(ADVERTISE, advertisements, set(advertisements))
        seen: set[bytes] = set()
        for client in list(good):
            pair = bytes_of(good[client].tensors["cipher_public_key"]) + bytes_of(
                good[client].tensors["mask_public_key"]
            )
            if pair in seen:
                self.rejected[client] = "secagg: advertised keys another client already advertised (replay)"
                del good[client]
            seen.add(pair)
        if len(good) > agg.max_clients:
            raise AggregationError(
                f"secagg round {self.round_id}: {len(good)} clients advertised, this configuration allows "
                f"{agg.max_clients} (raise max_clients, at the cost of precision)"
            )
        self.clients = sorted(good)
        self.threshold = agg.threshold_for(len(self.clients))
        if not len(self.clients) / 2 < self.threshold <= len(self.clients):
            raise AggregationError(
                f"secagg: threshold {self.threshold} for {len(self.clients)} clients must exceed half of them and be "
                "at most all of them"
            )
        self._need(len(self.clients), "key advertisement")

        def table(name: str) -> torch.Tensor:
            return torch.stack([good[c].tensors[name] for c in self.clients])

        self._mask_publics = [bytes_of(good[c].tensors["mask_public_key"]) for c in self.clients]
        self._commitments = [bytes_of(good[c].tensors["commitment"]) for c in self.clients]
        return Payload(
            ROSTER,
            {
                "cipher_public_keys": table("cipher_public_key"),
                "mask_public_keys": table("mask_public_key"),
                "commitments": table("commitment"),
            },
            {
                "aggregator": agg.name,
                "round": self.round_id,
                "clients": json.dumps(self.clients),
                "threshold": self.threshold,
            },
        )

    def route_shares(self, shares: Mapping[str, Payload]) -> dict[str, Payload]:
        """Stage 2: forward to every client that shared keys the shares the other such clients sent it."""
        good = self._accept(SHARES, shares, set(self.clients))
        n = len(self.clients)
        inbox: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for client in list(good):
            sender = self.clients.index(client) + 1
            recipients = good[client].tensors["recipients"].tolist()
            rows = good[client].tensors["ciphertexts"]
            if sorted(recipients) != [i for i in range(1, n + 1) if i != sender] or rows.shape != (
                n - 1,
                _SHARE_CIPHER,
            ):
                self.rejected[client] = (
                    f"secagg shares from {client!r} do not cover every other client of the roster once"
                )
                del good[client]
                continue
            for recipient, row in zip(recipients, rows, strict=True):
                inbox.setdefault(recipient, []).append((sender, row))
        self._shared = sorted(self.clients.index(c) + 1 for c in good)
        self._need(len(self._shared), "key sharing")
        out = {}
        for index in self._shared:
            entries = [(s, row) for s, row in inbox.get(index, []) if s in self._shared]
            out[self.clients[index - 1]] = Payload(
                SHARES_FOR,
                {
                    "senders": torch.tensor([s for s, _ in entries], dtype=torch.int64),
                    "ciphertexts": torch.stack([row for _, row in entries])
                    if entries
                    else torch.zeros((0, _SHARE_CIPHER), dtype=torch.uint8),
                },
                {
                    "aggregator": self.aggregator.name,
                    "round": self.round_id,
                    "client": self.clients[index - 1],
                },
            )
        return out

    def collect(
        self, updates: Mapping[str, Payload], *, exclude: set[str] | frozenset[str] = frozenset()
    ) -> Payload:
        """Stage 3: add the masked updates and ask the survivors to reveal.

        ``exclude`` names clients whose updates arrived but are not kept (e.g. late): they are
        declared dropped; their self masks keep their updates hidden.
        """
        allowed = {self.clients[i - 1] for i in self._shared} - set(exclude)
        for client in set(exclude) & set(updates):
            self.rejected[client] = "secagg: the server did not keep this update (excluded); declared dropped"
        good = self._accept(UPDATE, {c: p for c, p in updates.items() if c not in exclude}, allowed)
        self._need(len(good), "masked updates")
        masked = self.aggregator.combine(good, min_clients=max(self.threshold, 2))
        self.rejected.update(json.loads(str(masked.meta["rejected"])))
        kept = set(json.loads(str(masked.meta["clients"])))
        self._survivors = sorted(self.clients.index(c) + 1 for c in kept)
        self._masked_sum = masked
        dropped = [i for i in self._shared if i not in self._survivors]
        return Payload(
            UNMASK,
            {
                "survivors": torch.tensor(self._survivors, dtype=torch.int64),
                "dropped": torch.tensor(dropped, dtype=torch.int64),
            },
            {"aggregator": self.aggregator.name, "round": self.round_id},
        )

    def unmask(self, reveals: Mapping[str, Payload]) -> Payload:
        """Stage 4: rebuild the seeds, remove every remaining mask and return the exact sum."""
        agg = self.aggregator
        if self._masked_sum is None:
            raise AggregationError("secagg: unmask before collect")
        good = self._accept(REVEAL, reveals, set(self.survivors))
        dropped = [i for i in self._shared if i not in self._survivors]
        seed_shares: dict[int, dict[int, bytes]] = {u: {} for u in self._survivors}
        key_shares: dict[int, dict[int, bytes]] = {u: {} for u in dropped}
        expected_seeds = self._survivors if agg.self_masks else []
        for client, payload in good.items():
            x = self.clients.index(client) + 1
            seeds = payload.tensors["self_mask_owners"].tolist()
            owners = payload.tensors["mask_key_owners"].tolist()
            if (
                seeds != expected_seeds
                or owners != dropped
                or payload.tensors["self_mask_shares"].shape != (len(seeds), shamir.SHARE_BYTES)
                or payload.tensors["mask_key_shares"].shape != (len(owners), shamir.SHARE_BYTES)
            ):
                self.rejected[client] = f"secagg reveal from {client!r} does not answer the unmasking request"
                continue
            for u, row in zip(seeds, payload.tensors["self_mask_shares"], strict=True):
                seed_shares[u][x] = bytes_of(row)
            for u, row in zip(owners, payload.tensors["mask_key_shares"], strict=True):
                key_shares[u][x] = bytes_of(row)
        total = agg._ring_of(self._masked_sum.tensors["sum"])
        count = total.size
        for u in dropped:
            what = f"secagg mask key of dropped client {self.clients[u - 1]!r}"
            raw = shamir.combine(key_shares[u], threshold=self.threshold, secret_bytes=32, what=what)
            key = X25519PrivateKey.from_private_bytes(raw)
            if keys.public_bytes(key) != self._mask_publics[u - 1]:
                raise AggregationError(
                    f"{what}: the rebuilt key does not match the advertised one (altered shares)"
                )
            for v in self._survivors:
                seed = keys.agree(
                    key, self._mask_publics[v - 1], info=_mask_info(self.round_id, u, v), what=what
                )
                mask = keys.prg(seed, count, agg._ring)
                if v < u:
                    total -= mask
                else:
                    total += mask
        for u in expected_seeds:
            what = f"secagg self-mask seed of {self.clients[u - 1]!r}"
            seed = shamir.combine(
                seed_shares[u], threshold=self.threshold, secret_bytes=_SEED_BYTES, what=what
            )
            if hashlib.sha256(seed).digest() != self._commitments[u - 1]:
                raise AggregationError(
                    f"{what}: the rebuilt seed does not match its commitment (altered shares)"
                )
            total -= keys.prg(seed, count, agg._ring)
        meta = dict(self._masked_sum.meta)
        meta.update(unmasked=True, round=self.round_id, rejected=json.dumps(self.rejected))
        return Payload(AGGREGATE, {"sum": agg._wire_of(total)}, meta)


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.tensor(list(data), dtype=torch.uint8)


def _rows(rows: list[bytes]) -> torch.Tensor:
    if not rows:
        return torch.zeros((0, shamir.SHARE_BYTES), dtype=torch.uint8)
    return torch.from_numpy(np.stack([np.frombuffer(r, np.uint8) for r in rows]).copy())


def _json_list(text: MetaValue, *, what: str) -> list[str]:
    try:
        value = json.loads(str(text))
    except ValueError:
        raise AggregationError(f"{what}: the client list is not JSON") from None
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise AggregationError(f"{what}: the client list must be a JSON list of strings")
    return value
