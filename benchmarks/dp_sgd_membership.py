"""DP-SGD against the attack it targets: membership inference on the data party's trained parameters.

The target is the overfit split fine-tune of ``membership_overfit.py`` (smollm2-135m, HT split
after block 2, causal LM on ``shakespeare``, ``--members`` examples, ``--epochs`` passes at a high
constant learning rate) with the model party's body frozen, so that everything the run learns is
in the data party's head adapters: what DP-SGD (:mod:`splitfed.privacy.defenses.dp_sgd`) clips
and noises. One target is trained without the defense and one per ``--noise`` multiplier
(``max_grad_norm`` 1, ``sample_rate`` = batch / members for the accountant); each is attacked
with the loss-threshold attack (and, with ``--references``, reference models) on its members
against ``--pool`` unseen training-split examples, as in ``membership_overfit.py``.

The table gives, per noise multiplier, ε at δ (the accountant's, after the whole run), the main
task's eval loss (MP: lower is better), and each attack's AUC (chance 0.5). AP is the best AUC.
It is monotone when, as σ grows, the AP never rises by more than ``--tol`` (an AUC's own sampling
spread with 32 members against 300 is about 0.05); an AP at or below 0.5 counts as 0.5.

    python benchmarks/dp_sgd_membership.py            # 32 members, 25 epochs, σ 0.3 / 1 / 3 (31 min beside a sweep)
    python benchmarks/dp_sgd_membership.py --quick    # 16 members, 6 epochs, σ 1, pool 64 (< 2 minutes)

Ends with one line per target: ``BENCH <name> <measured> <op> <target>``.
"""

from __future__ import annotations

import argparse
import itertools
import shutil

from membership_overfit import BATCH, attack, overfit_target, unseen_pools
from transformers.utils import logging as hf_logging

#: The undefended target must leak: a membership attack that fails on it measures nothing.
TARGET_AUC = 0.8


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="16 members, 6 epochs, σ 1, pool 64")
    parser.add_argument("--members", type=int, default=32, help="training examples of each target run")
    parser.add_argument(
        "--epochs", type=int, default=25, help="passes over them (15 left the undefended AUC at 0.78)"
    )
    parser.add_argument("--lr", type=float, default=2e-3, help="constant learning rate (high: to overfit)")
    parser.add_argument(
        "--noise", type=float, nargs="+", default=[0.3, 1.0, 3.0], help="DP-SGD noise multipliers σ"
    )
    parser.add_argument(
        "--references", type=int, default=0, help="reference models per target (0: loss attack)"
    )
    parser.add_argument(
        "--pool", type=int, default=300, help="unseen examples the members are scored against"
    )
    parser.add_argument("--tol", type=float, default=0.05, help="AUC rise tolerated between noise levels")
    args = parser.parse_args()
    if args.quick:
        args.members, args.epochs, args.noise, args.pool = 16, 6, [1.0], 64
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    from splitfed.privacy.attacks.membership import load_target_run, train_references

    rows: list[tuple[str, float | None, float, float, dict[str, float]]] = []
    for sigma in [None, *args.noise]:
        defenses = (
            []
            if sigma is None
            else [
                {"name": "dp_sgd", "sample_rate": min(1.0, BATCH / args.members), "noise_multiplier": sigma}
            ]
        )
        result, train_s = overfit_target(
            args.members, args.epochs, args.lr, body_frozen=True, defenses=defenses
        )
        label = "none" if sigma is None else f"sigma={sigma:g}"
        epsilon = result.history[-1].get("dp_sgd_epsilon") if sigma is not None else None
        mp = float(result.metrics_after.get("loss", float("nan")))
        run = load_target_run(result.output_dir)
        (non_members,) = unseen_pools(run, args.pool, count=1)
        references = train_references(run, args.references, run.auxiliary, steps=len(result.history))
        print(
            f"{label}: {len(result.history)} steps in {train_s:.0f} s; epsilon {epsilon}; {result.metrics_after}"
        )
        metrics = attack(run, references, run.members, non_members, f"{label}: members vs unseen")
        ap = max(v for k, v in metrics.items() if k.endswith("_auc"))
        rows.append((label, epsilon, mp, ap, metrics))
        shutil.rmtree(result.output_dir, ignore_errors=True)

    print(f"\n{'defense':>12s} {'epsilon':>10s} {'eval loss':>10s} {'AP (AUC)':>9s}  attacks")
    for label, epsilon, mp, ap, metrics in rows:
        eps = "-" if epsilon is None else f"{epsilon:.3g}"
        aucs = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.endswith("_auc"))
        print(f"{label:>12s} {eps:>10s} {mp:10.3f} {ap:9.3f}  {aucs}")
    aps = [max(ap, 0.5) for *_, ap, _ in rows]
    ok = all(later <= earlier + args.tol for earlier, later in itertools.pairwise(aps))
    print(f"BENCH dp_sgd_membership_auc_undefended {rows[0][3]:.3f} >= {TARGET_AUC}")
    print(f"BENCH dp_sgd_membership_auc_strongest {rows[-1][3]:.3f} <= {rows[0][3]:.3f}")
    print(f"BENCH dp_sgd_ap_monotone {int(ok)} >= 1")


if __name__ == "__main__":
    main()
