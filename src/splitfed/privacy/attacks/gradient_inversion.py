"""Gradient inversion of a federated client's LoRA update: recover its text from one gradient.

Without secure aggregation the server sees each client's update. For one local step the update is
``-lr * grad`` of the LoRA parameters on the client's batch, at global adapters and a base model
the server knows. This attack reconstructs a causal-LM client's tokens from that gradient in three
stages:

1. **Bag of words from the first block's LoRA A gradients.** The input ``x_t`` of the first
   block's projections is a function of the token at ``t`` alone (embedding and norm; rotary
   families add positions only after the projection), and ``dL/dA = B^T (sum_t g_t x_t^T)``, so
   the rows of every first-block ``lora_A`` gradient lie in the span of the present tokens'
   ``x_t``. A vocabulary token's relative residual outside that row space is ~0 when it is in the
   text and large otherwise: the leak embedding-layer gradients are known for (Melis et al. 2019,
   "Exploiting Unintended Feature Leakage in Collaborative Learning"; LAMP's and TAG's bag-of-words
   observations), here through LoRA on q/v only. It needs ``B != 0`` (every round after the first;
   peft's default initialisation has ``B = 0``, and then ``dL/dA = 0``) and at most about
   ``2 r`` distinct tokens for the row space to separate them; the summed update of many clients
   (secure aggregation) spans far more tokens than the ``2 r`` rows, and the signal is lost.
2. **TAG** (Deng et al. 2021, "TAG: Gradient Attack on Transformer-based Language Models", EMNLP
   Findings): dummy soft inputs (a distribution per position over the candidate tokens, embedded
   as the expectation of the embedding rows) are optimised so that the LoRA gradient they produce
   matches the observed one in L2 + ``alpha`` L1 distance (each tensor scaled by the observed
   norm). The dummy's labels are its own inputs shifted, as causal-LM training uses: the soft
   next-position distribution is the soft target.
3. **Discrete refinement**, after LAMP (Balunović et al. 2022, "LAMP: Extracting Text from
   Gradients with Language Model Priors", NeurIPS): the tokens read out by argmax (the nearest
   candidate) are improved greedily by swaps of two positions and single-token substitutions from
   the candidates, each kept when it lowers the gradient distance of the hard sequence (LAMP
   also scores with a language-model prior; a tiny random model has none worth using, so only
   the gradient distance decides here). The last token is no input that reaches the loss, only
   the label of the position before, so the bag of words cannot see it; the gradient is affine in
   its one-hot, which gives the distance's change for every vocabulary token there at once
   (:meth:`_Matcher.last_changes`), and each pass tries the best ``last_candidates`` of them
   instead of one gradient per vocabulary token (49,152 on smollm2-135m).

The sequence length is assumed known (TAG and LAMP assume it too); the text is scored by token F1
(:func:`~splitfed.privacy.attacks.metrics.token_scores`). The update is not a recording of what
crossed a split, so this attack does not fit :class:`~splitfed.privacy.attacks.base.Attack`'s
observation interface; :func:`invert_lora_gradient` and :func:`run_gradient_inversion` are its
entry points.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from splitfed.privacy.attacks.base import AttackError, AttackResult, Reconstruction
from splitfed.privacy.attacks.metrics import token_scores


def gradient_from_update(delta: Mapping[str, torch.Tensor], lr: float) -> dict[str, torch.Tensor]:
    """The gradient ``-delta / lr`` of a one-step SGD update ``delta`` (local minus global adapters)."""
    if lr <= 0:
        raise AttackError(f"the client's learning rate must be positive to undo its step; got {lr}")
    return {n: -d.float() / lr for n, d in delta.items()}


def _embeddings(model: nn.Module) -> torch.Tensor:
    """The input embedding table of a transformers model."""
    table: Any = getattr(model, "get_input_embeddings")()  # noqa: B009 (nn.Module types attributes loosely)
    return table.weight  # type: ignore[no-any-return]


def lora_parameters(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Parameter]:
    """The parameters of ``model`` named ``names`` (the observed gradient's keys), in that order.

    Raises
    ------
    AttackError
        When a name is not a parameter of ``model`` (another model, or adapters not injected).
    """
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise AttackError(
            f"the observed gradient names parameters the model lacks: {missing[:3]}; "
            f"its LoRA parameters include {[n for n in params if 'lora_' in n][:3]}"
        )
    return {n: params[n] for n in names}


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; ``targets`` are token ids ``[b, s]`` or distributions ``[b, s, V]``."""
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    if targets.dim() == 2:
        return -log_probs.gather(-1, targets[:, 1:, None]).mean()
    return -(targets[:, 1:] * log_probs).sum(-1).mean()


def client_gradient(
    model: nn.Module, params: Mapping[str, nn.Parameter], input_ids: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The LoRA gradient a client computes on ``input_ids`` ``[b, s]`` (unpadded) as causal-LM training does."""
    logits = model(input_ids=input_ids).logits
    grads = torch.autograd.grad(causal_lm_loss(logits, input_ids), list(params.values()))
    return {n: g.detach() for n, g in zip(params, grads, strict=True)}


class _Captured(Exception):
    """Raised by the hook of :func:`_first_block_inputs` once it has what it needs."""


def _first_block_inputs(model: nn.Module, names: Sequence[str]) -> tuple[torch.Tensor, list[str]] | None:
    """Every vocabulary token's input ``[V, width]`` to the first block's LoRA modules and their A names."""
    lora = {n.split(".lora_A.")[0] for n in names if ".lora_A." in n}
    if not lora:
        return None
    modules = dict(model.named_modules())

    def layer(name: str) -> int:
        digits = [int(p) for p in name.split(".") if p.isdigit()]
        return digits[0] if digits else 0

    first = min(layer(n) for n in lora)
    chosen = sorted(n for n in lora if layer(n) == first)
    seen: list[torch.Tensor] = []

    def capture(module: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
        seen.append(inp[0].detach())
        raise _Captured  # the rest of the model (its later blocks, a [V, V] logits) is not needed

    hook = modules[chosen[0]].register_forward_pre_hook(capture)
    vocab = _embeddings(model).shape[0]
    try:
        with torch.no_grad():
            model(input_ids=torch.arange(vocab, device=_embeddings(model).device)[:, None])
    except _Captured:
        pass
    finally:
        hook.remove()
    a_names = [n for n in names if n.split(".lora_A.")[0] in chosen and ".lora_A." in n]
    return seen[0][:, 0].float(), a_names


def bag_of_words(
    model: nn.Module, observed: Mapping[str, torch.Tensor], *, tol: float = 1e-4
) -> torch.Tensor | None:
    """Each vocabulary token's relative residual outside the first block's LoRA A gradient rows.

    ``~0`` for tokens of the client's text, near 1 for the others while the text has at most
    about ``2 r`` distinct tokens. ``None`` when the gradient has no first-block ``lora_A`` part
    or it is zero (``B = 0``: the first round of freshly initialised adapters).
    """
    found = _first_block_inputs(model, list(observed))
    if found is None:
        return None
    inputs, a_names = found
    rows = torch.cat([observed[n].float().reshape(observed[n].shape[0], -1) for n in a_names])
    rows = rows[rows.norm(dim=1) > 0]
    if not len(rows):
        return None
    rows = rows / rows.norm(dim=1, keepdim=True)
    _, s, vh = torch.linalg.svd(rows, full_matrices=False)
    basis = vh[s > tol * s[0]]
    unit = nn.functional.normalize(inputs, dim=-1)
    residual = (unit - (unit @ basis.T) @ basis).norm(dim=-1)
    # A zero input (the padding token's zeroed embedding) lies in every span: it says nothing.
    return residual.masked_fill(inputs.norm(dim=-1) == 0, 1.0)


@dataclass
class InversionResult:
    """What :func:`invert_lora_gradient` recovered.

    Attributes
    ----------
    tokens : Tensor ``[batch, seq]``
        The reconstructed token ids.
    candidates : Tensor ``[k]``
        The candidate tokens the search was restricted to (from the bag of words, or every token).
    residuals : Tensor ``[V]`` | None
        Each token's bag-of-words residual (small: present).
    distance : float
        The gradient distance of ``tokens``.
    history : list of float
        The continuous stage's distance at each step.
    last_candidates : Tensor ``[m]`` | None
        The tokens a further refinement pass would try at the last position (``None``: every
        vocabulary token).
    """

    tokens: torch.Tensor
    candidates: torch.Tensor
    residuals: torch.Tensor | None
    distance: float
    history: list[float] = field(default_factory=list)
    last_candidates: torch.Tensor | None = None


@contextmanager
def _eager(model: nn.Module) -> Iterator[None]:
    """Eager attention while inside: fused kernels (SDPA on CPU, flash) have no double backward."""
    config: Any = model.config
    kept = getattr(config, "_attn_implementation", None)
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = kept


class _Matcher:
    """The gradient distance of a batch's inputs to the observed LoRA gradient.

    With ``scale_free``, a candidate's gradient is first rescaled to the observed one's total norm:
    the distance of directions, for a gradient clipped by an unknown factor (``max_grad_norm``).
    """

    def __init__(
        self, model: nn.Module, observed: Mapping[str, torch.Tensor], alpha: float, scale_free: bool = False
    ) -> None:
        self.model, self.alpha, self.scale_free = model, alpha, scale_free
        self.params = lora_parameters(model, list(observed))
        self.targets = [observed[n].float() for n in self.params]
        self.scales = [t.norm().clamp(min=1e-12) for t in self.targets]
        self.total = torch.stack([t.norm() for t in self.targets]).norm().clamp(min=1e-12)
        self.embeddings = _embeddings(model)

    def distance(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        total = torch.zeros((), device=self.embeddings.device)
        if self.scale_free:
            norm = torch.stack([g.float().norm() for g in grads]).norm().clamp(min=1e-12)
            grads = [g * (self.total / norm) for g in grads]
        for g, t, s in zip(grads, self.targets, self.scales, strict=True):
            diff = (g.float() - t) / s
            total = total + diff.pow(2).sum() + self.alpha * diff.abs().sum() / diff.numel() ** 0.5
        return total

    def soft(self, probs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Distance of soft inputs ``probs [b, s, k]`` over ``candidates`` (differentiable in ``probs``)."""
        embeds = probs @ self.embeddings[candidates].detach()
        with _eager(self.model):
            logits = self.model(inputs_embeds=embeds).logits
        vocab = logits.shape[-1]
        targets = torch.zeros(*probs.shape[:2], vocab, device=probs.device).index_add(-1, candidates, probs)
        grads = torch.autograd.grad(
            causal_lm_loss(logits, targets), list(self.params.values()), create_graph=True
        )
        return self.distance(grads)

    def last_changes(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[b, V]``: the change of the L2 distance if the last token of sequence ``i`` of ``tokens``
        were ``c`` instead (negative: closer), for every ``c`` at once.

        The last token is only the label of the position before, so the gradient is affine in its
        one-hot: with ``h`` the final hidden vector there (the LM head's input), ``M`` the Jacobian
        of ``h`` in the LoRA parameters, ``w_c`` the head's row of ``c`` and ``n`` the positions in
        the loss, putting ``c`` for ``c0`` adds ``M^T (w_c0 - w_c) / n`` to the gradient, and the
        distance changes by ``2/n δ·u + 1/n² δ^T Q δ`` (``δ = w_c0 - w_c``, ``u = M (g - t)`` and
        ``Q = M M^T`` in the distance's per-tensor scaling): exact for the L2 term, at the cost of
        one backward pass per hidden dimension and sequence.
        """
        batch, seq = tokens.shape
        n = batch * (seq - 1)
        grads = client_gradient(self.model, self.params, tokens)
        residual = [g.float() - t for g, t in zip(grads.values(), self.targets, strict=True)]
        head: nn.Module = getattr(self.model, "get_output_embeddings")()  # noqa: B009 (nn.Module's loose typing)
        seen: list[torch.Tensor] = []
        hook = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        try:
            self.model(input_ids=tokens)
        finally:
            hook.remove()
        hidden = seen[0][:, -2, :]
        weight = cast(torch.Tensor, head.weight).detach().float()
        params = list(self.params.values())
        out = torch.empty(batch, weight.shape[0], device=weight.device)
        for b in range(batch):
            rows = []
            for j in range(hidden.shape[-1]):
                g = torch.autograd.grad(hidden[b, j], params, retain_graph=True)
                rows.append(
                    torch.cat([(x.float() / s).flatten() for x, s in zip(g, self.scales, strict=True)])
                )
            m = torch.stack(rows)  # [d, P], scaled
            r = torch.cat([(x / s).flatten() for x, s in zip(residual, self.scales, strict=True)])
            u, q = m @ r, m @ m.T
            delta = weight[int(tokens[b, -1])][None, :] - weight  # [V, d]
            out[b] = 2.0 / n * (delta @ u) + ((delta @ q) * delta).sum(-1) / n**2
        return out

    def hard(self, tokens: torch.Tensor) -> float:
        """Distance of token ids ``[b, s]``."""
        grads = client_gradient(self.model, self.params, tokens)
        return float(self.distance(list(grads.values())))


def invert_lora_gradient(
    model: nn.Module,
    observed: Mapping[str, torch.Tensor],
    *,
    seq_len: int,
    batch_size: int = 1,
    steps: int = 150,
    lr: float = 0.1,
    alpha: float = 0.01,
    candidates: int | None = None,
    bag_threshold: float = 0.3,
    refine_passes: int = 2,
    last_candidates: int = 64,
    seed: int = 0,
    scale_free: bool = False,
    progress: bool = False,
) -> InversionResult:
    """Reconstruct the tokens whose causal-LM LoRA gradient is ``observed``.

    Parameters
    ----------
    model : nn.Module
        The public base causal LM (transformers) with LoRA injected and holding the global
        adapters the client started from; it is only read (its parameters are not changed).
    observed : Mapping[str, Tensor]
        The client's LoRA gradient by parameter name (:func:`gradient_from_update` for an update).
    seq_len : int
        The client's sequence length (assumed known).
    batch_size : int, default 1
        Sequences in the client's batch.
    steps : int, default 150
        Adam steps of the continuous (TAG) stage.
    lr : float, default 0.1
        Its learning rate on the soft inputs' logits.
    alpha : float, default 0.01
        Weight of TAG's L1 term.
    candidates : int | None, default None
        Tokens the search may use: every token under ``bag_threshold`` in the bag of words, at
        least ``seq_len`` and at most this many (default ``2 * seq_len * batch_size``); every token
        when the gradient gives no bag of words.
    bag_threshold : float, default 0.3
        A token whose bag-of-words residual is below this is taken as present.
    refine_passes : int, default 2
        Passes of greedy swaps and substitutions (0: none).
    last_candidates : int, default 64
        Tokens the refinement tries at the last position, which the bag of words cannot see: the
        ones that lower the gradient distance most there (:meth:`_Matcher.last_changes`, exact
        for its L2 term, for the whole vocabulary at once), besides
        the candidates; 0 tries every vocabulary token (one gradient each: tens of thousands on a
        real vocabulary).
    seed : int, default 0
    scale_free : bool, default False
        Match directions only (each candidate gradient rescaled to the observed total norm): for
        an update whose gradient was clipped (``max_grad_norm``) by a factor the attacker does not know.
    progress : bool, default False
        Show progress bars on the continuous stage and the refinement passes.
    """
    if seq_len < 2:
        raise AttackError(f"a causal-LM gradient needs at least 2 tokens; got seq_len={seq_len}")
    matcher = _Matcher(model, observed, alpha, scale_free)
    device = matcher.embeddings.device
    vocab = matcher.embeddings.shape[0]
    residuals = bag_of_words(model, observed)
    if residuals is None:
        cand = torch.arange(vocab, device=device)
    else:
        limit = candidates or 2 * seq_len * batch_size
        order = residuals.argsort()
        present = int((residuals < bag_threshold).sum())
        cand = order[: max(min(present, limit), min(seq_len, vocab))]
    generator = torch.Generator().manual_seed(seed)
    logits = (0.01 * torch.randn(batch_size, seq_len, len(cand), generator=generator)).to(device)
    logits.requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=lr)
    history = []
    for _ in _bar(range(steps), progress, "gradient inversion (TAG)"):
        loss = matcher.soft(torch.softmax(logits, dim=-1), cand)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    probs = torch.softmax(logits.detach(), dim=-1)
    starts = [cand[probs.argmax(-1)]]
    last_k = last_candidates if 0 < last_candidates < vocab else None
    if residuals is not None:
        starts.append(_assign_bag(probs, cand, int((residuals[cand] < bag_threshold).sum())))
    # The bag start keeps its tokens: only orderings and the (bag-invisible) last token change.
    tokens, best = min(
        (
            _refine(matcher, start, cand if k == 0 else cand[:0], last_k, refine_passes, progress)
            for k, start in enumerate(starts)
        ),
        key=lambda r: r[1],
    )
    return InversionResult(
        tokens.cpu(),
        cand.cpu(),
        None if residuals is None else residuals.cpu(),
        best,
        history,
        None if last_k is None else _last_candidates(matcher, tokens, cand, last_k).cpu(),
    )


def _assign_bag(probs: torch.Tensor, cand: torch.Tensor, present: int) -> torch.Tensor:
    """Every bag-of-words token once, each at the free position the soft inputs give it most mass.

    The TAG readout may repeat a token and drop another; the bag says which tokens occur, so this
    start uses each of them (the ``present`` first candidates), most confident pairs first, and
    fills the remaining positions by the readout.
    """
    tokens = cand[probs.argmax(-1)].clone()
    for b in range(probs.shape[0]):
        mass = probs[b, :, :present].clone()
        for _ in range(min(present, probs.shape[1])):
            flat = int(mass.argmax())
            pos, k = divmod(flat, mass.shape[1])
            tokens[b, pos] = cand[k]
            mass[pos, :] = -1.0
            mass[:, k] = -1.0
    return tokens


def _trials(tokens: torch.Tensor, cand: torch.Tensor, last: torch.Tensor) -> list[torch.Tensor]:
    """LAMP-style discrete moves: swap two positions, move one token, substitute one token.

    The last position of a sequence is the label of the one before and no block's input that
    reaches the loss, so the bag of words cannot see it: the tokens of ``last`` are tried there
    (the whole vocabulary, or the continuous stage's likeliest last tokens).
    """
    batch, seq = tokens.shape
    out = []
    for b in range(batch):
        row = tokens[b]
        for i, j in itertools.combinations(range(seq), 2):
            if row[i] != row[j]:
                trial = tokens.clone()
                trial[b, i], trial[b, j] = row[j], row[i]
                out.append(trial)
        for i, j in itertools.permutations(range(seq), 2):
            if abs(i - j) > 1:  # adjacent moves are swaps
                moved = row.tolist()
                moved.insert(j, moved.pop(i))
                trial = tokens.clone()
                trial[b] = torch.tensor(moved, device=tokens.device)
                out.append(trial)
        for i in range(seq):
            for c in last if i == seq - 1 else cand:
                if row[i] != c:
                    trial = tokens.clone()
                    trial[b, i] = c
                    out.append(trial)
    return out


def _bar(iterable: Any, enabled: bool, desc: str, total: int | None = None) -> Any:
    """``iterable`` with a tqdm progress bar when ``enabled``."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


def _last_candidates(matcher: _Matcher, tokens: torch.Tensor, cand: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` tokens that, as the last of each sequence, bring ``tokens``'s gradient closest,
    with the candidates."""
    top = (-matcher.last_changes(tokens)).topk(k, dim=-1).indices.flatten()
    return torch.unique(torch.cat([top, cand]))


def _refine(
    matcher: _Matcher,
    tokens: torch.Tensor,
    cand: torch.Tensor,
    last_k: int | None,
    passes: int,
    progress: bool = False,
) -> tuple[torch.Tensor, float]:
    """Greedy first-improvement search over :func:`_trials` until a pass improves nothing.

    The last position tries every vocabulary token (``last_k`` None) or, each pass, the ``last_k``
    best for the pass's starting tokens (:func:`_last_candidates`).
    """
    best = matcher.hard(tokens)
    vocab = matcher.embeddings.shape[0]
    for n in range(passes):
        improved = False
        last = (
            torch.arange(vocab, device=tokens.device)
            if last_k is None
            else _last_candidates(matcher, tokens, cand, last_k)
        )
        trials = _trials(tokens, cand, last)
        for trial in _bar(trials, progress, f"gradient inversion (refine {n + 1})", len(trials)):
            d = matcher.hard(trial)
            if d < best:
                tokens, best, improved = trial, d, True
        if not improved:
            break
    return tokens, best


def run_gradient_inversion(
    model: nn.Module,
    observed: Mapping[str, torch.Tensor],
    truth: torch.Tensor | Sequence[torch.Tensor],
    *,
    tokenizer: Any = None,
    **options: Any,
) -> AttackResult:
    """Invert ``observed`` and score the tokens against ``truth`` by token F1.

    Parameters
    ----------
    model, observed
        As :func:`invert_lora_gradient`.
    truth : Tensor ``[batch, seq]`` or a sequence of them
        The client's true tokens (one tensor), or those of every client whose updates were summed
        (secure aggregation): the reconstruction is scored against the best-matching one.
    tokenizer : optional
        Decodes the example reconstruction.
    **options
        Passed to :func:`invert_lora_gradient` (``seq_len`` defaults to the truth's).

    Returns
    -------
    AttackResult
        ``metrics``: ``token_f1``, ``token_precision``, ``token_recall``, ``token_accuracy``,
        ``rouge_l``, ``exact_sequences``, ``bag_f1`` (the bag-of-words stage's candidates as a set against the true set) and
        ``gradient_distance``; ``chance``: the token F1 of guessing uniformly over the vocabulary.
    """
    truths = [truth] if isinstance(truth, torch.Tensor) else list(truth)
    options.setdefault("seq_len", truths[0].shape[-1])
    options.setdefault("batch_size", truths[0].shape[0])
    t0 = time.perf_counter()
    out = invert_lora_gradient(model, observed, **options)
    seconds = time.perf_counter() - t0
    scored = [token_scores([out.tokens], [t], [torch.ones_like(t)]) for t in truths]
    metrics = max(scored, key=lambda m: m["token_f1"])
    best = truths[scored.index(metrics)]
    true_set, guessed = set(best.flatten().tolist()), set(out.candidates.tolist())
    common = len(true_set & guessed)
    bag_f1 = 2 * common / (len(true_set) + len(guessed)) if common else 0.0
    vocab = _embeddings(model).shape[0]
    decode = (
        (lambda ids: tokenizer.decode(ids))
        if tokenizer is not None
        else (lambda ids: " ".join(map(str, ids)))
    )
    return AttackResult(
        attack="gradient_inversion",
        metrics={k: v for k, v in metrics.items() if k != "sequences"}
        | {"bag_f1": bag_f1, "gradient_distance": out.distance},
        chance=min(1.0, best.shape[-1] / vocab),
        n_examples=int(best.shape[0]),
        seconds=seconds,
        examples=[
            Reconstruction(decode(t.tolist()), decode(p.tolist()))
            for t, p in zip(best, out.tokens, strict=True)
        ],
        params={k: v for k, v in options.items()} | {"candidates": len(guessed)},
    )


__all__ = [
    "InversionResult",
    "bag_of_words",
    "causal_lm_loss",
    "client_gradient",
    "gradient_from_update",
    "invert_lora_gradient",
    "lora_parameters",
    "run_gradient_inversion",
]
