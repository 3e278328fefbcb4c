"""Membership inference on a fine-tuned model: was this example in its training data?

The attacker holds the fine-tuned model (a split run's adapters or a federated run's global
adapters on the public base model) and queries its loss on candidate examples. Two attacks:

``loss``
    The loss-threshold attack of Yeom et al. 2018 ("Privacy Risk in Machine Learning: Analyzing
    the Connection to Overfitting", CSF): score ``-loss(x)``; members, which the model was fitted
    to, have lower loss.
``reference`` / ``lira``
    Calibration by reference models the attacker fine-tunes itself, with the target's recipe, on
    auxiliary data disjoint from the target's members, so ``x`` is *out* of every reference model.
    ``reference`` is the calibrated loss difference ``mean_ref loss(x) - loss(x)`` of Watson et al.
    2022 ("On the Importance of Difficulty Calibration in Membership Inference Attacks", ICLR) and
    the reference attack of Ye et al. 2022 ("Enhanced Membership Inference Attacks against Machine
    Learning Models", CCS): it subtracts how hard ``x`` is anyway. ``lira`` is the offline variant
    of LiRA (Carlini et al. 2022, "Membership Inference Attacks From First Principles", S&P): the
    confidence ``p = exp(-loss)`` is logit-scaled, ``phi = log p / (1 - p)``, the reference
    models' ``phi(x)`` fit a Gaussian of the *out* distribution, and the score is the one-sided
    z-score ``(phi_target(x) - mu_out(x)) / sigma``. With few reference models ``sigma`` is one
    global value (LiRA's fixed-variance variant, then rank-equivalent to the calibrated difference
    in ``phi``); with ``per_example_variance`` and at least two references it is each example's.

Every score is reported as ROC AUC and TPR at 1 % and 10 % FPR (the low-FPR operating points
Carlini et al. argue for) over members (the run's training examples) against non-members (held-out
examples of the same distribution: the run's evaluation split).

This attack reads a model, not a recording of what crossed the split, so it does not fit
:class:`~splitfed.privacy.attacks.base.Attack`'s observation interface; :func:`run_membership`
and :func:`membership_from_run` are its entry points.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from splitfed.privacy.attacks.base import AttackError, AttackResult
from splitfed.privacy.attacks.metrics import binary_auc, tpr_at_fpr

Example = dict[str, Any]
#: Logits of a batch of model inputs (a whole-model :class:`~splitfed.models.partition.Segment`).
ModelFn = Callable[..., torch.Tensor]

#: The attacks' names, as prefixes of their metric keys.
SCORES = ("loss", "reference", "lira")
#: The false-positive rates TPR is reported at.
FPRS = (0.01, 0.1)


def _inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    from splitfed.split.parties import INPUT_KEYS

    return {k: batch[k] for k in INPUT_KEYS if k in batch}


def _row(batch: Mapping[str, Any], i: int) -> dict[str, Any]:
    return {k: v[i : i + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in batch.items()}


@torch.no_grad()
def example_losses(
    model: ModelFn, examples: Sequence[Example], task: Any, *, batch_size: int = 16
) -> torch.Tensor:
    """The task loss of ``model`` on each example, ``[len(examples)]`` float64.

    Parameters
    ----------
    model : callable
        Maps the collated inputs (``input_ids``, ``attention_mask``, ...) to logits in the layout
        ``task.loss`` expects (e.g. :func:`~splitfed.federated.simulation.whole_model`).
    examples : sequence of dict
    task : splitfed.data.tasks.Task
        Collates the examples and gives the loss (each row scored on its own).
    batch_size : int, default 16
    """
    if isinstance(model, nn.Module):
        model.eval()
    out: list[float] = []
    for start in range(0, len(examples), batch_size):
        batch = task.collate(list(examples[start : start + batch_size]))
        logits = model(**_inputs(batch)).float()
        for i in range(logits.shape[0]):
            out.append(float(task.loss(logits[i : i + 1], _row(batch, i))))
    return torch.tensor(out, dtype=torch.float64)


def logit_confidence(losses: torch.Tensor) -> torch.Tensor:
    """LiRA's statistic ``log p / (1 - p)`` of the confidence ``p = exp(-loss)`` (stable for any loss >= 0)."""
    loss = losses.double().clamp(min=1e-9)
    return -loss - torch.log(-torch.expm1(-loss))


def membership_scores(
    target: torch.Tensor, references: torch.Tensor | None = None, *, per_example_variance: bool = False
) -> dict[str, torch.Tensor]:
    """Each attack's member score (higher: more likely a member) from per-example losses.

    Parameters
    ----------
    target : Tensor ``[n]``
        The target model's loss on each candidate.
    references : Tensor ``[k, n]`` | None
        The ``k`` reference models' losses on the same candidates (none of them trained on any).
    per_example_variance : bool, default False
        LiRA's Gaussian with each example's variance over the references (needs ``k >= 2``)
        instead of one global variance.

    Returns
    -------
    dict
        ``loss`` and, with references, ``reference`` and ``lira``.
    """
    scores = {"loss": -target.double()}
    if references is None or references.numel() == 0:
        return scores
    references = references.double().reshape(-1, target.shape[0])
    scores["reference"] = references.mean(0) - target.double()
    phi_target, phi_ref = logit_confidence(target), logit_confidence(references)
    mu = phi_ref.mean(0)
    if references.shape[0] >= 2:
        var = phi_ref.var(0, unbiased=True)
        sigma = var.clamp(min=1e-6).sqrt() if per_example_variance else var.mean().clamp(min=1e-6).sqrt()
    else:  # one reference: no variance to estimate, a global scale (ranks are what AUC reads)
        sigma = (phi_target - mu).std().clamp(min=1e-6)
    scores["lira"] = (phi_target - mu) / sigma
    return scores


def score_membership(scores: Mapping[str, torch.Tensor], is_member: torch.Tensor) -> dict[str, float]:
    """``<attack>_auc`` and ``<attack>_tpr@<fpr>`` of every score against the membership labels."""
    metrics: dict[str, float] = {}
    for name, score in scores.items():
        metrics[f"{name}_auc"] = binary_auc(score, is_member)
        for fpr in FPRS:
            metrics[f"{name}_tpr@{fpr:g}fpr"] = tpr_at_fpr(score, is_member, fpr)
    return metrics


def run_membership(
    target_model: ModelFn,
    reference_models: Sequence[ModelFn],
    members: Sequence[Example],
    non_members: Sequence[Example],
    task: Any,
    *,
    batch_size: int = 16,
    per_example_variance: bool = False,
    params: Mapping[str, Any] | None = None,
) -> AttackResult:
    """Membership inference of ``members`` against ``non_members`` on ``target_model``.

    Parameters
    ----------
    target_model : callable
        The fine-tuned model under attack (inputs to logits, see :func:`example_losses`).
    reference_models : sequence of callable
        Models the attacker fine-tuned on data disjoint from ``members`` and ``non_members``
        (:func:`train_reference`); empty: only the loss-threshold attack.
    members, non_members : sequence of dict
        The target's training examples and held-out examples of the same distribution.
    task : splitfed.data.tasks.Task
    batch_size : int, default 16
    per_example_variance : bool, default False
        See :func:`membership_scores`.
    params : mapping | None
        Recorded in the result's ``params`` (how the references were trained, ...).

    Returns
    -------
    AttackResult
        ``metrics``: ``loss_auc``, ``loss_tpr@0.01fpr``, ``loss_tpr@0.1fpr`` and the same of
        ``reference`` and ``lira`` when there are reference models, plus the mean losses of
        members and non-members; ``chance`` 0.5 (the AUC of a guess); ``params``: the number of
        reference models, of members and of non-members, and ``params``.
    """
    if not members or not non_members:
        raise AttackError(
            f"membership inference needs members and non-members; got {len(members)} and {len(non_members)}"
        )
    t0 = time.perf_counter()
    candidates = [*members, *non_members]
    is_member = torch.cat([torch.ones(len(members)), torch.zeros(len(non_members))])
    target = example_losses(target_model, candidates, task, batch_size=batch_size)
    references = (
        torch.stack([example_losses(m, candidates, task, batch_size=batch_size) for m in reference_models])
        if reference_models
        else None
    )
    scores = membership_scores(target, references, per_example_variance=per_example_variance)
    metrics = score_membership(scores, is_member)
    metrics["member_loss"] = float(target[is_member == 1].mean())
    metrics["non_member_loss"] = float(target[is_member == 0].mean())
    return AttackResult(
        attack="membership",
        metrics=metrics,
        chance=0.5,
        n_examples=len(candidates),
        seconds=time.perf_counter() - t0,
        params={
            "references": len(reference_models),
            "per_example_variance": per_example_variance,
            "members": len(members),
            "non_members": len(non_members),
        }
        | dict(params or {}),
    )


def train_reference(
    base_model: nn.Module,
    examples: Sequence[Example],
    task: Any,
    *,
    head: str,
    finetune: Any,
    fit: Any,
    seed: int = 0,
) -> nn.Module:
    """Fine-tune a reference model as the target was: LoRA (or the run's mode) on ``examples``.

    Parameters
    ----------
    base_model : nn.Module
        A fresh copy of the public base task model; it is modified in place and returned (as a
        whole-model segment, which maps inputs to logits).
    examples : sequence of dict
        The attacker's auxiliary data, disjoint from the target's candidates.
    task : splitfed.data.tasks.Task
    head : str
        The task head (``causal_lm``, ``classification``, ...).
    finetune : splitfed.models.partition.FinetuneSpec
        What to train, as the target run did.
    fit : splitfed.federated.strategies.FitConfig
        Steps (or epochs), batch size, optimizer and learning rate.
    seed : int, default 0
        Seeds the batches (different seeds give different reference models).
    """
    from splitfed.federated.client import local_update
    from splitfed.federated.simulation import whole_model
    from splitfed.models.partition import apply_finetune

    if not examples:
        raise AttackError("a reference model needs auxiliary examples to train on")
    segment = whole_model(base_model, head)
    apply_finetune(segment, finetune)
    params = segment.named_model_parameters(trainable_only=True)

    def loss_fn(ids: list[int]) -> torch.Tensor:
        batch = task.collate([examples[i] for i in ids])
        return task.loss(segment(**_inputs(batch)), batch)  # type: ignore[no-any-return]

    segment.train()
    local_update(params, loss_fn=loss_fn, num_examples=len(examples), fit=fit, seed=seed)
    return segment.eval()


# ---------------------------------------------------------------------- from a run's output directory


@dataclass
class TargetRun:
    """A finished run as the membership attacker loads it.

    Attributes
    ----------
    model : nn.Module
        The fine-tuned model as one whole-model segment (inputs to logits).
    cfg : splitfed.config.RunConfig
    work : splitfed.run.Workload
        What :func:`splitfed.run.prepare` loaded (its ``model`` is the fine-tuned one).
    members, non_members, auxiliary : list of dict
        The training split, the evaluation split, and the other held-out split.
    """

    model: nn.Module
    cfg: Any
    work: Any
    members: list[Example]
    non_members: list[Example]
    auxiliary: list[Example]


def load_target_run(output_dir: str | Path, *, log: Callable[[str], None] = lambda s: None) -> TargetRun:
    """The fine-tuned model of a finished run and its members, from ``output_dir``.

    The configuration is read from ``results.json``; the data, task and base model load as the run
    loaded them (:func:`splitfed.run.prepare`, so a data party's share with ``data.num_parties`` >
    1). A federated run's ``global/adapter.safetensors`` is copied into the whole model after
    ``federated.finetune`` set it up; a split run's party adapters go into the segments
    :func:`~splitfed.split.system.prepare_segments` cuts, whose LoRA modules live in the shared
    blocks, so the whole model then computes what the split did (a data party's defenses aside).

    Raises
    ------
    FileNotFoundError
        Without ``results.json`` or the adapter files it points to.
    """
    from safetensors.torch import load_file

    from splitfed.config import parse_config
    from splitfed.federated.simulation import whole_model
    from splitfed.models.partition import apply_finetune
    from splitfed.run import load_adapters, prepare
    from splitfed.split.system import prepare_segments

    out = Path(output_dir)
    results = out / "results.json"
    if not results.is_file():
        raise FileNotFoundError(f"{results} does not exist: pass the output_dir of a finished run")
    cfg = parse_config(json.loads(results.read_text())["config"])
    work = prepare(cfg, log)
    if cfg.federated is not None:
        path = out / "global" / "adapter.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: the federated run did not finish")
        segment = whole_model(work.model, cfg.head)
        apply_finetune(segment, cfg.federated.finetune.spec())
        params = segment.named_model_parameters()
        saved = load_file(str(path))
        unknown = sorted(set(saved) - set(params))
        if unknown:
            raise ValueError(f"{path} holds parameters this model does not have: {unknown[:5]}")
        with torch.no_grad():
            for name, tensor in saved.items():
                params[name].copy_(tensor)
    else:
        if not (out / "data_party" / "adapter.safetensors").is_file():
            raise FileNotFoundError(f"{out / 'data_party' / 'adapter.safetensors'} does not exist")
        segments, _ = prepare_segments(work.model, cfg.split.spec(), cfg.head, cfg.segment_finetune())
        load_adapters(segments, out)
        segment = whole_model(work.model, cfg.head)
    other = "test" if cfg.data.eval_split == "validation" else "validation"
    return TargetRun(
        model=segment.eval(),
        cfg=cfg,
        work=work,
        members=list(work.splits.train),
        non_members=list(getattr(work.splits, cfg.data.eval_split)),
        auxiliary=list(getattr(work.splits, other) or []),
    )


def membership_from_run(
    output_dir: str | Path,
    *,
    references: int = 2,
    auxiliary: Sequence[Example] | None = None,
    reference_steps: int | None = None,
    max_examples: int | None = None,
    batch_size: int = 16,
    log: Callable[[str], None] = lambda s: None,
) -> AttackResult:
    """Membership inference on the fine-tuned model of the finished run in ``output_dir``.

    Parameters
    ----------
    output_dir : str | Path
        A split (``splitfed train``) or federated (``splitfed fedtrain``) run's output directory.
    references : int, default 2
        Reference models to fine-tune (0: the loss-threshold attack only). Each is trained with
        the run's fine-tuning spec, batch size, optimizer and learning rate, on ``auxiliary``
        with its own seed.
    auxiliary : sequence of dict | None
        The attacker's data, disjoint from members and non-members; default: the dataset's split
        that is neither trained on nor evaluated (``test`` when the run evaluates on
        ``validation``, and vice versa).
    reference_steps : int | None
        Optimizer steps of each reference model; default: the run's own step count.
    max_examples : int | None
        Score at most this many members and as many non-members (the first ones).
    batch_size : int, default 16
    log : callable
    """
    run = load_target_run(output_dir, log=log)
    members, non_members = run.members[:max_examples], run.non_members[:max_examples]
    aux = list(auxiliary) if auxiliary is not None else run.auxiliary
    steps = reference_steps or run.work.total_steps
    models = train_references(run, references, aux, steps=steps)
    return run_membership(
        run.model,
        models,
        members,
        non_members,
        run.work.task,
        batch_size=batch_size,
        params={"output_dir": str(output_dir), "reference_steps": steps, "auxiliary": len(aux)},
    )


def train_references(
    run: TargetRun, count: int, auxiliary: Sequence[Example], *, steps: int | None = None
) -> list[ModelFn]:
    """``count`` reference models for ``run``, fine-tuned as it was on ``auxiliary``, each with its own seed.

    Each starts from the public pretrained model and is trained with the run's fine-tuning spec
    (a split run's: the body's), batch size, optimizer and learning rate, for ``steps`` optimizer
    steps (default: the run's own count).

    Raises
    ------
    AttackError
        When ``count`` > 0 and ``auxiliary`` is empty.
    """
    from splitfed.federated.strategies import FitConfig
    from splitfed.run import load_run_model

    if count and not auxiliary:
        raise AttackError(
            "reference models need auxiliary examples: pass auxiliary=[...] (disjoint from the run's "
            "training and evaluation splits) or references=0"
        )
    cfg, work = run.cfg, run.work
    finetune = cfg.federated.finetune.spec() if cfg.federated is not None else _whole_finetune(cfg)
    fit = FitConfig.from_train(cfg.train, local_steps=steps or work.total_steps)
    num_labels = len(work.splits.label_names) if work.splits.label_names else None
    models: list[ModelFn] = []
    for k in range(count):
        _, base = load_run_model(cfg, cfg.head, num_labels)
        models.append(
            train_reference(
                base,
                auxiliary,
                work.task,
                head=cfg.head,
                finetune=finetune,
                fit=fit,
                seed=cfg.train.seed + 1 + k,
            )
        )
    return models


def _whole_finetune(cfg: Any) -> Any:
    """One spec for a reference model of a split run: the body's (where the split trains LoRA)."""
    specs = cfg.segment_finetune()
    for role in ("body", "head", "tail"):
        spec = specs.get(role)
        if spec is not None and spec.mode != "frozen":
            return spec
    raise AttackError(f"the run {cfg.output_dir} fine-tunes nothing: no reference recipe to copy")


__all__ = [
    "FPRS",
    "SCORES",
    "TargetRun",
    "example_losses",
    "load_target_run",
    "logit_confidence",
    "membership_from_run",
    "membership_scores",
    "run_membership",
    "score_membership",
    "train_reference",
]
