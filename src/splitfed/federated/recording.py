"""A federated run's recording: what the server saw each round, and, kept apart, what the clients trained on.

``splitfed fedtrain CONFIG --record DIR`` (:func:`splitfed.federated.simulation.fedtrain` with
``record=DIR``) writes, per round::

    DIR/manifest.json                         format, the server's view, the run's settings, per round:
                                              the sampled and kept clients, their FitConfig, the files
    DIR/round-0002/global.safetensors         the global adapters the round's clients started from
    DIR/round-0002/update-client-3.safetensors   client-3's update as the server decoded it (plain only)
    DIR/round-0002/average.safetensors        the round's decoded sample-weighted average
    DIR/ground_truth/manifest.json            per round and client: its file, steps and example indices
    DIR/ground_truth/round-0002/client-3.safetensors   step<k>.input_ids / .attention_mask / .labels /
                                              .example_ids of each local step (what the attacker must
                                              not read: only a scorer opens ground_truth/)

What the server sees depends on the aggregation (the manifest's ``view``):

* ``plain`` / ``none`` (``view: client_updates``): each client's update in the clear, recorded as the
  server decodes it from the payload it received (the aggregator's own ``combine`` and ``decode``
  of that one payload, so float32 on the wire and a shared mask's scatter included), under
  client-level DP the clipped and noised update;
* ``secagg`` (``view: aggregate``): only the unmasked sum, so only the decoded average is recorded;
* ``ckks`` (``view: aggregate``): only ciphertexts; the decoded average recorded is what the clients
  decrypt, which the server never reads.

The recording taps the aggregation where the server receives an upload
(:attr:`SimulatedAggregation.tap <splitfed.federated.rounds.SimulatedAggregation.tap>`) and the
client's loss where it collates a batch, so no aggregator or training code knows it is recorded.
Only safetensors and JSON are written, never pickles. A round is built in a hidden temporary
directory and renamed into place before the manifest (itself replaced atomically) names it, so an
interrupted run leaves the complete rounds before it and no half-written file; the manifests say
``"complete": false`` until the run ends (the ground truth's round is renamed first, and an
interrupted round's directories are removed). :class:`FederatedRecording` reads the server's view and
:class:`FederatedGroundTruth` the clients' batches, each refusing by name a missing or damaged file, a
manifest entry missing or of the wrong type, and any file name other than the recorder's own
``round-NNNN/<name>.safetensors`` inside the recording (:func:`recorded_path`), so a manifest cannot
make them read a file elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from splitfed.atomic import replace_json
from splitfed.federated.aggregators import Aggregator, Payload, PlainAggregator, SharedMask
from splitfed.federated.strategies.base import FitConfig
from splitfed.privacy.recording import GROUND_TRUTH, MANIFEST, RecordingError, check_new_recording

if TYPE_CHECKING:
    from splitfed.config import RunConfig

FORMAT = "splitfed-federated-recording"
TRUTH_FORMAT = "splitfed-federated-ground-truth"
VERSION = 1
#: ``view`` of a recording whose server saw each client's update / only their aggregate.
CLIENT_UPDATES = "client_updates"
AGGREGATE = "aggregate"
#: The batch tensors of one local step kept as ground truth (``step<k>.<name>``).
TRUTH_TENSORS = ("input_ids", "attention_mask", "labels")
#: The only file names a manifest may give: what the recorder writes, ``round-NNNN/<name>.safetensors``
#: (a name of letters, digits, ``.``, ``_`` and ``-``, no directory), so none can point elsewhere.
RECORDED_FILE = re.compile(r"round-\d{4,}/[A-Za-z0-9][A-Za-z0-9._-]*\.safetensors")
#: The settings :func:`config_settings` derives from a run's configuration, which a recording
#: must share with the run it is audited for.
CHECKED_SETTINGS = (
    "task",
    "model",
    "max_length",
    "clients",
    "clients_per_round",
    "aggregation",
    "finetune",
    "local_steps",
    "local_epochs",
    "dp",
    "pruning",
    "seed",
)

_VIEW_NOTES = {
    "plain": "the server sees every client's update in the clear: update-<client>.safetensors is each "
    "one as the server decoded it",
    "secagg": "secure aggregation shows the server only the sum of the round's masked updates: no "
    "client's update is recorded, only the decoded average (average.safetensors), which the server "
    "computes from the unmasked sum",
    "ckks": "CKKS shows the server only ciphertexts: no client's update is recorded; "
    "average.safetensors is the average the clients decrypt, which the server never reads",
}


#: What fedtrain writes into its output_dir, where a recording would mix with the run's own files.
RUN_OUTPUTS = ("results.json", "global", "checkpoint")


def check_new_federated_recording(directory: str | Path, *, output_dir: str | Path | None = None) -> None:
    """Raise :class:`~splitfed.privacy.recording.RecordingError` unless ``directory`` can take a new
    federated recording: it must not exist or be an empty directory, and be apart from
    ``output_dir``: not the same directory, not holding it, and not one of the run's own outputs
    in it (:data:`RUN_OUTPUTS`; a recording elsewhere inside output_dir is fine).

    Lets ``fedtrain --record`` fail before it loads a model rather than after.
    """
    directory = Path(directory)
    check_new_recording(directory)
    if output_dir is not None:
        record, out = directory.resolve(), Path(output_dir).resolve()
        if record == out:
            raise RecordingError(
                f"--record {directory} is the run's output_dir; record into a directory of its own"
            )
        if out.is_relative_to(record):
            raise RecordingError(
                f"--record {directory} holds the run's output_dir {output_dir}: the run would write into "
                "the recording; record into a directory outside output_dir's path (e.g. a sibling of it)"
            )
        if record.is_relative_to(out) and record.relative_to(out).parts[0] in RUN_OUTPUTS:
            raise RecordingError(
                f"--record {directory} is inside {out / record.relative_to(out).parts[0]}, which the run "
                f"writes itself ({', '.join(RUN_OUTPUTS)} in output_dir); record elsewhere, e.g. "
                f"{out / 'recording'}"
            )
    if directory.is_dir():
        entries = sorted(p.name for p in directory.iterdir())
        if entries:
            raise RecordingError(
                f"cannot record into {directory}: it is not empty ({len(entries)} entries, e.g. "
                f"{entries[0]!r}); record into a new directory or delete that one"
            )


def config_settings(cfg: RunConfig) -> dict[str, Any]:
    """The recording settings (:data:`CHECKED_SETTINGS`) that follow from a federated run's config."""
    fed = cfg.federated
    if fed is None:
        raise RecordingError("a split run's configuration has no federated recording settings")
    return {
        "task": cfg.task,
        "model": cfg.model.name,
        "max_length": cfg.data.max_length,
        "clients": fed.clients,
        "clients_per_round": fed.clients_per_round,
        "aggregation": fed.aggregation,
        "finetune": fed.finetune.model_dump(mode="json"),
        "local_steps": fed.local_steps,
        "local_epochs": fed.local_epochs,
        "dp": fed.dp.model_dump(mode="json") if fed.dp is not None else None,
        "pruning": fed.pruning.model_dump(mode="json") if fed.pruning is not None else None,
        "seed": cfg.train.seed,
    }


def _save(tensors: Mapping[str, torch.Tensor], path: Path) -> int:
    """Write ``tensors`` to ``path`` (inside a round's temporary directory); returns the bytes."""
    save_file({n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}, str(path))
    return path.stat().st_size


def _round_name(round_id: int) -> str:
    return f"round-{round_id:04d}"


class _RoundFiles:
    """One round's directory, built hidden and renamed into place when the round is complete."""

    def __init__(self, parent: Path, round_id: int) -> None:
        self.name = _round_name(round_id)
        self.final = parent / self.name
        self.tmp = parent / f".{self.name}.tmp"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.bytes = 0

    def save(self, file: str, tensors: Mapping[str, torch.Tensor]) -> str:
        self.bytes += _save(tensors, self.tmp / file)
        return f"{self.name}/{file}"

    def commit(self) -> None:
        if self.final.exists():
            raise RecordingError(f"{self.final} already exists: the recording was written into twice")
        os.replace(self.tmp, self.final)


class FederatedRecorder:
    """Writes a federated run's recording (see the module docstring), round by round.

    The simulation calls :meth:`start_round` with the global adapters, :meth:`client_batch` from
    each client's loss, :meth:`server_received` (as the aggregation's tap) for every upload, and
    :meth:`end_round` with the decoded average; :meth:`close` marks the recording complete.

    Parameters
    ----------
    directory : str | Path
        A new (or empty) directory (:func:`check_new_federated_recording`).
    aggregator : Aggregator
        The run's aggregator: a plain one shows the server each update, the others do not.
    aggregation : str
        Its name in the run's configuration (``plain``, ``none``, ``secagg``, ``ckks``).
    settings : Mapping[str, Any]
        JSON-ready run settings an attacker knows (task, model, fine-tuning, strategy, DP,
        pruning); each round adds its clients' :class:`FitConfig`.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        aggregator: Aggregator,
        aggregation: str,
        settings: Mapping[str, Any],
    ) -> None:
        self.directory = Path(directory)
        check_new_federated_recording(self.directory)
        self.truth_directory = self.directory / GROUND_TRUTH
        self.truth_directory.mkdir(parents=True, exist_ok=True)
        self._decoder = aggregator if isinstance(aggregator, PlainAggregator) else None
        self.view = CLIENT_UPDATES if self._decoder is not None else AGGREGATE
        family = "plain" if self._decoder is not None else aggregation
        self.manifest: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "complete": False,
            "aggregation": aggregation,
            "view": self.view,
            "view_note": _VIEW_NOTES.get(family, _VIEW_NOTES["secagg"]),
            "ground_truth": GROUND_TRUTH,
            "settings": dict(settings),
            "rounds": [],
        }
        self.truth: dict[str, Any] = {
            "format": TRUTH_FORMAT,
            "version": VERSION,
            "complete": False,
            "note": "the clients' batches: for scoring attacks only, never an attacker's input",
            "rounds": [],
        }
        self._round: dict[str, Any] | None = None
        self._files: _RoundFiles | None = None
        self._truth_files: _RoundFiles | None = None
        self._batches: dict[str, list[tuple[list[int], dict[str, torch.Tensor]]]] = {}
        self.stored_bytes = 0
        self.updates = 0
        self._write_manifests()

    def _write_manifests(self) -> None:
        replace_json(self.directory / MANIFEST, self.manifest, indent=1)
        replace_json(self.truth_directory / MANIFEST, self.truth, indent=1)

    def start_round(
        self,
        round_id: int,
        *,
        global_adapters: Mapping[str, torch.Tensor],
        sampled: Sequence[str],
        fit: FitConfig,
        prune_ratio: float = 0.0,
    ) -> None:
        """Begin ``round_id``: the global adapters its ``sampled`` clients start from, and their ``fit``."""
        if self._round is not None:
            raise RecordingError(f"round {round_id} started before round {self._round['round']} ended")
        self._truth_files = _RoundFiles(self.truth_directory, round_id)
        self._files = _RoundFiles(self.directory, round_id)
        self._batches = {}
        self._round = {
            "round": round_id,
            "sampled": list(sampled),
            "fit": dataclasses.asdict(fit),
            "prune_ratio": prune_ratio,
            "global": self._files.save("global.safetensors", global_adapters),
            "updates": {},
        }

    def _current(self, round_id: int) -> tuple[dict[str, Any], _RoundFiles]:
        if self._round is None or self._round["round"] != round_id or self._files is None:
            raise RecordingError(f"round {round_id} was not started (start_round) before it was recorded")
        return self._round, self._files

    def client_batch(
        self, round_id: int, client: str, example_ids: Sequence[int], batch: Mapping[str, torch.Tensor]
    ) -> None:
        """One local step of ``client``: the indices of its examples and the batch collated from them."""
        self._current(round_id)
        kept = {k: batch[k].detach().to("cpu").clone() for k in TRUTH_TENSORS if k in batch}
        self._batches.setdefault(client, []).append((list(example_ids), kept))

    def server_received(self, round_id: int, client: str, payload: Payload, mask: SharedMask | None) -> None:
        """The aggregation's tap: record ``client``'s update if the server can read it (plain)."""
        entry, files = self._current(round_id)
        if self._decoder is None:
            return
        # What the server reads: the aggregator's own decoding of this one payload.
        update = self._decoder.decode(self._decoder.combine({client: payload}))
        if mask is not None:
            update = mask.scatter(update)
        entry["updates"][client] = {
            "file": files.save(f"update-{client}.safetensors", update),
            "weight": float(payload.meta["weight"]),  # type: ignore[arg-type]
        }

    def end_round(
        self, round_id: int, *, average: Mapping[str, torch.Tensor], clients: Sequence[str]
    ) -> None:
        """Finish ``round_id``: its decoded average and kept ``clients``; the round becomes visible."""
        entry, files = self._current(round_id)
        assert self._truth_files is not None
        entry["clients"] = list(clients)
        entry["average"] = files.save("average.safetensors", average)
        truth_entry: dict[str, Any] = {"round": round_id, "clients": {}}
        for client, steps in sorted(self._batches.items()):
            tensors = {
                f"step{k}.{name}": t for k, (_, batch) in enumerate(steps) for name, t in batch.items()
            } | {
                f"step{k}.example_ids": torch.tensor(ids, dtype=torch.int64)
                for k, (ids, _) in enumerate(steps)
            }
            truth_entry["clients"][client] = {
                "file": self._truth_files.save(f"{client}.safetensors", tensors),
                "steps": len(steps),
                "examples": [ids for ids, _ in steps],
            }
        # The clients' batches first: an interruption between the two leaves a round of ground truth
        # that no manifest names (abort removes it), never a server round without its truth.
        self._truth_files.commit()
        files.commit()
        self.stored_bytes += files.bytes
        self.updates += len(entry["updates"])
        self.manifest["rounds"].append(entry)
        self.truth["rounds"].append(truth_entry)
        self._write_manifests()
        self._round, self._files, self._truth_files, self._batches = None, None, None, {}

    def abort(self) -> None:
        """Discard the unfinished round of an interrupted run: its temporary directories and any of
        its directories already renamed into place before the manifests named them, as well as a
        temporary round an earlier interruption left. The manifests keep ``complete: false`` and
        the rounds finished before."""
        listed = {r["round"] for r in self.manifest["rounds"]}
        for files in (self._files, self._truth_files):
            if files is not None:
                shutil.rmtree(files.tmp, ignore_errors=True)
                if self._round is not None and self._round["round"] not in listed:
                    shutil.rmtree(files.final, ignore_errors=True)
        for parent in (self.directory, self.truth_directory):
            for leftover in parent.glob(".round-*.tmp"):
                shutil.rmtree(leftover, ignore_errors=True)
        self._round, self._files, self._truth_files, self._batches = None, None, None, {}

    def close(self) -> None:
        """Mark the recording complete (a round left unfinished is discarded)."""
        self.abort()
        self.manifest["complete"] = self.truth["complete"] = True
        self._write_manifests()

    def summary(self) -> dict[str, Any]:
        """Where the recording is and what it holds (results.json's ``recording``)."""
        return {
            "directory": str(self.directory.resolve()),
            "kind": "federated",
            "view": self.view,
            "rounds": len(self.manifest["rounds"]),
            "updates": self.updates,
            "stored_bytes": self.stored_bytes,
            "ground_truth": str(self.truth_directory.resolve()),
        }


# ---------------------------------------------------------------------- reading


def recorded_path(directory: Path, relative: object, *, manifest: Path, entry: str) -> Path:
    """``directory / relative`` for a file a manifest names, refused unless the recorder could have
    written it: ``round-NNNN/<name>.safetensors`` (:data:`RECORDED_FILE`) that, links followed,
    stays inside ``directory``. ``entry`` says which of the manifest's entries named it."""
    if not isinstance(relative, str) or not RECORDED_FILE.fullmatch(relative):
        raise RecordingError(
            f"{manifest} is damaged or was tampered with: its {entry} names {relative!r}, not a file "
            "the recorder writes (round-NNNN/<name>.safetensors inside the recording); nothing outside "
            "the recording is read. Use the recording as fedtrain --record wrote it"
        )
    path = directory / relative
    if not path.resolve().is_relative_to(directory.resolve()):
        raise RecordingError(
            f"{manifest} is damaged or was tampered with: its {entry} {relative!r} leads outside "
            f"{directory} (to {path.resolve()}, through a link); nothing outside the recording is read"
        )
    return path


def _damaged(path: Path, what: str) -> RecordingError:
    return RecordingError(
        f"{path} is damaged: {what}; it is not as fedtrain --record writes it (record the run again)"
    )


def _field(path: Path, where: str, entry: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    """``entry[key]``, refused by name unless it is there and of ``kind`` (a bool is no number)."""
    if key not in entry:
        raise _damaged(path, f"{where} has no {key!r}")
    value = entry[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise _damaged(path, f"{where}'s {key!r} is {value!r:.80} ({type(value).__name__}), not {names}")
    return value


def _check_rounds(path: Path, manifest: dict[str, Any], *, truth: bool) -> dict[int, dict[str, Any]]:
    """The manifest's rounds by number, each entry's keys and types checked and each file it names
    checked by :func:`recorded_path`."""
    rounds: dict[int, dict[str, Any]] = {}
    for i, entry in enumerate(manifest["rounds"]):
        where = f"rounds[{i}]"
        if not isinstance(entry, dict):
            raise _damaged(path, f"{where} is {type(entry).__name__}, not an object")
        round_id = _field(path, where, entry, "round", int)
        where = f"rounds[{i}] (round {round_id})"
        if round_id in rounds:
            raise _damaged(path, f"{where} is listed twice")
        if truth:
            clients = _field(path, where, entry, "clients", dict)
            for client, files in clients.items():
                at = f"{where} client {client!r}"
                if not isinstance(files, dict):
                    raise _damaged(path, f"{at} is {type(files).__name__}, not an object")
                recorded_path(
                    path.parent, _field(path, at, files, "file", str), manifest=path, entry=f"{at} file"
                )
                if _field(path, at, files, "steps", int) < 1:
                    raise _damaged(path, f"{at} has {files['steps']} steps")
                _field(path, at, files, "examples", list)
        else:
            _field(path, where, entry, "fit", dict)
            _field(path, where, entry, "sampled", list)
            _field(path, where, entry, "clients", list)
            for key in ("global", "average"):
                recorded_path(
                    path.parent, _field(path, where, entry, key, str), manifest=path, entry=f"{where} {key}"
                )
            for client, update in _field(path, where, entry, "updates", dict).items():
                at = f"{where} update of {client!r}"
                if not isinstance(update, dict):
                    raise _damaged(path, f"{at} is {type(update).__name__}, not an object")
                recorded_path(
                    path.parent, _field(path, at, update, "file", str), manifest=path, entry=f"{at} file"
                )
                _field(path, at, update, "weight", (int, float))
        rounds[round_id] = entry
    return rounds


def _read_manifest(path: Path, expected: str) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """The manifest at ``path`` of format ``expected``, and its rounds by number, checked."""
    if not path.is_file():
        raise RecordingError(
            f"{path} is missing: {path.parent} is not a federated recording (fedtrain --record DIR writes one)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RecordingError(f"{path} is damaged: not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != expected:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise RecordingError(f"{path} is not a {expected} manifest (its format is {found!r})")
    if manifest.get("version") != VERSION:
        raise RecordingError(
            f"{path} has version {manifest.get('version')!r}; this splitfed reads version {VERSION}"
        )
    if not isinstance(manifest.get("rounds"), list):
        raise RecordingError(f"{path} is damaged: it lists no rounds")
    if expected == FORMAT:
        view = _field(path, "the manifest", manifest, "view", str)
        if view not in (CLIENT_UPDATES, AGGREGATE):
            raise _damaged(path, f"its view is {view!r}, not {CLIENT_UPDATES!r} or {AGGREGATE!r}")
        _field(path, "the manifest", manifest, "settings", dict)
        if _field(path, "the manifest", manifest, "ground_truth", str) != GROUND_TRUTH:
            raise RecordingError(
                f"{path} is damaged or was tampered with: its ground_truth names "
                f"{manifest['ground_truth']!r}; the recorder keeps the clients' batches in {GROUND_TRUTH}/ "
                "inside the recording, and nothing outside it is read"
            )
    return manifest, _check_rounds(path, manifest, truth=expected == TRUTH_FORMAT)


def _load(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``path`` (a :func:`recorded_path`), refused by name if missing or damaged."""
    if not path.is_file():
        raise RecordingError(f"{path} is missing: the recording is incomplete or was moved in part")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise RecordingError(f"{path} is damaged: not a readable safetensors file ({err})") from None


class FederatedRecording:
    """The server's view in a federated recording (:class:`FederatedRecorder`): what an attacker reads.

    Parameters
    ----------
    directory : str | Path

    Raises
    ------
    RecordingError
        When the manifest is missing, damaged (an entry missing or of the wrong type) or of another
        format, or names a file outside the recording; files are checked as they load.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.manifest_path = self.directory / MANIFEST
        self.manifest, self.rounds = _read_manifest(self.manifest_path, FORMAT)

    @property
    def view(self) -> str:
        """``client_updates`` (the server saw each update) or ``aggregate`` (only their average)."""
        return str(self.manifest["view"])

    @property
    def settings(self) -> dict[str, Any]:
        """The run settings the recording was made with."""
        return dict(self.manifest["settings"])

    @property
    def complete(self) -> bool:
        """Whether the run finished (an interrupted run's recording holds its complete rounds)."""
        return bool(self.manifest.get("complete"))

    def ground_truth(self) -> FederatedGroundTruth:
        """The clients' batches, in the recording's ``ground_truth/`` (for scoring only)."""
        return FederatedGroundTruth(self.directory / GROUND_TRUTH)

    def check_settings(self, cfg: RunConfig, *, run: str | Path) -> None:
        """Raise :class:`RecordingError` naming each setting (:data:`CHECKED_SETTINGS`) in which the
        recording differs from ``cfg``, the configuration of the run in ``run``."""
        expected = json.loads(json.dumps(config_settings(cfg)))
        recorded = self.settings
        differ = [
            f"{key}: recorded {recorded.get(key)!r}, the run's {expected[key]!r}"
            for key in CHECKED_SETTINGS
            if recorded.get(key) != expected[key]
        ]
        if differ:
            raise RecordingError(
                f"the recording {self.directory} was not made by the run in {run}: its settings differ "
                f"({'; '.join(differ)}); give the --recording that fedtrain --record wrote for this run "
                "(results.json's recording.directory says where)"
            )

    def _round(self, round_id: int) -> dict[str, Any]:
        if round_id not in self.rounds:
            raise RecordingError(
                f"{self.directory} holds no round {round_id}; it holds rounds {sorted(self.rounds)}"
            )
        return self.rounds[round_id]

    def _file(self, round_id: int, key: str) -> Path:
        return recorded_path(
            self.directory,
            self._round(round_id)[key],
            manifest=self.manifest_path,
            entry=f"round {round_id} {key}",
        )

    def fit(self, round_id: int) -> dict[str, Any]:
        """The clients' :class:`FitConfig` of ``round_id`` as a dict (lr, optimizer, steps, ...)."""
        return dict(self._round(round_id)["fit"])

    def global_path(self, round_id: int) -> Path:
        """The file of the global adapters the clients of ``round_id`` started from."""
        return self._file(round_id, "global")

    def global_adapters(self, round_id: int) -> dict[str, torch.Tensor]:
        """The global adapters the clients of ``round_id`` started from."""
        return _load(self.global_path(round_id))

    def clients(self, round_id: int) -> list[str]:
        """The clients whose updates the server recorded in ``round_id`` (none under secagg or ckks)."""
        return sorted(self._round(round_id)["updates"])

    def update(self, round_id: int, client: str) -> dict[str, torch.Tensor]:
        """``client``'s update of ``round_id`` (local minus global adapters) as the server decoded it."""
        updates = self._round(round_id)["updates"]
        if client not in updates:
            raise RecordingError(
                f"{self.directory} holds no update of {client!r} in round {round_id}"
                + (f" (it holds {sorted(updates)})" if updates else f" (the server's view is {self.view})")
            )
        entry = f"round {round_id} update of {client!r} file"
        return _load(
            recorded_path(self.directory, updates[client]["file"], manifest=self.manifest_path, entry=entry)
        )

    def average(self, round_id: int) -> dict[str, torch.Tensor]:
        """The decoded sample-weighted average of ``round_id``'s updates."""
        return _load(self._file(round_id, "average"))


class FederatedGroundTruth:
    """The clients' batches of a federated recording (its ``ground_truth/``): for scoring only.

    Parameters
    ----------
    directory : str | Path
        The recording's ``ground_truth/`` directory.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.manifest_path = self.directory / MANIFEST
        _, self.rounds = _read_manifest(self.manifest_path, TRUTH_FORMAT)

    def steps(self, round_id: int, client: str) -> list[dict[str, torch.Tensor]]:
        """Each local step's batch of ``client`` in ``round_id``: input_ids, attention_mask, labels,
        example_ids."""
        entry = self.rounds.get(round_id, {}).get("clients", {}).get(client)
        if entry is None:
            raise RecordingError(f"{self.manifest_path} holds no batch of {client!r} in round {round_id}")
        path = recorded_path(
            self.directory,
            entry["file"],
            manifest=self.manifest_path,
            entry=f"round {round_id} {client!r} file",
        )
        tensors = _load(path)
        out = []
        for k in range(int(entry["steps"])):
            names = (*TRUTH_TENSORS, "example_ids")
            step = {n: tensors[f"step{k}.{n}"] for n in names if f"step{k}.{n}" in tensors}
            if "input_ids" not in step:
                raise RecordingError(f"{path} is damaged: it lacks step{k}.input_ids")
            out.append(step)
        return out


__all__ = [
    "AGGREGATE",
    "CHECKED_SETTINGS",
    "CLIENT_UPDATES",
    "FederatedGroundTruth",
    "FederatedRecorder",
    "FederatedRecording",
    "check_new_federated_recording",
    "config_settings",
    "recorded_path",
]
