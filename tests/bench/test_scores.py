"""DCS, T-DCS, C-DCS, Pareto frontiers and recommendations, on hand-made results."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from splitfed.bench.scores import dcs, pareto_front, rank, recommend, scores
from splitfed.bench.store import ResultStore, StoreError, spec_key


def test_dcs_is_vflair_s_formula() -> None:
    assert dcs(0.9, 0.0, 0.9) == 1.0  # the ideal defense: no attack, no task cost
    assert dcs(0.8, 0.6, 0.9) == pytest.approx(1 / (1 + math.sqrt(0.5 * 0.36 + 0.5 * 0.01)))
    assert dcs(0.8, 0.6, 0.9, beta=1.0) == pytest.approx(1 / 1.1)  # only the task counts
    assert dcs(1.0, 0.6, 0.9) == dcs(0.8, 0.6, 0.9)  # distance to the undefended point, either side
    with pytest.raises(ValueError, match="beta"):
        dcs(0.8, 0.6, 0.9, beta=1.5)


def test_pareto_front_keeps_points_nothing_beats() -> None:
    points = [(0.9, 0.8), (0.85, 0.3), (0.8, 0.5), (0.5, 0.1), (0.85, 0.3)]
    assert pareto_front(points) == [3, 1, 4, 0]  # (0.8, 0.5) is beaten by (0.85, 0.3)


def _store(tmp_path: Path) -> ResultStore:
    store = ResultStore(tmp_path / "results.sqlite")
    base = {"model": "m", "task": "classification", "setting": "ht", "head_layers": 1, "tail_layers": 0}
    runs = [
        ("none", {}, 0.90, {"vmi": 0.95, "bli": 1.0}),
        ("activation_dp", {"epsilon": 1}, 0.70, {"vmi": 0.10, "bli": 0.6}),
        ("activation_dp", {"epsilon": 8}, 0.88, {"vmi": 0.40, "bli": 0.9}),
    ]
    for defense, strength, mp, aps in runs:
        spec = base | {"mode": "splitlora", "seed": 0, "defense": defense, "strength": strength}
        key = spec_key(spec)
        store.put_run(key, sweep="s", spec=spec, status="done", mp=mp, mp_metric="accuracy")
        for attack, ap in aps.items():
            kind = "inversion" if attack == "vmi" else "label inference"
            store.put_attack(
                key, attack, attack=attack, spec={"name": attack, "type": kind}, status="done", ap=ap
            )
    failed = base | {"mode": "splitlora", "seed": 0, "defense": "mid", "strength": {}}
    store.put_run(spec_key(failed), sweep="s", spec=failed, status="failed", error="boom")
    return store


def test_scores_rank_and_recommend_against_the_undefended_setting(tmp_path: Path) -> None:
    with _store(tmp_path) as store:
        all_scores = scores(store.runs(), store.attacks())
        assert not store.has_run(spec_key(store.runs()[-1].spec))  # the failed run is retried
    assert len(all_scores) == 6  # 3 runs x 2 attacks; the failed run has none
    strong = next(s for s in all_scores if s.strength == "activation_dp(epsilon=1)" and s.attack == "vmi")
    assert strong.mp_star == 0.90 and strong.ap_undefended == 0.95
    assert strong.dcs == pytest.approx(dcs(0.70, 0.10, 0.90))
    ranking = rank(all_scores)
    assert ranking[0].strength == "activation_dp(epsilon=1)"
    top = ranking[0]
    assert top.t_dcs["inversion"] == pytest.approx(dcs(0.7, 0.1, 0.9))
    assert top.c_dcs == pytest.approx((dcs(0.7, 0.1, 0.9) + dcs(0.7, 0.6, 0.9)) / 2)
    # Within a 5-point MP drop only epsilon=8 qualifies.
    assert recommend(all_scores, max_mp_drop=0.05)["vmi"].strength == "activation_dp(epsilon=8)"
    assert recommend(all_scores, max_mp_drop=0.5)["vmi"].strength == "activation_dp(epsilon=1)"


def test_a_file_that_is_not_a_store_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "notes.sqlite"
    bad.write_text("these are my notes, not a database")
    with pytest.raises(StoreError, match="not a splitfed results store"):
        ResultStore(bad)


def test_rows_survive_reopening_and_keys_ignore_key_order(tmp_path: Path) -> None:
    assert spec_key({"a": 1, "b": [1, 2]}) == spec_key({"b": [1, 2], "a": 1})
    with _store(tmp_path):
        pass
    with ResultStore(tmp_path / "results.sqlite") as again:
        assert len(again.runs()) == 4 and len(again.attacks()) == 6
        assert again.runs()[0].versions.get("torch")


def test_cli_report_writes_the_page_and_refuses_a_missing_store(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from splitfed.cli import app

    _store(tmp_path).close()
    result = CliRunner().invoke(
        app, ["report", str(tmp_path / "results.sqlite"), "-o", str(tmp_path / "report")]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report" / "index.html").is_file() and (tmp_path / "report" / "summary.md").is_file()
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nope.sqlite"), "-o", str(tmp_path / "r2")])
    assert missing.exit_code != 0 and "nope.sqlite" in missing.output


def test_cli_report_of_a_sweep_leaves_out_the_runs_and_attacks_of_other_grids(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from splitfed.bench.report import sweep_keys
    from splitfed.cli import app

    sweep = Path(__file__).resolve().parents[2] / "examples" / "bench" / "smoke.yaml"
    run_keys, attack_keys = sweep_keys(sweep)
    assert len(run_keys) == 3 and len(attack_keys) == 2  # none + activation_dp at 2 strengths; vmi, bli
    with ResultStore(tmp_path / "results.sqlite") as store:
        base = {"model": "m", "task": "classification", "setting": "ht", "head_layers": 2, "tail_layers": 0}
        for k, (key, defense) in enumerate(zip([*sorted(run_keys), "0rphan0000000000"], "abcd", strict=True)):
            spec = base | {
                "mode": "splitlora",
                "seed": 0,
                "defense": "none" if k == 0 else defense,
                "strength": {},
            }
            store.put_run(
                key, sweep="smoke", spec=spec, status="done", mp=0.9 - 0.1 * k, mp_metric="accuracy"
            )
            for attack, akey in [*(("vmi", a) for a in sorted(attack_keys)), ("vmi", "old-vmi-params")]:
                store.put_attack(
                    key,
                    akey,
                    attack=attack,
                    spec={"name": attack, "type": "inversion"},
                    status="done",
                    ap=0.5,
                )
    whole, part = tmp_path / "whole", tmp_path / "part"
    runner = CliRunner()
    assert runner.invoke(app, ["report", str(tmp_path / "results.sqlite"), "-o", str(whole)]).exit_code == 0
    result = runner.invoke(
        app, ["report", str(tmp_path / "results.sqlite"), "-o", str(part), "--sweep", str(sweep)]
    )
    assert result.exit_code == 0, result.output
    assert "runs: 4" in (whole / "summary.md").read_text() and "| d " in (whole / "summary.md").read_text()
    summary = (part / "summary.md").read_text()
    assert "runs: 3 (3 done); attacks: 6 (6 done)" in summary
    assert "only the sweep grid; left out: runs 1, attacks 6 of other grids" in summary
    assert "| d " not in summary  # the orphan run's defense
    bad = runner.invoke(
        app, ["report", str(tmp_path / "results.sqlite"), "-o", str(part), "--sweep", "nope.yaml"]
    )
    assert bad.exit_code != 0 and "nope.yaml" in bad.output
