"""``arithmetic``: generated GSM8K-style word problems with worked answers ending in ``#### N``.

Six problem shapes (add, subtract, multiply, share equally, a two-step purchase, change from
a bill) over a few names and objects, numbers small enough for a small LM. Each answer shows
its computation the way GSM8K solutions do (without the ``<<...>>`` calculator annotations),
so the same ``extract_final_number`` scores both; answers are terse so that question and
answer fit in 64 tokens of a digit-by-digit tokenizer (SmolLM2's). Each split comes from its own seeded
generator, test first, then validation and train skipping questions already drawn, so no
question occurs in two splits.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from splitfed.data.errors import DataError
from splitfed.data.offline import OfflineDataset
from splitfed.data.registry import DatasetSplits, register
from splitfed.data.splitting import rng

NAMES = ("Tom", "Ana", "Ravi", "Mei", "Lucas", "Sara", "Omar", "Lena", "Kofi", "Yuki", "Ben", "Nora")
ITEMS = ("apples", "marbles", "stickers", "books", "pencils", "cookies", "stamps", "shells", "cards", "coins")
SIZES = {"train": 2000, "validation": 200, "test": 200}
SEED = "arithmetic-v1"

Problem = tuple[str, str]  # question, answer ending in "#### N"


def _people(r: random.Random) -> tuple[str, str]:
    first, second = r.sample(NAMES, 2)
    return first, second


def _add(r: random.Random) -> Problem:
    n, _ = _people(r)
    item, a, b = r.choice(ITEMS), r.randint(2, 60), r.randint(2, 60)
    question = f"{n} has {a} {item}. {n} buys {b} more. How many {item} does {n} have now?"
    return question, f"{n} has {a} + {b} = {a + b} {item} now.\n#### {a + b}"


def _subtract(r: random.Random) -> Problem:
    n, m = _people(r)
    item, b = r.choice(ITEMS), r.randint(2, 40)
    a = b + r.randint(1, 50)
    question = f"{n} had {a} {item} and gave {b} of them to {m}. How many {item} does {n} have left?"
    return question, f"{n} has {a} - {b} = {a - b} {item} left.\n#### {a - b}"


def _multiply(r: random.Random) -> Problem:
    n, _ = _people(r)
    item, a, b = r.choice(ITEMS), r.randint(2, 12), r.randint(2, 12)
    question = (
        f"{n} buys {a} boxes of {item}. Each box holds {b} {item}. How many {item} does {n} buy in total?"
    )
    return question, f"{n} buys {a} * {b} = {a * b} {item}.\n#### {a * b}"


def _share(r: random.Random) -> Problem:
    n, _ = _people(r)
    item, k, b = r.choice(ITEMS), r.randint(2, 15), r.randint(2, 9)
    a = k * b
    question = f"{n} shares {a} {item} equally among {b} friends. How many {item} does each friend get?"
    return question, f"Each friend gets {a} / {b} = {k} {item}.\n#### {k}"


def _two_step(r: random.Random) -> Problem:
    n, _ = _people(r)
    item, a, b, c = r.choice(ITEMS), r.randint(1, 30), r.randint(2, 6), r.randint(2, 10)
    bought = b * c
    d = r.randint(1, a + bought - 1)
    left = a + bought - d
    question = f"{n} has {a} {item}, buys {b} packs of {c} and gives away {d}. How many are left?"
    return question, f"{b} * {c} = {bought}. {a} + {bought} - {d} = {left}.\n#### {left}"


def _change(r: random.Random) -> Problem:
    n, _ = _people(r)
    item, count, price = r.choice(ITEMS), r.randint(2, 9), r.randint(1, 9)
    cost = count * price
    bill = next(b for b in (10, 20, 50, 100) if b > cost)
    question = f"{n} pays ${bill} for {count} {item} at ${price} each. How much change is there?"
    return question, f"{count} * {price} = ${cost}. {bill} - {cost} = ${bill - cost}.\n#### {bill - cost}"


PROBLEMS: tuple[Callable[[random.Random], Problem], ...] = (
    _add,
    _subtract,
    _multiply,
    _share,
    _two_step,
    _change,
)


def build_arithmetic(root: Path | None = None, sizes: dict[str, int] | None = None) -> DatasetSplits:
    """Generate ``arithmetic``: ``{"question", "answer"}`` examples for ``generative_qa``.

    Parameters
    ----------
    root : Path | None, default None
        Unused (the data is generated); accepted so every offline builder has one signature.
    sizes : dict[str, int] | None, default SIZES
        Examples per split.
    """
    del root
    sizes = {**SIZES, **(sizes or {})}
    seen: set[str] = set()
    parts: dict[str, list[dict[str, object]]] = {}
    for split in ("test", "validation", "train"):
        r = rng(SEED, split)
        examples: list[dict[str, object]] = []
        attempts = 0
        while len(examples) < sizes[split]:
            attempts += 1
            if attempts > 20 * sizes[split] + 100:
                raise DataError(f"arithmetic: cannot draw {sizes[split]} distinct {split} problems")
            question, answer = r.choice(PROBLEMS)(r)
            if question not in seen:
                seen.add(question)
                examples.append({"question": question, "answer": answer})
        parts[split] = examples
    return DatasetSplits(
        train=parts["train"],
        validation=parts["validation"],
        test=parts["test"],
        label_names=None,
        task="generative_qa",
    )


register(
    OfflineDataset(
        "arithmetic",
        "generative_qa",
        "Generated GSM8K-style word problems with '#### N' answers (offline)",
        build_arithmetic,
        uses_path=False,
    )
)
