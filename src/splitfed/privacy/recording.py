"""Recordings of what crosses the split, and the data party's private ground truth.

An attack reads what the model party received (:class:`RecordingReader` over what a
:class:`RecordingWriter` wrote) and is scored against what only the data party knows
(:class:`GroundTruthReader` over what a :class:`GroundTruthWriter` wrote). Both stream their
tensors to disk, bit for bit, as safetensors shards next to a JSON manifest, holding at most one
shard in memory; the manifest is replaced atomically after every shard, so a crashed run leaves a
readable recording of every completed shard.

Layout of a recording directory::

    manifest.json              one record per crossing: kind, direction, phase, step, batch id,
                               client, session, metadata, and each tensor's dtype, shape, bytes
                               and place (shard file and key)
    shard-00000.safetensors    the tensors as they crossed (standard safetensors files)
    ground_truth/              the data party's ground truth (same layout; it never crossed)
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from splitfed.atomic import replace_json
from splitfed.protocol import KINDS, finishes_step, in_step
from splitfed.protocol import phase_of as protocol_phase_of
from splitfed.transport.channel import Direction, Message, MetaValue

Phase = Literal["train", "eval", "generate", "other"]
PHASES: tuple[Phase, ...] = ("train", "eval", "generate", "other")
DIRECTIONS: tuple[Direction, ...] = ("to_model", "to_data")
MANIFEST = "manifest.json"
#: Where :func:`ground_truth_dir` puts the data party's ground truth inside a recording directory.
GROUND_TRUTH = "ground_truth"
FORMAT = "splitfed-recording"
VERSION = 1
DEFAULT_SHARD_BYTES = 64 * 2**20
_ALIGN = 8  # every tensor starts at a multiple of 8 bytes in its shard, so views of any dtype work
# The reply kind of each request kind (a reply inherits its request's phase, step and client).
_REPLY_OF = {
    kind.name: kind.replies[0] for kind in KINDS.values() if kind.direction == "to_model" and kind.replies
}
_SAFETENSORS_DTYPE: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _SAFETENSORS_DTYPE[getattr(torch, _name)] = _code
_DTYPE_BY_NAME = {str(dtype).removeprefix("torch."): dtype for dtype in _SAFETENSORS_DTYPE}


class RecordingError(RuntimeError):
    """A recording that cannot be written or read (exists already, missing, corrupt, closed)."""


def phase_of(kind: str, meta: Mapping[str, MetaValue]) -> Phase:
    """The phase a message belongs to, from its kind and metadata alone.

    ``forward`` with ``train=True`` is training and without it evaluation (as the model party
    reads it); ``backward`` and ``backward_result`` exist only in training; every generation kind
    is generation. A reply whose kind does not say (``forward_result``) is ``"other"`` here;
    :class:`RecordingWriter` gives it the phase of its request.

    Parameters
    ----------
    kind : str
        The message kind.
    meta : Mapping[str, int | float | str | bool | None]
        Its metadata; an explicit ``phase`` entry wins.

    Returns
    -------
    {"train", "eval", "generate", "other"}
    """
    explicit = meta.get("phase")
    if isinstance(explicit, str) and explicit in PHASES:
        return explicit  # type: ignore[return-value]
    if kind == _REPLY_OF["forward"]:
        return "other"  # answers a training or an evaluation forward: the request says which
    phase = protocol_phase_of(kind, meta)  # the protocol's declaration, read in one place
    return "other" if phase == "control" else phase


def ground_truth_dir(directory: str | Path) -> Path:
    """Where the data party's ground truth of the recording in ``directory`` lives."""
    return Path(directory) / GROUND_TRUTH


def check_new_recording(directory: str | Path) -> None:
    """Raise :class:`RecordingError` unless ``directory`` can take a new recording (and its ground truth).

    Lets a run fail before it loads a model rather than after.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise RecordingError(f"cannot record into {directory}: it is a file; pass a directory")
    for path in (directory / MANIFEST, ground_truth_dir(directory) / MANIFEST):
        if path.exists():
            raise RecordingError(
                f"{path.parent} already holds a recording ({path.name}); record into a new directory "
                "or delete that one"
            )


def _as_set(values: str | Iterable[str] | None, allowed: Sequence[str] | None, what: str) -> set[str] | None:
    if values is None:
        return None
    chosen = {values} if isinstance(values, str) else set(values)
    if allowed is not None and not chosen <= set(allowed):
        raise ValueError(f"unknown {what} {sorted(chosen - set(allowed))}; choose from {list(allowed)}")
    return chosen


def _int_or_none(value: MetaValue) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _dtype_code(tensor: torch.Tensor, name: str) -> str:
    code = _SAFETENSORS_DTYPE.get(tensor.dtype)
    if code is None:
        raise RecordingError(
            f"tensor {name!r} has dtype {tensor.dtype}, which a recording cannot store; "
            f"supported: {sorted(_DTYPE_BY_NAME)}"
        )
    return code


@dataclass
class _Entry:
    key: str
    code: str
    shape: list[int]
    start: int
    end: int


class _ShardWriter:
    """Tensors into safetensors shards, records into the manifest: the mechanics both writers share.

    Small tensors are copied once into a buffer of ``shard_bytes`` (the only copy), which becomes a
    shard when full; a tensor larger than a shard is written straight from its own memory as a
    shard of its own. A record joins the manifest once all its tensors are in written shards.
    """

    #: Records without tensors on the way that may wait before the manifest is rewritten.
    COMMIT_EVERY = 256

    def __init__(
        self,
        directory: str | Path,
        *,
        content: str,
        shard_bytes: int,
        byte_budget: int | None,
        info: dict[str, Any],
    ) -> None:
        if shard_bytes < _ALIGN:
            raise ValueError(f"shard_bytes must be at least {_ALIGN}, got {shard_bytes}")
        if byte_budget is not None and byte_budget < 0:
            raise ValueError(f"byte_budget must be >= 0 (or None for no limit), got {byte_budget}")
        self.directory = Path(directory)
        check_new_recording(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.content = content
        self.shard_bytes = shard_bytes
        self.byte_budget = byte_budget
        self.info = info
        # torch.empty touches no pages: the buffer costs memory only as far as it is filled.
        self._buffer: torch.Tensor | None = None
        self._used = 0
        self._entries: list[_Entry] = []
        self._pending: list[dict[str, Any]] = []
        self.records: list[dict[str, Any]] = []
        self.shards: list[dict[str, Any]] = []
        self.exhausted = False
        self.closed = False
        #: Tensor bytes accepted so far (written or buffered), against the budget.
        self.accepted_bytes = 0
        self.totals = {"stored_bytes": 0, "dropped_bytes": 0, "dropped_tensors": 0, "dropped_records": 0}
        self._write_manifest()

    # ------------------------------------------------------------------ records
    def add(self, record: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        """Store ``record`` with ``tensors`` (all of them, or none once the byte budget is spent)."""
        if self.closed:
            raise RecordingError(f"the recording in {self.directory} is closed; open a new one")
        codes = {name: _dtype_code(t, name) for name, t in tensors.items()}
        nbytes = sum(_tensor_bytes(t) for t in tensors.values())
        if tensors and not self.exhausted and self.byte_budget is not None:
            # Once one record does not fit, recording tensors stops: what is kept is a prefix in time.
            self.exhausted = self.accepted_bytes + nbytes > self.byte_budget
        store = not self.exhausted
        direct = False
        entries: dict[str, dict[str, Any]] = {}
        for name, tensor in tensors.items():
            entry: dict[str, Any] = {
                "dtype": str(tensor.dtype).removeprefix("torch."),
                "shape": list(tensor.shape),
                "nbytes": _tensor_bytes(tensor),
                "shard": None,
                "key": None,
            }
            if store:
                key = f"{record['index']}.{name}"
                entry["shard"], wrote = self._place(key, codes[name], tensor.detach())
                entry["key"] = key
                direct = direct or wrote
            entries[name] = entry
        record["tensors"] = entries
        record["stored"] = store or not tensors
        if store:
            self.accepted_bytes += nbytes
        self._pending.append(record)
        # Records whose tensors are all on disk join the manifest now; those without stored tensors
        # (after the budget, or tensor-less kinds) in batches, so the manifest is not rewritten per message.
        if not self._entries and (direct or len(self._pending) >= self.COMMIT_EVERY):
            self._commit()

    @property
    def count(self) -> int:
        """Records added so far (committed or not)."""
        return len(self.records) + len(self._pending)

    def _place(self, key: str, code: str, tensor: torch.Tensor) -> tuple[int, bool]:
        """Put one tensor into the buffer (or a shard of its own); its shard number, and whether written."""
        n = _tensor_bytes(tensor)
        if n > self.shard_bytes:
            self._flush()
            # The one copy a GPU or strided tensor needs; a contiguous CPU tensor is written in place.
            flat = tensor.to("cpu", memory_format=torch.contiguous_format).reshape(-1)
            entry = _Entry(key, code, list(tensor.shape), 0, n)
            self._write_shard([entry], flat.view(torch.uint8).numpy().data)
            return len(self.shards) - 1, True
        start = -(-self._used // _ALIGN) * _ALIGN
        if start + n > self.shard_bytes:
            self._flush()
            start = 0
        if self._buffer is None:
            self._buffer = torch.empty(self.shard_bytes, dtype=torch.uint8)
        self._buffer[self._used : start].zero_()
        if n:
            self._buffer[start : start + n].view(tensor.dtype).view(tensor.shape).copy_(tensor)
        self._entries.append(_Entry(key, code, list(tensor.shape), start, start + n))
        self._used = start + n
        return len(self.shards), False

    # ------------------------------------------------------------------ shards and manifest
    def _flush(self) -> None:
        """Write the buffer as the next shard, which commits its records (nothing when it is empty)."""
        if self._entries:
            assert self._buffer is not None
            entries, self._entries = self._entries, []
            self._write_shard(entries, self._buffer[: self._used].numpy().data)
            self._used = 0

    def _write_shard(self, entries: list[_Entry], data: memoryview) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": FORMAT, "content": self.content}}
        offset = 0
        for i, entry in enumerate(entries):
            if entry.start > offset:  # safetensors allows no holes: alignment padding is a tensor too
                header[f"__pad__.{i}"] = {
                    "dtype": "U8",
                    "shape": [entry.start - offset],
                    "data_offsets": [offset, entry.start],
                }
            header[entry.key] = {
                "dtype": entry.code,
                "shape": entry.shape,
                "data_offsets": [entry.start, entry.end],
            }
            offset = entry.end
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % _ALIGN)
        name = f"shard-{len(self.shards):05d}.safetensors"
        tmp = self.directory / f".{name}.tmp"
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            f.write(data)
        os.replace(tmp, self.directory / name)
        self.shards.append({"file": name, "bytes": 8 + len(raw) + len(data), "tensors": len(entries)})
        self._commit()

    def _commit(self) -> None:
        for record in self._pending:
            nbytes = sum(e["nbytes"] for e in record["tensors"].values())
            if record["stored"]:
                self.totals["stored_bytes"] += nbytes
            else:
                self.totals["dropped_bytes"] += nbytes
                self.totals["dropped_tensors"] += len(record["tensors"])
                self.totals["dropped_records"] += 1
        self.records += self._pending
        self._pending = []
        self._write_manifest()

    def _write_manifest(self) -> None:
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "content": self.content,
            "closed": self.closed,
            "shard_bytes": self.shard_bytes,
            "byte_budget": self.byte_budget,
            **self.info,
            **self.totals,
            "shards": self.shards,
            "records": self.records,
        }
        replace_json(self.directory / MANIFEST, manifest)

    def close(self) -> None:
        """Write what is buffered and mark the recording complete (idempotent)."""
        if self.closed:
            return
        self._flush()
        self.closed = True
        self._buffer = None
        self._commit()


def _finishes_step(message: Message) -> bool:
    """Whether a training message applies its step's update (the model party steps on it)."""
    return in_step(message.kind, message.meta) and finishes_step(message.kind, message.meta, message.tensors)


@dataclass(frozen=True)
class _Context:
    phase: Phase
    step: int
    client: str
    batch_id: int | None
    session: str | None


class _Requests:
    """Phase, step and client of each request, so that its reply can inherit them.

    A reply carries its request's ``batch_id`` when training, else nothing: it then belongs to the
    latest request of its kind (evaluation and generation wait for each reply). ``step`` counts
    training steps as the model party does, from the ``update`` flags it receives.
    """

    #: Requests kept waiting for a reply (a one-way ``backward`` never gets one).
    MAX_WAITING = 4096

    def __init__(self, start_step: int) -> None:
        self.start_step = start_step
        self.steps_done: dict[str, int] = {}
        self.waiting: OrderedDict[tuple[str, int | None], _Context] = OrderedDict()
        self.latest: dict[str, _Context] = {}

    def observe(self, direction: Direction, message: Message) -> _Context:
        meta = message.meta
        batch_id = _int_or_none(meta.get("batch_id"))
        if direction == "to_model":
            client = str(meta.get("client") or "")
            phase = phase_of(message.kind, meta)
            done = self.start_step + self.steps_done.get(client, 0)
            explicit = _int_or_none(meta.get("step"))
            step = explicit if explicit is not None else done + 1 if phase == "train" else done
            session = meta.get("session")
            context = _Context(phase, step, client, batch_id, None if session is None else str(session))
            if _finishes_step(message):
                self.steps_done[client] = self.steps_done.get(client, 0) + 1
            reply = _REPLY_OF.get(message.kind)
            if reply is not None:
                self.latest[reply] = context
                if batch_id is not None:
                    self.waiting[(reply, batch_id)] = context
                    while len(self.waiting) > self.MAX_WAITING:
                        self.waiting.popitem(last=False)
            return context
        found = (
            self.waiting.pop((message.kind, batch_id)) if (message.kind, batch_id) in self.waiting else None
        )
        if found is None:
            found = self.latest.get(message.kind)
            if found is not None:
                self.waiting.pop((message.kind, found.batch_id), None)
        if found is None:
            done = self.start_step + sum(self.steps_done.values())
            return _Context(phase_of(message.kind, meta), done, "", batch_id, None)
        return found if batch_id is None else replace(found, batch_id=batch_id)


class RecordingWriter:
    """Streams every crossing a channel carries to disk: safetensors shards and a JSON manifest.

    A drop-in recorder for a :class:`~splitfed.transport.channel.Channel` (``Channel(recorder=...)``):
    it is called with each message exactly as delivered (after the channel's transforms), and
    stores its tensors bit for bit (no dtype conversion) together with the message's kind,
    direction, phase (see :func:`phase_of`; a reply inherits its request's), training step, batch
    id, client, session and metadata. Memory stays bounded: tensors wait in a buffer of at most
    ``shard_bytes`` until it becomes a shard; a larger tensor is written straight from its own
    memory. Read the result with :class:`RecordingReader`.

    Parameters
    ----------
    directory : str | Path
        Created if needed; must not hold a recording already.
    kinds : str | Iterable[str] | None, default None
        Record only these message kinds (e.g. ``("forward", "gen_start", "gen_step")``); ``None``: all.
    phases : str | Iterable[str] | None, default None
        Record only these phases (``"train"``, ``"eval"``, ``"generate"``, ``"other"``).
    directions : str | Iterable[str] | None, default None
        Record only ``"to_model"`` (what the model party receives) or ``"to_data"``.
    byte_budget : int | None, default None
        Stop storing tensors once they would exceed this many bytes; later crossings keep their
        metadata (the manifest counts the dropped bytes, tensors and records).
    shard_bytes : int, default 64 MiB
        Size of a shard, and so the most memory the buffer holds.
    start_step : int, default 0
        Training steps done before this recording starts (a resumed run), so steps count on.
    tap : str, default "channel"
        Where the recording was taken (stored in the manifest), e.g. ``"model_party"``.

    Examples
    --------
    >>> with RecordingWriter("rec", phases="train") as recorder:      # doctest: +SKIP
    ...     system = build_split(..., recorder=recorder)
    ...     system.data_party.train_step(batch)
    >>> [r.kind for r in RecordingReader("rec")]                       # doctest: +SKIP
    ['forward', 'forward_result', 'backward', 'backward_result']
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        kinds: str | Iterable[str] | None = None,
        phases: str | Iterable[str] | None = None,
        directions: str | Iterable[str] | None = None,
        byte_budget: int | None = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        start_step: int = 0,
        tap: str = "channel",
    ) -> None:
        self.kinds = _as_set(kinds, None, "message kinds")
        self.phases = _as_set(phases, PHASES, "phases")
        self.directions = _as_set(directions, DIRECTIONS, "directions")
        self.skipped = 0
        self._requests = _Requests(start_step)
        self._lock = threading.Lock()
        filters = {
            name: sorted(chosen) if chosen is not None else None
            for name, chosen in (
                ("kinds", self.kinds),
                ("phases", self.phases),
                ("directions", self.directions),
            )
        }
        self._info: dict[str, Any] = {
            "tap": tap,
            "start_step": start_step,
            "filters": filters,
            "skipped_records": 0,
        }
        self._shards = _ShardWriter(
            directory, content="crossings", shard_bytes=shard_bytes, byte_budget=byte_budget, info=self._info
        )
        self.directory = self._shards.directory

    def __call__(self, direction: Direction, message: Message) -> None:
        """Record one crossing (what :class:`~splitfed.transport.channel.Channel` calls)."""
        with self._lock:
            # Every message updates the request bookkeeping, recorded or not, so replies and steps stay right.
            context = self._requests.observe(direction, message)
            if (
                (self.kinds is not None and message.kind not in self.kinds)
                or (self.phases is not None and context.phase not in self.phases)
                or (self.directions is not None and direction not in self.directions)
            ):
                self.skipped += 1
                self._info["skipped_records"] = self.skipped
                return
            record: dict[str, Any] = {
                "index": self._shards.count,
                "kind": message.kind,
                "direction": direction,
                "phase": context.phase,
                "step": context.step,
                "batch_id": context.batch_id,
                "client": context.client,
                "session": context.session,
                "meta": dict(message.meta),
                "nbytes": message.nbytes,
            }
            self._shards.add(record, message.tensors)

    @property
    def records(self) -> int:
        """Crossings recorded so far (with or without their tensors)."""
        return self._shards.count

    @property
    def exhausted(self) -> bool:
        """Whether the byte budget is spent (tensors are no longer stored)."""
        return self._shards.exhausted

    def summary(self) -> dict[str, Any]:
        """Where the recording is and what it holds (records, shards, stored and dropped bytes)."""
        return {
            "directory": str(self.directory),
            "records": self.records,
            "shards": len(self._shards.shards),
            "skipped_records": self.skipped,
            **self._shards.totals,
        }

    def close(self) -> None:
        """Write what is buffered and mark the recording complete (safe to call twice)."""
        with self._lock:
            self._shards.close()

    def __enter__(self) -> RecordingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------- reading


@dataclass(frozen=True)
class TensorInfo:
    """What the manifest says about one recorded tensor (``shard`` is ``None`` when it was dropped)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    shard: int | None
    key: str | None


class _ShardSet:
    """A recording directory opened for reading: the validated manifest and tensor loading."""

    def __init__(self, directory: str | Path, content: str) -> None:
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        if not path.is_file():
            raise RecordingError(
                f"{self.directory} holds no recording: {path.name} is missing (write one with RecordingWriter, "
                "or `splitfed train CONFIG --record DIR`)"
            )
        try:
            manifest = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RecordingError(
                f"the manifest {path} is corrupt ({err}); the recording cannot be read"
            ) from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise RecordingError(f"{path} is not a splitfed recording manifest (no format {FORMAT!r})")
        if manifest.get("version") != VERSION:
            raise RecordingError(
                f"{path} has format version {manifest.get('version')!r}; this splitfed reads version {VERSION}"
            )
        if manifest.get("content") != content:
            other = "GroundTruthReader" if manifest.get("content") == "ground_truth" else "RecordingReader"
            raise RecordingError(
                f"{self.directory} holds {manifest.get('content')!r}, not {content!r}; read it with {other}"
            )
        if not isinstance(manifest.get("records"), list) or not isinstance(manifest.get("shards"), list):
            raise RecordingError(f"the manifest {path} is corrupt: it lacks its records or shards list")
        for shard in manifest["shards"]:
            file = self.directory / str(shard.get("file"))
            size = file.stat().st_size if file.is_file() else None
            if size != shard.get("bytes"):
                found = "missing" if size is None else f"{size} bytes"
                raise RecordingError(
                    f"shard {file.name} of {self.directory} is {found}, expected {shard.get('bytes')} bytes; "
                    "the recording is damaged (copy it again, or record again)"
                )
        self.manifest = manifest

    def info(self, raw: Mapping[str, Any]) -> dict[str, TensorInfo]:
        try:
            return {
                name: TensorInfo(
                    name,
                    _DTYPE_BY_NAME[t["dtype"]],
                    tuple(t["shape"]),
                    int(t["nbytes"]),
                    t["shard"],
                    t["key"],
                )
                for name, t in raw.get("tensors", {}).items()
            }
        except (KeyError, TypeError, ValueError) as err:
            raise RecordingError(
                f"the manifest of {self.directory} is corrupt: bad tensor entry ({err!r})"
            ) from None

    def load(self, info: TensorInfo) -> torch.Tensor:
        from safetensors import SafetensorError, safe_open

        if info.shard is None or info.key is None:
            raise RecordingError(
                f"tensor {info.name!r} was not stored (the recording's byte budget was spent); "
                "record again with a larger byte_budget"
            )
        try:
            file = self.directory / str(self.manifest["shards"][info.shard]["file"])
        except (IndexError, KeyError, TypeError):
            raise RecordingError(
                f"the manifest of {self.directory} names shard {info.shard}, which it does not list"
            ) from None
        try:
            with safe_open(str(file), framework="pt") as f:
                tensor = f.get_tensor(info.key)
        except (SafetensorError, OSError) as err:
            raise RecordingError(f"shard {file.name} of {self.directory} is corrupt ({err})") from None
        if tensor.dtype != info.dtype or tuple(tensor.shape) != info.shape:
            raise RecordingError(
                f"{info.key} in {file.name} is {tensor.dtype} {tuple(tensor.shape)}, but the manifest says "
                f"{info.dtype} {info.shape}: the recording is damaged"
            )
        return tensor  # type: ignore[no-any-return]


@dataclass
class Record:
    """One recorded crossing. Its tensors are read from disk only when asked for.

    Attributes
    ----------
    index : int
        Position among the recorded crossings.
    kind, direction, phase : str
    step : int
        The training step it belongs to (training), or the steps done before it (otherwise).
    batch_id : int | None
    client : str
    session : str | None
        The generation session.
    meta : dict
        The message's metadata as it crossed.
    nbytes : int
        Raw tensor bytes of the message.
    stored : bool
        Whether its tensors were stored (``False`` once the byte budget was spent).
    tensor_info : dict[str, TensorInfo]
    """

    index: int
    kind: str
    direction: Direction
    phase: Phase
    step: int
    batch_id: int | None
    client: str
    session: str | None
    meta: dict[str, MetaValue]
    nbytes: int
    stored: bool
    tensor_info: dict[str, TensorInfo]
    _shards: _ShardSet = field(repr=False, compare=False)

    @property
    def names(self) -> list[str]:
        """The names of the message's tensors."""
        return list(self.tensor_info)

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, read from its shard (dtype and bits as it crossed)."""
        if name not in self.tensor_info:
            raise KeyError(f"record {self.index} ({self.kind}) has no tensor {name!r}; it has {self.names}")
        return self._shards.load(self.tensor_info[name])

    def tensors(self) -> dict[str, torch.Tensor]:
        """All the message's tensors, read from their shards."""
        return {name: self.tensor(name) for name in self.tensor_info}


class RecordingReader:
    """Reads a recording lazily: records come from the manifest, tensors from shards when asked.

    Parameters
    ----------
    directory : str | Path
        What a :class:`RecordingWriter` wrote. A missing or corrupt manifest, or a missing or
        truncated shard, raises :class:`RecordingError` naming it.

    Examples
    --------
    >>> reader = RecordingReader("rec")                                 # doctest: +SKIP
    >>> for record in reader.records(kinds="forward", phases="train"):  # doctest: +SKIP
    ...     hidden = record.tensor("hidden")
    """

    def __init__(self, directory: str | Path) -> None:
        self._shards = _ShardSet(directory, "crossings")
        self.directory = self._shards.directory
        self.manifest = self._shards.manifest

    def __len__(self) -> int:
        return len(self.manifest["records"])

    def __iter__(self) -> Iterator[Record]:
        return self.records()

    def __getitem__(self, index: int) -> Record:
        return self._record(self.manifest["records"][index])

    @property
    def closed(self) -> bool:
        """Whether the writer was closed (``False``: the run stopped early; completed shards are here)."""
        return bool(self.manifest.get("closed"))

    @property
    def dropped_bytes(self) -> int:
        """Tensor bytes not stored because the byte budget was spent."""
        return int(self.manifest.get("dropped_bytes", 0))

    @property
    def stored_bytes(self) -> int:
        """Tensor bytes stored in the shards."""
        return int(self.manifest.get("stored_bytes", 0))

    def records(
        self,
        *,
        kinds: str | Iterable[str] | None = None,
        phases: str | Iterable[str] | None = None,
        directions: str | Iterable[str] | None = None,
        clients: str | Iterable[str] | None = None,
    ) -> Iterator[Record]:
        """The records matching every filter given (each a value or several), in crossing order."""
        wanted = {
            "kind": _as_set(kinds, None, "message kinds"),
            "phase": _as_set(phases, PHASES, "phases"),
            "direction": _as_set(directions, DIRECTIONS, "directions"),
            "client": _as_set(clients, None, "clients"),
        }
        for raw in self.manifest["records"]:
            if all(chosen is None or raw.get(key) in chosen for key, chosen in wanted.items()):
                yield self._record(raw)

    def _record(self, raw: Mapping[str, Any]) -> Record:
        try:
            return Record(
                index=int(raw["index"]),
                kind=str(raw["kind"]),
                direction=raw["direction"],
                phase=raw["phase"],
                step=int(raw["step"]),
                batch_id=raw.get("batch_id"),
                client=str(raw.get("client", "")),
                session=raw.get("session"),
                meta=dict(raw.get("meta", {})),
                nbytes=int(raw.get("nbytes", 0)),
                stored=bool(raw.get("stored", True)),
                tensor_info=self._shards.info(raw),
                _shards=self._shards,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise RecordingError(
                f"the manifest of {self.directory} is corrupt: bad record ({err!r})"
            ) from None


# ---------------------------------------------------------------------- ground truth


class GroundTruthWriter:
    """The data party's private ground truth, for scoring attacks; it never crosses the split.

    Per batch (training and evaluation): the batch id, the dataset example ids, and the batch's
    tensors (input ids, attention mask, labels, ...). Per generation session: the prompt ids,
    their attention mask and the generated ids. Same on-disk format as :class:`RecordingWriter`
    (read it with :class:`GroundTruthReader`). It is the ``ground_truth`` observer of a
    :class:`~splitfed.split.parties.DataParty` (called with ``(batch_id, phase, batch, ids)``);
    :meth:`generation` is a :class:`~splitfed.split.inference.SplitGenerator`'s.

    Parameters
    ----------
    directory : str | Path
        Its own directory (``<recording>/ground_truth`` next to a recording, see :func:`ground_truth_dir`).
    client : str, default ""
        The data party's id, as its messages name it.
    shard_bytes : int, default 64 MiB
    """

    def __init__(
        self, directory: str | Path, *, client: str = "", shard_bytes: int = DEFAULT_SHARD_BYTES
    ) -> None:
        self.client = client
        self._lock = threading.Lock()
        self._shards = _ShardWriter(
            directory,
            content="ground_truth",
            shard_bytes=shard_bytes,
            byte_budget=None,
            info={"client": client},
        )
        self.directory = self._shards.directory

    def __call__(
        self,
        batch_id: int,
        phase: str,
        batch: Mapping[str, Any],
        ids: Sequence[int] | None = None,
        original: Mapping[str, Any] | None = None,
    ) -> None:
        """Keep one batch: its id, phase, example ids and every tensor in it.

        ``original`` is the batch before a text defense rewrote it; its tensors are kept as
        ``original_<name>`` (``original_input_ids``: what an attack should recover), while
        ``input_ids`` stays what the head ran on (it lines up with the recorded activations).
        """
        tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        if original is not None:
            tensors |= {f"original_{k}": v for k, v in original.items() if isinstance(v, torch.Tensor)}
        mask = tensors.get("attention_mask", tensors.get("input_ids"))
        with self._lock:
            record = {
                "index": self._shards.count,
                "kind": "batch",
                "batch_id": int(batch_id),
                "client": self.client,
                "phase": phase,
                "example_ids": [int(i) for i in ids] if ids is not None else None,
                "batch_size": int(mask.shape[0]) if mask is not None and mask.dim() else None,
                "seq_len": int(mask.shape[1]) if mask is not None and mask.dim() > 1 else None,
            }
            self._shards.add(record, tensors)

    def generation(
        self,
        session: str,
        prompt_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        generated: Sequence[Sequence[int]],
        prompts: Sequence[str] | None = None,
    ) -> None:
        """Keep one generation session: prompt ids, their mask (left-padded) and each row's generated
        ids; ``prompts``: the prompt texts before text defenses (kept only when given)."""
        with self._lock:
            record = {
                "index": self._shards.count,
                "kind": "generation",
                "session": str(session),
                "client": self.client,
                "phase": "generate",
                "generated_ids": [[int(t) for t in row] for row in generated],
            }
            if prompts is not None:
                record["prompts"] = [str(p) for p in prompts]
            self._shards.add(record, {"prompt_ids": prompt_ids, "attention_mask": attention_mask})

    def close(self) -> None:
        """Write what is buffered and mark the ground truth complete (safe to call twice)."""
        with self._lock:
            self._shards.close()

    def __enter__(self) -> GroundTruthWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class BatchTruth:
    """What one batch really held (tensors read when asked for)."""

    batch_id: int
    client: str
    phase: str
    example_ids: list[int] | None
    batch_size: int | None
    seq_len: int | None
    tensor_info: dict[str, TensorInfo]
    _shards: _ShardSet = field(repr=False, compare=False)

    def tensor(self, name: str) -> torch.Tensor:
        """``input_ids``, ``attention_mask``, ``labels`` or any other tensor of the batch."""
        if name not in self.tensor_info:
            raise KeyError(f"batch {self.batch_id} has no tensor {name!r}; it has {list(self.tensor_info)}")
        return self._shards.load(self.tensor_info[name])


@dataclass
class GenerationTruth:
    """What one generation session really was: its prompt and what was generated."""

    session: str
    client: str
    generated_ids: list[list[int]]
    tensor_info: dict[str, TensorInfo]
    _shards: _ShardSet = field(repr=False, compare=False)
    #: The prompt texts before text defenses (``None`` unless the generator kept them).
    prompts: list[str] | None = None

    def tensor(self, name: str) -> torch.Tensor:
        """``prompt_ids`` or ``attention_mask`` (left-padded, as sent to the head)."""
        if name not in self.tensor_info:
            raise KeyError(
                f"session {self.session!r} has no tensor {name!r}; it has {list(self.tensor_info)}"
            )
        return self._shards.load(self.tensor_info[name])


class GroundTruthReader:
    """Reads what a :class:`GroundTruthWriter` wrote: batches by id, generation sessions by id.

    Parameters
    ----------
    directory : str | Path
        The ground-truth directory (``ground_truth_dir(recording)``).
    """

    def __init__(self, directory: str | Path) -> None:
        self._shards = _ShardSet(directory, "ground_truth")
        self.directory = self._shards.directory
        self._batches: dict[tuple[str, int], Mapping[str, Any]] = {}
        self._sessions: dict[str, Mapping[str, Any]] = {}
        for raw in self._shards.manifest["records"]:
            if raw.get("kind") == "batch":
                self._batches[(str(raw.get("client", "")), int(raw["batch_id"]))] = raw
            elif raw.get("kind") == "generation":
                self._sessions[str(raw["session"])] = raw

    def __len__(self) -> int:
        return len(self._batches) + len(self._sessions)

    @property
    def batch_ids(self) -> list[int]:
        """The ids of every batch kept, in order."""
        return [batch_id for _, batch_id in self._batches]

    @property
    def sessions(self) -> list[str]:
        """The ids of every generation session kept, in order."""
        return list(self._sessions)

    def batch(self, batch_id: int, client: str = "") -> BatchTruth:
        """The ground truth of batch ``batch_id`` of data party ``client``."""
        raw = self._batches.get((client, int(batch_id)))
        if raw is None:
            raise KeyError(
                f"no ground truth for batch {batch_id} of client {client!r} in {self.directory} "
                f"(it holds {len(self._batches)} batches)"
            )
        return BatchTruth(
            int(raw["batch_id"]),
            str(raw.get("client", "")),
            str(raw.get("phase")),
            raw.get("example_ids"),
            raw.get("batch_size"),
            raw.get("seq_len"),
            self._shards.info(raw),
            self._shards,
        )

    def batches(self) -> Iterator[BatchTruth]:
        """Every batch kept, in order."""
        for client, batch_id in self._batches:
            yield self.batch(batch_id, client)

    def generation(self, session: str) -> GenerationTruth:
        """The ground truth of generation session ``session``."""
        raw = self._sessions.get(str(session))
        if raw is None:
            raise KeyError(f"no ground truth for generation session {session!r} in {self.directory}")
        return GenerationTruth(
            str(raw["session"]),
            str(raw.get("client", "")),
            [list(row) for row in raw.get("generated_ids", [])],
            self._shards.info(raw),
            self._shards,
            list(raw["prompts"]) if raw.get("prompts") is not None else None,
        )
