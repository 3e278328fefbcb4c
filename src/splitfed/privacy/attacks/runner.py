"""Run an attack on a recording and score it against the data party's ground truth.

:func:`run_attack` reads the recording lazily, pairs every recorded forward that the model party
received (training or evaluation) with its batch's ground truth by ``(client, batch_id)``, hands
the attack only what crossed (:class:`~splitfed.privacy.attacks.base.Observation`), and scores
what it returns: tokens against the batch's ``input_ids``, labels against its ``labels``. Every
inversion attack is reported beside the linear baseline on the same sequences.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from splitfed.privacy.attacks.base import (
    Attack,
    AttackContext,
    AttackError,
    AttackResult,
    Need,
    Observation,
    Reconstruction,
)
from splitfed.privacy.attacks.linear_baseline import LinearBaseline
from splitfed.privacy.attacks.metrics import (
    IGNORE,
    binary_auc,
    decode_examples,
    label_scores,
    majority_label_share,
    majority_token_share,
    token_scores,
)
from splitfed.privacy.recording import GroundTruthReader, Record, RecordingReader, ground_truth_dir

#: The recorded forwards an attack is run on, by default.
PHASES = ("train", "eval")


@dataclass
class Truth:
    """The ground truth of one observation (rows cut as its tensors were)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None


def load_observations(
    recording: str | Path,
    needs: Sequence[Need],
    *,
    phases: str | Iterable[str] = PHASES,
    clients: str | Iterable[str] | None = None,
    max_examples: int | None = None,
    progress: bool = False,
) -> tuple[list[Observation], list[Truth], dict[str, int | None]]:
    """What the attacker saw of each batch, its ground truth, and the recording's split facts.

    A batch is one recorded ``forward`` the model party received; a batch lacking a required
    tensor of ``needs`` (e.g. an evaluation batch has no ``backward``) is skipped. Reading stops
    once ``max_examples`` sequences are in (the last batch is cut to fit).

    Returns
    -------
    observations, truths : lists, one entry per batch
    facts : dict
        ``head_layers`` (from the forwards' metadata, ``None`` when absent).
    """
    reader = RecordingReader(recording)
    truth_reader = GroundTruthReader(ground_truth_dir(recording))
    kinds = {need.kind for need in needs} - {"forward"}
    by_batch: dict[tuple[str, str, int | None], Record] = {}
    for reply in reader.records(kinds=sorted(kinds)) if kinds else ():
        by_batch[(reply.kind, reply.client, reply.batch_id)] = reply
    forwards = list(reader.records(kinds="forward", directions="to_model", phases=phases, clients=clients))
    observations: list[Observation] = []
    truths: list[Truth] = []
    facts: dict[str, int | None] = {"head_layers": None}
    sequences = 0
    bar: Iterable[Record] = forwards
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(forwards, desc="reading", leave=False)
    for forward in bar:
        if max_examples is not None and sequences >= max_examples:
            break
        if forward.batch_id is None or not forward.stored:
            continue
        layers = forward.meta.get("head_layers")
        if isinstance(layers, int) and not isinstance(layers, bool):
            facts["head_layers"] = layers
        tensors: dict[tuple[str, str], torch.Tensor] = {}
        complete = True
        for need in needs:
            record: Record | None = (
                forward
                if need.kind == "forward"
                else by_batch.get((need.kind, forward.client, forward.batch_id))
            )
            if record is None or need.tensor not in record.tensor_info or not record.stored:
                complete = complete and not need.required
                continue
            tensors[(need.kind, need.tensor)] = record.tensor(need.tensor)
        if not complete:
            continue
        try:
            batch = truth_reader.batch(forward.batch_id, forward.client)
        except KeyError:
            continue
        labels = batch.tensor("labels") if "labels" in batch.tensor_info else None
        truth = Truth(batch.tensor("input_ids"), batch.tensor("attention_mask"), labels)
        rows = truth.input_ids.shape[0]
        if max_examples is not None and sequences + rows > max_examples:
            rows = max_examples - sequences
            tensors = {key: t[:rows] for key, t in tensors.items()}
            truth = Truth(
                truth.input_ids[:rows], truth.attention_mask[:rows], None if labels is None else labels[:rows]
            )
        sequences += rows
        observations.append(
            Observation(forward.client, forward.batch_id, forward.phase, forward.step, tensors)
        )
        truths.append(truth)
    if not observations:
        wanted = ", ".join(f"{n.kind}.{n.tensor}" for n in needs if n.required)
        raise AttackError(
            f"{recording}: no recorded batch of phases {sorted([phases] if isinstance(phases, str) else phases)} "
            f"has {wanted} and ground truth ({len(forwards)} forwards recorded); record a run that "
            "sends them (`splitfed train CONFIG --record DIR`)"
        )
    return observations, truths, facts


def known_labels(truths: Sequence[Truth], per_class: int, seed: int = 0) -> dict[int, torch.Tensor]:
    """``per_class`` labels of each class drawn at random, by observation (``-100`` elsewhere).

    What an attacker that knows a few labelled examples knows (spread over the run, not only its
    first batches); they are not scored.
    """
    if per_class <= 0:
        return {}
    places: dict[int, list[tuple[int, int]]] = {}
    for index, truth in enumerate(truths):
        if truth.labels is None or truth.labels.dim() != 1:
            continue
        for row, label in enumerate(truth.labels.tolist()):
            if label != IGNORE:
                places.setdefault(int(label), []).append((index, row))
    generator = torch.Generator().manual_seed(seed)
    known: dict[int, torch.Tensor] = {}
    for label, where in sorted(places.items()):
        for pick in torch.randperm(len(where), generator=generator)[:per_class].tolist():
            index, row = where[pick]
            if index not in known:
                known[index] = torch.full_like(truths[index].labels, IGNORE)  # type: ignore[arg-type]
            known[index][row] = label
    return known


def _score_tokens(
    predicted: Sequence[torch.Tensor], truths: Sequence[Truth]
) -> tuple[dict[str, float], list[torch.Tensor], list[torch.Tensor]]:
    ids = [t.input_ids for t in truths]
    masks = [t.attention_mask for t in truths]
    return token_scores(predicted, ids, masks), ids, masks


def run_attack(
    attack: Attack,
    recording: str | Path,
    context: AttackContext,
    *,
    phases: str | Iterable[str] = PHASES,
    clients: str | Iterable[str] | None = None,
    baseline: bool = True,
    examples: int = 3,
    progress: bool | None = None,
) -> AttackResult:
    """Run ``attack`` on the recording in ``recording`` and score it against its ground truth.

    Parameters
    ----------
    attack : Attack
        See :func:`splitfed.privacy.attacks.build_attack`.
    recording : str | Path
        What ``splitfed train --record DIR`` (or ``run.train(..., record=DIR)``) wrote.
    context : AttackContext
        The attacker's public knowledge; ``context.max_examples`` caps the sequences attacked and
        ``context.head_layers`` (if ``None``) is read from the recording.
    phases : str | Iterable[str], default ("train", "eval")
        Which recorded forwards to attack.
    clients : str | Iterable[str] | None, default None
        Only these data parties' batches.
    baseline : bool, default True
        Score the linear baseline beside an inversion attack (when auxiliary text is given).
    examples : int, default 3
        Reconstructions to keep as text (token attacks).
    progress : bool | None, default None
        Progress bars; ``None`` follows ``context.progress``.

    Returns
    -------
    AttackResult

    Raises
    ------
    AttackError
        If the recording holds nothing the attack can use, or the context lacks what it needs.
    RecordingError
        If the recording or its ground truth is missing or damaged.
    """
    if progress is not None:
        context.progress = progress
    if attack.needs_public_model:
        context.require_model(attack.name)
    if attack.needs_auxiliary and not context.auxiliary_texts:
        raise AttackError(
            f"attack {attack.name!r} learns from auxiliary text: pass AttackContext(auxiliary_texts=...)"
        )
    observations, truths, facts = load_observations(
        recording,
        attack.needs,
        phases=phases,
        clients=clients,
        max_examples=context.max_examples,
        progress=context.progress,
    )
    if context.head_layers is None:
        context.head_layers = facts["head_layers"]
    known = known_labels(truths, attack.known_labels_per_class, context.seed)
    start = time.perf_counter()
    predicted = attack.run(observations, context, known or None)
    seconds = time.perf_counter() - start
    if len(predicted) != len(observations):
        raise AttackError(
            f"attack {attack.name!r} returned {len(predicted)} predictions for {len(observations)} batches"
        )
    result = AttackResult(attack.name, {}, seconds=seconds, params=attack.params())
    if attack.target == "tokens":
        result.metrics, ids, masks = _score_tokens(predicted, truths)
        result.chance = majority_token_share(ids, masks)
        result.n_examples = int(result.metrics.pop("sequences"))
        result.examples = [
            Reconstruction(o, r)
            for o, r in decode_examples(context.tokenizer, predicted, ids, masks, examples)
        ]
        if baseline and attack.reports_baseline and context.auxiliary_texts and context.model is not None:
            guessed = LinearBaseline().run(observations, context)
            result.baseline, _, _ = _score_tokens(guessed, truths)
            result.baseline.pop("sequences")
        return result
    labels = []
    for index, truth in enumerate(truths):
        if truth.labels is None:
            raise AttackError(f"batch {observations[index].batch_id} has no labels in the ground truth")
        scored = truth.labels.clone()
        if scored.dim() == 2:
            scored[:, 0] = IGNORE  # a causal LM's loss is next-token: the first label is no target
        if index in known:
            scored[known[index] != IGNORE] = IGNORE  # what the attacker was told is not scored
        labels.append(scored)
    result.metrics = label_scores(predicted, labels)
    if attack.positive_scores is not None and set(torch.cat(labels).tolist()) - {IGNORE} <= {0, 1}:
        flat, scored = torch.cat(attack.positive_scores), torch.cat(labels)
        keep = scored != IGNORE
        result.metrics["auc"] = binary_auc(flat[keep], scored[keep])
    result.n_examples = int(result.metrics.pop("labels"))
    result.chance = majority_label_share(labels)
    return result
