"""Datasets, task definitions and metrics.

``load_splits(cfg)`` gives the examples of a configured dataset (:data:`DATASETS`, or a local
file), ``get_task(name, tokenizer=...)`` the task that turns them into tensors, losses and
metrics (:data:`TASKS`).
"""

from splitfed.data.errors import DataError
from splitfed.data.registry import DATASETS, DataConfigLike, DatasetSpec, DatasetSplits, load_splits
from splitfed.data.tasks import TASKS, Task, get_task

# Importing the modules that implement datasets registers them in DATASETS.
from splitfed.data import arithmetic, fortunes, hub, shakespeare  # noqa: F401  # isort: skip

__all__ = [
    "DATASETS",
    "TASKS",
    "DataConfigLike",
    "DataError",
    "DatasetSpec",
    "DatasetSplits",
    "Task",
    "get_task",
    "load_splits",
]
