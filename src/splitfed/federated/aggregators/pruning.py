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
so that every client computes the same mask from the same reference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from splitfed.federated.aggregators.base import AggregationError


def _check_ratio(keep_ratio: float) -> None:
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")


def topk_masks(tensors: Mapping[str, torch.Tensor], keep_ratio: float) -> dict[str, torch.Tensor]:
    """Boolean masks (same shapes) of the ``ceil(keep_ratio * numel)`` largest magnitudes overall."""
    _check_ratio(keep_ratio)
    names = sorted(tensors)
    flat = torch.cat([tensors[n].detach().to("cpu", torch.float64).reshape(-1).abs() for n in names])
    keep = math.ceil(keep_ratio * flat.numel())
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
    def from_reference(cls, reference: Mapping[str, torch.Tensor], *, keep_ratio: float) -> SharedMask:
        """Keep the positions of the ``keep_ratio`` largest magnitudes of ``reference`` (e.g. the
        last global adapters)."""
        return cls(topk_masks(reference, keep_ratio))

    @property
    def kept(self) -> int:
        """Number of kept values."""
        return sum(int(m.sum()) for m in self.masks.values())

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
