"""Audit of one finished run: every attack that applies to it, with a plain verdict.

``splitfed audit RUN_DIR`` reads the run's ``results.json`` (its config and, for a split run,
where its recording is) and runs each attack whose inputs the run kept, as the honest-but-curious
party would:

* on a split run's recording, each registered attack whose message kinds crossed (inversion,
  label inference, ...), as the model party;
* ``membership`` on the fine-tuned model (a split run's party adapters, a federated run's global
  adapters) over the run's training examples against its held-out ones: the loss-threshold attack
  by default, reference-model calibration and offline LiRA with ``membership_references``;
* ``gradient_inversion`` of a federated client's LoRA update, where the run kept the updates the
  server saw. No run does yet: ``fedtrain`` stores no per-client update, and secure aggregation
  shows the server none. The audit says so as a finding (``not applicable: ...``) with what a run
  would have to keep, rather than leaving the attack out.

Each finding says whether its attack recovers more than chance (:data:`LEAK_MARGIN` above it; for
an AUC also at least two standard deviations of a guess's AUC at the sample size). Given a
sweep's results store, the audit also suggests the defense that scored best against each attack
there.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitfed.config import ConfigError, RunConfig, parse_config

#: How far above chance an attack must score to count as leaking (an absolute margin on AP).
LEAK_MARGIN = 0.05
#: Attacks that read the run's model or updates rather than its recording; the audit runs them itself.
MODEL_ATTACKS = ("membership", "gradient_inversion")
#: Members (and as many non-members) the audit's membership attack scores by default.
MEMBERSHIP_EXAMPLES = 100


@dataclass
class Finding:
    """One attack's outcome on the audited run.

    Attributes
    ----------
    attack : str
    crossing : str
        What the attack reads (message kinds and directions, or the model or updates).
    metric, score, baseline, chance
        The headline metric, its value, the linear baseline's and chance's (``None`` when it did not run).
    verdict : str
        ``LEAKS: ...``, ``at chance: ...`` or ``not applicable: <why>``.
    examples : list of dict
        A few reconstructions (``original``, ``reconstructed``).
    suggestion : str | None
        The best defense against this attack in the given sweep store.
    metrics : dict[str, float]
        Every metric the attack reported (membership: AUC and TPR at low FPR of each score).
    detail : str | None
        What the verdict rests on, or what the run would have to keep for the attack to apply.
    """

    attack: str
    crossing: str
    metric: str | None
    score: float | None
    baseline: float | None
    chance: float | None
    verdict: str
    examples: list[dict[str, str]] = field(default_factory=list)
    suggestion: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    detail: str | None = None


@dataclass
class Audit:
    """What :func:`audit_run` found.

    Attributes
    ----------
    run_dir : Path
    recording : Path | None
        The split run's recording (``None`` for a federated run, which records nothing).
    findings : list of Finding
    kind : str, default "split"
        ``split`` (``splitfed train``) or ``federated`` (``splitfed fedtrain``).
    """

    run_dir: Path
    recording: Path | None
    findings: list[Finding]
    kind: str = "split"

    def summary(self) -> dict[str, Any]:
        """A JSON-ready dictionary."""
        return {
            "run_dir": str(self.run_dir),
            "kind": self.kind,
            "recording": None if self.recording is None else str(self.recording),
            "findings": [dict(f.__dict__) for f in self.findings],
        }


def _finished_run(run_dir: Path) -> tuple[RunConfig, Path | None]:
    """The run's config and (split runs) its recording, from its results.json."""
    results = run_dir / "results.json"
    if not results.is_file():
        raise ConfigError(f"{run_dir} has no results.json: audit a finished run's output_dir")
    summary = json.loads(results.read_text())
    federated = (summary.get("config") or {}).get("federated") is not None
    recording = (summary.get("recording") or {}).get("directory")
    if not recording and not federated:
        raise ConfigError(
            f"the run in {run_dir} was not recorded: run it again with --record DIR (train, join or serve)"
        )
    return parse_config(summary["config"]), Path(recording) if recording else None


def auc_spread(positives: int, negatives: int) -> float:
    """The standard deviation of a random guess's ROC AUC over ``positives`` and ``negatives``
    (the Mann–Whitney statistic's under no signal: ``sqrt((n1 + n2 + 1) / (12 n1 n2))``)."""
    if positives < 1 or negatives < 1:
        return math.inf
    return math.sqrt((positives + negatives + 1) / (12 * positives * negatives))


def _verdict(score: float | None, chance: float | None, margin: float = LEAK_MARGIN) -> str:
    if score is None:
        return "no score"
    if chance is None:
        return f"recovers {score:.2f}"
    if score > chance + margin:
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
    membership_references: int = 0,
    membership_examples: int | None = MEMBERSHIP_EXAMPLES,
    progress: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> Audit:
    """Attack the finished run in ``run_dir`` with every attack that applies.

    Parameters
    ----------
    run_dir : str | Path
        A finished run's output directory (with ``results.json``): a split run recorded with
        ``--record``, or a federated (``fedtrain``) run.
    attacks : Sequence[dict | str] | None, default None
        Attack specs (registered attacks, ``membership``, ``gradient_inversion``); ``None``: every
        registered attack whose inputs were recorded, ``membership``, and ``gradient_inversion``
        where the run exchanged federated updates. An attack named here that cannot run is a
        finding ``not applicable: <why>``.
    store : str | Path | None
        A sweep's results store: suggest per attack the defense with the best DCS there.
    aux : str | None
        The attacker's auxiliary text (a file or a split; default the dataset's test split).
    max_examples : int | None, default 32
        Sequences attacked per recording attack.
    max_mp_drop : float, default 0.05
        The largest main-task drop a suggested defense may cost.
    membership_references : int, default 0
        Reference models membership inference fine-tunes (each costs a fine-tune like the run's);
        0: the loss-threshold attack alone. A ``membership`` spec's ``references`` overrides it.
    membership_examples : int | None, default 100
        Members scored by membership inference, and as many non-members (``None``: all).
    progress : bool, default False
    log : callable
        Progress lines (loading the run, training reference models).
    """
    from splitfed.bench.sweep import why_not_applicable
    from splitfed.privacy.attack_runs import attack_context, auxiliary_texts
    from splitfed.privacy.attacks import ATTACKS, AttackError, build_attack, run_attack
    from splitfed.protocol import KINDS

    run_dir = Path(run_dir)
    cfg, recording = _finished_run(run_dir)
    federated = cfg.federated is not None
    asked = attacks is not None
    names = attacks if attacks is not None else [*(() if federated else sorted(ATTACKS)), *MODEL_ATTACKS]
    specs = [({"name": a} if isinstance(a, str) else dict(a)) for a in names]
    suggestions = _suggestions(store, max_mp_drop) if store is not None else {}
    context = None
    findings = []
    for spec in specs:
        name = spec["name"]
        if name == "membership":
            findings.append(
                _membership(
                    run_dir,
                    cfg,
                    spec,
                    references=membership_references,
                    max_examples=membership_examples,
                    log=log,
                )
            )
            continue
        if name == "gradient_inversion":
            found = _gradient_inversion(cfg, asked=asked)
            if found is not None:
                findings.append(found)
            continue
        cls = ATTACKS.get(name)
        attack = build_attack(spec)
        needs = getattr(cls, "needs", ())
        crossing = ", ".join(sorted({f"{n.kind}.{n.tensor} ({KINDS[n.kind].direction})" for n in needs}))
        reason = (
            "a federated run crosses no split, so nothing was recorded to attack "
            "(its attacks are membership and gradient_inversion)"
            if recording is None
            else why_not_applicable(spec, recording)
        )
        if reason is not None:
            if asked:  # asked for by name: say why it did not run
                findings.append(Finding(name, crossing, None, None, None, None, f"not applicable: {reason}"))
            continue
        assert recording is not None
        if context is None:
            context = attack_context(
                cfg, auxiliary_texts(cfg, aux), max_examples=max_examples, progress=progress
            )
        try:
            result = run_attack(attack, recording, context, phases="train")
        except AttackError as err:  # the attack refuses this run's setting (e.g. bli on an HBT classifier)
            findings.append(Finding(name, crossing, None, None, None, None, f"not applicable: {err}"))
            continue
        except Exception as err:  # one failing attack does not lose the others' findings
            findings.append(
                Finding(name, crossing, None, None, None, None, f"failed: {type(err).__name__}: {err}")
            )
            continue
        metric = next(
            (m for m in ("token_f1", "label_accuracy", "accuracy", "auc") if m in result.metrics), None
        )
        score = result.metrics.get(metric) if metric else None
        findings.append(
            Finding(
                name,
                crossing,
                metric,
                score,
                result.baseline.get(metric) if metric else None,
                result.chance,
                _verdict(score, result.chance),
                [{"original": e.original, "reconstructed": e.reconstructed} for e in result.examples],
                suggestions.get(name),
                dict(result.metrics),
            )
        )
    return Audit(run_dir, recording, findings, "federated" if federated else "split")


def _membership(
    run_dir: Path,
    cfg: RunConfig,
    spec: dict[str, Any],
    *,
    references: int,
    max_examples: int | None,
    log: Callable[[str], None],
) -> Finding:
    """Membership inference on the run's fine-tuned model, scored against its training split."""
    from splitfed.privacy.attacks import AttackError
    from splitfed.privacy.attacks.membership import membership_from_run

    unknown = sorted(set(spec) - {"name", "references", "reference_steps", "max_examples"})
    if unknown:
        raise ConfigError(
            f"membership takes references, reference_steps and max_examples; got {', '.join(unknown)}"
        )
    references = int(spec.get("references", references))
    crossing = (
        "the global adapters (the server holds them every round)"
        if cfg.federated is not None
        else "the fine-tuned model: every party's adapters (whoever gets the final model)"
    )
    try:
        result = membership_from_run(
            run_dir,
            references=references,
            reference_steps=spec.get("reference_steps"),
            max_examples=spec.get("max_examples", max_examples),
            log=log,
        )
    except (AttackError, ConfigError, FileNotFoundError, ValueError) as err:
        return Finding("membership", crossing, None, None, None, 0.5, f"not applicable: {err}")
    metric = "lira_auc" if references else "loss_auc"
    score, m = result.metrics[metric], result.metrics
    members, non_members = int(result.params["members"]), int(result.params["non_members"])
    margin = max(LEAK_MARGIN, 2 * auc_spread(members, non_members))
    scored = ["loss", *(("reference", "lira") if references else ())]
    detail = (
        "; ".join(
            f"{s} AUC {m[f'{s}_auc']:.2f}, TPR {m[f'{s}_tpr@0.01fpr']:.2f} at 1% FPR, "
            f"{m[f'{s}_tpr@0.1fpr']:.2f} at 10% FPR"
            for s in scored
        )
        + f"; mean loss {m['member_loss']:.3f} on {members} training examples (members) against "
        f"{m['non_member_loss']:.3f} on {non_members} held-out ({cfg.data.eval_split}) examples; "
        f"leaking means an AUC above 0.5 + {margin:.2f} (two standard deviations of a guess's AUC at "
        "this size, at least the audit's margin)"
        + (
            f"; {references} reference model(s) fine-tuned like the run on other held-out data"
            if references
            else "; the loss-threshold attack alone (reference models and LiRA: membership_references)"
        )
    )
    return Finding(
        "membership",
        crossing,
        metric,
        score,
        None,
        result.chance,
        _verdict(score, result.chance, margin),
        metrics=dict(m),
        detail=detail,
    )


def _gradient_inversion(cfg: RunConfig, *, asked: bool) -> Finding | None:
    """Why gradient inversion of a client's LoRA update cannot run on this run, and what it would need.

    ``None`` for a split run that exchanged no adapters in the clear, unless the attack was asked for.
    """
    crossing = "one client's LoRA update (to the server)"
    fed = cfg.federated

    def finding(verdict: str, detail: str) -> Finding:
        return Finding(
            "gradient_inversion",
            crossing,
            None,
            None,
            None,
            None,
            f"not applicable: {verdict}",
            detail=detail,
        )

    if fed is None:
        if cfg.train.fedavg_every and cfg.train.fedavg_aggregation == "plain":
            return finding(
                "this split run's adapter averaging is not a client's one-step update",
                "the model party saw each data party's head adapters in the clear (train.fedavg_every "
                f"{cfg.train.fedavg_every}, fedavg_aggregation plain): a leak, but of many split steps "
                "driven by the gradients the model party itself returned, which gradient_inversion (one "
                "local step of a federated client on a whole causal LM) does not model; "
                "fedavg_aggregation secagg or ckks hides them",
            )
        if not asked:
            return None
        return finding(
            "a split run exchanges no federated client updates",
            "gradient_inversion attacks the updates a fedtrain server aggregates",
        )
    if fed.aggregation in ("ckks", "secagg"):
        return finding(
            f"{fed.aggregation} aggregation shows the server no client's update",
            "secagg gives the server only the sum of the round's masked updates, ckks only ciphertexts; "
            "inverting a sum of clients' updates spans too many tokens to recover text "
            "(splitfed.privacy.attacks.gradient_inversion)",
        )
    unlike = []
    if cfg.task != "causal_lm":
        unlike.append(f"its task is {cfg.task}, the attack's loss is the causal LM's")
    if fed.local_steps != 1:
        steps = (
            f"{fed.local_epochs} local epochs"
            if fed.local_steps is None
            else f"{fed.local_steps} local steps"
        )
        unlike.append(f"its clients took {steps}, the attack inverts one")
    if cfg.train.optimizer != "sgd":
        unlike.append(f"its clients' optimizer is {cfg.train.optimizer}, not sgd (update = -lr * gradient)")
    if fed.dp is not None:
        unlike.append("client-level DP clips each update and noises the sum")
    if fed.pruning is not None:
        unlike.append("pruning zeroes part of each update")
    return finding(
        "fedtrain records no client updates",
        f"the server of this run saw every sampled client's update in the clear ({fed.aggregation} "
        "aggregation), so gradient inversion would apply, but fedtrain keeps only per-round losses and "
        "bytes (results.json) and the final global adapters (global/adapter.safetensors). An audit "
        "needs, per round: the global adapters the clients started from, each client's update as the "
        "server decoded it, the clients' learning rate, and, apart as ground truth, each client's batch "
        "tokens"
        + (f". This run also differs from what the attack inverts: {'; '.join(unlike)}" if unlike else ""),
    )


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
