"""What every attack shares: what it needs, what it is given, what it returns.

An attack sees only what the model party received (:class:`Observation`: the recorded tensors of
one batch) and the public knowledge in an :class:`AttackContext` (the public pretrained weights,
their tokenizer, auxiliary text disjoint from the victim's). It returns predictions; the runner
(:mod:`splitfed.privacy.attacks.runner`) scores them against the data party's ground truth, which
an attack never reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel
from torch import nn

from splitfed.protocol import KINDS

Target = Literal["tokens", "labels"]


class AttackError(ValueError):
    """An attack that cannot run on what it was given (missing tensors, public model or auxiliary text)."""


@dataclass(frozen=True)
class Need:
    """One recorded tensor an attack reads: tensor ``tensor`` of messages of kind ``kind``.

    The direction (what the model party received, or what it sent) follows from the kind, as
    :data:`splitfed.protocol.KINDS` declares it. An unknown kind or tensor is refused here, so an
    attack's declaration cannot drift from the protocol.
    """

    kind: str
    tensor: str
    required: bool = True

    def __post_init__(self) -> None:
        declared = KINDS.get(self.kind)
        if declared is None:
            raise AttackError(f"unknown message kind {self.kind!r}; kinds: {sorted(KINDS)}")
        if declared.tensor(self.tensor) is None:
            raise AttackError(
                f"a {self.kind} message carries no tensor {self.tensor!r}; it carries "
                f"{[t.name for t in declared.tensors]}"
            )

    @property
    def direction(self) -> str:
        """``"to_model"`` or ``"to_data"``."""
        return KINDS[self.kind].direction


@dataclass
class Observation:
    """What the model party saw of one batch: the recorded tensors of each kind it needs.

    Attributes
    ----------
    client : str
    batch_id : int
    phase : str
        ``"train"`` or ``"eval"``.
    step : int
    tensors : dict[tuple[str, str], torch.Tensor]
        ``(kind, tensor name)`` to the tensor as it crossed.
    """

    client: str
    batch_id: int
    phase: str
    step: int
    tensors: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, key: tuple[str, str]) -> torch.Tensor:
        if key not in self.tensors:
            raise KeyError(
                f"batch {self.batch_id} has no recorded {key[0]}.{key[1]}; it has "
                f"{['.'.join(k) for k in self.tensors]}"
            )
        return self.tensors[key]

    def get(self, kind: str, tensor: str) -> torch.Tensor | None:
        """The tensor ``tensor`` of this batch's ``kind`` message, or ``None`` if not recorded."""
        return self.tensors.get((kind, tensor))


@dataclass
class AttackContext:
    """Public knowledge an attacker has besides the recording.

    Parameters
    ----------
    model : nn.Module | None, default None
        The public pretrained model (whole, before fine-tuning); it is frozen and put in eval mode.
    tokenizer : Any, default None
        Its tokenizer (tokenizes auxiliary text, decodes reconstructions).
    auxiliary_texts : Sequence[str], default ()
        Text the attacker owns, disjoint from the victim's data (learning-based attacks train on it).
    head_layers : int | None, default None
        Blocks of the data party's head; ``None`` reads it from the recording.
    tail_layers : int | None, default None
        Blocks of the data party's tail in HBT (the model party knows where its body ends; the
        recording does not say). Attacks that run the public tail need it.
    device : str, default "cpu"
    seed : int, default 0
    max_examples : int | None, default None
        Attack at most this many recorded sequences (the first ones).
    aux_max_length : int, default 64
        Token length auxiliary texts are cut to.
    aux_eos : bool, default True
        End every auxiliary sequence with the EOS token, as splitfed's collators end examples.
    progress : bool, default False
        Show progress bars.
    ground_truth : str | Path | None, default None
        Where the data party's ground truth is when it is not the recording's ``ground_truth/``
        (a ``serve --record`` recording is scored by the ``join --record`` ground truth).
    """

    model: nn.Module | None = None
    tokenizer: Any = None
    auxiliary_texts: Sequence[str] = ()
    head_layers: int | None = None
    tail_layers: int | None = None
    device: str = "cpu"
    seed: int = 0
    max_examples: int | None = None
    aux_max_length: int = 64
    aux_eos: bool = True
    progress: bool = False
    ground_truth: str | Path | None = None
    #: Fitted things several attacks share (public head, auxiliary activations, the linear baseline).
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.model is not None:
            self.model.eval()
            self.model.to(self.device)
            for p in self.model.parameters():
                p.requires_grad_(False)

    def require_model(self, attack: str) -> nn.Module:
        """The public model, or an :class:`AttackError` saying that ``attack`` needs it."""
        if self.model is None:
            raise AttackError(
                f"attack {attack!r} needs the public pretrained model: pass AttackContext(model=...)"
            )
        return self.model

    def public_head(self) -> Any:
        """The data party's head as the public weights give it: embeddings + first ``head_layers`` blocks.

        A frozen :class:`~splitfed.models.partition.Segment` over :attr:`model` (not a copy).
        """
        from splitfed.models.families import family_for
        from splitfed.models.partition import Segment

        model = self.require_model("public_head")
        if self.head_layers is None:
            raise AttackError("the head's depth is unknown: set AttackContext.head_layers")
        key = ("public_head", self.head_layers)
        if key not in self.cache:
            adapter = family_for(model.config)
            n = adapter.num_layers(model)
            if not 0 <= self.head_layers < n:
                raise AttackError(
                    f"head_layers={self.head_layers} does not fit the public model, which has {n} layers"
                )
            self.cache[key] = Segment(
                "head", model, adapter, 0, self.head_layers, embed=True, finish=False, task_head="causal_lm"
            ).eval()
        return self.cache[key]

    def public_tail(self) -> Any:
        """The data party's HBT tail as the public weights give it, up to its final norm.

        A frozen :class:`~splitfed.models.partition.Segment` of the last ``tail_layers`` blocks of
        :attr:`model` (not a copy; no final norm or task head: :meth:`public_finish` gives them).
        """
        from splitfed.models.families import family_for
        from splitfed.models.partition import Segment

        model = self.require_model("public_tail")
        if self.tail_layers is None:
            raise AttackError(
                "the tail's depth is unknown: set AttackContext.tail_layers (the run's split.tail_layers)"
            )
        key = ("public_tail", self.tail_layers)
        if key not in self.cache:
            adapter = family_for(model.config)
            n = adapter.num_layers(model)
            if not 0 <= self.tail_layers < n:
                raise AttackError(
                    f"tail_layers={self.tail_layers} does not fit the public model, which has {n} layers"
                )
            self.cache[key] = Segment(
                "tail",
                model,
                adapter,
                n - self.tail_layers,
                n,
                embed=False,
                finish=False,
                task_head="causal_lm",
            ).eval()
        return self.cache[key]

    def public_finish(self) -> tuple[nn.Module, nn.Module]:
        """The public causal LM's final norm and its LM head (the output embedding), in that order."""
        from splitfed.models.families import family_for

        model = self.require_model("public_finish")
        if getattr(model, "lm_head", None) is None:
            raise AttackError(
                f"the public model {type(model).__name__} has no LM head: a classifier's task head is "
                "the data party's own (initialised and trained there, never public)"
            )
        modules = dict(family_for(model.config).finish_modules(model, "causal_lm"))
        head = modules.pop("lm_head")
        (norm,) = modules.values()
        return norm, head

    def embedding_matrix(self) -> torch.Tensor:
        """The public token embedding table ``[vocab, hidden]`` as :meth:`soft_embeddings` scales it."""
        head = self.public_head()
        layer = head.family.token_embedding_layer(head.model)
        scale = getattr(layer, "embed_scale", None)  # Gemma scales inside its embedding module
        weight = layer.weight.detach()
        return weight * scale.to(weight.dtype) if isinstance(scale, torch.Tensor) else weight

    def soft_embeddings(self, weights: torch.Tensor) -> torch.Tensor:
        """``inputs_embeds`` of soft tokens ``weights [..., vocab]`` for the public head."""
        head = self.public_head()
        return head.family.soft_embeddings(head.model, weights)  # type: ignore[no-any-return]

    def auxiliary(self, batch_size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The auxiliary texts through the public head: ``(input_ids, attention_mask, hidden)`` batches.

        Computed once per context and head depth (learning-based attacks and the baseline share it).
        """
        key = ("auxiliary", self.head_layers, batch_size)
        if key in self.cache:
            return self.cache[key]  # type: ignore[no-any-return]
        if not self.auxiliary_texts:
            raise AttackError(
                "this attack learns from auxiliary text: pass AttackContext(auxiliary_texts=[...]) "
                "(text the attacker owns, disjoint from the victim's data)"
            )
        if self.tokenizer is None:
            raise AttackError("auxiliary text needs a tokenizer: pass AttackContext(tokenizer=...)")
        head = self.public_head()
        eos = getattr(self.tokenizer, "eos_token_id", None) if self.aux_eos else None
        pad = getattr(self.tokenizer, "pad_token_id", None)
        pad = (eos if eos is not None else 0) if pad is None else pad
        rows = []
        for text in self.auxiliary_texts:
            ids = list(self.tokenizer(text, truncation=True, max_length=self.aux_max_length)["input_ids"])
            if eos is not None and (not ids or ids[-1] != eos):
                ids = [*ids[: self.aux_max_length - 1], eos]
            if ids:
                rows.append(ids)
        out: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                part = rows[start : start + batch_size]
                width = max(len(r) for r in part)
                batch = torch.tensor([r + [pad] * (width - len(r)) for r in part], device=self.device)
                mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in part], device=self.device)
                hidden = head(input_ids=batch, attention_mask=mask)
                out.append((batch, mask, hidden.float()))
        self.cache[key] = out
        return out

    def bar(self, iterable: Iterable[Any], *, desc: str, total: int | None = None) -> Iterator[Any]:
        """``iterable`` with a tqdm progress bar when :attr:`progress` is set."""
        if not self.progress:
            yield from iterable
            return
        from tqdm.auto import tqdm

        yield from tqdm(iterable, desc=desc, total=total, leave=False)


@dataclass
class Reconstruction:
    """One example of what an attack recovered, next to the original."""

    original: str
    reconstructed: str


@dataclass
class AttackResult:
    """An attack's scores on one recording.

    Attributes
    ----------
    attack : str
    metrics : dict[str, float]
        The attack's scores (``token_f1``, ``token_accuracy``, ... or ``label_accuracy``, ...).
    baseline : dict[str, float]
        The same scores of the linear baseline on the same examples (inversion attacks; empty otherwise).
    control : dict[str, float]
        The same scores of the attack on its noise control: the same batches with every intercepted
        tensor replaced by noise of its shape and scale (empty unless the runner was asked for it).
    chance : float
        Chance level of the attack's main score: token attacks, the token F1 of a guess that knows
        only the token frequencies (:func:`~splitfed.privacy.attacks.metrics.token_f1_chance`);
        label attacks, the majority class share.
    n_examples : int
        Sequences (token attacks) or labels (label attacks) scored.
    seconds : float
        Wall time of the attack (fitting and inverting), excluding reading and scoring.
    examples : list[Reconstruction]
        A few reconstructions beside their originals.
    params : dict[str, Any]
        The attack's parameters.
    """

    attack: str
    metrics: dict[str, float]
    baseline: dict[str, float] = field(default_factory=dict)
    control: dict[str, float] = field(default_factory=dict)
    chance: float = 0.0
    n_examples: int = 0
    seconds: float = 0.0
    examples: list[Reconstruction] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """A JSON-ready dictionary of the result."""
        return {
            "attack": self.attack,
            "metrics": self.metrics,
            "baseline": self.baseline,
            "control": self.control,
            "chance": self.chance,
            "n_examples": self.n_examples,
            "seconds": self.seconds,
            "params": self.params,
            "examples": [{"original": e.original, "reconstructed": e.reconstructed} for e in self.examples],
        }


class Attack:
    """Base class of the attacks: a name, what it needs, and :meth:`run`.

    Subclasses set the class attributes and implement :meth:`run`, which maps the observations
    to predictions, one tensor per observation: token ids ``[batch, seq]`` for ``target =
    "tokens"`` (the batch's inputs), labels for ``target = "labels"`` (shaped as the batch's
    labels, ``-100`` where it does not guess). Parameters are keyword arguments validated by a
    pydantic ``Params`` model (see :func:`splitfed.privacy.attacks.build_attack`).
    """

    #: Registry name.
    name: ClassVar[str] = "base"
    #: What it recovers: the inputs' tokens or the labels.
    target: ClassVar[Target] = "tokens"
    #: The recorded tensors it reads.
    needs: ClassVar[tuple[Need, ...]] = ()
    #: Whether it needs the public pretrained model and auxiliary text.
    needs_public_model: ClassVar[bool] = False
    needs_auxiliary: ClassVar[bool] = False
    #: Labels of this many examples per class the attacker is assumed to know (scored apart).
    #: (An attack that takes ``known_per_class`` as a parameter sets it in its constructor.)
    known_per_class: int = 0
    #: Whether the runner scores the linear baseline beside it (every inversion attack does).
    reports_baseline: ClassVar[bool] = False
    #: Label attacks that infer one label per sequence (a classification task): the runner
    #: refuses a run whose labels are per position (a causal LM's next tokens).
    sequence_labels: ClassVar[bool] = False
    #: Binary label attacks: each observation's score of class 1 in the last run (the runner's AUC).
    positive_scores: list[torch.Tensor] | None = None

    def params(self) -> dict[str, Any]:
        """The attack's parameters (what its pydantic ``Params`` model validated)."""
        model: type[BaseModel] | None = getattr(type(self), "Params", None)
        fields = model.model_fields if model is not None else {}
        return {name: getattr(self, name) for name in fields if hasattr(self, name)}

    def run(
        self,
        observations: Sequence[Observation],
        context: AttackContext,
        known: Mapping[int, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Predictions for every observation (see the class docstring).

        ``known`` maps an observation's index to labels the attacker knows (``-100`` elsewhere),
        given only to attacks with :attr:`known_per_class` > 0.
        """
        raise NotImplementedError


# ---------------------------------------------------------------------- helpers of the token attacks


def stack_activations(
    observations: Sequence[Observation],
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, int]]]:
    """Every recorded forward's sequences as one right-padded batch.

    Returns ``hidden [n, seq, width]`` (float32), ``mask [n, seq]`` and, per observation, its
    ``(first row, rows, seq)`` so that :func:`unstack` gives each batch its predictions back.
    """
    hiddens, masks, places = [], [], []
    row = 0
    for obs in observations:
        hidden, mask = obs["forward", "hidden"].float(), obs["forward", "attention_mask"]
        hiddens.append(hidden)
        masks.append(mask)
        places.append((row, hidden.shape[0], hidden.shape[1]))
        row += hidden.shape[0]
    if not hiddens:
        raise AttackError("no recorded forward activations to attack")
    seq = max(h.shape[1] for h in hiddens)
    hidden = torch.cat([nn.functional.pad(h, (0, 0, 0, seq - h.shape[1])) for h in hiddens])
    mask = torch.cat([nn.functional.pad(m.long(), (0, seq - m.shape[1])) for m in masks])
    return hidden, mask, places


def unstack(tokens: torch.Tensor, places: Sequence[tuple[int, int, int]]) -> list[torch.Tensor]:
    """Per-observation predictions from :func:`stack_activations`'s batch."""
    return [tokens[row : row + rows, :seq].cpu() for row, rows, seq in places]


def chunks(n: int, size: int) -> list[slice]:
    """``range(n)`` in slices of at most ``size``."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def nearest_tokens(inputs_embeds: torch.Tensor, embeddings: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """The token whose embedding is nearest (cosine) to each vector of ``inputs_embeds [..., width]``."""
    flat = nn.functional.normalize(inputs_embeds.reshape(-1, inputs_embeds.shape[-1]).float(), dim=-1)
    table = nn.functional.normalize(embeddings.float(), dim=-1)
    out = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
    for part in chunks(flat.shape[0], chunk):
        out[part] = (flat[part] @ table.T).argmax(-1)
    return out.reshape(inputs_embeds.shape[:-1])


def head_loss(
    produced: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, cosine: float = 0.0
) -> torch.Tensor:
    """Distance of the public head's output to the intercepted activations, over real tokens.

    Mean squared error normalised by the target's mean square (so one learning rate fits every
    model width and scale), plus ``cosine`` times the mean cosine distance.
    """
    weight = mask.to(produced.dtype).unsqueeze(-1)
    count = weight.sum().clamp(min=1.0)
    scale = (target.pow(2) * weight).sum() / (count * target.shape[-1])
    mse = ((produced - target).pow(2) * weight).sum() / (count * target.shape[-1] * scale.clamp(min=1e-12))
    if cosine <= 0:
        return mse
    cos = nn.functional.cosine_similarity(produced, target, dim=-1)
    return mse + cosine * ((1 - cos) * weight.squeeze(-1)).sum() / count
