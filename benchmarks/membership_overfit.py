"""Membership inference against a deliberately overfit split fine-tune of smollm2-135m, with its control.

The target: an HT SplitLoRA run (r=8 on q/v in head and body, split after block 2, causal LM on
``shakespeare``, sequences of 32 tokens) trains ``--epochs`` epochs over ``--members`` training
examples at a high constant learning rate, so it memorises them. The attacker queries the whole
fine-tuned model's loss (:mod:`splitfed.privacy.attacks.membership`): the loss-threshold attack
and, with ``--references``, reference models it fine-tunes itself with the run's recipe on the
dataset's test split (disjoint from everything scored), calibrating each example's difficulty.

Members are the run's training examples; non-members are ``--pool`` training-split examples the
run never saw (the same distribution, so the AUC measures memorisation, not a shift between
splits; the run's validation split is scored too, as ``splitfed membership`` would). The control
scores two halves of one pool of unseen examples as if one half were members: nothing separates
them, so its AUC must sit at 0.5 within ``CONTROL_TOLERANCE`` (``--pool`` examples per half
keep the AUC's own sampling spread, about ``0.29 / sqrt(pool)``, well inside it).

    python benchmarks/membership_overfit.py           # 32 members, 15 epochs, 1 reference, pool 300 (~5 min)
    python benchmarks/membership_overfit.py --quick   # 16 members, 8 epochs, no reference, pool 96 (< 1 minute)

Ends with one line per target: ``BENCH <name> <measured> <op> <target>``.
"""

from __future__ import annotations

import argparse
import random
import shutil
import time
from typing import Any

from _bench import smollm2_splitlora_config
from transformers.utils import logging as hf_logging

TARGET_AUC = 0.8
CONTROL_TOLERANCE = 0.05


def _text(example: dict[str, Any]) -> str:
    return str(example.get("text", ""))


#: Sequences per optimizer step of the target run.
BATCH = 8


def overfit_target(
    members: int,
    epochs: int,
    lr: float,
    *,
    body_frozen: bool = False,
    defenses: list[dict[str, Any]] | None = None,
) -> tuple[Any, float]:
    """Train the target run: ``epochs`` passes over ``members`` shakespeare examples at ``lr``.

    ``body_frozen``: the model party's body keeps its pretrained weights, so only the data party's
    head adapters learn (what DP-SGD on the data party covers). ``defenses``: the run's list.
    Returns the run's result and its training seconds.
    """
    from splitfed.config import parse_config
    from splitfed.run import train

    steps = epochs * -(-members // BATCH)
    raw = smollm2_splitlora_config(
        "model",
        "membership",
        2,
        steps=steps,
        batch_size=BATCH,
        lr=lr,
        eval_before=False,
        eval_max_new_tokens=0,
    )
    raw["data"] |= {"max_length": 32, "max_train": members, "max_eval": 64}
    if body_frozen:
        raw["finetune"]["body"] = {"mode": "frozen"}
    raw["defenses"] = list(defenses or [])
    t0 = time.perf_counter()
    result = train(parse_config(raw), progress=True, log=lambda s: None)
    return result, time.perf_counter() - t0


def unseen_pools(run: Any, pool: int, count: int = 3) -> list[list[dict[str, Any]]]:
    """``count`` disjoint pools of ``pool`` training-split examples ``run`` never saw (shuffled, seed 0)."""
    from splitfed.data import load_splits

    cfg = run.cfg
    seen = {_text(e) for e in run.members}
    everything = load_splits(cfg.data.model_copy(update={"task": cfg.task, "max_train": None}))
    unseen = [e for e in everything.train if _text(e) not in seen and _text(e).strip()]
    random.Random(0).shuffle(unseen)
    if len(unseen) < count * pool:
        raise SystemExit(f"the training split has {len(unseen)} unseen examples; lower --pool")
    return [unseen[i * pool : (i + 1) * pool] for i in range(count)]


def attack(
    run: Any, references: list[Any], members: list[dict[str, Any]], others: list[dict[str, Any]], what: str
) -> dict[str, float]:
    """Membership inference of ``members`` against ``others`` on ``run``'s model; prints and returns its metrics."""
    from splitfed.privacy.attacks.membership import run_membership

    res = run_membership(run.model, references, members, others, run.work.task)
    shown = {k: round(v, 3) for k, v in res.metrics.items()}
    print(f"{what}: {len(members)} vs {len(others)} in {res.seconds:.0f} s: {shown}")
    return res.metrics


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="16 members, 8 epochs, no reference model")
    parser.add_argument("--members", type=int, default=32, help="training examples of the target run")
    parser.add_argument("--epochs", type=int, default=15, help="passes over them")
    parser.add_argument("--lr", type=float, default=2e-3, help="constant learning rate (high: to overfit)")
    parser.add_argument("--references", type=int, default=1, help="reference models (0: loss attack only)")
    parser.add_argument("--pool", type=int, default=300, help="unseen examples per side of the control")
    args = parser.parse_args()
    if args.quick:
        args.members, args.epochs, args.references, args.pool = 16, 8, 0, 96
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    from splitfed.privacy.attacks.membership import load_target_run, train_references

    result, train_s = overfit_target(args.members, args.epochs, args.lr)
    steps = len(result.history)
    print(
        f"target: {args.members} members, {steps} steps at lr {args.lr}: {train_s:.0f} s; {result.metrics_after}"
    )

    run = load_target_run(result.output_dir)
    non_members, control_a, control_b = unseen_pools(run, args.pool)

    t1 = time.perf_counter()
    references = train_references(run, args.references, run.auxiliary, steps=steps)
    if references:
        print(
            f"{len(references)} reference model(s): {steps} steps each on {len(run.auxiliary)} "
            f"test-split examples, {time.perf_counter() - t1:.0f} s"
        )

    main_metrics = attack(
        run, references, run.members, non_members, "members vs unseen training-split examples"
    )
    attack(
        run,
        references,
        run.members,
        run.non_members,
        "members vs the validation split (what `splitfed membership` scores)",
    )
    control = attack(run, references, control_a, control_b, "control: two halves of one unseen pool")
    shutil.rmtree(result.output_dir, ignore_errors=True)

    best = max(v for k, v in main_metrics.items() if k.endswith("_auc"))
    worst_control = max(abs(v - 0.5) for k, v in control.items() if k.endswith("_auc"))
    print(f"BENCH membership_auc_overfit {best:.3f} >= {TARGET_AUC}")
    print(f"BENCH membership_control_auc_dev {worst_control:.3f} <= {CONTROL_TOLERANCE}")


if __name__ == "__main__":
    main()
