"""Attacks on a recorded run, set up from the run's config: what ``splitfed attack`` calls.

The attacker is the honest-but-curious model party. From the run's config it knows the public
pretrained model (``model.name``, loaded without any fine-tuned adapters) and the task; its
auxiliary text comes from the same domain but not from the victim's examples: by default the
dataset's ``test`` split, while the attack reads only training crossings (a run evaluates on its
``eval_split``; when that is ``test`` too, the auxiliary text is still disjoint from what is
attacked). A text file of one example per line replaces it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from splitfed.config import ConfigError, RunConfig
from splitfed.privacy.attacks import (
    AttackContext,
    AttackError,
    AttackResult,
    build_attack,
    run_attack,
    run_generation_attack,
)
from splitfed.privacy.attacks.runner import Window

#: Auxiliary examples read by default (enough for the learning-based attacks, cheap to encode).
DEFAULT_AUX_EXAMPLES = 512


def auxiliary_texts(
    cfg: RunConfig, source: str | Path | None = None, limit: int = DEFAULT_AUX_EXAMPLES
) -> list[str]:
    """The attacker's auxiliary text: lines of the file ``source``, or the texts of a split of ``cfg``'s data.

    Parameters
    ----------
    cfg : RunConfig
    source : str | Path | None, default None
        A text file (one example per line), or a split name of the run's dataset (``test``,
        ``validation``, ``train``); ``None`` is ``test``.
    limit : int, default 512
        At most this many examples.

    Raises
    ------
    ConfigError
        For a missing or empty file, or an unknown split.
    """
    if source is not None and Path(source).suffix and not Path(source).is_file():
        raise ConfigError(f"auxiliary text {source}: no such file (one example per line)")
    if source is not None and Path(source).is_file():
        lines = [line.strip() for line in Path(source).read_text(encoding="utf-8").splitlines()]
        texts = [line for line in lines if line]
        if not texts:
            raise ConfigError(f"auxiliary text {source} holds no non-empty line")
        return texts[:limit]
    from splitfed.data import load_splits
    from splitfed.data.tasks import TASKS

    split = str(source or "test")
    if split not in ("train", "validation", "test"):
        raise ConfigError(
            f"auxiliary text {split!r}: neither a file nor a split; use a text file or one of train, validation, test"
        )
    splits = load_splits(cfg.data.model_copy(update={"task": cfg.task}))
    fields = TASKS[cfg.task].text_fields
    texts = []
    for example in getattr(splits, split):
        text = " ".join(str(example[f]) for f in fields if isinstance(example.get(f), str))
        if text:
            texts.append(text)
        if len(texts) >= limit:
            break
    if not texts:
        raise ConfigError(f"the {split} split of {cfg.data.name!r} has no text for auxiliary data")
    return texts


def attack_context(
    cfg: RunConfig,
    aux_texts: Sequence[str] = (),
    *,
    max_examples: int | None = None,
    progress: bool = False,
    ground_truth: str | Path | None = None,
) -> AttackContext:
    """An :class:`AttackContext` with the run's public pretrained model and tokenizer (no adapters).

    The tail's depth in HBT comes from the config (the model party knows where its body ends).
    ``ground_truth``: a ``join --record`` directory (or its ``ground_truth/``) that scores a
    recording the model party made (``serve --record``).
    """
    if ground_truth is not None and (Path(ground_truth) / "ground_truth").is_dir():
        ground_truth = Path(ground_truth) / "ground_truth"
    from splitfed.run import load_run_model

    # The attacker's public model is the pretrained one; a classifier's new head (its width is the
    # run's class count, unknown to the model party) plays no part in attacking the head segment.
    num_labels = cfg.model.num_labels or (2 if cfg.head == "classification" else None)
    tokenizer, model = load_run_model(cfg, cfg.head, num_labels)
    return AttackContext(
        model=model,
        tokenizer=tokenizer,
        auxiliary_texts=list(aux_texts),
        seed=cfg.train.seed,
        max_examples=max_examples,
        tail_layers=cfg.split.tail_layers if cfg.split.setting == "hbt" else None,
        aux_max_length=cfg.data.max_length,
        progress=progress,
        ground_truth=ground_truth,
    )


def attack_recording(
    recording: str | Path,
    specs: Sequence[dict[str, Any] | str],
    context: AttackContext,
    *,
    phases: str | Sequence[str] = "train",
    baseline: bool = True,
    noise_control: bool = False,
    window: Window = "first",
) -> list[AttackResult]:
    """Run each attack of ``specs`` (``{name: ..., <params>}`` or a name) on ``recording``.

    ``phases`` ``"generate"`` attacks split inference (a ``generate --record`` recording): each
    session's prefill and decoding steps joined, scored on prompts and generated tokens. Every
    spec is validated before the first attack runs, so a typo in the last one does not cost the
    minutes the first ones take. ``noise_control`` also scores each attack on the same batches
    with what it intercepted replaced by noise of the same shape and scale (``result.control``).
    ``window`` (training and evaluation crossings only): read the run's first
    ``context.max_examples`` sequences or its last (see :func:`splitfed.privacy.attacks.run_attack`).
    """
    attacks = [build_attack(spec) for spec in specs]
    wanted = [phases] if isinstance(phases, str) else list(phases)
    if "generate" in wanted:
        if len(wanted) > 1:
            raise AttackError("attack generation (phase generate) on its own, not with train or eval")
        return [
            run_generation_attack(a, recording, context, baseline=baseline, noise_control=noise_control)
            for a in attacks
        ]
    return [
        run_attack(
            a,
            recording,
            context,
            phases=phases,
            baseline=baseline,
            noise_control=noise_control,
            window=window,
        )
        for a in attacks
    ]
