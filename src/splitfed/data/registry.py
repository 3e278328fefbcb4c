"""The dataset registry and :func:`load_splits`.

:data:`DATASETS` maps a name to a :class:`DatasetSpec`. Each spec is defined, and registered
with :func:`register`, in the module that implements it: the offline corpora in
:mod:`~splitfed.data.fortunes`, :mod:`~splitfed.data.shakespeare` and
:mod:`~splitfed.data.arithmetic`, the Hugging Face Hub entries in :mod:`~splitfed.data.hub`.
A name that is not registered can still be loaded from a local file (:mod:`~splitfed.data.local`)
by giving ``path`` and ``task``.

What ``path`` means depends on the dataset: for an offline corpus it is a copy of the source
text (instead of the fetched asset), for a Hub dataset a local copy of its rows, and for an
unregistered name the data itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from splitfed.data.errors import DataError
from splitfed.data.splitting import subsample
from splitfed.data.tasks import TASKS

Rows = list[dict[str, Any]]


@dataclass
class DatasetSplits:
    """The examples of a dataset, split three ways, in the schema of its task.

    Parameters
    ----------
    train, validation, test : list[dict]
        Examples (see :mod:`splitfed.data.tasks` for each task's fields).
    label_names : list[str] | None
        Class names, index = label, for classification; ``None`` for other tasks.
    task : str
        The task name (a key of :data:`~splitfed.data.tasks.TASKS`).
    """

    train: Rows
    validation: Rows
    test: Rows
    label_names: list[str] | None
    task: str

    def sizes(self) -> dict[str, int]:
        """Number of examples per split."""
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


class DataConfigProtocol(Protocol):
    """What :func:`load_splits` reads from a config (the pydantic ``DataConfig`` has these)."""

    @property
    def name(self) -> str: ...
    @property
    def path(self) -> str | None: ...
    @property
    def columns(self) -> Mapping[str, str] | None: ...
    @property
    def task(self) -> str | None: ...
    @property
    def max_train(self) -> int | None: ...
    @property
    def max_eval(self) -> int | None: ...
    @property
    def seed(self) -> int: ...


@dataclass
class DataConfigLike:
    """A plain data config, for tests and scripts that do not build the pydantic one.

    Parameters
    ----------
    name : str
        A key of :data:`DATASETS`, or any name for a local file given by ``path``.
    path : str | None, default None
        Local data (see the module docstring).
    columns : dict[str, str], default {}
        Task field name -> column name in the file.
    task : str | None, default None
        Task name; defaults to the registered dataset's task, required for local files.
    max_train, max_eval : int | None, default None
        Keep at most this many training / validation and test examples (uniform, seeded).
    seed : int, default 0
        Seed of subsampling and of any split cut from a single file.
    """

    name: str
    path: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    task: str | None = None
    max_train: int | None = None
    max_eval: int | None = None
    seed: int = 0


class DatasetSpec(ABC):
    """A registered dataset: its name, its task, and how to load it."""

    name: str
    task: str
    description: str

    @abstractmethod
    def load(self, cfg: DataConfigProtocol) -> DatasetSplits:
        """Load all three splits (subsampling happens afterwards, in :func:`load_splits`)."""


DATASETS: dict[str, DatasetSpec] = {}
"""Every registered dataset by name."""


def register(spec: DatasetSpec) -> DatasetSpec:
    """Add ``spec`` to :data:`DATASETS` (names must be unique)."""
    if spec.name in DATASETS:
        raise ValueError(f"dataset {spec.name!r} is already registered")
    if spec.task not in TASKS:
        raise ValueError(f"dataset {spec.name!r} has unknown task {spec.task!r}")
    DATASETS[spec.name] = spec
    return spec


def load_splits(cfg: DataConfigProtocol) -> DatasetSplits:
    """Load the dataset a config names, with ``max_train`` / ``max_eval`` applied.

    Raises
    ------
    DataError
        For an unknown name without ``path``, a task that does not fit the dataset, an
        unreachable Hub, a missing asset, or a local file that is missing, unreadable or
        lacks a column (the message says which and how to fix it).
    """
    for limit in ("max_train", "max_eval"):
        value = getattr(cfg, limit, None)
        if value is not None and value < 0:
            raise DataError(f"{limit} must be >= 0, got {value}")
    task = getattr(cfg, "task", None)
    if task is not None and task not in TASKS:
        raise DataError(f"unknown task {task!r}; known tasks: {', '.join(sorted(TASKS))}")
    spec = DATASETS.get(cfg.name)
    if spec is not None:
        if task is not None and task != spec.task:
            raise DataError(
                f"dataset {cfg.name!r} is a {spec.task!r} dataset; task {task!r} does not apply "
                "(leave task unset, or load your own copy under another name with path: and columns:)"
            )
        splits = spec.load(cfg)
    elif getattr(cfg, "path", None):
        if task is None:
            raise DataError(
                f"dataset {cfg.name!r} is not registered, so a local file needs task: "
                f"(one of {', '.join(sorted(TASKS))})"
            )
        from splitfed.data.local import load_local

        splits = load_local(str(cfg.path), task=task, columns=cfg.columns or {}, seed=cfg.seed)
    else:
        raise DataError(
            f"unknown dataset {cfg.name!r}; registered datasets: {', '.join(sorted(DATASETS))}. "
            "For your own data give path: (CSV, JSON, JSONL or Parquet), task: and columns:"
        )
    seed = getattr(cfg, "seed", 0)
    max_train = getattr(cfg, "max_train", None)
    max_eval = getattr(cfg, "max_eval", None)
    return DatasetSplits(
        train=subsample(splits.train, max_train, seed, "train"),
        validation=subsample(splits.validation, max_eval, seed, "validation"),
        test=subsample(splits.test, max_eval, seed, "test"),
        label_names=splits.label_names,
        task=splits.task,
    )
