"""Datasets built in memory from offline text: the shared spec and asset lookup.

The builders themselves live with their corpus (:mod:`~splitfed.data.fortunes`,
:mod:`~splitfed.data.shakespeare`, :mod:`~splitfed.data.arithmetic`). Nothing is cached:
every build reads the text and splits it again, which takes well under a second, so a change
of cleaning rules can never meet a stale cache.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from splitfed.data.errors import DataError
from splitfed.data.registry import DataConfigProtocol, DatasetSpec, DatasetSplits

Builder = Callable[[Path | None], DatasetSplits]


def asset_root(name: str, path: Path | None) -> Path:
    """``path`` if given, else the directory of the fetched asset ``name``.

    Raises
    ------
    DataError
        If the asset is not fetched (the message names the fetch command).
    """
    if path is not None:
        root = Path(path).expanduser()
        if not root.is_dir():
            raise DataError(f"{root}: no such directory (path: should point at a copy of the {name} files)")
        return root
    try:
        from splitfed.assets import AssetError, asset_path
    except ImportError as exc:  # pragma: no cover - assets ships with the package
        raise DataError(f"cannot locate the {name!r} text: splitfed.assets is unavailable ({exc})") from exc
    try:
        return Path(asset_path(name))
    except AssetError as exc:
        raise DataError(f"{exc} (or give path: pointing at a copy of the {name} files)") from exc


class OfflineDataset(DatasetSpec):
    """A dataset built in memory from offline text; ``path`` replaces the fetched asset.

    Parameters
    ----------
    name : str
        Registry name.
    task : str
        Task name.
    description : str
        One line for listings.
    build : Callable[[Path | None], DatasetSplits]
        The builder; gets ``Path(cfg.path)``, or ``None`` to use the asset.
    uses_path : bool, default True
        Whether ``path`` means anything (a generated dataset has no source text).
    """

    def __init__(
        self, name: str, task: str, description: str, build: Builder, uses_path: bool = True
    ) -> None:
        self.name = name
        self.task = task
        self.description = description
        self.build = build
        self.uses_path = uses_path

    def load(self, cfg: DataConfigProtocol) -> DatasetSplits:
        """Build the splits (``columns`` does not apply: the builder fixes the schema)."""
        if cfg.columns:
            raise DataError(f"dataset {self.name!r} is built from offline text; columns: does not apply")
        if cfg.path and not self.uses_path:
            raise DataError(f"dataset {self.name!r} is generated; path: does not apply")
        return self.build(Path(cfg.path) if cfg.path else None)
