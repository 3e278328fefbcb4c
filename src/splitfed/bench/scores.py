"""Scores of a sweep: MP, AP, and VFLAIR-LLM's defense capability score (DCS, T-DCS, C-DCS).

For a defense at one strength, in one setting (model, HT/HBT, split point, fine-tuning mode,
seed), against one attack:

* MP, the main-task performance: the task's metric after fine-tuning with the defense;
* AP, the attack performance: the attack's score on what crossed (token F1 of an inversion,
  label accuracy of label inference);
* MP*, the undefended MP of the same setting; AP* = 0 (the ideal defense);
* DCS = 1 / (1 + sqrt((1 − β)(AP − AP*)² + β(MP − MP*)²)), β = 0.5 by default: 1 is a defense
  that stops the attack at no cost to the task, lower is worse on either axis;
* T-DCS: the mean DCS over the attacks of one type (inversion, label inference, ...);
  C-DCS: the mean over all attacks.

As in VFLAIR-LLM (Zou et al., "VFLAIR-LLM: A Comprehensive Framework and Benchmark for Split
Learning of LLMs", 2025), an MP *above* MP* is penalized like one below it (the distance is to
the undefended point); the report says so.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from splitfed.bench.store import AttackRow, RunRow

#: The defense entry of an undefended run.
NO_DEFENSE = "none"
#: Axes that make two runs the same setting (they differ only in the defense and its strength).
SETTING_AXES = ("model", "task", "setting", "head_layers", "tail_layers", "mode", "seed")


def dcs(mp: float, ap: float, mp_star: float, ap_star: float = 0.0, beta: float = 0.5) -> float:
    """VFLAIR-LLM's defense capability score of one (MP, AP) point.

    Raises
    ------
    ValueError
        For ``beta`` outside ``[0, 1]``.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1]; got {beta}")
    return 1.0 / (1.0 + math.sqrt((1 - beta) * (ap - ap_star) ** 2 + beta * (mp - mp_star) ** 2))


def setting_of(spec: Mapping[str, Any]) -> tuple[Any, ...]:
    """The setting a run belongs to: its values of :data:`SETTING_AXES`."""
    return tuple(spec.get(axis) for axis in SETTING_AXES)


def defense_label(spec: Mapping[str, Any]) -> str:
    """``name`` or ``name(param=value, ...)`` of a run's defense, for tables and figures."""
    name = str(spec.get("defense", NO_DEFENSE))
    strength = spec.get("strength") or {}
    if not strength:
        return name
    return f"{name}({', '.join(f'{k}={v}' for k, v in sorted(strength.items()))})"


@dataclass(frozen=True)
class Score:
    """One defense at one strength in one setting against one attack."""

    setting: tuple[Any, ...]
    defense: str
    strength: str
    attack: str
    attack_type: str
    mp: float
    ap: float
    mp_star: float
    ap_undefended: float | None
    dcs: float
    run_key: str


def scores(runs: Sequence[RunRow], attacks: Sequence[AttackRow], beta: float = 0.5) -> list[Score]:
    """Every (defended or undefended) run × attack that finished, scored against its undefended setting.

    Runs whose setting has no finished undefended run are left out (there is no MP* to compare with).
    """
    done = [r for r in runs if r.status == "done" and r.mp is not None]
    mp_star: dict[tuple[Any, ...], float] = {}
    undefended_key: dict[tuple[Any, ...], str] = {}
    for run in done:
        if run.spec.get("defense", NO_DEFENSE) == NO_DEFENSE:
            mp_star[setting_of(run.spec)] = float(run.mp)  # type: ignore[arg-type]
            undefended_key[setting_of(run.spec)] = run.key
    by_run: dict[str, list[AttackRow]] = defaultdict(list)
    for row in attacks:
        if row.status == "done" and row.ap is not None:
            by_run[row.run_key].append(row)
    undefended_ap = {
        (setting, row.attack_key): float(row.ap)  # type: ignore[arg-type]
        for setting, key in undefended_key.items()
        for row in by_run.get(key, [])
    }
    out = []
    for run in done:
        setting = setting_of(run.spec)
        if setting not in mp_star:
            continue
        for row in by_run.get(run.key, []):
            out.append(
                Score(
                    setting,
                    str(run.spec.get("defense", NO_DEFENSE)),
                    defense_label(run.spec),
                    row.attack,
                    str(row.spec.get("type", row.attack)),
                    float(run.mp),  # type: ignore[arg-type]
                    float(row.ap),  # type: ignore[arg-type]
                    mp_star[setting],
                    undefended_ap.get((setting, row.attack_key)),
                    dcs(float(run.mp), float(row.ap), mp_star[setting], beta=beta),  # type: ignore[arg-type]
                    run.key,
                )
            )
    return out


@dataclass(frozen=True)
class Ranking:
    """A defense at one strength, averaged over settings: its T-DCS per attack type and C-DCS."""

    strength: str
    defense: str
    t_dcs: dict[str, float]
    c_dcs: float
    mp: float
    mp_drop: float
    n: int


def rank(all_scores: Iterable[Score]) -> list[Ranking]:
    """Defenses (at each strength) by C-DCS, best first; T-DCS per attack type beside."""
    groups: dict[str, list[Score]] = defaultdict(list)
    for s in all_scores:
        groups[s.strength].append(s)
    out = []
    for strength, items in groups.items():
        by_type: dict[str, list[float]] = defaultdict(list)
        for s in items:
            by_type[s.attack_type].append(s.dcs)
        out.append(
            Ranking(
                strength,
                items[0].defense,
                {t: sum(v) / len(v) for t, v in sorted(by_type.items())},
                sum(s.dcs for s in items) / len(items),
                sum(s.mp for s in items) / len(items),
                sum(s.mp_star - s.mp for s in items) / len(items),
                len(items),
            )
        )
    return sorted(out, key=lambda r: -r.c_dcs)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (MP, AP) points no other point beats (higher MP and lower AP), by MP."""
    front = []
    for i, (mp, ap) in enumerate(points):
        dominated = any(
            (m >= mp and a <= ap) and (m > mp or a < ap) for j, (m, a) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def recommend(all_scores: Iterable[Score], max_mp_drop: float = 0.05) -> dict[str, Score]:
    """Per attack, the defense with the best DCS whose MP drop stays within ``max_mp_drop``."""
    best: dict[str, Score] = {}
    for s in all_scores:
        if s.defense == NO_DEFENSE or s.mp_star - s.mp > max_mp_drop:
            continue
        if s.attack not in best or s.dcs > best[s.attack].dcs:
            best[s.attack] = s
    return best
