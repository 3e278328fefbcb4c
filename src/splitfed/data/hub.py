"""Datasets on the Hugging Face Hub, loaded with ``datasets.load_dataset`` where it is reachable.

Each entry names the Hub id and config, which Hub split serves as our train / validation /
test, and how a Hub row becomes an example of the task. Splits the Hub does not provide
with labels are carved out of train (10%, seeded): GLUE's test labels are hidden, so GLUE's
validation split is our test split and our validation split is carved from train.

Where the Hub is unreachable, loading raises :class:`DataError` suggesting a local copy:
``path:`` pointing at a file or split directory with the Hub's column names (or any names,
mapped with ``columns:``), see :mod:`splitfed.data.local`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from splitfed.data.errors import DataError
from splitfed.data.local import HELD_OUT_FRACTION, load_local, read_splits
from splitfed.data.registry import DataConfigProtocol, DatasetSpec, DatasetSplits, register
from splitfed.data.schema import index_labels, resolve_fields, rows_to_examples
from splitfed.data.splitting import carve, subsample
from splitfed.data.tasks import TASKS

Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class HubDataset(DatasetSpec):
    """A dataset on the Hugging Face Hub.

    Parameters
    ----------
    name : str
        Registry name.
    task : str
        Task name.
    hub_id : str
        Hub repository, e.g. ``"nyu-mll/glue"``.
    config : str | None
        Hub config (subset), e.g. ``"sst2"``.
    splits : Mapping[str, str]
        Our split (``train``, ``validation``, ``test``) -> Hub split name; ``train`` is
        required, a missing ``validation`` or ``test`` is carved from train.
    columns : Mapping[str, str]
        Task field -> Hub column (ignored when ``convert`` is given).
    label_names : list[str] | None, default None
        Class names of a classification dataset, index = Hub label.
    convert : Callable[[dict], dict] | None, default None
        Builds an example from a Hub row where renaming columns is not enough.
    description : str, default ""
        One line for listings.
    """

    name: str
    task: str
    hub_id: str
    config: str | None
    splits: Mapping[str, str]
    columns: Mapping[str, str] = field(default_factory=dict)
    label_names: list[str] | None = None
    convert: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    description: str = ""

    def _examples(self, rows: Rows, where: str) -> Rows:
        if self.convert is not None:
            return [self.convert(row) for row in rows]
        available = list(rows[0]) if rows else list(self.columns.values())
        mapping = resolve_fields(TASKS[self.task], self.columns, available, where)
        return rows_to_examples(rows, mapping, where)

    def _local(self, path: str, cfg: DataConfigProtocol) -> DatasetSplits:
        if cfg.columns or self.convert is None:
            # The config's mapping wins field by field; unmapped fields keep the Hub's column names.
            columns = {**self.columns, **(cfg.columns or {})}
            return load_local(path, self.task, columns, cfg.seed, self.label_names)
        # The file has the Hub's own columns: convert its rows as the Hub rows would be.
        out: list[Rows] = []
        for rows, available, where in read_splits(path, cfg.seed).values():
            try:
                out.append([self.convert(row) for row in rows])
            except KeyError as exc:
                raise DataError(
                    f"{where}: missing column {exc.args[0]!r} of {self.hub_id}; the columns are "
                    f"{sorted(available)}. Map the task's fields with columns: instead"
                ) from None
        names = index_labels(self.task, out, self.label_names)
        return DatasetSplits(train=out[0], validation=out[1], test=out[2], label_names=names, task=self.task)

    def load(self, cfg: DataConfigProtocol) -> DatasetSplits:
        """Load from the Hub, or from ``cfg.path`` when given (a local copy of the Hub rows)."""
        if cfg.path:
            return self._local(cfg.path, cfg)
        try:
            import datasets
        except ImportError as exc:  # pragma: no cover - datasets is a dependency
            raise DataError(f"dataset {self.name!r} needs the 'datasets' package ({exc})") from exc

        def fetch(split: str) -> Any:
            try:
                return datasets.load_dataset(self.hub_id, self.config, split=split)
            except Exception as exc:  # offline, missing from the cache, renamed on the Hub...
                where = self.hub_id + (f" ({self.config})" if self.config else "")
                raise DataError(
                    f"dataset {self.name!r}: could not load split {split!r} of {where} from the Hugging Face "
                    f"Hub: {type(exc).__name__}: {exc}. The Hub is unreachable here, or the dataset is not "
                    "in the local cache. Download it where there is a network (e.g. "
                    f"datasets.load_dataset({self.hub_id!r}, {self.config!r}).to_json(...)) and give the "
                    "file with path: (CSV, JSON, JSONL or Parquet, or a directory of train/validation/test "
                    "files) and columns: mapping the task's fields to its column names"
                ) from exc

        seed = cfg.seed
        train_ds = fetch(self.splits["train"])
        train_idx = list(range(len(train_ds)))
        carved: dict[str, list[int]] = {}
        for split in ("test", "validation"):
            if split not in self.splits:
                train_idx, carved[split] = carve(train_idx, HELD_OUT_FRACTION, seed, split)

        def rows(ds: Any, idx: list[int], limit: int | None, split: str) -> Rows:
            # Subsample before materializing: the same draw load_splits would make afterwards,
            # without converting hundreds of thousands of rows to dicts first.
            keep = subsample(idx, limit, seed, split)
            return self._examples(ds.select(keep).to_list(), f"{self.hub_id} ({split})")

        parts: dict[str, Rows] = {"train": rows(train_ds, train_idx, cfg.max_train, "train")}
        for split in ("validation", "test"):
            if split in carved:
                parts[split] = rows(train_ds, carved[split], cfg.max_eval, split)
            else:
                ds = fetch(self.splits[split])
                parts[split] = rows(ds, list(range(len(ds))), cfg.max_eval, split)
        names = index_labels(self.task, list(parts.values()), self.label_names)
        return DatasetSplits(
            train=parts["train"],
            validation=parts["validation"],
            test=parts["test"],
            label_names=names,
            task=self.task,
        )


def _instruction(
    prompt_field: str, context_field: str, response_field: str
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Alpaca-style prompt/response examples from instruction datasets."""

    def convert(row: dict[str, Any]) -> dict[str, Any]:
        instruction = str(row[prompt_field]).strip()
        context = str(row.get(context_field) or "").strip()
        prompt = f"### Instruction:\n{instruction}\n\n"
        if context:
            prompt += f"### Input:\n{context}\n\n"
        return {"prompt": prompt + "### Response:\n", "response": str(row[response_field]).strip()}

    return convert


def _glue(
    name: str, columns: dict[str, str], label_names: list[str], description: str, test: str = "validation"
) -> HubDataset:
    """A GLUE task: its labelled validation split serves as test, validation is carved from train."""
    return HubDataset(
        name=name,
        task="classification",
        hub_id="nyu-mll/glue",
        config=name,
        splits={"train": "train", "test": test},
        columns=columns,
        label_names=label_names,
        description=description,
    )


_SENTENCE = {"text": "sentence", "label": "label"}
_PAIR = {"text": "sentence1", "text_pair": "sentence2", "label": "label"}
_ENTAILMENT = ["entailment", "not_entailment"]
_SENTIMENT = ["negative", "positive"]

for _spec in (
    _glue("sst2", _SENTENCE, _SENTIMENT, "GLUE SST-2 movie-review sentiment"),
    _glue("mrpc", _PAIR, ["not_equivalent", "equivalent"], "GLUE MRPC paraphrase pairs"),
    _glue(
        "mnli",
        {"text": "premise", "text_pair": "hypothesis", "label": "label"},
        ["entailment", "neutral", "contradiction"],
        "GLUE MNLI (test = validation_matched)",
        test="validation_matched",
    ),
    _glue(
        "qnli",
        {"text": "question", "text_pair": "sentence", "label": "label"},
        _ENTAILMENT,
        "GLUE QNLI question/sentence entailment",
    ),
    _glue("cola", _SENTENCE, ["unacceptable", "acceptable"], "GLUE CoLA grammatical acceptability"),
    _glue("rte", _PAIR, _ENTAILMENT, "GLUE RTE entailment"),
    HubDataset(
        name="yelp_polarity",
        task="classification",
        hub_id="fancyzhx/yelp_polarity",
        config=None,
        splits={"train": "train", "test": "test"},
        columns={"text": "text", "label": "label"},
        label_names=_SENTIMENT,
        description="Yelp review polarity",
    ),
    HubDataset(
        name="ag_news",
        task="classification",
        hub_id="fancyzhx/ag_news",
        config=None,
        splits={"train": "train", "test": "test"},
        columns={"text": "text", "label": "label"},
        label_names=["World", "Sports", "Business", "Sci/Tech"],
        description="AG News topic classification",
    ),
    HubDataset(
        name="squad",
        task="span_qa",
        hub_id="rajpurkar/squad",
        config=None,
        splits={"train": "train", "test": "validation"},
        columns={"question": "question", "context": "context", "answers": "answers"},
        description="SQuAD v1.1 extractive QA (test = validation)",
    ),
    HubDataset(
        name="mmlu",
        task="multiple_choice",
        hub_id="cais/mmlu",
        config="all",
        splits={"train": "auxiliary_train", "validation": "validation", "test": "test"},
        columns={"question": "question", "choices": "choices", "label": "answer"},
        description="MMLU, all 57 subjects (train = auxiliary_train)",
    ),
    HubDataset(
        name="gsm8k",
        task="generative_qa",
        hub_id="openai/gsm8k",
        config="main",
        splits={"train": "train", "test": "test"},
        columns={"question": "question", "answer": "answer"},
        description="GSM8K grade-school math word problems",
    ),
    HubDataset(
        name="lambada",
        task="causal_lm",
        hub_id="cimec/lambada",
        config=None,
        splits={"train": "train", "validation": "validation", "test": "test"},
        columns={"text": "text"},
        description="LAMBADA narrative passages (causal LM)",
    ),
    HubDataset(
        name="alpaca",
        task="causal_lm",
        hub_id="tatsu-lab/alpaca",
        config=None,
        splits={"train": "train"},
        convert=_instruction("instruction", "input", "output"),
        description="Stanford Alpaca instructions (loss on the response only)",
    ),
    HubDataset(
        name="dolly",
        task="causal_lm",
        hub_id="databricks/databricks-dolly-15k",
        config=None,
        splits={"train": "train"},
        convert=_instruction("instruction", "context", "response"),
        description="Databricks Dolly 15k instructions (loss on the response only)",
    ),
):
    register(_spec)
