"""One round of (blind) aggregation in one process, for each aggregator, with what crossed.

Each class plays every party of its aggregator's protocol in turn (the clients, the server and,
for CKKS, the dealer), passing only :class:`~splitfed.federated.aggregators.Payload` objects
between them: the server's object holds no secret and only ever receives payloads. Bytes are
counted per direction as the tensors of the payloads (metadata excluded), so the encryption and
masking overheads show exactly.

Memory: updates stream. For ``plain`` and ``ckks`` a client trains and encodes when the server
reads its upload, and the server adds it into the running sum before the next client starts, so
a round holds one client's update at a time (a CKKS update is about 14 times its fp32 size).
Secure aggregation must hold every masked update until the clients have revealed their shares,
which costs one fp32-sized vector per client of the round.

Shared-mask pruning (:class:`~splitfed.federated.aggregators.SharedMask`, passed to ``run`` per
round): every client encodes only the kept values of its delta, in the mask's layout (fewer
values, fewer ciphertexts), and the decoded average is put back in place with zeros at the pruned
positions. Selecting counts as encoding, scattering as decoding; the CKKS keys stay the same.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from splitfed.federated.aggregators import (
    AggregationError,
    Aggregator,
    CKKSAggregator,
    Layout,
    Payload,
    SecAggAggregator,
    SharedMask,
)
from splitfed.federated.aggregators import keys as keyring

#: ``train(client) -> (delta, weight)``: one client's local update, called once per client per round.
TrainFn = Callable[[str], tuple[Mapping[str, torch.Tensor], float]]
#: ``tap(round_id, client, payload, mask)``: an update payload exactly as the server received it
#: (with the round's shared mask, whose layout it is in, or ``None``).
ServerTap = Callable[[int, str, Payload, SharedMask | None], None]


@dataclass
class RoundOutcome:
    """What one aggregation round gave and cost.

    Parameters
    ----------
    average : dict[str, torch.Tensor]
        The sample-weighted average of the kept clients' deltas, as a client decodes it.
    clients : list[str]
        Clients whose updates the aggregate holds.
    bytes_up, bytes_down : int
        Payload bytes clients sent to the server / the server sent to clients in the round's
        aggregation protocol (updates, aggregate, secure aggregation's other stages).
    setup_bytes_up, setup_bytes_down : int
        Key-setup payload bytes of the round (CKKS: clients taking part for the first time).
    update_bytes : float
        Mean size of one client's update payload.
    train_s, encode_s, combine_s, decode_s : float
        Seconds in local training (all clients), in clients' encoding (masking, encryption),
        in the server's combining (and unmasking), and in decoding the aggregate.
    """

    average: dict[str, torch.Tensor]
    clients: list[str]
    bytes_up: int = 0
    bytes_down: int = 0
    setup_bytes_up: int = 0
    setup_bytes_down: int = 0
    update_bytes: float = 0.0
    train_s: float = 0.0
    encode_s: float = 0.0
    combine_s: float = 0.0
    decode_s: float = 0.0


class _Uploads(Mapping[str, Payload]):
    """A round's uploads as the server reads them: each produced on demand, never kept here.

    The server's ``combine`` reads every client's payload once, in order, and adds it before
    reading the next, so only one update exists at a time.
    """

    def __init__(self, clients: Sequence[str], upload: Callable[[str], Payload]) -> None:
        self._clients = list(clients)
        self._upload = upload
        self._served: set[str] = set()

    def __len__(self) -> int:
        return len(self._clients)

    def __iter__(self) -> Iterator[str]:
        return iter(self._clients)

    def __contains__(self, client: object) -> bool:
        return client in self._clients

    def __getitem__(self, client: str) -> Payload:
        if client not in self._clients:
            raise KeyError(client)
        if client in self._served:
            raise AggregationError(f"the server read {client!r}'s upload twice in one round")
        self._served.add(client)
        return self._upload(client)


class SimulatedAggregation(ABC):
    """The parties of one aggregator's protocol, driven round by round in one process.

    Parameters
    ----------
    make : Callable[[], Aggregator]
        A fresh aggregator with the run's settings (one per party that needs its own).
    layout : Layout
        The order every client flattens its update in (the global adapters' names and shapes).
    min_clients : int
        Fewest valid updates a round completes with.

    Attributes
    ----------
    tap : ServerTap | None
        Called with every update payload the server receives, as it receives it (before it is
        combined): where a recording of the server's view reads the clients' uploads
        (:class:`~splitfed.federated.recording.FederatedRecorder`). ``None``: nothing is tapped.
    """

    def __init__(self, make: Callable[[], Aggregator], layout: Layout, *, min_clients: int) -> None:
        self.make = make
        self.layout = layout
        self.min_clients = min_clients
        self.tap: ServerTap | None = None

    def _received(self, round_id: int, client: str, payload: Payload, mask: SharedMask | None) -> None:
        if self.tap is not None:
            self.tap(round_id, client, payload, mask)

    @abstractmethod
    def run(
        self, round_id: int, clients: Sequence[str], train: TrainFn, *, mask: SharedMask | None = None
    ) -> RoundOutcome:
        """Train every client of the round through ``train``, aggregate, decode.

        With ``mask``, only the values it keeps are encoded and aggregated; the average comes back
        in the full shapes, zero at the pruned positions.
        """

    def _round_layout(self, mask: SharedMask | None) -> Layout:
        return self.layout if mask is None else mask.layout(self.layout)


class PlainRounds(SimulatedAggregation):
    """``plain`` / ``none``: updates in the clear; the server averages them."""

    def __init__(self, make: Callable[[], Aggregator], layout: Layout, *, min_clients: int) -> None:
        super().__init__(make, layout, min_clients=min_clients)
        self.client = make()
        self.server = make()

    def _encode(self, delta: Mapping[str, torch.Tensor], weight: float, layout: Layout) -> Payload:
        return self.client.encode(delta, weight, layout=layout)

    def _decode(self, aggregate: Payload) -> dict[str, torch.Tensor]:
        return self.client.decode(aggregate)

    def _before(self, round_id: int, clients: Sequence[str], outcome: RoundOutcome) -> None:
        """Per-round setup of a subclass (key distribution)."""

    def run(
        self, round_id: int, clients: Sequence[str], train: TrainFn, *, mask: SharedMask | None = None
    ) -> RoundOutcome:
        """Stream the clients' updates into the server's sum; one client decodes the aggregate."""
        outcome = RoundOutcome({}, [])
        self._before(round_id, clients, outcome)
        layout = self._round_layout(mask)
        sizes: list[int] = []

        def upload(client: str) -> Payload:
            t = time.perf_counter()
            delta, weight = train(client)
            outcome.train_s += time.perf_counter() - t
            t = time.perf_counter()
            payload = self._encode(delta if mask is None else mask.select(delta), weight, layout)
            outcome.encode_s += time.perf_counter() - t
            sizes.append(payload.nbytes)
            self._received(round_id, client, payload, mask)
            return payload

        t = time.perf_counter()
        aggregate = self.server.combine(_Uploads(clients, upload), min_clients=self.min_clients)
        outcome.combine_s = time.perf_counter() - t - outcome.train_s - outcome.encode_s
        t = time.perf_counter()
        outcome.average = self._decode(aggregate)
        if mask is not None:
            outcome.average = mask.scatter(outcome.average)
        outcome.decode_s = time.perf_counter() - t
        outcome.clients = _clients_of(aggregate)
        outcome.bytes_up = sum(sizes)
        outcome.bytes_down = aggregate.nbytes * len(clients)
        outcome.update_bytes = sum(sizes) / max(len(sizes), 1)
        return outcome


class CKKSRounds(PlainRounds):
    """``ckks``: the dealer (the first client) creates the keys; the server holds a keyless context.

    A client receives the secret context, sealed to its X25519 key and relayed by the server, the
    first round it is sampled in (the full protocol of
    :class:`~splitfed.federated.aggregators.CKKSAggregator`, counted as setup bytes). Every client
    then holds the same secret context, so the simulation keeps one copy of it (the dealer's) to
    encrypt each client's update and decrypt the aggregate, instead of one per client.
    """

    def __init__(
        self, make: Callable[[], Aggregator], layout: Layout, *, min_clients: int, dealer: str
    ) -> None:
        super().__init__(make, layout, min_clients=min_clients)
        self.dealer_id = dealer
        self.dealer = self.client
        assert isinstance(self.dealer, CKKSAggregator) and isinstance(self.server, CKKSAggregator)
        self.dealer.create_context()
        public = self.dealer.public_context()
        self.server.load_public_context(public)
        self._pending_setup_up = public.nbytes
        self._joined = {dealer}

    def _before(self, round_id: int, clients: Sequence[str], outcome: RoundOutcome) -> None:
        outcome.setup_bytes_up, self._pending_setup_up = self._pending_setup_up, 0
        assert isinstance(self.dealer, CKKSAggregator)
        for client in clients:
            if client in self._joined:
                continue
            private = keyring.new_private_key()
            newcomer = self.make()
            assert isinstance(newcomer, CKKSAggregator)
            request = newcomer.key_request(private)  # client -> server -> dealer
            sealed = self.dealer.seal_context(request, recipient=client)  # dealer -> server -> client
            newcomer.open_context(sealed, private_key=private, recipient=client)
            if newcomer.context_id != self.dealer.context_id:
                raise AggregationError(f"ckks: {client!r} opened another context than the dealer's")
            outcome.setup_bytes_up += request.nbytes + sealed.nbytes
            outcome.setup_bytes_down += request.nbytes + sealed.nbytes
            self._joined.add(client)


class SecAggRounds(SimulatedAggregation):
    """``secagg``: the four stages of secure aggregation with fresh keys every round."""

    def run(
        self, round_id: int, clients: Sequence[str], train: TrainFn, *, mask: SharedMask | None = None
    ) -> RoundOutcome:
        """Advertise, share keys, train and mask, unmask; the first surviving client decodes."""
        layout = self._round_layout(mask)
        agg = self.make()
        assert isinstance(agg, SecAggAggregator)
        outcome = RoundOutcome({}, [])
        t = time.perf_counter()
        sessions = {c: agg.client(c, round_id=round_id) for c in clients}
        server = agg.server(round_id=round_id)
        advertised = {c: s.advertise() for c, s in sessions.items()}
        roster = server.roster(advertised)
        shares = {c: sessions[c].share_keys(roster) for c in server.clients}
        routed = server.route_shares(shares)
        for client, payload in routed.items():
            sessions[client].receive_shares(payload)
        outcome.encode_s += time.perf_counter() - t
        masked: dict[str, Payload] = {}
        for client in routed:
            t = time.perf_counter()
            delta, weight = train(client)
            outcome.train_s += time.perf_counter() - t
            t = time.perf_counter()
            if mask is not None:
                delta = mask.select(delta)
            masked[client] = sessions[client].encode(delta, weight, layout=layout)
            outcome.encode_s += time.perf_counter() - t
            self._received(round_id, client, masked[client], mask)
            del delta
        t = time.perf_counter()
        request = server.collect(masked)
        outcome.combine_s += time.perf_counter() - t
        t = time.perf_counter()
        reveals = {c: sessions[c].reveal(request) for c in server.survivors}
        outcome.encode_s += time.perf_counter() - t
        t = time.perf_counter()
        aggregate = server.unmask(reveals)
        outcome.combine_s += time.perf_counter() - t
        t = time.perf_counter()
        outcome.average = sessions[server.survivors[0]].decode(aggregate)
        if mask is not None:
            outcome.average = mask.scatter(outcome.average)
        outcome.decode_s = time.perf_counter() - t
        outcome.clients = _clients_of(aggregate)
        n = len(clients)
        outcome.bytes_up = sum(
            p.nbytes for group in (advertised, shares, masked, reveals) for p in group.values()
        )
        outcome.bytes_down = (roster.nbytes + request.nbytes + aggregate.nbytes) * n + sum(
            p.nbytes for p in routed.values()
        )
        outcome.update_bytes = sum(p.nbytes for p in masked.values()) / max(len(masked), 1)
        return outcome


def _clients_of(aggregate: Payload) -> list[str]:
    return list(json.loads(str(aggregate.meta["clients"])))


def simulated_aggregation(
    make: Callable[[], Aggregator], layout: Layout, *, min_clients: int, dealer: str
) -> SimulatedAggregation:
    """The in-process protocol driver for the aggregator ``make()`` builds (``dealer``: CKKS's key maker)."""
    probe = make()
    if isinstance(probe, CKKSAggregator):
        return CKKSRounds(make, layout, min_clients=min_clients, dealer=dealer)
    if isinstance(probe, SecAggAggregator):
        return SecAggRounds(make, layout, min_clients=min_clients)
    return PlainRounds(make, layout, min_clients=min_clients)
