"""SplitLoRA's adapter averaging (``train.fedavg_every``) through the model party, by the federated
aggregators: in the clear (``plain``), encrypted (``ckks``) or pairwise-masked (``secagg``).

The model party plays the aggregation server of :mod:`splitfed.federated.aggregators` for the data
parties that share it: it collects one payload per party per stage (a rendezvous: each party's
request waits until every party of the round has sent its own), computes the stage's replies
without any secret, and answers each party. It validates every payload by the aggregator's own
schema, so ciphertexts (``uint8``) and masked integers cross where only float adapters did.

Stages, per aggregator (:class:`AveragingClient` runs the data party's side):

* every aggregator first: ``layout`` (each party's parameter names and shapes, answered with their
  union, so parties whose heads hold different blocks average per tensor over those holding it).
* ``plain``: ``update`` (the encoded adapters, answered with the aggregate).
* ``ckks``: once, ``setup`` (the dealer, the data party of ``data.party_index`` 0, sends the keyless
  public context, the others their X25519 public keys; the dealer is answered with those keys)
  and ``seal`` (the dealer sends the secret context sealed to each of them; each is answered with
  its own sealed context, which the model party cannot open); then ``update`` every round.
* ``secagg``: every round ``advertise``, ``share``, ``update``, ``reveal`` (the four stages of
  :class:`~splitfed.federated.aggregators.SecAggAggregator`; a party lost after sharing its keys
  is unmasked out of the sum when the others time out waiting for it).

A payload travels as one ``fedavg`` message: its tensors, plus ``stage``, ``payload_kind`` and
``payload_meta`` (the payload's metadata as JSON) in the message's metadata.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from splitfed.federated.aggregators import (
    AGGREGATORS,
    AggregationError,
    Aggregator,
    CKKSAggregator,
    Layout,
    Payload,
    SecAggAggregator,
)
from splitfed.federated.aggregators import keys as keyring
from splitfed.federated.aggregators.base import UPDATE
from splitfed.federated.aggregators.secagg import SecAggServer
from splitfed.transport.channel import Message, MetaValue

__all__ = ["STAGES", "AveragingClient", "AveragingServer", "averaging_aggregator"]

#: The stages each aggregator's averaging goes through (the ``stage`` of a ``fedavg`` message).
STAGES = ("layout", "update", "setup", "seal", "advertise", "share", "reveal")
#: Kinds of the bundles only this module uses (the aggregators declare the others).
_KEYS_BUNDLE, _SEALED_BUNDLE, _ACK, _LAYOUT = "ckks_public_keys", "ckks_sealed_contexts", "ack", "layout"


def averaging_aggregator(name: str) -> Aggregator:
    """The aggregator of ``train.fedavg_aggregation``, with settings for averaging whole adapters.

    ``secagg`` uses a 64-bit ring, so sample weights up to 10**9 keep full precision.
    """
    if name == "secagg":
        return SecAggAggregator(modulus_bits=64, max_weight=1e9, clip_range=64.0)
    if name not in AGGREGATORS:
        raise AggregationError(f"unknown fedavg aggregation {name!r}; expected one of {sorted(AGGREGATORS)}")
    return AGGREGATORS[name]()


def to_message(stage: str, payload: Payload, meta: Mapping[str, MetaValue]) -> Message:
    """A ``fedavg`` message carrying ``payload`` for ``stage``, with the averaging's own ``meta``."""
    return Message(
        "fedavg",
        dict(payload.tensors),
        {**meta, "stage": stage, "payload_kind": payload.kind, "payload_meta": json.dumps(payload.meta)},
    )


def from_message(message: Message) -> Payload:
    """The payload a ``fedavg`` / ``fedavg_result`` message carries (validate it before use)."""
    try:
        meta = json.loads(str(message.meta.get("payload_meta") or "{}"))
    except (ValueError, RecursionError) as err:
        raise AggregationError(f"fedavg payload_meta is not JSON ({err})") from None
    if not isinstance(meta, dict) or not all(
        isinstance(v, (bool, int, float, str)) or v is None for v in meta.values()
    ):
        raise AggregationError("fedavg payload_meta must map names to scalars")
    return Payload(str(message.meta.get("payload_kind") or ""), dict(message.tensors), meta)


def _bytes_bundle(kind: str, payload: Payload, *, max_bytes: int, aggregator: str) -> dict[str, bytes]:
    """The per-recipient byte strings of a bundle, checked (kind, dtype, sizes)."""
    if payload.kind != kind or payload.meta.get("aggregator") != aggregator:
        raise AggregationError(f"{aggregator}: expected a {kind!r} bundle, got {payload.kind!r}")
    out = {}
    for name, tensor in payload.tensors.items():
        if tensor.dtype != torch.uint8 or tensor.dim() != 1 or tensor.numel() > max_bytes:
            raise AggregationError(f"{aggregator}: {kind} entry {name!r} must be at most {max_bytes} bytes")
        out[name] = tensor.contiguous().numpy().tobytes()
    return out


def _tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


@dataclass
class _Stage:
    expected: int
    payloads: dict[str, Payload] = field(default_factory=dict)
    replies: dict[str, Payload] | None = None
    error: str = ""
    collected: int = 0


class AveragingServer:
    """The model party's side: one rendezvous per (round, stage), the aggregator's server logic.

    Parameters
    ----------
    aggregator : Aggregator
        What :func:`averaging_aggregator` gives for the run's ``train.fedavg_aggregation``.
    timeout_s : float, default 600
        How long a party waits for the others at one stage.
    """

    def __init__(self, aggregator: Aggregator, *, timeout_s: float = 600.0) -> None:
        self.aggregator = aggregator
        self.timeout_s = timeout_s
        self._stages: dict[tuple[int, str], _Stage] = {}
        self._secagg: dict[int, SecAggServer] = {}
        self._cond = threading.Condition()
        #: Rounds whose average every party received.
        self.completed = 0

    def handle(self, client: str, round_id: int, parties: int, stage: str, payload: Payload) -> Payload:
        """Add ``client``'s payload to the stage and return its reply once the stage is complete."""
        compute = self._computation(stage)
        with self._cond:
            expected = self._expected(round_id, stage, parties)
            current = self._stages.setdefault((round_id, stage), _Stage(expected))
            if client in current.payloads:
                raise AggregationError(f"fedavg round {round_id} {stage}: party {client!r} sent twice")
            current.payloads[client] = payload
            if len(current.payloads) >= current.expected:
                self._finish(round_id, stage, current, compute)
            elif not self._cond.wait_for(
                lambda: current.replies is not None or bool(current.error), timeout=self.timeout_s
            ):
                if isinstance(self.aggregator, SecAggAggregator) and stage in ("update", "reveal"):
                    # a party lost after sharing keys: the survivors' shares remove its masks
                    self._finish(round_id, stage, current, compute)
                else:
                    del current.payloads[client]  # a retry of this party can still complete the round
                    raise AggregationError(
                        f"fedavg round {round_id} ({stage}) incomplete after {self.timeout_s:g} s: "
                        f"{len(current.payloads) + 1} of {current.expected} parties arrived (a party finished "
                        "early, died, or uses another fedavg_every or num_parties)"
                    )
            if current.error:
                raise AggregationError(current.error)
            assert current.replies is not None
            if client not in current.replies:
                raise AggregationError(f"fedavg round {round_id} ({stage}): {client!r} was left out")
            reply = current.replies[client]
            current.collected += 1
            if current.collected >= len(current.replies):
                del self._stages[(round_id, stage)]
                secagg = isinstance(self.aggregator, SecAggAggregator)
                if (stage == "update" and not secagg) or stage == "reveal":
                    self.completed += 1
                    self._secagg.pop(round_id, None)
            return reply

    def _expected(self, round_id: int, stage: str, parties: int) -> int:
        server = self._secagg.get(round_id)
        if server is None or stage == "advertise":
            return parties
        if stage == "share":
            return len(server.clients)
        if stage == "update":
            return len(server.shared)
        return len(server.survivors)

    def _finish(self, round_id: int, stage: str, current: _Stage, compute: Callable[..., Any]) -> None:
        try:
            current.replies = compute(round_id, dict(current.payloads))
        except AggregationError as err:
            current.error = f"fedavg round {round_id} ({stage}): {err}"
        self._cond.notify_all()

    def _computation(self, stage: str) -> Callable[[int, dict[str, Payload]], dict[str, Payload]]:
        agg = self.aggregator
        table: dict[str, Callable[[int, dict[str, Payload]], dict[str, Payload]]]
        if isinstance(agg, SecAggAggregator):
            table = {
                "layout": self._layout,
                "advertise": self._advertise,
                "share": self._share,
                "update": self._masked,
                "reveal": self._reveal,
            }
        elif isinstance(agg, CKKSAggregator):
            table = {
                "layout": self._layout,
                "setup": self._setup,
                "seal": self._seal,
                "update": self._combine,
            }
        else:
            table = {"layout": self._layout, "update": self._combine}
        if stage not in table:
            raise AggregationError(
                f"fedavg stage {stage!r} is not a stage of {agg.name} averaging ({sorted(table)}); every party "
                "and the model party must use the same train.fedavg_aggregation"
            )
        return table[stage]

    # ------------------------------------------------------------------ every aggregator

    def _layout(self, round_id: int, payloads: dict[str, Payload]) -> dict[str, Payload]:
        """The union of the parties' parameters (heads of different depths hold different ones):
        every party flattens its update in this layout, zeros and weight 0 where it holds nothing."""
        agg = self.aggregator
        shapes: dict[str, tuple[tuple[int, ...], str]] = {}
        for client, payload in payloads.items():
            if payload.kind != _LAYOUT or "layout" not in payload.meta:
                raise AggregationError(f"{client!r} sent {payload.kind!r} where its layout was due")
            layout = Layout.from_json(
                str(payload.meta["layout"]), max_tensors=agg.max_tensors, max_numel=agg.max_numel
            )
            for name, shape, dtype in zip(layout.names, layout.shapes, layout.dtypes, strict=True):
                if shapes.setdefault(name, (shape, dtype)) != (shape, dtype):
                    raise AggregationError(
                        f"parameter {name!r} is {shape} {dtype} at {client!r} but {shapes[name]} at another party"
                    )
        names = tuple(sorted(shapes))
        union = Layout(names, tuple(shapes[n][0] for n in names), tuple(shapes[n][1] for n in names))
        if union.numel > agg.max_numel:
            raise AggregationError(
                f"the parties' adapters hold {union.numel} values; at most {agg.max_numel}"
            )
        return dict.fromkeys(payloads, Payload(_LAYOUT, {}, {"layout": union.to_json()}))

    # ------------------------------------------------------------------ plain / ckks

    def _combine(self, round_id: int, payloads: dict[str, Payload]) -> dict[str, Payload]:
        aggregate = self.aggregator.combine(payloads)
        return dict.fromkeys(payloads, aggregate)

    def _setup(self, round_id: int, payloads: dict[str, Payload]) -> dict[str, Payload]:
        agg = self.aggregator
        assert isinstance(agg, CKKSAggregator)
        dealers = [c for c, p in payloads.items() if p.kind == "ckks_public_context"]
        if len(dealers) != 1:
            raise AggregationError(
                f"ckks averaging needs exactly one dealer (the data party with party_index 0), got {dealers}"
            )
        dealer = dealers[0]
        agg.load_public_context(payloads[dealer])
        requests: dict[str, torch.Tensor] = {}
        for client, payload in payloads.items():
            if client == dealer:
                continue
            agg.validate(payload, sender=client)
            if payload.kind != "ckks_public_key":
                raise AggregationError(f"ckks setup: {client!r} sent {payload.kind!r}, not its public key")
            requests[client] = payload.tensors["public_key"]
        replies = {c: Payload(_ACK, {}, {"aggregator": agg.name}) for c in payloads}
        replies[dealer] = Payload(_KEYS_BUNDLE, requests, {"aggregator": agg.name})
        return replies

    def _seal(self, round_id: int, payloads: dict[str, Payload]) -> dict[str, Payload]:
        agg = self.aggregator
        assert isinstance(agg, CKKSAggregator)
        dealers = [c for c, p in payloads.items() if p.kind == _SEALED_BUNDLE]
        if len(dealers) != 1:
            raise AggregationError(
                f"ckks seal: exactly one party must send the sealed contexts, got {dealers}"
            )
        dealer = dealers[0]
        bundle = payloads[dealer]
        sealed = _bytes_bundle(
            _SEALED_BUNDLE,
            bundle,
            max_bytes=agg.schemas()["ckks_sealed_context"].tensors["sealed"].max_numel,
            aggregator=agg.name,
        )
        replies = {dealer: Payload(_ACK, {}, {"aggregator": agg.name})}
        for client in payloads:
            if client == dealer:
                continue
            if client not in sealed:
                raise AggregationError(f"ckks seal: the dealer sealed no context for {client!r}")
            reply = Payload(
                "ckks_sealed_context",
                {"sealed": _tensor(sealed[client])},
                {"aggregator": agg.name, "recipient": client, "context_id": agg.context_id},
            )
            agg.validate(reply, sender="the dealer")
            replies[client] = reply
        return replies

    # ------------------------------------------------------------------ secagg

    def _advertise(self, round_id: int, payloads: dict[str, Payload]) -> dict[str, Payload]:
        agg = self.aggregator
        assert isinstance(agg, SecAggAggregator)
        server = agg.server(round_id=round_id)
        roster = server.roster(payloads)
        self._secagg[round_id] = server
        return dict.fromkeys(server.clients, roster)

    def _server(self, round_id: int) -> SecAggServer:
        if round_id not in self._secagg:
            raise AggregationError(f"secagg round {round_id}: no roster (the advertise stage did not run)")
        return self._secagg[round_id]

    def _share(self, round_id: int, payloads: dict[str, Payload]) -> dict[str, Payload]:
        return self._server(round_id).route_shares(payloads)

    def _masked(self, round_id: int, payloads: dict[str, Payload]) -> dict[str, Payload]:
        server = self._server(round_id)
        request = server.collect(payloads)
        return dict.fromkeys(server.survivors, request)

    def _reveal(self, round_id: int, payloads: dict[str, Payload]) -> dict[str, Payload]:
        server = self._server(round_id)
        aggregate = server.unmask(payloads)
        return dict.fromkeys(payloads, aggregate)


class AveragingClient:
    """A data party's side of the averaging: encodes its adapters, runs the stages, decodes the average.

    Parameters
    ----------
    aggregator : Aggregator
        The same aggregator as the model party's (:func:`averaging_aggregator`).
    dealer : bool
        Whether this party deals the CKKS keys (the data party with ``party_index`` 0).
    """

    def __init__(self, aggregator: Aggregator, *, dealer: bool) -> None:
        self.aggregator = aggregator
        self.dealer = dealer
        self._keys_dealt = False

    def average(
        self,
        ask: Callable[[Message], Message],
        client: str,
        round_id: int,
        parties: int,
        params: Mapping[str, torch.Tensor],
        samples: float,
    ) -> dict[str, torch.Tensor]:
        """The sample-weighted average of every party's ``params`` for ``round_id``.

        ``ask`` sends one ``fedavg`` message to the model party and returns its reply.
        """
        meta: dict[str, MetaValue] = {
            "client": client,
            "round": round_id,
            "parties": parties,
            "samples": samples,
        }

        def stage(name: str, payload: Payload) -> Payload:
            reply = ask(to_message(name, payload, meta))
            return from_message(reply)

        agg = self.aggregator
        union = stage("layout", Payload(_LAYOUT, {}, {"layout": Layout.of(params).to_json()}))
        layout = Layout.from_json(
            str(union.meta.get("layout", "")), max_tensors=agg.max_tensors, max_numel=agg.max_numel
        )
        if not set(params) <= set(layout.names):
            raise AggregationError(
                "the model party's union layout leaves out some of this party's parameters"
            )
        if isinstance(agg, SecAggAggregator):
            session = agg.client(client, round_id=round_id)
            roster = stage("advertise", session.advertise())
            session.receive_shares(stage("share", session.share_keys(roster)))
            request = stage("update", session.encode(params, samples, layout=layout))
            average = session.decode(stage("reveal", session.reveal(request)))
        else:
            if isinstance(agg, CKKSAggregator) and not self._keys_dealt:
                self._deal(stage, client)
            aggregate = stage("update", agg.encode(params, samples, layout=layout))
            if aggregate.kind == UPDATE:
                raise AggregationError("the model party answered the update with an update, not an aggregate")
            average = agg.decode(aggregate)
        # the tensors this party holds (others' deeper heads hold more)
        return {name: tensor for name, tensor in average.items() if name in params}

    def _deal(self, stage: Callable[[str, Payload], Payload], client: str) -> None:
        agg = self.aggregator
        assert isinstance(agg, CKKSAggregator)
        if self.dealer:
            agg.create_context()
            bundle = stage("setup", agg.public_context())
            requests = _bytes_bundle(
                _KEYS_BUNDLE, bundle, max_bytes=keyring.PUBLIC_KEY_BYTES, aggregator=agg.name
            )
            sealed: dict[str, torch.Tensor] = {}
            for recipient, public in requests.items():
                request = Payload(
                    "ckks_public_key", {"public_key": _tensor(public)}, {"aggregator": agg.name}
                )
                sealed[recipient] = agg.seal_context(request, recipient=recipient).tensors["sealed"]
            stage("seal", Payload(_SEALED_BUNDLE, sealed, {"aggregator": agg.name}))
        else:
            private = keyring.new_private_key()
            stage("setup", agg.key_request(private))
            agg.open_context(
                stage("seal", Payload(_ACK, {}, {"aggregator": agg.name})),
                private_key=private,
                recipient=client,
            )
        self._keys_dealt = True
