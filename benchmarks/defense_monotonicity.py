"""Whether each defense's attack performance (AP) falls as its strength rises, with the MP it costs.

Runs the sweeps ``examples/bench/monotonicity.yaml`` (smollm2-135m, fortunes-topic, HT split
after 2 blocks, three strengths of every defense that works in HT) and
``examples/bench/monotonicity_hbt.yaml`` (the same in HBT 2 + 2, for split-and-denoise, which
needs the data party's tail); 40 training steps, two seeds, the attacks reading each run's last
training batch (8 sequences), so that a defense that trains with the task has trained. Runs
already in a store are skipped (the stores, under ``benchmarks/results/``, are committed). Then
it reads each SQLite store and prints, per defense, strength and targeted attack, the main-task
performance (MP), the AP and the attack's chance level, weakest to strongest with that sweep's
undefended run first.

AP counts as monotone when, along that order, it never rises by more than the tolerance: the
larger of ``--tol`` and the spread of AP over the sweep's seeds at any one point (with one seed,
``--tol`` alone); an AP at or below its chance level counts as chance (an attack that recovers
nothing wobbles around it). Which parameter is the strength, and which way it grows, is
:data:`STRENGTH` (a defense swept along two parameters, or at two settings of a fixed one, gives
one series per setting, each checked on its own); which attacks a defense is meant to stop is :data:`TARGETED`.

    python benchmarks/defense_monotonicity.py                 # both sweeps (about 1 h on 2 cores; resumable)
    python benchmarks/defense_monotonicity.py --table-only    # print the table of a stored sweep
    python benchmarks/defense_monotonicity.py --quick         # grad_topk at 2 strengths, 2 steps,
                                                              # bli label inference (< 1 minute)

Ends with one line per defense: ``BENCH <defense>_ap_monotone <1 or 0> >= 1``.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from transformers.utils import logging as hf_logging

from splitfed.bench.scores import NO_DEFENSE
from splitfed.bench.store import ResultStore
from splitfed.bench.sweep import SweepConfig, load_sweep, run_sweep, sweep_paths

SWEEPS = [
    Path(__file__).parents[1] / "examples" / "bench" / name
    for name in ("monotonicity.yaml", "monotonicity_hbt.yaml")
]

#: Each defense's strength parameters and their direction: +1 when a larger value protects more,
#: -1 when a smaller one does (a privacy budget, a fraction sent, a bottleneck's width). A run's
#: strength is the first of these its sweep entry varies; its other parameters name its series.
STRENGTH: dict[str, tuple[tuple[str, int], ...]] = {
    "activation_dp": (("epsilon", -1), ("clip", -1)),
    "dchi_privacy": (("epsilon", -1),),
    "santext": (("epsilon", -1),),
    "custext": (("epsilon", -1),),
    "rantext": (("epsilon", -1),),
    "snd": (("epsilon", -1),),
    "grad_topk": (("fraction", -1),),
    "grad_dp": (("noise_multiplier", 1),),
    "dp_sgd": (("noise_multiplier", 1),),
    "nopeek": (("weight", 1),),
    "mid": (("weight", 1), ("bottleneck", -1)),
    "adversarial": (("weight", 1),),
    "textobfuscator": (("noise_scale", 1),),
}

#: The attacks each defense is meant to stop (the table shows only these).
TARGETED: dict[str, tuple[str, ...]] = {
    "activation_dp": ("vmi", "linear"),
    "dchi_privacy": ("vmi", "linear"),
    "santext": ("vmi", "linear"),
    "custext": ("vmi", "linear"),
    "rantext": ("vmi", "linear"),
    "snd": ("vmi", "linear"),
    "nopeek": ("vmi", "linear"),
    "mid": ("vmi", "linear"),
    "adversarial": ("vmi", "linear"),
    "textobfuscator": ("vmi", "linear"),
    "grad_topk": ("bli",),
    "grad_dp": ("bli",),
    # DP-SGD bounds what the data party's own trained parameters reveal about one example
    # (membership inference on them); it changes neither the activations the inverters read nor
    # the gradients bli reads, so no attack of these sweeps is its target: the table shows its MP
    # cost only.
    "dp_sgd": (),
}
#: Why a defense has no targeted attack in these sweeps (printed beside its MP cost).
UNTARGETED = {
    "dp_sgd": "targets membership inference on the data party's parameters, which these sweeps do not run",
}

#: A defense's series: its name, its strength parameter and the parameters that stay fixed along
#: it, as ``key=value`` text (two sweep entries of one defense at different clips are two series).
Series = tuple[str, str, str]
#: ``(MP values, AP values, chance levels)`` over seeds, keyed by (series, strength value, attack).
Cells = dict[tuple[Series, float | None, str], tuple[list[float], list[float], list[float]]]


def strength_of(defense: str, varied: dict[str, object]) -> tuple[str, int]:
    """The strength parameter of a run of ``defense`` whose sweep entry varies ``varied``.

    The first parameter of :data:`STRENGTH` that the entry varies; an entry that varies none of them
    (one strength) reads the first.
    """
    candidates = STRENGTH.get(defense, (("", 1),))
    return next(((p, d) for p, d in candidates if p in varied), candidates[0])


def series_of(defense: str, params: dict[str, object], strength: str) -> Series:
    """The series of a run: ``defense``, ``strength`` and every other parameter in ``params``, sorted."""
    fixed = ", ".join(f"{k}={v}" for k, v in sorted(params.items()) if k != strength)
    return defense, strength, fixed


def direction_of(series: Series) -> int:
    """+1 when a larger value of the series' strength protects more, -1 when a smaller one does."""
    defense, strength, _ = series
    return dict(STRENGTH.get(defense, ()))[strength] if strength else 1


def quick_sweep(sweep: SweepConfig, out: Path) -> SweepConfig:
    """A tiny subset of ``sweep``: gradient sparsification at two strengths, two training steps, bli.

    Label inference reads the recorded gradients and costs next to nothing; the inverters fit or
    optimize for tens of seconds each, too long for a check under a minute.
    """
    return sweep.model_copy(
        update={
            "name": f"{sweep.name}-quick",
            "set": sweep.set
            | {"train.steps": 2, "data.max_train": 16, "data.max_eval": 8, "data.max_length": 16},
            "defenses": [NO_DEFENSE, {"name": "grad_topk", "fraction": [0.01, 0.5]}],
            "attacks": ["bli"],
            "max_examples": 4,
            "out": str(out),
            "store": None,
        }
    )


def collect(store: ResultStore, sweep: str) -> Cells:
    """MP and AP of every done run and attack of ``sweep`` in ``store``, grouped over seeds.

    Runs of one defense fall in one series per combination of their parameters other than the
    strength (e.g. activation DP at clip 10 and at clip 100 are two series, each along ε).
    """
    cells: Cells = defaultdict(lambda: ([], [], []))
    for run in store.runs(sweep):
        if run.status != "done" or run.mp is None:
            continue
        defense = str(run.spec.get("defense", NO_DEFENSE))
        if defense == NO_DEFENSE:
            series, value = (NO_DEFENSE, "", ""), None
        else:
            varied = dict(run.spec.get("strength") or {})
            param, _ = strength_of(defense, varied)
            params = dict(run.spec.get("params") or varied)
            series = series_of(defense, params, param)
            raw = params.get(param, varied.get(param))
            value = float(raw) if isinstance(raw, int | float) else None
        for attack in store.attacks(run.key):
            if attack.status == "done" and attack.ap is not None:
                mp, ap, chance = cells[(series, value, attack.attack)]
                mp.append(float(run.mp))
                ap.append(float(attack.ap))
                chance.append(float(attack.chance or 0.0))
    return cells


def monotone(aps: list[list[float]], tol: float, chance: list[float] | None = None) -> bool:
    """Whether the mean APs (weakest strength first) never rise by more than ``tol`` or the seed spread.

    An AP at or below its chance level (``chance``, one per point) counts as that level: an attack
    that recovers nothing scores around chance, and its wobble there is not a weaker defense.
    """
    spread = max((max(a) - min(a) for a in aps), default=0.0)
    allowed = max(tol, spread)
    floors = chance or [0.0] * len(aps)
    means = [max(statistics.fmean(a), floor) for a, floor in zip(aps, floors, strict=True)]
    return all(later <= earlier + allowed for earlier, later in itertools.pairwise(means))


def report(cells: Cells, tol: float) -> dict[str, bool]:
    """Print the defense x strength x attack table; return whether AP is monotone for each defense.

    A defense is monotone when each of its series is.
    """
    none: Series = (NO_DEFENSE, "", "")
    every = sorted({s for s, _, _ in cells if s != none})
    verdicts: dict[str, bool] = {}
    print(
        f"{'defense':14s} {'strength':>22s} {'attack':8s} {'MP':>6s} {'AP':>6s} {'chance':>6s} {'seeds':>5s}"
    )
    for series in every:
        defense, param, fixed = series
        direction = direction_of(series)
        values = sorted({v for s, v, _ in cells if s == series}, key=lambda v: direction * float(v or 0))
        if fixed:
            print(f"{defense:14s} ({fixed})")
        ok = True
        if not TARGETED.get(defense):
            for v in values:
                mps = [mp for (s, value, _), (mp, _, _) in cells.items() if s == series and value == v]
                print(
                    f"{defense:14s} {f'{param}={v:g}':>22s} {'-':8s} {statistics.fmean(mps[0]):6.3f} {'-':>6s}"
                )
            print(f"{'':14s} {'':>22s} {defense} {UNTARGETED.get(defense, 'has no targeted attack here')}")
            continue
        for attack in TARGETED.get(defense, ()):
            points = [(None, cells.get((none, None, attack)))] + [
                (v, cells.get((series, v, attack))) for v in values
            ]
            points = [(v, c) for v, c in points if c is not None]
            if len(points) < 2:
                continue
            for v, (mp, ap, chance) in points:
                label = "none" if v is None else f"{param}={v:g}"
                print(
                    f"{defense:14s} {label:>22s} {attack:8s} {statistics.fmean(mp):6.3f} "
                    f"{statistics.fmean(ap):6.3f} {statistics.fmean(chance):6.3f} {len(ap):5d}"
                )
            attack_ok = monotone([c[1] for _, c in points], tol, [statistics.fmean(c[2]) for _, c in points])
            print(f"{'':14s} {'':>22s} {attack:8s} AP monotone: {'yes' if attack_ok else 'NO'}")
            ok = ok and attack_ok
        verdicts[defense] = verdicts.get(defense, True) and ok
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sweep",
        type=Path,
        nargs="+",
        default=SWEEPS,
        help="sweep YAMLs (default: monotonicity.yaml and monotonicity_hbt.yaml)",
    )
    parser.add_argument("--tol", type=float, default=0.02, help="AP rise tolerated between strengths")
    parser.add_argument(
        "--table-only", action="store_true", help="print the table of what is stored; run nothing"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="grad_topk at 2 strengths, 2 steps, bli, in a temporary store: under a minute",
    )
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    verdicts: dict[str, bool] = {}
    for path in args.sweep[:1] if args.quick else args.sweep:
        sweep, root = load_sweep(path)
        if args.quick:
            sweep = quick_sweep(sweep, Path(tempfile.mkdtemp(prefix="splitfed-monotonicity-")))
        _, store_path = sweep_paths(sweep, root)
        if not args.table_only:
            start = time.perf_counter()
            run_sweep(sweep, root, store_path=store_path)
            print(f"sweep {sweep.name}: {time.perf_counter() - start:.0f} s")
        elif not store_path.exists():
            print(f"sweep {sweep.name}: nothing stored yet ({store_path})")
            continue
        with ResultStore(store_path) as store:
            cells = collect(store, sweep.name)
        print(f"sweep {sweep.name} ({store_path})")
        for defense, ok in report(cells, args.tol).items():
            verdicts[defense] = verdicts.get(defense, True) and ok
    for defense, ok in verdicts.items():
        print(f"BENCH {defense}_ap_monotone {int(ok)} >= 1")


if __name__ == "__main__":
    main()
