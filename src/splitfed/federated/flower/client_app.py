"""The Flower ``ClientApp`` of federated LoRA: the same client update, encryption and decoding as
``splitfed fedtrain``, one Flower message at a time.

A SuperNode runs a fresh ``ClientApp`` process for every message, so what a client keeps between
messages lives in its Flower ``context.state``, which stays on the SuperNode (it never reaches the
SuperLink): the global adapters (``splitfed.global``), its X25519 key and, under ``ckks``, the
secret CKKS context (``splitfed.keys``).

Node configuration (``flower-supernode --node-config``):

* ``partition-id`` (required): which of the run's ``federated.clients`` partitions this node
  trains on, as :class:`~splitfed.federated.simulation.FederatedSimulation` cuts them (Flower's
  simulation engine sets it, with ``num-partitions``);
* ``output-dir`` (optional): where the node writes the final global adapters
  (``<output-dir>/global/adapter.safetensors``) when the server asks it to evaluate.

Run configuration (``flwr run --run-config``): ``config``, the path of the run's YAML (the same
file as for ``splitfed fedtrain``; every node reads it, so it must exist on every machine).

Message types, in the order :mod:`~splitfed.federated.flower.server_app` sends them: ``query.init``;
(``ckks``) ``query.ckks_dealer`` or ``query.ckks_join``, ``query.ckks_seal``, ``query.ckks_open``;
then per round ``train`` and ``query.apply``; at the end ``evaluate``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from splitfed.config import RunConfig, load_config
from splitfed.federated.aggregators import AGGREGATORS, Aggregator, CKKSAggregator, SecAggAggregator
from splitfed.federated.aggregators import keys as keyring
from splitfed.federated.aggregators.secagg import SecAggClient
from splitfed.federated.flower.records import (
    FlowerProtocolError,
    digest,
    get_payload,
    get_tensors,
    put_payload,
    put_tensors,
)

__all__ = ["app"]

app = ClientApp()

#: Keys of this client's local state (``context.state``).
GLOBAL = "splitfed.global"
KEYS = "splitfed.keys"
SECAGG = "splitfed.secagg"


def _quiet(_: str) -> None:
    pass


def run_settings(context: Context) -> tuple[RunConfig, int]:
    """The run's configuration and this node's partition, from the run and node configs."""
    path = context.run_config.get("config")
    if not isinstance(path, str) or not path:
        raise FlowerProtocolError(
            "the run configuration has no `config` (the path of the run's YAML); start the run with "
            "flwr run APP --run-config 'config=\"/path/to/run.yaml\"'"
        )
    cfg = load_config(path)
    if cfg.federated is None:
        raise FlowerProtocolError(f"{path} has no federated: section")
    raw = context.node_config.get("partition-id")
    if isinstance(raw, bool) or not isinstance(raw, (int, str)) or not str(raw).isdigit():
        raise FlowerProtocolError(
            "this SuperNode has no partition-id; start it with --node-config 'partition-id=0 ...'"
        )
    partition = int(raw)
    if partition >= cfg.federated.clients:
        raise FlowerProtocolError(
            f"partition-id {partition} is outside the run's federated.clients={cfg.federated.clients}"
        )
    return cfg, partition


def _aggregator(cfg: RunConfig, context: Context | None = None) -> Aggregator:
    """The run's aggregator; under ``ckks`` with this client's stored secret context loaded."""
    fed = cfg.federated
    assert fed is not None
    kwargs = fed.aggregator_kwargs()
    if fed.aggregation == "secagg" and "max_weight" not in kwargs and context is not None:
        # as in the simulation: the largest client's examples (every client computes the same)
        stored = context.state.get(KEYS)
        if isinstance(stored, ConfigRecord) and isinstance(stored.get("max_weight"), float):
            kwargs["max_weight"] = stored["max_weight"]
    aggregator = AGGREGATORS[fed.aggregation](**kwargs)
    if isinstance(aggregator, CKKSAggregator) and context is not None:
        keys = context.state.get(KEYS)
        secret = keys.get("ckks_secret") if isinstance(keys, ConfigRecord) else None
        if not isinstance(keys, ConfigRecord) or not isinstance(secret, bytes):
            raise FlowerProtocolError(
                "ckks: this client holds no secret context yet (the key setup did not reach it)"
            )
        aggregator.load_secret(secret, context_id=str(keys["ckks_context_id"]))
    return aggregator


def _simulation(cfg: RunConfig) -> Any:
    from splitfed.federated.simulation import FederatedSimulation
    from splitfed.run import prepare

    return FederatedSimulation(prepare(cfg, _quiet), _quiet)


def _stored_global(context: Context) -> dict[str, Any]:
    if GLOBAL not in context.state:
        raise FlowerProtocolError("this client holds no global adapters yet (query.init did not reach it)")
    return get_tensors(context.state, GLOBAL)


def _keys(context: Context) -> ConfigRecord:
    record = context.state.get(KEYS)
    if not isinstance(record, ConfigRecord):
        record = ConfigRecord()
        context.state[KEYS] = record
    return record


def _reply(msg: Message, **records: Any) -> Message:
    return Message(RecordDict(records), reply_to=msg)


@app.query("init")
def init(msg: Message, context: Context) -> Message:
    """Say which partition this node trains; build the run's initial global adapters (from the
    run's seed) and keep them."""
    cfg, partition = run_settings(context)
    sim = _simulation(cfg)
    put_tensors(context.state, GLOBAL, sim.global_state)
    max_weight = float(max(len(part) for part in sim.parts))
    _keys(context)["max_weight"] = max_weight
    content = RecordDict(
        {
            "info": ConfigRecord(
                {"partition": partition, "digest": digest(sim.global_state), "max_weight": max_weight}
            )
        }
    )
    if cfg.federated.aggregation != "ckks":  # type: ignore[union-attr]
        # the server applies the strategy itself when it can read the aggregate
        put_tensors(content, "global", sim.global_state)
    return Message(content, reply_to=msg)


@app.query("ckks_dealer")
def ckks_dealer(msg: Message, context: Context) -> Message:
    """Dealer: create the CKKS keys, keep the secret context, send the server the keyless one."""
    cfg, _ = run_settings(context)
    aggregator = _aggregator(cfg)
    assert isinstance(aggregator, CKKSAggregator)
    aggregator.create_context()
    keys = _keys(context)
    keys["ckks_secret"] = aggregator.export_secret()
    keys["ckks_context_id"] = aggregator.context_id
    content = RecordDict()
    put_payload(content, "public_context", aggregator.public_context())
    return Message(content, reply_to=msg)


@app.query("ckks_join")
def ckks_join(msg: Message, context: Context) -> Message:
    """Newcomer: a fresh X25519 key; its public half goes to the dealer through the server."""
    cfg, _ = run_settings(context)
    aggregator = _aggregator(cfg)
    assert isinstance(aggregator, CKKSAggregator)
    private = keyring.new_private_key()
    _keys(context)["x25519"] = keyring.private_bytes(private)
    content = RecordDict()
    put_payload(content, "request", aggregator.key_request(private))
    return Message(content, reply_to=msg)


@app.query("ckks_seal")
def ckks_seal(msg: Message, context: Context) -> Message:
    """Dealer: the secret context sealed to each newcomer's public key (the server cannot open them)."""
    cfg, _ = run_settings(context)
    aggregator = _aggregator(cfg, context)
    assert isinstance(aggregator, CKKSAggregator)
    info = msg.content.get("info")
    recipients = info.get("recipients") if isinstance(info, ConfigRecord) else None
    if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
        raise FlowerProtocolError("query.ckks_seal needs info.recipients (client names)")
    content = RecordDict()
    for name in recipients:
        recipient = str(name)
        request = get_payload(msg.content, f"request.{recipient}", sender="the server")
        put_payload(content, f"sealed.{recipient}", aggregator.seal_context(request, recipient=recipient))
    return Message(content, reply_to=msg)


@app.query("ckks_open")
def ckks_open(msg: Message, context: Context) -> Message:
    """Newcomer: open the sealed secret context with the key of ``ckks_join`` and keep it."""
    cfg, partition = run_settings(context)
    aggregator = _aggregator(cfg)
    assert isinstance(aggregator, CKKSAggregator)
    keys = _keys(context)
    private = keys.get("x25519")
    if not isinstance(private, bytes):
        raise FlowerProtocolError("ckks: query.ckks_open before query.ckks_join")
    aggregator.open_context(
        get_payload(msg.content, "sealed", sender="the server"),
        private_key=keyring.load_private(private),
        recipient=client_name(partition),
    )
    keys["ckks_secret"] = aggregator.export_secret()
    keys["ckks_context_id"] = aggregator.context_id
    return _reply(msg, info=ConfigRecord({"context_id": aggregator.context_id}))


def client_name(partition: int) -> str:
    """The name a client goes by in the aggregation protocol (as in the simulation)."""
    return f"client-{partition}"


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round's local update from the stored global adapters, encoded by the run's aggregator."""
    cfg, partition = run_settings(context)
    round_id = _round_of(msg, "train")
    info = msg.content.get("info")
    expected = info.get("digest") if isinstance(info, ConfigRecord) else None
    aggregator = _aggregator(cfg, context)
    if isinstance(aggregator, SecAggAggregator):
        # the peers' shares for this client, routed by the server: checked before any training
        session = _secagg_session(aggregator, context, round_id)
        session.receive_shares(get_payload(msg.content, "shares", sender="the server"))
        _keep_session(context, session)
    sim = _simulation(cfg)
    stored = _stored_global(context)
    if isinstance(expected, str) and digest(stored) != expected:
        raise FlowerProtocolError(
            f"this client's global adapters ({digest(stored)}) are not the server's ({expected}); it "
            "missed an update"
        )
    sim.global_state = {n: stored[n].float() for n in sim.global_state}
    t = time.perf_counter()
    result = sim.client_update(round_id, partition, sim.strategy.configure_fit(round_id, sim.base_fit))
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    if isinstance(aggregator, SecAggAggregator):
        session = _secagg_session(aggregator, context, round_id)
        payload = session.encode(result.delta, result.weight, layout=sim.layout)
        _keep_session(context, session)
    else:
        payload = aggregator.encode(result.delta, result.weight, layout=sim.layout)
    encode_s = time.perf_counter() - t
    content = RecordDict()
    put_payload(content, "update", payload)
    metrics = {
        "loss": result.update.loss,
        "num_examples": result.update.num_examples,
        "steps": result.update.steps,
        "train_s": train_s,
        "encode_s": encode_s,
    }
    if result.norm is not None:
        metrics["norm"] = result.norm
    content["metrics"] = MetricRecord(metrics)
    return Message(content, reply_to=msg)


def _round_of(msg: Message, what: str) -> int:
    info = msg.content.get("info")
    round_id = info.get("round") if isinstance(info, ConfigRecord) else None
    if isinstance(round_id, bool) or not isinstance(round_id, int) or round_id < 1:
        raise FlowerProtocolError(f"{what} needs info.round (a positive int)")
    return round_id


def _secagg_session(aggregator: SecAggAggregator, context: Context, round_id: int) -> SecAggClient:
    record = context.state.get(SECAGG)
    if not isinstance(record, ConfigRecord):
        raise FlowerProtocolError(
            f"secagg: no session for round {round_id} (query.secagg_advertise did not reach this client)"
        )
    session = SecAggClient.from_state(aggregator, dict(record))
    if session.round_id != round_id:
        raise FlowerProtocolError(
            f"secagg: this client's session is for round {session.round_id}, the message for round {round_id}"
        )
    return session


def _keep_session(context: Context, session: SecAggClient) -> None:
    context.state[SECAGG] = ConfigRecord(session.export_state())  # type: ignore[arg-type]


@app.query("secagg_advertise")
def secagg_advertise(msg: Message, context: Context) -> Message:
    """Secure aggregation, stage 1: this round's fresh keys and self-mask commitment."""
    cfg, partition = run_settings(context)
    aggregator = _aggregator(cfg, context)
    assert isinstance(aggregator, SecAggAggregator)
    session = aggregator.client(client_name(partition), round_id=_round_of(msg, "query.secagg_advertise"))
    _keep_session(context, session)
    content = RecordDict()
    put_payload(content, "advertise", session.advertise())
    return Message(content, reply_to=msg)


def _secagg_stage(
    msg: Message,
    context: Context,
    stage: str,
    received: str,
    sent: str,
    step: Callable[[SecAggClient, Any], Any],
) -> Message:
    """One later stage of this round's secagg session: restore it, ``step`` it with the payload
    ``received`` from the server, keep it, reply with what ``step`` gave under ``sent``."""
    cfg, _ = run_settings(context)
    aggregator = _aggregator(cfg, context)
    assert isinstance(aggregator, SecAggAggregator)
    session = _secagg_session(aggregator, context, _round_of(msg, stage))
    payload = step(session, get_payload(msg.content, received, sender="the server"))
    _keep_session(context, session)
    content = RecordDict()
    put_payload(content, sent, payload)
    return Message(content, reply_to=msg)


@app.query("secagg_share")
def secagg_share(msg: Message, context: Context) -> Message:
    """Stage 2: check the roster; shares of this round's mask key and seed, encrypted per peer."""
    return _secagg_stage(msg, context, "query.secagg_share", "roster", "shares", SecAggClient.share_keys)


@app.query("secagg_reveal")
def secagg_reveal(msg: Message, context: Context) -> Message:
    """Stage 4: the shares that let the server remove the masks, never both kinds for one client."""
    return _secagg_stage(msg, context, "query.secagg_reveal", "request", "reveal", SecAggClient.reveal)


@app.query("apply")
def apply(msg: Message, context: Context) -> Message:
    """Take the round's new global adapters: sent by the server, or (``ckks``) decoded here from the
    encrypted aggregate and stepped by the (stateless) strategy, as every client does alike."""
    from splitfed.federated.strategies import STRATEGIES

    cfg, _ = run_settings(context)
    fed = cfg.federated
    assert fed is not None
    stored = _stored_global(context)
    round_id = _round_of(msg, "query.apply")
    t = time.perf_counter()
    if "global" in msg.content:
        new = get_tensors(msg.content, "global", like=stored, sender="the server")
    else:
        aggregator = _aggregator(cfg, context)
        average = aggregator.decode(get_payload(msg.content, "aggregate", sender="the server"))
        strategy = STRATEGIES[fed.strategy](**fed.strategy_kwargs())  # type: ignore[arg-type]
        if strategy.server_state:
            raise FlowerProtocolError(f"strategy {fed.strategy} keeps server state; the server applies it")
        new = strategy.apply(stored, average, round_id)
    put_tensors(context.state, GLOBAL, new)
    return _reply(
        msg,
        info=ConfigRecord({"digest": digest(new)}),
        metrics=MetricRecord({"decode_s": time.perf_counter() - t}),
    )


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The global model's metrics on the run's evaluation split (unless ``info.score`` is false);
    writes its adapters to the node's ``output-dir`` if it has one."""
    from splitfed.run import write_adapter

    cfg, _ = run_settings(context)
    sim = _simulation(cfg)
    stored = _stored_global(context)
    sim.global_state = {n: stored[n].float() for n in sim.global_state}
    info = msg.content.get("info")
    score = info.get("score", True) if isinstance(info, ConfigRecord) else True
    metrics = sim.evaluate(None, "eval", final=True) if score else {}
    out = context.node_config.get("output-dir")
    if isinstance(out, str) and out:
        fed = cfg.federated
        assert fed is not None
        write_adapter(
            sim.adapters(),
            Path(out) / "global",
            ("model",),
            strategy=fed.strategy,
            aggregation=fed.aggregation,
        )
    return _reply(msg, metrics=MetricRecord(metrics), info=ConfigRecord({"digest": digest(stored)}))
