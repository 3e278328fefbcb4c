"""Audit of one finished run: every attack that applies to it, with a plain verdict.

``splitfed audit RUN_DIR`` reads the run's ``results.json`` (its config and, for a split run,
where its recording is) and runs each attack whose inputs the run kept, as the honest-but-curious
party would:

* on a split run's recording, each registered attack whose message kinds crossed (inversion,
  label inference, ...), as the model party;
* ``membership`` on the fine-tuned model (a split run's party adapters, a federated run's global
  adapters) over the run's training examples against its held-out ones: the loss-threshold attack
  by default, reference-model calibration and offline LiRA with ``membership_references``;
* ``gradient_inversion`` of a federated client's LoRA update, on a ``fedtrain --record DIR``
  recording (:mod:`splitfed.federated.recording`): each of a few client updates as the server
  decoded it, at the global adapters its client started from, scored against the client's batch
  in the recording's ``ground_truth/``. It applies where one update is one SGD step of a causal LM
  (``federated.local_steps: 1``, ``train.optimizer: sgd``, no client-level DP, pruning, LoRA
  dropout or dropout in the model's config) from round 2 on (peft starts LoRA's B at zero, so
  round 1's lora_A gradients are zero).
  Under ``secagg`` the server decodes only the round's average, which is attacked the same way and
  scored against whichever client's batch it matches best; under ``ckks`` the server reads only
  ciphertexts. Where the attack does not apply (or the run kept no recording) the finding says why
  (``not applicable: ...``), and what a run would have to keep, rather than leaving the attack out.
  A recording that cannot be read (moved or deleted since the run, damaged, made by another run) is
  a finding ``failed: ...`` that names the file, so the other attacks' findings stand; one named
  with ``recording=`` (``--recording``) is checked against the run's settings before anything loads.

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
#: Client updates (secagg: round averages) the audit's gradient inversion attacks by default; each
#: is a gradient-matching search of many double-backward passes through the model.
INVERSION_UPDATES = 2
#: What a ``gradient_inversion`` spec may set besides its name: how many updates, and the options
#: of :func:`~splitfed.privacy.attacks.gradient_inversion.invert_lora_gradient`.
INVERSION_OPTIONS = (
    "max_updates",
    "steps",
    "lr",
    "alpha",
    "candidates",
    "bag_threshold",
    "refine_passes",
    "last_candidates",
    "seed",
    "scale_free",
)


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
        The run's recording: a split run's crossings, a federated run's server view
        (``fedtrain --record``); ``None`` for a federated run recorded without one.
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


def _unscored(
    attack: str, crossing: str, verdict: str, *, detail: str | None = None, chance: float | None = None
) -> Finding:
    """A finding without a score: ``not applicable: ...`` or ``failed: ...``."""
    return Finding(attack, crossing, None, None, None, chance, verdict, detail=detail)


def _finished_run(run_dir: Path, recording: Path | None = None) -> tuple[RunConfig, Path | None]:
    """The run's config and its recording (``recording``, else the one its results.json names)."""
    results = run_dir / "results.json"
    if not results.is_file():
        raise ConfigError(f"{run_dir} has no results.json: audit a finished run's output_dir")
    summary = json.loads(results.read_text())
    federated = (summary.get("config") or {}).get("federated") is not None
    if recording is not None:
        cfg = parse_config(summary["config"])
        if federated:  # named by hand: refuse one of another run (or none) before anything loads
            from splitfed.federated.recording import FederatedRecording

            FederatedRecording(recording).check_settings(cfg, run=run_dir)
        return cfg, Path(recording)
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
    max_updates: int = INVERSION_UPDATES,
    recording: str | Path | None = None,
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
    max_updates : int, default 2
        Client updates (under secagg: round averages) gradient inversion attacks, from round 2 on;
        a ``gradient_inversion`` spec's ``max_updates`` overrides it.
    recording : str | Path | None
        The run's recording, where it is not (or no longer) where ``results.json`` says: a split
        run's ``--record`` directory, or a federated run's ``fedtrain --record`` directory (its
        settings must be the run's).
    progress : bool, default False
    log : callable
        Progress lines (loading the run, training reference models).

    Raises
    ------
    ConfigError
        No results.json, a split run without a recording, or an attack spec it cannot take.
    RecordingError
        A federated ``recording`` that is missing, damaged, or made with settings other than the
        run's (model, fine-tuning, aggregation, seed, ...), each named.
    """
    from splitfed.bench.sweep import why_not_applicable
    from splitfed.privacy.attack_runs import attack_context, auxiliary_texts
    from splitfed.privacy.attacks import ATTACKS, AttackError, build_attack, run_attack
    from splitfed.protocol import KINDS

    run_dir = Path(run_dir)
    cfg, recording = _finished_run(run_dir, None if recording is None else Path(recording))
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
            try:
                found = _gradient_inversion(
                    cfg,
                    asked=asked,
                    recording=recording,
                    spec=spec,
                    max_updates=max_updates,
                    log=log,
                    progress=progress,
                )
            except ConfigError:  # the spec itself is wrong: the caller's to fix
                raise
            except AttackError as err:  # one failing attack does not lose the others' findings
                found = _inversion_not_applicable(str(err))
            except Exception as err:  # a recording moved, damaged or of another run: named in err
                found = _unscored(name, _INVERSION_CROSSING, f"failed: {type(err).__name__}: {err}")
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
            if federated or recording is None
            else why_not_applicable(spec, recording)
        )
        if reason is not None:
            if asked:  # asked for by name: say why it did not run
                findings.append(_unscored(name, crossing, f"not applicable: {reason}"))
            continue
        assert recording is not None and not federated
        if context is None:
            context = attack_context(
                cfg, auxiliary_texts(cfg, aux), max_examples=max_examples, progress=progress
            )
        try:
            result = run_attack(attack, recording, context, phases="train")
        except AttackError as err:  # the attack refuses this run's setting (e.g. bli on an HBT classifier)
            findings.append(_unscored(name, crossing, f"not applicable: {err}"))
            continue
        except Exception as err:  # one failing attack does not lose the others' findings
            findings.append(_unscored(name, crossing, f"failed: {type(err).__name__}: {err}"))
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
        return _unscored("membership", crossing, f"not applicable: {err}", chance=0.5)
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


#: What gradient inversion reads where the server decodes each client's update.
_INVERSION_CROSSING = "one client's LoRA update (to the server)"
#: Dropout settings of a model config that do not act on a causal LM (other heads' dropout).
_OTHER_HEADS_DROPOUT = ("classifier", "summary", "seq_classif", "qa_")


def _inversion_not_applicable(why: str, detail: str | None = None) -> Finding:
    return _unscored("gradient_inversion", _INVERSION_CROSSING, f"not applicable: {why}", detail=detail)


def model_dropout(config: Any) -> dict[str, float]:
    """The dropout probabilities above zero in a transformers model ``config`` that act on a causal
    LM's forward pass (``attention_dropout``, ``hidden_dropout_prob``, GPT-2's ``resid_pdrop``, ...;
    not a classifier's or summary head's): each makes a training step's gradient random."""
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {
        key: float(value)
        for key, value in sorted(values.items())
        if ("dropout" in key or key.endswith("_pdrop"))
        and not key.startswith(_OTHER_HEADS_DROPOUT)
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and value > 0
    }


def _gradient_inversion(
    cfg: RunConfig,
    *,
    asked: bool,
    recording: Path | None = None,
    spec: dict[str, Any] | None = None,
    max_updates: int = INVERSION_UPDATES,
    log: Callable[[str], None] = lambda s: None,
    progress: bool = False,
) -> Finding | None:
    """Gradient inversion of a federated client's LoRA update, on the run's recording where it applies.

    On a ``fedtrain --record`` recording of a run whose update is one SGD step of a causal LM, the
    attack runs (:func:`_invert_recorded`); otherwise the finding says why it cannot (``not
    applicable: ...``) and what a run would have to keep. ``None`` for a split run that exchanged
    no adapters in the clear, unless the attack was asked for.
    """
    fed = cfg.federated
    spec = dict(spec or {"name": "gradient_inversion"})
    unknown = sorted(set(spec) - {"name", *INVERSION_OPTIONS})
    if unknown:
        raise ConfigError(
            f"gradient_inversion takes {', '.join(INVERSION_OPTIONS)}; got {', '.join(unknown)}"
        )

    if fed is None:
        if cfg.train.fedavg_every and cfg.train.fedavg_aggregation == "plain":
            return _inversion_not_applicable(
                "this split run's adapter averaging is not a client's one-step update",
                "the model party saw each data party's head adapters in the clear (train.fedavg_every "
                f"{cfg.train.fedavg_every}, fedavg_aggregation plain): a leak, but of many split steps "
                "driven by the gradients the model party itself returned, which gradient_inversion (one "
                "local step of a federated client on a whole causal LM) does not model; "
                "fedavg_aggregation secagg or ckks hides them",
            )
        if not asked:
            return None
        return _inversion_not_applicable(
            "a split run exchanges no federated client updates",
            "gradient_inversion attacks the updates a fedtrain server aggregates",
        )
    if fed.aggregation == "ckks" or (fed.aggregation == "secagg" and recording is None):
        return _inversion_not_applicable(
            f"{fed.aggregation} aggregation shows the server no client's update",
            "secagg gives the server only the sum of the round's masked updates, ckks only ciphertexts; "
            "inverting a sum of clients' updates spans too many tokens to recover text "
            "(splitfed.privacy.attacks.gradient_inversion)"
            + (
                "; record the run (fedtrain --record DIR) to attack secagg's sum"
                if fed.aggregation == "secagg"
                else ""
            ),
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
    if fed.finetune.dropout > 0:
        unlike.append(
            f"its LoRA dropout is {fed.finetune.dropout:g}: the attack models a client without dropout"
        )
    if recording is not None:
        from splitfed.models.loading import load_model_config

        dropout = model_dropout(load_model_config(cfg.model.name))
        if dropout:
            unlike.append(
                f"its model {cfg.model.name} trains with dropout ("
                + ", ".join(f"{k} {v:g}" for k, v in dropout.items())
                + "): each client's gradient is of a random sub-network the attack cannot rerun"
            )
    if recording is None:
        return _inversion_not_applicable(
            "fedtrain records no client updates",
            f"the server of this run saw every sampled client's update in the clear ({fed.aggregation} "
            "aggregation), so gradient inversion would apply, but this run was not recorded: fedtrain "
            "keeps only per-round losses and bytes (results.json) and the final global adapters "
            "(global/adapter.safetensors). An audit needs, per round: the global adapters the clients "
            "started from, each client's update as the server decoded it, the clients' learning rate, "
            "and, apart as ground truth, each client's batch tokens; `splitfed fedtrain CONFIG --record "
            "DIR` keeps them"
            + (
                f". This run also differs from what the attack inverts: {'; '.join(unlike)}" if unlike else ""
            ),
        )
    if unlike:
        return _inversion_not_applicable(
            "; ".join(unlike),
            f"the recording {recording} keeps the server's view, but the attack inverts one SGD step of a "
            "causal LM's LoRA adapters (federated.local_steps 1, train.optimizer sgd, no client-level DP, "
            "pruning, LoRA dropout or dropout in the model)",
        )
    options = {k: v for k, v in spec.items() if k not in ("name", "max_updates")} | {"progress": progress}
    return _invert_recorded(
        cfg, recording, limit=int(spec.get("max_updates", max_updates)), options=options, log=log
    )


def _invert_recorded(
    cfg: RunConfig, path: Path, *, limit: int, options: dict[str, Any], log: Callable[[str], None]
) -> Finding:
    """Invert up to ``limit`` recorded client updates (secagg: round averages) from round 2 on.

    Each is turned into the client's gradient (``-update / lr``, less weight decay's share) at the
    global adapters of its round, inverted by
    :func:`~splitfed.privacy.attacks.gradient_inversion.run_gradient_inversion` and scored against
    the first (only) local step's tokens in the recording's ground truth; the finding averages
    token F1, bag-of-words F1 and chance (the token F1 of uniform guessing) over them.
    """
    import torch

    from splitfed.federated.recording import AGGREGATE, FederatedRecording
    from splitfed.federated.simulation import whole_model
    from splitfed.models.partition import apply_finetune
    from splitfed.privacy.attacks.gradient_inversion import gradient_from_update, run_gradient_inversion
    from splitfed.privacy.recording import RecordingError
    from splitfed.run import load_run_model

    assert cfg.federated is not None
    if limit < 1:
        raise ConfigError(f"gradient_inversion max_updates must be >= 1, got {limit}")
    rec = FederatedRecording(path)
    rec.check_settings(cfg, run=cfg.output_dir)
    truth = rec.ground_truth()
    blind = rec.view == AGGREGATE
    crossing = (
        f"the round's average of the clients' updates ({cfg.federated.aggregation}: all the server decodes)"
        if blind
        else _INVERSION_CROSSING
    )
    rounds = sorted(r for r in rec.rounds if r >= 2)
    if not rounds:
        return _unscored(
            "gradient_inversion",
            crossing,
            "not applicable: the recording holds no round after the first",
            detail=f"{path} holds rounds {sorted(rec.rounds)}; in round 1 the global LoRA B matrices are "
            "zero (peft's initialisation), so every lora_A gradient is zero and the update gives no bag of "
            "words to search from; record at least 2 rounds",
        )
    targets = [(r, c) for r in rounds for c in ([None] if blind else rec.clients(r))]
    tokenizer, model = load_run_model(cfg, cfg.head, None)
    segment = whole_model(model, cfg.head)
    apply_finetune(segment, cfg.federated.finetune.spec())
    params = segment.named_model_parameters(trainable_only=True)
    model.eval()
    vocab = int(getattr(model, "get_input_embeddings")().weight.shape[0])  # noqa: B009 (nn.Module's loose typing)
    results: list[tuple[str, int, Any]] = []
    skipped: list[str] = []
    clipped = looked = 0
    for round_id, client in targets:
        if len(results) == limit:
            break
        looked += 1
        fit = rec.fit(round_id)
        kept = rec.clients(round_id) if not blind else list(rec.rounds[round_id].get("clients", []))
        batches = [(c, truth.steps(round_id, c)[0]) for c in ([client] if client else kept)]
        usable = [(c, b) for c, b in batches if _whole_sequences(b)]
        label = f"round {round_id}" + (f" {client}" if client else "")
        if len(usable) < len(batches):
            skipped.append(
                f"{label}: {'its' if client else 'some clients'} batch is padded or has non-target tokens "
                "(the attack inverts unpadded sequences, every token a target)"
            )
        if not usable:
            continue
        shape = usable[0][1]["input_ids"].shape
        truths = [b["input_ids"] for _, b in usable if b["input_ids"].shape == shape]
        start = rec.global_adapters(round_id)
        if set(start) != set(params):
            raise RecordingError(
                f"{rec.global_path(round_id)} holds other adapters than this model and "
                f"federated.finetune make (e.g. {sorted(set(start) ^ set(params))[:3]})"
            )
        with torch.no_grad():
            for name, tensor in start.items():
                params[name].copy_(tensor)
        delta = rec.average(round_id) if blind else rec.update(round_id, client)  # type: ignore[arg-type]
        observed = gradient_from_update(delta, float(fit["lr"]))
        if fit.get("weight_decay"):
            # SGD's step is -lr * (grad + weight_decay * w) at the global adapters w: take the decay out
            observed = {n: g - float(fit["weight_decay"]) * start[n].float() for n, g in observed.items()}
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in observed.values()))
        scale_free = bool(fit.get("max_grad_norm")) and norm >= float(fit["max_grad_norm"]) * (1 - 1e-3)
        clipped += scale_free
        log(
            f"gradient inversion of {label} ({'average of ' + str(len(kept)) + ' clients' if blind else 'update'})"
        )
        result = run_gradient_inversion(
            model,
            observed,
            truths[0] if len(truths) == 1 else truths,
            tokenizer=tokenizer,
            **({"scale_free": True} if scale_free else {}) | options,
        )
        if len(truths) > 1:  # scored in the attacker's favour, so is chance
            result.chance = _best_match_chance(truths, vocab)
        results.append((label, len(truths), result))
    if not results:
        return _unscored(
            "gradient_inversion",
            crossing,
            "not applicable: no recorded batch is a set of whole unpadded sequences",
            detail="; ".join(skipped),
        )
    mean = lambda key: sum(r.metrics[key] for _, _, r in results) / len(results)  # noqa: E731
    score, chance = mean("token_f1"), sum(r.chance or 0.0 for _, _, r in results) / len(results)
    metrics = {
        k: mean(k)
        for k in (
            "token_f1",
            "token_precision",
            "token_recall",
            "token_accuracy",
            "rouge_l",
            "exact_sequences",
            "bag_f1",
        )
    } | {"updates": float(len(results))}
    per = ", ".join(
        f"{label} {r.metrics['token_f1']:.2f} (bag {r.metrics['bag_f1']:.2f}, ROUGE-L {r.metrics['rouge_l']:.2f})"
        for label, _, r in results
    )
    seq = int(results[0][2].params.get("seq_len", 0))
    if blind:
        what = (
            f"{len(results)} round average(s) of the clients' updates, all the {cfg.federated.aggregation} "
            "server decodes, each inverted as if one client's and scored against whichever client's batch "
            f"it matches best, in the attacker's favour (of {', '.join(str(n) for _, n, _ in results)} "
            "clients)"
        )
    else:
        what = f"{len(results)} client update(s), each as the server decoded it from its upload"
    detail = (
        f"{what}, at the global adapters its round started from (gradient = -update / lr"
        + (" - weight_decay * adapters" if any(rec.fit(r).get("weight_decay") for r in rounds) else "")
        + f"); token F1 (bag-of-words F1, ROUGE-L): {per}; chance is uniform guessing's token F1 "
        f"({seq} tokens of a {vocab}-token vocabulary"
        + (", scored against the best-matching client as the attack is)" if blind else ")")
        + (
            f"; {clipped} update(s) were clipped to train.max_grad_norm (their gradient's scale is lost), "
            "so their gradients were matched in direction only (scale_free)"
            if clipped
            else ""
        )
        + ("; skipped: " + "; ".join(skipped) if skipped else "")
        + (
            f"; {len(targets) - looked} more recorded update(s) not attacked (--max-updates)"
            if len(targets) > looked
            else ""
        )
    )
    examples = [
        {"original": f"[{label}] {e.original}", "reconstructed": e.reconstructed}
        for label, _, r in results
        for e in r.examples[:1]
    ]
    return Finding(
        "gradient_inversion",
        crossing,
        "token_f1",
        score,
        None,
        chance,
        _verdict(score, chance),
        examples,
        metrics=metrics,
        detail=detail,
    )


def _best_match_chance(truths: Sequence[Any], vocab: int, *, draws: int = 200, seed: int = 0) -> float:
    """The mean token F1 of uniform random tokens scored against whichever of ``truths`` they match
    best: chance for a reconstruction scored that way (one truth: about ``seq / vocab``)."""
    import torch

    from splitfed.privacy.attacks.metrics import token_scores

    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(draws):
        guess = torch.randint(0, vocab, tuple(truths[0].shape), generator=generator)
        total += max(token_scores([guess], [t], [torch.ones_like(t)])["token_f1"] for t in truths)
    return total / draws


def _whole_sequences(batch: dict[str, Any]) -> bool:
    """Whether a recorded batch is what the attack inverts: no padding, every token a target."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    labels = batch.get("labels")
    if mask is not None and not bool((mask != 0).all()):
        return False
    return labels is None or bool((labels == ids).all())


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
