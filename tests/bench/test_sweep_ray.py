"""Sweeps on a Ray cluster (`--ray ADDRESS`): runs are remote tasks, results land in the one store."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from splitfed.bench.ray_cluster import ClusterError, RayCluster
from splitfed.bench.store import ResultStore
from splitfed.bench.sweep import load_sweep, run_sweep
from splitfed.cli import app
from tiny import run_config, save_tiny_pretrained, write_topic_csv


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ray_sweep")
    save_tiny_pretrained(root / "model")
    write_topic_csv(root / "data.csv")
    return root


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A two-CPU Ray cluster of its own (head node processes this fixture starts and stops)."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.skip("this process is already connected to Ray; the test needs a cluster of its own")
    try:
        head = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    except Exception as err:  # no shared memory, no sockets: Ray cannot run here
        pytest.skip(f"could not start a local Ray cluster: {err}")
    try:
        yield head.address
    finally:
        head.shutdown()


def _sweep(root: Path, name: str) -> Path:
    run = run_config(root, "unused", split={"setting": "ht", "head_layers": 1, "tail_layers": 0})
    run["model"]["num_labels"] = 3
    run["train"] |= {"steps": 2, "eval_before": False}
    sweep = {
        "name": name,
        "run": run,
        # A defense sized for another model (the tiny one is 32 wide): that run fails in its worker.
        "defenses": [
            "none",
            {"name": "gaussian_mixer", "sigma": 2.0},
            {"name": "gaussian_mixer", "hidden_size": 7},
        ],
        "attacks": [{"name": "vmi", "steps": 10}, "bli"],
        "aux": "validation",
        "max_examples": 8,
        "out": str(root / name),
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_a_sweep_on_ray_stores_every_run_resumes_and_records_failures(workspace: Path, cluster: str) -> None:
    sweep, root = load_sweep(_sweep(workspace, "on_ray"))
    lines: list[str] = []
    first = run_sweep(sweep, root, log=lines.append, ray_address=cluster)
    assert "3 runs x 2 attacks; 0 stored, 3 to run" in lines[0]
    assert f"Ray at {cluster}: 2 at a time, 1 CPU each" in lines[0]
    assert len(first.stored) == 2 and len(lines) == 1 + 3  # a line per run, as with local workers
    with ResultStore(Path(sweep.out) / "results.sqlite") as store:  # type: ignore[arg-type]
        runs = {(r.spec["defense"], r.spec["params"].get("hidden_size")): r for r in store.runs()}
        good, failed = [runs["none", None], runs["gaussian_mixer", None]], runs["gaussian_mixer", 7]
        assert all(r.status == "done" and r.mp is not None for r in good)
        for run in good:
            assert {a.attack: a.status for a in store.attacks(run.key)} == {"vmi": "done", "bli": "done"}
        assert failed.status == "failed" and "shapes cannot be multiplied" in (failed.error or "")

    # The CLI resumes on the same cluster: the stored runs are skipped, the failed ones run again.
    again = CliRunner().invoke(
        app, ["bench", str(workspace / "on_ray.yaml"), "--ray", cluster, "--no-progress"]
    )
    assert again.exit_code == 0, again.output
    assert "2 stored, 1 to run" in again.output and again.output.count(": failed in") == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_address_where_no_cluster_answers_fails_at_once_naming_it(workspace: Path) -> None:
    pytest.importorskip("ray")
    address = f"127.0.0.1:{_free_port()}"
    with pytest.raises(ClusterError, match=f"no Ray cluster answers at {address}.*ray start --head"):
        RayCluster(address, connect_timeout_s=2).connect()
    result = CliRunner().invoke(
        app, ["bench", str(_sweep(workspace, "nowhere")), "--ray", f"ray://{address}", "--no-progress"]
    )
    assert result.exit_code != 0 and "ray start --head" in result.output
    with pytest.raises(ClusterError, match="expected auto, HOST:PORT"):
        RayCluster("nowhere").connect()
