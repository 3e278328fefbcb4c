"""Label inference from the gradients the model party receives, when labels stay with the data party.

In HT with ``labels_at: data`` the model party sends logits and receives their gradient; in HBT
it sends its body's output and receives that gradient (both in ``backward.grad``). Three attacks:

* :class:`NormScoring` ("NS", Li et al., "Label Leakage and Protection in Two-party Split
  Learning", ICLR 2022): a binary label from each example's gradient norm. A trained model is
  less sure of the minority class, so its examples' gradients are larger; Li et al. (and VFLAIR)
  orient the score by that assumption (the positive, minority class has the larger norms), which
  stays right late in training, when a few known labels' means are swayed by one misfit example.
* :class:`DirectionScoring` ("DS", same paper): examples of one class have gradients pointing the
  same way; each example takes the class whose known reference gradients (a few examples whose
  labels the attacker knows) it is most cosine-similar to, refined by spherical k-means.
* :class:`BatchLabelInference` ("BLI", after Liu & Lyu, "Clustering Label Inference Attack
  against Practical Split Learning", and the analytic gradient-matching attacks): with softmax
  cross-entropy the gradient of the logits is ``(softmax(z) - onehot(y)) / n``, negative only at
  the true label, so its argmin is the label, exactly, for every example (sequence
  classification) or every position (causal LM: position ``t``'s gradient names token ``t+1``).
  This needs the gradient of logits, so HT with labels at the data party; in HBT the gradient of
  the body's output passes through the data party's private tail and task head, and this module
  refuses it (use NS or DS there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from splitfed.models.families import last_token_index
from splitfed.privacy.attacks.base import Attack, AttackContext, AttackError, Need, Observation
from splitfed.privacy.attacks.metrics import IGNORE

_GRAD = Need("backward", "grad")
_MASK = Need("forward", "attention_mask")
_LOGITS = Need("forward_result", "logits", required=False)
_HIDDEN = Need("forward", "hidden", required=False)


def example_gradients(observation: Observation) -> torch.Tensor:
    """One gradient vector per example of a batch, in the units of a per-example loss.

    The gradient of logits ``[batch, classes]`` as it is; the gradient of activations
    ``[batch, seq, width]`` at each example's last real position (where a decoder's
    classification head pools). Multiplied by the batch size, since the data party's loss is a
    batch mean.
    """
    grad = observation["backward", "grad"].float()
    if grad.dim() == 2:
        return grad * grad.shape[0]
    if observation.get("forward_result", "logits") is not None:
        raise AttackError(
            "this recording's gradients are of per-position logits (a causal LM): one label per sequence "
            "cannot be read from them; use the bli attack, which reads every position's token"
        )
    mask = observation["forward", "attention_mask"]
    last = last_token_index(mask)
    return grad[torch.arange(grad.shape[0]), last] * grad.shape[0]


def _known_classes(known: Mapping[int, torch.Tensor] | None, attack: str) -> dict[int, list[tuple[int, int]]]:
    classes: dict[int, list[tuple[int, int]]] = {}
    for index, labels in (known or {}).items():
        for row, label in enumerate(labels.tolist()):
            if label != IGNORE:
                classes.setdefault(int(label), []).append((index, row))
    if not classes:
        raise AttackError(
            f"attack {attack!r} needs a few examples whose labels the attacker knows "
            "(known_per_class >= 1, and labels in the ground truth)"
        )
    return classes


Orient = Literal["minority", "known"]


class NormScoring(Attack):
    """Binary labels from per-example gradient norms: larger norm, the minority (positive) class.

    Each example's score is its log gradient norm less its batch's median (norms shrink as training
    goes on; a batch is one moment of it).

    Parameters
    ----------
    known_per_class : int, default 5
        Examples per class whose labels the attacker knows (not scored): the threshold lies midway
        between the classes' median scores.
    orient : {"minority", "known"}, default "minority"
        Which class has the larger gradients. ``"minority"``: class ``positive`` does, as Li et al.
        assume (the rare class is the one a trained model is least sure of); ``"known"``: the class
        whose known examples have the larger median score (a handful of examples can point the
        wrong way late in training: one misfit example outweighs them, measured AUC 0.29 at 30 steps).
    positive : int, default 1
        The minority class (``orient="minority"``).
    """

    name = "ns"
    target = "labels"
    needs = (_GRAD, _MASK, _LOGITS)

    class Params(BaseModel):
        """Parameters of :class:`NormScoring`."""

        model_config = ConfigDict(extra="forbid")
        known_per_class: int = Field(5, ge=1, le=10_000, description="known labels per class (not scored)")
        orient: Orient = Field(
            "minority", description="which class has larger norms: minority (class positive) or known"
        )
        positive: int = Field(1, ge=0, le=1, description="the minority class (orient: minority)")

    def __init__(self, known_per_class: int = 5, orient: Orient = "minority", positive: int = 1) -> None:
        self.known_per_class, self.orient, self.positive = known_per_class, orient, positive

    def run(
        self,
        observations: Sequence[Observation],
        context: AttackContext,
        known: Mapping[int, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Threshold every example's centred log gradient norm."""
        norms = []
        for obs in observations:
            log_norm = example_gradients(obs).norm(dim=-1).clamp(min=1e-30).log()
            norms.append(log_norm - log_norm.median())
        classes = _known_classes(known, self.name)
        if len(classes) != 2:
            raise AttackError(
                f"norm scoring infers binary labels; the known examples have classes {sorted(classes)}"
            )
        # Medians, not means: one misfit example's norm is orders of magnitude above the rest.
        medians = {
            c: float(torch.tensor([float(norms[i][r]) for i, r in where]).median())
            for c, where in classes.items()
        }
        high = max(medians, key=medians.__getitem__) if self.orient == "known" else self.positive
        low = 1 - high
        threshold = (medians[low] + medians[high]) / 2
        oriented = 1.0 if high == 1 else -1.0
        self.positive_scores = [oriented * n for n in norms]
        return [torch.where(oriented * n > oriented * threshold, 1, 0).long() for n in norms]


class DirectionScoring(Attack):
    """Labels from gradient directions: nearest class of known reference gradients, then spherical k-means.

    Parameters
    ----------
    known_per_class : int, default 1
        Examples per class whose labels the attacker knows (their gradients seed each class).
    iterations : int, default 10
        Spherical k-means rounds over all examples after seeding.
    """

    name = "ds"
    target = "labels"
    needs = (_GRAD, _MASK, _LOGITS)

    class Params(BaseModel):
        """Parameters of :class:`DirectionScoring`."""

        model_config = ConfigDict(extra="forbid")
        known_per_class: int = Field(1, ge=1, le=10_000, description="known labels per class (not scored)")
        iterations: int = Field(10, ge=0, le=10_000, description="spherical k-means rounds")

    def __init__(self, known_per_class: int = 1, iterations: int = 10) -> None:
        self.known_per_class, self.iterations = known_per_class, iterations

    def run(
        self,
        observations: Sequence[Observation],
        context: AttackContext,
        known: Mapping[int, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Assign every example to the class whose (refined) centroid direction is nearest."""
        vectors = [torch.nn.functional.normalize(example_gradients(o), dim=-1) for o in observations]
        classes = _known_classes(known, self.name)
        labels = sorted(classes)
        flat = torch.cat(vectors)
        offsets = [0]
        for v in vectors:
            offsets.append(offsets[-1] + len(v))
        pinned = {offsets[i] + r: labels.index(c) for c, where in classes.items() for i, r in where}
        centroids = torch.stack([flat[[offsets[i] + r for i, r in classes[c]]].mean(0) for c in labels])
        for _ in range(self.iterations + 1):
            centroids = torch.nn.functional.normalize(centroids, dim=-1)
            assign = (flat @ centroids.T).argmax(-1)
            for position, cluster in pinned.items():
                assign[position] = cluster
            centroids = torch.stack(
                [
                    flat[assign == k].mean(0) if (assign == k).any() else centroids[k]
                    for k in range(len(labels))
                ]
            )
        similarity = flat @ torch.nn.functional.normalize(centroids, dim=-1).T
        predicted = torch.tensor(labels)[similarity.argmax(-1)]
        if labels == [0, 1]:
            self.positive_scores = list(
                (similarity[:, 1] - similarity[:, 0]).split([len(v) for v in vectors])
            )
        return list(predicted.split([len(v) for v in vectors]))


class BatchLabelInference(Attack):
    """Every label exactly from the gradient of softmax cross-entropy logits: its negative entry.

    Needs the gradient of the logits the model party sent (HT with ``labels_at: data``). Sequence
    classification gives one label per example; a causal LM one next token per position (the
    gradient at position ``t`` names the label at ``t + 1``; rows with a zero gradient have no
    target and get no guess).
    """

    name = "bli"
    target = "labels"
    needs = (_GRAD, _MASK, _LOGITS, _HIDDEN)

    def run(
        self,
        observations: Sequence[Observation],
        context: AttackContext,
        known: Mapping[int, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """The argmin of every gradient row."""
        out = []
        for obs in observations:
            grad, logits = obs["backward", "grad"], obs.get("forward_result", "logits")
            hidden = obs.get("forward", "hidden")
            # A recording of what the model party received (serve --record) holds no reply: the
            # gradient is of logits when it is not as wide as the activations the model party got.
            of_logits = logits is not None or (hidden is not None and grad.shape[-1] != hidden.shape[-1])
            if not of_logits:
                raise AttackError(
                    f"batch {obs.batch_id}: the model party sent no logits, so the gradient it received is "
                    "not of logits (HBT: it passed through the data party's private tail); bli needs HT "
                    "with labels at the data party; use ns or ds here"
                )
            if logits is not None and tuple(grad.shape) != tuple(logits.shape):
                raise AttackError(
                    f"batch {obs.batch_id}: the gradient {tuple(grad.shape)} is not of the logits "
                    f"{tuple(logits.shape)} the model party sent"
                )
            guess = grad.argmin(-1)
            if grad.dim() == 2:
                out.append(guess.long())
                continue
            shifted = torch.full_like(guess, IGNORE)
            target = grad[:, :-1].abs().amax(-1) > 0
            shifted[:, 1:] = torch.where(target, guess[:, :-1], IGNORE)
            out.append(shifted.long())
        return out
