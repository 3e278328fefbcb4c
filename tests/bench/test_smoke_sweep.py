"""examples/bench/smoke.yaml: the shipped smoke sweep runs on the offline smollm2-135m and reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitfed.bench.report import write_report
from splitfed.bench.scores import rank, scores
from splitfed.bench.store import ResultStore
from splitfed.bench.sweep import load_sweep, run_sweep

SMOKE = Path(__file__).resolve().parents[2] / "examples" / "bench" / "smoke.yaml"


@pytest.mark.integration
def test_the_smoke_sweep_runs_attacks_scores_and_reports(tmp_path: Path) -> None:
    sweep, root = load_sweep(SMOKE)
    sweep.out = str(tmp_path / "runs")
    the_plan = run_sweep(sweep, root, log=lambda s: None)
    assert len(the_plan.runs) == 3 and len(the_plan.stored) == 3
    with ResultStore(tmp_path / "runs" / "results.sqlite") as store:
        runs, attacks = store.runs(), store.attacks()
        assert all(r.status == "done" for r in runs) and all(a.status == "done" for a in attacks)
        undefended = next(r for r in runs if r.spec["defense"] == "none")
        by_attack = {a.attack: a for a in store.attacks(undefended.key)}
    # Honest numbers: the white-box inversion beats its linear baseline on the undefended run, and
    # label inference from the logits' gradients is exact.
    vmi = by_attack["vmi"]
    assert vmi.ap is not None and vmi.ap > vmi.baseline["token_f1"] and vmi.ap > 0.5
    assert by_attack["bli"].ap == 1.0
    ranking = rank(scores(runs, attacks))
    assert {r.defense for r in ranking} == {"none", "activation_dp"}
    paths = write_report(tmp_path / "runs" / "results.sqlite", tmp_path / "report")
    assert paths.index.is_file() and len(paths.figures) >= 3
