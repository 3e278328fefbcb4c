"""A sweep: a grid of split runs × defenses × strengths, each attacked, every result in one SQLite store.

A sweep's YAML names a base run config and the axes to vary::

    name: smoke
    base: ../ht_splitlora_classification.yaml   # a run config, relative to this file (or `run:` inline)
    set: {train.steps: 4}                       # overrides of the base, as `--set` takes them
    grid:
      setting: [ht, hbt]                        # split.setting
      head_layers: [1, 2]                       # split.head_layers
      tail_layers: [1]                          # split.tail_layers (HBT only; HT runs use 0)
      mode: [splitlora]                         # fine-tuning mode
      model: [smollm2-135m]                     # model.name
      seed: [0]                                 # train.seed
    defenses:
      - none                                    # the undefended run of each setting (always added)
      - {name: activation_dp, epsilon: [1, 8], clip: 1.0}   # a list value: one run per strength
      - {name: snd, epsilon: [10, 100], only: {setting: [hbt]}}   # only in these grid values
    attacks: [{name: vmi, steps: 100}, bisr, bli]
    aux: test                                   # the attacker's auxiliary text (split or file)
    max_examples: 32                            # sequences attacked per run
    window: last                                # ... the run's last ones (first: from its start)
    workers: 1                                  # runs in parallel (local processes)
    threads: 2                                  # torch threads per worker (default: cores / workers)
    ray_cpus_per_run: 1                         # CPUs each run reserves on a Ray cluster

A sweep over several tasks or models that do not cross (a classifier and a causal LM, a
decoder and an encoder) lists ``parts``: each part gives any of ``base``/``run``, ``set``,
``grid`` and ``defenses``, replacing the sweep's own (``set`` is merged over it), and the sweep's
runs are the union of its parts' runs, in one store::

    parts:
      - {base: ../hbt_splitlora_classification.yaml, grid: {setting: [ht, hbt]}}
      - {base: ../minilm_genre_classification.yaml, set: {train.steps: 20}}

Runs go to ``workers`` local processes, or, with ``run_sweep(..., ray_address=...)``
(``splitfed bench SWEEP.yaml --ray auto|HOST:PORT|ray://HOST:PORT``), to a Ray cluster as remote
tasks (:mod:`splitfed.bench.ray_cluster`): as many at once as the cluster has CPUs for, at
``ray_cpus_per_run`` each; ``workers`` is then ignored. Either way only this process writes the
store, each run as it finishes.

Each run is identified by the hash of what determines it, so a rerun skips the runs already in
the store (an interrupted sweep resumes where it stopped); a failed run records its error and the
sweep goes on. A stored run one of whose attacks failed, or that lacks an attack the sweep has
gained since, runs again after the runs never stored (its recording is gone). One recording of a run feeds all of its attacks and is deleted afterwards unless
``keep_recordings`` is set. What the attacks read (``aux``, ``phases``, ``max_examples``,
``window``) is in no key: the store records it per sweep name, and a sweep of that name that
reads otherwise is refused rather than handed the stored rows as its own.
"""

from __future__ import annotations

import functools
import itertools
import os
import shutil
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from splitfed.bench.scores import NO_DEFENSE
from splitfed.bench.store import ResultStore, spec_key
from splitfed.config import ConfigError, RunConfig, parse_config

#: Metrics a run's MP is read from when the sweep does not name one, in this order.
MP_METRICS = ("accuracy", "f1", "exact_match", "macro_f1")
#: What each grid axis sets in the run config.
AXES = {
    "model": "model.name",
    "setting": "split.setting",
    "head_layers": "split.head_layers",
    "tail_layers": "split.tail_layers",
    "mode": "mode",
    "seed": "train.seed",
}


def _check_grid(grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
    unknown = sorted(set(grid) - set(AXES))
    if unknown:
        raise ValueError(f"unknown grid axes {unknown}; axes: {sorted(AXES)}")
    empty = sorted(k for k, v in grid.items() if not isinstance(v, list) or not v)
    if empty:
        raise ValueError(f"grid axes {empty} need a non-empty list of values")
    return grid


class SweepPart(BaseModel):
    """One part of a sweep over settings that do not cross (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    base: str | None = Field(None, description="a run config file, relative to the sweep file")
    run: dict[str, Any] | None = Field(None, description="the base run config inline")
    set: dict[str, Any] = Field(default_factory=dict, description="overrides, merged over the sweep's")
    grid: dict[str, list[Any]] | None = None
    defenses: list[str | dict[str, Any]] | None = None

    @field_validator("grid")
    @classmethod
    def _known_axes(cls, grid: dict[str, list[Any]] | None) -> dict[str, list[Any]] | None:
        return None if grid is None else _check_grid(grid)


class SweepConfig(BaseModel):
    """A sweep's YAML (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    base: str | None = Field(None, description="a run config file, relative to the sweep file")
    run: dict[str, Any] | None = Field(None, description="the base run config inline")
    set: dict[str, Any] = Field(default_factory=dict, description="overrides of the base (key.path: value)")
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    defenses: list[str | dict[str, Any]] = Field(default_factory=lambda: [NO_DEFENSE])  # type: ignore[arg-type]
    attacks: list[str | dict[str, Any]] = Field(min_length=1)
    aux: str = "test"
    phases: list[str] = Field(default_factory=lambda: ["train"])
    max_examples: int | None = Field(32, ge=1)
    window: Literal["first", "last"] = Field(
        "last",
        description="attack each run's first max_examples sequences or its last (trained defenses trained)",
    )
    mp_metric: str | None = None
    workers: int = Field(1, ge=1, le=64)
    threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="torch threads per local worker (default: the machine's cores / workers); set it "
        "when other jobs share the machine, since oversubscribed cores slow every job down",
    )
    ray_cpus_per_run: float = Field(1.0, gt=0, le=1024, description="CPUs per run with --ray")
    out: str | None = Field(None, description="where run directories go (default runs/bench/<name>)")
    store: str | None = Field(None, description="the results database (default <out>/results.sqlite)")
    keep_recordings: bool = False
    parts: list[SweepPart] = Field(default_factory=list, description="settings that do not cross")

    @field_validator("grid")
    @classmethod
    def _known_axes(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return _check_grid(grid)

    def split_parts(self) -> list[SweepConfig]:
        """The sweep as one sweep per part (itself where it has no parts)."""
        if not self.parts:
            return [self]
        out = []
        for part in self.parts:
            given = part.model_fields_set
            update: dict[str, Any] = {"parts": [], "set": self.set | part.set}
            if given & {"base", "run"}:
                update |= {"base": part.base, "run": part.run}
            if part.grid is not None:
                update["grid"] = part.grid
            if part.defenses is not None:
                update["defenses"] = part.defenses
            out.append(self.model_copy(update=update))
        return out


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: its axes, its defense and strength, and the run config they make."""

    key: str
    spec: dict[str, Any]
    config: dict[str, Any] = field(repr=False)


def load_sweep(path: str | Path) -> tuple[SweepConfig, Path]:
    """The sweep in ``path`` and the directory its relative paths start from.

    Raises
    ------
    ConfigError
        For a missing file, bad YAML or a field out of range, naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep {path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"sweep {path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep {path}: expected a mapping of name, base, grid, defenses, attacks")
    try:
        return SweepConfig(**raw), path.parent
    except ValueError as err:
        raise ConfigError(f"sweep {path}: {err}") from None


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"sweep: cannot set {dotted}: {part} is not a section")
    node[leaf] = value


def _axis_value(config: dict[str, Any], axis: str) -> Any:
    return _get(config, AXES[axis])


def _get(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _base_config(sweep: SweepConfig, root: Path) -> dict[str, Any]:
    if (sweep.base is None) == (sweep.run is None):
        raise ConfigError(
            f"sweep {sweep.name}: give exactly one of base: (a run config file) or run: (inline)"
        )
    if sweep.run is not None:
        base = dict(sweep.run)
    else:
        path = root / str(sweep.base)
        if not path.is_file():
            raise ConfigError(f"sweep {sweep.name}: base config {path} does not exist")
        base = yaml.safe_load(path.read_text()) or {}
    for dotted, value in sweep.set.items():
        _set(base, dotted, value)
    return base


def _only(entry: str | dict[str, Any], kind: str = "defenses") -> list[dict[str, list[Any]]]:
    """The settings a ``defenses:`` (or ``attacks:``) entry is limited to: its ``only:``, grid axes
    to lists of values (attacks may also name ``task``), or a list of such alternatives (any one
    suffices); empty: everywhere."""
    if isinstance(entry, str) or "only" not in entry:
        return []
    only = entry["only"]
    alternatives = only if isinstance(only, list) else [only]
    axes = set(AXES) | ({"task"} if kind == "attacks" else set())
    for alternative in alternatives:
        if not isinstance(alternative, dict) or not all(
            isinstance(v, list) and v for v in alternative.values()
        ):
            raise ConfigError(
                f"sweep {kind}: {entry.get('name')}'s only: must map grid axes to lists of values "
                f"(or be a list of such maps); got {only!r}"
            )
        unknown = sorted(set(alternative) - axes)
        if unknown:
            raise ConfigError(
                f"sweep {kind}: {entry.get('name')}'s only: unknown axes {unknown}; axes: {sorted(axes)}"
            )
    return alternatives


def _allowed(only: list[dict[str, list[Any]]], value: Callable[[str], Any]) -> bool:
    """Whether a setting (``value(axis)``) is in one of the ``only`` alternatives (none: everywhere)."""
    return not only or any(all(value(a) in v for a, v in alt.items()) for alt in only)


def _strengths(entry: str | dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """``(name, params, strength)`` of each strength of a ``defenses:`` entry: a list value
    multiplies the runs, and ``strength`` holds the values that vary (what tables label)."""
    if isinstance(entry, str):
        return [(entry, {}, {})]
    spec = dict(entry)
    spec.pop("only", None)
    name = str(spec.pop("name", ""))
    if not name:
        raise ConfigError(f"sweep defenses: an entry needs a name; got {entry}")
    varying = sorted(k for k, v in spec.items() if isinstance(v, list))
    fixed = {k: v for k, v in spec.items() if k not in varying}
    out = []
    for combo in itertools.product(*(spec[k] for k in varying)):
        strength = dict(zip(varying, combo, strict=True))
        out.append((name, fixed | strength, strength))
    return out


def expand(sweep: SweepConfig, root: Path) -> list[RunSpec]:
    """Every run of the sweep (of each of its parts), the undefended run of each setting first,
    duplicates removed.

    Each run config is validated (``parse_config``) here, so a sweep with a bad combination
    fails before the first run starts.
    """
    out: dict[str, RunSpec] = {}
    for part in sweep.split_parts():
        for run in _expand_part(part, root):
            out.setdefault(run.key, run)
    return list(out.values())


def _expand_part(sweep: SweepConfig, root: Path) -> list[RunSpec]:
    base = _base_config(sweep, root)
    axes = sorted(sweep.grid)
    combos = [
        dict(zip(axes, values, strict=True)) for values in itertools.product(*(sweep.grid[a] for a in axes))
    ]
    strengths: list[tuple[str, dict[str, Any], dict[str, Any], list[dict[str, list[Any]]]]] = [
        (NO_DEFENSE, {}, {}, [])
    ] + [(*s, _only(entry)) for entry in sweep.defenses for s in _strengths(entry) if s[0] != NO_DEFENSE]
    out: dict[str, RunSpec] = {}
    for combo in combos or [{}]:
        for defense, params, strength, only in strengths:
            config = yaml.safe_load(yaml.safe_dump(base))  # a deep copy
            for axis, value in combo.items():
                _set(config, AXES[axis], value)
            if str(config.get("split", {}).get("setting", "ht")) == "ht":
                config.setdefault("split", {})["tail_layers"] = 0
            if not _allowed(only, functools.partial(_axis_value, config)):
                continue  # the entry's only: leaves this setting out
            config["defenses"] = [] if defense == NO_DEFENSE else [{"name": defense} | params]
            try:
                cfg = parse_config(config)
            except ConfigError as err:
                raise ConfigError(
                    f"sweep {sweep.name}: run {combo} with defense {defense} {params}: {err}"
                ) from None
            spec = {
                "model": cfg.model.name,
                "task": cfg.task,
                "setting": cfg.split.setting,
                "head_layers": cfg.split.head_layers,
                "tail_layers": cfg.split.tail_layers,
                "mode": cfg.mode,
                "seed": cfg.train.seed,
                "defense": defense,
                "strength": strength,
                "params": params,
            }
            identity = cfg.model_dump(mode="json")
            identity.pop("output_dir", None)
            key = spec_key(identity)
            out.setdefault(key, RunSpec(key, spec, config))
    return list(out.values())


def attack_specs(sweep: SweepConfig) -> list[dict[str, Any]]:
    """The sweep's attacks as validated specs, each with the attack's type (for T-DCS)."""
    from splitfed.privacy.attacks import ATTACKS, build_attack

    specs = []
    for entry in sweep.attacks:
        only = _only(entry, "attacks")
        spec = {"name": entry} if isinstance(entry, str) else {k: v for k, v in entry.items() if k != "only"}
        attack = build_attack(spec)  # validates name and parameters now, not after hours of runs
        target = getattr(ATTACKS[spec["name"]], "target", "tokens")
        specs.append(
            spec
            | {"type": "inversion" if target == "tokens" else "label inference"}
            | {"_params": attack.params()}
            | ({"_only": only} if only else {})
        )
    return specs


def _mp(metrics: Mapping[str, float], wanted: str | None) -> tuple[str, float]:
    if wanted is not None:
        if wanted not in metrics:
            raise ConfigError(f"mp_metric {wanted!r} is not among the run's metrics {sorted(metrics)}")
        return wanted, float(metrics[wanted])
    for name in MP_METRICS:
        if name in metrics:
            return name, float(metrics[name])
    raise ConfigError(f"no main-task metric among {sorted(metrics)}; set mp_metric in the sweep")


@dataclass
class RunOutcome:
    """What one worker sends back: the run's row and its attacks' rows (the main process stores them)."""

    key: str
    run: dict[str, Any]
    attacks: list[tuple[str, dict[str, Any]]]
    seconds: float


def why_not_applicable(spec: Mapping[str, Any], recording: Path) -> str | None:
    """Why attack ``spec`` cannot run on ``recording`` (``None`` if it can)."""
    from splitfed.privacy.attacks import ATTACKS
    from splitfed.privacy.recording import RecordingReader

    needs = [n for n in getattr(ATTACKS[spec["name"]], "needs", ()) if n.required]
    kinds = {r.kind for r in RecordingReader(recording)}
    missing = sorted({n.kind for n in needs if n.kind not in kinds})
    return f"the run sent no {', '.join(missing)} messages" if missing else None


def run_one(
    run: RunSpec,
    attacks: Sequence[dict[str, Any]],
    *,
    out: Path,
    aux: str,
    phases: Sequence[str],
    max_examples: int | None,
    mp_metric: str | None,
    keep_recording: bool,
    threads: int | None = None,
    window: Literal["first", "last"] = "last",
) -> RunOutcome:
    """Train ``run`` with a recording, attack the recording, and return the rows to store.

    Never raises for a failing run or attack: the error goes into the row.
    """
    import torch

    from splitfed.privacy.attack_runs import attack_context, auxiliary_texts
    from splitfed.privacy.attacks import build_attack, run_attack
    from splitfed.run import train

    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    run_dir = out / run.key
    shutil.rmtree(run_dir, ignore_errors=True)  # a run cut short earlier starts again
    config = dict(run.config) | {"output_dir": str(run_dir)}
    recording = run_dir / "recording"
    rows: list[tuple[str, dict[str, Any]]] = []
    try:
        cfg: RunConfig = parse_config(config)
        result = train(cfg, progress=False, log=lambda s: None, record=recording)
        metric, mp = _mp(result.metrics_after, mp_metric)
        summary = result.summary
        share = summary.get("compute_share") or {}
        run_row = {
            "status": "done",
            "mp": mp,
            "mp_metric": metric,
            "metrics": result.metrics_after,
            "seconds": summary["timings"].get("train_s"),
            "bytes_to_model": summary["bytes_per_step"]["to_model"],
            "bytes_to_data": summary["bytes_per_step"]["to_data"],
            "data_party_flops": share.get("data_party_flops"),
        }
    except Exception as err:  # a failed run is a result too; the sweep goes on
        return RunOutcome(
            run.key, {"status": "failed", "error": _error(err)}, [], time.perf_counter() - start
        )
    context = None
    for spec in attacks:
        name = spec["name"]
        key = attack_key(spec)
        params = {k: v for k, v in spec.items() if k not in ("type",) and not k.startswith("_")}
        row: dict[str, Any] = {
            "attack": name,
            "spec": {k: v for k, v in spec.items() if not k.startswith("_")},
        }
        try:
            only = spec.get("_only", [])
            reason = None if _allowed(only, run.spec.get) else f"the sweep runs it only where {only}"
            reason = reason or why_not_applicable(spec, recording)
            if reason is not None:
                rows.append((key, row | {"status": "not_applicable", "error": reason}))
                continue
            if context is None:
                context = attack_context(cfg, auxiliary_texts(cfg, aux), max_examples=max_examples)
            res = run_attack(build_attack(params), recording, context, phases=list(phases), window=window)
            ap_metric = next(
                (m for m in ("token_f1", "label_accuracy", "accuracy", "auc") if m in res.metrics), None
            )
            row |= {
                "status": "done",
                "ap": res.metrics.get(ap_metric) if ap_metric else None,
                "ap_metric": ap_metric,
                "metrics": res.metrics,
                "baseline": res.baseline,
                "chance": res.chance,
                "seconds": res.seconds,
                "examples": [
                    {"original": e.original, "reconstructed": e.reconstructed} for e in res.examples
                ],
            }
        except Exception as err:  # one failing attack does not lose the run or the others
            row |= {"status": "failed", "error": _error(err)}
        rows.append((key, row))
    if not keep_recording:
        shutil.rmtree(recording, ignore_errors=True)
    return RunOutcome(run.key, run_row, rows, time.perf_counter() - start)


#: Times a run may be in flight when a local worker process dies before it is recorded as failed.
CRASHES_ALLOWED = 2


def _pool_outcomes(
    todo: Sequence[RunSpec],
    attacks: Sequence[dict[str, Any]],
    workers: int,
    kwargs: dict[str, Any],
    fn: Callable[..., RunOutcome] = run_one,
) -> Iterator[RunOutcome]:
    """Outcomes of ``fn`` (``run_one``) on each of ``todo`` in ``workers`` spawned processes, as each finishes.

    A worker that dies (killed, out of memory, a crash in native code) breaks the whole pool and
    every run in it: the runs go to a fresh pool, and a run that was in flight (running, not
    queued) at :data:`CRASHES_ALLOWED` deaths is recorded as failed, so that one bad run cannot
    stop the sweep. After as many deaths as runs times that, whatever is left is recorded failed.
    """
    queue, crashes, deaths = list(todo), dict.fromkeys((r.key for r in todo), 0), 0
    while queue:
        broken: list[RunSpec] = []
        running: set[str] = set()
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            pending: dict[Future[RunOutcome], RunSpec] = {
                pool.submit(fn, run, attacks, **kwargs): run for run in queue
            }
            queue = []
            while pending:
                # Which runs are in flight, refreshed every second: those a dead worker takes the blame.
                running = {run.key for future, run in pending.items() if future.running()} or running
                finished, _ = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                for future in finished:
                    run = pending.pop(future)
                    try:
                        yield future.result()
                    except BrokenProcessPool:
                        broken.append(run)
                    except Exception as err:  # raised outside run_one's own guard: record it
                        yield RunOutcome(run.key, {"status": "failed", "error": _error(err)}, [], 0.0)
        if broken:
            deaths += 1
        for run in broken:
            crashes[run.key] += run.key in running
            if crashes[run.key] >= CRASHES_ALLOWED or deaths >= CRASHES_ALLOWED * len(todo):
                error = (
                    f"a worker process died while this run was in flight ({crashes[run.key]} times); "
                    "it may need more memory than a worker has (lower `workers`)"
                )
                yield RunOutcome(run.key, {"status": "failed", "error": error}, [], 0.0)
            else:
                queue.append(run)


def _error(err: BaseException) -> str:
    last = traceback.extract_tb(err.__traceback__)[-1:] if err.__traceback__ else []
    where = f" (at {Path(last[0].filename).name}:{last[0].lineno})" if last else ""
    return f"{type(err).__name__}: {err}{where}"


@dataclass
class SweepPlan:
    """What a sweep will do: every run, those already stored, and an estimate of the time left."""

    runs: list[RunSpec]
    stored: set[str]
    attacks: list[dict[str, Any]]
    estimate_s: float | None
    #: Runs stored as done whose attacks are not all settled (one failed, or the sweep has an
    #: attack the store lacks for it): run again, after the runs never run.
    again: set[str] = field(default_factory=set)

    @property
    def todo(self) -> list[RunSpec]:
        """The runs not stored yet, then those to run again (their recordings are gone)."""
        fresh = [r for r in self.runs if r.key not in self.stored and r.key not in self.again]
        return fresh + [r for r in self.runs if r.key in self.again]


def attack_key(spec: Mapping[str, Any]) -> str:
    """The store's key of an attack spec of :func:`attack_specs` (its ``_``-private keys left out)."""
    return spec_key({k: v for k, v in spec.items() if not k.startswith("_")})


#: Attack statuses a resumed sweep leaves alone (``failed`` ones are retried, with their run).
SETTLED = ("done", "not_applicable")


def _stored(
    store: ResultStore, runs: Sequence[RunSpec], attacks: Sequence[Mapping[str, Any]]
) -> tuple[set[str], set[str]]:
    """The runs stored with every attack settled, and the stored runs to run again."""
    keys = [attack_key(a) for a in attacks]
    stored: set[str] = set()
    again: set[str] = set()
    for run in runs:
        if store.has_run(run.key):
            settled = all(store.attack_status(run.key, k) in SETTLED for k in keys)
            (stored if settled else again).add(run.key)
    return stored, again


def attack_reading(sweep: SweepConfig) -> dict[str, Any]:
    """The sweep's settings of what its attacks read (not part of any run's or attack's key): a
    store's attack rows are reused only by a sweep that reads alike."""
    return {
        "aux": sweep.aux,
        "phases": list(sweep.phases),
        "max_examples": sweep.max_examples,
        "window": sweep.window,
    }


def _reading_key(sweep: SweepConfig) -> str:
    return f"attack_reading:{sweep.name}"


def check_attack_reading(sweep: SweepConfig, store: ResultStore) -> None:
    """Refuse a store whose attacks of ``sweep`` read otherwise than ``sweep`` does.

    Raises
    ------
    StoreError
        If ``store`` recorded other ``aux``, ``phases``, ``max_examples`` or ``window`` for this
        sweep's name: its stored attack rows would be silently reused (a store that recorded none,
        written before this check, is taken to match).
    """
    from splitfed.bench.store import StoreError

    stored = store.get_meta(_reading_key(sweep))
    wanted = attack_reading(sweep)
    if stored is None or stored == wanted:
        return
    differ = [k for k in wanted if stored.get(k) != wanted[k]]
    said = ", ".join(f"{k}: {stored.get(k)!r} in the store, {wanted[k]!r} in the sweep" for k in differ)
    raise StoreError(
        f"{store.path} holds attacks of sweep {sweep.name!r} that read otherwise ({said}); its rows "
        "would be reused as if they read what the sweep asks. Set `store:` (or --store) to a new "
        "file to attack every run anew, or set those keys back to what the store holds"
    )


def plan(sweep: SweepConfig, root: Path, store: ResultStore, *, parallel: int | None = None) -> SweepPlan:
    """Expand ``sweep`` and compare it with ``store``; estimate the time left from stored runs' times
    (training and attacks) with ``parallel`` runs at once (default: the sweep's ``workers``).

    Raises :class:`~splitfed.bench.store.StoreError` where the store's attacks of this sweep read
    other examples than it does (:func:`check_attack_reading`)."""
    check_attack_reading(sweep, store)
    runs = expand(sweep, root)
    attacks = attack_specs(sweep)
    stored, again = _stored(store, runs, attacks)
    done = [r for r in store.runs(sweep.name) if r.status == "done" and r.seconds]
    estimate = None
    if done:
        per_run = sum(
            float(r.seconds or 0.0) + sum(float(a.seconds or 0.0) for a in store.attacks(r.key)) for r in done
        ) / len(done)
        estimate = per_run * (len(runs) - len(stored)) / (parallel or sweep.workers)
    return SweepPlan(runs, stored, attacks, estimate, again)


def sweep_paths(sweep: SweepConfig, root: Path) -> tuple[Path, Path]:
    """The run directory and the store of ``sweep`` (relative to the working directory unless given)."""
    out = Path(sweep.out) if sweep.out else Path("runs") / "bench" / sweep.name
    store = Path(sweep.store) if sweep.store else out / "results.sqlite"
    return out, store


def run_sweep(
    sweep: SweepConfig,
    root: Path,
    *,
    store_path: Path | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    log: Callable[[str], None] = print,
    ray_address: str | None = None,
    ray_cpus_per_run: float | None = None,
) -> SweepPlan:
    """Run every run of ``sweep`` not stored yet, attacks included; store each as it finishes.

    ``progress(done, total, message)`` is called after each run. With ``ray_address`` (``auto``,
    ``HOST:PORT`` or ``ray://HOST:PORT``) the runs are Ray tasks on that cluster, reserving
    ``ray_cpus_per_run`` CPUs each (default: the sweep's ``ray_cpus_per_run``); otherwise they run
    in the sweep's ``workers`` local processes.

    Raises
    ------
    ClusterError
        With ``ray_address``, if Ray is not importable or no cluster answers there.
    StoreError
        If the store's attacks of this sweep read other examples (:func:`check_attack_reading`).
    """
    out, default_store = sweep_paths(sweep, root)
    with ExitStack() as stack:
        store = stack.enter_context(ResultStore(store_path or default_store))
        the_plan = plan(sweep, root, store)
        todo = the_plan.todo
        cluster = None
        parallel = sweep.workers
        where = f"{sweep.workers} worker{'s' if sweep.workers > 1 else ''}"
        if ray_address is not None:
            where = f"Ray at {ray_address}"
        if ray_address is not None and todo:  # nothing to run, no cluster needed
            from splitfed.bench.ray_cluster import RayCluster

            cpus = ray_cpus_per_run if ray_cpus_per_run is not None else sweep.ray_cpus_per_run
            cluster = stack.enter_context(RayCluster(ray_address, cpus_per_run=cpus))
            parallel = cluster.parallel
            the_plan = plan(sweep, root, store, parallel=parallel)
            where = f"Ray at {ray_address}: {parallel} at a time, {cpus:g} CPU{'s' if cpus != 1 else ''} each"
        total, done = len(the_plan.runs), len(the_plan.stored)
        eta = (
            f", about {the_plan.estimate_s / 60:.1f} min left"
            if the_plan.estimate_s
            else ", the time left estimated once a run is done"
            if todo
            else ""
        )
        log(
            f"sweep {sweep.name}: {total} runs x {len(the_plan.attacks)} attacks; {done} stored, {len(todo)} to run"
            + (
                f" ({len(the_plan.again)} of them again: an attack of theirs failed or is new to the store)"
                if the_plan.again
                else ""
            )
            + f"{eta} ({where}); results in {store.path}"
        )
        if not todo:
            return the_plan
        store.set_meta(_reading_key(sweep), attack_reading(sweep))
        if progress is not None:
            progress(done, total, "")
        threads = sweep.threads or max(1, (os.cpu_count() or 1) // sweep.workers)
        kwargs = {
            "out": out,
            "aux": sweep.aux,
            "phases": sweep.phases,
            "max_examples": sweep.max_examples,
            "window": sweep.window,
            "mp_metric": sweep.mp_metric,
            "keep_recording": sweep.keep_recordings,
            "threads": threads,
        }
        by_key = {r.key: r for r in todo}
        started = time.perf_counter()

        def finish(outcome: RunOutcome) -> None:
            nonlocal done
            run = by_key[outcome.key]
            store.put_run(outcome.key, sweep=sweep.name, spec=run.spec, **outcome.run)
            for attack_key, row in outcome.attacks:
                store.put_attack(outcome.key, attack_key, **row)
            done += 1
            status = outcome.run["status"]
            left = (time.perf_counter() - started) / (done - len(the_plan.stored)) * (total - done) / parallel
            what = [str(run.spec["defense"]), str(run.spec["strength"] or ""), str(run.spec["setting"])]
            message = (
                " ".join(w for w in what if w)
                + f" head={run.spec['head_layers']} seed={run.spec['seed']}: {status} in {outcome.seconds:.0f} s"
                + (f" ({outcome.run.get('error')})" if status != "done" else "")
                + f"; about {left / 60:.1f} min left"
            )
            if progress is not None:
                progress(done, total, message)
            else:
                log(f"[{done}/{total}] {message}")

        if cluster is not None:
            # Workers on other machines do not share this working directory.
            for outcome in cluster.outcomes(todo, the_plan.attacks, **(kwargs | {"out": out.resolve()})):
                finish(outcome)
        elif sweep.workers == 1:
            for run in todo:
                finish(run_one(run, the_plan.attacks, **kwargs))  # type: ignore[arg-type]
        else:
            for outcome in _pool_outcomes(todo, the_plan.attacks, sweep.workers, kwargs):
                finish(outcome)
        the_plan.stored, the_plan.again = _stored(store, the_plan.runs, the_plan.attacks)
        return the_plan
