"""Split training step time over loopback gRPC vs the in-process channel, in one run.

smollm2-135m, HT with 2 head blocks, SplitLoRA (LoRA r=8 on q/v on both sides), causal LM,
batch 8 x 128 random tokens, in two settings:

* ``labels_at_data``: the model party returns the logits (8 x 128 x 49152 fp32 = 201 MB) and
  receives their gradient (another 201 MB), then returns the hidden-state gradient;
* ``labels_at_model``: the labels go to the model party, only the loss and the hidden-state
  gradient come back.

Baseline: the same data party step (``DataParty.train_step``) with the model party in the same
process behind the in-process channel (``build_split``). Measured: the same step with the model
party served by ``splitfed serve``'s code (``start_server``) in a second process and the data
party talking to it through a ``GrpcChannel`` on 127.0.0.1, both sides built from the same config
as ``splitfed join`` builds them. Steps alternate (in-process, gRPC, in-process, ...) after a
warm-up of each; the ratio printed is the median over repeats of gRPC time / in-process time.
Both processes share the machine's cores; ``OMP_WAIT_POLICY=PASSIVE`` (set before torch loads,
for both) keeps the idle side's OpenMP threads from spinning on them.

    python benchmarks/split_loopback.py            # batch 8 x 128, 7 repeats (about 4 minutes)
    python benchmarks/split_loopback.py --quick    # batch 2 x 64, 3 repeats (< 1 minute)

Ends with one line per target: ``BENCH <name> <measured> <= <target>``.
"""

from __future__ import annotations

import os

# Two processes share two cores on loopback: OpenMP threads that spin while the other side
# computes would steal its CPU. Set before torch loads; the server process inherits it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import statistics
import time
from typing import Any

import torch
from _bench import interleaved_times, model_party_process, smollm2_splitlora_config
from transformers.utils import logging as hf_logging

MODEL = "smollm2-135m"
HEAD_LAYERS = 2
TARGET = 1.10
SETTINGS = ("data", "model")


def _raw_config(labels_at: str) -> dict[str, Any]:
    return smollm2_splitlora_config(labels_at, "loopback", HEAD_LAYERS)


def measure(labels_at: str, batch: int, seq: int, repeats: int) -> dict[str, float]:
    """Median gRPC/in-process step-time ratio and bytes per step for one ``labels_at``."""
    from splitfed.config import parse_config
    from splitfed.data import get_task
    from splitfed.models.loading import load_model, load_tokenizer
    from splitfed.run import seed_everything
    from splitfed.split.system import build_data_party, build_split, prepare_segments
    from splitfed.transport.grpc_channel import GrpcChannel

    raw = _raw_config(labels_at)
    cfg = parse_config(raw)
    steps = cfg.train.steps or 1
    with model_party_process(raw) as port:
        tokenizer = load_tokenizer(MODEL)
        task = get_task("causal_lm", tokenizer=tokenizer, max_length=seq)

        # In process: both parties here, as `splitfed train` builds them.
        seed_everything(cfg.train.seed)
        local_model = load_model(MODEL, "causal_lm", None, tokenizer.pad_token_id)
        local = build_split(
            local_model,
            cfg.split.spec(),
            cfg.head,
            cfg.segment_finetune(),
            task.loss,
            cfg.optim(steps),
            labels_at=cfg.split.labels_at,
        ).data_party

        # Over gRPC: only the data party here, as `splitfed join` builds it.
        seed_everything(cfg.train.seed)
        remote_model = load_model(MODEL, "causal_lm", None, tokenizer.pad_token_id)
        segments, _ = prepare_segments(remote_model, cfg.split.spec(), cfg.head, cfg.segment_finetune())
        channel = GrpcChannel(f"127.0.0.1:{port}")
        remote = build_data_party(
            segments,
            channel,
            task.loss,
            cfg.optim(steps),
            labels_at=cfg.split.labels_at,
            client_id=channel.client_id,
        )

        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, tokenizer.vocab_size, (batch, seq), generator=g)
        data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        fns = {"local": lambda: local.train_step(data), "remote": lambda: remote.train_step(data)}
        for fn in fns.values():  # warm-up, kept out of the byte counts
            fn()
        local.channel.reset_counters()
        channel.reset_counters()
        times = interleaved_times(fns, repeats, warmup=False)
        ratios = [r / s for r, s in zip(times["remote"], times["local"], strict=True)]
        result = {
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "local_s": statistics.median(times["local"]),
            "remote_s": statistics.median(times["remote"]),
            "wire_to_model": channel.bytes_to_model / repeats,
            "wire_to_data": channel.bytes_to_data / repeats,
            "payload_to_model": local.channel.payload_to_model / repeats,
            "payload_to_data": local.channel.payload_to_data / repeats,
        }
        channel.close()
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="batch 2 x 64, 3 repeats: under a minute")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.quick:
        args.batch, args.seq, args.repeats = 2, 64, 3
    t0 = time.perf_counter()
    print(
        f"{MODEL}: HT head={HEAD_LAYERS}, SplitLoRA r=8 q/v, causal LM, batch {args.batch} x {args.seq} tokens, "
        f"{args.repeats} repeats, {torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    )
    results = {}
    for labels_at in SETTINGS:
        r = measure(labels_at, args.batch, args.seq, args.repeats)
        results[labels_at] = r
        print(
            f"  labels_at {labels_at:5s}  in-process {r['local_s']:.3f}s  gRPC {r['remote_s']:.3f}s  "
            f"ratio {r['ratio']:.3f} (repeats {r['ratio_min']:.3f}-{r['ratio_max']:.3f})\n"
            f"                   per step: payload to model {r['payload_to_model'] / 1e6:.2f} MB, "
            f"to data {r['payload_to_data'] / 1e6:.2f} MB; on the wire to model "
            f"{r['wire_to_model'] / 1e6:.2f} MB, to data {r['wire_to_data'] / 1e6:.2f} MB"
        )
    print(f"total {time.perf_counter() - t0:.0f}s")
    for labels_at, r in results.items():
        print(f"BENCH loopback_overhead_labels_at_{labels_at} {r['ratio']:.3f} <= {TARGET}")


if __name__ == "__main__":
    main()
