"""The data party's one way out: every tensor it sends to the model party passes this front.

Defenses live here, never in party step code. A :class:`Defense` implements any of five hooks
(each does nothing by default):

``on_text``
    input text before tokenization (text sanitizers);
``on_embeddings``
    the token embeddings the head runs on (dχ-privacy, split-and-denoise);
``on_activations``
    the head's output before it crosses. A defense may be an ``nn.Module`` with trainable
    parameters (they join the data party's optimizer, checkpoints and adapter files), may behave
    differently in training, evaluation and generation (:attr:`FrontContext.phase`), may change
    the width when a later defense restores it, and may return an auxiliary loss, which joins the
    head's single backward pass scaled like the task loss;
``on_gradients``
    the gradients the data party returns to the model party (HBT; HT with labels at the data party);
``on_received``
    what comes back from the model party before the data party uses it: the body's output before
    the tail (HBT) or the logits (HT with labels at the data party), in training, evaluation and
    every decoding step (split-and-denoise's denoiser, MID's bottleneck at the tail's input). It
    may train and return an auxiliary loss, which joins the task loss; parameters that act only
    here (:meth:`Defense.received_parameters`) need no gradient returned for what was sent, so a
    frozen head asks for none;
``before_update`` / ``on_update``
    each optimizer-update boundary of the data party, before the optimizer steps (DP-SGD replaces
    the accumulated gradients by clipped per-example ones plus noise) and after it (an
    adversary's own optimizer step);
``attach``
    once, when a data party takes the front: the head (and tail) segments whose modules a
    defense may hook (per-example gradients for DP-SGD).

A defense that needs the pretrained model (its token embedding matrix, for a text sanitizer or
dχ-privacy) or the tokenizer overrides :meth:`Defense.setup`, which :func:`build_front` calls
with a :class:`FrontResources` once the model is loaded (never during config validation).

The data party calls :meth:`DataFront.activations` in every training schedule, evaluation, the
frozen-head output cache (which keeps outputs from before the front, so noise is fresh each
time) and split generation (prefill and every decoding step).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from splitfed.protocol import Phase

if TYPE_CHECKING:
    from splitfed.models.partition import Segment


@dataclass(frozen=True)
class FrontContext:
    """Where a tensor is on its way out.

    Parameters
    ----------
    phase : {"train", "eval", "generate"}
    step : int
        Optimizer updates the data party has applied so far.
    batch_id : int
        The micro-batch (or generation session step) this tensor belongs to.
    attention_mask : torch.Tensor | None
        ``[batch, seq]`` mask of the tensor's positions; in a decoding step, of every position so
        far (the tensor holds only the last).
    loss_scale : float
        The micro-batch's gradient scale (``1/grad_accum``): an auxiliary loss is scaled by it too.
    input_ids : torch.Tensor | None
        ``[batch, seq]`` token ids the tensor was computed from (private to the data party: an
        adversarial-training defense trains its inverter on them); in a decoding step, only the
        newest token's. ``None`` where the head ran on embeddings the caller supplied.
    owns_gradient : bool
        The gradient handed to ``on_gradients`` is the hooks' to overwrite: the data party passes
        the ``.grad`` it just computed, which nothing else reads, so a hook may write its result
        into that storage instead of allocating (the logits' gradient of a causal LM is ~100 MB).
        ``False`` (the default, e.g. a caller's own tensor): hooks must leave it unchanged.
    """

    phase: Phase
    step: int = 0
    batch_id: int = 0
    attention_mask: torch.Tensor | None = None
    loss_scale: float = 1.0
    input_ids: torch.Tensor | None = None
    owns_gradient: bool = False


@dataclass(frozen=True)
class FrontResources:
    """What a defense may read while it sets up: the public pretrained model and its tokenizer.

    Parameters
    ----------
    model : torch.nn.Module
        The whole model the run splits (read-only: a defense must not modify it).
    tokenizer : Any | None
        The run's tokenizer (``None`` where the caller has none, e.g. a unit test).
    seed : int
        The run's seed (a defense draws from its own stream, seeded from it).
    """

    model: nn.Module
    tokenizer: Any = None
    seed: int = 0

    @property
    def family(self) -> Any:
        """The model's family adapter (:mod:`splitfed.models.families`)."""
        from splitfed.models.families import family_for

        return family_for(self.model.config)

    @property
    def embedding_matrix(self) -> torch.Tensor:
        """The token embedding matrix ``[vocab, hidden]``, detached (a defense reads, never trains, it)."""
        return self.family.token_embedding_layer(self.model).weight.detach()


class Defense:
    """Base of every defense: optional hooks, each a no-op by default.

    Subclass it (and ``nn.Module`` for a defense with parameters) and override only the hooks the
    defense needs; register the class in :data:`splitfed.privacy.defenses.DEFENSES`.
    """

    #: Registry name (``defenses: [{name: ...}]`` in a run's YAML).
    name: str = ""

    #: Set by a defense that works only where the data party has a tail (HBT): why it needs one
    #: and what to use in HT instead. The front then refuses HT (:meth:`DataFront.check_tail`)
    #: rather than run a defense that does half its job.
    needs_tail: str = ""

    def setup(self, resources: FrontResources) -> None:
        """Read what the defense needs from the pretrained model or tokenizer (called once, after loading)."""

    def on_text(self, texts: list[str], context: FrontContext) -> list[str]:
        """The texts to tokenize instead of ``texts``."""
        return texts

    def on_embeddings(self, embeddings: torch.Tensor, context: FrontContext) -> torch.Tensor:
        """Token embeddings ``[batch, seq, hidden]`` the head runs on instead of ``embeddings``."""
        return embeddings

    def on_activations(
        self, hidden: torch.Tensor, context: FrontContext
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The activations to send instead of ``hidden``, optionally with an auxiliary loss (a scalar)."""
        return hidden

    def on_gradients(self, grad: torch.Tensor, context: FrontContext) -> torch.Tensor:
        """The gradient to return to the model party instead of ``grad`` (of what it sent the data party)."""
        return grad

    def on_received(
        self, name: str, tensor: torch.Tensor, context: FrontContext
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """What the data party uses instead of the received ``tensor`` (``name``: ``"hidden"`` or
        ``"logits"``), optionally with an auxiliary loss (a scalar)."""
        return tensor

    def received_parameters(self) -> list[nn.Parameter]:
        """Its trainable parameters that act only on what comes back (:meth:`on_received`).

        They train from the data party's own loss, so they need no gradient returned for what
        the data party sent; every other trainable parameter of a defense does. By default: all
        of them for a defense that overrides ``on_received`` and none of ``on_embeddings`` /
        ``on_activations``, else none (a defense whose parameters are not all on the way back,
        like split-and-denoise's, says which are).
        """
        if not isinstance(self, nn.Module) or not _overrides(self, "on_received"):
            return []
        if _overrides(self, "on_embeddings") or _overrides(self, "on_activations"):
            return []
        return [p for p in self.parameters() if p.requires_grad]

    def attach(self, head: Segment, tail: Segment | None) -> None:
        """The data party's segments (called once, when a data party takes the front)."""

    def before_update(self, context: FrontContext) -> None:
        """Called before each optimizer update of the data party (its parameters' ``.grad`` are final)."""

    def on_update(self, context: FrontContext) -> None:
        """Called after each optimizer update of the data party."""

    def step_metrics(self) -> dict[str, float]:
        """Numbers to log with each training step (e.g. DP-SGD's ε so far). Empty by default."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """State beyond its parameters that a checkpoint must keep (a residual, an own optimizer's
        state): tensors, numbers, strings and containers of them. Empty by default."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned (called on ``--resume``)."""

    def on_loaded(self) -> None:
        """Its parameters were just loaded from adapter files: a defense that initializes itself
        from the first batch it sees (MID's PCA start) must not overwrite them."""


def _overrides(defense: Defense, hook: str) -> bool:
    return getattr(type(defense), hook) is not getattr(Defense, hook)


class DataFront(nn.Module):
    """The defenses a data party applies, in order, to everything it sends.

    Parameters
    ----------
    defenses : Sequence[Defense], default ()
        Applied in order (a later one sees what an earlier one produced).
    """

    def __init__(self, defenses: Sequence[Defense] = ()) -> None:
        super().__init__()
        self.defenses = list(defenses)
        # Registered so that parameters, train/eval and state dicts reach the defenses that are modules.
        self.modules_ = nn.ModuleDict(
            {
                f"{i}_{d.name or type(d).__name__}": d
                for i, d in enumerate(self.defenses)
                if isinstance(d, nn.Module)
            }
        )

    def __len__(self) -> int:
        return len(self.defenses)

    def __iter__(self) -> Iterator[Defense]:  # type: ignore[override]
        return iter(self.defenses)

    @property
    def trains(self) -> bool:
        """Whether a defense has trainable parameters (on either side of the crossing)."""
        return any(p.requires_grad for p in self.parameters())

    @property
    def trains_before_crossing(self) -> bool:
        """Whether a defense has trainable parameters that shape what the data party sends (on the
        embeddings or activations): then it needs the gradient of what it sent returned. Parameters
        that act only on what comes back (:meth:`Defense.received_parameters`) train from the
        data party's own loss and need none."""
        received = {id(p) for d in self.defenses for p in d.received_parameters()}
        return any(id(p) not in received for p in self.trainable_parameters())

    def check_tail(self, has_tail: bool) -> None:
        """Refuse a defense that needs the data party's tail where it has none (``has_tail=False``: HT).

        Raises
        ------
        ValueError
            Naming each such defense, why it needs a tail and what to use in HT instead.
        """
        if has_tail:
            return
        refused = [
            f"defense {d.name or type(d).__name__}: {d.needs_tail}" for d in self.defenses if d.needs_tail
        ]
        if refused:
            raise ValueError(
                "split.setting: ht has no data-party tail; "
                + "; ".join(refused)
                + " (or use split.setting: hbt)"
            )

    @property
    def touches_text(self) -> bool:
        """Whether a defense rewrites input text."""
        return any(_overrides(d, "on_text") for d in self.defenses)

    @property
    def touches_embeddings(self) -> bool:
        """Whether a defense perturbs the token embeddings (the head then embeds from them)."""
        return any(_overrides(d, "on_embeddings") for d in self.defenses)

    def text(self, texts: list[str], context: FrontContext) -> list[str]:
        """Input texts through every ``on_text`` hook."""
        for d in self.defenses:
            if _overrides(d, "on_text"):
                texts = d.on_text(list(texts), context)
        return texts

    def examples(
        self, examples: Sequence[Mapping[str, Any]], fields: Sequence[str], context: FrontContext
    ) -> list[dict[str, Any]]:
        """``examples`` with their text ``fields`` (the task's :attr:`~splitfed.data.tasks.Task.text_fields`)
        through every ``on_text`` hook; unchanged (the same objects) when no defense touches text."""
        if not self.touches_text:
            return list(examples)  # type: ignore[arg-type]
        out = [dict(ex) for ex in examples]
        for field in fields:
            rows = [i for i, ex in enumerate(out) if isinstance(ex.get(field), str)]
            if rows:
                texts = self.text([out[i][field] for i in rows], context)
                for i, text in zip(rows, texts, strict=True):
                    out[i][field] = text
        return out

    def run_head(self, head: Segment, context: FrontContext, **inputs: Any) -> torch.Tensor:
        """``head(**inputs)``, embedding through the ``on_embeddings`` hooks when a defense has one."""
        if not self.touches_embeddings or "input_ids" not in inputs:
            return head(**inputs)  # type: ignore[no-any-return]
        ids = inputs.pop("input_ids")
        embeds = self.embeddings(head.family.token_embeddings(head.model, ids), context)
        return head(inputs_embeds=embeds, **inputs)  # type: ignore[no-any-return]

    # Segment-like access, so that adapter files and checkpoints carry the defenses' parameters
    # next to the head's (``segments["front"]``, role of the data party).
    def named_model_parameters(self, trainable_only: bool = False) -> dict[str, nn.Parameter]:
        """Parameters under ``front.<defense>.<param>`` (as adapter files store them)."""
        return {
            f"front.{n}": p
            for n, p in self.modules_.named_parameters()
            if p.requires_grad or not trainable_only
        }

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The defenses' trainable parameters (they join the data party's optimizer)."""
        return [p for p in self.parameters() if p.requires_grad]

    def embeddings(self, embeddings: torch.Tensor, context: FrontContext) -> torch.Tensor:
        """Token embeddings through every ``on_embeddings`` hook."""
        for d in self.defenses:
            if _overrides(d, "on_embeddings"):
                embeddings = d.on_embeddings(embeddings, context)
        return embeddings

    def activations(
        self, hidden: torch.Tensor, context: FrontContext
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What crosses instead of the head's output ``hidden``, and the summed auxiliary loss (or ``None``)."""
        aux: torch.Tensor | None = None
        for d in self.defenses:
            if not _overrides(d, "on_activations"):
                continue
            out = d.on_activations(hidden, context)
            if isinstance(out, tuple):
                hidden, loss = out
                aux = loss if aux is None else aux + loss
            else:
                hidden = out
        return hidden, aux

    def received(
        self, name: str, tensor: torch.Tensor, context: FrontContext
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A tensor from the model party (``name``: ``"hidden"`` or ``"logits"``) through every
        ``on_received`` hook, in reverse order (the last defense out is the first back), and the
        summed auxiliary loss (or ``None``)."""
        aux: torch.Tensor | None = None
        for d in reversed(self.defenses):
            if not _overrides(d, "on_received"):
                continue
            out = d.on_received(name, tensor, context)
            if isinstance(out, tuple):
                tensor, loss = out
                aux = loss if aux is None else aux + loss
            else:
                tensor = out
        return tensor, aux

    def gradients(self, grad: torch.Tensor, context: FrontContext) -> torch.Tensor:
        """A returned gradient through every ``on_gradients`` hook."""
        for d in self.defenses:
            if _overrides(d, "on_gradients"):
                grad = d.on_gradients(grad, context)
        return grad

    def attach(self, head: Segment, tail: Segment | None = None) -> None:
        """Give every defense the data party's segments (refusing, with no tail, a defense that needs one)."""
        self.check_tail(tail is not None)
        for d in self.defenses:
            if _overrides(d, "attach"):
                d.attach(head, tail)

    def before_update(self, context: FrontContext) -> None:
        """Tell every defense an optimizer update is about to happen."""
        for d in self.defenses:
            if _overrides(d, "before_update"):
                d.before_update(context)

    def update(self, context: FrontContext) -> None:
        """Tell every defense an optimizer update happened."""
        for d in self.defenses:
            if _overrides(d, "on_update"):
                d.on_update(context)

    def step_metrics(self) -> dict[str, float]:
        """Every defense's :meth:`Defense.step_metrics`, as ``<defense>_<name>``."""
        out: dict[str, float] = {}
        for d in self.defenses:
            if _overrides(d, "step_metrics"):
                out |= {f"{d.name or type(d).__name__}_{k}": float(v) for k, v in d.step_metrics().items()}
        return out

    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint keeps beyond the parameters (those go to the adapter files): every
        defense's buffers and its :meth:`Defense.extra_state`, by position."""
        state: dict[str, Any] = {}
        for i, d in enumerate(self.defenses):
            entry: dict[str, Any] = {}
            if isinstance(d, nn.Module):
                entry["buffers"] = {n: b.detach().clone() for n, b in d.named_buffers()}
            if _overrides(d, "extra_state"):
                entry["extra"] = d.extra_state()
            if entry:
                state[f"{i}_{d.name or type(d).__name__}"] = entry
        return state

    def loaded(self) -> None:
        """Tell every defense its parameters came from adapter files (:meth:`Defense.on_loaded`)."""
        for d in self.defenses:
            if _overrides(d, "on_loaded"):
                d.on_loaded()

    def load_checkpoint_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`checkpoint_state` returned (the defenses must be the same, in order)."""
        for i, d in enumerate(self.defenses):
            entry = state.get(f"{i}_{d.name or type(d).__name__}")
            if entry is None:
                continue
            if isinstance(d, nn.Module):
                buffers = dict(d.named_buffers())
                with torch.no_grad():
                    for n, saved in entry.get("buffers", {}).items():
                        if n in buffers:
                            buffers[n].copy_(saved)
            if "extra" in entry:
                d.load_extra_state(entry["extra"])


def build_front(
    specs: Sequence[dict[str, Any]] | None,
    model: Any = None,
    seed: int = 0,
    *,
    tokenizer: Any = None,
    **context: Any,
) -> DataFront:
    """The front of a run's ``defenses:`` list (each ``{name: ..., <params>}``), validated by the registry.

    ``model`` (its config's ``hidden_size``) and ``context`` fill the parameters a defense takes
    from the model; with a ``model``, each defense's :meth:`Defense.setup` then reads what it needs
    from it and ``tokenizer``. Defenses initialize from their own random stream (``seed``), so
    building them never shifts the parties' initialization: every process of a run builds the same.
    """
    from splitfed.privacy.defenses import build_defense

    if model is not None:
        context.setdefault("hidden_size", int(model.config.hidden_size))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7919)
        defenses = [build_defense(dict(spec), **context) for spec in specs or ()]
        if model is not None:
            resources = FrontResources(model, tokenizer, seed)
            for d in defenses:
                if _overrides(d, "setup"):
                    d.setup(resources)
        return DataFront(defenses)
