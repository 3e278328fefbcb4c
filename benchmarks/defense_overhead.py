"""Time per split training step with each defense vs the same step without one, in one run.

The setting of ``split_overhead.py``: smollm2-135m causal LM, batch 8 x 64 tokens, LoRA r=8 on
q/v in every segment, HT split after block 2 with labels at the data party (so the gradient
defenses act on the gradient of the logits the data party returns). ``snd`` needs a denoiser at
the tail's input, so it runs in HBT (2 + 2 blocks) against an undefended HBT step.

Each defended system gets its own freshly loaded model (LoRA cannot be stacked twice on one),
and its steps alternate with those of an undefended system (undefended, defended, undefended,
...) so that drift hits both alike; the ratio printed is the median over repeats of defended /
undefended step time.

The text sanitizers (``santext``, ``custext``, ``rantext``) act on the text before tokenization,
so they are timed on their own: sanitizing one batch of 8 fortunes-topic texts, alternating with
the undefended step; their ratio is ``1 + sanitize time / step time``.

Targets: the issue sets them only for activation DP and gradient sparsification (<= 1.05).
Every other defense adds work by design (a second loss, a trained inverter, per-example
gradients, a denoiser, k-means projections), so its line carries a generous bound, documented
in :data:`TARGETS`, that only catches a regression of an order of magnitude.

    python benchmarks/defense_overhead.py            # batch 8 x 64, 5 repeats
    python benchmarks/defense_overhead.py --quick    # batch 2 x 64, 2 repeats, a subset (< 1 minute)

Ends with one line per defense: ``BENCH defense_overhead_<name> <ratio> <= <target>``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from _bench import interleaved_times
from transformers.utils import logging as hf_logging

from splitfed.models.loading import load_model, load_tokenizer
from splitfed.models.partition import FinetuneSpec, SplitSpec
from splitfed.split.front import FrontContext, build_front
from splitfed.split.parties import OptimSpec
from splitfed.split.system import build_split

MODEL = "smollm2-135m"

#: Each defense's entry (the parameters it is timed with) and its split setting.
DEFENSES: dict[str, tuple[dict[str, Any], str]] = {
    "activation_dp": ({"name": "activation_dp", "epsilon": 4.0, "clip": 10.0}, "ht"),
    "grad_topk": ({"name": "grad_topk", "fraction": 0.1}, "ht"),
    "grad_dp": ({"name": "grad_dp", "clip": 1.0, "noise_multiplier": 1.0}, "ht"),
    "dchi_privacy": ({"name": "dchi_privacy", "epsilon": 10.0}, "ht"),
    "mid": ({"name": "mid"}, "ht"),
    "nopeek": ({"name": "nopeek"}, "ht"),
    "adversarial": ({"name": "adversarial"}, "ht"),
    "dp_sgd": ({"name": "dp_sgd", "sample_rate": 0.01}, "ht"),
    "textobfuscator": ({"name": "textobfuscator"}, "ht"),
    "snd": ({"name": "snd"}, "hbt"),
    "santext": ({"name": "santext"}, "text"),
    "custext": ({"name": "custext"}, "text"),
    "rantext": ({"name": "rantext"}, "text"),
}

#: Upper bounds on the step-time ratio. Only activation_dp and grad_topk have targets in the
#: issue (1.05); the others are generous bounds chosen here from what each adds per step:
#: 1.5 for a per-token or per-row transform of one tensor (grad_dp, dchi_privacy, the text
#: sanitizers, whose cost is one batch of text), 2 for a small trained module or an extra loss
#: (mid, nopeek, adversarial, textobfuscator, snd), 4 for per-example gradients (dp_sgd).
TARGETS: dict[str, float] = {
    "activation_dp": 1.05,
    "grad_topk": 1.05,
    "grad_dp": 1.5,
    "dchi_privacy": 1.5,
    "mid": 2.0,
    "nopeek": 2.0,
    "adversarial": 2.0,
    "dp_sgd": 4.0,
    "textobfuscator": 2.0,
    "snd": 2.0,
    "santext": 1.5,
    "custext": 1.5,
    "rantext": 1.5,
}

QUICK = ("activation_dp", "grad_topk", "santext")


def causal_lm_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Shifted next-token cross-entropy."""
    labels = batch["labels"]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def split_step(setting: str, defense: dict[str, Any] | None, tokenizer: Any) -> Callable[[], None]:
    """One training step of a fresh split system of ``setting`` (``"ht"`` or ``"hbt"``), with ``defense``."""
    torch.manual_seed(0)
    model = load_model(MODEL, "causal_lm")
    spec = SplitSpec("ht", 2) if setting == "ht" else SplitSpec("hbt", 2, 2)
    front = build_front([defense] if defense else [], model, seed=0, tokenizer=tokenizer)
    lora = FinetuneSpec("lora", r=8, alpha=16, target_modules=("q_proj", "v_proj"))
    system = build_split(
        model,
        spec,
        "causal_lm",
        dict.fromkeys(("head", "body", "tail"), lora),
        causal_lm_loss,
        OptimSpec(lr=1e-4, total_steps=100_000),
        labels_at="data",
        front=front,
    )
    return lambda: system.data_party.train_step(BATCH)


BATCH: dict[str, torch.Tensor] = {}


def measure(
    names: list[str], repeats: int, tokenizer: Any, texts: list[str], log: Callable[[str], None]
) -> dict[str, dict[str, float]]:
    """Median defended/undefended ratio and the two median step times of each defense in ``names``."""
    baselines: dict[str, Callable[[], None]] = {}
    results: dict[str, dict[str, float]] = {}
    for name in names:
        entry, setting = DEFENSES[name]
        base_setting = "ht" if setting == "text" else setting
        if base_setting not in baselines:
            baselines[base_setting] = split_step(base_setting, None, tokenizer)
        base = baselines[base_setting]
        start = time.perf_counter()
        if setting == "text":
            front = build_front([entry], load_model(MODEL, "causal_lm"), seed=0, tokenizer=tokenizer)
            context = FrontContext(phase="train")

            def defended(front: Any = front, context: FrontContext = context) -> None:
                front.text(texts, context)

        else:
            defended = split_step(setting, entry, tokenizer)
        setup_s = time.perf_counter() - start
        times = interleaved_times({"none": base, name: defended}, repeats)
        t_base, t_def = times["none"], times[name]
        if setting == "text":
            ratios = [1.0 + d / b for d, b in zip(t_def, t_base, strict=True)]
        else:
            ratios = [d / b for d, b in zip(t_def, t_base, strict=True)]
        results[name] = {
            "ratio": statistics.median(ratios),
            "defended_s": statistics.median(t_def),
            "none_s": statistics.median(t_base),
            "setup_s": setup_s,
            "spread": max(ratios) - min(ratios),
        }
        r = results[name]
        what = "sanitize" if setting == "text" else f"step ({setting})"
        log(
            f"  {name:15s} {what:11s} {r['defended_s']:.3f}s  undefended {r['none_s']:.3f}s  "
            f"ratio {r['ratio']:.3f} (spread {r['spread']:.3f})  setup {setup_s:.1f}s"
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--only", nargs="*", choices=sorted(DEFENSES), help="time only these defenses")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"batch 2 x 64, 2 repeats, only {', '.join(QUICK)}: under a minute",
    )
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = list(args.only or DEFENSES)
    if args.quick:
        args.batch, args.repeats = 2, 2
        names = [n for n in names if n in QUICK] if args.only else list(QUICK)
    tokenizer = load_tokenizer(MODEL)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tokenizer), (args.batch, args.seq), generator=g)
    BATCH.update(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone())
    from splitfed.data.fortunes import build_fortunes_topic

    texts = [ex["text"] for ex in build_fortunes_topic().train[: args.batch]]
    print(
        f"{MODEL}: batch {args.batch} x {args.seq} tokens, LoRA r=8 on q/v, HT split 2 (snd: HBT 2+2), "
        f"labels at the data party, {args.repeats} repeats, {torch.get_num_threads()} threads"
    )
    results = measure(names, args.repeats, tokenizer, texts, print)
    print(f"\n{'defense':15s} {'ratio':>7s} {'target':>7s}")
    for name, r in results.items():
        print(f"{name:15s} {r['ratio']:7.3f} {TARGETS[name]:7.2f}")
    for name, r in results.items():
        print(f"BENCH defense_overhead_{name} {r['ratio']:.3f} <= {TARGETS[name]}")


if __name__ == "__main__":
    main()
