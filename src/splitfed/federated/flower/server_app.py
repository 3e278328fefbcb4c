"""The Flower ``ServerApp`` of federated LoRA: the rounds of ``splitfed fedtrain`` over a Flower grid.

The server runs the same protocol as the in-process simulation
(:mod:`splitfed.federated.rounds`), with Flower messages instead of function calls:

1. ``query.init``: the server waits for ``federated.clients`` SuperNodes; each says which
   partition it trains (distinct, covering every partition) and builds the initial global
   adapters from the run's seed; their fingerprints must agree.
2. ``ckks`` only: the node of partition 0 deals the keys (``query.ckks_dealer``) and sends the
   server a context without any key, while every other node makes an X25519 key and sends its
   public half (``query.ckks_join``); the dealer seals the secret context to each of them
   (``query.ckks_seal``) and the server relays the sealed bytes it cannot open
   (``query.ckks_open``).
3. Each round: the sampled clients train and send their encoded updates (``train``); the server
   validates each by the aggregator's schema and adds them with
   :meth:`Aggregator.combine <splitfed.federated.aggregators.Aggregator.combine>` (a client whose
   reply is missing or invalid is left out, and the round completes with ``federated.min_clients``);
   then ``query.apply`` to every node: the new global adapters (``plain``, which the server can
   read, and where the strategy may keep server state) or the encrypted aggregate, which each
   client decrypts and steps alike (``ckks``). Their fingerprints must agree. Under ``secagg`` a
   round has four stages instead of one upload (``query.secagg_advertise``,
   ``query.secagg_share``, ``train`` with the routed shares, ``query.secagg_reveal``) and the
   server unmasks only the sum.
4. ``evaluate``: the node of partition 0 evaluates the final global model on the run's
   evaluation split, every node writes it to its ``output-dir``; the server writes
   ``results.json`` to ``output_dir``. (``eval_every``, ``checkpoint_every`` and ``--resume`` are
   ``fedtrain``'s; the Flower app evaluates once, at the end.)

Run configuration: ``config`` (path of the run's YAML, required) and ``timeout`` (seconds a stage
waits for its replies, default 600).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from splitfed.config import ConfigError, RunConfig, load_config
from splitfed.federated.aggregators import (
    AGGREGATORS,
    AggregationError,
    Aggregator,
    CKKSAggregator,
    Payload,
    SecAggAggregator,
)
from splitfed.federated.flower.client_app import client_name
from splitfed.federated.flower.records import (
    FlowerProtocolError,
    get_payload,
    get_tensors,
    put_payload,
    put_tensors,
)
from splitfed.federated.simulation import sample_clients
from splitfed.federated.strategies import STRATEGIES

__all__ = ["FlowerServer", "app"]

app = ServerApp()


class FlowerServer:
    """One federated run driven over a Flower :class:`~flwr.serverapp.Grid`.

    Parameters
    ----------
    grid : Grid
    cfg : RunConfig
        The run (its ``federated:`` section); ``secagg`` is not available on Flower yet.
    timeout : float, default 600
        Seconds each stage waits for its replies.
    log : Callable[[str], None], default print
    """

    def __init__(
        self, grid: Grid, cfg: RunConfig, *, timeout: float = 600.0, log: Callable[[str], None] = print
    ) -> None:
        fed = cfg.federated
        if fed is None:
            raise ConfigError("the configuration has no federated: section")
        if fed.dp is not None:
            raise ConfigError("federated.dp runs in `splitfed fedtrain` but not yet on Flower")
        if fed.pruning is not None:
            raise ConfigError(
                "federated.pruning runs in `splitfed fedtrain`, not yet on Flower; remove it to run there"
            )
        self.grid, self.cfg, self.fed, self.timeout, self.log = grid, cfg, fed, timeout, log
        self.aggregator: Aggregator = AGGREGATORS[fed.aggregation](**fed.aggregator_kwargs())
        self.nodes: dict[int, int] = {}  # partition -> node id
        self.global_state: dict[str, torch.Tensor] | None = None  # plain only: the server may read it
        self.digest = ""
        self.history: list[dict[str, Any]] = []
        #: Applied here when the server can read the aggregate; under ckks by every client alike.
        self.strategy = STRATEGIES[fed.strategy](**fed.strategy_kwargs())  # type: ignore[arg-type]

    # ------------------------------------------------------------------ messaging

    def _ask(
        self,
        requests: Mapping[int, RecordDict],
        message_type: str | Mapping[int, str],
        *,
        required: bool = True,
    ) -> dict[int, Message]:
        """Send one message per partition (all at once) and collect the replies that came without error.

        ``message_type`` is one type for all, or one per partition. With ``required``, any missing
        or failed reply raises :class:`AggregationError`.
        """
        types = {p: message_type if isinstance(message_type, str) else message_type[p] for p in requests}
        messages = [
            Message(content, dst_node_id=self.nodes[p], message_type=types[p])
            for p, content in requests.items()
        ]
        stage = message_type if isinstance(message_type, str) else "/".join(sorted(set(types.values())))
        by_node = {self.nodes[p]: p for p in requests}
        replies: dict[int, Message] = {}
        failures: dict[int, str] = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
            partition = by_node.get(reply.metadata.src_node_id)
            if partition is None:
                continue
            if reply.has_error():
                failures[partition] = f"{reply.error.code}: {reply.error.reason}"
            else:
                replies[partition] = reply
        for p in requests:
            if p not in replies and p not in failures:
                failures[p] = f"no reply within {self.timeout:g} s"
        for p, reason in failures.items():
            self.log(f"{stage}: {client_name(p)} failed ({reason})")
        if required and failures:
            raise AggregationError(
                f"{stage}: {len(failures)} of {len(requests)} clients failed: "
                + "; ".join(f"{client_name(p)}: {r}" for p, r in sorted(failures.items()))
            )
        return replies

    def _info(self, reply: Message, key: str, kind: type, *, partition: int) -> Any:
        record = reply.content.get("info")
        value = record.get(key) if isinstance(record, ConfigRecord) else None
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise FlowerProtocolError(f"{client_name(partition)}'s reply lacks info.{key} ({kind.__name__})")
        return value

    def _agree(self, replies: Mapping[int, Message], stage: str) -> str:
        digests = {p: self._info(r, "digest", str, partition=p) for p, r in replies.items()}
        if len(set(digests.values())) != 1:
            raise AggregationError(f"{stage}: the clients hold different global adapters ({digests})")
        return next(iter(digests.values()))

    # ------------------------------------------------------------------ stages

    def connect(self) -> None:
        """Wait for the nodes; each builds the initial adapters and says which partition it trains."""
        fed = self.fed
        deadline = time.monotonic() + self.timeout
        self.log(f"waiting for {fed.clients} SuperNodes ...")
        while True:
            node_ids = sorted(self.grid.get_node_ids())
            if len(node_ids) >= fed.clients or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if len(node_ids) < fed.clients:
            raise AggregationError(
                f"{len(node_ids)} SuperNodes connected within {self.timeout:g} s; the run needs "
                f"federated.clients={fed.clients}"
            )
        self.nodes = dict(enumerate(node_ids))  # provisional, until the nodes name their partitions
        replies = self._ask({i: RecordDict() for i in self.nodes}, "query.init", required=False)
        by_partition: dict[int, Message] = {}
        nodes: dict[int, int] = {}
        for i, reply in replies.items():
            p = self._info(reply, "partition", int, partition=i)
            if p in nodes:
                raise AggregationError(f"two SuperNodes both train partition-id {p}; give each its own")
            nodes[p], by_partition[p] = self.nodes[i], reply
        missing = sorted(set(range(fed.clients)) - set(nodes))
        if missing:
            raise AggregationError(
                f"no SuperNode trains partition-id {missing[:5]}; start one per partition 0..{fed.clients - 1}"
            )
        self.nodes = {p: nodes[p] for p in range(fed.clients)}
        self.digest = self._agree({p: by_partition[p] for p in self.nodes}, "query.init")
        if not isinstance(self.aggregator, CKKSAggregator):
            self.global_state = get_tensors(by_partition[0].content, "global", sender=client_name(0))
        if isinstance(self.aggregator, SecAggAggregator) and "max_weight" not in fed.aggregator_kwargs():
            # as in the simulation: the largest client's examples, which every client computed alike
            weights = {self._info(by_partition[p], "max_weight", float, partition=p) for p in self.nodes}
            if len(weights) != 1:
                raise AggregationError(
                    f"secagg: the clients disagree on the largest client's size ({weights})"
                )
            self.aggregator = SecAggAggregator(**fed.aggregator_kwargs(), max_weight=weights.pop())
        self.log(f"{fed.clients} clients connected; initial adapters {self.digest}")

    def deal_keys(self) -> None:
        """``ckks``: partition 0 deals the keys; the others' secret contexts are sealed to their own
        X25519 keys and relayed through this server, which ends up holding no key at all."""
        if not isinstance(self.aggregator, CKKSAggregator):
            return
        others = [p for p in self.nodes if p != 0]
        first = self._ask(
            {p: RecordDict() for p in self.nodes},
            {p: "query.ckks_join" if p else "query.ckks_dealer" for p in self.nodes},
        )
        self.aggregator.load_public_context(
            get_payload(first[0].content, "public_context", sender="the dealer")
        )
        assert not self.aggregator.holds_secret_key
        if not others:
            return
        seal = RecordDict({"info": ConfigRecord({"recipients": [client_name(p) for p in others]})})
        for p in others:
            request = get_payload(first[p].content, "request", sender=client_name(p))
            self.aggregator.validate(request, sender=client_name(p))
            put_payload(seal, f"request.{client_name(p)}", request)
        sealed = self._ask({0: seal}, "query.ckks_seal")[0]
        relays: dict[int, RecordDict] = {}
        for p in others:
            relay = RecordDict()
            put_payload(
                relay, "sealed", get_payload(sealed.content, f"sealed.{client_name(p)}", sender="the dealer")
            )
            relays[p] = relay
        opened = self._ask(relays, "query.ckks_open")
        ids = {self._info(r, "context_id", str, partition=p) for p, r in opened.items()}
        if ids != {self.aggregator.context_id}:
            raise AggregationError(f"ckks: clients opened other contexts ({ids}) than the dealer's")
        self.log(
            f"ckks keys dealt by {client_name(0)} to {len(others)} clients; the server holds no secret key"
        )

    def _train_info(self, round_id: int) -> RecordDict:
        return RecordDict({"info": ConfigRecord({"round": round_id, "digest": self.digest})})

    def _updates(
        self, round_id: int, replies: Mapping[int, Message], key: str
    ) -> tuple[dict[str, Payload], dict[str, Mapping[str, Any]]]:
        """The payloads under ``key`` of the replies that carry one, and the clients' metrics."""
        payloads: dict[str, Payload] = {}
        metrics: dict[str, Mapping[str, Any]] = {}
        for p, reply in replies.items():
            try:
                payloads[client_name(p)] = get_payload(reply.content, key, sender=client_name(p))
            except FlowerProtocolError as err:
                self.log(f"round {round_id}: {client_name(p)}'s reply left out ({err})")
                continue
            reported = reply.content.get("metrics")
            metrics[client_name(p)] = dict(reported) if isinstance(reported, MetricRecord) else {}
        return payloads, metrics

    def _exchange(
        self, round_id: int, sampled: list[int]
    ) -> tuple[Payload, dict[str, Payload], dict[str, Mapping[str, Any]], float]:
        """``plain``/``ckks``: the sampled clients train and upload; the server adds what validates."""
        replies = self._ask({p: self._train_info(round_id) for p in sampled}, "train", required=False)
        payloads, metrics = self._updates(round_id, replies, "update")
        t = time.perf_counter()
        aggregate = self.aggregator.combine(payloads, min_clients=self.fed.min_clients)
        return aggregate, payloads, metrics, time.perf_counter() - t

    def _secagg_exchange(
        self, round_id: int, sampled: list[int]
    ) -> tuple[Payload, dict[str, Payload], dict[str, Mapping[str, Any]], float]:
        """``secagg``: advertise keys, share them, train and mask, reveal; the server learns the sum.

        A client that fails or sends something invalid at any stage is left out (its reason
        logged); once it has shared keys its masks are removed with the survivors' shares.
        """
        assert isinstance(self.aggregator, SecAggAggregator)
        server = self.aggregator.server(round_id=round_id)
        part = {client_name(p): p for p in sampled}
        info = RecordDict({"info": ConfigRecord({"round": round_id})})
        replies = self._ask({p: info for p in sampled}, "query.secagg_advertise", required=False)
        advertised, _ = self._updates(round_id, replies, "advertise")
        roster = server.roster(advertised)
        ask = RecordDict({"info": ConfigRecord({"round": round_id})})
        put_payload(ask, "roster", roster)
        replies = self._ask({part[c]: ask for c in server.clients}, "query.secagg_share", required=False)
        shares, _ = self._updates(round_id, replies, "shares")
        routed = server.route_shares(shares)
        train: dict[int, RecordDict] = {}
        for client, payload in routed.items():
            content = self._train_info(round_id)
            put_payload(content, "shares", payload)
            train[part[client]] = content
        replies = self._ask(train, "train", required=False)
        payloads, metrics = self._updates(round_id, replies, "update")
        t = time.perf_counter()
        request = server.collect(payloads)
        combine_s = time.perf_counter() - t
        ask = RecordDict({"info": ConfigRecord({"round": round_id})})
        put_payload(ask, "request", request)
        replies = self._ask({part[c]: ask for c in server.survivors}, "query.secagg_reveal", required=False)
        reveals, _ = self._updates(round_id, replies, "reveal")
        t = time.perf_counter()
        aggregate = server.unmask(reveals)
        for client, reason in server.rejected.items():
            self.log(f"round {round_id}: secagg left {client} out ({reason})")
        return aggregate, payloads, metrics, combine_s + time.perf_counter() - t

    def run_round(self, round_id: int) -> dict[str, Any]:
        """Train, aggregate and apply one round; returns its history record."""
        fed, t_round = self.fed, time.perf_counter()
        sampled = sample_clients(
            fed.clients, fed.clients_per_round, seed=self.cfg.train.seed, round_id=round_id
        )
        exchange = self._secagg_exchange if isinstance(self.aggregator, SecAggAggregator) else self._exchange
        aggregate, payloads, metrics, combine_s = exchange(round_id, sampled)
        kept = list(json.loads(str(aggregate.meta["clients"])))
        for client, reason in json.loads(str(aggregate.meta["rejected"])).items():
            self.log(f"round {round_id}: {client}'s update rejected ({reason})")
        apply = RecordDict({"info": ConfigRecord({"round": round_id})})
        if self.global_state is not None:
            average = self.aggregator.decode(aggregate)
            self.global_state = self.strategy.apply(self.global_state, average, round_id)
            put_tensors(apply, "global", self.global_state)
        else:
            put_payload(apply, "aggregate", aggregate)
        applied = self._ask({p: apply for p in self.nodes}, "query.apply")
        self.digest = self._agree(applied, f"round {round_id} query.apply")
        weights = [float(metrics[c].get("num_examples", 0)) for c in kept]
        up = sum(payloads[c].nbytes for c in kept)
        record: dict[str, Any] = {
            "round": round_id,
            "train_loss": float(
                np.average([float(metrics[c].get("loss", 0.0)) for c in kept], weights=weights)
            ),
            "clients": len(kept),
            "sampled": sampled,
            "local_steps": int(sum(float(metrics[c].get("steps", 0)) for c in kept)),
            "seconds": time.perf_counter() - t_round,
            "train_s": float(sum(float(metrics[c].get("train_s", 0.0)) for c in kept)),
            "encode_s": float(sum(float(metrics[c].get("encode_s", 0.0)) for c in kept)),
            "combine_s": combine_s,
            "bytes_up": up,
            "bytes_down": aggregate.nbytes * len(self.nodes)
            if self.global_state is None
            else sum(4 * t.numel() for t in self.global_state.values()) * len(self.nodes),
            "update_bytes": up / max(1, len(kept)),
            "digest": self.digest,
        }
        self.log(
            f"round {round_id}/{fed.rounds}: loss {record['train_loss']:.4f}, {len(kept)} clients, "
            f"{record['update_bytes'] / 1e6:.2f} MB per update ({fed.aggregation}), {record['seconds']:.1f} s"
        )
        return record

    def finish(self) -> dict[str, Any]:
        """Client 0 evaluates the final model, every client saves it; ``results.json`` on the server."""
        from splitfed.run import write_results

        # the evaluation split is the same for all: one client scores it, every client saves
        replies = self._ask(
            {p: RecordDict({"info": ConfigRecord({"score": p == 0})}) for p in self.nodes}, "evaluate"
        )
        self._agree(replies, "evaluate")
        reported = replies[0].content.get("metrics")
        if not isinstance(reported, MetricRecord):
            raise FlowerProtocolError(f"{client_name(0)}'s evaluation reply carries no metrics")
        metrics = {k: float(v) for k, v in reported.items() if isinstance(v, (int, float))}
        out = Path(self.cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        summary = {
            "config": self.cfg.model_dump(mode="json"),
            "runtime": "flower",
            "metrics_after": metrics,
            "rounds": self.fed.rounds,
            "clients": self.fed.clients,
            "aggregation": {"name": self.fed.aggregation},
            "digest": self.digest,
            "history": self.history,
        }
        write_results(out, summary)
        self.log(
            f"{self.cfg.data.eval_split} after federated fine-tuning on Flower: "
            + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        )
        return summary

    def run(self) -> dict[str, Any]:
        """All stages, in order."""
        self.connect()
        self.deal_keys()
        for round_id in range(1, self.fed.rounds + 1):
            self.history.append(self.run_round(round_id))
        return self.finish()


def _settings(context: Context) -> tuple[RunConfig, float]:
    path = context.run_config.get("config")
    if not isinstance(path, str) or not path:
        raise ConfigError(
            "the run configuration has no `config`; start the run with "
            "flwr run APP --run-config 'config=\"/path/to/run.yaml\"'"
        )
    timeout = context.run_config.get("timeout", 600.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ConfigError(f"run config timeout must be a positive number of seconds, got {timeout!r}")
    return load_config(path), float(timeout)


def _flush(text: str) -> None:
    print(text, flush=True)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The ServerApp's entry point: one federated run over the grid's SuperNodes."""
    cfg, timeout = _settings(context)
    FlowerServer(grid, cfg, timeout=timeout, log=_flush).run()
