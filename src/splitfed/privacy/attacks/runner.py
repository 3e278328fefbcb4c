"""Run an attack on a recording and score it against the data party's ground truth.

:func:`run_attack` reads the recording lazily, pairs every recorded forward that the model party
received (training or evaluation) with its batch's ground truth by ``(client, batch_id)``, hands
the attack only what crossed (:class:`~splitfed.privacy.attacks.base.Observation`), and scores
what it returns: tokens against the batch's ``input_ids`` (against ``original_input_ids`` when a
text defense rewrote the input: what the attacker should recover is the user's text), labels
against its ``labels``. Every inversion attack is reported beside the linear baseline on the same
sequences. :func:`run_generation_attack` does the same for split inference: the prompts and the
generated tokens of every recorded generation session.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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
from splitfed.privacy.attacks.control import Scale, noise_observations
from splitfed.privacy.attacks.linear_baseline import LinearBaseline
from splitfed.privacy.attacks.metrics import (
    IGNORE,
    binary_auc,
    decode_examples,
    label_scores,
    majority_label_share,
    text_scores,
    token_f1_chance,
    token_scores,
)
from splitfed.privacy.recording import GroundTruthReader, Record, RecordingReader, ground_truth_dir

#: The recorded forwards an attack is run on, by default.
PHASES = ("train", "eval")
#: Which end of a run an attack reads its batches from (see :func:`run_attack`).
WINDOWS = ("first", "last")
Window = Literal["first", "last"]


@dataclass
class Truth:
    """The ground truth of one observation (rows cut as its tensors were).

    ``input_ids`` is what the head ran on; ``original_input_ids`` (with its mask) the text before a
    text defense rewrote it, when one did: what a token attack is scored against.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    original_input_ids: torch.Tensor | None = None
    original_attention_mask: torch.Tensor | None = None

    def rows(self, rows: int) -> Truth:
        """The first ``rows`` rows."""
        return Truth(
            *(
                None if t is None else t[:rows]
                for t in (
                    self.input_ids,
                    self.attention_mask,
                    self.labels,
                    self.original_input_ids,
                    self.original_attention_mask,
                )
            )  # type: ignore[arg-type]
        )


def load_observations(
    recording: str | Path,
    needs: Sequence[Need],
    *,
    phases: str | Iterable[str] = PHASES,
    clients: str | Iterable[str] | None = None,
    max_examples: int | None = None,
    progress: bool = False,
    ground_truth: str | Path | None = None,
    window: Window = "first",
) -> tuple[list[Observation], list[Truth], dict[str, int | None]]:
    """What the attacker saw of each batch, its ground truth, and the recording's split facts.

    A batch is one recorded ``forward`` the model party received; a batch lacking a required
    tensor of ``needs`` (e.g. an evaluation batch has no ``backward``) is skipped. Reading stops
    once ``max_examples`` sequences are in (the last batch read is cut to fit). ``window``
    ``"first"`` reads the run's batches from its start, ``"last"`` from its end (what crossed once
    a trained defense had trained; the batches are still returned in the order they crossed).

    Returns
    -------
    observations, truths : lists, one entry per batch
    facts : dict
        ``head_layers`` (from the forwards' metadata, ``None`` when absent).

    ``ground_truth`` is where the data party's ground truth is when it is not inside the
    recording (a ``serve --record`` recording is scored by the ``join --record`` ground truth).
    """
    reader = RecordingReader(recording)
    truth_reader = GroundTruthReader(ground_truth or ground_truth_dir(recording))
    kinds = {need.kind for need in needs} - {"forward"}
    by_batch: dict[tuple[str, str, int | None], Record] = {}
    for reply in reader.records(kinds=sorted(kinds)) if kinds else ():
        by_batch[(reply.kind, reply.client, reply.batch_id)] = reply
    forwards = list(reader.records(kinds="forward", directions="to_model", phases=phases, clients=clients))
    observations: list[Observation] = []
    truths: list[Truth] = []
    facts: dict[str, int | None] = {"head_layers": None}
    sequences = 0
    if window not in WINDOWS:
        raise AttackError(f"window {window!r}: use one of {', '.join(WINDOWS)}")
    bar: Iterable[Record] = forwards if window == "first" else forwards[::-1]
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc="reading", total=len(forwards), leave=False)
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
        if "original_input_ids" in batch.tensor_info:
            truth.original_input_ids = batch.tensor("original_input_ids")
            truth.original_attention_mask = (
                batch.tensor("original_attention_mask")
                if "original_attention_mask" in batch.tensor_info
                else torch.ones_like(truth.original_input_ids)
            )
        rows = truth.input_ids.shape[0]
        if max_examples is not None and sequences + rows > max_examples:
            rows = max_examples - sequences
            tensors = {key: t[:rows] for key, t in tensors.items()}
            truth = truth.rows(rows)
        sequences += rows
        observations.append(
            Observation(forward.client, forward.batch_id, forward.phase, forward.step, tensors)
        )
        truths.append(truth)
    if window == "last":
        observations.reverse()
        truths.reverse()
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
    """Scores against what the attacker should recover, the ids and masks of that text.

    When a text defense rewrote the input, against the original text (:func:`text_scores`; then
    ``sent_token_f1`` and ``sent_token_accuracy`` are the scores against what the head ran on).
    """
    sent_ids = [t.input_ids for t in truths]
    sent_masks = [t.attention_mask for t in truths]
    scores = token_scores(predicted, sent_ids, sent_masks)
    if all(t.original_input_ids is None for t in truths):
        return scores, sent_ids, sent_masks
    ids = [t.input_ids if t.original_input_ids is None else t.original_input_ids for t in truths]
    masks = [
        t.attention_mask if t.original_attention_mask is None else t.original_attention_mask for t in truths
    ]
    against = text_scores(predicted, sent_masks, ids, masks)
    against["sent_token_f1"] = scores["token_f1"]
    against["sent_token_accuracy"] = scores["token_accuracy"]
    return against, ids, masks


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
    noise_control: bool = False,
    control_scale: Scale = "tensor",
    window: Window = "first",
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
    noise_control : bool, default False
        Also run the attack on the same batches with every intercepted tensor replaced by noise of
        its shape and scale (:mod:`splitfed.privacy.attacks.control`); its scores go to
        ``result.control``. It should be near ``result.chance``.
    control_scale : {"tensor", "position"}, default "tensor"
        The noise keeps each tensor's mean and standard deviation, or each position's.
    window : {"first", "last"}, default "first"
        Attack the run's first ``context.max_examples`` sequences or its last: a defense that
        trains with the task (MID, NoPeek, adversarial training, TextObfuscator) protects little
        at step 0, so ``"last"`` measures it once trained, ``"first"`` the run's worst moment.

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
        ground_truth=context.ground_truth,
        window=window,
    )
    if context.head_layers is None:
        context.head_layers = facts["head_layers"]
    if attack.sequence_labels and any(t.labels is not None and t.labels.dim() == 2 for t in truths):
        raise AttackError(
            f"attack {attack.name!r} infers one label per sequence, and this run's labels are per "
            "position (a causal LM's next tokens); use the bli attack, which reads every position's token"
        )
    known = known_labels(truths, attack.known_per_class, context.seed)
    start = time.perf_counter()
    predicted = _run_checked(attack, observations, context, known)
    seconds = time.perf_counter() - start
    result = AttackResult(attack.name, {}, seconds=seconds, params=attack.params())
    if attack.target == "tokens":
        result.metrics, ids, masks = _score_tokens(predicted, truths)
        result.chance = token_f1_chance(ids, masks, context.seed)
        result.n_examples = int(result.metrics.pop("sequences"))
        sent_masks = [t.attention_mask for t in truths]
        result.examples = [
            Reconstruction(o, r)
            for o, r in decode_examples(context.tokenizer, predicted, ids, sent_masks, examples, masks)
        ]
        if baseline and attack.reports_baseline and context.auxiliary_texts and context.model is not None:
            guessed = LinearBaseline().run(observations, context)
            result.baseline, _, _ = _score_tokens(guessed, truths)
            result.baseline.pop("sequences")
        if noise_control:
            noised = noise_observations(observations, scale=control_scale, seed=context.seed)
            result.control, _, _ = _score_tokens(_run_checked(attack, noised, context, known), truths)
            result.control.pop("sequences")
        return result
    labels = _scored_labels(observations, truths, known)
    if not any(bool((t != IGNORE).any()) for t in labels):
        told = sum(int((k != IGNORE).sum()) for k in known.values())
        raise AttackError(
            f"attack {attack.name!r} was told {told} labels (known_per_class {attack.known_per_class}), "
            "every example it read, so none is left to score: attack more examples (max_examples, "
            "--max-examples, or an earlier window) or give it fewer known labels (known_per_class)"
        )
    result.metrics = _score_labels(attack, predicted, labels)
    result.n_examples = int(result.metrics.pop("labels"))
    result.chance = majority_label_share(labels)
    if noise_control:
        noised = noise_observations(observations, scale=control_scale, seed=context.seed)
        result.control = _score_labels(attack, _run_checked(attack, noised, context, known), labels)
        result.control.pop("labels")
    return result


def _run_checked(
    attack: Attack,
    observations: Sequence[Observation],
    context: AttackContext,
    known: dict[int, torch.Tensor],
) -> list[torch.Tensor]:
    """``attack.run``, with one prediction per observation checked."""
    predicted = attack.run(observations, context, known or None)
    if len(predicted) != len(observations):
        raise AttackError(
            f"attack {attack.name!r} returned {len(predicted)} predictions for {len(observations)} batches"
        )
    return predicted


def _scored_labels(
    observations: Sequence[Observation], truths: Sequence[Truth], known: dict[int, torch.Tensor]
) -> list[torch.Tensor]:
    """Each observation's labels as they are scored (``-100`` where nothing is scored)."""
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
    return labels


def _score_labels(
    attack: Attack, predicted: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]
) -> dict[str, float]:
    """Label accuracy, and the AUC of a binary attack's scores of its last run."""
    metrics = label_scores(predicted, labels)
    if attack.positive_scores is not None and set(torch.cat(list(labels)).tolist()) - {IGNORE} <= {0, 1}:
        flat, scored = torch.cat(attack.positive_scores), torch.cat(list(labels))
        keep = scored != IGNORE
        metrics["auc"] = binary_auc(flat[keep], scored[keep])
    return metrics


# ---------------------------------------------------------------------- split inference (generation)


def load_generations(
    recording: str | Path,
    *,
    clients: str | Iterable[str] | None = None,
    max_examples: int | None = None,
    ground_truth: str | Path | None = None,
) -> tuple[list[Observation], list[Truth], list[torch.Tensor], dict[str, int | None]]:
    """Every recorded generation session as one sequence of activations, with its ground truth.

    A session's ``gen_start`` (the left-padded prompt's activations) and its ``gen_step``
    messages (one position per sequence each, the token generated at the step before) are joined
    into one :class:`Observation` whose ``forward.hidden`` is ``[batch, prompt + steps, width]``
    and whose ``forward.attention_mask`` is the prompt's mask followed by ones, so that every token
    attack runs on it unchanged. Its truth's ``input_ids`` are the prompt ids followed by the
    generated tokens that were fed back.

    Returns
    -------
    observations, truths : lists, one entry per session
    prompt_masks : list of Tensor ``[batch, prompt + steps]``
        1 at the prompt's real positions (the rest of the scored positions are generated tokens).
    facts : dict
        ``head_layers`` (from the ``gen_start`` metadata, ``None`` when absent).
    """
    reader = RecordingReader(recording)
    truth_reader = GroundTruthReader(ground_truth or ground_truth_dir(recording))
    starts: dict[str, Record] = {}
    steps: dict[str, list[Record]] = {}
    for record in reader.records(kinds=["gen_start", "gen_step"], directions="to_model", clients=clients):
        if record.session is None or not record.stored:
            continue
        if record.kind == "gen_start":
            starts[record.session], steps[record.session] = record, []
        elif record.session in starts:
            steps[record.session].append(record)
    observations: list[Observation] = []
    truths: list[Truth] = []
    prompt_masks: list[torch.Tensor] = []
    facts: dict[str, int | None] = {"head_layers": None}
    sequences = 0
    for session, start in starts.items():
        if max_examples is not None and sequences >= max_examples:
            break
        try:
            truth = truth_reader.generation(session)
        except KeyError:
            continue
        layers = start.meta.get("head_layers")
        if isinstance(layers, int) and not isinstance(layers, bool):
            facts["head_layers"] = layers
        hidden = torch.cat([start.tensor("hidden"), *(r.tensor("hidden") for r in steps[session])], dim=1)
        prompt_mask = start.tensor("attention_mask").long()
        rows, fed = prompt_mask.shape[0], len(steps[session])
        mask = torch.cat([prompt_mask, prompt_mask.new_ones(rows, fed)], dim=1)
        generated = torch.zeros(rows, fed, dtype=torch.long)
        generated_mask = torch.zeros(rows, fed, dtype=torch.long)
        for row, row_ids in enumerate(truth.generated_ids):
            fed_ids = row_ids[:fed]  # the last generated token is never fed back
            generated[row, : len(fed_ids)] = torch.tensor(fed_ids, dtype=torch.long)
            generated_mask[row, : len(fed_ids)] = 1
        ids = torch.cat([truth.tensor("prompt_ids").long(), generated], dim=1)
        scored = torch.cat([prompt_mask, generated_mask], dim=1)
        if max_examples is not None and sequences + rows > max_examples:
            rows = max_examples - sequences
            hidden, mask, ids, scored = hidden[:rows], mask[:rows], ids[:rows], scored[:rows]
        sequences += rows
        tensors = {("forward", "hidden"): hidden, ("forward", "attention_mask"): mask}
        observations.append(Observation(start.client, len(observations), "generate", start.step, tensors))
        truths.append(Truth(ids, scored, None))
        prompt_masks.append(torch.cat([prompt_mask[:rows], torch.zeros_like(generated_mask[:rows])], dim=1))
    if not observations:
        raise AttackError(
            f"{recording}: no recorded generation session ({len(starts)} gen_start recorded) has ground "
            "truth; record a SplitGenerator with a RecordingWriter and a GroundTruthWriter"
        )
    return observations, truths, prompt_masks, facts


def run_generation_attack(
    attack: Attack,
    recording: str | Path,
    context: AttackContext,
    *,
    clients: str | Iterable[str] | None = None,
    baseline: bool = True,
    examples: int = 3,
    noise_control: bool = False,
    control_scale: Scale = "tensor",
) -> AttackResult:
    """Recover the prompts and generated text of split inference from the recorded activations.

    Runs a token attack on every session :func:`load_generations` joins and scores it against the
    session's ground truth: ``token_*`` over every real position, ``prompt_token_f1`` /
    ``prompt_token_accuracy`` over the prompts and ``generated_token_f1`` /
    ``generated_token_accuracy`` over the generated tokens fed back (``gen_step``).

    Parameters
    ----------
    attack : Attack
        A token attack that reads ``forward.hidden`` and ``forward.attention_mask`` (vmi, ri, bisr, linear).
    recording : str | Path
    context : AttackContext
    clients : str | Iterable[str] | None, default None
    baseline : bool, default True
        Score the linear baseline beside it (when auxiliary text is given).
    examples : int, default 3
    noise_control : bool, default False
        Also score it on the sessions' activations replaced by noise (``result.control``), as
        :func:`run_attack` does.
    control_scale : {"tensor", "position"}, default "tensor"

    Returns
    -------
    AttackResult
    """
    if attack.target != "tokens" or {(n.kind, n.tensor) for n in attack.needs if n.required} - {
        ("forward", "hidden"),
        ("forward", "attention_mask"),
    }:
        raise AttackError(
            f"attack {attack.name!r} does not invert activations; a generation attack needs a token "
            "attack that reads forward.hidden (vmi, ri, bisr, linear)"
        )
    if attack.needs_public_model:
        context.require_model(attack.name)
    if attack.needs_auxiliary and not context.auxiliary_texts:
        raise AttackError(
            f"attack {attack.name!r} learns from auxiliary text: pass AttackContext(auxiliary_texts=...)"
        )
    observations, truths, prompt_masks, facts = load_generations(
        recording, clients=clients, max_examples=context.max_examples, ground_truth=context.ground_truth
    )
    if context.head_layers is None:
        context.head_layers = facts["head_layers"]
    start = time.perf_counter()
    predicted = attack.run(observations, context)
    seconds = time.perf_counter() - start

    def score(guess: Sequence[torch.Tensor]) -> dict[str, float]:
        ids = [t.input_ids for t in truths]
        masks = [t.attention_mask for t in truths]
        out = token_scores(guess, ids, masks)
        prompt = token_scores(guess, ids, [m * p for m, p in zip(masks, prompt_masks, strict=True)])
        generated = token_scores(guess, ids, [m * (1 - p) for m, p in zip(masks, prompt_masks, strict=True)])
        out |= {
            "prompt_token_f1": prompt["token_f1"],
            "prompt_token_accuracy": prompt["token_accuracy"],
            "generated_token_f1": generated["token_f1"],
            "generated_token_accuracy": generated["token_accuracy"],
            "prompt_rouge_l": prompt["rouge_l"],
            "generated_rouge_l": generated["rouge_l"],
        }
        return out

    result = AttackResult(attack.name, score(predicted), seconds=seconds, params=attack.params())
    ids, masks = [t.input_ids for t in truths], [t.attention_mask for t in truths]
    result.chance = token_f1_chance(ids, masks, context.seed)
    result.n_examples = int(result.metrics.pop("sequences"))
    result.examples = [
        Reconstruction(o, r) for o, r in decode_examples(context.tokenizer, predicted, ids, masks, examples)
    ]
    if baseline and attack.reports_baseline and context.auxiliary_texts and context.model is not None:
        result.baseline = score(LinearBaseline().run(observations, context))
        result.baseline.pop("sequences")
    if noise_control:
        noised = noise_observations(observations, scale=control_scale, seed=context.seed)
        result.control = score(_run_checked(attack, noised, context, {}))
        result.control.pop("sequences")
    return result
