"""Wire overhead and compression of split training messages, and what compression costs in accuracy.

1. **Bytes.** One real SplitLoRA training step of smollm2-135m (HT, 2 head blocks, LoRA r=8 on
   q/v on both sides, causal LM, batch 8 x 128) is recorded with a ``CrossingRecorder`` on the
   in-process channel. Every recorded message is then encoded exactly as the gRPC runtime sends it
   (``to_envelope`` with a ``WireCodecs``, cut by ``to_frames``) and the frames' serialized sizes
   are summed. Baseline: the raw tensor payload of the same messages (``Message.nbytes``).

   * ``wire_overhead``: fp32 frames / raw payload, both directions, for the step with
     ``labels_at: model`` (hidden states go out, the loss and the hidden-state gradient come back).
   * ``bf16_activation_bytes`` / ``int8_activation_bytes``: frames of the activation messages (the
     ones carrying ``hidden`` or ``logits``, masks and labels included as they cross) with that
     activation codec, over the same messages' fp32 frames.
   * The ``labels_at: data`` step (logits, 200 MB at this size, cross each way) is printed as INFO.

2. **Accuracy.** The same short SplitFrozen classification fine-tuning of smollm2-135m on
   fortunes-topic (as ``splitfed demo``, but 30 steps and 85 validation examples) runs three times
   on an in-process channel whose every message makes the full wire round trip (``to_envelope`` →
   frames → reassembly → ``from_envelope``) with fp32, bf16 or int8 activations. Gradients use the
   same codec where the wire has it (bf16) and fp32 otherwise (there is no int8 gradient codec).
   Evaluation crosses the same compressed channel. The fp32 round trip is bit-exact, so the fp32
   run is the uncompressed baseline; the drop is fp32 accuracy minus compressed accuracy.

    python benchmarks/split_wire.py            # full (a few minutes)
    python benchmarks/split_wire.py --quick    # batch 2 x 64, 6 training steps, 24 eval (< 1 minute)

Ends with one line per target: ``BENCH <name> <measured> <op> <target>``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch
from transformers.utils import logging as hf_logging

from splitfed.protocol import tensor_role
from splitfed.transport.channel import Crossing, Direction, Message
from splitfed.transport.wire import (
    Reassembler,
    WireCodecs,
    WireLimits,
    from_envelope,
    to_envelope,
    to_frames,
)

MODEL = "smollm2-135m"
CODECS = ("fp32", "bf16", "int8")
TARGETS = {"wire_overhead": 1.02, "bf16": 0.51, "int8": 0.26, "drop": 0.05}


def codecs_for(name: str) -> WireCodecs:
    """Activations with ``name``; gradients with the same codec where the wire has one, else fp32."""
    return WireCodecs(activations=name, gradients=name if name in ("fp16", "bf16") else "fp32")  # type: ignore[arg-type]


def wire_bytes(message: Message, seq: int, direction: Direction, codecs: WireCodecs) -> int:
    """Serialized frame bytes of ``message`` as the gRPC runtime sends it."""
    envelope = to_envelope(message, seq, direction, codecs)
    return sum(frame.ByteSize() for frame in to_frames(envelope, seq))


class WireRoundTrip:
    """A channel transform that sends every message through the whole wire path and back.

    Encode (codecs), serialize, frame, reassemble, parse and decode with validation: exactly
    what a message goes through between two gRPC processes, minus the socket.
    """

    def __init__(self, codecs: WireCodecs) -> None:
        self.codecs = codecs
        self.limits = WireLimits()
        self.seq = 0
        self.wire = 0

    def __call__(self, direction: Direction, message: Message) -> Message:
        self.seq += 1
        reassembler = Reassembler(self.limits)
        envelope = None
        for frame in to_frames(to_envelope(message, self.seq, direction, self.codecs), self.seq):
            self.wire += frame.ByteSize()
            envelope = reassembler.push(frame)
        assert envelope is not None
        return from_envelope(envelope, self.limits)


# ------------------------------------------------------------------------------------------ bytes


def record_step(labels_at: str, batch: int, seq: int) -> list[Crossing]:
    """The crossings of one real SplitLoRA HT training step (after one warm-up step)."""
    from splitfed.data import get_task
    from splitfed.models.loading import load_model, load_tokenizer
    from splitfed.models.partition import FinetuneSpec, SplitSpec
    from splitfed.split.parties import OptimSpec
    from splitfed.split.system import build_split
    from splitfed.transport.channel import CrossingRecorder

    torch.manual_seed(0)
    tokenizer = load_tokenizer(MODEL)
    task = get_task("causal_lm", tokenizer=tokenizer, max_length=seq)
    model = load_model(MODEL, "causal_lm")
    lora = FinetuneSpec("lora", r=8, alpha=16, target_modules=("q_proj", "v_proj"))
    recorder = CrossingRecorder()
    system = build_split(
        model,
        SplitSpec("ht", 2),
        "causal_lm",
        {"head": lora, "body": lora},
        task.loss,
        OptimSpec(lr=1e-4, total_steps=10),
        labels_at=labels_at,  # type: ignore[arg-type]
        recorder=recorder,
    )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tokenizer.vocab_size, (batch, seq), generator=g)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    system.data_party.train_step(data)  # warm-up: the adapters move off their zero init
    recorder.clear()
    system.data_party.train_step(data)
    return list(recorder.crossings)


def measure_bytes(crossings: Sequence[Crossing]) -> dict[str, Any]:
    """Raw payload and frame bytes of each crossing with each codec."""
    rows: list[dict[str, Any]] = []
    for i, c in enumerate(crossings, 1):
        message = Message(c.kind, c.tensors, c.meta)
        row: dict[str, Any] = {
            "kind": c.kind,
            "direction": c.direction,
            "tensors": {
                k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in c.tensors.items()
            },
            "payload": message.nbytes,
            "activation": any(tensor_role(c.kind, k) == "activation" for k in c.tensors),
        }
        for name in CODECS:
            row[name] = wire_bytes(message, i, c.direction, codecs_for(name))
        rows.append(row)
    payload = sum(r["payload"] for r in rows)
    act = [r for r in rows if r["activation"]]
    out: dict[str, Any] = {"rows": rows, "payload": payload}
    for name in CODECS:
        out[f"wire_{name}"] = sum(r[name] for r in rows)
        out[f"act_{name}"] = sum(r[name] for r in act)
    out["overhead"] = out["wire_fp32"] / payload
    for name in CODECS[1:]:
        out[f"ratio_{name}"] = out[f"act_{name}"] / out["act_fp32"]
    return out


def print_bytes(title: str, m: dict[str, Any]) -> None:
    print(f"  {title}")
    for r in m["rows"]:
        shapes = ", ".join(f"{k} {list(s)} {d}" for k, (s, d) in r["tensors"].items())
        print(
            f"    {r['direction']:8s} {r['kind']:15s} payload {r['payload']:>11,d} B  frames fp32 {r['fp32']:>11,d}  "
            f"bf16 {r['bf16']:>11,d}  int8 {r['int8']:>11,d}   [{shapes}]"
        )
    print(
        f"    step: payload {m['payload']:,d} B, fp32 frames {m['wire_fp32']:,d} B "
        f"(overhead {m['overhead']:.6f}); activation messages bf16/fp32 {m['ratio_bf16']:.4f}, "
        f"int8/fp32 {m['ratio_int8']:.4f}"
    )


# --------------------------------------------------------------------------------------- accuracy


def finetune(codec: str, steps: int, max_eval: int, out_dir: str) -> dict[str, Any]:
    """The short SplitFrozen fortunes-topic run with every message making the wire round trip."""
    from splitfed.config import parse_config
    from splitfed.run import train

    cfg = parse_config(
        {
            "name": f"wire-{codec}",
            "task": "classification",
            "mode": "splitfrozen",
            "model": {"name": MODEL},
            "data": {"name": "fortunes-topic", "max_length": 48, "max_eval": max_eval},
            "split": {"setting": "ht", "head_layers": 2, "labels_at": "data"},
            "finetune": {
                "body": {"mode": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}
            },
            "train": {
                "steps": steps,
                "batch_size": 8,
                "eval_batch_size": 16,
                "lr": 2.0e-3,
                "scheduler": "linear",
                "warmup_steps": max(1, steps // 10),
                "seed": 0,
                "eval_before": False,
            },
            "output_dir": f"{out_dir}/{codec}",
        }
    )
    wire = WireRoundTrip(codecs_for(codec))
    t = time.perf_counter()
    result = train(cfg, progress=False, log=lambda _: None, transforms=[wire])
    seconds = time.perf_counter() - t
    return {
        "accuracy": result.metrics_after["accuracy"],
        "macro_f1": result.metrics_after["macro_f1"],
        "final_loss": result.history[-1]["loss"],
        "wire_per_message": wire.wire / max(wire.seq, 1),
        "seconds": seconds,
        "n_eval": result.summary["examples"]["validation"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="fine-tuning steps of each accuracy run")
    parser.add_argument("--max-eval", type=int, default=85, help="validation examples of each accuracy run")
    parser.add_argument(
        "--quick", action="store_true", help="batch 2 x 64, 6 steps, 24 eval examples, no logits step"
    )
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.quick:
        args.batch, args.seq, args.steps, args.max_eval = 2, 64, 6, 24
    t0 = time.perf_counter()

    print(f"{MODEL}: HT head=2, SplitLoRA r=8 q/v, causal LM, batch {args.batch} x {args.seq} tokens")
    main_step = measure_bytes(record_step("model", args.batch, args.seq))
    print_bytes("labels_at: model (hidden states out, loss + hidden-state gradient back)", main_step)
    if not args.quick:
        logits_step = measure_bytes(record_step("data", args.batch, args.seq))
        print_bytes("labels_at: data (INFO: logits and their gradient cross)", logits_step)
        print(
            f"INFO wire_overhead_labels_at_data {logits_step['overhead']:.6f}; activation bf16/fp32 "
            f"{logits_step['ratio_bf16']:.4f}, int8/fp32 {logits_step['ratio_int8']:.4f}"
        )

    print(
        f"fortunes-topic SplitFrozen classification, HT head=2, {args.steps} steps x batch 8, "
        f"max_eval {args.max_eval}, every message through the wire round trip"
    )
    runs = {}
    with tempfile.TemporaryDirectory(prefix="splitfed-wire-") as tmp:
        for codec in CODECS:
            r = finetune(codec, args.steps, args.max_eval, tmp)
            runs[codec] = r
            print(
                f"  {codec:5s} accuracy {r['accuracy']:.4f} (n={r['n_eval']})  macro-F1 {r['macro_f1']:.4f}  "
                f"final train loss {r['final_loss']:.4f}  {r['wire_per_message'] / 1e3:.1f} kB/message  "
                f"{r['seconds']:.0f}s"
            )
    drops = {c: runs["fp32"]["accuracy"] - runs[c]["accuracy"] for c in CODECS[1:]}
    n = runs["fp32"]["n_eval"]
    print(
        "  accuracy drop vs fp32: "
        + ", ".join(f"{c} {d:+.4f} ({round(d * n):+d} of {n})" for c, d in drops.items())
    )
    print(f"total {time.perf_counter() - t0:.0f}s")
    print(f"BENCH wire_overhead {main_step['overhead']:.4f} <= {TARGETS['wire_overhead']}")
    print(f"BENCH bf16_activation_bytes {main_step['ratio_bf16']:.4f} <= {TARGETS['bf16']}")
    print(f"BENCH int8_activation_bytes {main_step['ratio_int8']:.4f} <= {TARGETS['int8']}")
    print(f"BENCH bf16_accuracy_drop {drops['bf16']:.4f} <= {TARGETS['drop']}")
    print(f"BENCH int8_accuracy_drop {drops['int8']:.4f} <= {TARGETS['drop']}")


if __name__ == "__main__":
    main()
