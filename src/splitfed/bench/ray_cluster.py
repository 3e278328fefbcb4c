"""A sweep's runs as Ray tasks, for sweeps that outgrow one machine (``splitfed bench --ray ADDRESS``).

Each run is a Ray remote task calling the same :func:`~splitfed.bench.sweep.run_one` the local
workers call. Only the driver writes to the SQLite store, one outcome as it arrives
(``ray.wait``), so skipping stored runs and recording failures work as with local processes.
Outcomes come back through Ray's own object transport. Ray is imported here only, and only when a
sweep asks for a cluster.

Start a cluster with ``ray start --head`` (and ``ray start --address HEAD:6379`` on the other
machines), then run ``splitfed bench SWEEP.yaml --ray auto`` on the head or
``--ray HEAD:6379`` / ``--ray ray://HEAD:10001`` elsewhere. Every machine needs splitfed installed
in the same environment and the offline assets fetched (``splitfed assets fetch``); the paths a
sweep names (run directory, data files) must mean the same on every machine.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

from splitfed.bench.sweep import RunOutcome, RunSpec, run_one

#: What ``ray start`` prints after its address; said in every error about reaching a cluster.
START_HINT = (
    "start one with `ray start --head` (then --ray auto on that machine, or --ray HEAD_IP:6379 from another)"
)
#: Environment variables the runs read (asset cache, offline hub), handed to the workers when the
#: driver has them set: a worker started by ``ray start`` in another shell would not have them.
WORKER_ENV = (
    "SPLITFED_CACHE",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "TOKENIZERS_PARALLELISM",
)


class ClusterError(RuntimeError):
    """Ray is not importable, or no Ray cluster answers at the address given."""


def _host_port(address: str) -> tuple[str, int] | None:
    """The ``(host, port)`` that ``address`` connects to first, or ``None`` if Ray must resolve it."""
    if address == "auto":
        env = os.environ.get("RAY_ADDRESS", "")
        if not env or env == "auto":
            return None  # Ray reads the cluster started on this machine and fails fast without one
        address = env
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ClusterError(f"--ray {address}: expected auto, HOST:PORT or ray://HOST:PORT; {START_HINT}")
    return host.strip("[]"), int(port)


def check_reachable(address: str, *, timeout_s: float = 5.0) -> None:
    """Fail with a :class:`ClusterError` naming ``address`` unless something listens there.

    ``ray.init`` waits for minutes on an address where nothing answers; this check fails in
    ``timeout_s``.
    """
    target = _host_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout_s):
            pass
    except OSError as err:
        raise ClusterError(
            f"--ray {address}: no Ray cluster answers at {target[0]}:{target[1]} ({err}); {START_HINT}"
        ) from None


def _run_in_worker(
    cwd: str, run: RunSpec, attacks: Sequence[dict[str, Any]], kwargs: Mapping[str, Any]
) -> RunOutcome:
    """:func:`run_one` in a Ray worker, from the driver's working directory where this machine has
    it (Ray starts workers where ``ray start`` ran), so relative paths in run configs mean the same."""
    if os.path.isdir(cwd):
        os.chdir(cwd)
    return run_one(run, attacks, **kwargs)


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


class RayCluster:
    """A connection to a Ray cluster for one sweep, usable as a context manager.

    Parameters
    ----------
    address : str
        ``auto`` (``$RAY_ADDRESS``, or the cluster ``ray start --head`` started on this machine),
        ``HOST:PORT`` (a head node) or ``ray://HOST:PORT`` (Ray Client). If this process is
        already connected to Ray (``ray.init`` called before), that connection is used and left
        open.
    cpus_per_run : float, default 1.0
        CPUs each run reserves on the cluster; a run uses that many torch threads (at least one).
    connect_timeout_s : float, default 5.0
        How long to wait for the address to answer before giving up.
    """

    def __init__(self, address: str, *, cpus_per_run: float = 1.0, connect_timeout_s: float = 5.0) -> None:
        if cpus_per_run <= 0:
            raise ClusterError(f"cpus per run must be positive; got {cpus_per_run}")
        self.address = address
        self.cpus_per_run = cpus_per_run
        self.connect_timeout_s = connect_timeout_s
        self._ray: Any = None
        self._owned = False

    def __enter__(self) -> RayCluster:
        self.connect()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def connect(self) -> None:
        """Import Ray and connect (a no-op when connected already)."""
        if self._ray is not None:
            return
        try:
            import ray
        except ImportError as err:
            raise ClusterError(
                f"--ray {self.address}: Ray is not importable ({err}); install it with pip install 'ray[default]'"
            ) from None
        if not ray.is_initialized():
            check_reachable(self.address, timeout_s=self.connect_timeout_s)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # Ray's notice about GPU variables
                try:
                    # Workers' output stays in the cluster's logs: it would tear the progress bar,
                    # and each run's error comes back in its row.
                    ray.init(address=self.address, log_to_driver=False, logging_level=logging.WARNING)
                except ConnectionError as err:
                    raise ClusterError(f"--ray {self.address}: {_first_line(err)}; {START_HINT}") from None
            self._owned = True
        self._ray = ray

    def close(self) -> None:
        """Disconnect, if this object connected; the cluster itself keeps running."""
        if self._ray is not None and self._owned:
            self._ray.shutdown()
        self._ray, self._owned = None, False

    @property
    def parallel(self) -> int:
        """How many runs the cluster runs at once (its CPUs over ``cpus_per_run``)."""
        self.connect()
        cpus = float(self._ray.cluster_resources().get("CPU", 1.0))
        return max(1, int(cpus // self.cpus_per_run))

    def outcomes(
        self, runs: Sequence[RunSpec], attacks: Sequence[dict[str, Any]], **kwargs: Any
    ) -> Iterator[RunOutcome]:
        """Submit every run of ``runs`` and yield each outcome as it finishes.

        ``kwargs`` are :func:`run_one`'s (``out`` should be absolute). A task that dies without
        an outcome (its worker killed, out of memory, its node lost, after Ray's retries) yields
        a failed outcome naming the Ray error, so the sweep goes on.
        """
        self.connect()
        ray = self._ray
        env = {name: os.environ[name] for name in WORKER_ENV if name in os.environ}
        options: dict[str, Any] = {"num_cpus": self.cpus_per_run}
        if env:
            options["runtime_env"] = {"env_vars": env}
        task = ray.remote(_run_in_worker).options(**options)
        kwargs = kwargs | {"threads": max(1, int(self.cpus_per_run))}
        cwd = os.getcwd()
        pending = {task.remote(cwd, run, list(attacks), kwargs): run for run in runs}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                run = pending.pop(ref)
                try:
                    outcome = ray.get(ref)
                except Exception as err:  # the task, not the run, failed; the sweep goes on
                    outcome = RunOutcome(
                        run.key, {"status": "failed", "error": f"Ray task: {_first_line(err)}"}, [], 0.0
                    )
                yield outcome
