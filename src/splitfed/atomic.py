"""Atomic file writes: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def replace_json(path: str | Path, data: Any, *, indent: int | None = None) -> None:
    """Write ``data`` as JSON to ``path`` through a hidden temporary file renamed over it.

    The temporary file (``.<name>.tmp``) sits beside ``path``, so the rename stays on one file
    system and is atomic; an interrupted write leaves ``path`` as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=indent))
    os.replace(tmp, path)


__all__ = ["replace_json"]
