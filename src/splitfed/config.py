"""Configuration of a splitfed run: pydantic models of the YAML files, the one place defaults live.

Unknown keys and bad values are errors that name the key and the allowed values
(:class:`ConfigError`). ``--set key.sub=value`` overrides are applied to the raw YAML before
validation, so they are checked exactly like the file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from splitfed.models.partition import FinetuneSpec, SplitConfigError, SplitSpec
from splitfed.split.parties import OptimSpec
from splitfed.transport.wire import ActivationCodec, GradientCodec

TaskName = Literal["classification", "causal_lm", "generative_qa", "multiple_choice", "span_qa"]


class ConfigError(ValueError):
    """A configuration file or override that is not valid; the message says where and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """Which model to split.

    ``name`` is an offline asset (``smollm2-135m``, ``minilm-l6``; see ``splitfed assets list``),
    a local directory with a transformers model, or a hub id (needs network). ``num_labels`` is
    needed by a model party served on its own (it sees no data to count the classes).
    """

    name: str = "smollm2-135m"
    num_labels: int | None = Field(default=None, ge=2)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"


class DataConfig(_Strict):
    """Which data and how much of it.

    ``name`` is a registered dataset (``fortunes-topic``, ``shakespeare``, ``glue/sst2``, ...) or
    ``local`` with ``path`` to a CSV/JSON/JSONL/Parquet file and ``columns`` mapping the task's
    fields to the file's columns.

    With ``num_parties`` > 1 the training split is partitioned across data parties
    (``partition``: ``iid``, ``dirichlet:ALPHA`` label skew, ``quantity:ALPHA`` size skew) and this
    party trains on share ``party_index``; validation and test stay whole. ``eval_split`` is the
    split evaluated before and after fine-tuning.
    """

    name: str = "fortunes-topic"
    path: str | None = None
    columns: dict[str, str] = Field(default_factory=dict)
    task: TaskName | None = None
    max_train: int | None = Field(default=None, ge=1)
    max_eval: int | None = Field(default=200, ge=1)
    max_length: int = Field(default=64, ge=4, le=8192)
    seed: int = 0
    eval_split: Literal["validation", "test"] = "validation"
    partition: str = "iid"
    num_parties: int = Field(default=1, ge=1)
    party_index: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _party_in_range(self) -> DataConfig:
        if self.party_index >= self.num_parties:
            raise ValueError(
                f"data.party_index={self.party_index} must be below data.num_parties={self.num_parties}"
            )
        from splitfed.data.partition import PartitionError, parse_partition

        try:
            parse_partition(self.partition)
        except PartitionError as err:
            raise ValueError(str(err)) from None
        return self


class SplitConfig(_Strict):
    """Where to cut and where the loss is computed (see :class:`splitfed.models.partition.SplitSpec`).

    ``head_layers: 0`` keeps only the embeddings on the data party, so raw token embeddings cross
    and the model party can read back every token id; it needs ``allow_raw_embeddings: true``.
    """

    setting: Literal["ht", "hbt"] = "ht"
    head_layers: int = Field(default=2, ge=0)
    tail_layers: int = Field(default=0, ge=0)
    labels_at: Literal["data", "model"] = "data"
    allow_raw_embeddings: bool = False

    @model_validator(mode="after")
    def _raw_embeddings_opted_in(self) -> SplitConfig:
        try:
            self.spec().check_raw_embeddings()
        except SplitConfigError as err:  # a custom error type: shown without pydantic's "Value error, "
            raise PydanticCustomError("raw_embeddings", str(err)) from None
        return self

    def spec(self) -> SplitSpec:
        """As the partitioner's spec."""
        return SplitSpec(
            self.setting, self.head_layers, self.tail_layers, allow_raw_embeddings=self.allow_raw_embeddings
        )


class SegmentFinetune(_Strict):
    """How one segment trains: ``frozen``, ``lora`` (peft) or ``full``."""

    mode: Literal["frozen", "lora", "full"] = "lora"
    r: int = Field(default=8, ge=1)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] | None = None

    def spec(self) -> FinetuneSpec:
        """As the partitioner's spec."""
        targets = tuple(self.target_modules) if self.target_modules else None
        return FinetuneSpec(self.mode, self.r, self.alpha, self.dropout, targets)


class FinetuneConfig(_Strict):
    """Per-segment fine-tuning; a segment left out follows the run's ``mode`` preset.

    ``body_adapters``: with several data parties, the model party trains one set of adapters
    ``shared`` by all (SplitLoRA / SplitFrozen) or one ``per_party`` (each data party gets its
    own model-party adapters; the frozen base weights still exist once).
    """

    head: SegmentFinetune | None = None
    body: SegmentFinetune | None = None
    tail: SegmentFinetune | None = None
    body_adapters: Literal["shared", "per_party"] = "shared"


class TransportConfig(_Strict):
    """Compression on the wire (gRPC runtime), per direction.

    ``activations`` applies to hidden states and logits, ``gradients`` to gradients; ``topk`` keeps
    the largest ``topk_ratio`` share of each gradient with error feedback.
    """

    activations: ActivationCodec = "fp32"
    gradients: GradientCodec = "fp32"
    topk_ratio: float = Field(default=0.1, gt=0, le=1)


class TrainConfig(_Strict):
    """Optimisation, schedule and evaluation.

    ``steps`` counts optimizer updates; ``epochs`` is used when steps is unset.
    ``eval_max_new_tokens`` bounds the answers generated to score generative QA (0: skip).
    ``fedavg_every: K`` federated-averages the data parties' adapters every K steps through the
    model party, weighted by their training samples (SplitLoRA; 0: never), through
    ``fedavg_aggregation``: ``plain`` (the model party sees each party's adapters), ``ckks`` (each
    party encrypts them; the data party with ``data.party_index`` 0 deals the keys and the model
    party adds ciphertexts it cannot read) or ``secagg`` (pairwise masks; the model party learns only
    the sum). The model party (``splitfed serve``) must use the same setting.

    ``schedule``: ``sequential`` sends one micro-batch and waits for its replies; ``pipelined``
    keeps up to ``pipeline_depth`` micro-batches of one optimizer step (``grad_accum``) in flight,
    hiding network latency behind the model party's work with results equal to sequential;
    ``forward-only`` (SplitFrozen, HT, labels at the model party) streams activations ahead across
    optimizer steps, since the frozen head needs nothing back.

    ``cache_head_outputs`` (frozen head only): the data party computes each training example's
    head output once and reuses it in later epochs (the head runs in eval mode); its device
    compute over E epochs falls to 1/E, at the memory cost of one hidden state per training token.
    """

    steps: int | None = Field(default=None, ge=1)
    epochs: float = Field(default=1.0, gt=0)
    batch_size: int = Field(default=8, ge=1)
    eval_batch_size: int | None = Field(default=None, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(default=2e-4, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    scheduler: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: int = Field(default=0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    seed: int = 0
    eval_before: bool = True
    eval_every: int = Field(default=0, ge=0)
    eval_max_new_tokens: int = Field(default=48, ge=0)
    fedavg_every: int = Field(default=0, ge=0)
    fedavg_aggregation: Literal["plain", "ckks", "secagg"] = "plain"
    checkpoint_every: int = Field(default=0, ge=0)
    threads: int | None = Field(default=None, ge=1)
    schedule: Literal["sequential", "pipelined", "forward-only"] = "sequential"
    pipeline_depth: int = Field(default=4, ge=1)
    cache_head_outputs: bool = False

    @property
    def window(self) -> int:
        """Micro-batches in flight per data party under this schedule."""
        return 1 if self.schedule == "sequential" else self.pipeline_depth


class CKKSOptions(_Strict):
    """Parameters of ``federated.aggregation: ckks`` (see
    :class:`splitfed.federated.aggregators.CKKSAggregator`); a key left unset keeps that class's
    default (128-bit secure)."""

    poly_modulus_degree: int | None = None
    coeff_mod_bit_sizes: list[int] | None = None
    scale_bits: int | None = None
    max_clients: int | None = Field(default=None, ge=1)


class SecAggOptions(_Strict):
    """Parameters of ``federated.aggregation: secagg`` (see
    :class:`splitfed.federated.aggregators.SecAggAggregator`); a key left unset keeps that class's
    default, except ``max_weight``, which defaults to the largest client's number of examples."""

    modulus_bits: Literal[32, 64] | None = None
    clip_range: float | None = Field(default=None, gt=0)
    max_weight: float | None = Field(default=None, gt=0)
    max_clients: int | None = Field(default=None, ge=2)
    scale_bits: int | None = Field(default=None, ge=8)
    threshold: int | None = Field(default=None, ge=1)
    rounding: Literal["stochastic", "nearest"] | None = None


class ClientDPOptions(_Strict):
    """Client-level DP of ``splitfed fedtrain`` (DP-FedAvg with distributed Gaussian noise; see
    :mod:`splitfed.federated.client_dp`): each client's update is clipped to L2 norm ``clip``,
    updates are averaged uniformly, and the round's sum carries ``N(0, (noise_multiplier·clip)²)``
    noise, added by the clients in shares; ε at ``delta`` is reported every round."""

    clip: float = Field(gt=0, description="L2 bound of one client's whole update")
    noise_multiplier: float = Field(ge=0, description="noise std on the round's sum, in units of clip")
    delta: float = Field(default=1e-5, gt=0, lt=1)


class PruningOptions(_Strict):
    """Magnitude pruning of the clients' deltas with FedShield-LLM's schedule (Mia et al., 2025; see
    :mod:`splitfed.federated.aggregators.pruning`), in ``splitfed fedtrain``.

    No pruning before round ``start_round``; from it on, the fraction of values zeroed grows
    linearly from ``start_ratio`` to ``end_ratio``, reached in the last round
    (:func:`~splitfed.federated.aggregators.pruning.prune_ratio`). ``mode``:

    * ``per_client`` (FedShield's): each client keeps its own largest-magnitude values and zeros
      the rest; the update stays dense (the zeros fill ciphertext slots), so bytes do not shrink.
    * ``shared``: every client derives the same mask from the global adapters of the round (their
      largest magnitudes, tensor by tensor), and only the kept values are encoded and sent (bytes
      and CKKS ciphertexts shrink by about the keep ratio); the pruned coordinates of the average
      are 0 (the global adapters keep them). It starts at round 2 or later: before round 1's
      update the global LoRA B matrices are all zero, and a mask ranked on zeros is arbitrary.

    Under ``federated.dp`` the client prunes first, then clips and adds its noise share (over the
    whole update in ``per_client`` mode, so the zeros get noise too; over the kept values only in
    ``shared`` mode, whose mask is public).
    """

    mode: Literal["per_client", "shared"]
    start_round: int = Field(default=2, ge=1, description="first pruned round (rounds count from 1)")
    start_ratio: float = Field(default=0.0, ge=0, lt=1, description="fraction zeroed in start_round")
    end_ratio: float = Field(ge=0, lt=1, description="fraction zeroed in the last round")

    @model_validator(mode="after")
    def _ordered(self) -> PruningOptions:
        if self.end_ratio < self.start_ratio:
            raise _federated_error(
                f"federated.pruning: end_ratio={self.end_ratio} is below start_ratio={self.start_ratio}; the "
                "schedule only grows (set end_ratio >= start_ratio)"
            )
        if self.mode == "shared" and self.start_round < 2:
            raise _federated_error(
                f"federated.pruning: mode shared ranks the global adapters for its mask, and their LoRA B "
                f"matrices are all zero before round 1's update (a mask ranked on zeros is arbitrary); "
                f"set start_round >= 2 (got {self.start_round})"
            )
        return self


class FederatedConfig(_Strict):
    """Federated LoRA fine-tuning (``splitfed fedtrain CONFIG.yaml``), simulated in one process.

    ``clients`` clients share the training split (``partition``: ``iid``, ``dirichlet:ALPHA`` label
    skew, ``quantity:ALPHA`` size skew); each of ``rounds`` rounds samples
    ``max(min_clients, floor(sample_fraction * clients))`` of them, which run ``local_steps``
    optimizer steps (or ``local_epochs`` passes; give one of the two) from the global adapters.
    Their deltas are averaged, weighted by their numbers of examples, through ``aggregation``
    (``none``/``plain`` in the clear, ``ckks`` encrypted, ``secagg`` masked), and ``strategy``
    applies the average: ``fedavg``, ``fedprox`` (needs ``proximal_mu``), ``fedadam`` or
    ``fedyogi`` (a server optimizer: ``server_lr``, ``beta1``, ``beta2``, ``tau``). Strategy keys left
    unset keep the strategy class's defaults (:mod:`splitfed.federated.strategies`).

    The clients train LoRA as ``finetune`` says (on the whole model, plus a fresh task head), with
    ``train.optimizer``, ``train.lr``, ``train.weight_decay``, ``train.max_grad_norm`` and
    ``train.batch_size``; the learning rate is constant within a round. ``eval_every`` and
    ``checkpoint_every`` count rounds (0: never; the last round is always evaluated). ``dp``
    (:class:`ClientDPOptions`) makes the rounds client-level differentially private. ``pruning``
    (:class:`PruningOptions`: ``mode`` ``per_client`` or ``shared``, ``start_round``,
    ``start_ratio``, ``end_ratio``) prunes the deltas by magnitude on FedShield-LLM's schedule;
    ``shared`` sends only the kept values.
    """

    clients: int = Field(default=8, ge=1)
    partition: str = "iid"
    rounds: int = Field(default=10, ge=1)
    local_steps: int | None = Field(default=10, ge=1)
    local_epochs: float | None = Field(default=None, gt=0)
    sample_fraction: float = Field(default=1.0, gt=0, le=1)
    min_clients: int = Field(default=1, ge=1)
    strategy: Literal["fedavg", "fedprox", "fedadam", "fedyogi"] = "fedavg"
    proximal_mu: float | None = Field(default=None, ge=0)
    server_lr: float | None = Field(default=None, gt=0)
    beta1: float | None = Field(default=None, ge=0, lt=1)
    beta2: float | None = Field(default=None, ge=0, lt=1)
    tau: float | None = Field(default=None, gt=0)
    aggregation: Literal["none", "plain", "ckks", "secagg"] = "plain"
    ckks: CKKSOptions = Field(default_factory=CKKSOptions)
    secagg: SecAggOptions = Field(default_factory=SecAggOptions)
    dp: ClientDPOptions | None = None
    pruning: PruningOptions | None = None
    finetune: SegmentFinetune = Field(default_factory=SegmentFinetune)
    eval_every: int = Field(default=0, ge=0)
    checkpoint_every: int = Field(default=0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _epochs_replace_steps(cls, raw: Any) -> Any:
        # local_epochs given without local_steps: the epochs replace the default number of steps
        if isinstance(raw, dict) and raw.get("local_epochs") is not None and "local_steps" not in raw:
            return {**raw, "local_steps": None}
        return raw

    @property
    def clients_per_round(self) -> int:
        """Clients sampled each round: ``max(min_clients, floor(sample_fraction * clients))``."""
        return max(self.min_clients, math.floor(self.sample_fraction * self.clients + 1e-9))

    def strategy_kwargs(self) -> dict[str, float]:
        """Keyword arguments of the strategy class: only the keys this config sets."""
        if self.strategy in ("fedadam", "fedyogi"):
            names = {"server_lr": "eta", "beta1": "beta_1", "beta2": "beta_2", "tau": "tau"}
        else:
            names = {"server_lr": "server_lr", "proximal_mu": "proximal_mu"}
        return {arg: getattr(self, key) for key, arg in names.items() if getattr(self, key) is not None}

    def aggregator_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the aggregator class: only the keys this config sets."""
        options: _Strict | None = {"ckks": self.ckks, "secagg": self.secagg}.get(self.aggregation)
        if options is None:
            return {}
        kwargs = options.model_dump(exclude_none=True)
        if "coeff_mod_bit_sizes" in kwargs:
            kwargs["coeff_mod_bit_sizes"] = tuple(kwargs["coeff_mod_bit_sizes"])
        return kwargs

    @model_validator(mode="after")
    def _consistent(self) -> FederatedConfig:
        from splitfed.data.partition import PartitionError, parse_partition
        from splitfed.federated.aggregators import AGGREGATORS
        from splitfed.federated.strategies import STRATEGIES

        try:
            parse_partition(self.partition)
        except PartitionError as err:
            raise _federated_error(f"federated.partition: {err}") from None
        if self.local_steps is not None and self.local_epochs is not None:
            raise _federated_error(
                "federated.local_steps and federated.local_epochs are both set; give one of them"
            )
        if self.local_steps is None and self.local_epochs is None:
            raise _federated_error("give federated.local_steps or federated.local_epochs")
        if self.finetune.mode != "lora":
            raise _federated_error(
                f"federated.finetune.mode must be lora (clients train LoRA adapters), got {self.finetune.mode!r}"
            )
        if self.min_clients > self.clients:
            raise _federated_error(
                f"federated.min_clients={self.min_clients} exceeds federated.clients={self.clients}"
            )
        if self.strategy == "fedprox" and self.proximal_mu is None:
            raise _federated_error("federated.strategy: fedprox needs federated.proximal_mu (e.g. 0.01)")
        if self.strategy != "fedprox" and self.proximal_mu is not None:
            raise _federated_error(
                f"federated.proximal_mu is FedProx's; strategy {self.strategy} does not use it (remove it)"
            )
        unused = [k for k in ("beta1", "beta2", "tau") if getattr(self, k) is not None]
        if unused and self.strategy not in ("fedadam", "fedyogi"):
            raise _federated_error(
                f"federated.{unused[0]} is a server-optimizer setting of fedadam and fedyogi; strategy "
                f"{self.strategy} does not use it (remove it)"
            )
        try:
            STRATEGIES[self.strategy](**self.strategy_kwargs())  # type: ignore[arg-type]
        except ValueError as err:
            raise _federated_error(f"federated: {err}") from None
        if STRATEGIES[self.strategy].server_state and self.aggregation == "ckks":
            raise _federated_error(
                f"federated.strategy: {self.strategy} keeps a server optimizer over the averaged update, "
                "which the server cannot read under aggregation ckks (only the clients can decrypt it); "
                "use aggregation secagg (the server learns only the sum) or plain, or strategy fedavg "
                "or fedprox"
            )
        try:
            aggregator = AGGREGATORS[self.aggregation](**self.aggregator_kwargs())
        except (TypeError, ValueError) as err:
            raise _federated_error(f"federated.{self.aggregation}: {err}") from None
        per_round = self.clients_per_round
        most = getattr(aggregator, "max_clients", None)
        if most is not None and per_round > most:
            raise _federated_error(
                f"federated: {per_round} clients per round exceed federated.{self.aggregation}.max_clients="
                f"{most}; lower federated.sample_fraction or raise max_clients"
            )
        if self.pruning is not None and self.pruning.start_round > self.rounds:
            raise _federated_error(
                f"federated.pruning.start_round={self.pruning.start_round} is after the last round "
                f"(federated.rounds={self.rounds}), so no round would be pruned; lower start_round or "
                "remove federated.pruning"
            )
        if self.aggregation == "secagg":
            threshold = self.secagg.threshold or per_round // 2 + 1
            if per_round < 2 or not per_round / 2 < threshold <= per_round:
                raise _federated_error(
                    f"federated.aggregation: secagg needs at least 2 clients per round and a threshold above "
                    f"half of them (got {per_round} clients per round, federated.secagg.threshold={threshold})"
                )
        return self


def _federated_error(message: str) -> PydanticCustomError:
    # a custom error type: shown without pydantic's "Value error, " (the message names the key)
    return PydanticCustomError("federated", message)


class RunConfig(_Strict):
    """A whole split fine-tuning run (``splitfed train CONFIG.yaml``).

    ``mode`` presets the per-segment fine-tuning: ``splitlora`` (VFLAIR-LLM / SplitLoRA: LoRA on
    every segment), ``splitfrozen`` (the data party's head frozen and forward-only, LoRA on the
    model party and on the HBT tail). Explicit ``finetune.<segment>`` entries override the preset.
    """

    name: str = "run"
    task: TaskName = "classification"
    mode: Literal["splitlora", "splitfrozen"] = "splitlora"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    transport: TransportConfig = Field(default_factory=TransportConfig)
    #: Federated LoRA fine-tuning (``splitfed fedtrain``); ``None`` for split runs.
    federated: FederatedConfig | None = None
    #: The data party's defenses, applied in order to what it sends: ``[{name: ..., <params>}]``
    #: (``splitfed defenses`` lists them).
    defenses: list[dict[str, Any]] = Field(default_factory=list)
    output_dir: str = "runs/run"

    @field_validator("defenses")
    @classmethod
    def _known_defenses(cls, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from splitfed.split.front import build_front

        # Names and parameters; the width and the sampling rate come from the model and the data.
        build_front(specs, hidden_size=8, sample_rate=0.01)
        return specs

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.split.setting == "hbt" and self.split.labels_at == "model":
            raise ValueError(
                "split.labels_at: model is only for split.setting: ht (in HBT the data party holds the loss)"
            )
        if self.split.setting == "ht" and self.split.tail_layers:
            raise ValueError("split.tail_layers is only for split.setting: hbt")
        if self.split.setting == "hbt" and self.split.tail_layers < 1:
            raise ValueError("split.setting: hbt needs split.tail_layers >= 1")
        if self.train.cache_head_outputs and self.segment_finetune()["head"].mode != "frozen":
            raise ValueError(
                "train.cache_head_outputs needs a frozen data-party head (mode: splitfrozen or "
                "finetune.head.mode: frozen): a training head's outputs change every step"
            )
        if self.defenses:
            from splitfed.split.front import build_front

            front = build_front(self.defenses, hidden_size=8, sample_rate=0.01)
            front.check_tail(self.split.setting == "hbt")
            if self.train.schedule == "forward-only" and front.trains:
                raise ValueError(
                    "train.schedule: forward-only cannot train a defense (it needs gradients back); "
                    "use train.schedule: pipelined"
                )
        if self.train.schedule == "forward-only":
            head = self.segment_finetune()["head"].mode
            if head != "frozen" or self.split.setting != "ht" or self.split.labels_at != "model":
                raise ValueError(
                    "train.schedule: forward-only needs a frozen data-party head (mode: splitfrozen), "
                    "split.setting: ht and split.labels_at: model (got head "
                    f"{head}, setting {self.split.setting}, labels_at {self.split.labels_at}); "
                    "use train.schedule: pipelined otherwise"
                )
        return self

    @property
    def head(self) -> str:
        """The model's task head for this run's task."""
        from splitfed.data.tasks import TASKS

        return TASKS[self.task].head

    def segment_finetune(self) -> dict[str, FinetuneSpec]:
        """The resolved fine-tuning of each segment (preset + overrides)."""
        preset = {
            "splitlora": {"head": "lora", "body": "lora", "tail": "lora"},
            "splitfrozen": {"head": "frozen", "body": "lora", "tail": "lora"},
        }[self.mode]
        out = {}
        for role in ("head", "body", "tail"):
            explicit: SegmentFinetune | None = getattr(self.finetune, role)
            seg = explicit or SegmentFinetune(mode=preset[role])  # type: ignore[arg-type]
            out[role] = seg.spec()
        return out

    def optim(self, total_updates: int) -> OptimSpec:
        """Each party's optimizer spec."""
        t = self.train
        return OptimSpec(
            t.optimizer, t.lr, t.weight_decay, t.scheduler, t.warmup_steps, total_updates, t.max_grad_norm
        )


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a raw config dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value (e.g. train.lr=1e-4), got {item!r}")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}: value {text!r} is not valid YAML: {err}") from err
        _set_dotted(raw, key.strip(), value)
    return raw


def format_validation_error(err: ValidationError) -> str:
    """One line per problem: the dotted key, what is wrong, and the value given."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see examples/ for valid keys)"
        given = e.get("input")
        shown = "" if isinstance(given, dict) or given is None else f" (got {given!r})"
        lines.append(f"  {key}: {msg}{shown}")
    return "invalid configuration:\n" + "\n".join(lines)


def parse_config(raw: dict[str, Any]) -> RunConfig:
    """Validate a raw dict into a :class:`RunConfig`, raising :class:`ConfigError`."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply ``--set`` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of keys to values at the top level")
    return parse_config(apply_overrides(raw, overrides or []))
