"""Sweeps: a grid of runs x defenses x strengths, attacked, stored, resumed, failures recorded."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from splitfed.bench.store import ResultStore, StoreError
from splitfed.bench.sweep import attack_key, attack_specs, expand, load_sweep, plan, run_sweep
from splitfed.cli import app
from splitfed.config import ConfigError
from splitfed.privacy import defenses
from splitfed.split.front import Defense
from tiny import run_config, save_tiny_pretrained, write_topic_csv


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    save_tiny_pretrained(root / "model")
    write_topic_csv(root / "data.csv")
    return root


def _sweep(root: Path, name: str, **extra: object) -> Path:
    run = run_config(root, "unused", split={"setting": "ht", "head_layers": 1, "tail_layers": 0})
    run["model"]["num_labels"] = 3
    run["train"] |= {"steps": 2, "eval_before": False}
    sweep = {
        "name": name,
        "run": run,
        "grid": {"setting": ["ht", "hbt"], "tail_layers": [1]},
        "defenses": ["none", {"name": "gaussian_mixer", "sigma": [0.5, 2.0]}],
        "attacks": [{"name": "vmi", "steps": 10}, "bli"],
        "aux": "validation",
        "max_examples": 8,
        "out": str(root / name),
    } | extra
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_the_grid_expands_to_each_setting_s_undefended_run_and_every_strength(workspace: Path) -> None:
    sweep, root = load_sweep(_sweep(workspace, "grid"))
    runs = expand(sweep, root)
    assert len(runs) == 2 * 3  # (ht, hbt) x (none, sigma 0.5, sigma 2.0)
    assert {r.spec["tail_layers"] for r in runs if r.spec["setting"] == "ht"} == {0}  # HT has no tail
    assert [r.spec["defense"] for r in runs[:3]] == ["none", "gaussian_mixer", "gaussian_mixer"]
    assert len({r.key for r in runs}) == len(runs)
    with pytest.raises(ConfigError, match="unknown grid axes"):
        load_sweep(_sweep(workspace, "bad", grid={"colour": ["red"]}))


def test_the_estimate_counts_training_and_attacks_of_the_stored_runs(workspace: Path, tmp_path: Path) -> None:
    sweep, root = load_sweep(_sweep(workspace, "estimate", workers=2))
    runs = expand(sweep, root)
    with ResultStore(tmp_path / "results.sqlite") as store:
        assert plan(sweep, root, store).estimate_s is None  # nothing stored: no figure to go on
        for run in runs[:2]:
            store.put_run(run.key, sweep=sweep.name, spec=run.spec, status="done", seconds=10.0)
            for spec in attack_specs(sweep):
                store.put_attack(
                    run.key, attack_key(spec), attack=spec["name"], spec=spec, status="done", seconds=5.0
                )
        the_plan = plan(sweep, root, store)
    # (10 s training + 2 x 5 s attacks) per run, 4 runs left, 2 at a time
    assert the_plan.stored == {r.key for r in runs[:2]} and the_plan.estimate_s == pytest.approx(40.0)


class Explodes(Defense):
    """Fails in training (a run that fails must not stop the sweep)."""

    name = "explodes"

    def on_activations(self, hidden, context):  # type: ignore[no-untyped-def]
        raise RuntimeError("this defense always fails")


def test_a_sweep_stores_every_run_and_attack_resumes_and_records_failures(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(defenses.DEFENSES, Explodes.name, Explodes)
    path = _sweep(
        workspace,
        "small",
        grid={"setting": ["ht"]},
        defenses=["none", {"name": "gaussian_mixer", "sigma": 2.0}, "explodes"],
    )
    sweep, root = load_sweep(path)
    lines: list[str] = []
    first = run_sweep(sweep, root, log=lines.append)
    assert len(first.runs) == 3 and "3 runs x 2 attacks; 0 stored, 3 to run" in lines[0]
    with ResultStore(Path(sweep.out) / "results.sqlite") as store:  # type: ignore[arg-type]
        runs = {r.spec["defense"]: r for r in store.runs()}
        assert runs["none"].status == "done" and runs["none"].mp is not None
        assert runs["explodes"].status == "failed" and "this defense always fails" in (
            runs["explodes"].error or ""
        )
        attacks = store.attacks(runs["none"].key)
        assert {a.attack: a.status for a in attacks} == {"vmi": "done", "bli": "done"}
        undefended_f1 = next(a.ap for a in attacks if a.attack == "vmi")
        noisy_f1 = next(a.ap for a in store.attacks(runs["gaussian_mixer"].key) if a.attack == "vmi")
        assert undefended_f1 is not None and noisy_f1 is not None and noisy_f1 < undefended_f1
        assert not (Path(sweep.out) / runs["none"].key / "recording").exists()  # type: ignore[arg-type]
    lines.clear()
    again = run_sweep(sweep, root, log=lines.append)  # resumes: only the failed run runs again
    assert "2 stored, 1 to run" in lines[0] and len(again.stored) == 2
    # A stored run whose attack failed (or that lacks an attack the sweep now has) runs again,
    # after the runs never stored: its recording is gone.
    bli = next(s for s in attack_specs(sweep) if s["name"] == "bli")
    with ResultStore(Path(sweep.out) / "results.sqlite") as store:  # type: ignore[arg-type]
        store.put_attack(
            runs["none"].key, attack_key(bli), attack="bli", spec=bli, status="failed", error="x"
        )
        the_plan = plan(sweep, root, store)
    assert the_plan.again == {runs["none"].key} and runs["none"].key not in the_plan.stored
    assert [r.key for r in the_plan.todo] == [runs["explodes"].key, runs["none"].key]
    lines.clear()
    third = run_sweep(sweep, root, log=lines.append)
    assert "1 stored, 2 to run (1 of them again" in lines[0], lines[0]
    assert runs["none"].key in third.stored and not third.again
    with ResultStore(Path(sweep.out) / "results.sqlite") as store:  # type: ignore[arg-type]
        assert store.attack_status(runs["none"].key, attack_key(bli)) == "done"
    # The stored attacks read 8 examples each: a sweep of the same name that reads otherwise is
    # refused (before, it reused them as its own), and the CLI says what differs and what to do.
    fewer = _sweep(
        workspace,
        "small",
        grid={"setting": ["ht"]},
        defenses=["none", {"name": "gaussian_mixer", "sigma": 2.0}, "explodes"],
        max_examples=4,
        window="first",
    )
    other, _ = load_sweep(fewer)
    with ResultStore(Path(sweep.out) / "results.sqlite") as store, pytest.raises(StoreError) as err:  # type: ignore[arg-type]
        plan(other, root, store)
    assert "max_examples: 8 in the store, 4 in the sweep" in str(err.value)
    assert "window: 'last' in the store, 'first' in the sweep" in str(err.value)
    refused = CliRunner().invoke(app, ["bench", str(fewer), "--dry-run"])
    assert refused.exit_code != 0 and "read otherwise" in refused.output, refused.output
    elsewhere = CliRunner().invoke(
        app, ["bench", str(fewer), "--dry-run", "--store", str(workspace / "new.sqlite")]
    )
    assert elsewhere.exit_code == 0 and "3 to run" in elsewhere.output, elsewhere.output


def test_cli_bench_dry_run_lists_the_runs(workspace: Path) -> None:
    path = _sweep(workspace, "dry")
    result = CliRunner().invoke(app, ["bench", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "6 runs x 2 attacks; 6 to run" in result.output
    bad = CliRunner().invoke(app, ["bench", str(workspace / "missing.yaml")])
    assert bad.exit_code != 0 and "no such file" in bad.output


def test_a_worker_process_that_dies_fails_its_run_and_the_sweep_goes_on() -> None:
    from splitfed.bench.sweep import CRASHES_ALLOWED, RunSpec, _pool_outcomes
    from tiny import crash_or_finish

    runs = [RunSpec(f"run{i}", {"crash": i == 1}, {}) for i in range(4)]
    outcomes = {o.key: o for o in _pool_outcomes(runs, [], 2, {}, fn=crash_or_finish)}
    assert sorted(outcomes) == ["run0", "run1", "run2", "run3"]  # each exactly once
    assert outcomes["run1"].run["status"] == "failed"
    assert f"({CRASHES_ALLOWED} times)" in outcomes["run1"].run["error"]
    assert all(outcomes[k].run["status"] == "done" for k in ("run0", "run2", "run3"))


def test_parts_union_their_runs_and_only_limits_a_defense_to_some_settings(workspace: Path) -> None:
    defenses = [
        "none",
        {"name": "activation_dp", "epsilon": [1, 8], "clip": 1.0},
        {"name": "snd", "epsilon": [10], "only": {"setting": ["hbt"]}},
    ]
    parts = [{}, {"set": {"train.seed": 1}, "grid": {"setting": ["ht"]}, "defenses": ["none"]}]
    path = _sweep(workspace, "parts", defenses=defenses, parts=parts)
    runs = expand(*load_sweep(path))
    first = sorted((r.spec["setting"], r.spec["defense"]) for r in runs if r.spec["seed"] == 0)
    expected = [(st, d) for st in ("ht", "hbt") for d in ("none", "activation_dp", "activation_dp")]
    assert first == sorted([*expected, ("hbt", "snd")])  # snd only in HBT: an HT run config refuses it
    assert [(r.spec["setting"], r.spec["defense"]) for r in runs if r.spec["seed"] == 1] == [("ht", "none")]
    from splitfed.bench.sweep import attack_specs

    anywhere = [{"task": ["causal_lm"]}, {"task": ["classification"], "setting": ["ht"]}]  # any one
    sweep, _ = load_sweep(_sweep(workspace, "parts", attacks=[{"name": "bli", "only": anywhere}]))
    assert attack_specs(sweep)[0]["_only"] == anywhere  # run_one marks it not applicable elsewhere
    from splitfed.bench.sweep import _allowed

    assert _allowed(anywhere, {"task": "classification", "setting": "ht"}.get)
    assert not _allowed(anywhere, {"task": "classification", "setting": "hbt"}.get)
    defenses[2]["only"] = {"depth": ["hbt"]}  # type: ignore[index]
    with pytest.raises(ConfigError, match="only: unknown axes"):
        expand(*load_sweep(_sweep(workspace, "parts", defenses=defenses, parts=parts)))


def test_threads_per_worker_is_validated_and_does_not_change_the_runs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="threads"):
        load_sweep(_sweep(tmp_path, "zero", threads=0))
    one, _ = load_sweep(_sweep(tmp_path, "one", threads=1))
    default, _ = load_sweep(_sweep(tmp_path, "default"))
    assert one.threads == 1 and default.threads is None
    # threads is how runs execute, not what they are: the run keys (and so the store) are the same
    assert [r.key for r in expand(one, tmp_path)] == [r.key for r in expand(default, tmp_path)]
