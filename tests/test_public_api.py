"""The public API: every name in ``splitfed.__all__`` resolves; ``import splitfed`` stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest

import splitfed


def test_every_public_name_resolves() -> None:
    for name in splitfed.__all__:
        assert getattr(splitfed, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = splitfed.nothing  # type: ignore[attr-defined]


def test_importing_the_package_loads_no_torch() -> None:
    code = "import sys, splitfed; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
