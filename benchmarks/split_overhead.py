"""Time per training step of split training vs the same model trained unsplit, in one run.

Both runs use one model object with the same LoRA adapters (r=8 on q/v in every block, the
SplitLoRA setting) and the same batch; the split run goes through DataParty/ModelParty and the
in-process channel. Steps alternate (unsplit, split, unsplit, ...) so drift hits both alike; the
ratio printed is the median over repeats of split time / unsplit time.

    python benchmarks/split_overhead.py            # smollm2-135m, batch 8 x 128 tokens
    python benchmarks/split_overhead.py --quick    # batch 2 x 64, fewer repeats (< 1 minute)

Ends with one line per target: ``BENCH <name> <measured> <= <target>``.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _bench import interleaved_times
from transformers.utils import logging as hf_logging

from splitfed.models.loading import load_model
from splitfed.models.partition import FinetuneSpec, SplitSpec
from splitfed.split.parties import OptimSpec
from splitfed.split.system import build_split

TARGET = 1.05


def causal_lm_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Shifted next-token cross-entropy."""
    labels = batch["labels"]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def measure(
    model_name: str, spec: SplitSpec, labels_at: str, batch: int, seq: int, repeats: int
) -> dict[str, float]:
    """Median split/unsplit step-time ratio and bytes per step for one setting."""
    torch.manual_seed(0)
    model = load_model(model_name, "causal_lm")
    lora = FinetuneSpec("lora", r=8, alpha=16, target_modules=("q_proj", "v_proj"))
    optim = OptimSpec(lr=1e-4, total_steps=1000)
    system = build_split(
        model,
        spec,
        "causal_lm",
        dict.fromkeys(("head", "body", "tail"), lora),
        causal_lm_loss,
        optim,
        labels_at=labels_at,  # type: ignore[arg-type]
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def unsplit_step() -> None:
        model.train()
        logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
        causal_lm_loss(logits, data).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def split_step() -> None:
        system.data_party.train_step(data)

    for fn in (unsplit_step, split_step):  # warm-up, kept out of the byte counts
        fn()
    system.channel.reset_counters()
    times = interleaved_times({"unsplit": unsplit_step, "split": split_step}, repeats, warmup=False)
    t_unsplit, t_split = times["unsplit"], times["split"]
    ratios = [s / u for s, u in zip(t_split, t_unsplit, strict=True)]
    return {
        "ratio": statistics.median(ratios),
        "split_s": statistics.median(t_split),
        "unsplit_s": statistics.median(t_unsplit),
        "bytes_to_model": system.channel.bytes_to_model / repeats,
        "bytes_to_data": system.channel.bytes_to_data / repeats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="batch 2 x 64, 3 repeats: under a minute")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.quick:
        args.batch, args.seq, args.repeats = 2, 64, 3
    settings = {
        "ht": (SplitSpec("ht", 2), "data"),
        "ht_labels_at_model": (SplitSpec("ht", 2), "model"),
        "hbt": (SplitSpec("hbt", 2, 2), "data"),
    }
    print(
        f"{args.model}: batch {args.batch} x {args.seq} tokens, LoRA r=8 on q/v, {args.repeats} repeats, "
        f"{torch.get_num_threads()} threads"
    )
    results = {}
    for name, (spec, labels_at) in settings.items():
        r = measure(args.model, spec, labels_at, args.batch, args.seq, args.repeats)
        results[name] = r
        print(
            f"  {name:20s} split {r['split_s']:.3f}s  unsplit {r['unsplit_s']:.3f}s  ratio {r['ratio']:.3f}  "
            f"bytes/step to model {r['bytes_to_model'] / 1e6:.2f} MB, to data {r['bytes_to_data'] / 1e6:.2f} MB"
        )
    for name, r in results.items():
        print(f"BENCH split_overhead_{name} {r['ratio']:.3f} <= {TARGET}")


if __name__ == "__main__":
    main()
