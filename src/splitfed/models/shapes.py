"""The dimensions of a transformer block that FLOP counts need, as each family adapter reads them."""

from __future__ import annotations

from dataclasses import dataclass, field

#: Generic projection names (q, k, v, o; GPT-2's fused qkv; the MLP's gate, up, down).
GENERIC_PROJECTIONS: tuple[tuple[str, str], ...] = tuple(
    (n, n) for n in ("q", "k", "v", "o", "qkv", "gate", "up", "down")
)


@dataclass(frozen=True)
class LayerShape:
    """The dimensions of a transformer that FLOP counts need.

    Parameters
    ----------
    hidden : int
        Residual stream width.
    intermediate : int
        MLP inner width.
    heads, kv_heads : int
        Query heads and key/value heads (equal unless grouped-query attention).
    head_dim : int
        Width of one head (``heads * head_dim`` is usually ``hidden``, not always: Gemma).
    vocab : int
        Vocabulary size (LM head width).
    gated_mlp : bool
        Three MLP matrices (gate, up, down) instead of two.
    num_layers : int
        Number of blocks.
    pooler : bool, default False
        The classification head starts with an ``hidden x hidden`` dense layer (BERT's pooler,
        DistilBERT's ``pre_classifier``).
    projections : tuple[tuple[str, str], ...], default ()
        The family's module names of each projection (``("q_proj", "q")``, ``("c_attn", "qkv")``),
        so that a LoRA ``target_modules`` list can be counted as it is.
    """

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    gated_mlp: bool
    num_layers: int
    pooler: bool = False
    projections: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    def projection_dims(self, name: str) -> tuple[int, int]:
        """``(d_in, d_out)`` of a generic projection name (``q``, ``k``, ``v``, ``o``, ``qkv``,
        ``gate``, ``up``, ``down``) or of a family module name such as ``q_proj`` or ``c_attn``."""
        aliases = dict(GENERIC_PROJECTIONS) | dict(self.projections)
        key = aliases.get(name)
        if key is None or (key == "gate" and not self.gated_mlp):
            from splitfed.models.families import SplitConfigError  # families imports this module

            known = sorted(n for n, k in aliases.items() if self.gated_mlp or k != "gate")
            raise SplitConfigError(f"unknown LoRA target {name!r} for FLOP counting; known: {known}")
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q": (self.hidden, q),
            "k": (self.hidden, kv),
            "v": (self.hidden, kv),
            "o": (q, self.hidden),
            "qkv": (self.hidden, q + 2 * kv),
            "gate": (self.hidden, self.intermediate),
            "up": (self.hidden, self.intermediate),
            "down": (self.intermediate, self.hidden),
        }[key]
