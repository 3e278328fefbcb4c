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
  In HT with labels at the data party the model party receives that gradient itself. In HBT it
  receives the gradient of its body's output, which passed through the data party's tail; for a
  causal LM the tail is public up to its fine-tuning (the pretrained last blocks, final norm and
  LM head), so the attacker matches gradients through it: at every position the tokens whose
  gradient through the public norm and LM head points the way the received one does are the
  candidates, and the assignment whose gradient through the public tail blocks best matches the
  received one is the guess (:func:`tail_gradient_labels`). A
  classifier's task head is the data party's own (initialised at random and trained there), so
  in HBT classification there is no public tail to match and this attack refuses (use NS, DS or
  model completion there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, cast

import torch
from pydantic import BaseModel, ConfigDict, Field

from splitfed.models.families import last_token_index
from splitfed.privacy.attacks.base import Attack, AttackContext, AttackError, Need, Observation
from splitfed.privacy.attacks.metrics import IGNORE

_GRAD = Need("backward", "grad")
_MASK = Need("forward", "attention_mask")
_LOGITS = Need("forward_result", "logits", required=False)
_HIDDEN = Need("forward", "hidden", required=False)
_BODY = Need("forward_result", "hidden", required=False)
#: Candidate tokens per position the HBT matching tries, and its most passes over the positions.
REFINE_CANDIDATES = 4
REFINE_PASSES = 2
#: Tokens per position whose exact gradient the HBT matching computes (ranked by a cheap bound).
SHORTLIST = 256
#: Floats of one chunk of positions' logits (positions x vocabulary).
CANDIDATE_FLOATS = 2**24


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
    sequence_labels = True
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
    sequence_labels = True
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
    """Every label from the gradient of softmax cross-entropy: of the logits (HT), or through the public tail (HBT).

    HT with ``labels_at: data``: the gradient of the logits the model party sent; its negative
    entry is the label. Sequence classification gives one label per example; a causal LM one next
    token per position (the gradient at position ``t`` names the label at ``t + 1``; rows with a
    zero gradient have no target and get no guess).

    HBT, causal LM: the gradient of the body output the model party sent, matched through the
    public tail (:func:`tail_gradient_labels`); needs ``AttackContext(model=..., tail_layers=...)``.
    """

    name = "bli"
    target = "labels"
    needs = (_GRAD, _MASK, _LOGITS, _HIDDEN, _BODY)

    def run(
        self,
        observations: Sequence[Observation],
        context: AttackContext,
        known: Mapping[int, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """The argmin of every gradient row of logits, or the tail-matched token of every position."""
        out = []
        for obs in observations:
            grad, logits = obs["backward", "grad"], obs.get("forward_result", "logits")
            hidden = obs.get("forward", "hidden")
            if obs.get("forward_result", "hidden") is not None:
                out.append(tail_gradient_labels(obs, context))
                continue
            # A recording of what the model party received (serve --record) holds no reply: the
            # gradient is of logits when it is not as wide as the activations the model party got.
            of_logits = logits is not None or (hidden is not None and grad.shape[-1] != hidden.shape[-1])
            if not of_logits:
                raise AttackError(
                    f"batch {obs.batch_id}: the gradient the model party received is of its body's output "
                    "(HBT), and the recording lacks that output (forward_result.hidden) to run the public "
                    "tail on; record the model party's replies too, or use ns or ds"
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


def tail_gradient_labels(observation: Observation, context: AttackContext) -> torch.Tensor:
    """The next token at every position of an HBT causal-LM batch, from the gradient of the body output.

    The data party's loss reaches the body output ``h`` through its tail: blocks ``x = B(h)``, then
    per position the final norm, the LM head and cross-entropy, so the gradient at the norm's
    input is ``u_t = N_t^T W^T (softmax(z_t) - onehot(y_{t+1})) / n`` and the received gradient is
    ``(dB/dh)^T u``. With the public tail (the pretrained weights; the data party's tail adapters
    start at zero and stay small):

    1. **Candidates.** At every target position, each token ``v``'s gradient at the norm's input,
       ``N_t^T (W^T softmax(z_t) - W_v)``, is scored by its cosine with the received gradient at
       that position (the residual stream carries ``u_t`` through the tail blocks nearly as it
       is; see :func:`_candidates`); the best :data:`REFINE_CANDIDATES` are kept, the best of
       them guessed.
    2. **Matching.** The guesses' gradient is pushed through the tail blocks (a vector-Jacobian
       product at the body output the model party sent) and compared with the received one, per
       sequence by cosine (the scale ``1 / n`` drops out); position by position, a candidate that
       brings it closer replaces the guess, for :data:`REFINE_PASSES` passes or until none does.
       The true labels match exactly when the public tail is the data party's.

    Returns
    -------
    Tensor ``[batch, seq]``
        The guessed label at every position ``t + 1`` whose ``t`` is a target (``-100`` elsewhere).
    """
    if getattr(context.model, "lm_head", None) is None:
        raise AttackError(
            f"batch {observation.batch_id}: bli in HBT matches the gradient through the public tail up "
            "to its LM head, so it needs AttackContext(model=<the public causal LM>, tail_layers=...); "
            f"got {type(context.model).__name__}. A classifier's task head is the data party's own "
            "(initialised and trained there, never public): in HBT classification use ds, ns or "
            "model_completion"
        )
    norm, head = context.public_finish()
    blocks = context.public_tail()
    weight = cast(torch.Tensor, head.weight).detach()
    grad = observation["backward", "grad"].to(weight.device, torch.float32)
    body = observation["forward_result", "hidden"].to(weight.device, weight.dtype).detach()
    mask = observation["forward", "attention_mask"].to(weight.device).long()
    if grad.shape != body.shape:
        raise AttackError(
            f"batch {observation.batch_id}: the gradient {tuple(grad.shape)} is not of the body output "
            f"{tuple(body.shape)} the model party sent"
        )
    body.requires_grad_(True)
    with torch.enable_grad():
        x = blocks(hidden=body, attention_mask=mask)
    target = (mask[:, :-1] > 0) & (mask[:, 1:] > 0)
    rows, cols = target.nonzero(as_tuple=True)
    tokens = torch.empty(len(rows), REFINE_CANDIDATES, dtype=torch.long, device=weight.device)
    vectors = torch.empty(len(rows), REFINE_CANDIDATES, weight.shape[1], device=weight.device)
    per_chunk = max(1, CANDIDATE_FLOATS // (weight.shape[0] + SHORTLIST * weight.shape[1]))
    for part in range(0, len(rows), per_chunk):
        r, c = rows[part : part + per_chunk], cols[part : part + per_chunk]
        span = slice(part, part + len(r))
        tokens[span], vectors[span] = _candidates(norm, head, x.detach()[r, c], grad[r, c])
    choice = torch.zeros(len(rows), dtype=torch.long, device=weight.device)

    def through_tail(at_targets: torch.Tensor) -> torch.Tensor:
        u = torch.zeros(body.shape, dtype=x.dtype, device=weight.device)
        u[rows, cols] = at_targets.to(x.dtype)
        (out,) = torch.autograd.grad(x, body, u, retain_graph=True)
        return out.float()

    def fit(predicted: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cosine_similarity(predicted.flatten(1), grad.flatten(1), dim=-1)

    index = torch.arange(len(rows), device=weight.device)
    predicted = through_tail(vectors[index, choice])
    best = fit(predicted)
    for _ in range(REFINE_PASSES):
        improved = False
        for position in cols.unique().tolist():
            at = (cols == position).nonzero(as_tuple=True)[0]
            for k in range(1, REFINE_CANDIDATES):
                delta = torch.zeros_like(vectors[:, 0])
                delta[at] = vectors[at, k] - vectors[at, choice[at]]
                trial = predicted + through_tail(delta)
                score = fit(trial)
                better = score > best + 1e-7
                better[rows[at]] &= choice[at] != k
                rows_better = better.nonzero(as_tuple=True)[0]
                if not len(rows_better):
                    continue
                improved = True
                predicted[rows_better], best[rows_better] = trial[rows_better], score[rows_better]
                moved = at[better[rows[at]]]
                choice[moved] = k
        if not improved:
            break
    out = torch.full(mask.shape, IGNORE, dtype=torch.long)
    out[rows.cpu(), (cols + 1).cpu()] = tokens[index, choice].cpu()
    return out


def _candidates(
    norm: torch.nn.Module, head: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position of ``x [p, width]``: the :data:`REFINE_CANDIDATES` tokens whose gradient at the
    norm's input is most cosine-similar to ``grad``, best first, and those gradients ``[p, k, width]``.

    A token ``v``'s gradient is ``N^T a_v`` with ``a_v = W^T softmax(z) - W_v`` and ``N`` the norm's
    Jacobian. Its inner product with ``grad`` is ``a_v . (N grad)`` for every token at once (one
    Jacobian-vector product); divided by ``|a_v|`` it ranks the vocabulary, and the exact cosine
    is computed for the best :data:`SHORTLIST` only (a vocabulary of vectors per position is too
    much memory for a real model: 49152 x 576 floats for SmolLM2).
    """
    weight = cast(torch.Tensor, head.weight).detach().float()
    with torch.no_grad():
        probs = torch.softmax(head(norm(x)).float(), dim=-1)
        expected = probs @ weight  # W^T softmax(z): the label-free part
        pushed = torch.func.jvp(lambda h: norm(h).float(), (x,), (grad.to(x.dtype),))[1]
        inner = (expected * pushed).sum(-1, keepdim=True) - pushed @ weight.T
        lengths = (
            expected.pow(2).sum(-1, keepdim=True) - 2 * expected @ weight.T + weight.pow(2).sum(-1)
        ).clamp(min=1e-30)
        shortlist = (inner / lengths.sqrt()).topk(min(SHORTLIST, weight.shape[0]), dim=-1).indices
    inputs = x[:, None, :].expand(-1, shortlist.shape[1], -1).clone().requires_grad_(True)
    with torch.enable_grad():
        cotangent = (expected[:, None, :] - weight[shortlist]).to(x.dtype)
        (vectors,) = torch.autograd.grad(norm(inputs), inputs, cotangent)
    similarity = torch.nn.functional.cosine_similarity(vectors.float(), grad[:, None, :].float(), dim=-1)
    top = similarity.topk(REFINE_CANDIDATES, dim=-1).indices
    picked = vectors.float().gather(1, top[..., None].expand(-1, -1, vectors.shape[-1]))
    return shortlist.gather(1, top), picked
