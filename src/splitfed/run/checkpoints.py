"""Adapter files and checkpoints of a split run: what each party saves, atomically, and loads back.

An adapter file (``<out>/<party>/adapter.safetensors``) holds one party's trainable parameters
(LoRA, task head or all, and the data party's defenses); a checkpoint (``<out>/checkpoint/``)
adds each party's optimizer, scheduler and defense state, the RNG and the loss history.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from splitfed.models.partition import Segment

CHECKPOINT = "checkpoint"


def _named_trainable(segments: dict[str, Segment], roles: Sequence[str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for role in roles:
        if role in segments:
            for name, p in segments[role].named_model_parameters(trainable_only=True).items():
                out[name] = p.detach().contiguous()
    return out


#: What each party's adapter file holds: its segments and (data party) its defenses' parameters.
PARTY_ROLES = {"data_party": ("head", "tail", "front"), "model_party": ("body",)}


def save_adapters(
    segments: dict[str, Segment], directory: Path, parties: Sequence[str] = tuple(PARTY_ROLES)
) -> dict[str, str]:
    """Write each party's trainable parameters (LoRA, task head, or all) as safetensors."""
    paths = {}
    for party in parties:
        roles = PARTY_ROLES[party]
        path = write_adapter(_named_trainable(segments, roles), directory / party, roles)
        paths[party] = str(path)
    return paths


def write_adapter(
    tensors: dict[str, torch.Tensor], directory: Path, roles: Sequence[str], **meta: str
) -> Path:
    """Write one party's parameters as ``directory/adapter.safetensors`` (what :func:`load_adapters` reads).

    Atomically: a reader (or a crash) sees the previous file or the new one, never half of one.
    """
    path = directory / "adapter.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"roles": ",".join(roles), **meta})
    os.replace(tmp, path)
    return path


def load_adapters(
    segments: dict[str, Segment], directory: Path, parties: Sequence[str] = tuple(PARTY_ROLES)
) -> None:
    """Load what :func:`save_adapters` wrote into the segments (names must match)."""
    for party in parties:
        roles = PARTY_ROLES[party]
        path = directory / party / "adapter.safetensors"
        if not path.is_file():
            continue
        saved = load_file(str(path))
        params: dict[str, torch.nn.Parameter] = {}
        for role in roles:
            if role in segments:
                params |= segments[role].named_model_parameters()
        unknown = sorted(set(saved) - set(params))
        if unknown:
            raise ValueError(f"{path} holds parameters this model does not have: {unknown[:5]}")
        with torch.no_grad():
            for name, tensor in saved.items():
                params[name].copy_(tensor)
        for role in roles:
            loaded = getattr(segments.get(role), "loaded", None)  # the front: its defenses' hook
            if callable(loaded) and set(saved) & set(segments[role].named_model_parameters()):
                loaded()


def save_checkpoint(
    out: Path,
    segments: dict[str, Segment],
    parties: dict[str, Any],
    step: int,
    history: list[dict[str, float]],
) -> None:
    """Write a checkpoint of ``parties`` (``{"data_party": ..., "model_party": ...}``) atomically.

    Built in a temporary directory and renamed into place, so a crash leaves either the previous
    checkpoint or the new one, never a half-written one.
    """
    tmp = out / f".{CHECKPOINT}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_adapters(segments, tmp, tuple(parties))
    for name, party in parties.items():
        torch.save(party.state_dict(), tmp / name / "state.pt")
    torch.save({"torch_rng": torch.get_rng_state()}, tmp / "rng.pt")
    (tmp / "progress.json").write_text(json.dumps({"step": step, "history": history}))
    swap_into_place(tmp, out / CHECKPOINT)


def swap_into_place(tmp: Path, final: Path) -> None:
    """Replace directory ``final`` by the complete directory ``tmp`` with renames only.

    A crash leaves ``final`` as it was or as ``tmp``, or (between the two renames) the previous
    one as ``.<name>.old`` beside it, which :func:`checkpoint_dir` still finds.
    """
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_dir(out: Path) -> Path | None:
    """The complete checkpoint :func:`save_checkpoint` left in ``out``, or ``None``.

    Normally ``out/checkpoint``; ``out/.checkpoint.old`` when the process was killed between
    its two renames; never a checkpoint whose save was cut short.
    """
    for ckpt in (out / CHECKPOINT, out / f".{CHECKPOINT}.old"):
        if (ckpt / "progress.json").is_file():
            return ckpt
    return None


def checkpoint_step(out: Path) -> int:
    """The step of the checkpoint in ``out`` (0 when there is none)."""
    ckpt = checkpoint_dir(out)
    return int(json.loads((ckpt / "progress.json").read_text())["step"]) if ckpt else 0


def load_checkpoint(
    out: Path, segments: dict[str, Segment], parties: dict[str, Any]
) -> tuple[int, list[dict[str, float]]]:
    """Restore what :func:`save_checkpoint` wrote; returns the step and the loss history."""
    ckpt = checkpoint_dir(out)
    if ckpt is None:
        raise FileNotFoundError(
            f"--resume: no checkpoint in {out} (expected {out / CHECKPOINT}/progress.json); run without --resume"
        )
    load_adapters(segments, ckpt, tuple(parties))
    for name, party in parties.items():
        party.load_state_dict(torch.load(ckpt / name / "state.pt", weights_only=True))
    torch.set_rng_state(torch.load(ckpt / "rng.pt", weights_only=True)["torch_rng"])
    progress = json.loads((ckpt / "progress.json").read_text())
    return int(progress["step"]), list(progress["history"])
