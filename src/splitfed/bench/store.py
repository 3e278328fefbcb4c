"""The SQLite store of a sweep's results: one row per run, one per attack on a run.

Rows are written in a transaction each, so an interrupted sweep leaves every finished run stored
and nothing half-written; a run is identified by the hash of what determines it (its key), so a
rerun of the sweep skips what is stored. The store records the versions of the libraries that
produced each row. Each attack row keeps a few of its example reconstructions (original and
reconstructed text), bounded by :data:`MAX_EXAMPLES` and :data:`MAX_EXAMPLE_CHARS`.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
#: Example reconstructions kept per attack row (the report shows them beside the scores).
MAX_EXAMPLES = 3
#: Characters kept of each example text; longer ones are cut and end with an ellipsis.
MAX_EXAMPLE_CHARS = 200

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    sweep TEXT NOT NULL,
    spec TEXT NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    mp REAL,
    mp_metric TEXT,
    metrics TEXT,
    seconds REAL,
    bytes_to_model REAL,
    bytes_to_data REAL,
    data_party_flops REAL,
    versions TEXT,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS attacks (
    run_key TEXT NOT NULL,
    attack_key TEXT NOT NULL,
    attack TEXT NOT NULL,
    spec TEXT NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    ap REAL,
    ap_metric TEXT,
    metrics TEXT,
    baseline TEXT,
    chance REAL,
    seconds REAL,
    examples TEXT,
    created REAL NOT NULL,
    PRIMARY KEY (run_key, attack_key)
);
"""


class StoreError(RuntimeError):
    """A results database that cannot be opened or is not a splitfed store."""


def spec_key(spec: Mapping[str, Any]) -> str:
    """A stable hash of a JSON-ready spec (key order does not matter)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def bounded_examples(examples: Iterable[Mapping[str, Any]] | None) -> list[dict[str, str]]:
    """The first :data:`MAX_EXAMPLES` of ``examples``, each text cut to :data:`MAX_EXAMPLE_CHARS`.

    An example is a mapping with ``original`` and ``reconstructed`` text (missing keys read as
    empty), as :class:`~splitfed.privacy.attacks.base.AttackResult` gives them.
    """

    def cut(text: object) -> str:
        text = "" if text is None else str(text)
        return text if len(text) <= MAX_EXAMPLE_CHARS else text[: MAX_EXAMPLE_CHARS - 1] + "…"

    return [
        {"original": cut(e.get("original")), "reconstructed": cut(e.get("reconstructed"))}
        for e in list(examples or [])[:MAX_EXAMPLES]
    ]


def library_versions() -> dict[str, str]:
    """Versions of the libraries a result depends on."""
    out = {}
    for name in ("splitfed", "torch", "transformers", "peft", "tenseal", "flwr"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


@dataclass
class RunRow:
    """One stored run (see :meth:`ResultStore.runs`)."""

    key: str
    sweep: str
    spec: dict[str, Any]
    status: str
    error: str | None
    mp: float | None
    mp_metric: str | None
    metrics: dict[str, float]
    seconds: float | None
    bytes_to_model: float | None
    bytes_to_data: float | None
    data_party_flops: float | None
    versions: dict[str, str] = field(default_factory=dict)


@dataclass
class AttackRow:
    """One stored attack on a run (see :meth:`ResultStore.attacks`)."""

    run_key: str
    attack_key: str
    attack: str
    spec: dict[str, Any]
    status: str
    error: str | None
    ap: float | None
    ap_metric: str | None
    metrics: dict[str, float]
    baseline: dict[str, float]
    chance: float | None
    seconds: float | None
    examples: list[dict[str, str]] = field(default_factory=list)


def _loads(text: str | None, default: Any) -> Any:
    return json.loads(text) if text else default


class ResultStore:
    """A sweep's results in one SQLite file (created when missing).

    Parameters
    ----------
    path : str | Path
        The database file.

    Raises
    ------
    StoreError
        If the file exists but is not a splitfed results store (or has a newer schema).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=60)
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        except sqlite3.DatabaseError as err:
            raise StoreError(
                f"{self.path} is not a splitfed results store ({err}); choose another file"
            ) from None
        if row is None:
            with self._db:
                self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has results schema {row[0]}, newer than this splitfed's {SCHEMA_VERSION}; upgrade splitfed"
            )

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._db:
            yield self._db

    # ------------------------------------------------------------------ writing
    def put_run(
        self,
        key: str,
        *,
        sweep: str,
        spec: Mapping[str, Any],
        status: str,
        error: str | None = None,
        mp: float | None = None,
        mp_metric: str | None = None,
        metrics: Mapping[str, float] | None = None,
        seconds: float | None = None,
        bytes_to_model: float | None = None,
        bytes_to_data: float | None = None,
        data_party_flops: float | None = None,
    ) -> None:
        """Store (or replace) the result of run ``key``."""
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    key,
                    sweep,
                    json.dumps(dict(spec), sort_keys=True, default=str),
                    status,
                    error,
                    mp,
                    mp_metric,
                    json.dumps(dict(metrics or {})),
                    seconds,
                    bytes_to_model,
                    bytes_to_data,
                    data_party_flops,
                    json.dumps(library_versions()),
                    time.time(),
                ),
            )

    def put_attack(
        self,
        run_key: str,
        attack_key: str,
        *,
        attack: str,
        spec: Mapping[str, Any],
        status: str,
        error: str | None = None,
        ap: float | None = None,
        ap_metric: str | None = None,
        metrics: Mapping[str, float] | None = None,
        baseline: Mapping[str, float] | None = None,
        chance: float | None = None,
        seconds: float | None = None,
        examples: list[dict[str, str]] | None = None,
    ) -> None:
        """Store (or replace) the result of one attack on run ``run_key``.

        ``examples`` are bounded as :func:`bounded_examples` bounds them.
        """
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO attacks VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    run_key,
                    attack_key,
                    attack,
                    json.dumps(dict(spec), sort_keys=True, default=str),
                    status,
                    error,
                    ap,
                    ap_metric,
                    json.dumps(dict(metrics or {})),
                    json.dumps(dict(baseline or {})),
                    chance,
                    seconds,
                    json.dumps(bounded_examples(examples)),
                    time.time(),
                ),
            )

    def set_meta(self, key: str, value: Any) -> None:
        """Record ``value`` (JSON-ready) under ``key`` in the store's metadata (``schema`` is the store's own)."""
        if key == "schema":
            raise ValueError("the key 'schema' holds the store's schema version")
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value, sort_keys=True)))

    # ------------------------------------------------------------------ reading
    def get_meta(self, key: str) -> Any:
        """The value recorded under ``key`` by :meth:`set_meta` (``None``: nothing recorded)."""
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else _loads(row[0], None)

    def has_run(self, key: str) -> bool:
        """Whether run ``key`` is stored as done (a failed run is retried)."""
        row = self._db.execute("SELECT status FROM runs WHERE key = ?", (key,)).fetchone()
        return row is not None and row[0] == "done"

    def has_attack(self, run_key: str, attack_key: str) -> bool:
        """Whether that attack on that run is stored as done."""
        row = self._db.execute(
            "SELECT status FROM attacks WHERE run_key = ? AND attack_key = ?", (run_key, attack_key)
        ).fetchone()
        return row is not None and row[0] == "done"

    def attack_status(self, run_key: str, attack_key: str) -> str | None:
        """The stored status of that attack on that run (``None``: not stored)."""
        row = self._db.execute(
            "SELECT status FROM attacks WHERE run_key = ? AND attack_key = ?", (run_key, attack_key)
        ).fetchone()
        return None if row is None else str(row[0])

    def runs(self, sweep: str | None = None) -> list[RunRow]:
        """Every stored run (of ``sweep``), oldest first."""
        query = "SELECT * FROM runs" + (" WHERE sweep = ?" if sweep else "") + " ORDER BY created"
        rows = self._db.execute(query, (sweep,) if sweep else ()).fetchall()
        return [
            RunRow(
                r[0],
                r[1],
                _loads(r[2], {}),
                r[3],
                r[4],
                r[5],
                r[6],
                _loads(r[7], {}),
                r[8],
                r[9],
                r[10],
                r[11],
                _loads(r[12], {}),
            )
            for r in rows
        ]

    def attacks(self, run_key: str | None = None) -> list[AttackRow]:
        """Every stored attack (on run ``run_key``), oldest first."""
        query = "SELECT * FROM attacks" + (" WHERE run_key = ?" if run_key else "") + " ORDER BY created"
        rows = self._db.execute(query, (run_key,) if run_key else ()).fetchall()
        return [
            AttackRow(
                r[0],
                r[1],
                r[2],
                _loads(r[3], {}),
                r[4],
                r[5],
                r[6],
                r[7],
                _loads(r[8], {}),
                _loads(r[9], {}),
                r[10],
                r[11],
                _loads(r[12], []),
            )
            for r in rows
        ]
