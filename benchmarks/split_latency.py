"""Latency hiding: pipelined split training of 4 data parties over a link with 20 ms round trips.

smollm2-135m, HT with 2 head blocks, SplitLoRA (LoRA r=8 on q/v on both sides, labels at the
model party), causal LM on random tokens, ``grad_accum`` micro-batches per optimizer step. One
model party (``splitfed serve``'s code, ``start_server``) runs in a second process; four data
parties (``DataParty`` over ``GrpcChannel``, as ``splitfed join`` builds them) run as threads of
this process and train concurrently, each from its own copy of the model.

Latency: ``tc netem`` in a network namespace where the kernel has it; otherwise (as on the
development machine: "Specified qdisc kind is unknown") the channel delays every frame by half
the round trip each way without blocking the sender, which is what a long link does to a stream.

Micro-batches of 1 x 8 tokens by default: about 0.18 s of compute each on this CPU, so a 20 ms
round trip costs a sequential party about a tenth of its time; with bigger micro-batches the
compute hides the latency whatever the schedule (1 x 32: sequential 0.99).

Variants, taking turns for ``--repeats`` rounds: {sequential, pipelined} x {0 ms, 20 ms}.
Throughput is the training samples of all parties per second of wall time. Printed: each
variant's throughput, and the ratio of pipelined throughput at 20 ms to the best zero-latency
throughput (target >= 0.9); sequential at 20 ms is printed for contrast (it pays each round
trip while holding the model party's step lock).

    python benchmarks/split_latency.py            # batch 1 x 8, 2 steps x 4 micro-batches, 3 rounds
    python benchmarks/split_latency.py --quick    # 1 step per variant, 1 round (< 1 minute)

Ends with: ``BENCH latency_hiding_pipelined_4_parties <ratio> >= 0.9``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import statistics
import subprocess
import threading
import time
from typing import Any

import torch
from _bench import model_party_process, smollm2_splitlora_config
from transformers.utils import logging as hf_logging

MODEL = "smollm2-135m"
HEAD_LAYERS = 2
PARTIES = 4
RTT_MS = 20.0
TARGET = 0.9


def _raw_config(accum: int, depth: int) -> dict[str, Any]:
    return smollm2_splitlora_config("model", "latency", HEAD_LAYERS, grad_accum=accum, pipeline_depth=depth)


def netem_available() -> tuple[bool, str]:
    """Whether ``tc netem`` works here (tried in a throw-away network namespace)."""
    name = f"splitfed-bench-{os.getpid()}"
    try:
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as err:
        return False, f"no network namespaces ({getattr(err, 'stderr', '') or err})".strip()
    try:
        done = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                name,
                "tc",
                "qdisc",
                "add",
                "dev",
                "lo",
                "root",
                "netem",
                "delay",
                "10ms",
            ],
            capture_output=True,
            text=True,
        )
        return done.returncode == 0, (done.stderr or "ok").strip()
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=8)
    parser.add_argument("--accum", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--depth", type=int, default=4, help="pipeline depth (micro-batches in flight)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per party per variant")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 step per variant, 1 round: under a minute")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.quick:
        args.steps, args.repeats = 1, 1

    from splitfed.config import parse_config
    from splitfed.data import get_task
    from splitfed.models.loading import load_model, load_tokenizer
    from splitfed.run import seed_everything
    from splitfed.split.parties import DataParty, MicroBatch
    from splitfed.split.system import build_data_party, prepare_segments
    from splitfed.transport.grpc_channel import GrpcChannel

    netem, why = netem_available()
    # Emulating netem here would need the server in its own namespace; the channel delay is the
    # same propagation delay and works everywhere, so it is used in both cases.
    print(f"tc netem: {'available' if netem else 'unavailable: ' + why}; latency injected by the channel")
    raw = _raw_config(args.accum, args.depth)
    cfg = parse_config(raw)
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(MODEL)
    task = get_task("causal_lm", tokenizer=tokenizer, max_length=args.seq)
    heads = []
    for _ in range(PARTIES):
        seed_everything(cfg.train.seed)
        model = load_model(MODEL, "causal_lm", None, tokenizer.pad_token_id)
        heads.append(prepare_segments(model, cfg.split.spec(), cfg.head, cfg.segment_finetune())[0]["head"])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tokenizer.vocab_size, (args.batch, args.seq), generator=g)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    samples = PARTIES * args.steps * args.accum * args.batch
    print(
        f"{MODEL}: HT head={HEAD_LAYERS}, SplitLoRA r=8 q/v, labels at the model party; {PARTIES} data parties x "
        f"{args.steps} steps x {args.accum} micro-batches of {args.batch} x {args.seq} tokens; pipeline depth "
        f"{args.depth}; {args.repeats} rounds; {torch.get_num_threads()} threads per process"
    )

    with model_party_process(raw) as port:

        def run(schedule: str, latency_ms: float) -> float:
            window = 1 if schedule == "sequential" else args.depth
            parties = []
            for i, head in enumerate(heads):
                channel = GrpcChannel(f"127.0.0.1:{port}", client_id=f"device-{i}", latency_ms=latency_ms)
                parties.append(
                    build_data_party(
                        {"head": head}, channel, task.loss, cfg.optim(cfg.train.steps or 1), labels_at="model"
                    )
                )
            micro = [
                MicroBatch(data, m == args.accum - 1, 1.0 / args.accum)
                for _ in range(args.steps)
                for m in range(args.accum)
            ]
            start = threading.Barrier(PARTIES + 1)
            errors: list[BaseException] = []

            def work(party: DataParty) -> None:
                start.wait()
                try:
                    for _ in party.train_stream(micro, window):
                        pass
                except BaseException as err:  # reported below
                    errors.append(err)

            threads = [threading.Thread(target=work, args=(p,)) for p in parties]
            for t in threads:
                t.start()
            start.wait()
            began = time.perf_counter()
            for t in threads:
                t.join()
            wall = time.perf_counter() - began
            for p in parties:
                p.channel.close()
            if errors:
                raise errors[0]
            return samples / wall

        variants = {
            (schedule, rtt): (lambda s=schedule, r=rtt: run(s, r))
            for rtt in (0.0, RTT_MS)
            for schedule in ("sequential", "pipelined")
        }
        run("pipelined", 0.0)  # warm-up
        rates: dict[tuple[str, float], list[float]] = {k: [] for k in variants}
        for _ in range(args.repeats):
            for key, fn in variants.items():
                rates[key].append(fn())
    median = {k: statistics.median(v) for k, v in rates.items()}
    for (schedule, rtt), rate in median.items():
        print(
            f"  {schedule:10s} RTT {rtt:4.0f} ms: {rate:6.2f} samples/s  (rounds: {', '.join(f'{r:.2f}' for r in rates[(schedule, rtt)])})"
        )
    best_zero = max(median[("sequential", 0.0)], median[("pipelined", 0.0)])
    pipelined = median[("pipelined", RTT_MS)] / best_zero
    sequential = median[("sequential", RTT_MS)] / best_zero
    print(
        f"at {RTT_MS:.0f} ms RTT over the best zero-latency throughput: pipelined {pipelined:.3f}, "
        f"sequential {sequential:.3f}; total {time.perf_counter() - t0:.0f}s"
    )
    print(f"BENCH latency_hiding_pipelined_4_parties {pipelined:.3f} >= {TARGET}")


if __name__ == "__main__":
    main()
