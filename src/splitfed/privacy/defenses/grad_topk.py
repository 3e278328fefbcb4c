"""Gradient sparsification of the gradients the data party returns, with error feedback.

Sparsification as a defense against label inference from returned gradients is VFLAIR's "GS"
(Fu et al. 2022, "Label Inference Attacks Against Vertical Federated Learning", USENIX Security;
Zou et al. 2023, VFLAIR); keeping the largest entries and carrying the rest to the next step is
the residual accumulation of Aji & Heafield 2017 ("Sparse Communication for Distributed Gradient
Descent") and Lin et al. 2018 ("Deep Gradient Compression").
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from splitfed.split.front import Defense, FrontContext

#: Below this many entries an exact selection over all of them is cheap enough; above it the
#: threshold is estimated from a sample first.
_PREFILTER_MIN = 1 << 18
#: Entries sampled to estimate a quantile of the magnitudes.
_SAMPLE = 1 << 15
#: Entries per pass chunk: small enough that a chunk's temporaries stay in cache.
_CHUNK = 1 << 18


def _spans(n: int) -> list[slice]:
    return [slice(start, min(n, start + _CHUNK)) for start in range(0, n, _CHUNK)]


def _sample_at(n: int, device: torch.device, seed: int) -> torch.Tensor:
    """:data:`_SAMPLE` positions in ``[0, n)`` drawn by a generator of its own (the run's random
    state is left alone), the same for the same ``n`` and ``seed``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, n, (_SAMPLE,), generator=g).to(device)


def _sampled_rank(sample: torch.Tensor, q: float, side: float) -> torch.Tensor | None:
    """The sample's value ``side`` (-1 below, +1 above) four standard deviations of the sample
    quantile from the ``q`` quantile, so that the population's ``q`` quantile lies beyond it;
    ``None`` where that falls off the sample."""
    m = sample.numel()
    bound = q + side * (4.0 * math.sqrt(q * (1.0 - q) / m) + 1.0 / m)
    rank = math.floor(bound * m) if side < 0 else math.ceil(bound * m)
    if rank < 1 or rank > m:
        return None
    return sample.kthvalue(rank).values


def _kth_smallest(values: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank``-th smallest (1-based) of the 1-d ``values``, exactly; large inputs first narrow
    the search to a band around the sampled quantile (``kthvalue`` on millions of entries is slow)."""
    n = values.numel()
    if n < _PREFILTER_MIN:
        return values.kthvalue(rank).values
    sample = values[_sample_at(n, values.device, 1)]
    q = rank / n
    low, high = _sampled_rank(sample, q, -1.0), _sampled_rank(sample, q, 1.0)
    if low is None or high is None:
        return values.kthvalue(rank).values
    below = int((values < low).sum())
    band = values[(values >= low) & (values <= high)]
    if not 0 < rank - below <= band.numel():  # the sample was far off: search everything
        return values.kthvalue(rank).values
    return band.kthvalue(rank - below).values


def kth_largest_magnitude(flat: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """The ``k``-th largest magnitude of the 1-d ``flat`` (a 0-d tensor), exactly, and how many
    entries reach it (``k``, or more where entries tie with it).

    Exactly ``flat.abs().topk(k).values[-1]``, faster on large tensors: a threshold a little below
    it is estimated from a fixed random sample (the run's random state is left alone), the
    magnitudes above it (a little more than ``k``) are collected in one chunked pass, and the exact
    one is selected among them. Should they fall short of ``k`` (a sample far off), every
    magnitude is searched instead.
    """
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}]; got {k}")
    if n < _PREFILTER_MIN:
        return _reaching(flat.abs(), n - k + 1)
    sample = flat[_sample_at(n, flat.device, 0)].abs()
    estimate = _sampled_rank(sample, 1.0 - k / n, -1.0)
    if estimate is None:
        return _reaching(flat.abs(), n - k + 1)
    parts = []
    for span in _spans(n):
        mags = flat[span].abs()
        parts.append(mags[mags >= estimate])
    candidates = torch.cat(parts)
    if candidates.numel() < k:
        return _reaching(flat.abs(), n - k + 1)
    return _reaching(candidates, candidates.numel() - k + 1)


def _reaching(values: torch.Tensor, rank: int) -> tuple[torch.Tensor, int]:
    """The ``rank``-th smallest of ``values`` and how many of them are at least it."""
    threshold = _kth_smallest(values, rank)
    return threshold, int((values >= threshold).sum())


def sparsify(
    flat: torch.Tensor,
    k: int,
    *,
    residual: torch.Tensor | None = None,
    in_place: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``k`` entries of the 1-d ``flat`` largest in magnitude, the others zero.

    With ``residual`` (a 1-d tensor like ``flat``), what is not sent is written into it; with
    ``in_place``, ``flat`` itself (which the caller owns) becomes that residual. With ``out`` (a
    1-d tensor like ``flat`` that does not overlap it), what is sent is written there. Entries tied at
    the threshold beyond ``k`` stay behind (the last ones by position), so exactly ``k`` are sent;
    where the threshold is 0 the surplus are zeros and nothing changes. One pass to find the
    threshold and one to write, chunk by chunk: no index tensor, no scatter.
    """
    n = flat.numel()
    if k >= n:
        sent = flat.clone() if out is None else out.copy_(flat)
        if residual is not None:
            residual.zero_()
        if in_place:
            flat.zero_()
        return sent
    threshold, reaching = kth_largest_magnitude(flat, k)
    # hardshrink keeps the entries whose magnitude exceeds lambda: the float just below the
    # threshold, so exactly those reaching it, in one fused pass (no mask, no index, no scatter).
    below = float(torch.nextafter(threshold, threshold.new_zeros(())))
    sent = torch.empty_like(flat) if out is None else out
    for span in _spans(n):
        part, kept = flat[span], sent[span]
        torch.hardshrink(part, below, out=kept)
        if in_place:
            part.sub_(kept)
        elif residual is not None:
            torch.sub(part, kept, out=residual[span])
    excess = reaching - k
    if excess > 0 and float(threshold) > 0:
        # Entries tied at the threshold: send only the first few of them.
        tied = (sent.abs() == threshold).nonzero().squeeze(1)[-excess:]
        carry = flat if in_place else residual
        if carry is not None:
            carry[tied] = sent[tied]
        sent[tied] = 0.0
    return sent


def accumulate_and_sparsify(carry: torch.Tensor, grad: torch.Tensor, k: int, *, out: torch.Tensor) -> None:
    """``carry += grad``, then the ``k`` entries of the sum largest in magnitude move into ``out``.

    The same selection as ``sparsify(carry + grad, k, in_place=True, out=out)`` (exactly ``k``
    sent; ties at the threshold sent first by position), in one chunked pass over memory where
    that takes three: a band ``[low, high]`` of magnitudes that holds the ``k``-th largest is
    estimated from a fixed random sample of the sum; in the pass, each chunk is summed, its entries
    above ``high`` are moved to ``out`` and the positions of those in the band are collected; the
    exact threshold is then selected among the band's few entries and the ones above it moved
    too. Should the sample have been far off (the band misses the threshold), the sum is restored
    and the exact search of :func:`sparsify` runs instead.

    ``carry``, ``grad`` and ``out`` are 1-d of one length; ``out`` may be ``grad`` itself (each
    chunk of ``grad`` is read before it is written) but must not overlap ``carry``.
    """

    def exactly(added: torch.Tensor) -> None:  # sum in place, then the search of ``sparsify``
        carry.add_(added)
        sparsify(carry, k, in_place=True, out=out)

    n = carry.numel()
    if not 1 <= k < n or n < _PREFILTER_MIN:
        return exactly(grad)
    at = _sample_at(n, carry.device, 0)
    sample = (carry[at] + grad[at]).abs()
    q = 1.0 - k / n
    low, high = _sampled_rank(sample, q, -1.0), _sampled_rank(sample, q, 1.0)
    if low is None or high is None or float(low) <= 0.0:
        return exactly(grad)
    # hardshrink keeps magnitudes strictly above its lambda: ``high`` itself, and the float just
    # below ``low`` so that ``low`` is kept.
    above_high, from_low = float(high), float(torch.nextafter(low, low.new_zeros(())))
    scratch = torch.empty(min(n, _CHUNK), dtype=carry.dtype, device=carry.device)
    in_band = torch.empty(n, dtype=torch.bool, device=carry.device)
    sent_count = 0
    # Comparisons into bool tensors and counts of nonzero floats are slow kernels on the CPU; a
    # float-to-bool copy (x != 0) and a count of nonzero bools are fast ones.
    flags = torch.empty(min(n, _CHUNK), dtype=torch.bool, device=carry.device)
    for span in _spans(n):
        part, sent, size = carry[span], out[span], span.stop - span.start
        part.add_(grad[span])
        torch.hardshrink(part, above_high, out=sent)
        part.sub_(sent)
        sent_count += int(torch.count_nonzero(flags[:size].copy_(sent)))
        in_band[span].copy_(torch.hardshrink(part, from_low, out=scratch[:size]))
    need = k - sent_count
    band_at = in_band.nonzero().squeeze(1)
    if not 0 <= need <= band_at.numel():  # the band missed the threshold: restore the sum, search exactly
        return exactly(out)
    if need == 0:
        return
    values = carry[band_at]
    mags = values.abs()
    threshold = _kth_smallest(mags, mags.numel() - need + 1)
    chosen = mags > threshold
    short = need - int(chosen.sum())
    if short > 0:  # ties at the threshold: the first ones by position go
        tied = (mags == threshold).nonzero().squeeze(1)[:short]
        chosen[tied] = True
    at_chosen = band_at[chosen]
    out[at_chosen] = values[chosen]
    carry[at_chosen] = 0.0


class GradientSparsification(Defense):
    """Return only the largest-magnitude fraction of each gradient; carry the rest forward.

    Each returned gradient ``g`` (HBT: of the body's output; HT with labels at the data party: of
    the logits) is added to the residual ``r`` left by the previous one, and only the
    ``k = ceil(fraction · numel)`` entries of ``g + r`` largest in magnitude are sent; the others
    become the new residual (error feedback), so over the steps nothing is lost: the sum of what
    was sent plus the final residual equals the sum of the raw gradients.

    The residual is positional: gradients of later micro-batches hold other examples, so where a
    gradient's shape differs from the residual's, the residual is added where the two overlap
    (leading rows and positions) and the rest of it is dropped.

    There is no formal privacy guarantee: sparsification removes the small entries that label
    inference attacks read most of their signal from, at the cost of a biased gradient in each step.

    Parameters
    ----------
    fraction : float, default 0.1
        Fraction of each gradient's entries that is sent.
    error_feedback : bool, default True
        Carry what was not sent into the next gradient (off: it is discarded).
    """

    name = "grad_topk"

    class Params(BaseModel):
        """Parameters of :class:`GradientSparsification` (validated from the YAML)."""

        model_config = ConfigDict(extra="forbid")
        fraction: float = Field(0.1, gt=0.0, le=1.0, description="fraction of each gradient's entries sent")
        error_feedback: bool = Field(True, description="carry what is not sent into the next gradient")

    def __init__(self, fraction: float = 0.1, error_feedback: bool = True) -> None:
        params = self.Params(fraction=fraction, error_feedback=error_feedback)
        self.fraction, self.error_feedback = params.fraction, params.error_feedback
        #: What was not sent yet (``None`` before the first gradient or without error feedback).
        self.residual: torch.Tensor | None = None
        self._warned = False

    def _carried(self, like: torch.Tensor) -> torch.Tensor:
        """The residual laid onto a tensor of ``like``'s shape (zeros where it does not reach)."""
        r = self.residual
        if r is not None and r.shape == like.shape:
            return r.to(device=like.device, dtype=like.dtype)
        out = torch.zeros_like(like)
        if r is not None and r.dim() == like.dim():
            overlap = tuple(slice(0, min(a, b)) for a, b in zip(r.shape, like.shape, strict=True))
            out[overlap] = r[overlap].to(device=like.device, dtype=like.dtype)
        return out

    def extra_state(self) -> dict[str, Any]:
        return {"residual": self.residual.clone()} if self.residual is not None else {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        residual = state.get("residual")
        self.residual = residual.clone() if isinstance(residual, torch.Tensor) else None

    def on_gradients(self, grad: torch.Tensor, context: FrontContext) -> torch.Tensor:
        sent = self._send(grad, context)
        r = self.residual
        # A non-finite gradient (a loss that overflowed) would stay in the residual and spoil every
        # later step; its non-finite entries are dropped from it (what is sent this step is the
        # receiver's to refuse). The sum is a cheap check (3 ms on 25M entries): a finite residual
        # whose sum overflows only costs a no-op replacement.
        if r is not None and not math.isfinite(float(r.sum())):
            torch.nan_to_num_(r, nan=0.0, posinf=0.0, neginf=0.0)
            if not self._warned:
                self._warned = True
                warnings.warn(
                    "grad_topk: a returned gradient held NaN or infinite entries; they were dropped "
                    "from the residual carried to later steps (the loss is likely diverging: lower the "
                    "learning rate or check the data)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return sent

    def _send(self, grad: torch.Tensor, context: FrontContext) -> torch.Tensor:
        """What is sent of ``grad``; the residual updated."""
        work = grad.detach().to(torch.promote_types(grad.dtype, torch.float32))
        owned = work.data_ptr() != grad.data_ptr()  # a promoted copy is ours
        k = min(work.numel(), math.ceil(self.fraction * work.numel()))
        r = self.residual
        if (
            self.error_feedback
            and r is not None
            and r.shape == work.shape
            and r.dtype == work.dtype
            and r.device == work.device
            and r.is_contiguous()
            and work.is_contiguous()
        ):
            # The steady state: the residual and the gradient are summed, and the sum sparsified,
            # in one pass; what is sent goes into the handed-over gradient's storage where allowed.
            if context.owns_gradient and grad.dtype == work.dtype and grad.is_contiguous():
                into = grad.detach().view(-1)
            else:
                into = torch.empty_like(work).view(-1)
            accumulate_and_sparsify(r.view(-1), work.view(-1), k, out=into)
            return into.view_as(work).to(grad.dtype)
        if self.error_feedback and self.residual is not None:
            carried = self._carried(work)  # the residual itself, or a fresh tensor: ours to change
            work, owned = carried.add_(work), True
        flat = work.reshape(-1)
        # Where the data party hands its gradient over (and it is not what ``flat`` holds), what is
        # sent is written into that storage: no fresh 100 MB buffer to fault in at every step.
        out = None
        if context.owns_gradient and owned and grad.dtype == work.dtype and grad.is_contiguous():
            out = grad.detach().view(-1)
        if not self.error_feedback:
            sent = sparsify(flat, k, out=out)
        elif owned:  # ``work`` is ours (the carried residual plus the gradient): it becomes the residual
            sent = sparsify(flat, k, in_place=True, out=out)
            self.residual = work
        else:
            residual = torch.empty_like(flat)
            sent = sparsify(flat, k, residual=residual)
            self.residual = residual.view_as(work)
        return sent.view_as(work).to(grad.dtype)
