"""Magnitude pruning of updates before blind aggregation, in FedShield-LLM's two forms.

* :func:`prune` (FedShield's per-client masks, Mia et al., 2025): each client keeps the
  ``keep_ratio`` largest-magnitude values of its own update and zeros the rest. The kept
  positions differ between clients, so the update stays dense: the zeros still fill ciphertext
  slots (sending the indices instead would show the server every client's top positions, and
  their union can be as large as the whole update).
* :class:`SharedMask`: every client derives the same mask from the last global model (public to
  all of them), so the kept positions are identical without any index crossing; only those
  values are packed and encrypted (:meth:`SharedMask.select`), sums align coordinate by
  coordinate, and clients put the average back in place (:meth:`SharedMask.scatter`). At a keep
  ratio of 50 % a CKKS update needs half the ciphertexts.

Ranking is over the whole update (all tensors together), by magnitude, ties broken by position,
so that every client computes the same mask from the same reference; or, with ``per_tensor``,
within each tensor (each keeps its own ``keep_ratio`` share). A shared mask over LoRA adapters
ranks per tensor: ranked together, the randomly initialised A matrices outweigh the B matrices,
which start at zero and grow slowly, and a mask from the global adapters would keep no B at all.

:func:`prune_ratio` is FedShield-LLM's schedule of how much to prune in each round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from splitfed.federated.aggregators.base import AggregationError, Layout


def _check_ratio(keep_ratio: float) -> None:
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")


def prune_ratio(
    round_id: int, rounds: int, *, start_round: int, start_ratio: float, end_ratio: float
) -> float:
    """FedShield-LLM's pruning schedule: the fraction of an update's values zeroed in ``round_id``.

    Rounds count from 1 to ``rounds``. Before ``start_round`` nothing is pruned (0.0); from
    ``start_round`` on, the ratio grows linearly and reaches ``end_ratio`` in the last round::

        ratio(t) = start_ratio + (end_ratio - start_ratio) * (t - start_round) / (rounds - start_round)

    (``end_ratio`` when ``start_round == rounds``). Rounds past ``rounds`` keep ``end_ratio``. The
    matching ``keep_ratio`` of :func:`prune` and :meth:`SharedMask.from_reference` is
    ``1 - ratio``.
    """
    if not 0 <= start_ratio <= end_ratio < 1:
        raise ValueError(
            f"need 0 <= start_ratio <= end_ratio < 1, got start_ratio={start_ratio}, end_ratio={end_ratio}"
        )
    if not 1 <= start_round <= rounds:
        raise ValueError(f"need 1 <= start_round <= rounds, got start_round={start_round}, rounds={rounds}")
    if round_id < start_round:
        return 0.0
    if round_id >= rounds:
        return end_ratio
    return start_ratio + (end_ratio - start_ratio) * (round_id - start_round) / (rounds - start_round)


def kept_count(numel: int, keep_ratio: float) -> int:
    """How many of ``numel`` values a ``keep_ratio`` keeps: ``ceil(keep_ratio * numel)``."""
    _check_ratio(keep_ratio)
    return math.ceil(keep_ratio * numel)


def topk_masks(
    tensors: Mapping[str, torch.Tensor], keep_ratio: float, *, per_tensor: bool = False
) -> dict[str, torch.Tensor]:
    """Boolean masks (same shapes) of the ``ceil(keep_ratio * numel)`` largest magnitudes overall
    (``per_tensor``: of each tensor's own ``ceil(keep_ratio * numel)`` largest)."""
    _check_ratio(keep_ratio)
    if per_tensor:
        return {name: topk_masks({name: t}, keep_ratio)[name] for name, t in tensors.items()}
    names = sorted(tensors)
    flat = torch.cat([tensors[n].detach().to("cpu", torch.float64).reshape(-1).abs() for n in names])
    keep = kept_count(flat.numel(), keep_ratio)
    order = torch.sort(flat, descending=True, stable=True).indices[:keep]
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[order] = True
    masks, offset = {}, 0
    for name in names:
        size = tensors[name].numel()
        masks[name] = chosen[offset : offset + size].reshape(tensors[name].shape)
        offset += size
    return masks


def prune(update: Mapping[str, torch.Tensor], keep_ratio: float) -> dict[str, torch.Tensor]:
    """Per-client pruning: the update with all but its largest ``keep_ratio`` share of values zeroed."""
    masks = topk_masks(update, keep_ratio)
    return {name: torch.where(masks[name], t, torch.zeros_like(t)) for name, t in update.items()}


@dataclass(frozen=True)
class SharedMask:
    """The positions every client keeps, derived from a reference all of them hold.

    Parameters
    ----------
    masks : dict[str, torch.Tensor]
        One boolean tensor per parameter, shaped like it.
    """

    masks: dict[str, torch.Tensor]

    @classmethod
    def from_reference(
        cls, reference: Mapping[str, torch.Tensor], *, keep_ratio: float, per_tensor: bool = False
    ) -> SharedMask:
        """Keep the positions of the ``keep_ratio`` largest magnitudes of ``reference`` (e.g. the
        last global adapters), over all tensors together or, with ``per_tensor``, within each."""
        return cls(topk_masks(reference, keep_ratio, per_tensor=per_tensor))

    @property
    def kept(self) -> int:
        """Number of kept values."""
        return sum(int(m.sum()) for m in self.masks.values())

    def layout(self, full: Layout) -> Layout:
        """The layout of :meth:`select`'s output for updates laid out as ``full`` (one 1-D tensor of
        the kept values per parameter, same names and dtypes): what a round aggregates."""
        if set(full.names) != set(self.masks):
            raise AggregationError(
                f"layout has parameters {sorted(set(full.names) ^ set(self.masks))[:5]} that the shared mask "
                "does not cover (or lacks ones it does): derive the mask from the same parameters"
            )
        for name, shape in zip(full.names, full.shapes, strict=True):
            if shape != tuple(self.masks[name].shape):
                raise AggregationError(
                    f"parameter {name!r} has shape {shape} in the layout, its mask {tuple(self.masks[name].shape)}"
                )
        shapes = tuple((int(self.masks[name].sum()),) for name in full.names)
        return Layout(full.names, shapes, full.dtypes)

    def apply(self, update: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``update`` with the unkept positions zeroed, in its shapes (what :meth:`select` sends)."""
        return self.scatter(self.select(update))

    def select(self, update: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The kept values of ``update`` as one 1-D tensor per parameter (what is aggregated)."""
        if set(update) != set(self.masks):
            raise AggregationError(
                f"update has parameters {sorted(set(update) ^ set(self.masks))[:5]} that the shared mask does "
                "not cover (or lacks ones it does): derive the mask from the same parameters"
            )
        out = {}
        for name, tensor in update.items():
            if tensor.shape != self.masks[name].shape:
                raise AggregationError(
                    f"parameter {name!r} has shape {tuple(tensor.shape)}, its mask {tuple(self.masks[name].shape)}"
                )
            out[name] = tensor.detach()[self.masks[name]]
        return out

    def scatter(
        self, selected: Mapping[str, torch.Tensor], *, base: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Put selected values back in place: zeros (or ``base``'s values) at the pruned positions."""
        out = {}
        for name, values in selected.items():
            mask = self.masks[name]
            if values.numel() != int(mask.sum()):
                raise AggregationError(
                    f"{name!r}: {values.numel()} values for {int(mask.sum())} kept positions"
                )
            dense = (
                base[name].detach().clone().to(values.dtype)
                if base is not None
                else torch.zeros(mask.shape, dtype=values.dtype)
            )
            dense[mask] = values
            out[name] = dense
        return out
