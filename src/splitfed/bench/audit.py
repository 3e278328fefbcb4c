"""Audit of one recorded run: every attack that applies to what crossed, with a plain verdict.

``splitfed audit RUN_DIR`` reads the run's ``results.json`` (its config and where its recording
is), runs each registered attack whose inputs the recording holds, as the honest-but-curious
model party would, and says per attack whether it recovers more than chance. Given a sweep's
results store, it also suggests the defense that scored best against each attack there.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitfed.config import ConfigError, RunConfig, parse_config

#: How far above chance an attack must score to count as leaking (an absolute margin on AP).
LEAK_MARGIN = 0.05


@dataclass
class Finding:
    """One attack's outcome on the audited run."""

    attack: str
    crossing: str
    metric: str | None
    score: float | None
    baseline: float | None
    chance: float | None
    verdict: str
    examples: list[dict[str, str]] = field(default_factory=list)
    suggestion: str | None = None


@dataclass
class Audit:
    """What :func:`audit_run` found."""

    run_dir: Path
    recording: Path
    findings: list[Finding]

    def summary(self) -> dict[str, Any]:
        """A JSON-ready dictionary."""
        return {
            "run_dir": str(self.run_dir),
            "recording": str(self.recording),
            "findings": [f.__dict__ for f in self.findings],
        }


def _recorded_run(run_dir: Path) -> tuple[RunConfig, Path]:
    results = run_dir / "results.json"
    if not results.is_file():
        raise ConfigError(f"{run_dir} has no results.json: audit a finished run's output_dir")
    summary = json.loads(results.read_text())
    recording = (summary.get("recording") or {}).get("directory")
    if not recording:
        raise ConfigError(
            f"the run in {run_dir} was not recorded: run it again with --record DIR (train, join or serve)"
        )
    return parse_config(summary["config"]), Path(recording)


def _verdict(score: float | None, chance: float | None) -> str:
    if score is None:
        return "no score"
    if chance is None:
        return f"recovers {score:.2f}"
    if score > chance + LEAK_MARGIN:
        return f"LEAKS: {score:.2f} against chance {chance:.2f}"
    return f"at chance: {score:.2f} against {chance:.2f}"


def audit_run(
    run_dir: str | Path,
    *,
    attacks: Sequence[dict[str, Any] | str] | None = None,
    store: str | Path | None = None,
    aux: str | None = None,
    max_examples: int | None = 32,
    max_mp_drop: float = 0.05,
    progress: bool = False,
) -> Audit:
    """Attack the recording of the run in ``run_dir`` with every attack that applies.

    Parameters
    ----------
    run_dir : str | Path
        A finished run's output directory (with ``results.json``), recorded with ``--record``.
    attacks : Sequence[dict | str] | None, default None
        Attack specs; ``None``: every registered attack whose inputs were recorded.
    store : str | Path | None
        A sweep's results store: suggest per attack the defense with the best DCS there.
    aux : str | None
        The attacker's auxiliary text (a file or a split; default the dataset's test split).
    max_examples : int | None, default 32
        Sequences attacked per attack.
    max_mp_drop : float, default 0.05
        The largest main-task drop a suggested defense may cost.
    """
    from splitfed.bench.sweep import why_not_applicable
    from splitfed.privacy.attack_runs import attack_context, auxiliary_texts
    from splitfed.privacy.attacks import ATTACKS, build_attack, run_attack
    from splitfed.protocol import KINDS

    run_dir = Path(run_dir)
    cfg, recording = _recorded_run(run_dir)
    specs = [({"name": a} if isinstance(a, str) else dict(a)) for a in (attacks or sorted(ATTACKS))]
    suggestions = _suggestions(store, max_mp_drop) if store is not None else {}
    context = None
    findings = []
    for spec in specs:
        cls = ATTACKS.get(spec["name"])
        attack = build_attack(spec)
        needs = getattr(cls, "needs", ())
        crossing = ", ".join(sorted({f"{n.kind}.{n.tensor} ({KINDS[n.kind].direction})" for n in needs}))
        reason = why_not_applicable(spec, recording)
        if reason is not None:
            if attacks is not None:  # asked for by name: say why it did not run
                findings.append(
                    Finding(spec["name"], crossing, None, None, None, None, f"not applicable: {reason}")
                )
            continue
        if context is None:
            context = attack_context(
                cfg, auxiliary_texts(cfg, aux), max_examples=max_examples, progress=progress
            )
        result = run_attack(attack, recording, context, phases="train")
        metric = next(
            (m for m in ("token_f1", "label_accuracy", "accuracy", "auc") if m in result.metrics), None
        )
        score = result.metrics.get(metric) if metric else None
        findings.append(
            Finding(
                spec["name"],
                crossing,
                metric,
                score,
                result.baseline.get(metric) if metric else None,
                result.chance,
                _verdict(score, result.chance),
                [{"original": e.original, "reconstructed": e.reconstructed} for e in result.examples],
                suggestions.get(spec["name"]),
            )
        )
    return Audit(run_dir, recording, findings)


def _suggestions(store: str | Path, max_mp_drop: float) -> dict[str, str]:
    from splitfed.bench.scores import recommend, scores
    from splitfed.bench.store import ResultStore

    with ResultStore(store) as db:
        best = recommend(scores(db.runs(), db.attacks()), max_mp_drop=max_mp_drop)
    return {
        attack: f"{s.strength}: AP {s.ap:.2f} (undefended {s.ap_undefended:.2f}), MP {s.mp:.3f} vs {s.mp_star:.3f}, DCS {s.dcs:.3f}"
        if s.ap_undefended is not None
        else f"{s.strength}: AP {s.ap:.2f}, MP {s.mp:.3f} vs {s.mp_star:.3f}, DCS {s.dcs:.3f}"
        for attack, s in best.items()
    }
