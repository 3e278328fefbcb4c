"""Cost of blind aggregation in one federated round of smollm2-135m, against FedShield-LLM's scheme.

smollm2-135m, causal LM on ``shakespeare``, LoRA r=8 on q/v, 4 clients (IID), one round of 5
local steps of batch 8 x 64 tokens each: the clients train for real, through the federated
client's :func:`~splitfed.federated.client.local_update` on the simulation's one model, and the
same deltas then go through every aggregation scheme, driven by :mod:`splitfed.federated.rounds`
(the clients, the dealer and a keyless server passing only payloads):

* ``plain``: the fp32 reference (what the server would see in the clear);
* ``ckks``: packed CKKS, default parameters (N = 8192, primes 60/40/60, scale 2**50);
* ``ckks shared 50%``: the same, only the coordinates a :class:`SharedMask` from the global model
  keeps at 50 % are encrypted (selection counted in encryption, scattering in decryption);
* ``secagg``: pairwise-mask secure aggregation over a 32-bit ring, all four stages;
* ``fedshield``: FedShield-LLM's scheme (Mia et al., 2025) built here as the baseline: one
  CKKSVector per tensor of the full update (zeros included), N = 8192, primes 60/40/40/60,
  scale 2**40; the server adds the vectors and multiplies them by 1 / clients.

Per scheme and round: local training time (once, shared by all), encryption / encoding, server
combine, decryption / decoding (seconds, all clients together), bytes per client (the update
payload, and for secagg every stage it uploads), and the largest error of the decoded average.

    python benchmarks/fed_aggregation.py            # 4 clients, 5 local steps of 8 x 64
    python benchmarks/fed_aggregation.py --quick    # 2 clients, 1 local step of 2 x 32 (< 1 minute)

Ends with one line per target: ``BENCH <name> <measured> <= <target>``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

BYTES_TARGET = 0.5
TIME_TARGET = 0.2
SECAGG_TARGET = 1.1
KEEP_RATIO = 0.5
#: FedShield-LLM's TenSEAL parameters (a level for the 1 / clients multiplication).
FEDSHIELD_PRIMES = (60, 40, 40, 60)
FEDSHIELD_SCALE_BITS = 40
FEDSHIELD_DEGREE = 8192


def _raw_config(*, clients: int, steps: int, batch: int, tokens: int, threads: int) -> dict[str, Any]:
    lora = {"mode": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    return {
        "task": "causal_lm",
        "model": {"name": "smollm2-135m"},
        "data": {"name": "shakespeare", "max_length": tokens, "max_eval": 8},
        "train": {
            "batch_size": batch,
            "lr": 1e-4,
            "seed": 0,
            "eval_before": False,
            "eval_max_new_tokens": 0,
            "threads": threads,
        },
        "federated": {
            "clients": clients,
            "rounds": 1,
            "local_steps": steps,
            "partition": "iid",
            "aggregation": "plain",
            "finetune": lora,
        },
        "output_dir": tempfile.mkdtemp(prefix="splitfed-bench-fedagg-"),
    }


@dataclass
class Row:
    """One scheme's costs for the round (seconds over all clients, bytes per client)."""

    name: str
    encode_s: float
    combine_s: float
    decode_s: float
    update_bytes: float
    upload_bytes: float
    max_error: float

    @property
    def crypto_s(self) -> float:
        """Encryption + aggregation + decryption."""
        return self.encode_s + self.combine_s + self.decode_s


def train_clients(
    sim: Any, clients: Sequence[int]
) -> tuple[dict[str, tuple[dict[str, torch.Tensor], float]], float]:
    """Each client's local update from the global adapters, as the simulation's round trains it."""
    from splitfed.federated.client import client_seed, local_update
    from splitfed.split.parties import INPUT_KEYS

    task, fit = sim.work.task, sim.strategy.configure_fit(1, sim.base_fit)
    out, seconds = {}, 0.0
    for index in clients:
        part = sim.parts[index]

        def loss_fn(batch_ids: list[int], part: list[Any] = part) -> torch.Tensor:
            batch = task.collate([part[i] for i in batch_ids])
            logits = sim.segment(**{k: batch[k] for k in INPUT_KEYS if k in batch})
            return task.loss(logits, batch)  # type: ignore[no-any-return]

        t = time.perf_counter()
        sim.load_global()
        sim.segment.train()
        update = local_update(
            sim.params,
            loss_fn=loss_fn,
            num_examples=len(part),
            fit=fit,
            seed=client_seed(sim.cfg.train.seed, 1, index),
        )
        elapsed = time.perf_counter() - t
        seconds += elapsed
        print(
            f"  client {index}: {update.steps} local step(s), loss {update.loss:.4f}, {elapsed:.1f} s "
            f"({len(part)} examples)",
            flush=True,
        )
        out[sim.client_id(index)] = (update.delta, float(update.num_examples))
    sim.load_global()
    return out, seconds


def weighted_mean(updates: Mapping[str, tuple[Mapping[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    """The sample-weighted average of the deltas, in float64 (what every scheme should decode)."""
    total = sum(w for _, w in updates.values())
    names = next(iter(updates.values()))[0].keys()
    return {n: sum(d[n].double() * w for d, w in updates.values()) / total for n in names}  # type: ignore[misc]


def max_error(average: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """Largest absolute difference over the reference's parameters."""
    return max(float((average[n].double() - reference[n].double()).abs().max()) for n in reference)


def run_library_scheme(
    name: str,
    make: Any,
    layout: Any,
    updates: Mapping[str, tuple[Mapping[str, torch.Tensor], float]],
    reference: Mapping[str, torch.Tensor],
    *,
    mask: Any = None,
) -> Row:
    """One round of an aggregator of the library on the cached deltas (``mask``: shared-mask CKKS,
    selected and scattered by the round driver, as in ``splitfed fedtrain``)."""
    from splitfed.federated.rounds import simulated_aggregation

    clients = list(updates)
    driver = simulated_aggregation(make, layout, min_clients=len(clients), dealer=clients[0])
    outcome = driver.run(1, clients, updates.__getitem__, mask=mask)
    if mask is not None:
        reference = mask.apply(reference)
    return Row(
        name,
        encode_s=outcome.encode_s,
        combine_s=outcome.combine_s,
        decode_s=outcome.decode_s,
        update_bytes=outcome.update_bytes,
        upload_bytes=outcome.bytes_up / len(clients),
        max_error=max_error(outcome.average, reference),
    )


@contextmanager
def _quiet_stdio() -> Iterator[None]:
    """Silence TenSEAL's C++ warning for vectors longer than one ciphertext (it writes to fd 1)."""
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def run_fedshield(
    updates: Mapping[str, tuple[Mapping[str, torch.Tensor], float]], reference: Mapping[str, torch.Tensor]
) -> Row:
    """FedShield-LLM's scheme: a CKKSVector per tensor of the full (dense) update; the server adds
    them and scales by 1 / clients; a client decrypts tensor by tensor. Its average is uniform."""
    import tenseal as ts

    context = ts.context(
        ts.SCHEME_TYPE.CKKS, poly_modulus_degree=FEDSHIELD_DEGREE, coeff_mod_bit_sizes=list(FEDSHIELD_PRIMES)
    )
    context.global_scale = 2.0**FEDSHIELD_SCALE_BITS
    server = ts.context_from(context.serialize(save_public_key=False, save_secret_key=False))
    names = sorted(reference)
    shapes = {n: reference[n].shape for n in names}
    encode_s = combine_s = 0.0
    sizes: list[int] = []
    total: dict[str, Any] = {}
    for delta, _ in updates.values():
        t = time.perf_counter()
        with _quiet_stdio():
            blobs = {
                n: ts.ckks_vector(context, delta[n].double().reshape(-1).tolist()).serialize() for n in names
            }
        encode_s += time.perf_counter() - t
        sizes.append(sum(len(b) for b in blobs.values()))
        t = time.perf_counter()
        for n, blob in blobs.items():
            vector = ts.ckks_vector_from(server, blob)
            total[n] = vector if n not in total else total[n].add_(vector)
        combine_s += time.perf_counter() - t
    t = time.perf_counter()
    aggregate = {n: total[n].mul_(1.0 / len(updates)).serialize() for n in names}
    combine_s += time.perf_counter() - t
    t = time.perf_counter()
    average = {
        n: torch.tensor(ts.ckks_vector_from(context, aggregate[n]).decrypt(), dtype=torch.float64).reshape(
            shapes[n]
        )
        for n in names
    }
    decode_s = time.perf_counter() - t
    uniform = {n: sum(d[n].double() for d, _ in updates.values()) / len(updates) for n in names}
    return Row(
        "fedshield",
        encode_s=encode_s,
        combine_s=combine_s,
        decode_s=decode_s,
        update_bytes=sum(sizes) / len(sizes),
        upload_bytes=sum(sizes) / len(sizes),
        max_error=max_error(average, uniform),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="local steps per client")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per example")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="2 clients, 1 local step of batch 2 x 32")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.steps, args.batch, args.tokens = 2, 1, 2, 32
    torch.set_num_threads(args.threads)

    from transformers.utils import logging as hf_logging

    from splitfed.config import parse_config
    from splitfed.federated.aggregators import (
        CKKSAggregator,
        PlainAggregator,
        SecAggAggregator,
        SharedMask,
    )
    from splitfed.federated.simulation import FederatedSimulation
    from splitfed.run import prepare

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    print(
        f"smollm2-135m, causal LM on shakespeare, LoRA r=8 on q/v, {args.clients} clients, one round of "
        f"{args.steps} local step(s) of batch {args.batch} x {args.tokens}, {args.threads} torch thread(s)",
        flush=True,
    )
    cfg = parse_config(
        _raw_config(
            clients=args.clients, steps=args.steps, batch=args.batch, tokens=args.tokens, threads=args.threads
        )
    )
    t = time.perf_counter()
    sim = FederatedSimulation(prepare(cfg, log=lambda _: None), log=lambda _: None)
    numel = sim.layout.numel
    print(
        f"loaded in {time.perf_counter() - t:.1f} s; {numel:,} trainable values in {len(sim.layout.names)} tensors "
        f"(fp32 update {4 * numel / 1e6:.2f} MB); local training:",
        flush=True,
    )
    updates, train_s = train_clients(sim, range(args.clients))
    reference = weighted_mean(updates)
    fp32_bytes = 4 * numel

    mask = SharedMask.from_reference(sim.global_state, keep_ratio=KEEP_RATIO)

    def energy(tensors: Mapping[str, torch.Tensor]) -> float:
        return sum(float(t.double().pow(2).sum()) for t in tensors.values())

    kept_energy = sum(energy(mask.select(d)) for d, _ in updates.values()) / max(
        sum(energy(d) for d, _ in updates.values()), 1e-300
    )
    max_weight = max(w for _, w in updates.values())
    rows: list[Row] = []
    schemes: list[tuple[str, Any]] = [
        ("plain", lambda: run_library_scheme("plain", PlainAggregator, sim.layout, updates, reference)),
        ("ckks", lambda: run_library_scheme("ckks", CKKSAggregator, sim.layout, updates, reference)),
        (
            "ckks shared 50%",
            lambda: run_library_scheme(
                "ckks shared 50%", CKKSAggregator, sim.layout, updates, reference, mask=mask
            ),
        ),
        (
            "secagg",
            lambda: run_library_scheme(
                "secagg",
                lambda: SecAggAggregator(modulus_bits=32, max_weight=max_weight),
                sim.layout,
                updates,
                reference,
            ),
        ),
        ("fedshield", lambda: run_fedshield(updates, reference)),
    ]
    for name, run in schemes:
        print(f"  aggregating: {name} ...", flush=True)
        rows.append(run())

    print()
    print(
        f"local training: {train_s:.2f} s for {args.clients} clients ({train_s / args.clients:.2f} s per client)"
    )
    header = (
        f"{'scheme':16s} {'encrypt s':>10s} {'aggregate s':>12s} {'decrypt s':>10s} {'crypto/train':>13s} "
        f"{'update MB':>10s} {'upload MB':>10s} {'x fp32':>7s} {'max error':>10s}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.name:16s} {r.encode_s:10.3f} {r.combine_s:12.3f} {r.decode_s:10.3f} {r.crypto_s / train_s:13.3f} "
            f"{r.update_bytes / 1e6:10.3f} {r.upload_bytes / 1e6:10.3f} {r.upload_bytes / fp32_bytes:7.2f} "
            f"{r.max_error:10.2e}"
        )
    by_name = {r.name: r for r in rows}
    print(
        f"(times over all {args.clients} clients; bytes per client; secagg's upload adds its key, share and reveal "
        f"stages; ckks key setup is one-time and not counted; fedshield's error is against the uniform mean)"
    )
    print(
        f"INFO shared mask keeps {mask.kept:,} of {numel:,} values ({mask.kept / numel:.0%}), taken from the global "
        f"adapters; it holds {kept_energy:.1%} of the round's update energy (sum of squares)"
    )
    print(
        "INFO the 1000-client peak RSS target (sim_1000_clients_peak_rss_gb <= 3) is measured by "
        "benchmarks/fed_memory.py, not here"
    )
    shared, fedshield, ckks, secagg = (
        by_name["ckks shared 50%"],
        by_name["fedshield"],
        by_name["ckks"],
        by_name["secagg"],
    )
    print(f"INFO ckks_shared_time_vs_local_training {shared.crypto_s / train_s:.3f}")
    print(f"INFO ckks_bytes_vs_fedshield (packed, no mask) {ckks.update_bytes / fedshield.update_bytes:.3f}")
    print(
        f"BENCH ckks_bytes_vs_fedshield {shared.update_bytes / fedshield.update_bytes:.3f} <= {BYTES_TARGET}"
    )
    print(f"BENCH ckks_time_vs_local_training {ckks.crypto_s / train_s:.3f} <= {TIME_TARGET}")
    print(f"BENCH secagg_bytes_vs_fp32 {secagg.upload_bytes / fp32_bytes:.3f} <= {SECAGG_TARGET}")


if __name__ == "__main__":
    main()
